//! The API the B2BUA calls: SDP offer/answer in, SDP out, relays started and
//! stopped per call. Synchronous; relay tasks are spawned on the current tokio
//! runtime when the answer arrives.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ports::{PortAllocator, PortPair};
use crate::relay::{self, CallStats, Latch, Relay, Side, Sockets, StatsSnapshot, StopSignal};
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
    #[error("the offer's profile is not the route's: {0}")]
    Profile(&'static str),
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

/// The sockets an ended call left bound to `pair`, emptied of what they
/// received since (a late packet of the old call must not reach the new
/// one). Gives the pair back if it has none or they fail (they close; the
/// caller binds anew).
fn warm_leg(mut pair: PortPair) -> Result<LegPorts, PortPair> {
    let Some([rtp, rtcp]) = pair.take_sockets() else {
        return Err(pair);
    };
    let mut buf = [0u8; 2048];
    for s in [&rtp, &rtcp] {
        // Bounded: a flood at an idle port cannot hold the shard here.
        for _ in 0..1024 {
            match s.recv_from(&mut buf) {
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(pair),
            }
        }
    }
    Ok(LegPorts { rtp, rtcp, pair })
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
    /// The leg that made the offer; the other leg answers.
    offerer: Leg,
    /// The offer as it came and as we sent it on, so that a repeated offer
    /// (leg B's 18x, then its 2xx with the same SDP) gets the same rewrite:
    /// the same ports and keys.
    offer_in: Vec<u8>,
    offer_out: Vec<u8>,
    /// The offerer's SDP.
    o_sdp: SessionDescription,
    /// Index of the relayed audio stream in the offer (and in ours).
    index: usize,
    o_peer: PeerMedia,
    /// The source IP of the signaling that carried the offer (SPEC §5: a
    /// leg behind NAT latches from that IP only).
    o_signaling: IpAddr,
    /// The offerer's crypto (its sending key), if its side is SRTP.
    o_crypto: Option<Crypto>,
    /// What we offered the answering leg (our sending keys), if its side is
    /// SRTP.
    t_offer: Option<Vec<Crypto>>,
    /// Leg A's and leg B's ports, in that order.
    legs: [LegPorts; 2],
}

struct Running {
    /// Owns the sockets and ports: they are returned when the task ends.
    task: tokio::task::JoinHandle<()>,
    /// Stops the relay forwarding at once (the abort lands later).
    stop: StopSignal,
    /// The answer as it came and as we sent it on, to answer a repeated
    /// answer (183 then 200 with the same SDP) the same way.
    answer_in: Vec<u8>,
    answer_out: Vec<u8>,
}

enum State {
    Offered(Box<Pending>),
    Running(Running),
    /// The answerer rejected the audio: nothing to relay, nothing held.
    Rejected,
}

struct Call {
    state: State,
    stats: Arc<CallStats>,
    /// The relay that keeps the media flowing while a re-offer (re-INVITE,
    /// UPDATE) is pending; dropped when the new answer starts the new relay,
    /// restored by [`MediaEngine::cancel_offer`] when the re-offer fails.
    previous: Option<Running>,
    /// Whether leg A and leg B run SRTP, once an offer/answer completed: a
    /// re-offer from one leg keeps the other leg's profile.
    secure: [Option<bool>; 2],
}

impl Running {
    /// Ends the relay: it forwards nothing from now on, and its task (with
    /// its sockets and ports) goes when the runtime next gets to it.
    fn stop(&self) {
        self.stop.stop();
        self.task.abort();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let State::Running(r) = &self.state {
            r.stop();
        }
        if let Some(r) = &self.previous {
            r.stop();
        }
    }
}

/// One leg of a call, as the engine sees it: A is the caller's side, B the
/// route's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    A = 0,
    B = 1,
}

impl Leg {
    fn other(self) -> Leg {
        match self {
            Leg::A => Leg::B,
            Leg::B => Leg::A,
        }
    }
}

