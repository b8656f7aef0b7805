//! The stream gateway: leg B of every stream call, a SIP user agent on a
//! loopback UDP socket inside the edge. The B2BUA sends it the INVITE of a
//! route whose target is a stream URL (as `sip:stream-<n>@<gateway>`); it
//! answers at once with its own RTP socket (one per call, loopback), reads
//! the call's runtime parameters from the `X-Tollgate-*` headers the B2BUA
//! set (it strips the caller's own), and hands the call to a
//! [`bridge`](super::bridge) task. A BYE ends the bridge (`stop`); a stream
//! that fails hangs the call up through the driver's control channel, with a
//! [`StreamEnd`] cause, which BYEs both legs.

use super::bridge::{self, Codec, LegEvent, Setup};
use super::twilio::StartInfo;
use super::StreamConfig;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tollgate_keys::KeyStore;
use tollgate_media::sdp::SessionDescription;
use tollgate_sip::driver::Control;
use tollgate_sip::message::{self, reason_phrase, response_to, Header, Message};

/// What the gateway needs from the rest of the edge, known once it runs.
#[derive(Clone)]
pub struct Wiring {
    /// The edge's SIP UDP socket: the gateway takes requests from it only
    /// (any other local process that finds the port is ignored).
    pub sip_udp: Option<SocketAddr>,
    pub control: mpsc::Sender<Control>,
    pub calls: crate::policy::CallRegistry,
    pub keys: Arc<dyn KeyStore>,
}

pub struct Gateway {
    sock: Arc<UdpSocket>,
    addr: SocketAddr,
    /// Stream URLs by index (`stream-<index>` in the target URI): append
    /// only, so that a reload keeps the URLs of calls up.
    urls: Mutex<Vec<String>>,
    wiring: OnceLock<Wiring>,
    cfg: Arc<StreamConfig>,
}

impl Gateway {
    /// Binds the gateway's SIP socket on loopback and runs it.
    pub async fn start(cfg: StreamConfig) -> std::io::Result<Arc<Gateway>> {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = sock.local_addr()?;
        super::describe_metrics();
        metrics::gauge!("tollgate_streams_active").set(0.0);
        metrics::gauge!("tollgate_stream_queue_frames").set(0.0);
        let gw = Arc::new(Gateway {
            sock,
            addr,
            urls: Mutex::new(Vec::new()),
            wiring: OnceLock::new(),
            cfg: Arc::new(cfg),
        });
        tokio::spawn(sip_loop(gw.clone()));
        Ok(gw)
    }

    /// The SIP target URI that delivers a call to the stream `url`.
    pub fn target_for(&self, url: &str) -> String {
        let mut urls = self.urls.lock().unwrap_or_else(PoisonError::into_inner);
        let i = match urls.iter().position(|u| u == url) {
            Some(i) => i,
            None => {
                urls.push(url.to_owned());
                urls.len() - 1
            }
        };
        format!("sip:stream-{i}@{}", self.addr)
    }

    /// Connects the gateway to the driver, the call registry and the keys.
    pub fn attach(&self, w: Wiring) {
        let _ = self.wiring.set(w);
    }

    fn url(&self, ruri: &str) -> Option<String> {
        let user = message::SipUri::parse(ruri).ok()?.user?;
        let i: usize = user.strip_prefix("stream-")?.parse().ok()?;
        self.urls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(i)
            .cloned()
    }
}

/// The RTP side of one call: where the relay's leg B is, which codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaPlan {
    pub remote: SocketAddr,
    pub codec: Codec,
    pub telephone_event: Option<u8>,
}

/// Picks the audio format from an offer (µ-law first: no transcoding) and
/// where to send it.
pub fn plan_from_sdp(body: &[u8]) -> Option<MediaPlan> {
    let sdp = SessionDescription::parse(body).ok()?;
    let (i, m) = sdp
        .media
        .iter()
        .enumerate()
        .find(|(_, m)| m.kind == "audio" && m.port != 0 && m.proto == "RTP/AVP")?;
    let ip = sdp.connection(i)?;
    let rtpmap = |name: &str| {
        m.attributes("rtpmap").find_map(|v| {
            let (pt, enc) = v.split_once(' ')?;
            enc.to_ascii_lowercase()
                .starts_with(name)
                .then(|| pt.parse::<u8>().ok())
                .flatten()
        })
    };
    let has = |pt: &str| m.formats.iter().any(|f| f == pt);
    let codec = if has("0") {
        Codec::Pcmu
    } else if has("8") {
        Codec::Pcma
    } else {
        return None;
    };
    let telephone_event = rtpmap("telephone-event/8000").filter(|pt| has(&pt.to_string()));
    Some(MediaPlan {
        remote: SocketAddr::new(ip, m.port),
        codec,
        telephone_event,
    })
}

