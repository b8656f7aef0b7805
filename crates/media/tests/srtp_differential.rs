//! Our in-place SRTP against webrtc-srtp 0.17: the same plaintext protected by
//! both gives the same bytes, and each unprotects what the other protected,
//! for every suite, RTP and RTCP, across sequence-number rollover.

mod common;

use bytes::BytesMut;
use common::RtpGen;
use tollgate_media::srtp::{
    native, reference, Direction, SrtpError, SrtpKeys, SrtpTransform, Suite,
};

fn contexts(suite: Suite, keys: &SrtpKeys) -> [Box<dyn SrtpTransform>; 4] {
    [
        Box::new(native::Context::new(suite, keys, Direction::Outbound).unwrap()),
        Box::new(reference::Context::new(suite, keys, Direction::Outbound).unwrap()),
        Box::new(native::Context::new(suite, keys, Direction::Inbound).unwrap()),
        Box::new(reference::Context::new(suite, keys, Direction::Inbound).unwrap()),
    ]
}

#[test]
fn rtp_byte_identical_with_webrtc_srtp() {
    for (n, suite) in Suite::ALL.into_iter().enumerate() {
        let keys = SrtpKeys::generate(suite).unwrap();
        let [mut ours_tx, mut ref_tx, mut ours_rx, mut ref_rx] = contexts(suite, &keys);
        let mut gen = RtpGen::new(0x5eed + n as u64);
        for i in 0..3000 {
            let plain = gen.next();
            let mut a = plain.clone();
            ours_tx.protect_rtp(&mut a).unwrap();
            let mut b = plain.clone();
            ref_tx.protect_rtp(&mut b).unwrap();
            assert_eq!(a, b, "{suite:?} packet {i}: protect differs");
            let mut c = a.clone();
            ref_rx.unprotect_rtp(&mut c).unwrap();
            assert_eq!(
                c, plain,
                "{suite:?} packet {i}: webrtc-srtp unprotect of ours"
            );
            let mut d = b;
            ours_rx.unprotect_rtp(&mut d).unwrap();
            assert_eq!(
                d, plain,
                "{suite:?} packet {i}: our unprotect of webrtc-srtp's"
            );
            // Both refuse the replay.
            assert_eq!(
                ours_rx.unprotect_rtp(&mut a.clone()),
                Err(SrtpError::Replayed)
            );
            assert_eq!(ref_rx.unprotect_rtp(&mut a), Err(SrtpError::Replayed));
        }
    }
}

#[test]
fn rtcp_byte_identical_with_webrtc_srtp() {
    for (n, suite) in Suite::ALL.into_iter().enumerate() {
        let keys = SrtpKeys::generate(suite).unwrap();
        let [mut ours_tx, mut ref_tx, mut ours_rx, mut ref_rx] = contexts(suite, &keys);
        let mut gen = RtpGen::new(0xc0ffee + n as u64);
        for i in 0..1000 {
            let plain = gen.next_rtcp();
            let mut a = plain.clone();
            ours_tx.protect_rtcp(&mut a).unwrap();
            let mut b = plain.clone();
            ref_tx.protect_rtcp(&mut b).unwrap();
            assert_eq!(a, b, "{suite:?} packet {i}: protect differs");
            let mut c = a.clone();
            ref_rx.unprotect_rtcp(&mut c).unwrap();
            assert_eq!(
                c, plain,
                "{suite:?} packet {i}: webrtc-srtp unprotect of ours"
            );
            let mut d = b;
            ours_rx.unprotect_rtcp(&mut d).unwrap();
            assert_eq!(
                d, plain,
                "{suite:?} packet {i}: our unprotect of webrtc-srtp's"
            );
            assert_eq!(ours_rx.unprotect_rtcp(&mut a), Err(SrtpError::Replayed));
        }
    }
}