/// The media relay of the whole edge.
pub struct MediaEngine {
    cfg: MediaConfig,
    ports: PortAllocator,
    provider: Arc<dyn SrtpProvider>,
    calls: Mutex<HashMap<u64, Call>>,
    /// `[media] advertise_ip`: the address SDP names (1:1 NAT).
    advertise: Option<IpAddr>,
    /// Our address toward a peer, for SDP when `cfg.ip` is a wildcard.
    sources: Arc<crate::source::SourceIps>,
    /// Recorded calls' taps, from [`MediaEngine::record`] to `release`.
    taps: Mutex<HashMap<u64, crate::record::Tap>>,
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
            advertise: None,
            sources: Arc::new(crate::source::SourceIps::new()),
            taps: Mutex::new(HashMap::new()),
        }
    }

    /// SDP names `ip` (`[media] advertise_ip`, an edge behind 1:1 NAT)
    /// while the relay's sockets stay bound to `cfg.ip`.
    pub fn advertise(mut self, ip: Option<IpAddr>) -> Self {
        self.advertise = ip;
        self
    }

    /// Shares a source-address cache (see [`crate::source`]).
    pub fn with_sources(mut self, sources: Arc<crate::source::SourceIps>) -> Self {
        self.sources = sources;
        self
    }

    /// The address SDP names toward a leg whose signaling comes from
    /// `signaling`: `advertise_ip`, else the bound address, else (a
    /// wildcard bind) our source address toward that peer — never
    /// `0.0.0.0`, which a peer cannot send to.
    pub fn sdp_address(&self, signaling: IpAddr) -> IpAddr {
        if let Some(ip) = self.advertise {
            return ip;
        }
        if !self.cfg.ip.is_unspecified() {
            return self.cfg.ip;
        }
        self.sources.toward(signaling).unwrap_or(match self.cfg.ip {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        })
    }

    /// Records `call`: every relay it runs from now on hands its plaintext
    /// audio to `tap` (until [`MediaEngine::release`]).
    pub fn record(&self, call: u64, tap: crate::record::Tap) {
        self.taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(call, tap);
    }

    /// Stops handing `call`'s audio to its tap (relays already running keep
    /// their clone until they stop).
    pub fn unrecord(&self, call: u64) {
        let tap = self
            .taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call);
        drop(tap);
    }

    fn tap(&self, call: u64) -> Option<crate::record::Tap> {
        self.taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&call)
            .cloned()
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts or replaces a call's entry, and updates the sessions gauge.
    fn put(&self, call: u64, entry: Call) {
        let mut calls = self.calls();
        calls.insert(call, entry);
        sessions_gauge(calls.len());
    }

    fn bind_leg(&self) -> Result<LegPorts, MediaError> {
        // A pair whose ports are still held by someone else is skipped (it
        // goes back to the end of the free list).
        // Another process (a second edge, an RTP tool) may hold ports of our
        // range: try well past a few such pairs before calling it exhaustion.
        // Pairs found held go to the back of the free list, so each costs
        // one failed bind(2), once per pass over the range. Another edge on
        // the same range keeps its ended calls' sockets bound (the pool of
        // `ports`), which can be hundreds of pairs at the range's start.
        let mut last = None;
        for _ in 0..self.ports.capacity().clamp(64, 4096) {
            let pair = match warm_leg(self.ports.allocate().ok_or(MediaError::Ports)?) {
                Ok(legs) => return Ok(legs),
                Err(pair) => pair,
            };
            match self.bind_pair(pair) {
                Ok(legs) => return Ok(legs),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                // Out of file descriptors (EMFILE/ENFILE) or memory: another
                // pair would fail the same way. Retrying cost 128 socket(2)
                // calls per refused call, and under overload that spiral
                // collapsed the edge (the CPS profile: 75 % of its CPU in
                // socket creation that failed). Sockets pooled from ended
                // calls need no new descriptor.
                Err(e) => {
                    while let Some(pair) = self.ports.allocate_warm() {
                        if let Ok(legs) = warm_leg(pair) {
                            return Ok(legs);
                        }
                    }
                    return Err(MediaError::Bind(e));
                }
            }
        }
        Err(last.map_or(MediaError::Ports, MediaError::Bind))
    }

    fn bind_pair(&self, pair: PortPair) -> std::io::Result<LegPorts> {
        let bind = |port| {
            let s = StdUdpSocket::bind(SocketAddr::new(self.cfg.ip, port))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        };
        let rtp = bind(pair.rtp())?;
        let rtcp = bind(pair.rtcp())?;
        Ok(LegPorts { rtp, rtcp, pair })
    }

    /// Leg A's offer: allocates both legs' ports and returns the SDP to send
    /// to leg B (in `profile_b`; for SRTP, fresh keys for every suite we
    /// support). A second offer for the same call (re-INVITE) replaces the
    /// first: new ports, new keys. The same as
    /// `offer_from(call, Leg::A, offer_from_a, [Profile::Auto, profile_b], signaling)`.
    pub fn offer(
        &self,
        call: u64,
        offer_from_a: &[u8],
        profile_b: Profile,
        signaling: IpAddr,
    ) -> Result<Vec<u8>, MediaError> {
        self.offer_from(
            call,
            Leg::A,
            offer_from_a,
            [Profile::Auto, profile_b],
            signaling,
        )
    }

    /// An offer from leg `from`; returns the offer for the other leg, with
    /// the edge's address and freshly allocated ports for both legs. The
    /// answer ([`MediaEngine::answer`]) comes from the other leg.
    ///
    /// Profiles (SPEC §5), `profiles = [leg A's, leg B's]`: leg B's is the
    /// route's; leg A's is `rtp` where the SDES rule keeps keys off its
    /// signaling (cleartext SIP without `sdes_over_cleartext`), else `auto`.
    /// - The offerer's offer must be in its profile (`auto` takes either),
    ///   otherwise it is not acceptable: a route that demands SRTP toward
    ///   the destination is never served in clear, nor keys sent where the
    ///   SDES rule forbids them.
    /// - Leg B is offered its profile; `auto` means the profile of A's offer
    ///   (as before: "whatever the offer used").
    /// - Leg A is offered its profile; `auto` means the profile it already
    ///   runs when the call has media (a re-offer from B does not switch the
    ///   caller between RTP/AVP and RTP/SAVP), else, in a late offer, the
    ///   profile of B's offer: the caller did not say what it wants, and
    ///   mirroring means an RTP/SAVP destination gets an RTP/SAVP caller leg
    ///   and a plain one a plain one. RTP/SAVP on a leg means SRTP with SDES
    ///   keys in that leg's SDP, our own fresh keys (a leg never sees the
    ///   other leg's key); RTP/AVP means plain RTP, which the relay
    ///   encrypts or decrypts on the way to an SRTP leg.
    ///
    /// `signaling` is the source IP of the request or response that carried
    /// the offer: the offering leg's media latches per [`crate::latch`]
    /// (strict to its SDP address; from that IP only where it is behind NAT).
    ///
    /// A repeated offer (the same bytes, from the same leg, still
    /// unanswered) gets the same rewrite. A different offer replaces a
    /// pending one (its ports return); a running relay keeps serving until
    /// the new answer.
    pub fn offer_from(
        &self,
        call: u64,
        from: Leg,
        offer: &[u8],
        profiles: [Profile; 2],
        signaling: IpAddr,
    ) -> Result<Vec<u8>, MediaError> {
        if let Some(Call {
            state: State::Offered(p),
            ..
        }) = self.calls().get(&call)
        {
            if p.offerer == from && p.offer_in == offer {
                return Ok(p.offer_out.clone());
            }
        }
        let o_sdp = SessionDescription::parse(offer)?;
        let index = o_sdp
            .media
            .iter()
            .position(|m| m.is_rtp_audio() && m.port != 0)
            .ok_or(MediaError::NoAudio)?;
        let o_media = &o_sdp.media[index];
        let o_crypto = if o_media.is_secure() {
            Some(
                o_media
                    .cryptos()
                    .into_iter()
                    .next()
                    .ok_or(MediaError::NoCrypto)?,
            )
        } else {
            None
        };
        let o_secure = o_crypto.is_some();
        let known = self.calls().get(&call).map_or([None, None], |c| c.secure);
        let to = from.other();
        match (profiles[from as usize], o_secure) {
            (Profile::Srtp, false) => {
                return Err(MediaError::Profile("RTP/AVP offered on an srtp leg"))
            }
            (Profile::Rtp, true) => {
                return Err(MediaError::Profile("RTP/SAVP offered on an rtp leg"))
            }
            _ => {}
        }
        let t_secure = match (profiles[to as usize], to) {
            (Profile::Rtp, _) => false,
            (Profile::Srtp, _) => true,
            (Profile::Auto, Leg::B) => o_secure,
            (Profile::Auto, Leg::A) => known[Leg::A as usize].unwrap_or(o_secure),
        };
        let o_peer = peer_media(&o_sdp, index);

        // A running relay keeps serving until the new answer (a re-offer may
        // still fail); a pending offer is replaced and its ports return.
        let previous = self.take(call).and_then(|mut c| {
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
                    self.put(
                        call,
                        Call {
                            state: State::Running(r),
                            stats: Arc::new(CallStats::new(Instant::now())),
                            previous: None,
                            secure: known,
                        },
                    );
                }
                return Err(e);
            }
        };

        let mut t_sdp = o_sdp.clone();
        t_sdp.set_address(self.sdp_address(signaling));
        strip_transport(&mut t_sdp.session);
        let t_offer = if t_secure {
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
        let ports = &legs[to as usize].pair;
        for (i, m) in t_sdp.media.iter_mut().enumerate() {
            if i != index {
                m.reject();
                continue;
            }
            m.port = ports.rtp();
            m.port_count = None;
            m.set_secure(t_secure);
            strip_transport(&mut m.lines);
            m.push_attribute(format!("rtcp:{}", ports.rtcp()));
            if o_peer.mux {
                m.push_attribute("rtcp-mux");
            }
            for c in t_offer.iter().flatten() {
                m.push_attribute(c.to_attribute());
            }
        }
        let out = t_sdp.to_bytes();
        let stats = Arc::new(CallStats::new(Instant::now()));
        self.put(
            call,
            Call {
                state: State::Offered(Box::new(Pending {
                    offerer: from,
                    offer_in: offer.to_vec(),
                    offer_out: out.clone(),
                    o_sdp,
                    index,
                    o_peer,
                    o_signaling: signaling,
                    o_crypto,
                    t_offer,
                    legs,
                })),
                stats,
                previous,
                secure: known,
            },
        );
        Ok(out)
    }

    /// The answer to the pending offer, from the leg that received it
    /// (leg B for an offer from A, leg A for an offer from B): returns the
    /// answer for the offering leg (in the profile it offered) and starts
    /// relaying. If the answerer rejected the audio, so does the answer we
    /// return, and the offer's ports are released. `signaling` is the source
    /// IP of the response or ACK that carried the answer (see
    /// [`MediaEngine::offer_from`]).
    pub fn answer(
        &self,
        call: u64,
        answer: &[u8],
        signaling: IpAddr,
    ) -> Result<Vec<u8>, MediaError> {
        let t_sdp = SessionDescription::parse(answer)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MediaError::NoRuntime)?;
        let mut calls = self.calls();
        let entry = calls.get_mut(&call).ok_or(MediaError::UnknownCall)?;
        let pending = match &entry.state {
            State::Offered(p) => p,
            State::Running(r) if r.answer_in == answer => return Ok(r.answer_out.clone()),
            State::Running(_) => {
                return Err(MediaError::Answer(
                    "a different answer for a running call: re-offer first",
                ))
            }
            State::Rejected => return Err(MediaError::UnknownCall),
        };
        let index = pending.index;
        let (offerer, answerer) = (pending.offerer, pending.offerer.other());
        if t_sdp.media.len() != pending.o_sdp.media.len() {
            return Err(MediaError::Answer(
                "number of m= lines differs from the offer",
            ));
        }
        let t_media = &t_sdp.media[index];

        // The answer to the offerer: the answerer's (codecs, direction) with
        // our transport.
        let mut o_answer = t_sdp.clone();
        o_answer.set_address(self.sdp_address(pending.o_signaling));
        strip_transport(&mut o_answer.session);
        for (i, m) in o_answer.media.iter_mut().enumerate() {
            let offered = &pending.o_sdp.media[i];
            if i != index || m.port == 0 {
                *m = Media {
                    lines: Vec::new(),
                    ..offered.clone()
                };
                m.reject();
            }
        }
        if t_media.port == 0 {
            entry.state = State::Rejected; // drops the pending legs' sockets and ports
            if let Some(r) = entry.previous.take() {
                r.stop();
            }
            return Ok(o_answer.to_bytes());
        }

        // The answerer's keys: one of those we offered it, and its own.
        let t_keys = match (&pending.t_offer, t_media.is_secure()) {
            (None, false) => None,
            (Some(offered), true) => {
                let (ours, chosen) = t_media
                    .cryptos()
                    .into_iter()
                    .find_map(|c| {
                        offered
                            .iter()
                            .find(|o| o.tag == c.tag && o.suite == c.suite)
                            .map(|o| (o.clone(), c))
                    })
                    .ok_or(MediaError::Answer("no a=crypto matching one we offered"))?;
                Some((ours, chosen))
            }
            (Some(_), false) => return Err(MediaError::Answer("RTP/AVP answer to RTP/SAVP offer")),
            (None, true) => return Err(MediaError::Answer("RTP/SAVP answer to RTP/AVP offer")),
        };
        // The offerer's keys: its offered key, and a fresh one of ours.
        let o_keys = match &pending.o_crypto {
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
        let secure = {
            let mut s = [None, None];
            s[offerer as usize] = Some(o_keys.is_some());
            s[answerer as usize] = Some(t_keys.is_some());
            s
        };
        let t_peer = PeerMedia {
            mux: t_media.rtcp_mux() && pending.o_peer.mux,
            ..peer_media(&t_sdp, index)
        };
        {
            let m = &mut o_answer.media[index];
            let offered = &pending.o_sdp.media[index];
            let ports = &pending.legs[offerer as usize].pair;
            m.port = ports.rtp();
            m.port_count = None;
            m.proto = offered.proto.clone();
            strip_transport(&mut m.lines);
            // With rtcp-mux (RFC 5761 §5.1.3) RTCP goes to the RTP port.
            if pending.o_peer.mux {
                m.push_attribute(format!("rtcp:{}", ports.rtp()));
                m.push_attribute("rtcp-mux");
            } else {
                m.push_attribute(format!("rtcp:{}", ports.rtcp()));
            }
            if let Some((ours, _)) = &o_keys {
                m.push_attribute(ours.to_attribute());
            }
        }

        let started = Instant::now();
        let side = |peer: PeerMedia,
                    signaling: IpAddr,
                    keys: Option<(Crypto, Crypto)>|
         -> Result<Side, MediaError> {
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
                rtp_latch: Latch::for_leg(peer.rtp, Some(signaling), started),
                rtcp_latch: Latch::for_leg(
                    if peer.mux { peer.rtp } else { peer.rtcp },
                    Some(signaling),
                    started,
                ),
                mux: peer.mux,
                rx,
                tx,
            })
        };
        let o_side = side(pending.o_peer, pending.o_signaling, o_keys)?;
        let t_side = side(t_peer, signaling, t_keys)?;
        let sides = match offerer {
            Leg::A => [o_side, t_side],
            Leg::B => [t_side, o_side],
        };

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
        entry.secure = secure;
        let stop = StopSignal::default();
        let relay = Relay {
            sides,
            stats: entry.stats.clone(),
            stop: stop.clone(),
            tap: self.tap(call),
        };
        if let Some(r) = entry.previous.take() {
            r.stop(); // the new relay takes over
        }
        let task = runtime.spawn(relay::run(relay, [sa, sb]));
        let o_answer = o_answer.to_bytes();
        entry.state = State::Running(Running {
            task,
            stop,
            answer_in: answer.to_vec(),
            answer_out: o_answer.clone(),
        });
        Ok(o_answer)
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
        self.unrecord(call);
        drop(self.take(call));
    }

    /// Removes a call's entry (the caller drops it after the lock is
    /// released), and updates the sessions gauge.
    fn take(&self, call: u64) -> Option<Call> {
        let mut calls = self.calls();
        let removed = calls.remove(&call);
        sessions_gauge(calls.len());
        removed
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

/// `tollgate_media_sessions`: calls with media state in the engine (one
/// engine per process).
fn sessions_gauge(n: usize) {
    metrics::gauge!("tollgate_media_sessions").set(n as f64);
}

/// Drops the transport attributes (`a=rtcp`, `a=crypto`, ...) the edge
/// replaces with its own.
pub(crate) fn strip_transport(lines: &mut Vec<crate::sdp::Line>) {
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

    /// Every test peer signals from loopback.
    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

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
        e.offer(7, offer, Profile::Auto, LO).unwrap();
        let first = e.answer(7, answer, LO).unwrap();
        assert_eq!(e.ports_in_use(), 4);
        // Re-offer: the old relay keeps its ports while the new ones wait.
        let re = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5100 RTP/AVP 0\r\n";
        e.offer(7, re, Profile::Auto, LO).unwrap();
        assert_eq!(e.ports_in_use(), 8);
        e.cancel_offer(7);
        assert_eq!(e.ports_in_use(), 4, "the re-offer's ports return at once");
        // The restored relay still answers a repeated answer the same way.
        assert_eq!(e.answer(7, answer, LO).unwrap(), first);
        // A re-offer that is answered replaces the relay.
        e.offer(7, re, Profile::Auto, LO).unwrap();
        let second = e.answer(
            7,
            b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6100 RTP/AVP 0\r\n",
            LO,
        );
        assert_ne!(second.unwrap(), first, "new ports in the new answer");
        ports_settle(&e, 4).await;
        e.release(7);
        ports_settle(&e, 0).await;
    }

    fn engine(lo: u16) -> MediaEngine {
        MediaEngine::new(MediaConfig {
            ip: "127.0.0.1".parse().unwrap(),
            ports: (lo, lo + 39),
            timeout: Duration::from_secs(30),
        })
    }

    fn sdp(port: u16, proto: &str, extra: &str) -> Vec<u8> {
        format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\n{extra}"
        )
        .into_bytes()
    }

    const CRYPTO: &str =
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n";

    fn port_of(sdp: &[u8]) -> u16 {
        let s = SessionDescription::parse(sdp).unwrap();
        s.media[0].port
    }

    fn proto_of(sdp: &[u8]) -> String {
        SessionDescription::parse(sdp).unwrap().media[0]
            .proto
            .clone()
    }

    async fn udp() -> tokio::net::UdpSocket {
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xbe, 0xef];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0xd5; 160]);
        p
    }

    /// `from` sends an RTP packet to the edge's `port`; `to` must receive
    /// it, from the edge's `via` port (never from `from` directly).
    async fn relayed(
        from: &tokio::net::UdpSocket,
        port: u16,
        to: &tokio::net::UdpSocket,
        via: u16,
        seq: u16,
    ) {
        let pkt = rtp(seq);
        from.send_to(&pkt, ("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, src) = tokio::time::timeout(Duration::from_secs(5), to.recv_from(&mut buf))
            .await
            .expect("relayed within 5 s")
            .unwrap();
        assert_eq!(&buf[..n], &pkt[..]);
        assert_eq!(src.port(), via, "relayed from the edge's own port");
    }

    #[tokio::test]
    async fn an_offer_from_leg_b_is_anchored_toward_a_and_answered_back() {
        let e = engine(31860);
        let (ua, ub) = (udp().await, udp().await);
        let (pa, pb) = (
            ua.local_addr().unwrap().port(),
            ub.local_addr().unwrap().port(),
        );
        // Late offer: B's offer in its 18x and again in its 200.
        let b_offer = sdp(pb, "RTP/AVP", "a=sendrecv\r\n");
        let to_a = e
            .offer_from(1, Leg::B, &b_offer, [Profile::Auto, Profile::Auto], LO)
            .unwrap();
        assert_eq!(
            e.offer_from(1, Leg::B, &b_offer, [Profile::Auto, Profile::Auto], LO)
                .unwrap(),
            to_a
        );
        assert_eq!(e.ports_in_use(), 4, "the repeat took no new ports");
        let text = String::from_utf8(to_a.clone()).unwrap();
        assert!(text.contains("c=IN IP4 127.0.0.1"), "{text}");
        assert!(text.contains("a=sendrecv"), "{text}");
        assert_eq!(proto_of(&to_a), "RTP/AVP");
        // A's answer (in its ACK) becomes the answer for B.
        let to_b = e.answer(1, &sdp(pa, "RTP/AVP", ""), LO).unwrap();
        let (edge_a, edge_b) = (port_of(&to_a), port_of(&to_b));
        assert_ne!(edge_a, edge_b);
        assert_ne!(edge_b, pb);
        relayed(&ua, edge_a, &ub, edge_b, 1).await;
        relayed(&ub, edge_b, &ua, edge_a, 2).await;
        e.release(1);
        ports_settle(&e, 0).await;
    }

    #[tokio::test]
    async fn a_re_offer_from_leg_b_re_anchors_and_a_failed_one_keeps_the_relay() {
        let e = engine(31900);
        let (ua, ub) = (udp().await, udp().await);
        let (pa, pb) = (
            ua.local_addr().unwrap().port(),
            ub.local_addr().unwrap().port(),
        );
        // An early-offer call: A offers, B answers.
        let to_b = e
            .offer(2, &sdp(pa, "RTP/AVP", ""), Profile::Auto, LO)
            .unwrap();
        let to_a = e.answer(2, &sdp(pb, "RTP/AVP", ""), LO).unwrap();
        let (a1, b1) = (port_of(&to_a), port_of(&to_b));
        relayed(&ua, a1, &ub, b1, 1).await;
        // B re-offers (a new port); A refuses: the old relay goes on.
        let ub2 = udp().await;
        let pb2 = ub2.local_addr().unwrap().port();
        e.offer_from(
            2,
            Leg::B,
            &sdp(pb2, "RTP/AVP", ""),
            [Profile::Auto, Profile::Auto],
            LO,
        )
        .unwrap();
        assert_eq!(e.ports_in_use(), 8);
        relayed(&ub, b1, &ua, a1, 2).await;
        e.cancel_offer(2);
        assert_eq!(e.ports_in_use(), 4);
        relayed(&ua, a1, &ub, b1, 3).await;
        // B re-offers again; A answers: media moves to the new ports.
        let to_a2 = e
            .offer_from(
                2,
                Leg::B,
                &sdp(pb2, "RTP/AVP", ""),
                [Profile::Auto, Profile::Auto],
                LO,
            )
            .unwrap();
        let to_b2 = e.answer(2, &sdp(pa, "RTP/AVP", ""), LO).unwrap();
        let (a2, b2) = (port_of(&to_a2), port_of(&to_b2));
        assert!(a2 != a1 && b2 != b1, "new ports for the new session");
        relayed(&ua, a2, &ub2, b2, 4).await;
        relayed(&ub2, b2, &ua, a2, 5).await;
        ports_settle(&e, 4).await;
        e.release(2);
        ports_settle(&e, 0).await;
    }

    #[tokio::test]
    async fn leg_b_offers_follow_the_route_profile_and_a_keeps_its_own() {
        let e = engine(31940);
        let avp = sdp(4000, "RTP/AVP", "");
        let savp = sdp(4000, "RTP/SAVP", CRYPTO);
        // The route's profile is leg B's, whoever offers.
        let err = e
            .offer_from(3, Leg::B, &avp, [Profile::Auto, Profile::Srtp], LO)
            .unwrap_err();
        assert!(matches!(err, MediaError::Profile(_)) && err.is_not_acceptable());
        let err = e
            .offer_from(3, Leg::B, &savp, [Profile::Auto, Profile::Rtp], LO)
            .unwrap_err();
        assert!(matches!(err, MediaError::Profile(_)));
        assert_eq!(e.ports_in_use(), 0);
        // A late offer: A is offered B's profile, with our own keys.
        let to_a = e
            .offer_from(3, Leg::B, &savp, [Profile::Auto, Profile::Srtp], LO)
            .unwrap();
        assert_eq!(proto_of(&to_a), "RTP/SAVP");
        let text = String::from_utf8(to_a.clone()).unwrap();
        assert!(
            !text.contains("WVNfX19zZW1jdGwg"),
            "B's key never reaches A"
        );
        assert!(text.contains("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"));
        // An RTP/AVP answer to it is not acceptable.
        assert!(e.answer(3, &avp, LO).unwrap_err().is_not_acceptable());
        e.release(3);
        // Where the SDES rule makes leg A `rtp`: B's SRTP offer reaches A as
        // plain RTP (no keys in A's SDP), and A may not offer keys itself.
        let to_a = e
            .offer_from(5, Leg::B, &savp, [Profile::Rtp, Profile::Srtp], LO)
            .unwrap();
        assert_eq!(proto_of(&to_a), "RTP/AVP");
        assert!(!String::from_utf8(to_a).unwrap().contains("a=crypto"));
        e.release(5);
        let err = e
            .offer_from(6, Leg::A, &savp, [Profile::Rtp, Profile::Auto], LO)
            .unwrap_err();
        assert!(matches!(err, MediaError::Profile(_)));
        // Once A runs RTP/AVP, a re-offer from B does not switch it.
        e.offer(4, &avp, Profile::Srtp, LO).unwrap();
        let b_answer = sdp(4002, "RTP/SAVP", CRYPTO);
        // (B answers with the tag we offered first.)
        e.answer(4, &b_answer, LO).unwrap();
        let to_a = e
            .offer_from(4, Leg::B, &savp, [Profile::Auto, Profile::Srtp], LO)
            .unwrap();
        assert_eq!(proto_of(&to_a), "RTP/AVP");
        assert!(!String::from_utf8(to_a).unwrap().contains("a=crypto"));
        e.release(4);
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
        e.offer(1, offer, Profile::Auto, LO).unwrap();
        assert_eq!(e.ports_in_use(), 4);
        let answer = b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 6000 RTP/AVP 0\r\n";
        assert!(matches!(
            e.answer(1, answer, LO),
            Err(MediaError::NoRuntime)
        ));
        e.release(1);
        assert_eq!(e.ports_in_use(), 0, "an unanswered call frees at once");
    }
}