/// Our SDP: the plan's codec (or, for a late offer, both G.711 laws) and
/// telephone-event, on `rtp`.
pub fn sdp(rtp: SocketAddr, plan: Option<&MediaPlan>) -> String {
    let ip = rtp.ip();
    let port = rtp.port();
    let mut s = format!(
        "v=0\r\no=tollgate-stream 1 1 IN IP4 {ip}\r\ns=stream\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
    );
    match plan {
        Some(p) => {
            let pt = p.codec.payload_type();
            let te = p.telephone_event;
            s.push_str(&format!("m=audio {port} RTP/AVP {pt}"));
            if let Some(te) = te {
                s.push_str(&format!(" {te}"));
            }
            s.push_str(&format!("\r\na=rtpmap:{pt} {}/8000\r\n", p.codec.name()));
            if let Some(te) = te {
                s.push_str(&format!(
                    "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-15\r\n"
                ));
            }
        }
        None => s.push_str(&format!(
            "m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n"
        )),
    }
    s.push_str("a=ptime:20\r\na=sendrecv\r\n");
    s
}

struct Dialog {
    /// The 200 we sent (a retransmitted INVITE gets it again).
    answer: bytes::Bytes,
    events: mpsc::UnboundedSender<LegEvent>,
    /// Waiting for the answer in the ACK (we offered).
    late: bool,
    rtp: SocketAddr,
    at: Instant,
}

fn ok_with_sdp(msg: &Message, tag: Option<&str>, contact: &str, body: String) -> Message {
    let mut ok = response_to(msg, 200, "OK", tag);
    ok.headers.push(Header {
        name: "Contact".into(),
        value: contact.to_owned(),
    });
    ok.headers.push(Header {
        name: "Content-Type".into(),
        value: "application/sdp".into(),
    });
    ok.body = body.into_bytes().into();
    ok
}

async fn sip_loop(gw: Arc<Gateway>) {
    let mut buf = vec![0u8; 65_536];
    let mut dialogs: HashMap<String, Dialog> = HashMap::new();
    let mut counter: u64 = 0;
    let contact = format!("<sip:stream@{}>", gw.addr);
    loop {
        let Ok((n, from)) = gw.sock.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let trusted = gw
            .wiring
            .get()
            .and_then(|w| w.sip_udp)
            .is_some_and(|edge| from_edge(edge, from));
        if !trusted {
            continue;
        }
        let Ok(msg) = message::parse(&buf[..n]) else {
            continue;
        };
        let Some(method) = msg.method().map(str::to_string) else {
            continue;
        };
        let call_id = msg.call_id().unwrap_or_default().to_string();
        let reply = |m: &Message| {
            let data = m.to_bytes();
            let sock = gw.sock.clone();
            async move {
                let _ = sock.send_to(&data, from).await;
            }
        };
        match method.as_str() {
            "INVITE" if msg.to_tag().is_some() => {
                // A re-INVITE (e.g. hold): answer it on the same socket.
                let Some(d) = dialogs.get(&call_id) else {
                    reply(&response_to(&msg, 481, reason_phrase(481), None)).await;
                    continue;
                };
                let plan = plan_from_sdp(&msg.body);
                if !msg.body.is_empty() && plan.is_none() {
                    reply(&response_to(&msg, 488, reason_phrase(488), None)).await;
                    continue;
                }
                if let Some(p) = plan {
                    let _ = d.events.send(LegEvent::Media(p));
                }
                let ok = ok_with_sdp(&msg, None, &contact, sdp(d.rtp, plan.as_ref()));
                reply(&ok).await;
            }
            "INVITE" => {
                if let Some(d) = dialogs.get(&call_id) {
                    let _ = gw.sock.send_to(&d.answer, from).await;
                    continue;
                }
                let Some(url) = msg.request_uri().and_then(|u| gw.url(u)) else {
                    reply(&response_to(&msg, 404, reason_phrase(404), None)).await;
                    continue;
                };
                let Some(wiring) = gw.wiring.get().cloned() else {
                    reply(&response_to(&msg, 503, reason_phrase(503), None)).await;
                    continue;
                };
                let plan = plan_from_sdp(&msg.body);
                if !msg.body.is_empty() && plan.is_none() {
                    reply(&response_to(&msg, 488, reason_phrase(488), None)).await;
                    continue;
                }
                let rtp = match UdpSocket::bind("127.0.0.1:0").await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream gateway: no RTP socket");
                        reply(&response_to(&msg, 503, reason_phrase(503), None)).await;
                        continue;
                    }
                };
                let Ok(rtp_addr) = rtp.local_addr() else {
                    continue;
                };
                counter += 1;
                let tag = format!("stream{counter}");
                let ok = ok_with_sdp(&msg, Some(&tag), &contact, sdp(rtp_addr, plan.as_ref()));
                let data = ok.to_bytes();
                let _ = gw.sock.send_to(&data, from).await;
                let (tx, rx) = mpsc::unbounded_channel();
                let setup = setup_of(&msg, &call_id, url, &wiring);
                tokio::spawn(bridge::run(setup, rtp, plan, rx, gw.cfg.clone(), wiring));
                dialogs.insert(
                    call_id,
                    Dialog {
                        answer: data,
                        events: tx,
                        late: plan.is_none(),
                        rtp: rtp_addr,
                        at: Instant::now(),
                    },
                );
            }
            "ACK" => {
                if let Some(d) = dialogs.get_mut(&call_id) {
                    if d.late {
                        d.late = false;
                        match plan_from_sdp(&msg.body) {
                            Some(p) => {
                                let _ = d.events.send(LegEvent::Media(p));
                            }
                            // The B2BUA BYEs a call whose ACK had no usable
                            // answer; nothing to stream meanwhile.
                            None => {
                                let _ = d.events.send(LegEvent::Bye);
                            }
                        }
                    }
                }
            }
            "BYE" => {
                let code = match dialogs.remove(&call_id) {
                    Some(d) => {
                        let _ = d.events.send(LegEvent::Bye);
                        200
                    }
                    None => 481,
                };
                reply(&response_to(&msg, code, reason_phrase(code), None)).await;
            }
            "CANCEL" | "OPTIONS" | "UPDATE" | "INFO" => {
                reply(&response_to(&msg, 200, "OK", None)).await;
            }
            _ => reply(&response_to(&msg, 501, reason_phrase(501), None)).await,
        }
        // Forget dialogs whose BYE never came (bounded memory).
        if dialogs.len() > 10_000 {
            let cutoff = Instant::now() - Duration::from_secs(4 * 3600);
            dialogs.retain(|_, d| d.at > cutoff && !d.events.is_closed());
        }
    }
}

