//! The API the B2BUA calls: SDP offer/answer in, SDP out, relays started and
//! stopped per call. Synchronous; relay tasks are spawned on the current tokio
//! runtime when the answer arrives.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ports::{PortAllocator, PortPair};
use crate::relay::{self, CallStats, Latch, Relay, Side, Sockets, StatsSnapshot};
use crate::sdp::{Crypto, Media, SdpError, SessionDescription};
use crate::srtp::{Direction, NativeProvider, SrtpError, SrtpKeys, SrtpProvider, Suite};

/// Media relay configuration.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// The address the relay binds and writes into SDP.
    pub ip: IpAddr,
    /// Inclusive port range (RTP even, RTCP odd).
    pub ports: (u16, u16),
    /// Media silence after which [`MediaEngine::silent_calls`] reports a call.
    pub timeout: Duration,
}

/// A side's media profile (from the route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// RTP/AVP.
    Rtp,
    /// RTP/SAVP with SDES (RFC 4568).
    Srtp,
    /// Whatever leg A offered.
    Auto,
}

/// Why the engine refused an offer or answer. All but `Ports`, `Bind` and
/// `NoRuntime` are the peer's doing (SIP 488 Not Acceptable Here); those three
/// are ours (500/503).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    #[error("malformed SDP: {0}")]
    Sdp(#[from] SdpError),
    #[error("no RTP audio stream offered")]
    NoAudio,
    #[error("RTP/SAVP offered without a crypto suite we support")]
    NoCrypto,
    #[error("the answer does not match the offer: {0}")]
    Answer(&'static str),
    #[error("no offer pending for this call")]
    UnknownCall,
    #[error("media ports exhausted")]
    Ports,
    #[error("cannot bind media socket: {0}")]
    Bind(std::io::Error),
    #[error("not inside a tokio runtime")]
    NoRuntime,
    #[error("SRTP: {0}")]
    Srtp(#[from] SrtpError),
}

impl MediaError {
    /// Whether the remote party caused it (answer 488) rather than us.
    pub fn is_not_acceptable(&self) -> bool {
        !matches!(
            self,
            MediaError::Ports | MediaError::Bind(_) | MediaError::NoRuntime
        )
    }
}

/// Attributes of a terminated transport that must not reach the other leg.
const TRANSPORT_ATTRIBUTES: [&str; 9] = [
    "crypto",
    "rtcp",
    "rtcp-mux",
    "candidate",
    "ice-ufrag",
    "ice-pwd",
    "ice-options",
    "fingerprint",
    "setup",
];

/// One leg's bound sockets and ports (the sockets close before the pair
/// returns to the pool: fields drop in declaration order).
struct LegPorts {
    rtp: StdUdpSocket,
    rtcp: StdUdpSocket,
    pair: PortPair,
}

/// What a peer's SDP says about where and how it receives.
#[derive(Debug, Clone, Copy)]
struct PeerMedia {
    rtp: Option<SocketAddr>,
    rtcp: Option<SocketAddr>,
    mux: bool,
}

fn peer_media(sdp: &SessionDescription, i: usize) -> PeerMedia {
    let m = &sdp.media[i];
    let ip = sdp.connection(i).filter(|ip| !ip.is_unspecified());
    let rtp = ip
        .filter(|_| m.port != 0)
        .map(|ip| SocketAddr::new(ip, m.port));
    let mux = m.rtcp_mux();
    let rtcp = match m.rtcp() {
        Some((port, addr)) => addr.or(ip).map(|ip| SocketAddr::new(ip, port)),
        None => rtp.and_then(|a| a.port().checked_add(1).map(|p| SocketAddr::new(a.ip(), p))),
    };
    PeerMedia { rtp, rtcp, mux }
}

struct Pending {
    a_sdp: SessionDescription,
    /// Index of the relayed audio stream in A's offer (and ours to B).
    index: usize,
    a_peer: PeerMedia,
    /// A's crypto (A's sending key), if leg A is SRTP.
    a_crypto: Option<Crypto>,
    /// What we offered B (our sending keys), if leg B is SRTP.
    b_offer: Option<Vec<Crypto>>,
    legs: [LegPorts; 2],
}

struct Running {
    /// Owns the sockets and ports: they are returned when the task ends.
    task: tokio::task::JoinHandle<()>,
    /// B's answer and ours to A, to answer a repeated answer (183 then 200
    /// with the same SDP) the same way.
    b_answer: Vec<u8>,
    a_answer: Vec<u8>,
}

enum State {
    Offered(Box<Pending>),
    Running(Running),
    /// B rejected the audio: nothing to relay, nothing held.
    Rejected,
}

struct Call {
    state: State,
    stats: Arc<CallStats>,
    /// The relay that keeps the media flowing while a re-offer (re-INVITE,
    /// UPDATE) is pending; dropped when the new answer starts the new relay,
    /// restored by [`MediaEngine::cancel_offer`] when the re-offer fails.
    previous: Option<Running>,
}

impl Drop for Call {
    fn drop(&mut self) {
        if let State::Running(r) = &self.state {
            r.task.abort();
        }
        if let Some(r) = &self.previous {
            r.task.abort();
        }
    }
}

/// The media relay of the whole edge.
pub struct MediaEngine {
    cfg: MediaConfig,
    ports: PortAllocator,
    provider: Arc<dyn SrtpProvider>,
    calls: Mutex<HashMap<u64, Call>>,
}

impl MediaEngine {
    /// An engine with the in-place SRTP provider.
    pub fn new(cfg: MediaConfig) -> Self {
        Self::with_provider(cfg, Arc::new(NativeProvider))
    }

    /// An engine with another SRTP provider (tests, benchmarks).
    pub fn with_provider(cfg: MediaConfig, provider: Arc<dyn SrtpProvider>) -> Self {
        MediaEngine {
            ports: PortAllocator::new(cfg.ports.0, cfg.ports.1),
            cfg,
            provider,
            calls: Mutex::new(HashMap::new()),
        }
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bind_leg(&self) -> Result<LegPorts, MediaError> {
        // A pair whose ports are still held by someone else is skipped (it
        // goes back to the end of the free list).
        // Another process (a second edge, an RTP tool) may hold ports of our
        // range: try well past a few such pairs before calling it exhaustion.
        let mut last = None;
        for _ in 0..64 {
            let pair = self.ports.allocate().ok_or(MediaError::Ports)?;
            let bind = |port| {
                let s = StdUdpSocket::bind(SocketAddr::new(self.cfg.ip, port))?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            };
            match (bind(pair.rtp()), bind(pair.rtcp())) {
                (Ok(rtp), Ok(rtcp)) => return Ok(LegPorts { pair, rtp, rtcp }),
                (Err(e), _) | (_, Err(e)) => last = Some(e),
            }
        }
        Err(last.map_or(MediaError::Ports, MediaError::Bind))
    }

    /// Leg A's offer: allocates both legs' ports and returns the SDP to send
    /// to leg B (in `profile_b`; for SRTP, fresh keys for every suite we
    /// support). A second offer for the same call (re-INVITE) replaces the
    /// first: new ports, new keys.
    pub fn offer(
        &self,
        call: u64,
        offer_from_a: &[u8],
        profile_b: Profile,
    ) -> Result<Vec<u8>, MediaError> {
        let a_sdp = SessionDescription::parse(offer_from_a)?;
        let index = a_sdp
            .media
            .iter()
            .position(|m| m.is_rtp_audio() && m.port != 0)
            .ok_or(MediaError::NoAudio)?;
        let a_media = &a_sdp.media[index];
        let a_crypto = if a_media.is_secure() {
            Some(
                a_media
                    .cryptos()
                    .into_iter()
                    .next()
                    .ok_or(MediaError::NoCrypto)?,
            )
        } else {
            None
        };
        let b_secure = match profile_b {
            Profile::Rtp => false,
            Profile::Srtp => true,
            Profile::Auto => a_crypto.is_some(),
        };
        let a_peer = peer_media(&a_sdp, index);

        // A running relay keeps serving until the new answer (a re-offer may
        // still fail); a pending offer is replaced and its ports return.
        let previous = self.calls().remove(&call).and_then(|mut c| {
            match std::mem::replace(&mut c.state, State::Rejected) {
                State::Running(r) => Some(r),
                _ => c.previous.take(),
            }
        });
        let legs = match (self.bind_leg(), self.bind_leg()) {
            (Ok(a), Ok(b)) => [a, b],
            (Err(e), _) | (_, Err(e)) => {
                if let Some(r) = previous {
                    // Keep the call's media as it was.
                    self.calls().insert(
                        call,
                        Call {
                            state: State::Running(r),
                            stats: Arc::new(CallStats::new(Instant::now())),
                            previous: None,
                        },
                    );
                }
                return Err(e);
            }
        };

        let mut b_sdp = a_sdp.clone();
        b_sdp.set_address(self.cfg.ip);
        strip_transport(&mut b_sdp.session);
        let b_offer = if b_secure {
            let mut v = Vec::new();
            for (tag, suite) in (1..).zip(Suite::ALL) {
                v.push(Crypto {
                    tag,
                    suite,
                    keys: SrtpKeys::generate(suite)?,
                });
            }
            Some(v)
        } else {
            None
        };
        for (i, m) in b_sdp.media.iter_mut().enumerate() {
            if i != index {
                m.reject();
                continue;
            }
            m.port = legs[1].pair.rtp();
            m.port_count = None;
            m.set_secure(b_secure);
            strip_transport(&mut m.lines);
            m.push_attribute(format!("rtcp:{}", legs[1].pair.rtcp()));
            if a_peer.mux {
                m.push_attribute("rtcp-mux");
            }
            for c in b_offer.iter().flatten() {
                m.push_attribute(c.to_attribute());
            }
        }
        let out = b_sdp.to_bytes();
        let stats = Arc::new(CallStats::new(Instant::now()));
        self.calls().insert(
            call,
            Call {
                state: State::Offered(Box::new(Pending {
                    a_sdp,
                    index,
                    a_peer,
                    a_crypto,
                    b_offer,
                    legs,
                })),
                stats,
                previous,
            },
        );
        Ok(out)
    }

    /// Leg B's answer: returns the answer for leg A (in the profile A
    /// offered) and starts relaying. If B rejected the audio, so does the
    /// answer to A and the call's ports are released.
    pub fn answer(&self, call: u64, answer_from_b: &[u8]) -> Result<Vec<u8>, MediaError> {
        let b_sdp = SessionDescription::parse(answer_from_b)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MediaError::NoRuntime)?;
        let mut calls = self.calls();
        let entry = calls.get_mut(&call).ok_or(MediaError::UnknownCall)?;
        let pending = match &entry.state {
            State::Offered(p) => p,
            State::Running(r) if r.b_answer == answer_from_b => return Ok(r.a_answer.clone()),
            State::Running(_) => {
                return Err(MediaError::Answer(
                    "a different answer for a running call: re-offer first",
                ))
            }
            State::Rejected => return Err(MediaError::UnknownCall),
        };
        let index = pending.index;
        if b_sdp.media.len() != pending.a_sdp.media.len() {
            return Err(MediaError::Answer(
                "number of m= lines differs from the offer",
            ));
        }
        let b_media = &b_sdp.media[index];

        // The answer to A: B's answer (codecs, direction) with our transport.
        let mut a_answer = b_sdp.clone();
        a_answer.set_address(self.cfg.ip);
        strip_transport(&mut a_answer.session);
        for (i, m) in a_answer.media.iter_mut().enumerate() {
            let offered = &pending.a_sdp.media[i];
            if i != index || m.port == 0 {
                *m = Media {
                    lines: Vec::new(),
                    ..offered.clone()
                };
                m.reject();
            }
        }
        if b_media.port == 0 {
            entry.state = State::Rejected; // drops the pending legs' sockets and ports
            if let Some(r) = entry.previous.take() {
                r.task.abort();
            }
            return Ok(a_answer.to_bytes());
        }

        // Leg B's keys.
        let b_keys = match (&pending.b_offer, b_media.is_secure()) {
            (None, false) => None,
            (Some(offered), true) => {
                let chosen = b_media
                    .cryptos()
                    .into_iter()
                    .find(|c| offered.iter().any(|o| o.tag == c.tag && o.suite == c.suite))
                    .ok_or(MediaError::Answer("no a=crypto matching one we offered"))?;
                let ours = offered
                    .iter()
                    .find(|o| o.tag == chosen.tag)
                    .expect("matched above")
                    .clone();
                Some((ours, chosen))
            }
            (Some(_), false) => return Err(MediaError::Answer("RTP/AVP answer to RTP/SAVP offer")),
            (None, true) => return Err(MediaError::Answer("RTP/SAVP answer to RTP/AVP offer")),
        };
        // Leg A's keys: A's offered key, and a fresh one of ours.
        let a_keys = match &pending.a_crypto {
            Some(theirs) => Some((
                Crypto {
                    tag: theirs.tag,
                    suite: theirs.suite,
                    keys: SrtpKeys::generate(theirs.suite)?,
                },
                theirs.clone(),
            )),
            None => None,
        };
        let b_peer = PeerMedia {
            mux: b_media.rtcp_mux() && pending.a_peer.mux,
            ..peer_media(&b_sdp, index)
        };
        {
            let m = &mut a_answer.media[index];
            let offered = &pending.a_sdp.media[index];
            m.port = pending.legs[0].pair.rtp();
            m.port_count = None;
            m.proto = offered.proto.clone();
            strip_transport(&mut m.lines);
            // With rtcp-mux (RFC 5761 §5.1.3) RTCP goes to the RTP port.
            if pending.a_peer.mux {
                m.push_attribute(format!("rtcp:{}", pending.legs[0].pair.rtp()));
                m.push_attribute("rtcp-mux");
            } else {
                m.push_attribute(format!("rtcp:{}", pending.legs[0].pair.rtcp()));
            }
            if let Some((ours, _)) = &a_keys {
                m.push_attribute(ours.to_attribute());
            }
        }

        let started = Instant::now();
        let side = |peer: PeerMedia, keys: Option<(Crypto, Crypto)>| -> Result<Side, MediaError> {
            let (tx, rx) = match keys {
                Some((ours, theirs)) => (
                    Some(
                        self.provider
                            .new_context(ours.suite, &ours.keys, Direction::Outbound)?,
                    ),
                    Some(self.provider.new_context(
                        theirs.suite,
                        &theirs.keys,
                        Direction::Inbound,
                    )?),
                ),
                None => (None, None),
            };
            Ok(Side {
                rtp_latch: Latch::new(peer.rtp, started),
                rtcp_latch: Latch::new(if peer.mux { peer.rtp } else { peer.rtcp }, started),
                mux: peer.mux,
                rx,
                tx,
            })
        };
        let sides = [side(pending.a_peer, a_keys)?, side(b_peer, b_keys)?];

        let State::Offered(pending) = std::mem::replace(&mut entry.state, State::Rejected) else {
            unreachable!("checked above");
        };
        let Pending { legs, .. } = *pending;
        let [a, b] = legs;
        let _guard = runtime.enter();
        let tokio_leg = |l: LegPorts| -> Result<Sockets, MediaError> {
            Ok(Sockets {
                rtp: tokio::net::UdpSocket::from_std(l.rtp).map_err(MediaError::Bind)?,
                rtcp: tokio::net::UdpSocket::from_std(l.rtcp).map_err(MediaError::Bind)?,
                ports: Some(l.pair),
            })
        };
        let (sa, sb) = (tokio_leg(a)?, tokio_leg(b)?);
        entry.stats = Arc::new(CallStats::new(started));
        let relay = Relay {
            sides,
            stats: entry.stats.clone(),
        };
        if let Some(r) = entry.previous.take() {
            r.task.abort(); // the new relay takes over
        }
        let task = runtime.spawn(relay::run(relay, [sa, sb]));
        let a_answer = a_answer.to_bytes();
        entry.state = State::Running(Running {
            task,
            b_answer: answer_from_b.to_vec(),
            a_answer: a_answer.clone(),
        });
        Ok(a_answer)
    }

    /// A re-offer failed (leg B refused the re-INVITE): the relay that ran
    /// before it goes on, the re-offer's ports return. Without a previous
    /// relay (an initial offer) this does nothing; `release` ends the call.
    pub fn cancel_offer(&self, call: u64) {
        let mut calls = self.calls();
        let Some(entry) = calls.get_mut(&call) else {
            return;
        };
        if !matches!(entry.state, State::Offered(_)) {
            return;
        }
        if let Some(r) = entry.previous.take() {
            entry.state = State::Running(r); // drops the pending legs
        }
    }

    /// Stops the call's relay and returns every port it held: at once for a
    /// call not yet answered; for a running call as soon as the runtime has
    /// dropped the aborted relay task (its sockets close first, so a port is
    /// never handed out while still bound).
    pub fn release(&self, call: u64) {
        let removed = self.calls().remove(&call);
        drop(removed);
    }

    /// Media ports (not pairs) currently held (bound or reserved).
    pub fn ports_in_use(&self) -> usize {
        self.ports.in_use()
    }

    /// Calls whose media has been silent for longer than the timeout (both
    /// directions): the B2BUA sends BYE on both legs.
    pub fn silent_calls(&self, now: Instant) -> Vec<u64> {
        self.calls()
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Running(_)))
            .filter(|(_, c)| {
                now.saturating_duration_since(c.stats.last_packet()) > self.cfg.timeout
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// When a running call's media was last seen ("silent since").
    pub fn last_media(&self, call: u64) -> Option<Instant> {
        self.calls()
            .get(&call)
            .filter(|c| matches!(c.state, State::Running(_)))
            .map(|c| c.stats.last_packet())
    }

    /// The call's packet counters.
    pub fn stats(&self, call: u64) -> Option<StatsSnapshot> {
        self.calls().get(&call).map(|c| c.stats.snapshot())
    }
}

fn strip_transport(lines: &mut Vec<crate::sdp::Line>) {
    lines.retain(|l| {
        l.kind != 'a'
            || !TRANSPORT_ATTRIBUTES.iter().any(|a| {
                l.value
                    .strip_prefix(a)
                    .is_some_and(|v| v.is_empty() || v.starts_with(':'))
            })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_is_shareable() {
        fn assert<T: Send + Sync>() {}
        assert::<MediaEngine>();
    }

    async fn ports_settle(e: &MediaEngine, want: usize) {
        for _ in 0..100 {
            if e.ports_in_use() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(e.ports_in_use(), want);
    }

    #[tokio::test]
    async fn a_failed_re_offer_keeps_the_running_relay() {
        let e = MediaEngine::new(MediaConfig {
            ip: "127.0.0.1".parse().unwrap(),
            ports: (31820, 31859),
            timeout: Duration::from_secs(30),
        });
        let offer = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5000 RTP/AVP 0\r\n";
        let answer = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6000 RTP/AVP 0\r\n";
        e.offer(7, offer, Profile::Auto).unwrap();
        let first = e.answer(7, answer).unwrap();
        assert_eq!(e.ports_in_use(), 4);
        // Re-offer: the old relay keeps its ports while the new ones wait.
        let re = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5100 RTP/AVP 0\r\n";
        e.offer(7, re, Profile::Auto).unwrap();
        assert_eq!(e.ports_in_use(), 8);
        e.cancel_offer(7);
        assert_eq!(e.ports_in_use(), 4, "the re-offer's ports return at once");
        // The restored relay still answers a repeated answer the same way.
        assert_eq!(e.answer(7, answer).unwrap(), first);
        // A re-offer that is answered replaces the relay.
        e.offer(7, re, Profile::Auto).unwrap();
        let second = e.answer(
            7,
            b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6100 RTP/AVP 0\r\n",
        );
        assert_ne!(second.unwrap(), first, "new ports in the new answer");
        ports_settle(&e, 4).await;
        e.release(7);
        ports_settle(&e, 0).await;
    }

    #[test]
    fn answer_needs_a_runtime() {
        let e = MediaEngine::new(MediaConfig {
            ip: "127.0.0.1".parse().unwrap(),
            ports: (31800, 31809),
            timeout: Duration::from_secs(1),
        });
        let offer = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5000 RTP/AVP 0\r\n";
        e.offer(1, offer, Profile::Auto).unwrap();
        assert_eq!(e.ports_in_use(), 4);
        let answer = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6000 RTP/AVP 0\r\n";
        assert!(matches!(e.answer(1, answer), Err(MediaError::NoRuntime)));
        e.release(1);
        assert_eq!(e.ports_in_use(), 0, "an unanswered call frees at once");
    }
}
