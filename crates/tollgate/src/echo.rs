//! The built-in echo destination (SPEC §6): with no route configured, leg B
//! goes here over real SIP on loopback. It answers every INVITE (180, 200
//! with an SDP answer naming its RTP socket; to an INVITE without SDP, a late
//! offer, the 200 carries an offer instead and the answer comes in the ACK)
//! and sends back every RTP packet it receives to where it came from, so a
//! fresh install completes a call end to end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tollgate_sip::message::{self, reason_phrase, response_to, Header, Message};

/// Binds the echo's SIP and RTP sockets on loopback and runs it.
pub async fn start() -> std::io::Result<SocketAddr> {
    let sip = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let rtp = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let sip_addr = sip.local_addr()?;
    let rtp_addr = rtp.local_addr()?;
    tokio::spawn(rtp_echo(rtp));
    tokio::spawn(sip_loop(sip, rtp_addr));
    Ok(sip_addr)
}

async fn rtp_echo(sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 2048];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let _ = sock.send_to(&buf[..n], from).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The answer to an SDP offer: same media line and attributes, our address
/// and port, and the direction that answers the offer's (RFC 3264 §6.1: a
/// `sendonly` offer, a hold, is answered `recvonly`; `recvonly` with
/// `sendonly`; `inactive` with `inactive`).
pub fn answer_sdp(offer: &[u8], rtp: SocketAddr) -> Option<String> {
    let offer = std::str::from_utf8(offer).ok()?;
    let mut media = None;
    let mut attrs = Vec::new();
    // The direction at session level (before any m=) and in the audio
    // section (which wins).
    let (mut session_dir, mut audio_dir, mut any_media) = (None, None, false);
    for line in offer.lines() {
        let line = line.trim_end();
        let dir = match line {
            "a=sendonly" => Some("recvonly"),
            "a=recvonly" => Some("sendonly"),
            "a=inactive" => Some("inactive"),
            "a=sendrecv" => Some("sendrecv"),
            _ => None,
        };
        if dir.is_some() {
            if media.is_some() {
                audio_dir = dir;
            } else if !any_media {
                session_dir = dir;
            }
            continue;
        }
        any_media |= line.starts_with("m=");
        if let Some(m) = line.strip_prefix("m=audio ") {
            let mut it = m.splitn(3, ' ');
            let (_port, proto, fmts) = (it.next()?, it.next()?, it.next()?);
            media = Some(format!("m=audio {} {proto} {fmts}", rtp.port()));
        } else if media.is_some() && line.starts_with("m=") {
            break;
        } else if media.is_some()
            && (line.starts_with("a=rtpmap:")
                || line.starts_with("a=fmtp:")
                || line.starts_with("a=crypto:")
                || line.starts_with("a=ptime:"))
        {
            attrs.push(line.to_string());
        }
    }
    let media = media?;
    let ip = rtp.ip();
    let mut sdp = format!(
        "v=0\r\no=tollgate-echo 1 1 IN IP4 {ip}\r\ns=echo\r\nc=IN IP4 {ip}\r\nt=0 0\r\n{media}\r\n"
    );
    for a in attrs {
        sdp.push_str(&a);
        sdp.push_str("\r\n");
    }
    let direction = audio_dir.or(session_dir).unwrap_or("sendrecv");
    sdp.push_str(&format!("a={direction}\r\n"));
    Some(sdp)
}

/// Our offer for an INVITE without SDP (RFC 3261 §13.2.1): plain RTP/AVP
/// (the echo returns packets as they came, so it cannot hold SRTP keys of
/// its own), G.711 and telephone-event, naming our RTP socket.
pub fn offer_sdp(rtp: SocketAddr) -> String {
    let ip = rtp.ip();
    let port = rtp.port();
    format!(
        "v=0\r\no=tollgate-echo 1 1 IN IP4 {ip}\r\ns=echo\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
    )
}

/// The SDP of a 200 to `invite`: the answer to its offer, or our offer when
/// it has none. `None` when the offer is unusable.
fn sdp_for(invite: &Message, rtp: SocketAddr) -> Option<String> {
    if invite.body.is_empty() {
        Some(offer_sdp(rtp))
    } else {
        answer_sdp(&invite.body, rtp)
    }
}

struct Dialog {
    answer: bytes::Bytes,
    at: Instant,
}

