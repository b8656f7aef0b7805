//! Packet generators shared by the SRTP tests (deterministic, no rand crate).
#![allow(dead_code)]

use bytes::BytesMut;

/// SplitMix64: small, deterministic, good enough for test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

/// Streams of RTP packets over a few SSRCs, sequence numbers starting near the
/// 16-bit wrap so that every stream rolls over, with small gaps.
pub struct RtpGen {
    rng: Rng,
    streams: Vec<(u32, u16, u32)>,
}

impl RtpGen {
    pub fn new(seed: u64) -> RtpGen {
        let mut rng = Rng(seed);
        let streams = (0..3)
            .map(|i| {
                let ssrc = rng.next() as u32;
                let seq = if i == 0 { 65530 } else { rng.next() as u16 };
                (ssrc, seq, rng.next() as u32)
            })
            .collect();
        RtpGen { rng, streams }
    }

    /// The next packet: random CSRC count, sometimes a header extension
    /// (non-0xBEDE profile, so parsers keep it raw), payload 0..1200 bytes.
    pub fn next(&mut self) -> BytesMut {
        let s = self.rng.below(self.streams.len() as u64) as usize;
        let (ssrc, seq, ts) = self.streams[s];
        let gap = 1 + self.rng.below(3) as u16;
        self.streams[s].1 = seq.wrapping_add(gap);
        self.streams[s].2 = ts.wrapping_add(160);
        let cc = if self.rng.below(4) == 0 {
            self.rng.below(4) as u8
        } else {
            0
        };
        let ext = self.rng.below(4) == 0;
        let payload = match self.rng.below(4) {
            0 => self.rng.below(16) as usize,
            1 => 160,
            _ => self.rng.below(1200) as usize,
        };
        let mut b = BytesMut::with_capacity(1500);
        b.extend_from_slice(&[
            0x80 | cc | if ext { 0x10 } else { 0 },
            self.rng.below(128) as u8,
        ]);
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&ts.to_be_bytes());
        b.extend_from_slice(&ssrc.to_be_bytes());
        for _ in 0..cc {
            b.extend_from_slice(&(self.rng.next() as u32).to_be_bytes());
        }
        if ext {
            let words = self.rng.below(4) as u16;
            b.extend_from_slice(&[0x12, 0x34]);
            b.extend_from_slice(&words.to_be_bytes());
            let mut e = vec![0u8; 4 * words as usize];
            self.rng.fill(&mut e);
            b.extend_from_slice(&e);
        }
        let mut p = vec![0u8; payload];
        self.rng.fill(&mut p);
        b.extend_from_slice(&p);
        b
    }

    /// An RTCP packet (SR/RR/SDES/BYE/APP header) from one of the SSRCs.
    pub fn next_rtcp(&mut self) -> BytesMut {
        let s = self.rng.below(self.streams.len() as u64) as usize;
        let ssrc = self.streams[s].0;
        let words = 1 + self.rng.below(60) as u16; // length field: words - 1
        let mut b = BytesMut::with_capacity(1500);
        b.extend_from_slice(&[
            0x80 | self.rng.below(32) as u8,
            200 + self.rng.below(5) as u8,
        ]);
        b.extend_from_slice(&words.to_be_bytes());
        b.extend_from_slice(&ssrc.to_be_bytes());
        let mut body = vec![0u8; 4 * words as usize - 4];
        self.rng.fill(&mut body);
        b.extend_from_slice(&body);
        b
    }
}
