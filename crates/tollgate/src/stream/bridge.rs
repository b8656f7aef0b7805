//! One stream call: the RTP socket the relay's leg B talks to on one side,
//! the backend's WebSocket on the other.
//!
//! * caller -> backend: each RTP packet of the negotiated G.711 law becomes a
//!   `media` message (A-law converted to µ-law by table, µ-law passed as it
//!   is); RFC 4733 telephone-events become one `dtmf` per event.
//! * backend -> caller: `media` audio goes into the call's bounded
//!   [`Playout`] queue and out at 20 ms per packet with its own RTP
//!   numbering; `clear` empties it; a `mark` is echoed once the audio before
//!   it has played.
//! * A backend that does not read never holds up the call's task (nor any
//!   other): its messages queue in a bounded channel to a writer task, and
//!   media beyond it is dropped and counted.
//! * The call's BYE sends `stop`; a stream that fails or closes hangs the
//!   call up with a [`StreamEnd`] cause (BYE both legs, CDR cause).

use super::connect::{self, Ws};
use super::gateway::{MediaPlan, SecretText, Wiring};
use super::twilio::{self, Encoder, FromBackend, StartInfo};
use super::StreamConfig;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tollgate_media::g711;
use tollgate_media::playout::{Output, Playout, FRAME};
use tollgate_sip::b2bua::StreamEnd;
use tollgate_sip::driver::Control;
use tollgate_sip::EndCause;

/// Messages to the backend held while it does not read (5 s of media).
const TO_BACKEND_QUEUE: usize = 256;

/// The leg's G.711 law.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Pcmu,
    Pcma,
}

impl Codec {
    pub fn payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
        }
    }
}

/// From the gateway's SIP side.
#[derive(Debug)]
pub enum LegEvent {
    /// Where the relay's leg B is and which law (the ACK's answer to a late
    /// offer, a re-INVITE).
    Media(MediaPlan),
    /// The call hung up.
    Bye,
}

/// Who the stream is for.
#[derive(Debug)]
pub struct Setup {
    pub url: String,
    pub secret: Option<SecretText>,
    pub info: StartInfo,
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b)
}

pub use tollgate_media::record::rtp_payload;

/// Metric handles of the stream path, looked up once per call.
struct Meters {
    to_backend: metrics::Counter,
    from_backend: metrics::Counter,
    dropped_full: metrics::Counter,
    dropped_slow: metrics::Counter,
    cleared: metrics::Counter,
    underruns: metrics::Counter,
    queue: metrics::Gauge,
}

impl Meters {
    fn new() -> Meters {
        Meters {
            to_backend: metrics::counter!("tollgate_stream_frames_total", "direction" => "to_backend"),
            from_backend: metrics::counter!("tollgate_stream_frames_total", "direction" => "from_backend"),
            dropped_full: metrics::counter!("tollgate_stream_frames_dropped_total", "reason" => "queue_full"),
            dropped_slow: metrics::counter!("tollgate_stream_frames_dropped_total", "reason" => "backend_slow"),
            cleared: metrics::counter!("tollgate_stream_frames_dropped_total", "reason" => "cleared"),
            underruns: metrics::counter!("tollgate_stream_underruns_total"),
            queue: metrics::gauge!("tollgate_stream_queue_frames"),
        }
    }
}

