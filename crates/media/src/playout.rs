//! Paced playout of audio that arrives in bursts (a media stream's backend
//! sends speech faster than real time): a bounded queue of 20 ms G.711
//! frames, each given out at its time with RFC 3550 sequence numbers and
//! timestamps, and markers that come out once the audio queued before them
//! has been played. Sans-IO: the caller passes `now` and sends what
//! [`Playout::poll`] gives.
//!
//! Timing: the first frame of a talkspurt goes at once (RTP marker bit set,
//! RFC 3551 §4.1) and every next one 20 ms after the previous, on a fixed
//! grid (no drift). The RTP timestamp follows the clock, also across the
//! silence between talkspurts, so the receiver's jitter buffer sees the gap.
//! A frame due with the queue empty mid-talkspurt is an underrun (counted);
//! a burst beyond the bound is dropped and counted, never buffered.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples (bytes of G.711) in one 20 ms frame at 8 kHz.
pub const FRAME: usize = 160;
/// One frame's duration.
pub const PTIME: Duration = Duration::from_millis(20);
/// A talkspurt that starts this soon after the last frame continues one the
/// backend was late for: an underrun.
const UNDERRUN_GAP: Duration = Duration::from_millis(80);

/// One packet due now, or a marker whose audio has played.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Frame {
        seq: u16,
        timestamp: u32,
        /// First packet of a talkspurt.
        marker: bool,
        payload: [u8; FRAME],
    },
    Mark(String),
}

/// Counters since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    pub frames_sent: u64,
    /// Frames refused because the queue was full.
    pub frames_dropped: u64,
    /// Times the queue ran dry mid-speech: audio came again within 80 ms.
    pub underruns: u64,
    /// Frames thrown away by [`Playout::clear`].
    pub frames_cleared: u64,
}

#[derive(Debug)]
pub struct Playout {
    audio: VecDeque<u8>,
    cap: usize,
    /// Marks and the byte count (from the start) they follow.
    marks: VecDeque<(u64, String)>,
    queued_total: u64,
    played_total: u64,
    seq: u16,
    timestamp: u32,
    /// When the next frame of the current talkspurt is due; `None`: idle.
    next_due: Option<Instant>,
    /// When the last frame was sent (timestamps follow the clock from it).
    last_sent: Option<Instant>,
    silence: u8,
    stats: PlayoutStats,
}

impl Playout {
    /// `seq` and `timestamp`: the first packet's (random, RFC 3550 §5.1);
    /// `max_frames`: the bound of the queue; `silence`: the code that pads a
    /// last partial frame.
    pub fn new(seq: u16, timestamp: u32, max_frames: usize, silence: u8) -> Playout {
        let cap = max_frames.max(1) * FRAME;
        Playout {
            audio: VecDeque::with_capacity(cap.min(64 * FRAME)),
            cap,
            marks: VecDeque::new(),
            queued_total: 0,
            played_total: 0,
            seq,
            timestamp,
            next_due: None,
            last_sent: None,
            silence,
            stats: PlayoutStats::default(),
        }
    }

    /// Queues audio; what does not fit under the bound is dropped (whole
    /// frames counted). Returns the bytes dropped.
    pub fn push_audio(&mut self, bytes: &[u8]) -> usize {
        // A mark's padding may have taken the queue past the bound.
        let room = self.cap.saturating_sub(self.audio.len());
        let take = bytes.len().min(room);
        self.audio.extend(&bytes[..take]);
        self.queued_total += take as u64;
        let dropped = bytes.len() - take;
        self.stats.frames_dropped += dropped.div_ceil(FRAME) as u64;
        dropped
    }

    /// Queues a marker after the audio queued so far; a partial last frame
    /// is padded with silence so that the mark falls on a frame boundary.
    pub fn push_mark(&mut self, name: String) {
        let partial = self.audio.len() % FRAME;
        if partial != 0 {
            let pad = FRAME - partial;
            self.audio.extend(std::iter::repeat_n(self.silence, pad));
            self.queued_total += pad as u64;
        }
        self.marks.push_back((self.queued_total, name));
    }

    /// Empties the queue at once (barge-in); returns the marks that were
    /// waiting, to be echoed as the protocol wants.
    pub fn clear(&mut self) -> Vec<String> {
        self.stats.frames_cleared += self.audio.len().div_ceil(FRAME) as u64;
        self.audio.clear();
        self.played_total = self.queued_total;
        self.next_due = None;
        self.marks.drain(..).map(|(_, n)| n).collect()
    }

