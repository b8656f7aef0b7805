//! Fuzz oracles for the media crate's untrusted-input entry points, shared by
//! the cargo-fuzz targets in `fuzz/` (`sdp`, `srtp_unprotect`) and by this
//! module's tests, which feed the same seeds plus fixed-seed mutations
//! through them so that CI exercises them without nightly.
//!
//! Each function takes arbitrary bytes and panics only when an oracle fails.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;

use crate::sdp::{Crypto, SessionDescription};
use crate::srtp::{self, Direction, SrtpKeys, Suite};

/// SDP: `SessionDescription::parse` on arbitrary bytes, then the rewrite the
/// engine applies to an offer or answer (`MediaEngine::offer_from`,
/// `MediaEngine::answer`: our address, our ports, the transport attributes
/// replaced, SRTP switched on or off, other media rejected).
///
/// Oracles: no panic; accessors total; `parse(to_bytes(d)) == d`; the
/// rewritten description re-parses and carries exactly what was written
/// (address, port, rtcp, crypto), and none of the offer's own crypto lines.
pub fn sdp(data: &[u8]) {
    let Ok(sdp) = SessionDescription::parse(data) else {
        return;
    };
    let again = SessionDescription::parse(&sdp.to_bytes()).expect("re-parse of to_bytes");
    assert_eq!(again, sdp, "parse(to_bytes(d)) != d");
    let _ = sdp.session_connection();
    for (i, m) in sdp.media.iter().enumerate() {
        let _ = (sdp.connection(i), sdp.direction(i), m.rtcp(), m.rtcp_mux());
        let _ = (m.is_rtp_audio(), m.is_secure(), m.cryptos());
        for a in m.attributes("crypto") {
            let _ = Crypto::parse(a);
        }
    }
    let Some(index) = sdp
        .media
        .iter()
        .position(|m| m.is_rtp_audio() && m.port != 0)
    else {
        return;
    };
    let ip = if data.len().is_multiple_of(2) {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))
    } else {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    };
    let secure = !sdp.media[index].is_secure();
    let crypto = Crypto {
        tag: 1,
        suite: Suite::AesCm128HmacSha1_80,
        keys: fixed_keys(Suite::AesCm128HmacSha1_80),
    };
    let mut out = sdp.clone();
    out.set_address(ip);
    crate::engine::strip_transport(&mut out.session);
    for (i, m) in out.media.iter_mut().enumerate() {
        if i != index {
            m.reject();
            continue;
        }
        m.port = 30_000;
        m.port_count = None;
        m.set_secure(secure);
        crate::engine::strip_transport(&mut m.lines);
        m.push_attribute("rtcp:30001");
        m.push_attribute("rtcp-mux");
        if secure {
            m.push_attribute(crypto.to_attribute());
        }
    }
    let bytes = out.to_bytes();
    let back = SessionDescription::parse(&bytes).unwrap_or_else(|e| {
        panic!(
            "rewritten SDP does not parse ({e}):\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(back, out, "rewritten SDP does not re-parse to itself");
    let m = &back.media[index];
    assert_eq!(back.connection(index), Some(ip), "rewritten c=");
    assert_eq!((m.port, m.is_secure()), (30_000, secure), "rewritten m=");
    assert_eq!(m.rtcp(), Some((30_001, None)), "rewritten a=rtcp");
    assert!(m.rtcp_mux(), "rewritten a=rtcp-mux");
    let want = if secure { vec![crypto] } else { vec![] };
    assert_eq!(m.cryptos(), want, "only our own a=crypto survives");
    for (i, m) in back.media.iter().enumerate() {
        assert!(i == index || m.port == 0, "other media rejected");
    }
}

/// Master key and salt every SRTP fuzz context uses (fixed, so seeds made
/// with [`srtp_seeds`] authenticate).
pub fn fixed_keys(suite: Suite) -> SrtpKeys {
    let material: Vec<u8> = (0u8..30).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    SrtpKeys::split(suite, &material[..suite.key_len() + suite.salt_len()])
        .expect("fixed material has the suite's lengths")
}

/// The SRTP fuzz input: byte 0 picks the suite (bits 0-1, `% 3`, in
/// [`Suite::ALL`] order) and RTP or RTCP (bit 2); the rest is the packet.
fn srtp_input(data: &[u8]) -> Option<(Suite, bool, &[u8])> {
    let (&sel, pkt) = data.split_first()?;
    Some((Suite::ALL[usize::from(sel & 3) % 3], sel & 4 != 0, pkt))
}

/// SRTP/SRTCP: unprotect arbitrary bytes in place with an inbound context
/// from [`fixed_keys`], for the suite and kind byte 0 selects.
///
/// Oracles: no panic, whatever the bytes; what unprotects is no longer than
/// the input minus the suite's overhead; the same packet a second time is
/// refused (replay); protecting the bytes as plaintext with an outbound
/// context then unprotecting them with a fresh inbound one gives the bytes
/// back, and one flipped bit in the protected packet is refused.
pub fn srtp(data: &[u8]) {
    let Some((suite, rtcp, pkt)) = srtp_input(data) else {
        return;
    };
    let keys = fixed_keys(suite);
    let ctx = |d| srtp::new_context(suite, &keys, d).expect("fixed keys are valid");
    let (unprotect, protect, overhead): (Op, Op, usize) = if rtcp {
        (
            |c, b| c.unprotect_rtcp(b),
            |c, b| c.protect_rtcp(b),
            suite.rtcp_overhead(),
        )
    } else {
        (
            |c, b| c.unprotect_rtp(b),
            |c, b| c.protect_rtp(b),
            suite.rtp_overhead(),
        )
    };
    type Op = fn(&mut dyn srtp::SrtpTransform, &mut BytesMut) -> Result<(), srtp::SrtpError>;

    let mut inbound = ctx(Direction::Inbound);
    let mut buf = BytesMut::from(pkt);
    if unprotect(inbound.as_mut(), &mut buf).is_ok() {
        assert!(
            buf.len() + overhead <= pkt.len(),
            "unprotect left {} of {} bytes",
            buf.len(),
            pkt.len()
        );
        let mut again = BytesMut::from(pkt);
        assert!(
            unprotect(inbound.as_mut(), &mut again).is_err(),
            "a replayed packet was accepted"
        );
    }
    // Wrong direction is an error, not a panic.
    let mut b = BytesMut::from(pkt);
    assert!(unprotect(ctx(Direction::Outbound).as_mut(), &mut b).is_err());

    let mut sealed = BytesMut::with_capacity(pkt.len() + overhead);
    sealed.extend_from_slice(pkt);
    if protect(ctx(Direction::Outbound).as_mut(), &mut sealed).is_err() {
        return;
    }
    assert_eq!(sealed.len(), pkt.len() + overhead, "protect's overhead");
    let mut flipped = sealed.clone();
    let mut opened = sealed;
    unprotect(ctx(Direction::Inbound).as_mut(), &mut opened)
        .unwrap_or_else(|e| panic!("own protected packet refused: {e}"));
    assert_eq!(&opened[..], pkt, "unprotect(protect(p)) != p");
    let bit = data
        .iter()
        .fold(0usize, |a, &b| a.wrapping_mul(31) + usize::from(b));
    let at = bit / 8 % flipped.len();
    flipped[at] ^= 1 << (bit % 8);
    assert!(
        unprotect(ctx(Direction::Inbound).as_mut(), &mut flipped).is_err(),
        "a protected packet with bit {} of byte {at} flipped was accepted",
        bit % 8
    );
}

/// Valid SRTP fuzz inputs made with the crate's own protect: one RTP packet
/// (G.711, 160 bytes of payload, a CSRC and a header extension) and one RTCP
/// sender report per suite, with the selector byte of [`srtp`].
pub fn srtp_seeds() -> Vec<(String, Vec<u8>)> {
    let mut rtp = vec![
        0x91, 0x00, 0x12, 0x34, 0, 0, 0x03, 0x20, 0xde, 0xad, 0xbe, 0xef,
    ];
    rtp.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]); // CSRC
    rtp.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 0x10, 0xaa, 0, 0]); // one-byte extension
    rtp.extend((0..160u32).map(|i| (i * 7) as u8));
    // RTCP SR: V=2, RC=0, PT=200, length 6 words, SSRC, NTP, RTP ts, counts.
    let mut sr = vec![0x80, 200, 0x00, 0x06, 0xde, 0xad, 0xbe, 0xef];
    sr.extend_from_slice(&[
        0xe9, 0, 0, 1, 0x80, 0, 0, 0, 0, 0, 0x03, 0x20, 0, 0, 0, 1, 0, 0, 0, 160,
    ]);
    let mut out = Vec::new();
    for (i, suite) in Suite::ALL.into_iter().enumerate() {
        for (kind, plain, rtcp) in [("rtp", &rtp, false), ("rtcp", &sr, true)] {
            let mut ctx = srtp::new_context(suite, &fixed_keys(suite), Direction::Outbound)
                .expect("fixed keys are valid");
            let mut buf = BytesMut::from(&plain[..]);
            if rtcp {
                ctx.protect_rtcp(&mut buf)
            } else {
                ctx.protect_rtp(&mut buf)
            }
            .expect("seed protects");
            let mut input = vec![i as u8 | if rtcp { 4 } else { 0 }];
            input.extend_from_slice(&buf);
            out.push((
                format!("{}-{kind}", suite.sdes_name().to_ascii_lowercase()),
                input,
            ));
        }
    }
    out
}