/// Runs one stream call to its end.
pub async fn run(
    setup: Setup,
    rtp: UdpSocket,
    plan: Option<MediaPlan>,
    mut leg: mpsc::UnboundedReceiver<LegEvent>,
    cfg: Arc<StreamConfig>,
    wiring: Wiring,
) {
    let call_id = setup.info.call_sid.clone();
    let connecting = connect::connect(
        &setup.url,
        setup.secret.as_ref().map(|s| s.0.as_str()),
        &cfg,
    );
    tokio::pin!(connecting);
    let mut plan = plan;
    // The caller's packets wait in the socket's buffer meanwhile.
    let ws = loop {
        tokio::select! {
            r = &mut connecting => break r,
            ev = leg.recv() => match ev {
                Some(LegEvent::Media(p)) => plan = Some(p),
                Some(LegEvent::Bye) | None => {
                    metrics::counter!("tollgate_streams_total", "cause" => "completed").increment(1);
                    return;
                }
            },
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(cause) => {
            tracing::warn!(call = %call_id, cause = cause.label(), "stream to the backend failed");
            end_call(&wiring, &call_id, cause).await;
            return;
        }
    };
    metrics::gauge!("tollgate_streams_active").increment(1.0);
    let end = Bridge::new(setup.info, rtp, plan, cfg.queue_frames)
        .run(ws, &mut leg)
        .await;
    metrics::gauge!("tollgate_streams_active").decrement(1.0);
    let label = end.map_or("completed", StreamEnd::label);
    metrics::counter!("tollgate_streams_total", "cause" => label).increment(1);
    if let Some(cause) = end {
        tracing::warn!(call = %call_id, cause = label, "stream ended the call");
        end_call(&wiring, &call_id, cause).await;
    }
}

/// Hangs up the call whose leg B Call-ID is `call_id` with a BYE to both
/// legs. A stream can fail before the caller's ACK has confirmed the call,
/// when a hangup would not BYE (or, before our 200 reached the B2BUA, would
/// answer leg A 503): the hangup is sent once leg B's answer is known, and
/// again until the call is gone (the ACK timeout bounds the wait).
async fn end_call(wiring: &Wiring, call_id: &str, cause: StreamEnd) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(64);
    while tokio::time::Instant::now() < give_up {
        let up = wiring
            .calls
            .iter()
            .find(|c| c.call_id == call_id)
            .map(|c| (*c.key(), c.answered.is_some()));
        match up {
            None => return,
            Some((handle, true)) => {
                let _ = wiring
                    .control
                    .send(Control::Hangup(handle, EndCause::Stream(cause)))
                    .await;
            }
            Some((_, false)) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Bridge {
    info: StartInfo,
    enc: Encoder,
    rtp: UdpSocket,
    plan: Option<MediaPlan>,
    playout: Playout,
    ssrc: u32,
    started: tokio::time::Instant,
    last_dtmf: Option<u32>,
    meters: Meters,
    /// What the queue-depth gauge holds for this call.
    depth_shown: usize,
    underruns_seen: u64,
}

impl Bridge {
    fn new(
        info: StartInfo,
        rtp: UdpSocket,
        plan: Option<MediaPlan>,
        queue_frames: usize,
    ) -> Bridge {
        // The queue holds µ-law (an A-law leg's frames are converted as they go).
        let silence = g711::ULAW_SILENCE;
        let r = random_u32();
        Bridge {
            enc: Encoder::new(&info),
            info,
            rtp,
            plan,
            playout: Playout::new(r as u16, random_u32(), queue_frames, silence),
            ssrc: random_u32(),
            started: tokio::time::Instant::now(),
            last_dtmf: None,
            meters: Meters::new(),
            depth_shown: 0,
            underruns_seen: 0,
        }
    }

    /// `None`: the call hung up; else why the stream ended it.
    async fn run(
        mut self,
        ws: Ws,
        leg: &mut mpsc::UnboundedReceiver<LegEvent>,
    ) -> Option<StreamEnd> {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<WsMessage>(TO_BACKEND_QUEUE);
        // The writer: the only place that waits on the backend's reading.
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let close = matches!(m, WsMessage::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let connected = self.enc.connected();
        let start = self.enc.start(&self.info);
        let _ = tx.send(WsMessage::text(connected)).await;
        let _ = tx.send(WsMessage::text(start)).await;
        let mut buf = vec![0u8; 2048];
        let end = loop {
            let now = tokio::time::Instant::now();
            let deadline = self
                .playout
                .next_deadline(now.into_std())
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                r = self.rtp.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        self.on_rtp(&buf[..n], from, &tx);
                    }
                }
                m = stream.next() => {
                    if let Err(e) = self.on_backend(m, &tx) {
                        break Some(e);
                    }
                }
                _ = sleep_until(deadline) => self.play(&tx).await,
                ev = leg.recv() => match ev {
                    Some(LegEvent::Media(p)) => self.plan = Some(p),
                    Some(LegEvent::Bye) | None => break None,
                },
            }
        };
        self.meters.queue.decrement(self.depth_shown as f64);
        if end.is_none() || end == Some(StreamEnd::ProtocolError) {
            let stop = self.enc.stop();
            let _ = tx.try_send(WsMessage::text(stop));
            let _ = tx.try_send(WsMessage::Close(None));
        }
        drop(tx);
        // A backend that does not read gets a moment for `stop`, no more.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        end
    }

    fn on_rtp(&mut self, pkt: &[u8], from: SocketAddr, tx: &mpsc::Sender<WsMessage>) {
        let Some(plan) = self.plan else {
            return;
        };
        // Only the relay's leg B talks to this socket.
        if from != plan.remote {
            return;
        }
        let Some((pt, ts, payload)) = rtp_payload(pkt) else {
            return;
        };
        let msg = if pt == plan.codec.payload_type() {
            let ms = self.started.elapsed().as_millis() as u64;
            if plan.codec == Codec::Pcma {
                let mut ulaw = payload.to_vec();
                g711::alaw_to_ulaw_in_place(&mut ulaw);
                self.enc.media(&ulaw, ms)
            } else {
                self.enc.media(payload, ms)
            }
        } else if Some(pt) == plan.telephone_event {
            // RFC 4733 §2.5: the packets of one event share its timestamp.
            if payload.len() < 4 || self.last_dtmf == Some(ts) {
                return;
            }
            let Some(d) = twilio::dtmf_digit(payload[0]) else {
                return;
            };
            self.last_dtmf = Some(ts);
            self.enc.dtmf(d)
        } else {
            return;
        };
        match tx.try_send(WsMessage::text(msg)) {
            Ok(()) => self.meters.to_backend.increment(1),
            Err(_) => self.meters.dropped_slow.increment(1),
        }
    }

    fn on_backend(
        &mut self,
        m: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
        tx: &mpsc::Sender<WsMessage>,
    ) -> Result<(), StreamEnd> {
        use tokio_tungstenite::tungstenite::Error as E;
        let text = match m {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Binary(_))) => {
                tracing::warn!(call = %self.info.call_sid, "stream backend sent a binary frame");
                return Err(StreamEnd::ProtocolError);
            }
            Some(Ok(WsMessage::Close(_))) | None => return Err(StreamEnd::Closed),
            Some(Ok(_)) => return Ok(()), // ping/pong: tungstenite answers
            Some(Err(E::Capacity(_) | E::Protocol(_) | E::Utf8(_))) => {
                return Err(StreamEnd::ProtocolError)
            }
            Some(Err(_)) => return Err(StreamEnd::Closed),
        };
        match twilio::parse(&text) {
            Ok(FromBackend::Media(audio)) => {
                let dropped = self.playout.push_audio(&audio);
                if dropped > 0 {
                    self.meters
                        .dropped_full
                        .increment(dropped.div_ceil(FRAME) as u64);
                }
            }
            Ok(FromBackend::Mark(name)) => self.playout.push_mark(name),
            Ok(FromBackend::Clear) => {
                let before = self.playout.stats().frames_cleared;
                for name in self.playout.clear() {
                    let m = self.enc.mark(&name);
                    let _ = tx.try_send(WsMessage::text(m));
                }
                self.meters
                    .cleared
                    .increment(self.playout.stats().frames_cleared - before);
            }
            Ok(FromBackend::Ignored) => {}
            Err(e) => {
                tracing::warn!(call = %self.info.call_sid, error = %e, "stream backend broke the protocol");
                return Err(StreamEnd::ProtocolError);
            }
        }
        self.show_depth();
        Ok(())
    }

    /// Sends what the playout has due.
    async fn play(&mut self, tx: &mpsc::Sender<WsMessage>) {
        let now = tokio::time::Instant::now().into_std();
        while let Some(out) = self.playout.poll(now) {
            match out {
                Output::Frame {
                    seq,
                    timestamp,
                    marker,
                    mut payload,
                } => {
                    let Some(plan) = self.plan else {
                        continue;
                    };
                    if plan.codec == Codec::Pcma {
                        g711::ulaw_to_alaw_in_place(&mut payload);
                    }
                    let mut pkt = [0u8; 12 + FRAME];
                    pkt[0] = 0x80;
                    pkt[1] = plan.codec.payload_type() | if marker { 0x80 } else { 0 };
                    pkt[2..4].copy_from_slice(&seq.to_be_bytes());
                    pkt[4..8].copy_from_slice(&timestamp.to_be_bytes());
                    pkt[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
                    pkt[12..].copy_from_slice(&payload);
                    let _ = self.rtp.send_to(&pkt, plan.remote).await;
                    self.meters.from_backend.increment(1);
                }
                Output::Mark(name) => {
                    let m = self.enc.mark(&name);
                    let _ = tx.try_send(WsMessage::text(m));
                }
            }
        }
        let u = self.playout.stats().underruns;
        if u > self.underruns_seen {
            self.meters.underruns.increment(u - self.underruns_seen);
            self.underruns_seen = u;
        }
        self.show_depth();
    }

    fn show_depth(&mut self) {
        let d = self.playout.depth();
        if d != self.depth_shown {
            self.meters
                .queue
                .increment(d as f64 - self.depth_shown as f64);
            self.depth_shown = d;
        }
    }
}