    /// Frames queued (a partial one counts).
    pub fn depth(&self) -> usize {
        self.audio.len().div_ceil(FRAME)
    }

    pub fn stats(&self) -> PlayoutStats {
        self.stats
    }

    /// When [`poll`](Self::poll) has something next; `None`: nothing queued.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if let Some((at, _)) = self.marks.front() {
            if *at <= self.played_total {
                return Some(self.next_due.unwrap_or(now));
            }
        }
        match (self.audio.is_empty(), self.next_due) {
            (false, Some(d)) => Some(d),
            (false, None) => Some(now),
            // Idle with a talkspurt open: its end is seen at the next slot.
            (true, Some(d)) => Some(d),
            (true, None) => None,
        }
    }

    /// What is due at `now`: call until `None`.
    pub fn poll(&mut self, now: Instant) -> Option<Output> {
        // A mark whose audio has played: at the slot after its last frame
        // (that frame's 20 ms are over), or at once if nothing was playing.
        if let Some((at, _)) = self.marks.front() {
            if *at <= self.played_total && self.next_due.is_none_or(|d| d <= now) {
                if self.audio.is_empty() {
                    self.next_due = None;
                }
                return self.marks.pop_front().map(|(_, n)| Output::Mark(n));
            }
        }
        match self.next_due {
            Some(d) if d > now => return None,
            Some(_) if self.audio.is_empty() => {
                // Due and nothing to send: the talkspurt is over (or the
                // backend is late: see the underrun below).
                self.next_due = None;
                return None;
            }
            None if self.audio.is_empty() => return None,
            _ => {}
        }
        let marker = self.next_due.is_none();
        let due = self.next_due.unwrap_or(now);
        if let Some(last) = self.last_sent {
            let gap = due.saturating_duration_since(last);
            if marker && gap <= UNDERRUN_GAP {
                // Audio resumed a few frames after the queue ran dry: the
                // backend was late mid-speech.
                self.stats.underruns += 1;
            }
            // 8 samples per ms; the gap rounded to whole frames.
            let frames = ((gap.as_micros() + 10_000) / 20_000).max(1) as u32;
            self.timestamp = self.timestamp.wrapping_add(frames * FRAME as u32);
            self.seq = self.seq.wrapping_add(1);
        }
        let mut payload = [self.silence; FRAME];
        let n = self.audio.len().min(FRAME);
        for (dst, src) in payload.iter_mut().zip(self.audio.drain(..n)) {
            *dst = src;
        }
        self.played_total += n as u64;
        self.last_sent = Some(due);
        self.next_due = Some(due + PTIME);
        self.stats.frames_sent += 1;
        Some(Output::Frame {
            seq: self.seq,
            timestamp: self.timestamp,
            marker,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(p: &mut Playout, now: Instant) -> Vec<Output> {
        std::iter::from_fn(|| p.poll(now)).collect()
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_burst_goes_out_one_frame_per_20_ms_with_rtp_numbering() {
        let t0 = Instant::now();
        let mut p = Playout::new(65534, 1000, 100, 0xFF);
        let audio: Vec<u8> = (0..FRAME * 5).map(|i| (i / FRAME) as u8).collect();
        assert_eq!(p.push_audio(&audio), 0);
        assert_eq!(p.depth(), 5);
        let mut got = Vec::new();
        for step in 0..=12 {
            // Every 10 ms of simulated time.
            let now = ms(t0, step * 10);
            for o in frames(&mut p, now) {
                got.push((step * 10, o));
            }
        }
        assert_eq!(got.len(), 5);
        for (i, (at, o)) in got.iter().enumerate() {
            let Output::Frame {
                seq,
                timestamp,
                marker,
                payload,
            } = o
            else {
                panic!("{o:?}")
            };
            assert_eq!(*at, i as u64 * 20);
            assert_eq!(*seq, 65534u16.wrapping_add(i as u16));
            assert_eq!(*timestamp, 1000 + 160 * i as u32);
            assert_eq!(*marker, i == 0);
            assert_eq!(payload, &[i as u8; FRAME]);
        }
        assert_eq!(p.stats().frames_sent, 5);
        assert_eq!(p.depth(), 0);
    }

    #[test]
    fn timestamps_follow_the_clock_across_silence() {
        let t0 = Instant::now();
        let mut p = Playout::new(1, 0, 100, 0xFF);
        p.push_audio(&[1; FRAME]);
        assert!(matches!(
            p.poll(t0),
            Some(Output::Frame { timestamp: 0, .. })
        ));
        assert_eq!(p.poll(ms(t0, 20)), None); // talkspurt over
        p.push_audio(&[2; FRAME]);
        let Some(Output::Frame {
            seq,
            timestamp,
            marker,
            ..
        }) = p.poll(ms(t0, 1000))
        else {
            panic!()
        };
        assert_eq!((seq, timestamp, marker), (2, 8000, true));
    }

    #[test]
    fn excess_beyond_the_bound_is_dropped_and_counted() {
        let mut p = Playout::new(1, 0, 3, 0xFF);
        assert_eq!(p.push_audio(&[0; FRAME * 5]), FRAME * 2);
        assert_eq!(p.depth(), 3);
        assert_eq!(p.stats().frames_dropped, 2);
        assert_eq!(p.push_audio(&[0; 10]), 10);
        assert_eq!(p.stats().frames_dropped, 3);
        // A mark padding a partial last frame past the bound: still bounded.
        let mut q = Playout::new(1, 0, 2, 0xFF);
        q.push_audio(&[0; FRAME * 2 - 10]);
        q.push_mark("m".into());
        assert_eq!(q.push_audio(&[0; 5]), 5);
        assert_eq!(q.depth(), 2);
    }

    #[test]
    fn clear_flushes_at_once_and_returns_the_waiting_marks() {
        let t0 = Instant::now();
        let mut p = Playout::new(1, 0, 100, 0xFF);
        p.push_audio(&[1; FRAME * 10]);
        p.push_mark("a".into());
        assert!(p.poll(t0).is_some());
        assert_eq!(p.clear(), vec!["a".to_string()]);
        assert_eq!(p.depth(), 0);
        assert_eq!(p.stats().frames_cleared, 9);
        assert_eq!(frames(&mut p, ms(t0, 20)), vec![]);
        assert_eq!(p.next_deadline(ms(t0, 20)), None);
        // New audio after a clear starts a new talkspurt at once.
        p.push_audio(&[3; FRAME]);
        assert!(matches!(
            p.poll(ms(t0, 25)),
            Some(Output::Frame { marker: true, .. })
        ));
    }

    #[test]
    fn a_mark_comes_out_when_the_audio_before_it_has_played() {
        let t0 = Instant::now();
        let mut p = Playout::new(1, 0, 100, 0xFF);
        p.push_audio(&[1; FRAME + 40]); // a partial second frame: padded
        p.push_mark("end".into());
        p.push_audio(&[2; FRAME]);
        assert!(matches!(p.poll(t0), Some(Output::Frame { .. })));
        assert_eq!(p.poll(t0), None);
        let Some(Output::Frame { payload, .. }) = p.poll(ms(t0, 20)) else {
            panic!()
        };
        assert_eq!(&payload[..40], &[1; 40]);
        assert_eq!(&payload[40..], &[0xFF; FRAME - 40]);
        assert_eq!(p.poll(ms(t0, 20)), None, "not before the frame played");
        assert_eq!(p.next_deadline(ms(t0, 20)), Some(ms(t0, 40)));
        assert_eq!(p.poll(ms(t0, 40)), Some(Output::Mark("end".into())));
        assert!(matches!(p.poll(ms(t0, 40)), Some(Output::Frame { .. })));
        // A mark with nothing queued comes back at once.
        let mut idle = Playout::new(1, 0, 100, 0xFF);
        idle.push_mark("now".into());
        assert_eq!(idle.next_deadline(t0), Some(t0));
        assert_eq!(idle.poll(t0), Some(Output::Mark("now".into())));
    }

    #[test]
    fn a_late_backend_is_an_underrun_and_a_partial_frame_is_padded() {
        let t0 = Instant::now();
        let mut p = Playout::new(1, 0, 100, 0xFF);
        p.push_audio(&[1; FRAME]);
        p.poll(t0);
        p.push_audio(&[2; 10]);
        let Some(Output::Frame { payload, .. }) = p.poll(ms(t0, 20)) else {
            panic!()
        };
        assert_eq!(&payload[..10], &[2; 10]);
        assert_eq!(p.poll(ms(t0, 40)), None);
        assert_eq!(p.stats().underruns, 0);
        p.push_audio(&[3; FRAME]);
        assert!(matches!(p.poll(ms(t0, 50)), Some(Output::Frame { .. })));
        assert_eq!(p.stats().underruns, 1);
        assert_eq!(p.stats().frames_sent, 3);
    }
}
