//! The relay over real loopback UDP: an RTP endpoint on leg A, an SRTP
//! endpoint on leg B (and the reverse), SRTP checked with the webrtc-srtp
//! reference; bad tags, strangers and replays dropped and counted while good
//! media keeps flowing; ports all returned.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tollgate_media::sdp::{Crypto, SessionDescription};
use tollgate_media::srtp::{reference, Direction, SrtpKeys, SrtpTransform, Suite};
use tollgate_media::{MediaConfig, MediaEngine, MediaError, Profile};

/// Every test peer signals from loopback.
const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Each test's own port range, below the kernel's ephemeral range (32768+)
/// so that no client socket of another test can sit in it.
fn engine(first_port: u16) -> MediaEngine {
    MediaEngine::new(MediaConfig {
        ip: "127.0.0.1".parse().unwrap(),
        ports: (first_port, first_port + 99),
        timeout: Duration::from_secs(30),
    })
}

async fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

fn port(s: &UdpSocket) -> u16 {
    s.local_addr().unwrap().port()
}

async fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 2048];
    match timeout(Duration::from_millis(500), s.recv_from(&mut b)).await {
        Ok(Ok((n, _))) => {
            b.truncate(n);
            Some(b)
        }
        _ => None,
    }
}

fn rtp(seq: u16, ssrc: u32, fill: u8) -> BytesMut {
    let mut b = BytesMut::with_capacity(256);
    b.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    b[2..4].copy_from_slice(&seq.to_be_bytes());
    b[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    b[8..12].copy_from_slice(&ssrc.to_be_bytes());
    b.extend_from_slice(&[fill; 160]);
    b
}

fn rtcp_rr(ssrc: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(256);
    b.extend_from_slice(&[0x80, 201, 0, 1]);
    b.extend_from_slice(&ssrc.to_be_bytes());
    b
}

fn offer_sdp(proto: &str, rtp_port: u16, rtcp_port: u16, extra: &str) -> Vec<u8> {
    format!(
        "v=0\r\no=a 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} {proto} 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=rtcp:{rtcp_port}\r\n{extra}a=sendrecv\r\n\
         m=video 5000 RTP/AVP 99\r\na=rtpmap:99 H264/90000\r\n"
    )
    .into_bytes()
}

fn ref_ctx(suite: Suite, keys: &SrtpKeys, d: Direction) -> reference::Context {
    reference::Context::new(suite, keys, d).unwrap()
}

/// Our relay's address for the audio stream of `sdp`.
fn relay_addr(sdp: &SessionDescription) -> (SocketAddr, SocketAddr) {
    let m = &sdp.media[0];
    let ip = sdp.connection(0).unwrap();
    let rtcp = m.rtcp().unwrap().0;
    (SocketAddr::new(ip, m.port), SocketAddr::new(ip, rtcp))
}

#[tokio::test]
async fn rtp_to_srtp_every_suite_with_attacks() {
    let engine = engine(31000);
    for (call, suite) in (1u64..).zip(Suite::ALL) {
        let (a, a_rtcp, b, b_rtcp, stranger) = (
            bind().await,
            bind().await,
            bind().await,
            bind().await,
            bind().await,
        );

        let offer = engine
            .offer(
                call,
                &offer_sdp("RTP/AVP", port(&a), port(&a_rtcp), ""),
                Profile::Srtp,
                LO,
            )
            .unwrap();
        let offer = SessionDescription::parse(&offer).unwrap();
        assert_eq!(offer.media[0].proto, "RTP/SAVP");
        assert_eq!(offer.media[1].port, 0, "video rejected");
        assert_eq!(offer.connection(0), Some("127.0.0.1".parse().unwrap()));
        let ours: Crypto = offer.media[0]
            .cryptos()
            .into_iter()
            .find(|c| c.suite == suite)
            .expect("every suite offered");
        let (to_b, _) = relay_addr(&offer);

        // B answers with the suite under test and its own key.
        let b_keys = SrtpKeys::generate(suite).unwrap();
        let b_crypto = Crypto {
            tag: ours.tag,
            suite,
            keys: b_keys.clone(),
        };
        let answer = format!(
            "v=0\r\no=b 2 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {} RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtcp:{}\r\na={}\r\n\
             m=video 0 RTP/AVP 99\r\n",
            port(&b),
            port(&b_rtcp),
            b_crypto.to_attribute()
        );
        let answer_bytes = engine.answer(call, answer.as_bytes(), LO).unwrap();
        // The same answer again (183 then 200) gets the same answer back.
        assert_eq!(
            engine.answer(call, answer.as_bytes(), LO).unwrap(),
            answer_bytes
        );
        let answer = SessionDescription::parse(&answer_bytes).unwrap();
        assert_eq!(answer.media[0].proto, "RTP/AVP");
        assert!(answer.media[0].cryptos().is_empty());
        assert_eq!(answer.media[1].port, 0);
        assert_eq!(answer.media[1].kind, "video");
        let (to_a, to_a_rtcp) = relay_addr(&answer);

        // What B receives it decrypts with webrtc-srtp and our offered key.
        let mut b_rx = ref_ctx(suite, &ours.keys, Direction::Inbound);
        let mut b_tx = ref_ctx(suite, &b_keys, Direction::Outbound);
        let mut b_sent = Vec::new();
        for i in 0..20u16 {
            let seq = 65530u16.wrapping_add(i);
            // A -> B: RTP in, SRTP out (sequence numbers cross the wrap).
            let p = rtp(seq, 0xa, seq as u8);
            a.send_to(&p, to_a).await.unwrap();
            let mut got = BytesMut::from(&recv(&b).await.expect("B gets SRTP")[..]);
            assert_eq!(got.len(), p.len() + suite.rtp_overhead());
            b_rx.unprotect_rtp(&mut got).unwrap();
            assert_eq!(got, p, "{suite:?}");
            // B -> A: SRTP in, RTP out.
            let plain = rtp(seq.wrapping_add(1000), 0xb, 0x42);
            let mut s = plain.clone();
            b_tx.protect_rtp(&mut s).unwrap();
            b.send_to(&s, to_b).await.unwrap();
            b_sent.push(s);
            assert_eq!(recv(&a).await.expect("A gets RTP"), &plain[..]);
        }
        // RTCP both ways on the separate ports.
        a_rtcp.send_to(&rtcp_rr(0xa), to_a_rtcp).await.unwrap();
        let mut got = BytesMut::from(&recv(&b_rtcp).await.expect("B gets SRTCP")[..]);
        b_rx.unprotect_rtcp(&mut got).unwrap();
        assert_eq!(got, rtcp_rr(0xa));

        // Attacks toward leg B's port.
        let mut forged = b_sent[19].clone();
        forged[2] = 0x11; // a new sequence number, tag not recomputed
        let last = forged.len() - 1;
        forged[last] ^= 1;
        b.send_to(&forged, to_b).await.unwrap(); // bad tag
        b.send_to(&b_sent[10], to_b).await.unwrap(); // replay
        let mut fresh = rtp(7, 0xb, 0x66);
        b_tx.protect_rtp(&mut fresh).unwrap();
        stranger.send_to(&fresh, to_b).await.unwrap(); // valid SRTP, wrong source
        stranger.send_to(&rtp(9, 0xc, 0x77), to_a).await.unwrap(); // RTP bleed on A's port
                                                                   // Good media still flows, and nothing of the above got through.
        let plain = rtp(2000, 0xb, 0x55);
        let mut s = plain.clone();
        b_tx.protect_rtp(&mut s).unwrap();
        b.send_to(&s, to_b).await.unwrap();
        assert_eq!(
            recv(&a).await.expect("good packet after attacks"),
            &plain[..]
        );
        let p = rtp(65530u16.wrapping_add(20), 0xa, 1);
        a.send_to(&p, to_a).await.unwrap();
        let mut got = BytesMut::from(&recv(&b).await.expect("A->B still flows")[..]);
        b_rx.unprotect_rtp(&mut got).unwrap();
        assert_eq!(got, p);
        assert!(recv(&a).await.is_none() && recv(&b).await.is_none());

        let st = engine.stats(call).unwrap();
        assert_eq!(st.auth_failures, 1, "{st:?}");
        assert_eq!(st.replayed, 1, "{st:?}");
        assert_eq!(st.strangers, 2, "{st:?}");
        assert_eq!(st.relayed_a_to_b, 22);
        assert_eq!(st.relayed_b_to_a, 21);
        assert_eq!(st.latched_late, 0);

        // Media timeout.
        assert!(engine.silent_calls(Instant::now()).is_empty());
        assert_eq!(
            engine.silent_calls(Instant::now() + Duration::from_secs(31)),
            vec![call]
        );
        engine.release(call);
        ports_return(&engine, 0).await;
    }
}

/// Ports of a released running call return once the runtime has dropped its
/// relay task.
async fn ports_return(engine: &MediaEngine, expected: usize) {
    for _ in 0..100 {
        if engine.ports_in_use() == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(engine.ports_in_use(), expected);
}

/// A "private" address on this host: a loopback address that is not the
/// signaling IP (127.0.0.1) makes a leg behind NAT (`latch` module), so
/// the NAT rules are tested without any address off this machine. A socket
/// bound there proves the edge never sends to it.
async fn private_spy() -> UdpSocket {
    UdpSocket::bind("127.0.0.9:0").await.unwrap()
}

/// `offer_sdp` naming `ip` instead of 127.0.0.1.
fn sdp_at(ip: &str, sdp: Vec<u8>) -> Vec<u8> {
    String::from_utf8(sdp)
        .unwrap()
        .replace("c=IN IP4 127.0.0.1", &format!("c=IN IP4 {ip}"))
        .into_bytes()
}

/// Leg A speaks SRTP (AEAD_AES_128_GCM, rtcp-mux), leg B plain RTP; A's
/// peer sits behind a NAT: its SDP names a private address (127.0.0.9 here),
/// and it sends from its signaling IP.
#[tokio::test]
async fn srtp_to_rtp_with_mux_and_nat() {
    let engine = engine(31200);
    let (a, b, b_rtcp) = (bind().await, bind().await, bind().await);
    let suite = Suite::AeadAes128Gcm;
    let a_keys = SrtpKeys::generate(suite).unwrap();
    let a_crypto = Crypto {
        tag: 5,
        suite,
        keys: a_keys.clone(),
    };
    // A names its private address behind NAT.
    let spy = private_spy().await;
    let named = port(&spy);
    let extra = format!("a=rtcp-mux\r\na={}\r\n", a_crypto.to_attribute());
    let offer = engine
        .offer(
            9,
            &sdp_at("127.0.0.9", offer_sdp("RTP/SAVP", named, named, &extra)),
            Profile::Rtp,
            LO,
        )
        .unwrap();
    let offer = SessionDescription::parse(&offer).unwrap();
    assert_eq!(offer.media[0].proto, "RTP/AVP");
    assert!(offer.media[0].cryptos().is_empty());
    let (to_b, _) = relay_addr(&offer);
    let answer = format!(
        "v=0\r\no=b 2 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {} RTP/AVP 0\r\na=rtcp:{}\r\na=recvonly\r\nm=video 0 RTP/AVP 99\r\n",
        port(&b),
        port(&b_rtcp)
    );
    let answer =
        SessionDescription::parse(&engine.answer(9, answer.as_bytes(), LO).unwrap()).unwrap();
    let m = &answer.media[0];
    assert_eq!(m.proto, "RTP/SAVP");
    assert!(m.rtcp_mux());
    assert_eq!(m.rtcp().unwrap().0, m.port, "muxed: RTCP to the RTP port");
    assert_eq!(
        answer.direction(0),
        tollgate_media::sdp::MediaDirection::RecvOnly
    );
    let ours = m.cryptos().pop().expect("our key for A");
    assert_eq!((ours.tag, ours.suite), (5, suite));
    assert_ne!(ours.keys, a_keys, "our own key, not A's");
    let to_a = SocketAddr::new(answer.connection(0).unwrap(), m.port);

    let mut a_tx = ref_ctx(suite, &a_keys, Direction::Outbound);
    let mut a_rx = ref_ctx(suite, &ours.keys, Direction::Inbound);
    for seq in 0..10u16 {
        let plain = rtp(seq, 0xa, 3);
        let mut s = plain.clone();
        a_tx.protect_rtp(&mut s).unwrap();
        a.send_to(&s, to_a).await.unwrap(); // from the NAT address: latched late
        assert_eq!(recv(&b).await.expect("B gets RTP"), &plain[..]);
        let p = rtp(seq, 0xb, 4);
        b.send_to(&p, to_b).await.unwrap();
        let mut got = BytesMut::from(&recv(&a).await.expect("A gets SRTP at its NAT address")[..]);
        a_rx.unprotect_rtp(&mut got).unwrap();
        assert_eq!(got, p);
    }
    // SRTCP on the muxed RTP port -> RTCP on B's RTCP port.
    let mut s = rtcp_rr(0xa);
    a_tx.protect_rtcp(&mut s).unwrap();
    a.send_to(&s, to_a).await.unwrap();
    assert_eq!(recv(&b_rtcp).await.expect("B gets RTCP"), &rtcp_rr(0xa)[..]);
    // RTCP from B goes to A muxed, as SRTCP.
    b_rtcp
        .send_to(&rtcp_rr(0xb), SocketAddr::new(to_b.ip(), to_b.port() + 1))
        .await
        .unwrap();
    let mut got = BytesMut::from(&recv(&a).await.expect("A gets SRTCP")[..]);
    a_rx.unprotect_rtcp(&mut got).unwrap();
    assert_eq!(got, rtcp_rr(0xb));

    let st = engine.stats(9).unwrap();
    assert_eq!(st.latched_late, 1, "{st:?}");
    assert!(
        recv(&spy).await.is_none(),
        "the private address got nothing"
    );
    assert_eq!(st.auth_failures, 0);
    engine.release(9);
    ports_return(&engine, 0).await;
}

/// A packet that fails SRTP authentication never latches, even inside the
/// learning window.
#[tokio::test]
async fn failed_auth_never_latches() {
    let engine = engine(31400);
    let (b, attacker) = (bind().await, bind().await);
    let offer = engine
        .offer(3, &offer_sdp("RTP/AVP", 9, 10, ""), Profile::Srtp, LO)
        .unwrap();
    let offer = SessionDescription::parse(&offer).unwrap();
    let ours = offer.media[0].cryptos().remove(0);
    let (to_b, _) = relay_addr(&offer);
    let b_keys = SrtpKeys::generate(ours.suite).unwrap();
    // B's SDP names its private address, so B's real source (on B's
    // signaling IP, 127.0.0.1) must be learned; the attacker sends from that
    // IP too.
    let spy = private_spy().await;
    let answer = format!(
        "v=0\r\no=b 2 2 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\n\
         m=audio {} RTP/SAVP 0\r\na={}\r\nm=video 0 RTP/AVP 99\r\n",
        port(&spy),
        Crypto {
            tag: ours.tag,
            suite: ours.suite,
            keys: b_keys.clone()
        }
        .to_attribute()
    );
    engine.answer(3, answer.as_bytes(), LO).unwrap();
    // The attacker sends SRTP with a key of its own: auth fails, no latch.
    let mut evil = ref_ctx(
        ours.suite,
        &SrtpKeys::generate(ours.suite).unwrap(),
        Direction::Outbound,
    );
    let mut p = rtp(1, 0xe, 0);
    evil.protect_rtp(&mut p).unwrap();
    attacker.send_to(&p, to_b).await.unwrap();
    // B's genuine packet then latches B.
    let mut good = ref_ctx(ours.suite, &b_keys, Direction::Outbound);
    let mut p = rtp(1, 0xb, 0);
    good.protect_rtp(&mut p).unwrap();
    b.send_to(&p, to_b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = engine.stats(3).unwrap();
    assert_eq!((st.auth_failures, st.latched_late), (1, 1), "{st:?}");
    // Now the attacker is a stranger.
    let mut p = rtp(2, 0xe, 0);
    evil.protect_rtp(&mut p).unwrap();
    attacker.send_to(&p, to_b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(engine.stats(3).unwrap().strangers, 1);
    assert!(
        recv(&spy).await.is_none(),
        "the private address got nothing"
    );
    engine.release(3);
}

#[tokio::test]
async fn refusals_and_port_accounting() {
    let engine = engine(31600);
    for bad in [&b"not sdp"[..], b"v=0\r\nm=audio x RTP/AVP 0\r\n", b""] {
        assert!(matches!(
            engine.offer(1, bad, Profile::Auto, LO),
            Err(MediaError::Sdp(_))
        ));
    }
    let video_only = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=video 5000 RTP/AVP 99\r\n";
    assert!(matches!(
        engine.offer(1, video_only, Profile::Auto, LO),
        Err(MediaError::NoAudio)
    ));
    let savp_no_crypto = offer_sdp("RTP/SAVP", 5000, 5001, "");
    let e = engine
        .offer(1, &savp_no_crypto, Profile::Auto, LO)
        .unwrap_err();
    assert!(matches!(e, MediaError::NoCrypto) && e.is_not_acceptable());
    assert_eq!(engine.ports_in_use(), 0);
    assert!(matches!(
        engine.answer(77, b"v=0\r\n", LO),
        Err(MediaError::UnknownCall)
    ));

    // Profile mismatch in the answer, then B rejecting audio: ports come back.
    engine
        .offer(1, &offer_sdp("RTP/AVP", 5000, 5001, ""), Profile::Srtp, LO)
        .unwrap();
    assert_eq!(engine.ports_in_use(), 4);
    let plain = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6000 RTP/AVP 0\r\nm=video 0 RTP/AVP 99\r\n";
    assert!(matches!(
        engine.answer(1, plain, LO),
        Err(MediaError::Answer(_))
    ));
    let rejected = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 0 RTP/SAVP 0\r\nm=video 0 RTP/AVP 99\r\n";
    let a = SessionDescription::parse(&engine.answer(1, rejected, LO).unwrap()).unwrap();
    assert!(a.media.iter().all(|m| m.port == 0));
    assert_eq!(engine.ports_in_use(), 0);
    engine.release(1);

    // Many calls in sequence and at once: every port returns.
    for round in 0..3 {
        for call in 0..20u64 {
            engine
                .offer(
                    call,
                    &offer_sdp("RTP/AVP", 5000, 5001, ""),
                    Profile::Rtp,
                    LO,
                )
                .unwrap();
            let ans =
                b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6000 RTP/AVP 0\r\nm=video 0 RTP/AVP 99\r\n";
            engine.answer(call, ans, LO).unwrap();
            if round == 0 {
                engine.release(call);
                tokio::task::yield_now().await;
            }
        }
        ports_return(&engine, if round == 0 { 0 } else { 80 }).await;
        for call in 0..20u64 {
            engine.release(call);
        }
        ports_return(&engine, 0).await;
    }
    // The range holds 50 pairs = 25 calls... of 100 ports: the 26th call is refused.
    let mut n = 0;
    while engine
        .offer(n, &offer_sdp("RTP/AVP", 5000, 5001, ""), Profile::Rtp, LO)
        .is_ok()
    {
        n += 1;
    }
    assert_eq!(n, 25);
    assert!(matches!(
        engine.offer(n, &offer_sdp("RTP/AVP", 5000, 5001, ""), Profile::Rtp, LO),
        Err(MediaError::Ports)
    ));
    for c in 0..n {
        engine.release(c);
    }
    ports_return(&engine, 0).await;
}