async fn sleep_until(d: Option<tokio::time::Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_payloads_are_found_past_csrcs_extensions_and_padding() {
        let mut p = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 1, 2, 3, 4];
        p.extend([7u8; 160]);
        let (pt, ts, pl) = rtp_payload(&p).unwrap();
        assert_eq!((pt, ts, pl.len()), (0, 160, 160));
        // One CSRC, a one-word extension, 4 bytes of padding.
        let mut q = vec![0xB1, 0x88, 0, 1, 0, 0, 0, 1, 1, 2, 3, 4, 9, 9, 9, 9];
        q.extend([0xBE, 0xDE, 0, 1, 0, 0, 0, 0]);
        q.extend([5u8; 10]);
        q.extend([0, 0, 0, 4]);
        let (pt, _, pl) = rtp_payload(&q).unwrap();
        assert_eq!((pt, pl), (8, &[5u8; 10][..]));
        assert!(rtp_payload(&[0x80; 8]).is_none());
        assert!(rtp_payload(&[0x40; 20]).is_none(), "version 1");
        let mut bad_pad = vec![0xA0, 0, 0, 1, 0, 0, 0, 1, 1, 2, 3, 4];
        bad_pad.push(200);
        assert!(rtp_payload(&bad_pad).is_none());
    }
}