/// SDP seeds: an offer with SDES crypto lines, rtcp and two media; a plain
/// RTP/AVP answer; an IPv6 offer with rtcp-mux and ICE-ish attributes.
pub fn sdp_seeds() -> Vec<(String, Vec<u8>)> {
    let offer = "v=0\r\no=alice 2890844526 2890844526 IN IP4 198.51.100.7\r\ns=-\r\n\
c=IN IP4 198.51.100.7\r\nt=0 0\r\n\
m=audio 49170 RTP/SAVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32\r\n\
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj\r\n\
a=crypto:3 AEAD_AES_128_GCM inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHA=|2^31\r\n\
a=rtcp:49171\r\na=sendonly\r\nm=video 51372 RTP/AVP 99\r\na=rtpmap:99 h263-1998/90000\r\n";
    let answer = "v=0\r\no=bob 1 2 IN IP4 203.0.113.9\r\ns=-\r\nt=0 0\r\n\
m=audio 40000 RTP/AVP 0\r\nc=IN IP4 203.0.113.9\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n\
a=recvonly\r\nm=video 0 RTP/AVP 99\r\n";
    let v6 = "v=0\r\no=- 7 7 IN IP6 2001:db8::7\r\ns=call\r\nc=IN IP6 2001:db8::7\r\nt=0 0\r\n\
a=ice-ufrag:abcd\r\nm=audio 5004/2 RTP/AVP 8 0\r\na=rtcp:5005 IN IP6 2001:db8::8\r\n\
a=rtcp-mux\r\na=candidate:1 1 UDP 2130706431 2001:db8::7 5004 typ host\r\na=inactive\r\n";
    [
        ("offer-sdes", offer),
        ("answer-rtp", answer),
        ("offer-ipv6", v6),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s.as_bytes().to_vec()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The seed-file check and the mutator, shared with the other crates'
    // fuzz tests.
    include!("../../../fuzz/mutate.rs");

    #[test]
    fn sdp_seeds_and_mutations() {
        let seeds = sdp_seeds();
        for s in seeds_on_disk("sdp", &seeds) {
            sdp(&s);
        }
        for (i, (_, s)) in seeds.iter().enumerate() {
            sdp(s);
            for m in mutations(
                s,
                b" =:/\r\n0123456789aAmcvo.-|^;IP46",
                4000,
                0x9e37_79b9 + i as u64,
            ) {
                sdp(&m);
            }
        }
    }

    #[test]
    fn srtp_seeds_and_mutations() {
        let seeds = srtp_seeds();
        for s in seeds_on_disk("srtp_unprotect", &seeds) {
            srtp(&s);
        }
        for (i, (name, s)) in seeds.iter().enumerate() {
            // A seed authenticates.
            let (suite, rtcp, pkt) = srtp_input(s).unwrap();
            let mut c = srtp::new_context(suite, &fixed_keys(suite), Direction::Inbound).unwrap();
            let mut b = BytesMut::from(pkt);
            let r = if rtcp {
                c.unprotect_rtcp(&mut b)
            } else {
                c.unprotect_rtp(&mut b)
            };
            assert!(r.is_ok(), "{name}: {r:?}");
            srtp(s);
            for m in mutations(s, &[0, 0x80, 0xff, 4, 5, 200], 1500, 0x2545_f491 + i as u64) {
                srtp(&m);
            }
        }
        // Short and empty inputs for every selector.
        for sel in 0u8..8 {
            for len in 0..48 {
                let mut v = vec![sel];
                v.extend((0..len).map(|i| 0x80u8.wrapping_add(i as u8)));
                srtp(&v);
            }
        }
    }
}