/// Sequence numbers across 65535 -> 0 twice, ROC 0 -> 1 -> 2, one SSRC.
#[test]
fn rollover_twice() {
    for suite in Suite::ALL {
        let keys = SrtpKeys::generate(suite).unwrap();
        let [mut ours_tx, mut ref_tx, mut ours_rx, mut ref_rx] = contexts(suite, &keys);
        let mut seq: u16 = 65000;
        for i in 0..(65536 * 2 / 97 + 20) {
            let mut plain = BytesMut::with_capacity(256);
            plain.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
            plain[2..4].copy_from_slice(&seq.to_be_bytes());
            plain.extend_from_slice(&[i as u8; 160]);
            seq = seq.wrapping_add(97);
            let mut a = plain.clone();
            ours_tx.protect_rtp(&mut a).unwrap();
            let mut b = plain.clone();
            ref_tx.protect_rtp(&mut b).unwrap();
            assert_eq!(a, b, "{suite:?} packet {i}");
            ref_rx.unprotect_rtp(&mut a).unwrap();
            ours_rx.unprotect_rtp(&mut b).unwrap();
            assert_eq!(a, plain);
            assert_eq!(b, plain);
        }
    }
}

/// Reordered delivery around the wrap: our receiver estimates the ROC from
/// the highest index (RFC 3711 Appendix A), so a late packet from before the
/// wrap still decrypts.
#[test]
fn reordered_across_rollover() {
    for suite in Suite::ALL {
        let keys = SrtpKeys::generate(suite).unwrap();
        let mut tx = native::Context::new(suite, &keys, Direction::Outbound).unwrap();
        let mut rx = native::Context::new(suite, &keys, Direction::Inbound).unwrap();
        let seqs: Vec<u16> = (65530..=65535).chain(0..6).collect();
        let mut sent = Vec::new();
        for &s in &seqs {
            let mut p = BytesMut::with_capacity(256);
            p.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9]);
            p[2..4].copy_from_slice(&s.to_be_bytes());
            p.extend_from_slice(&s.to_be_bytes());
            let plain = p.clone();
            tx.protect_rtp(&mut p).unwrap();
            sent.push((plain, p));
        }
        // Deliver: 65530, 65531, 0, 1, 65532, 2, 65533 ... (late ones from ROC 0).
        let order = [0, 1, 6, 7, 2, 8, 3, 9, 4, 10, 5, 11];
        for &k in &order {
            let (plain, mut p) = sent[k].clone();
            rx.unprotect_rtp(&mut p)
                .unwrap_or_else(|e| panic!("{suite:?} #{k}: {e}"));
            assert_eq!(p, plain);
        }
    }
}

/// Mutated, truncated and extended SRTP/SRTCP: our unprotect never panics and
/// never accepts a packet that differs from what was protected.
#[test]
fn mutated_packets_are_rejected_never_panic() {
    for (n, suite) in Suite::ALL.into_iter().enumerate() {
        let keys = SrtpKeys::generate(suite).unwrap();
        let mut tx = native::Context::new(suite, &keys, Direction::Outbound).unwrap();
        let mut rx = native::Context::new(suite, &keys, Direction::Inbound).unwrap();
        let mut gen = RtpGen::new(0xf022 + n as u64);
        let mut rng = common::Rng(77 + n as u64);
        for i in 0..4000 {
            let rtcp = i % 3 == 0;
            let mut p = if rtcp { gen.next_rtcp() } else { gen.next() };
            if rtcp {
                tx.protect_rtcp(&mut p).unwrap();
            } else {
                tx.protect_rtp(&mut p).unwrap();
            }
            let orig = p.clone();
            match rng.below(4) {
                0 => {
                    let at = rng.below(p.len() as u64) as usize;
                    p[at] ^= 1 << rng.below(8);
                }
                1 => p.truncate(rng.below(p.len() as u64) as usize),
                2 => p.extend_from_slice(&[rng.next() as u8; 3]),
                _ => {
                    let mut junk = vec![0u8; rng.below(64) as usize];
                    rng.fill(&mut junk);
                    p = BytesMut::from(&junk[..]);
                }
            }
            let r = if rtcp {
                rx.unprotect_rtcp(&mut p)
            } else {
                rx.unprotect_rtp(&mut p)
            };
            assert!(
                r.is_err(),
                "{suite:?} #{i}: a mutated packet authenticated ({} -> {} bytes)",
                orig.len(),
                p.len()
            );
        }
    }
}