/// Whether a datagram from `from` comes from the edge's SIP socket `edge`
/// (bound to a wildcard address, it reaches loopback from 127.0.0.1).
pub fn from_edge(edge: SocketAddr, from: SocketAddr) -> bool {
    from.port() == edge.port()
        && (from.ip() == edge.ip() || (edge.ip().is_unspecified() && from.ip().is_loopback()))
}

/// The call's identity and runtime parameters from the B2BUA's INVITE.
fn setup_of(msg: &Message, call_id: &str, url: String, wiring: &Wiring) -> Setup {
    let key_id = msg.header("X-Tollgate-Key").unwrap_or_default().to_owned();
    let mut custom = BTreeMap::new();
    for (h, name) in [
        ("X-Tollgate-Model", "model"),
        ("X-Tollgate-Record", "record"),
        ("X-Tollgate-Max-Duration", "max_duration"),
        ("X-Tollgate-Webhook", "webhook"),
    ] {
        if let Some(v) = msg.header(h) {
            custom.insert(name.to_owned(), v.to_owned());
        }
    }
    let secret = wiring
        .keys
        .get(&key_id)
        .and_then(|k| k.webhook_secret().map(|s| SecretText(s.to_owned())));
    if secret.is_none() {
        tracing::warn!(key = %key_id, "stream upgrade unsigned: the key has no webhook secret (made before webhooks); roll the key");
    }
    Setup {
        url,
        secret,
        info: StartInfo {
            stream_sid: format!("MZ{}", bridge::random_hex(16)),
            call_sid: call_id.to_owned(),
            account_sid: key_id,
            custom,
        },
    }
}

/// A secret that `Debug` does not show.
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_edge_sip_socket_is_heard() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(from_edge(a("127.0.0.1:5060"), a("127.0.0.1:5060")));
        assert!(from_edge(a("0.0.0.0:5060"), a("127.0.0.1:5060")));
        assert!(from_edge(a("192.0.2.1:5060"), a("192.0.2.1:5060")));
        assert!(!from_edge(a("127.0.0.1:5060"), a("127.0.0.1:5061")));
        assert!(!from_edge(a("192.0.2.1:5060"), a("127.0.0.1:5060")));
        assert!(!from_edge(a("0.0.0.0:5060"), a("127.0.0.2:5061")));
    }

    #[test]
    fn plans_prefer_ulaw_and_find_telephone_event() {
        let offer = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
            m=audio 4000 RTP/AVP 8 0 96\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
            a=rtpmap:96 telephone-event/8000\r\n";
        let p = plan_from_sdp(offer).unwrap();
        assert_eq!(p.remote, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(p.codec, Codec::Pcmu);
        assert_eq!(p.telephone_event, Some(96));
        let alaw = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
            m=audio 4000 RTP/AVP 8\r\n";
        assert_eq!(plan_from_sdp(alaw).unwrap().codec, Codec::Pcma);
        assert_eq!(plan_from_sdp(alaw).unwrap().telephone_event, None);
        let g722 = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
            m=audio 4000 RTP/AVP 9\r\n";
        assert!(plan_from_sdp(g722).is_none());
        assert!(plan_from_sdp(b"garbage").is_none());
        let ans = sdp("127.0.0.1:7000".parse().unwrap(), Some(&p));
        assert!(ans.contains("m=audio 7000 RTP/AVP 0 96\r\n"), "{ans}");
        assert!(ans.contains("a=rtpmap:96 telephone-event/8000\r\n"));
        let offer = sdp("127.0.0.1:7000".parse().unwrap(), None);
        assert!(offer.contains("m=audio 7000 RTP/AVP 0 8 101\r\n"));
    }
}
