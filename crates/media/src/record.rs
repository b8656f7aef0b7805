//! Call recording (SPEC §10): the relay's tap and the two-channel timeline.
//!
//! [`Tap`] sits on the relay's packet path, after SRTP was removed, and hands
//! each RTP packet's G.711 payload to a writer as a fixed-size [`Frame`]
//! through a bounded channel (`try_send`: no allocation per packet, never a
//! wait; a full channel drops the frame and counts it). [`Mixer`] is the
//! writer's sans-IO core: it places each leg's samples on one timeline by RTP
//! timestamp (the first packet of a stream is placed by its arrival time), so
//! that two legs line up in time and a leg that sent nothing is silence.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use crate::g711::{alaw_to_linear, ulaw_to_linear};

/// Largest payload a frame carries (40 ms of G.711); longer ones are cut.
pub const MAX_PAYLOAD: usize = 320;
/// Samples per second.
pub const RATE: u32 = 8000;
/// Frames queued between relay and writer (about 2.5 s of both legs at 20 ms).
pub const QUEUE_FRAMES: usize = 256;
/// A stream whose timestamps stray further than this from its arrival time
/// (a new source, a jump) is placed anew by arrival.
const REBASE_SAMPLES: i64 = RATE as i64;
/// Audio more than this far ahead of what was written is dropped (a
/// timestamp far in the future must not grow the buffer).
const MAX_AHEAD_SAMPLES: i64 = 30 * RATE as i64;

/// The G.711 law of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    Ulaw,
    Alaw,
}

/// One RTP packet's audio, as the relay saw it.
#[derive(Clone, Copy)]
pub struct Frame {
    /// 0 = leg A (the caller), 1 = leg B.
    pub leg: u8,
    pub law: Law,
    pub ssrc: u32,
    pub timestamp: u32,
    pub at: Instant,
    pub len: u16,
    pub payload: [u8; MAX_PAYLOAD],
}

/// Counters of a recording.
#[derive(Debug, Default)]
pub struct TapStats {
    /// Frames the writer was too far behind to take.
    pub dropped: AtomicU64,
    /// Frames handed over.
    pub frames: AtomicU64,
}

/// The relay's end of a recording. Cloned into each relay of the call (a
/// re-offer starts a new one); the writer ends when every clone is gone.
#[derive(Clone)]
pub struct Tap {
    tx: SyncSender<Frame>,
    stats: Arc<TapStats>,
}