async fn sip_loop(sock: Arc<UdpSocket>, rtp: SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let mut dialogs: HashMap<String, Dialog> = HashMap::new();
    let mut counter: u64 = 0;
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(msg) = message::parse(&buf[..n]) else {
            continue;
        };
        let Some(method) = msg.method().map(str::to_string) else {
            continue;
        };
        let call_id = msg.call_id().unwrap_or_default().to_string();
        let send = |m: &Message| {
            let data = m.to_bytes();
            let sock = sock.clone();
            async move {
                let _ = sock.send_to(&data, from).await;
            }
        };
        match method.as_str() {
            "INVITE" if msg.to_tag().is_some() => {
                // A re-INVITE: answer its offer (or offer, if it has none)
                // in the same dialog.
                let Some(sdp) = sdp_for(&msg, rtp) else {
                    send(&response_to(&msg, 488, reason_phrase(488), None)).await;
                    continue;
                };
                let mut ok = response_to(&msg, 200, "OK", None);
                ok.headers.push(Header {
                    name: "Content-Type".into(),
                    value: "application/sdp".into(),
                });
                ok.body = sdp.into_bytes().into();
                send(&ok).await;
            }
            "INVITE" => {
                if let Some(d) = dialogs.get(&call_id) {
                    let _ = sock.send_to(&d.answer, from).await;
                    continue;
                }
                counter += 1;
                let tag = format!("echo{counter}");
                let contact = Header {
                    name: "Contact".into(),
                    value: format!(
                        "<sip:echo@{}>",
                        sock.local_addr().map(|a| a.to_string()).unwrap_or_default()
                    ),
                };
                let mut ringing = response_to(&msg, 180, reason_phrase(180), Some(&tag));
                ringing.headers.push(contact.clone());
                send(&ringing).await;
                let Some(sdp) = sdp_for(&msg, rtp) else {
                    let resp = response_to(&msg, 488, reason_phrase(488), Some(&tag));
                    send(&resp).await;
                    continue;
                };
                let mut ok = response_to(&msg, 200, "OK", Some(&tag));
                ok.headers.push(contact);
                ok.headers.push(Header {
                    name: "Content-Type".into(),
                    value: "application/sdp".into(),
                });
                ok.body = sdp.into_bytes().into();
                let data = ok.to_bytes();
                let _ = sock.send_to(&data, from).await;
                dialogs.insert(
                    call_id,
                    Dialog {
                        answer: data,
                        at: Instant::now(),
                    },
                );
            }
            "ACK" => {}
            "BYE" | "CANCEL" | "OPTIONS" | "UPDATE" | "INFO" => {
                let code = if method == "BYE" && dialogs.remove(&call_id).is_none() {
                    481
                } else {
                    200
                };
                send(&response_to(&msg, code, reason_phrase(code), None)).await;
            }
            _ => send(&response_to(&msg, 501, reason_phrase(501), None)).await,
        }
        // Forget dialogs whose BYE never came (bounded memory).
        if dialogs.len() > 10_000 {
            let cutoff = Instant::now() - Duration::from_secs(4 * 3600);
            dialogs.retain(|_, d| d.at > cutoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_its_own_address_and_the_offered_formats() {
        let offer = b"v=0\r\no=- 1 1 IN IP4 10.1.1.1\r\ns=-\r\nc=IN IP4 10.1.1.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\nm=video 4002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n";
        let ans = answer_sdp(offer, "127.0.0.1:7000".parse().unwrap()).unwrap();
        assert!(ans.contains("c=IN IP4 127.0.0.1\r\n"));
        assert!(ans.contains("m=audio 7000 RTP/AVP 0 101\r\n"));
        assert!(ans.contains("telephone-event"));
        assert!(!ans.contains("H264"));
        assert!(answer_sdp(b"garbage", "127.0.0.1:7000".parse().unwrap()).is_none());
    }

    #[test]
    fn answers_hold_and_resume_with_the_matching_direction() {
        let rtp: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let offer = |dir: &str| {
            format!(
                "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                 m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n{dir}"
            )
        };
        for (dir, want) in [
            ("a=sendonly\r\n", "a=recvonly\r\n"),
            ("a=recvonly\r\n", "a=sendonly\r\n"),
            ("a=inactive\r\n", "a=inactive\r\n"),
            ("a=sendrecv\r\n", "a=sendrecv\r\n"),
            ("", "a=sendrecv\r\n"),
        ] {
            let ans = answer_sdp(offer(dir).as_bytes(), rtp).unwrap();
            assert!(ans.ends_with(want), "{dir:?} -> {ans}");
            assert_eq!(
                ans.matches("a=sendrecv").count()
                    + ans.matches("only").count()
                    + ans.matches("inactive").count(),
                1,
                "one direction: {ans}"
            );
        }
        // A session-level hold applies when the audio section says nothing.
        let session = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                       a=sendonly\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert!(answer_sdp(session.as_bytes(), rtp)
            .unwrap()
            .ends_with("a=recvonly\r\n"));
    }

    #[test]
    fn offers_plain_rtp_when_the_invite_has_no_sdp() {
        let rtp: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let invite = message::parse(
            b"INVITE sip:echo@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n\
              From: <sip:a@x>;tag=1\r\nTo: <sip:echo@x>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
              Content-Length: 0\r\n\r\n",
        )
        .unwrap();
        let sdp = sdp_for(&invite, rtp).unwrap();
        assert!(sdp.contains("c=IN IP4 127.0.0.1\r\n"));
        assert!(sdp.contains("m=audio 7000 RTP/AVP 0 8 101\r\n"));
        assert!(sdp.contains("a=rtpmap:101 telephone-event/8000\r\n"));
    }
}