impl Tap {
    /// A tap and the writer's end of it.
    pub fn new() -> (Tap, Receiver<Frame>, Arc<TapStats>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_FRAMES);
        let stats = Arc::new(TapStats::default());
        (
            Tap {
                tx,
                stats: stats.clone(),
            },
            rx,
            stats,
        )
    }

    /// Hands a plaintext RTP packet that arrived on leg `leg` to the writer
    /// if it carries G.711 audio (payload type 0 or 8); anything else
    /// (DTMF events, comfort noise, RTCP) is ignored.
    pub fn rtp(&self, leg: u8, packet: &[u8], at: Instant) {
        let Some((law, ssrc, timestamp, payload)) = g711_payload(packet) else {
            return;
        };
        let n = payload.len().min(MAX_PAYLOAD);
        let mut frame = Frame {
            leg,
            law,
            ssrc,
            timestamp,
            at,
            len: n as u16,
            payload: [0; MAX_PAYLOAD],
        };
        frame.payload[..n].copy_from_slice(&payload[..n]);
        match self.tx.try_send(frame) {
            Ok(()) => {
                self.stats.frames.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tollgate_recording_frames_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// An RTP packet's payload type, timestamp and payload (RFC 3550 §5.1:
/// past CSRCs, header extension and padding), `None` if it is not one.
pub fn rtp_payload(p: &[u8]) -> Option<(u8, u32, &[u8])> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    let cc = usize::from(p[0] & 0x0f);
    let mut start = 12 + 4 * cc;
    if p[0] & 0x10 != 0 {
        let ext = p.get(start + 2..start + 4)?;
        start += 4 + 4 * usize::from(u16::from_be_bytes([ext[0], ext[1]]));
    }
    let mut end = p.len();
    if p[0] & 0x20 != 0 {
        end = end.checked_sub(usize::from(*p.last()?))?;
    }
    let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    Some((p[1] & 0x7f, ts, p.get(start..end)?))
}

/// The law, SSRC, timestamp and payload of a G.711 packet.
fn g711_payload(p: &[u8]) -> Option<(Law, u32, u32, &[u8])> {
    let (pt, ts, payload) = rtp_payload(p)?;
    let law = match pt {
        0 => Law::Ulaw,
        8 => Law::Alaw,
        _ => return None,
    };
    let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
    Some((law, ssrc, ts, payload))
}

/// Where a leg's current RTP stream sits on the timeline.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    ssrc: u32,
    timestamp: u32,
    pos: i64,
}

/// The two-channel timeline: frames in, interleaved PCM16 out.
pub struct Mixer {
    t0: Option<Instant>,
    anchors: [Option<Anchor>; 2],
    /// Sample position of `pending[0]`.
    written: i64,
    /// Interleaved (A, B) samples from `written` on, not yet flushed.
    pending: VecDeque<[i16; 2]>,
    /// The furthest position any frame reached.
    end: i64,
    /// Samples that arrived after their place was written (dropped).
    pub late: u64,
}

impl Default for Mixer {
    fn default() -> Self {
        Self::new()
    }
}

impl Mixer {
    pub fn new() -> Mixer {
        Mixer {
            t0: None,
            anchors: [None; 2],
            written: 0,
            pending: VecDeque::new(),
            end: 0,
            late: 0,
        }
    }

    /// The timeline position (in samples) of `at`: 0 at the first frame.
    fn pos_of(&self, at: Instant) -> i64 {
        self.t0.map_or(0, |t0| {
            (at.saturating_duration_since(t0).as_micros() as i64) * i64::from(RATE) / 1_000_000
        })
    }

    /// Places a frame's samples.
    pub fn push(&mut self, f: &Frame) {
        let leg = usize::from(f.leg.min(1));
        if self.t0.is_none() {
            self.t0 = Some(f.at);
        }
        let arrival = self.pos_of(f.at);
        let pos = match self.anchors[leg] {
            Some(a) if a.ssrc == f.ssrc => {
                let p = a.pos + i64::from(f.timestamp.wrapping_sub(a.timestamp) as i32);
                if (p - arrival).abs() > REBASE_SAMPLES {
                    None
                } else {
                    Some(p)
                }
            }
            _ => None,
        };
        let pos = pos.unwrap_or_else(|| {
            // A new stream: placed where it arrived, but never over audio
            // this leg already has.
            let p = arrival.max(self.written);
            self.anchors[leg] = Some(Anchor {
                ssrc: f.ssrc,
                timestamp: f.timestamp,
                pos: p,
            });
            p
        });
        let payload = &f.payload[..usize::from(f.len).min(MAX_PAYLOAD)];
        for (i, &b) in payload.iter().enumerate() {
            let p = pos + i as i64;
            if p < self.written {
                self.late += 1;
                continue;
            }
            let idx = p - self.written;
            if idx >= MAX_AHEAD_SAMPLES {
                break;
            }
            let idx = idx as usize;
            if idx >= self.pending.len() {
                self.pending.resize(idx + 1, [0, 0]);
            }
            self.pending[idx][leg] = match f.law {
                Law::Ulaw => ulaw_to_linear(b),
                Law::Alaw => alaw_to_linear(b),
            };
            self.end = self.end.max(p + 1);
        }
    }

    /// Appends (as little-endian PCM16, A then B) every sample before
    /// position `upto` (silence where no leg had audio), and forgets them.
    pub fn flush_to(&mut self, upto: i64, out: &mut Vec<u8>) {
        while self.written < upto {
            let s = self.pending.pop_front().unwrap_or([0, 0]);
            out.extend_from_slice(&s[0].to_le_bytes());
            out.extend_from_slice(&s[1].to_le_bytes());
            self.written += 1;
        }
    }

    /// Flushes what is older than `lag` samples before `now`.
    pub fn flush_before(&mut self, now: Instant, lag: i64, out: &mut Vec<u8>) {
        if self.t0.is_some() {
            let upto = (self.pos_of(now) - lag).min(self.end);
            self.flush_to(upto, out);
        }
    }

    /// Flushes everything (the call ended).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.flush_to(self.end, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(pt: u8, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn frames(rx: &Receiver<Frame>) -> Vec<Frame> {
        rx.try_iter().collect()
    }

    fn samples(out: &[u8]) -> Vec<[i16; 2]> {
        out.chunks_exact(4)
            .map(|c| {
                [
                    i16::from_le_bytes([c[0], c[1]]),
                    i16::from_le_bytes([c[2], c[3]]),
                ]
            })
            .collect()
    }

    #[test]
    fn tap_takes_g711_only_and_counts_what_a_full_queue_drops() {
        let (tap, rx, stats) = Tap::new();
        let t = Instant::now();
        tap.rtp(0, &pkt(101, 0, 1, &[1, 2, 3, 4]), t); // telephone-event
        tap.rtp(0, &[0x80, 0], t); // too short
        assert!(frames(&rx).is_empty());
        for i in 0..QUEUE_FRAMES + 5 {
            tap.rtp(1, &pkt(8, i as u32 * 160, 1, &[0xd5; 160]), t);
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 5);
        let got = frames(&rx);
        assert_eq!(got.len(), QUEUE_FRAMES);
        assert_eq!((got[0].leg, got[0].law, got[0].len), (1, Law::Alaw, 160));
    }

    #[test]
    fn padding_csrc_and_extension_are_not_audio() {
        // CC=1, X, P with 2 bytes of padding.
        let mut p = vec![0xB1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9];
        p.extend_from_slice(&[0; 4]); // CSRC
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0, 0, 0, 0]); // extension, 1 word
        p.extend_from_slice(&[0x11, 0x22, 0x33]);
        p.extend_from_slice(&[0, 2]);
        let (law, ssrc, _, payload) = g711_payload(&p).unwrap();
        assert_eq!(
            (law, ssrc, payload),
            (Law::Ulaw, 9, &[0x11, 0x22, 0x33][..])
        );
        let mut bad = p.clone();
        let n = bad.len();
        bad[n - 1] = 200; // padding longer than the packet
        assert!(g711_payload(&bad).is_none());
    }

    #[test]
    fn two_legs_line_up_by_time_and_a_silent_leg_is_zero() {
        let (tap, rx, _) = Tap::new();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Leg A from 0 ms, 5 frames; leg B starts at 40 ms (frame 2).
        for i in 0..5u32 {
            tap.rtp(
                0,
                &pkt(0, 1000 + i * 160, 7, &[i as u8; 160]),
                ms(20 * u64::from(i)),
            );
        }
        for i in 0..3u32 {
            tap.rtp(
                1,
                &pkt(8, 50 + i * 160, 8, &[0x55; 160]),
                ms(40 + 20 * u64::from(i)),
            );
        }
        let mut m = Mixer::new();
        for f in frames(&rx) {
            m.push(&f);
        }
        let mut out = Vec::new();
        m.finish(&mut out);
        let s = samples(&out);
        assert_eq!(s.len(), 800);
        for (i, x) in s.iter().enumerate() {
            assert_eq!(x[0], ulaw_to_linear((i / 160) as u8), "A at {i}");
            let b = if i >= 320 { alaw_to_linear(0x55) } else { 0 };
            assert_eq!(x[1], b, "B at {i}");
        }
    }

    #[test]
    fn flush_keeps_a_lag_and_late_audio_is_dropped_and_counted() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let f = |leg: u8, ts: u32, at: Instant| {
            let mut fr = Frame {
                leg,
                law: Law::Ulaw,
                ssrc: 1,
                timestamp: ts,
                at,
                len: 160,
                payload: [0x7f; MAX_PAYLOAD],
            };
            fr.payload[..160].fill(0x10);
            fr
        };
        let mut m = Mixer::new();
        for i in 0..10u32 {
            m.push(&f(0, i * 160, ms(20 * u64::from(i))));
        }
        let mut out = Vec::new();
        m.flush_before(ms(200), 800, &mut out); // 200 ms - 100 ms lag
        assert_eq!(out.len(), 800 * 4);
        // A frame for 0-20 ms on leg B arrives now: too late, counted.
        m.push(&f(1, 0, ms(21)));
        assert_eq!(m.late, 0, "a new stream is placed where it arrives");
        m.push(&Frame {
            timestamp: 0u32.wrapping_sub(1600),
            ..f(1, 0, ms(21))
        });
        assert_eq!(m.late, 160);
        out.clear();
        m.finish(&mut out);
        assert_eq!(out.len(), 800 * 4);
    }

    #[test]
    fn a_timestamp_far_away_rebases_instead_of_growing_the_buffer() {
        let t0 = Instant::now();
        let mut m = Mixer::new();
        let mut fr = Frame {
            leg: 0,
            law: Law::Ulaw,
            ssrc: 1,
            timestamp: 0,
            at: t0,
            len: 160,
            payload: [0; MAX_PAYLOAD],
        };
        m.push(&fr);
        fr.timestamp = 0x7fff_0000;
        fr.at = t0 + Duration::from_millis(20);
        m.push(&fr);
        assert_eq!(m.end, 320);
    }
}
