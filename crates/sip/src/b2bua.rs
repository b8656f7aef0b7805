//! The back-to-back user agent (RFC 3261 §6 "B2BUA", RFC 7092): every admitted
//! INVITE becomes a [`Call`] of two [`Leg`]s, each its own dialog. Leg A is the
//! authenticated sender, leg B the route's destination. Sans-IO like the
//! transaction layer beneath it: the driver feeds messages and time in and
//! takes [`Transmit`]s out.

use crate::core_metrics::CoreMetrics;
use crate::local_addr::{own_address, NoRoute, SourceRoute};
use crate::lockout::{Lockout, LockoutConfig};
use crate::message::{
    self, header_user, name_addr_uri, reason_phrase, response_to, Header, Message, SipUri,
    StartLine,
};
use crate::route::{OutboundAuth, Target};
use crate::transaction::{
    Peer, RequestMatch, TimerConfig, Transmit, Transport, TxnEvent, TxnKey, TxnLayer,
};
mod attempt;
mod ping;

use bytes::Bytes;
use ring::rand::SecureRandom;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_keys::credential::{
    AuthConfig, Authenticator, DigestBySource, InviteView, Outcome, Principal,
};
use tollgate_keys::digest::Algorithm;
use tollgate_keys::number::{Dest, NumberPlan, Prefix};
use tollgate_keys::replay::ReplayCache;
use tollgate_keys::store::KeyStore;

/// Methods this edge relays inside a dialog or answers itself.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO";
/// `Retry-After` (seconds) of the 503 an INVITE gets while shared state
/// (SPEC §8) is unreachable and `[state] on_unavailable = "refuse"`.
pub const STATE_RETRY_AFTER_SECS: u32 = 5;

/// Media profile of one side (SPEC §5). Carried through the route table now;
/// the media relay acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaProfile {
    Rtp,
    Srtp,
    Auto,
}

/// Where leg B of a call goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// Matches the token's `model` claim; `None` is a default route.
    pub model: Option<String>,
    /// Matches canonical destinations starting with it (SPEC §4a, §9);
    /// the longest matching prefix wins ([`crate::route::pick`]).
    pub prefix: Option<Prefix>,
    /// The target SIP URI (its host must be an IP literal; names are resolved
    /// by the binary before the route reaches here).
    pub target: SipUri,
    pub target_text: String,
    pub peer: Peer,
    pub media: MediaProfile,
    /// SDES keys (`a=crypto`) may cross cleartext (UDP/TCP) signaling on
    /// this route's calls, either leg (default false; see [`sdes_allowed`]).
    pub sdes_over_cleartext: bool,
    /// Digest credentials answering a carrier's 401/407 on leg B.
    pub auth: Option<Arc<OutboundAuth>>,
    /// Every target of the route, the first being `target` (SPEC §9: the
    /// next is tried on a 408, a 5xx or no answer). Empty: `target` alone.
    pub targets: Vec<Target>,
    /// OPTIONS pings toward each target this often (by shard 0).
    pub ping_interval: Option<Duration>,
}

/// The SDES rule: SDES keys (`a=crypto`, RFC 4568) are only exchanged with a
/// side whose signaling is TLS, unless the route allows cleartext.
pub fn sdes_allowed(transport: Transport, route: &Route) -> bool {
    transport == Transport::Tls || route.sdes_over_cleartext
}

/// Leg B's media profile under the SDES rule: toward a cleartext target,
/// `auto` becomes `rtp` (leg A's SRTP is still terminated at the edge) and
/// `srtp` is refused with 500 (the binary refuses such a route at start).
pub fn leg_b_profile(route: &Route) -> Result<MediaProfile, u16> {
    if sdes_allowed(route.peer.transport, route) {
        return Ok(route.media);
    }
    match route.media {
        MediaProfile::Srtp => Err(500),
        MediaProfile::Auto | MediaProfile::Rtp => Ok(MediaProfile::Rtp),
    }
}

/// Whether an SDP body carries SDES keys.
pub fn sdp_has_sdes(sdp: &[u8]) -> bool {
    sdp.split(|b| *b == b'\n')
        .any(|l| l.trim_ascii_start().starts_with(b"a=crypto:"))
}

/// Settings of the B2BUA.
#[derive(Debug, Clone)]
pub struct Config {
    pub realm: String,
    pub digest_algorithms: Vec<Algorithm>,
    pub nonce_lifetime_secs: u64,
    /// `[sip] bearer_challenge`: a credential-less INVITE's 401 offers
    /// `Bearer realm=…` too, not only Digest (SPEC §4; default false).
    pub bearer_challenge: bool,
    /// `[[sip.digest_by_source]]`: another digest offer for some sources.
    pub digest_by_source: Vec<DigestBySource>,
    pub timers: TimerConfig,
    /// Leg B gave no final answer in this time: CANCEL it and answer 408.
    pub invite_timeout: Duration,
    /// The edge's own address per transport, for Via and Contact (a
    /// wildcard is replaced per peer, see [`crate::local_addr`]).
    pub local: HashMap<Transport, SocketAddr>,
    /// `[sip] advertise`: the address named in Via, Contact and From in
    /// place of the bound one (an edge behind 1:1 NAT).
    pub advertise: Option<IpAddr>,
    /// `[sip] max_message_bytes`: larger messages get `513` (requests) or
    /// are dropped (responses, ACK).
    pub max_message_bytes: usize,
    pub routes: Vec<Route>,
    /// How numbers are canonicalized (`[numbers]`, SPEC §4a).
    pub numbers: NumberPlan,
    /// The edge-wide deny list is on: a destination that is a number
    /// attempt but no number gets `484` (SPEC §4).
    pub checks_numbers: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// One dialog of a call, seen from the edge.
#[derive(Debug, Clone)]
pub struct Leg {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: Option<String>,
    /// Our own URI (From on requests we send on this leg).
    pub local_uri: String,
    pub remote_uri: String,
    /// Request-URI for in-dialog requests (the peer's Contact).
    pub remote_target: String,
    pub route_set: Vec<String>,
    /// Where in-dialog requests go: the source of leg A, the route of leg B.
    pub peer: Peer,
    pub local_cseq: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Leg B is being tried.
    Setup,
    /// Leg A cancelled; waiting for leg B to end.
    Cancelled,
    Confirmed,
    Terminating,
}

/// Why a call ended (for CDRs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    Completed,
    Cancelled,
    Rejected(u16),
    Timeout,
    NoAck,
    Shutdown,
    /// The key's daily budget or the token's `max_duration` ran out.
    LimitReached,
    /// Hung up through the admin API.
    Admin,
    /// No media for the configured time (SPEC §5).
    MediaTimeout,
    /// The SDP offer/answer exchange failed after a 2xx (RFC 3264): an ACK
    /// without the answer to a late offer, an answer or offer the media
    /// relay cannot serve. Both legs got a BYE.
    OfferAnswerFailed,
    /// The call's media stream to an AI backend (SPEC §10) failed or closed.
    Stream(StreamEnd),
}

/// Why a media stream (SPEC §10) ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The backend did not complete the connection in time.
    ConnectTimeout,
    /// TCP connection refused or unreachable, or the name did not resolve.
    ConnectFailed,
    /// The address is not allowed (`[streams] allow_cidrs`).
    NotPermitted,
    /// The TLS handshake failed (certificate, name, protocol).
    TlsFailed,
    /// The backend answered the upgrade with something else than 101.
    Rejected,
    /// The backend closed the WebSocket (or the connection dropped).
    Closed,
    /// The backend sent something outside the message set.
    ProtocolError,
}

impl StreamEnd {
    pub fn label(self) -> &'static str {
        match self {
            StreamEnd::ConnectTimeout => "stream_connect_timeout",
            StreamEnd::ConnectFailed => "stream_connect_failed",
            StreamEnd::NotPermitted => "stream_not_permitted",
            StreamEnd::TlsFailed => "stream_tls_failed",
            StreamEnd::Rejected => "stream_rejected",
            StreamEnd::Closed => "stream_closed",
            StreamEnd::ProtocolError => "stream_protocol_error",
        }
    }
}

impl EndCause {
    pub fn label(self) -> &'static str {
        match self {
            EndCause::Completed => "completed",
            EndCause::Cancelled => "cancelled",
            EndCause::Rejected(_) => "rejected",
            EndCause::Timeout => "timeout",
            EndCause::NoAck => "no_ack",
            EndCause::Shutdown => "shutdown",
            EndCause::LimitReached => "limit_reached",
            EndCause::Admin => "admin",
            EndCause::MediaTimeout => "media_timeout",
            EndCause::OfferAnswerFailed => "offer_answer_failed",
            EndCause::Stream(s) => s.label(),
        }
    }
}

/// What a client transaction of a call is for.
#[derive(Debug, Clone)]
enum Purpose {
    InviteB,
    CancelB,
    Bye,
    /// An in-dialog request relayed from `from`, answered on `server`.
    Relay {
        from: Side,
        server: TxnKey,
        /// The request carried a new SDP offer that the media relay rewrote:
        /// the answer must go through it too.
        reoffer: bool,
        /// An anchored re-INVITE without SDP: the 2xx carries the other
        /// side's offer, the ACK the answer (RFC 3261 §14.1).
        late: bool,
    },
}

#[derive(Debug)]
struct PendingAck {
    /// The side that must ACK (the sender of the INVITE we answered 2xx to).
    from: Side,
    server: TxnKey,
    /// The CSeq of the INVITE we sent on the other side, to ACK its 2xx.
    other_cseq: u32,
    /// Set once the other side's 2xx arrived (its Contact/tag are known).
    other_answered: bool,
    /// The 2xx we relayed carried the other side's offer (late offer): the
    /// ACK must carry the answer, which the media relay rewrites.
    answer_expected: bool,
    /// That offer as the other side sent it: if no usable answer comes, its
    /// ACK carries one rejecting every stream before the BYE.
    offer: Bytes,
}

/// A call: two legs and their bookkeeping.
#[derive(Debug)]
pub struct Call {
    pub id: u64,
    pub a: Leg,
    pub b: Leg,
    pub state: CallState,
    pub key_id: String,
    /// Leg B's media profile, from the route the call took (kept with the
    /// call: a SIGHUP may replace the routes while it is up).
    pub route_media: MediaProfile,
    pub created: Instant,
    pub created_unix: i64,
    pub answered: Option<Instant>,
    pub caller: String,
    pub called: String,
    /// The token's `max_duration`, if any.
    max_duration: Option<u64>,
    /// When `max_duration` runs out, once answered.
    max_until: Option<Instant>,
    /// Leg A's INVITE had no SDP and media is anchored: leg B's offer comes
    /// in its 18x/2xx, leg A's answer in the ACK.
    late_offer: bool,
    /// Leg A's media profile: `rtp` when SDES keys may not cross its
    /// signaling (the SDES rule, [`sdes_allowed`]), else `auto` (what it
    /// offers; in a late offer, the profile leg B offered).
    a_profile: MediaProfile,

    a_invite: TxnKey,
    b_invite_msg: Option<Message>,
    b_provisional: bool,
    cancel_pending: bool,
    pending_ack: Option<PendingAck>,
    /// ACK last sent on each side, resent when that side's 2xx is retransmitted.
    last_ack: [Option<(u32, Bytes)>; 2],
    /// In `Setup`: the INVITE timeout; in `Cancelled`: when to give up on
    /// leg B's final answer (RFC 3261 §9.1, 64*T1 after the CANCEL).
    deadline: Option<Instant>,
    /// Client transactions of this call (to forget them when it ends).
    clients: Vec<TxnKey>,
    /// What leg B may still try (digest answer, SPEC §9).
    attempts: attempt::Attempts,
}

impl Call {
    fn leg(&self, side: Side) -> &Leg {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
    fn leg_mut(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }
}

/// A refusal from the call policy: the status to answer leg A with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub code: u16,
    pub retry_after: Option<u32>,
}

/// What is known of a call when it ends (the CDR's raw material).
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// Unique across restarts: leg B's Call-ID.
    pub call_id: String,
    /// Leg A's Call-ID, as the caller knows the call.
    pub a_call_id: String,
    pub call: u64,
    pub key_id: String,
    pub from: String,
    pub to: String,
    pub start: i64,
    pub answer: Option<i64>,
    pub end: i64,
    /// Whole seconds from answer to end, rounded up.
    pub billable_secs: u64,
    pub cause: EndCause,
    /// The final status leg A got when the call was not answered.
    pub sip_code: Option<u16>,
}

impl CallRecord {
    /// A call admitted by the policy but refused before leg B was tried.
    #[allow(clippy::too_many_arguments)]
    fn refused(
        call_id: String,
        a_call_id: &str,
        call: u64,
        key_id: &str,
        from: String,
        to: String,
        unix: i64,
        code: u16,
    ) -> CallRecord {
        CallRecord {
            call_id,
            a_call_id: a_call_id.to_string(),
            call,
            key_id: key_id.to_string(),
            from,
            to,
            start: unix,
            answer: None,
            end: unix,
            billable_secs: 0,
            cause: EndCause::Rejected(code),
            sip_code: Some(code),
        }
    }
}

/// What the policy learns of an authenticated INVITE besides its key and
/// destination (webhooks, CDR correlation).
#[derive(Debug, Clone, Copy)]
pub struct AdmitInfo<'a> {
    /// Leg B's Call-ID: the call's id in CDRs and events.
    pub call_id: &'a str,
    /// Leg A's Call-ID, as the caller knows the call.
    pub a_call_id: &'a str,
    /// The caller, normalised.
    pub from: &'a str,
    /// The bearer token's `webhook` claim, if any (unchecked text).
    pub webhook: Option<&'a str>,
    /// The credential's single use, when the replay cache leaves it to the
    /// admission ([`tollgate_keys::ReplayCache::deferred`]): the policy must
    /// record it, and refuses a replay with `401` (answered as the
    /// credential check answers one).
    pub pending_use: Option<&'a tollgate_keys::PendingUse>,
    /// The bearer token's `record` claim is true (SPEC §10: record the call).
    pub record: bool,
}

/// Admission and accounting of calls, supplied by the binary (the trunk
/// allocator and the CDR store). Called synchronously on the signaling path,
/// so implementations must not block.
pub trait CallPolicy: Send {
    /// An authenticated INVITE, before leg B is tried.
    fn admit(
        &mut self,
        call: u64,
        key: &tollgate_keys::KeyRecord,
        destination: &Dest,
        info: &AdmitInfo<'_>,
        now: Instant,
        unix: i64,
    ) -> Result<(), Refused>;
    /// Leg B answered. Returns how many seconds the call may go on before
    /// its budget is looked at again ([`CallPolicy::budget_check`]): `None`
    /// without a budget, `Some(0)` when it is spent (the call is cut).
    fn answered(&mut self, call: u64, unix: i64) -> Option<u64>;
    /// The seconds [`CallPolicy::answered`] (or the last check) gave are up:
    /// how many more the call may go on (same meaning as there). Concurrent
    /// calls of a key share its budget this way, each taking a slice at a
    /// time, so none of them can spend what another is using.
    fn budget_check(&mut self, _call: u64, _unix: i64) -> Option<u64> {
        None
    }
    /// The call ended, however it ended; every admitted call gets exactly one.
    fn ended(&mut self, record: &CallRecord);
}

/// Admits everything and records nothing.
#[derive(Debug, Default)]
pub struct OpenPolicy;

impl CallPolicy for OpenPolicy {
    fn admit(
        &mut self,
        _: u64,
        _: &tollgate_keys::KeyRecord,
        _: &Dest,
        _: &AdmitInfo<'_>,
        _: Instant,
        _: i64,
    ) -> Result<(), Refused> {
        Ok(())
    }
    fn answered(&mut self, _: u64, _: i64) -> Option<u64> {
        None
    }
    fn ended(&mut self, _: &CallRecord) {}
}

/// Media anchoring, supplied by the binary (the media relay). The B2BUA hands
/// it SDP bodies; it knows nothing of SIP. Errors are the SIP status to
/// answer with (488 for SDP the relay cannot serve).
///
/// `signaling` (offer, answer, offer_from) is the source IP of the side whose
/// SDP it is: the source of the request that carried it, or the leg's peer
/// for a response or an ACK (leg A's INVITE source, leg B's route). The
/// media relay latches that side's media from that IP only (SPEC §5).
pub trait MediaHooks: Send {
    /// Leg A's offer; returns the offer for leg B (in `profile_b`).
    fn offer(
        &mut self,
        call: u64,
        sdp: &[u8],
        profile_b: MediaProfile,
        signaling: IpAddr,
    ) -> Result<Bytes, u16>;
    /// The answer to the pending offer, from the side that received it
    /// (leg B's 18x/2xx to leg A's offer; leg A's 2xx or ACK to leg B's);
    /// returns the answer for the side that offered.
    fn answer(&mut self, call: u64, sdp: &[u8], signaling: IpAddr) -> Result<Bytes, u16>;
    /// The call ended: every port back.
    fn release(&mut self, call: u64);
    /// Whether media is anchored (then in-dialog SDP cannot pass unchanged).
    fn anchors(&self) -> bool;
    /// A re-offer failed: the media as it was before it goes on.
    fn cancel_offer(&mut self, _call: u64) {}
    /// An offer from either side; returns the offer for the other side.
    /// Leg A's is [`MediaHooks::offer`]; leg B's comes in its 18x/2xx to an
    /// INVITE sent without SDP (late offer) or in a re-INVITE/UPDATE. The
    /// answer to it (from the other side) goes through
    /// [`MediaHooks::answer`] too. `profile_a` is leg A's profile (`rtp`
    /// where the SDES rule keeps keys off its signaling, else `auto`),
    /// `profile_b` leg B's from the route. Hooks that cannot anchor leg B's
    /// offers refuse them (488).
    fn offer_from(
        &mut self,
        call: u64,
        from: Side,
        sdp: &[u8],
        _profile_a: MediaProfile,
        profile_b: MediaProfile,
        signaling: IpAddr,
    ) -> Result<Bytes, u16> {
        match from {
            Side::A => self.offer(call, sdp, profile_b, signaling),
            Side::B => Err(488),
        }
    }
}

/// No anchoring: SDP passes through unchanged (tests of the signaling core).
#[derive(Debug, Default)]
pub struct PassThroughMedia;

impl MediaHooks for PassThroughMedia {
    fn offer(&mut self, _: u64, sdp: &[u8], _: MediaProfile, _: IpAddr) -> Result<Bytes, u16> {
        Ok(Bytes::copy_from_slice(sdp))
    }
    fn answer(&mut self, _: u64, sdp: &[u8], _: IpAddr) -> Result<Bytes, u16> {
        Ok(Bytes::copy_from_slice(sdp))
    }
    fn offer_from(
        &mut self,
        _: u64,
        _: Side,
        sdp: &[u8],
        _: MediaProfile,
        _: MediaProfile,
        _: IpAddr,
    ) -> Result<Bytes, u16> {
        Ok(Bytes::copy_from_slice(sdp))
    }
    fn release(&mut self, _: u64) {}
    fn anchors(&self) -> bool {
        false
    }
}

fn is_sdp(msg: &Message) -> bool {
    !msg.body.is_empty()
        && msg.header("Content-Type").is_some_and(|ct| {
            ct.trim()
                .get(..15)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/sdp"))
        })
}

/// An SDP answer rejecting every stream of `offer` (RFC 3264 §6: as many
/// `m=` lines as the offer, each with port 0 and one of its formats), for the
/// ACK of a 2xx whose offer cannot be served: RFC 3261 §13.2.1 wants a valid
/// answer in that ACK before the BYE. None when the offer has no `m=` line.
fn rejecting_answer(offer: &[u8]) -> Option<(Bytes, Option<String>)> {
    let text = std::str::from_utf8(offer).ok()?;
    let mut out = String::from(
        "v=0\r\no=tollgate 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n",
    );
    let mut any = false;
    for line in text.lines() {
        let Some(m) = line.trim_end_matches('\r').strip_prefix("m=") else {
            continue;
        };
        let mut f = m.split_ascii_whitespace();
        let (Some(media), Some(_port), Some(proto)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let fmt = f.next().unwrap_or("0");
        out.push_str(&format!("m={media} 0 {proto} {fmt}\r\n"));
        any = true;
    }
    any.then(|| (Bytes::from(out), Some("application/sdp".to_string())))
}

/// Things the binary wants to know about (CDRs, trunks, media, webhooks).
#[derive(Debug, Clone)]
pub enum CallEvent {
    Started {
        call: u64,
        key_id: String,
        from: String,
        to: String,
    },
    Answered {
        call: u64,
    },
    Ended {
        call: u64,
        cause: EndCause,
    },
}

/// Entries held by a [`B2bua`], by table ([`B2bua::census`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Calls, in any state (setting up, confirmed, tearing down).
    pub calls: usize,
    /// SIP transactions, server and client, including completed ones that
    /// still absorb retransmissions.
    pub transactions: usize,
    /// Lookup entries pointing at calls: by leg A's dialog, by leg B's
    /// Call-ID, by client transaction.
    pub index: usize,
    /// Call deadlines queued (INVITE timeout, budget, max duration, CANCEL
    /// give-up), including those of ended calls not yet dropped.
    pub deadlines: usize,
}

impl Census {
    /// The tables' names, as the gauge's `table` label, with their counts.
    pub fn tables(&self) -> [(&'static str, usize); 4] {
        [
            ("calls", self.calls),
            ("transactions", self.transactions),
            ("index", self.index),
            ("deadlines", self.deadlines),
        ]
    }
}

/// The whole signaling core: transactions, calls, credential checks.
pub struct B2bua {
    cfg: Config,
    pub txn: TxnLayer,
    auth: Authenticator<dyn KeyStore, dyn ReplayCache>,
    /// Realm and digest settings, built once; only `now` changes per INVITE.
    auth_cfg: AuthConfig,
    calls: HashMap<u64, Call>,
    next_id: u64,
    /// This core's shard index and the number of shards (call ids are
    /// `k * count + index`; leg B Call-IDs carry the index).
    shard: (u64, u64),
    by_a: HashMap<(String, String), u64>,
    by_b: HashMap<String, u64>,
    by_client: HashMap<TxnKey, (u64, Purpose)>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    rng: ring::rand::SystemRandom,
    pub events: Vec<CallEvent>,
    draining: bool,
    policy: Box<dyn CallPolicy>,
    media: Box<dyn MediaHooks>,
    /// The latest `now` seen, for bookkeeping in places that have no `now`.
    clock: Instant,
    /// Sources that guessed credentials too often (SPEC §4), shared by the
    /// shards.
    lockout: Arc<Lockout>,
    /// OPTIONS pings toward route targets (SPEC §9).
    pinger: ping::Pinger,
    /// Which of the host's addresses is ours toward a peer, for a wildcard
    /// listener ([`crate::local_addr`]).
    source_route: Arc<dyn SourceRoute>,
    /// Per-call metric handles, registered once.
    metrics: CoreMetrics,
}

/// Below this many queued deadlines the heap is never compacted.
const COMPACT_DEADLINES_ABOVE: usize = 1024;

fn code_label(code: u16) -> String {
    code.to_string()
}

impl B2bua {
    pub fn new(
        cfg: Config,
        keys: Arc<dyn KeyStore>,
        replay: Arc<dyn ReplayCache>,
        nonce_secret: [u8; 32],
    ) -> Self {
        // Present in /metrics from the start, not only after the first call.
        metrics::gauge!("tollgate_calls_active").set(0.0);
        let auth_cfg = AuthConfig {
            realm: cfg.realm.clone(),
            digest_algorithms: cfg.digest_algorithms.clone(),
            nonce_lifetime_secs: cfg.nonce_lifetime_secs,
            bearer_challenge: cfg.bearer_challenge,
            digest_by_source: cfg.digest_by_source.clone(),
            now: 0,
            numbers: cfg.numbers.clone(),
            edge_checks_numbers: cfg.checks_numbers,
        };
        Self {
            txn: TxnLayer::new(cfg.timers),
            cfg,
            auth: Authenticator::new(keys, replay, nonce_secret),
            auth_cfg,
            calls: HashMap::new(),
            next_id: 1,
            shard: (0, 1),
            by_a: HashMap::new(),
            by_b: HashMap::new(),
            by_client: HashMap::new(),
            deadlines: BinaryHeap::new(),
            rng: ring::rand::SystemRandom::new(),
            events: Vec::new(),
            draining: false,
            policy: Box::new(OpenPolicy),
            media: Box::new(PassThroughMedia),
            clock: Instant::now(),
            lockout: Arc::new(Lockout::new(LockoutConfig::default())),
            pinger: ping::Pinger::default(),
            source_route: Arc::new(NoRoute),
            metrics: CoreMetrics::default(),
        }
        .with_pings()
    }

    fn with_pings(mut self) -> Self {
        self.pinger.reset(&self.cfg.routes, self.clock);
        self
    }

    /// Asks `route` which address is ours toward a peer, where a listener
    /// is bound to a wildcard address.
    pub fn with_source_route(mut self, route: Arc<dyn SourceRoute>) -> Self {
        self.source_route = route;
        self
    }

    /// Shares `lockout` (one table for every shard of the edge).
    pub fn with_lockout(mut self, lockout: Arc<Lockout>) -> Self {
        self.lockout = lockout;
        self
    }

    /// Makes this core shard `index` of `count`: its call ids are
    /// `k * count + index` and its leg B Call-IDs end in `.<index>@tollgate`,
    /// which is how the driver routes a call's messages back to it.
    pub fn set_shard(&mut self, index: u64, count: u64) {
        let count = count.max(1);
        self.shard = (index % count, count);
        self.next_id = count + index % count;
    }

    /// Anchors every call's media through `media`.
    pub fn with_media(mut self, media: Box<dyn MediaHooks>) -> Self {
        self.media = media;
        self
    }

    /// Puts admission and accounting in the hands of `policy`.
    pub fn with_policy(mut self, policy: Box<dyn CallPolicy>) -> Self {
        self.policy = policy;
        self
    }

    pub fn calls_active(&self) -> usize {
        self.calls.len()
    }

    /// What this core holds, table by table: all of it must go back to zero
    /// once the calls and their transactions are over (the load test's leak
    /// check, and the `tollgate_sip_core_entries` gauge).
    pub fn census(&self) -> Census {
        let (servers, clients) = self.txn.len();
        Census {
            calls: self.calls.len(),
            transactions: servers + clients,
            index: self.by_a.len() + self.by_b.len() + self.by_client.len() + self.pinger.len(),
            deadlines: self.deadlines.len(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Replaces the routes (SIGHUP reload). Calls already up keep the route
    /// they took; new INVITEs use the new list.
    pub fn set_routes(&mut self, routes: Vec<Route>) {
        self.cfg.routes = routes;
        self.pinger.reset(&self.cfg.routes, self.clock);
    }

    /// Refuse new calls from now on (SIGTERM drain).
    pub fn set_draining(&mut self, on: bool) {
        self.draining = on;
    }

    fn token(&self, bytes: usize) -> String {
        let mut buf = [0u8; 16];
        let n = bytes.min(16);
        // SystemRandom only fails when the OS has no entropy source at all.
        if self.rng.fill(&mut buf[..n]).is_err() {
            buf[..8].copy_from_slice(&(self.next_id ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes());
        }
        hex::encode(&buf[..n])
    }

    fn branch(&self) -> String {
        format!("z9hG4bK{}", self.token(12))
    }

    /// Our address on transport `t` as named toward `toward` (never a
    /// wildcard: [`crate::local_addr`]).
    fn local(&self, t: Transport, toward: IpAddr) -> SocketAddr {
        let bound = self
            .cfg
            .local
            .get(&t)
            .or_else(|| self.cfg.local.values().next())
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)));
        own_address(bound, self.cfg.advertise, toward, &*self.source_route)
    }

    fn via(&self, t: Transport, branch: &str, toward: IpAddr) -> Header {
        let l = self.local(t, toward);
        Header {
            name: "Via".into(),
            value: format!("SIP/2.0/{} {};branch={branch};rport", t.via_name(), l),
        }
    }

    fn contact(&self, t: Transport, toward: IpAddr) -> Header {
        let l = self.local(t, toward);
        // TLS: a SIPS URI (RFC 5630; required in a response when the request
        // named one, RFC 3261 §12.1.1), not the deprecated transport=tls.
        let (scheme, tp) = match t {
            Transport::Udp => ("sip", ""),
            Transport::Tcp => ("sip", ";transport=tcp"),
            Transport::Tls => ("sips", ""),
        };
        Header {
            name: "Contact".into(),
            value: format!("<{scheme}:tollgate@{l}{tp}>"),
        }
    }

    /// Our Contact in a response to `req`: a SIPS URI over TLS only where
    /// the request used one (RFC 3261 §12.1.1); a `sip:` request over TLS
    /// gets `sip:...;transport=tls`, since stacks such as libre (baresip)
    /// end the call on a `sips:` Contact they did not ask for.
    fn contact_answering(&self, t: Transport, req: &Message, toward: IpAddr) -> Header {
        let sips = req
            .request_uri()
            .is_some_and(|u| u.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("sips:")));
        if t == Transport::Tls && !sips {
            Header {
                name: "Contact".into(),
                value: format!("<sip:tollgate@{};transport=tls>", self.local(t, toward)),
            }
        } else {
            self.contact(t, toward)
        }
    }

    fn send_stateless(&mut self, peer: &Peer, resp: Message) {
        if let Some(code) = resp.status() {
            self.metrics.response(code);
        }
        self.txn.out.push_back(Transmit {
            peer: peer.clone(),
            data: resp.to_bytes(),
        });
    }

    fn respond_txn(&mut self, now: Instant, key: &TxnKey, resp: &Message) {
        if let Some(code) = resp.status() {
            self.metrics.response(code);
        }
        self.txn.respond(now, key, resp);
    }

    fn reply(
        &mut self,
        now: Instant,
        key: &TxnKey,
        code: u16,
        extra: Vec<Header>,
        to_tag: Option<&str>,
    ) {
        let Some(req) = self.txn.server_request(key) else {
            return;
        };
        let mut resp = response_to(req, code, reason_phrase(code), to_tag);
        resp.headers.extend(extra);
        self.respond_txn(now, key, &resp);
    }

    /// A message from the network. `unix` is the wall clock in seconds (for
    /// token and nonce expiry).
    pub fn handle_datagram(&mut self, now: Instant, unix: i64, data: &[u8], peer: Peer) {
        if data.len() > self.cfg.max_message_bytes {
            return self.handle_oversized(data, &peer);
        }
        match message::parse(data) {
            Ok(msg) => self.handle_message(now, unix, msg, peer),
            Err(err) => {
                metrics::counter!("tollgate_sip_parse_errors_total").increment(1);
                tracing::debug!(%err, from = %peer.addr, "unreadable SIP message");
                self.bad_request(data, &peer, &err.to_string());
            }
        }
    }

    /// A stateless 400 for a request we cannot read, when enough of it is
    /// there to address a response (RFC 3261 §8.1.3.3 / §21.4.1).
    fn bad_request(&mut self, data: &[u8], peer: &Peer, why: &str) {
        let reason: String = why
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .collect();
        self.answer_unparsed(data, peer, 400, format!("Bad Request ({reason})"));
    }

    /// A message over `[sip] max_message_bytes` (a datagram, or a stream
    /// message whose head is `data`): a request gets a stateless `513
    /// Message Too Large` (RFC 3261 §21.5.14), without parsing more than
    /// its head; a response or an ACK is dropped.
    pub fn handle_oversized(&mut self, data: &[u8], peer: &Peer) {
        metrics::counter!("tollgate_sip_oversized_total").increment(1);
        tracing::debug!(len = data.len(), from = %peer.addr, "SIP message over max_message_bytes");
        self.answer_unparsed(data, peer, 513, reason_phrase(513).to_string());
    }

    /// A stateless answer to a request that was not parsed, built from the
    /// Via, From, To, Call-ID and CSeq lines of its head.
    fn answer_unparsed(&mut self, data: &[u8], peer: &Peer, code: u16, reason: String) {
        if data.starts_with(b"SIP/") || data.iter().all(|b| b.is_ascii_whitespace()) {
            return; // a response, or a keep-alive: nothing to answer
        }
        // The head only: the body may be anything, and is not read.
        let head_len = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(data.len(), |i| i + 2)
            .min(message::MAX_MESSAGE_LEN);
        let Some(text) = std::str::from_utf8(&data[..head_len]).ok() else {
            return;
        };
        let mut headers = Vec::new();
        let mut via_seen = false;
        for line in text.lines().skip(1) {
            if line.trim().is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            let canon = match name.to_ascii_lowercase().as_str() {
                "via" | "v" => "Via",
                "from" | "f" => "From",
                "to" | "t" => "To",
                "call-id" | "i" => "Call-ID",
                "cseq" => "CSeq",
                _ => continue,
            };
            let value = value.trim();
            if value.len() > 1024 || value.bytes().any(|b| b < 0x20 && b != b'\t') {
                continue;
            }
            if canon == "Via" {
                if via_seen {
                    continue;
                }
                via_seen = true;
            } else if headers.iter().any(|h: &Header| h.name == canon) {
                continue;
            }
            headers.push(Header {
                name: canon.into(),
                value: value.to_string(),
            });
        }
        if !via_seen {
            return;
        }
        if text.starts_with("ACK ") {
            return;
        }
        let resp = Message {
            start: StartLine::Response { code, reason },
            headers,
            body: Bytes::new(),
        };
        let dest = response_peer_raw(&resp, peer);
        self.send_stateless(&dest, resp);
    }

    /// A stream message whose length cannot be known: answered 400 where it
    /// is a request, then the driver closes the connection.
    pub fn handle_unframeable(&mut self, head: &[u8], peer: &Peer) {
        self.bad_request(head, peer, "Content-Length required on streams");
    }

    pub fn handle_message(&mut self, now: Instant, unix: i64, mut msg: Message, peer: Peer) {
        self.clock = self.clock.max(now);
        // SIP-I/SIP-T (SDP + ISUP): the SDP part is what we anchor and relay.
        if msg.reduce_multipart_to_sdp() {
            metrics::counter!("tollgate_sip_multipart_reduced_total").increment(1);
        }
        match &msg.start {
            StartLine::Response { .. } => {
                self.txn.on_response(now, msg);
                self.drain_txn_events(now);
            }
            StartLine::Request { method, .. } => {
                let method = method.clone();
                self.metrics.request(&method);
                if method != "ACK"
                    && msg.to_tag().is_none()
                    && self.lockout.is_banned(peer.addr.ip(), now)
                {
                    // Locked out (SPEC §4): no answer at all. In-dialog
                    // requests of calls already up still pass.
                    metrics::counter!("tollgate_lockout_ignored_total").increment(1);
                    return;
                }
                mark_received(&mut msg, &peer);
                let Some(via) = msg.top_via() else { return };
                if via.branch.is_none() {
                    if method != "ACK" {
                        let resp = response_to(&msg, 400, "Bad Request (Via branch)", None);
                        let dest = response_peer(&msg, &peer);
                        self.send_stateless(&dest, resp);
                    }
                    return;
                }
                match self.txn.match_request(now, &msg, &peer) {
                    RequestMatch::Absorbed => {}
                    RequestMatch::Ack2xx => self.on_ack(now, msg),
                    RequestMatch::Cancel(invite) => self.on_cancel(now, msg, peer, invite),
                    RequestMatch::New => self.on_new_request(now, unix, msg, peer, &method),
                }
            }
        }
        self.drain_txn_events(now);
    }

    fn on_new_request(&mut self, now: Instant, unix: i64, msg: Message, peer: Peer, method: &str) {
        if msg.to_tag().is_some() {
            return self.on_in_dialog(now, msg, peer, method);
        }
        let dest = response_peer(&msg, &peer);
        match method {
            "INVITE" => self.on_invite(now, unix, msg, peer),
            "OPTIONS" => {
                let mut resp = response_to(&msg, 200, "OK", Some(&self.token(8)));
                resp.headers.push(Header {
                    name: "Allow".into(),
                    value: ALLOW.into(),
                });
                resp.headers.push(Header {
                    name: "Accept".into(),
                    value: "application/sdp".into(),
                });
                self.send_stateless(&dest, resp);
            }
            "CANCEL" | "BYE" | "UPDATE" | "INFO" | "PRACK" => {
                let resp = response_to(&msg, 481, reason_phrase(481), Some(&self.token(8)));
                self.send_stateless(&dest, resp);
            }
            "REGISTER" | "SUBSCRIBE" | "NOTIFY" | "MESSAGE" | "REFER" | "PUBLISH" => {
                let mut resp = response_to(&msg, 405, reason_phrase(405), Some(&self.token(8)));
                resp.headers.push(Header {
                    name: "Allow".into(),
                    value: ALLOW.into(),
                });
                self.send_stateless(&dest, resp);
            }
            _ => {
                let resp = response_to(&msg, 501, reason_phrase(501), Some(&self.token(8)));
                self.send_stateless(&dest, resp);
            }
        }
    }

    fn on_invite(&mut self, now: Instant, unix: i64, msg: Message, peer: Peer) {
        let dest = response_peer(&msg, &peer);
        let mf = msg
            .header("Max-Forwards")
            .and_then(|v| v.parse::<u8>().ok())
            .unwrap_or(70);
        if mf == 0 {
            let resp = response_to(&msg, 483, reason_phrase(483), Some(&self.token(8)));
            return self.send_stateless(&dest, resp);
        }
        if self.draining {
            let mut resp = response_to(&msg, 503, reason_phrase(503), Some(&self.token(8)));
            resp.headers.push(Header {
                name: "Retry-After".into(),
                value: "30".into(),
            });
            return self.send_stateless(&dest, resp);
        }
        let ruri = msg.request_uri().unwrap_or("");
        let request_user = SipUri::parse(ruri)
            .ok()
            .and_then(|u| u.user)
            .unwrap_or_default();
        let from_user = msg.header("From").and_then(header_user).unwrap_or_default();
        let pai_user = msg.header("P-Asserted-Identity").and_then(header_user);
        let authz: Vec<&str> = msg.headers_named("Authorization").collect();
        let view = InviteView {
            method: "INVITE",
            request_uri: ruri,
            request_user: &request_user,
            from_user: &from_user,
            asserted_user: pai_user.as_deref(),
            authorization: &authz,
            source_ip: peer.addr.ip(),
        };
        self.auth_cfg.now = unix;
        let principal = match self.auth.check(&view, &self.auth_cfg) {
            Outcome::Accepted(p) => p,
            refused => return self.refuse_credential(&msg, &dest, &peer, now, unix, refused),
        };
        self.start_call(now, unix, msg, peer, principal, mf);
    }

    /// Answers an INVITE whose credential was refused (SPEC §4): 401 with
    /// challenges (counting towards the source's lockout), 403, 484, or 503
    /// when shared state is unreachable.
    fn refuse_credential(
        &mut self,
        msg: &Message,
        dest: &Peer,
        peer: &Peer,
        now: Instant,
        unix: i64,
        outcome: Outcome,
    ) {
        match outcome {
            // Not a refusal; the callers handle it before.
            Outcome::Accepted(_) => {}
            Outcome::Challenge { headers } => {
                metrics::counter!("tollgate_auth_failures_total", "reason" => "no_credential")
                    .increment(1);
                self.challenge(msg, dest, headers);
            }
            Outcome::InvalidToken { header, reason } => {
                metrics::counter!("tollgate_auth_failures_total", "reason" => reason).increment(1);
                if self.bad_credential(now, unix, peer) {
                    return;
                }
                self.challenge(msg, dest, vec![header]);
            }
            Outcome::InvalidDigest { headers, reason } => {
                metrics::counter!("tollgate_auth_failures_total", "reason" => reason).increment(1);
                // A stale nonce with the right answer is the digest flow
                // asking for a retry, not a guess.
                if reason != "stale_nonce" && self.bad_credential(now, unix, peer) {
                    return;
                }
                self.challenge(msg, dest, headers);
            }
            Outcome::Forbidden { reason } => {
                metrics::counter!("tollgate_auth_failures_total", "reason" => reason).increment(1);
                let resp = response_to(msg, 403, reason_phrase(403), Some(&self.token(8)));
                self.send_stateless(dest, resp);
            }
            Outcome::AddressIncomplete => {
                metrics::counter!("tollgate_auth_failures_total", "reason" => "address_incomplete")
                    .increment(1);
                let resp = response_to(msg, 484, reason_phrase(484), Some(&self.token(8)));
                self.send_stateless(dest, resp);
            }
            // Shared state unreachable with on_unavailable = "refuse" (SPEC
            // §4): not the caller's fault, so no lockout and no 401.
            Outcome::Unavailable { reason } => {
                metrics::counter!("tollgate_auth_failures_total", "reason" => reason).increment(1);
                let mut resp = response_to(msg, 503, reason_phrase(503), Some(&self.token(8)));
                resp.headers.push(Header {
                    name: "Retry-After".into(),
                    value: STATE_RETRY_AFTER_SECS.to_string(),
                });
                self.send_stateless(dest, resp);
            }
        }
    }

    /// Counts a bad credential from `peer` towards its lockout; true if the
    /// source is now locked out (this request gets no answer either).
    /// Trusted carrier sources are never locked out.
    fn bad_credential(&mut self, now: Instant, unix: i64, peer: &Peer) -> bool {
        let ip = peer.addr.ip();
        if self.lockout.config().failures == 0
            || self
                .auth
                .store()
                .trusted_for(ip, unix.max(0) as u64)
                .is_some()
        {
            return false;
        }
        let Some(ban) = self.lockout.record_failure(ip, now) else {
            return false;
        };
        metrics::counter!("tollgate_lockout_bans_total").increment(1);
        tracing::warn!(
            source = %ban.ip,
            failures = ban.failures,
            ban_s = ban.duration.as_secs(),
            "source locked out: too many bad credentials"
        );
        true
    }

    fn challenge(&mut self, msg: &Message, dest: &Peer, values: Vec<String>) {
        let mut resp = response_to(msg, 401, reason_phrase(401), Some(&self.token(8)));
        for v in values {
            resp.headers.push(Header {
                name: "WWW-Authenticate".into(),
                value: v,
            });
        }
        self.send_stateless(dest, resp);
    }

    fn pick_route(&self, principal: &Principal) -> Option<usize> {
        let model = principal.claims.as_ref().and_then(|c| c.model.as_deref());
        crate::route::pick(&self.cfg.routes, model, &principal.destination)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_call(
        &mut self,
        now: Instant,
        unix: i64,
        msg: Message,
        peer: Peer,
        principal: Principal,
        max_forwards: u8,
    ) {
        let id = self.next_id;
        // What the credential check canonicalized and checked (SPEC §3d,
        // §4a): leg B gets exactly these, never the INVITE's own From or
        // P-Asserted-Identity.
        let called = principal.destination.as_str().to_owned();
        let caller = principal.caller.as_str().to_owned();
        let b_call_id = format!("{}.{}@tollgate", self.token(12), self.shard.0);
        let info = AdmitInfo {
            call_id: &b_call_id,
            a_call_id: msg.call_id().unwrap_or_default(),
            from: &caller,
            webhook: principal.claims.as_ref().and_then(|c| c.webhook.as_deref()),
            pending_use: principal.pending_use.as_ref(),
            record: principal.claims.as_ref().and_then(|c| c.record) == Some(true),
        };
        if let Err(r) =
            self.policy
                .admit(id, &principal.key, &principal.destination, &info, now, unix)
        {
            let dest = response_peer(&msg, &peer);
            // The credential's single use, recorded with the admission,
            // was a replay: the same 401 the credential check gives.
            if let (401, Some(pending)) = (r.code, &principal.pending_use) {
                let o = self.auth.replayed(pending, peer.addr.ip(), &self.auth_cfg);
                return self.refuse_credential(&msg, &dest, &peer, now, unix, o);
            }
            let mut resp = response_to(&msg, r.code, reason_phrase(r.code), Some(&self.token(8)));
            if let Some(secs) = r.retry_after {
                resp.headers.push(Header {
                    name: "Retry-After".into(),
                    value: secs.to_string(),
                });
            }
            metrics::counter!("tollgate_admission_refusals_total", "code" => code_label(r.code))
                .increment(1);
            return self.send_stateless(&dest, resp);
        }
        self.next_id += self.shard.1;
        // Admitted: however the call is refused from here on, the policy gets
        // exactly one record of it.
        let refused = |code: u16| {
            CallRecord::refused(
                b_call_id.clone(),
                msg.call_id().unwrap_or_default(),
                id,
                &principal.key.id,
                caller.clone(),
                called.clone(),
                unix,
                code,
            )
        };
        let Some(a_key) = self.txn.create_server(msg.clone(), peer.clone()) else {
            self.policy.ended(&refused(400));
            return;
        };
        let a_tag = self.token(8);
        self.reply(now, &a_key, 100, Vec::new(), None);
        let Some(route_ix) = self.pick_route(&principal) else {
            self.reply(now, &a_key, 404, Vec::new(), Some(&a_tag));
            self.policy.ended(&refused(404));
            return;
        };
        let route = self.cfg.routes[route_ix].clone();
        // SDES rule (ARCHITECTURE.md, media): keys only over TLS signaling
        // unless the route allows cleartext. Leg A offering a=crypto over
        // UDP/TCP gets 488 (answering would leak our key too); leg B's
        // profile follows `leg_b_profile`.
        let sdes_refusal =
            if is_sdp(&msg) && sdp_has_sdes(&msg.body) && !sdes_allowed(peer.transport, &route) {
                Some(488)
            } else {
                leg_b_profile(&route).err()
            };
        if let Some(code) = sdes_refusal {
            let extra = vec![Header {
                name: "Warning".into(),
                value: if code == 488 {
                    "399 tollgate \"SDES keys (a=crypto) refused over cleartext signaling: use TLS\"".into()
                } else {
                    "399 tollgate \"route needs sdes_over_cleartext for srtp over cleartext\""
                        .into()
                },
            }];
            metrics::counter!("tollgate_sdes_refusals_total").increment(1);
            self.reply(now, &a_key, code, extra, Some(&a_tag));
            self.policy.ended(&refused(code));
            return;
        }
        let route = Route {
            media: leg_b_profile(&route).unwrap_or(MediaProfile::Rtp),
            ..route
        };

        // Leg A: we are its UAS.
        let a_call_id = msg.call_id().unwrap_or_default().to_string();
        let a_remote_tag = msg.from_tag().map(str::to_string);
        let a_leg = Leg {
            call_id: a_call_id.clone(),
            local_tag: a_tag,
            remote_tag: a_remote_tag.clone(),
            local_uri: msg.header("To").map(strip_tag).unwrap_or_default(),
            remote_uri: msg.header("From").map(strip_tag).unwrap_or_default(),
            remote_target: msg
                .header("Contact")
                .and_then(name_addr_uri)
                .unwrap_or_else(|| msg.header("From").and_then(name_addr_uri).unwrap_or(""))
                .to_string(),
            route_set: msg
                .headers_named("Record-Route")
                .map(str::to_string)
                .collect(),
            peer: peer.clone(),
            local_cseq: 0,
        };

        // Leg B: we are its UAC, toward the route's first target up.
        let b_user = uri_user(&called);
        let Some((first, first_peer, more_targets)) = attempt::targets_in_order(&route) else {
            // No target can be reached now (SPEC §9: a name that does not
            // resolve): refused at once, never a hang.
            let warning = vec![Header {
                name: "Warning".into(),
                value: "399 tollgate \"no route target reachable (DNS)\"".into(),
            }];
            self.reply(now, &a_key, 503, warning, Some(&a_leg.local_tag));
            self.policy.ended(&refused(503));
            return;
        };
        let t = first_peer.transport;
        let b_ruri = first.request_uri(&b_user);
        let toward = first_peer.addr.ip();
        let local = self.local(t, toward);
        let b_leg = Leg {
            call_id: b_call_id.clone(),
            local_tag: self.token(8),
            remote_tag: None,
            local_uri: format!("<sip:{}@{}>", uri_user(&caller), local.ip()),
            remote_uri: format!("<{b_ruri}>"),
            remote_target: b_ruri.clone(),
            route_set: Vec::new(),
            peer: first_peer.clone(),
            local_cseq: 1,
        };
        let branch = self.branch();
        let mut headers = vec![
            self.via(t, &branch, toward),
            Header {
                name: "Max-Forwards".into(),
                value: max_forwards.saturating_sub(1).min(69).to_string(),
            },
            Header {
                name: "From".into(),
                value: format!("{};tag={}", b_leg.local_uri, b_leg.local_tag),
            },
            Header {
                name: "To".into(),
                value: b_leg.remote_uri.clone(),
            },
            Header {
                name: "Call-ID".into(),
                value: b_leg.call_id.clone(),
            },
            Header {
                name: "CSeq".into(),
                value: "1 INVITE".into(),
            },
            self.contact(t, toward),
            Header {
                name: "Allow".into(),
                value: ALLOW.into(),
            },
            Header {
                name: "X-Tollgate-Key".into(),
                value: principal.key.id.clone(),
            },
        ];
        if principal.asserted {
            // A trusted source's assertion (RFC 3325), as checked.
            headers.push(Header {
                name: "P-Asserted-Identity".into(),
                value: b_leg.local_uri.clone(),
            });
        }
        if let Some(c) = &principal.claims {
            let mut add = |name: &'static str, v: String| {
                if !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                    headers.push(Header {
                        name: name.into(),
                        value: v,
                    });
                }
            };
            if let Some(m) = &c.model {
                add("X-Tollgate-Model", m.clone());
            }
            if let Some(w) = &c.webhook {
                add("X-Tollgate-Webhook", w.clone());
            }
            if let Some(r) = c.record {
                add("X-Tollgate-Record", r.to_string());
            }
            if let Some(d) = c.max_duration {
                add("X-Tollgate-Max-Duration", d.to_string());
            }
        }
        let late_offer = !is_sdp(&msg) && self.media.anchors();
        let a_profile = if sdes_allowed(peer.transport, &route) {
            MediaProfile::Auto
        } else {
            MediaProfile::Rtp
        };
        if late_offer && !msg.body.is_empty() {
            // A body we cannot read may carry a session description (e.g.
            // multipart): it must not reach leg B unanchored.
            let accept = vec![Header {
                name: "Accept".into(),
                value: "application/sdp".into(),
            }];
            self.reply(now, &a_key, 415, accept, Some(&a_leg.local_tag));
            self.policy.ended(&refused(415));
            return;
        }
        for h in &msg.headers {
            if !late_offer
                && (h.name.eq_ignore_ascii_case("Content-Type")
                    || h.name.eq_ignore_ascii_case("Content-Disposition"))
            {
                headers.push(h.clone());
            }
        }
        let body = if is_sdp(&msg) {
            match self.media.offer(id, &msg.body, route.media, peer.addr.ip()) {
                Ok(b) => b,
                Err(code) => {
                    self.reply(now, &a_key, code, Vec::new(), Some(&a_leg.local_tag));
                    self.media.release(id);
                    self.policy.ended(&refused(code));
                    return;
                }
            }
        } else if late_offer {
            // Late offer (RFC 3261 §13.2.1): leg B's offer comes in its
            // 18x/2xx and is anchored there; leg A answers in its ACK.
            Bytes::new()
        } else {
            msg.body.clone()
        };
        let b_invite = Message {
            start: StartLine::Request {
                method: "INVITE".into(),
                uri: b_ruri,
            },
            headers,
            body,
        };
        let Some(b_key) = self.txn.request(now, b_invite.clone(), first_peer) else {
            return; // unreachable: the Via we built has a branch
        };
        self.metrics.request_sent("INVITE");
        attempt::count_invite(&first);
        let deadline = now + self.cfg.invite_timeout;
        self.deadlines.push(Reverse((deadline, id)));
        self.by_client.insert(b_key.clone(), (id, Purpose::InviteB));
        if let Some(tag) = a_remote_tag {
            self.by_a.insert((a_call_id, tag), id);
        }
        self.by_b.insert(b_leg.call_id.clone(), id);
        self.events.push(CallEvent::Started {
            call: id,
            key_id: principal.key.id.clone(),
            from: caller.clone(),
            to: called.clone(),
        });
        self.metrics.call_started();
        self.calls.insert(
            id,
            Call {
                id,
                a: a_leg,
                b: b_leg,
                state: CallState::Setup,
                key_id: principal.key.id.clone(),
                route_media: route.media,
                created: now,
                created_unix: unix,
                answered: None,
                caller: caller.clone(),
                called: called.clone(),
                max_duration: principal.claims.as_ref().and_then(|c| c.max_duration),
                max_until: None,
                late_offer,
                a_profile,

                a_invite: a_key,
                b_invite_msg: Some(b_invite),
                b_provisional: false,
                cancel_pending: false,
                pending_ack: None,
                last_ack: [None, None],
                deadline: Some(deadline),
                clients: vec![b_key.clone()],
                attempts: attempt::Attempts {
                    auth: route.auth.clone(),
                    challenged: false,
                    user: b_user,
                    current: first,
                    remaining: more_targets,
                },
            },
        );
    }

    fn track(&mut self, id: u64, key: TxnKey, purpose: Purpose) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.clients.push(key.clone());
            self.by_client.insert(key, (id, purpose));
        }
    }

    /// An ended or re-scheduled call leaves its old deadline in the heap
    /// (removing from a `BinaryHeap` is O(n)), where it stays until it is
    /// due: a budget deadline can be a day away, so steady traffic would
    /// keep a day of ended calls queued. Once stale entries outnumber the
    /// live ones (each call has at most one), the heap keeps only the live:
    /// O(n) at most once per n/2 ended calls. With no call left every
    /// queued deadline is stale, so an idle core holds none.
    fn compact_deadlines(&mut self) {
        if self.calls.is_empty() {
            self.deadlines.clear();
            return;
        }
        if self.deadlines.len() <= COMPACT_DEADLINES_ABOVE.max(2 * self.calls.len()) {
            return;
        }
        let calls = &self.calls;
        self.deadlines
            .retain(|Reverse((at, id))| calls.get(id).is_some_and(|c| c.deadline == Some(*at)));
    }

    /// An answered call's next deadline: the end of its budget slice
    /// (`budget` seconds, see [`CallPolicy::answered`]; a spent budget,
    /// `Some(0)`, is due at once) or of its `max_duration`, whichever comes
    /// first.
    fn set_limit_deadline(
        &mut self,
        id: u64,
        now: Instant,
        budget: Option<u64>,
        max_until: Option<Instant>,
    ) {
        let slice_end = budget.map(|s| now + Duration::from_secs(s));
        let at = match (slice_end, max_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = at {
            self.set_deadline(id, at);
        }
    }

    fn set_deadline(&mut self, id: u64, at: Instant) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.deadline = Some(at);
            self.deadlines.push(Reverse((at, id)));
            self.compact_deadlines();
        }
    }

    fn end_call(&mut self, id: u64, cause: EndCause) {
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        self.compact_deadlines();
        if let Some(tag) = &call.a.remote_tag {
            self.by_a.remove(&(call.a.call_id.clone(), tag.clone()));
        }
        self.by_b.remove(&call.b.call_id);
        for k in &call.clients {
            self.by_client.remove(k);
        }
        self.media.release(id);
        let result = match (cause, call.answered) {
            (EndCause::Completed, _) => "answered",
            (EndCause::Rejected(_), _) => "rejected",
            (EndCause::Cancelled, _) => "cancelled",
            (EndCause::Timeout, None) => "timeout",
            (_, Some(_)) => "answered",
            (_, None) => "failed",
        };
        self.metrics.call_ended(result);
        let now = self.clock;
        let elapsed = |t: Instant| now.saturating_duration_since(t);
        let end = call.created_unix + elapsed(call.created).as_secs() as i64;
        let answer = call.answered.map(|a| {
            call.created_unix + a.saturating_duration_since(call.created).as_secs() as i64
        });
        let billable_secs = call.answered.map_or(0, |a| {
            let d = elapsed(a);
            d.as_secs() + u64::from(d.subsec_nanos() > 0)
        });
        self.policy.ended(&CallRecord {
            call_id: call.b.call_id.clone(),
            a_call_id: call.a.call_id.clone(),
            call: id,
            key_id: call.key_id.clone(),
            from: call.caller.clone(),
            to: call.called.clone(),
            start: call.created_unix,
            answer,
            end,
            billable_secs,
            cause,
            sip_code: match (call.answered, cause) {
                (Some(_), _) => Some(200),
                (None, EndCause::Rejected(c)) => Some(c),
                (None, EndCause::Timeout) => Some(408),
                (None, EndCause::Cancelled) => Some(487),
                (None, _) => None,
            },
        });
        self.events.push(CallEvent::Ended { call: id, cause });
    }

    /// An in-dialog request towards `side`.
    fn leg_request(
        &mut self,
        id: u64,
        side: Side,
        method: &str,
        cseq: Option<u32>,
    ) -> Option<(Message, Peer)> {
        let branch = self.branch();
        let call = self.calls.get_mut(&id)?;
        let leg = call.leg_mut(side);
        let seq = match cseq {
            Some(s) => s,
            None => {
                leg.local_cseq += 1;
                leg.local_cseq
            }
        };
        let leg = leg.clone();
        let (t, toward) = (leg.peer.transport, leg.peer.addr.ip());
        let mut headers = vec![self.via(t, &branch, toward)];
        headers.push(Header {
            name: "Max-Forwards".into(),
            value: "70".into(),
        });
        for r in &leg.route_set {
            headers.push(Header {
                name: "Route".into(),
                value: r.clone(),
            });
        }
        headers.push(Header {
            name: "From".into(),
            value: format!("{};tag={}", leg.local_uri, leg.local_tag),
        });
        let to = match &leg.remote_tag {
            Some(t) => format!("{};tag={t}", leg.remote_uri),
            None => leg.remote_uri.clone(),
        };
        headers.push(Header {
            name: "To".into(),
            value: to,
        });
        headers.push(Header {
            name: "Call-ID".into(),
            value: leg.call_id.clone(),
        });
        headers.push(Header {
            name: "CSeq".into(),
            value: format!("{seq} {method}"),
        });
        if method != "ACK" && method != "BYE" {
            headers.push(self.contact(t, toward));
        }
        let msg = Message {
            start: StartLine::Request {
                method: method.into(),
                uri: leg.remote_target.clone(),
            },
            headers,
            body: Bytes::new(),
        };
        Some((msg, leg.peer))
    }

    fn send_bye(&mut self, now: Instant, id: u64, side: Side) {
        if let Some((bye, peer)) = self.leg_request(id, side, "BYE", None) {
            self.metrics.request_sent("BYE");
            if let Some(k) = self.txn.request(now, bye, peer) {
                self.track(id, k, Purpose::Bye);
            }
        }
    }

    /// ACK for the other side's 2xx to an INVITE with CSeq `cseq`.
    fn send_ack(&mut self, id: u64, side: Side, cseq: u32, body: Option<(Bytes, Option<String>)>) {
        let Some((mut ack, peer)) = self.leg_request(id, side, "ACK", Some(cseq)) else {
            return;
        };
        if let Some((b, ct)) = body {
            if let Some(ct) = ct {
                ack.headers.push(Header {
                    name: "Content-Type".into(),
                    value: ct,
                });
            }
            ack.body = b;
        }
        let data = ack.to_bytes();
        if let Some(call) = self.calls.get_mut(&id) {
            call.last_ack[side as usize] = Some((cseq, data.clone()));
        }
        self.txn.out.push_back(Transmit { peer, data });
    }

    fn on_ack(&mut self, now: Instant, msg: Message) {
        let Some((id, side)) = self.find_dialog(&msg) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let Some(pa) = call.pending_ack.as_ref() else {
            return;
        };
        if pa.from != side {
            return;
        }
        let Some(pa) = call.pending_ack.take() else {
            return;
        };
        self.txn.ack_received(&pa.server);
        if pa.answer_expected {
            return self.on_late_answer(now, id, side, &pa, &msg);
        }
        // With anchored media there is no offer outstanding here (it was in
        // the INVITE and answered in the 2xx): an SDP in this ACK must not
        // reach the other side unanchored.
        let body = (!msg.body.is_empty() && !self.media.anchors()).then(|| {
            (
                msg.body.clone(),
                msg.header("Content-Type").map(str::to_string),
            )
        });
        if pa.other_answered {
            self.send_ack(id, side.other(), pa.other_cseq, body);
        }
    }

    /// The ACK of a 2xx that carried the other side's offer (late offer):
    /// its answer, rewritten by the media relay, goes into the other side's
    /// ACK. An ACK without an answer, or with one the relay cannot serve,
    /// ends the call: the other side's 2xx is ACKed (without an answer), and
    /// both legs get a BYE (RFC 3261 §13.2.1, RFC 3264 §5).
    fn on_late_answer(
        &mut self,
        now: Instant,
        id: u64,
        side: Side,
        pa: &PendingAck,
        ack: &Message,
    ) {
        let answer = if is_sdp(ack) {
            let signaling = self.signaling_ip(id, side);
            self.media.answer(id, &ack.body, signaling)
        } else {
            Err(488)
        };
        match answer {
            Ok(b) => {
                let ct = Some("application/sdp".to_string());
                self.send_ack(id, side.other(), pa.other_cseq, Some((b, ct)));
            }
            Err(code) => {
                tracing::info!(
                    call = id,
                    code,
                    "no usable SDP answer in the ACK: ending the call"
                );
                metrics::counter!("tollgate_sip_offer_answer_failures_total").increment(1);
                let reject = rejecting_answer(&pa.offer);
                self.send_ack(id, side.other(), pa.other_cseq, reject);
                self.fail_offer_answer(now, id);
            }
        }
    }

    /// The offer/answer exchange of a confirmed (or confirming) dialog
    /// failed: BYE both legs and end the call with a cause that says so.
    /// The INVITE answered through `server` failed: no ACK is awaited for it.
    fn forget_pending_ack(&mut self, id: u64, server: &TxnKey) {
        if let Some(call) = self.calls.get_mut(&id) {
            if call
                .pending_ack
                .as_ref()
                .is_some_and(|p| p.server == *server)
            {
                call.pending_ack = None;
            }
        }
    }

    fn fail_offer_answer(&mut self, now: Instant, id: u64) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        call.state = CallState::Terminating;
        call.pending_ack = None;
        self.send_bye(now, id, Side::A);
        self.send_bye(now, id, Side::B);
        self.end_call(id, EndCause::OfferAnswerFailed);
    }

    fn on_cancel(&mut self, now: Instant, msg: Message, peer: Peer, invite: TxnKey) {
        let Some(ck) = self.txn.create_server(msg, peer) else {
            return;
        };
        let id = self
            .txn
            .server_request(&invite)
            .and_then(|m| Some((m.call_id()?.to_string(), m.from_tag()?.to_string())))
            .and_then(|k| self.by_a.get(&k).copied());
        self.reply(now, &ck, 200, Vec::new(), None);
        let Some(id) = id else {
            return;
        };
        if self
            .calls
            .get(&id)
            .is_some_and(|c| c.state == CallState::Setup)
        {
            self.abandon_setup(now, id, 487);
        }
    }

    /// Gives up on a call still in setup: `code` to leg A's INVITE, and leg
    /// B cancelled (at once after a provisional, else as soon as one comes,
    /// RFC 3261 §9.1), with a give-up deadline 64*T1 later.
    fn abandon_setup(&mut self, now: Instant, id: u64, code: u16) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        call.state = CallState::Cancelled;
        let (a_invite, tag, provisional) = (
            call.a_invite.clone(),
            call.a.local_tag.clone(),
            call.b_provisional,
        );
        self.reply(now, &a_invite, code, Vec::new(), Some(&tag));
        if provisional {
            self.cancel_b(now, id);
        } else {
            if let Some(call) = self.calls.get_mut(&id) {
                call.cancel_pending = true;
            }
            self.set_deadline(id, now + self.cfg.timers.t1 * 64);
        }
    }

    fn cancel_b(&mut self, now: Instant, id: u64) {
        let give_up = now + self.cfg.timers.t1 * 64;
        self.set_deadline(id, give_up);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        call.cancel_pending = false;
        let Some(inv) = call.b_invite_msg.clone() else {
            return;
        };
        let peer = call.b.peer.clone();
        let mut headers = Vec::new();
        for h in &inv.headers {
            match &*h.name {
                "Via" | "From" | "To" | "Call-ID" | "Max-Forwards" | "Route" => {
                    headers.push(h.clone())
                }
                _ => {}
            }
        }
        headers.push(Header {
            name: "CSeq".into(),
            value: format!("{} CANCEL", inv.cseq().map_or(1, |c| c.seq)),
        });
        let cancel = Message {
            start: StartLine::Request {
                method: "CANCEL".into(),
                uri: inv.request_uri().unwrap_or_default().to_string(),
            },
            headers,
            body: Bytes::new(),
        };
        self.metrics.request_sent("CANCEL");
        if let Some(k) = self.txn.request(now, cancel, peer) {
            self.track(id, k, Purpose::CancelB);
        }
    }

    /// Whether an offer of this call awaits its answer: a relayed re-offer
    /// without a final response yet, or a late offer whose ACK is due.
    /// The signaling IP of a call's side, for SDP that came in a response or
    /// an ACK: the leg's peer (leg A's INVITE source, leg B's route).
    fn signaling_ip(&self, id: u64, side: Side) -> IpAddr {
        self.calls
            .get(&id)
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |c| {
                c.leg(side).peer.addr.ip()
            })
    }

    fn offer_pending(&self, id: u64) -> bool {
        let Some(call) = self.calls.get(&id) else {
            return false;
        };
        call.pending_ack.as_ref().is_some_and(|p| p.answer_expected)
            || call.clients.iter().any(|k| {
                matches!(
                    self.by_client.get(k),
                    Some((_, Purpose::Relay { reoffer: true, .. }))
                        | Some((_, Purpose::Relay { late: true, .. }))
                )
            })
    }

    /// Which call and side an in-dialog request belongs to.
    fn find_dialog(&self, msg: &Message) -> Option<(u64, Side)> {
        let cid = msg.call_id()?;
        if let Some(id) = self.by_b.get(cid) {
            return Some((*id, Side::B));
        }
        let tag = msg.from_tag()?;
        self.by_a
            .get(&(cid.to_string(), tag.to_string()))
            .map(|id| (*id, Side::A))
    }

    fn on_in_dialog(&mut self, now: Instant, msg: Message, peer: Peer, method: &str) {
        let Some((id, side)) = self.find_dialog(&msg) else {
            let dest = response_peer(&msg, &peer);
            let resp = response_to(&msg, 481, reason_phrase(481), None);
            return self.send_stateless(&dest, resp);
        };
        let source = peer.addr.ip();
        let Some(sk) = self.txn.create_server(msg.clone(), peer) else {
            return;
        };
        let state = self.calls.get(&id).map(|c| c.state);
        if method == "BYE" {
            self.reply(now, &sk, 200, Vec::new(), None);
            if state == Some(CallState::Terminating) {
                return;
            }
            if let Some(call) = self.calls.get_mut(&id) {
                call.state = CallState::Terminating;
                call.pending_ack = None;
            }
            self.send_bye(now, id, side.other());
            return;
        }
        if state != Some(CallState::Confirmed) {
            let code = if state == Some(CallState::Terminating) {
                481
            } else {
                491
            };
            return self.reply(now, &sk, code, Vec::new(), None);
        }
        if method == "INVITE" && self.calls.get(&id).is_some_and(|c| c.pending_ack.is_some()) {
            return self.reply(now, &sk, 491, Vec::new(), None);
        }
        let reoffer = is_sdp(&msg) && self.media.anchors();
        if reoffer && self.offer_pending(id) {
            // Glare (RFC 3261 §14.1, RFC 3311 §5.2): one offer at a time.
            return self.reply(now, &sk, 491, Vec::new(), None);
        }
        // A re-INVITE without SDP asks the other side for an offer (in its
        // 2xx), answered in the ACK: both are anchored like a late offer.
        let late = method == "INVITE" && !is_sdp(&msg) && self.media.anchors();
        let mut body = msg.body.clone();
        if late && !body.is_empty() {
            let accept = vec![Header {
                name: "Accept".into(),
                value: "application/sdp".into(),
            }];
            return self.reply(now, &sk, 415, accept, None);
        }
        if reoffer {
            // A new offer from either leg is re-anchored: the media relay
            // keeps the old relay until the answer, and restores it if the
            // re-offer fails (RFC 3261 §14.2: the session goes on as it was).
            let offer_ok = method == "INVITE" || method == "UPDATE";
            let (profile_a, profile_b) = self
                .calls
                .get(&id)
                .map_or((MediaProfile::Rtp, MediaProfile::Rtp), |c| {
                    (c.a_profile, c.route_media)
                });
            let rewritten = if offer_ok {
                self.media
                    .offer_from(id, side, &msg.body, profile_a, profile_b, source)
                    .map_err(|code| (code, "refused by the media relay"))
            } else {
                Err((488, "SDP outside an offer/answer exchange"))
            };
            match rewritten {
                Ok(b) => body = b,
                Err((code, why)) => {
                    tracing::debug!(call = id, ?side, code, why, "re-offer refused");
                    metrics::counter!("tollgate_sip_reoffers_refused_total").increment(1);
                    return self.reply(now, &sk, code, Vec::new(), None);
                }
            }
        }
        if method == "INVITE" {
            self.reply(now, &sk, 100, Vec::new(), None);
        }
        let Some((mut req, peer)) = self.leg_request(id, side.other(), method, None) else {
            return;
        };
        for h in &msg.headers {
            if h.name.eq_ignore_ascii_case("Content-Type")
                || h.name.eq_ignore_ascii_case("Content-Disposition")
                || h.name.eq_ignore_ascii_case("Event")
                || h.name.eq_ignore_ascii_case("Info-Package")
            {
                req.headers.push(h.clone());
            }
        }
        req.body = body;
        let cseq = req.cseq().map_or(0, |c| c.seq);
        self.metrics.request_sent(method);
        if let Some(k) = self.txn.request(now, req, peer) {
            self.track(
                id,
                k,
                Purpose::Relay {
                    from: side,
                    server: sk.clone(),
                    reoffer,
                    late,
                },
            );
        }
        if method == "INVITE" {
            if let Some(call) = self.calls.get_mut(&id) {
                call.pending_ack = Some(PendingAck {
                    from: side,
                    server: sk,
                    other_cseq: cseq,
                    other_answered: false,
                    answer_expected: false,
                    offer: Bytes::new(),
                });
            }
        }
    }

    fn drain_txn_events(&mut self, now: Instant) {
        while let Some(ev) = self.txn.events.pop_front() {
            match ev {
                TxnEvent::Response { key, msg } => self.on_client_response(now, key, msg),
                TxnEvent::Timeout { key } => self.on_client_timeout(now, key),
                TxnEvent::NoAck { key, request } => {
                    // The INVITE's dialog names the call: no scan of every
                    // call per missing ACK.
                    let found = self.find_dialog(&request).map(|(id, _)| id).filter(|id| {
                        self.calls.get(id).is_some_and(|c| {
                            c.pending_ack.as_ref().is_some_and(|p| p.server == key)
                        })
                    });
                    if let Some(id) = found {
                        let (side, cseq, answered) =
                            match self.calls.get_mut(&id).and_then(|c| c.pending_ack.take()) {
                                Some(p) => (p.from, p.other_cseq, p.other_answered),
                                None => continue,
                            };
                        if answered {
                            self.send_ack(id, side.other(), cseq, None);
                        }
                        if let Some(call) = self.calls.get_mut(&id) {
                            call.state = CallState::Terminating;
                        }
                        self.send_bye(now, id, Side::A);
                        self.send_bye(now, id, Side::B);
                        self.end_call(id, EndCause::NoAck);
                    }
                }
            }
        }
    }

    fn relay_response(&mut self, now: Instant, id: u64, to: Side, server: &TxnKey, from: &Message) {
        self.relay_response_with(now, id, to, server, from, None);
    }

    /// Relays `from` on `server`, with `body` (an SDP rewritten by the media
    /// relay) in place of its own when given.
    fn relay_response_with(
        &mut self,
        now: Instant,
        id: u64,
        to: Side,
        server: &TxnKey,
        from: &Message,
        body: Option<Bytes>,
    ) {
        let Some(code) = from.status() else { return };
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let tag = call.leg(to).local_tag.clone();
        let (t, toward) = (call.leg(to).peer.transport, call.leg(to).peer.addr.ip());
        let Some(req) = self.txn.server_request(server) else {
            return;
        };
        let reason = match &from.start {
            StartLine::Response { reason, .. } if !reason.is_empty() => reason.clone(),
            _ => reason_phrase(code).to_string(),
        };
        let mut resp = response_to(req, code, &reason, Some(&tag));
        if (101..300).contains(&code) {
            resp.headers.push(self.contact_answering(t, req, toward));
            // RFC 3261 §12.1.1: a dialog-creating response copies the
            // request's Record-Route, in order, so a proxy in front (a
            // carrier's Kamailio) stays on the path of ACK and BYE.
            if req.method() == Some("INVITE") && req.to_tag().is_none() {
                let rr = req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("Record-Route"));
                resp.headers.extend(rr.cloned());
            }
        }
        for h in &from.headers {
            match &*h.name {
                "Content-Type" | "Content-Disposition" | "Retry-After" | "Allow" | "Warning" => {
                    resp.headers.push(h.clone())
                }
                _ => {}
            }
        }
        resp.body = body.unwrap_or_else(|| from.body.clone());
        self.respond_txn(now, server, &resp);
    }

    fn on_client_response(&mut self, now: Instant, key: TxnKey, msg: Message) {
        if self.pinger.owns(&key) {
            return self.on_ping_result(&key, msg.status());
        }
        let Some((id, purpose)) = self.by_client.get(&key).cloned() else {
            return;
        };
        let Some(code) = msg.status() else { return };
        if code >= 200 && !matches!(purpose, Purpose::InviteB) {
            self.by_client.remove(&key);
        }
        match purpose {
            Purpose::InviteB => self.on_b_invite_response(now, id, key, msg, code),
            Purpose::CancelB => {}
            Purpose::Bye => {
                if code >= 200 {
                    self.end_call(id, EndCause::Completed);
                }
            }
            Purpose::Relay {
                from,
                server,
                reoffer,
                late,
            } => self.on_relayed_response(now, id, key, msg, code, from, server, reoffer, late),
        }
    }

    /// A response to an in-dialog request we relayed from `from` (answered
    /// to it on `server`). With anchored media, the SDP it carries goes
    /// through the media relay: the answer to a re-offer, or the other
    /// side's offer in the 2xx to a re-INVITE without SDP (answered in the
    /// ACK, see [`B2bua::on_late_answer`]).
    #[allow(clippy::too_many_arguments)]
    fn on_relayed_response(
        &mut self,
        now: Instant,
        id: u64,
        key: TxnKey,
        msg: Message,
        code: u16,
        from: Side,
        server: TxnKey,
        reoffer: bool,
        late: bool,
    ) {
        if code == 100 {
            return;
        }
        if code < 200 && is_sdp(&msg) && self.media.anchors() {
            // An early answer or offer would bypass the relay: the final
            // response carries the SDP that counts.
            let mut bare = msg;
            bare.body = Bytes::new();
            bare.remove_headers("Content-Type");
            return self.relay_response(now, id, from, &server, &bare);
        }
        if reoffer && code >= 300 {
            self.media.cancel_offer(id);
        }
        let invite = msg.cseq().is_some_and(|c| c.method == "INVITE");
        if (200..300).contains(&code) && invite {
            let seq = msg.cseq().map(|c| c.seq);
            let Some(call) = self.calls.get_mut(&id) else {
                return;
            };
            if call.last_ack[from.other() as usize]
                .as_ref()
                .is_some_and(|(s, _)| Some(*s) == seq)
            {
                return self.resend_ack(id, from.other());
            }
            if call
                .pending_ack
                .as_ref()
                .is_some_and(|p| p.server == server && p.other_answered)
            {
                // A retransmission while the sender's ACK is due: our own
                // 2xx is retransmitted by the server transaction.
                return;
            }
            if let Some(pa) = call.pending_ack.as_mut() {
                pa.other_answered = true;
            }
            update_target(call.leg_mut(from.other()), &msg);
            // keep the mapping for 2xx retransmissions
            self.by_client.insert(
                key,
                (
                    id,
                    Purpose::Relay {
                        from,
                        server: server.clone(),
                        reoffer: false,
                        late: false,
                    },
                ),
            );
        } else if code >= 300 {
            self.forget_pending_ack(id, &server);
        }
        if !(200..300).contains(&code) || !(reoffer || late) {
            return self.relay_response(now, id, from, &server, &msg);
        }
        let signaling = self.signaling_ip(id, from.other());
        let rewritten = if !is_sdp(&msg) {
            Err(488)
        } else if late {
            let (profile_a, profile_b) = self
                .calls
                .get(&id)
                .map_or((MediaProfile::Rtp, MediaProfile::Rtp), |c| {
                    (c.a_profile, c.route_media)
                });
            self.media
                .offer_from(id, from.other(), &msg.body, profile_a, profile_b, signaling)
        } else {
            self.media.answer(id, &msg.body, signaling)
        };
        match rewritten {
            Ok(b) => {
                if late {
                    if let Some(pa) = self.calls.get_mut(&id).and_then(|c| c.pending_ack.as_mut()) {
                        pa.answer_expected = true;
                        pa.offer = msg.body.clone();
                    }
                }
                self.relay_response_with(now, id, from, &server, &msg, Some(b))
            }
            Err(status) => {
                // The other side took the session somewhere the relay
                // cannot follow (an answer it cannot serve, or no usable
                // offer in the 2xx to a re-INVITE without SDP): the sender
                // gets the refusal, the other side's 2xx its ACK, and both
                // legs a BYE (RFC 3261 §14.2 leaves no way back).
                tracing::info!(
                    call = id,
                    status,
                    ?from,
                    "unusable SDP in a 2xx: ending the call"
                );
                metrics::counter!("tollgate_sip_offer_answer_failures_total").increment(1);
                if reoffer {
                    self.media.cancel_offer(id);
                }
                let tag = self.calls.get(&id).map(|c| c.leg(from).local_tag.clone());
                self.reply(now, &server, status, Vec::new(), tag.as_deref());
                if invite {
                    // An offer in the 2xx gets an answer rejecting it.
                    let reject = if late && is_sdp(&msg) {
                        rejecting_answer(&msg.body)
                    } else {
                        None
                    };
                    self.send_ack(id, from.other(), msg.cseq().map_or(0, |c| c.seq), reject);
                }
                self.fail_offer_answer(now, id);
            }
        }
    }

    fn resend_ack(&mut self, id: u64, side: Side) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        if let Some((_, data)) = &call.last_ack[side as usize] {
            let peer = call.leg(side).peer.clone();
            self.txn.out.push_back(Transmit {
                peer,
                data: data.clone(),
            });
        }
    }

    fn on_b_invite_response(
        &mut self,
        now: Instant,
        id: u64,
        key: TxnKey,
        msg: Message,
        code: u16,
    ) {
        let Some(call) = self.calls.get_mut(&id) else {
            // Call gone (e.g. ended by a timeout) but B answers late: ACK+BYE it.
            return;
        };
        let state = call.state;
        let b_cseq = attempt::invite_cseq(call.b_invite_msg.as_ref());
        let a_invite = call.a_invite.clone();
        let signaling = call.b.peer.addr.ip();
        if code == 100 {
            return;
        }
        if code < 200 {
            call.b_provisional = true;
            if call.b.remote_tag.is_none() {
                call.b.remote_tag = msg.to_tag().map(str::to_string);
            }
            if call.cancel_pending {
                return self.cancel_b(now, id);
            }
            if state == CallState::Setup {
                if is_sdp(&msg) {
                    // Leg A's offer's (early) answer; or, for a late offer,
                    // leg B's offer, which its 2xx must repeat (RFC 3261
                    // §13.2.1; the same SDP gets the same rewrite).
                    let rewritten = if call.late_offer {
                        let (pa, pb) = (call.a_profile, call.route_media);
                        self.media
                            .offer_from(id, Side::B, &msg.body, pa, pb, signaling)
                    } else {
                        self.media.answer(id, &msg.body, signaling)
                    };
                    match rewritten {
                        Ok(b) => {
                            self.relay_response_with(now, id, Side::A, &a_invite, &msg, Some(b))
                        }
                        // Early media the relay cannot serve: ring without it.
                        Err(_) => {
                            let mut bare = msg.clone();
                            bare.body = Bytes::new();
                            bare.remove_headers("Content-Type");
                            self.relay_response(now, id, Side::A, &a_invite, &bare);
                        }
                    }
                } else {
                    self.relay_response(now, id, Side::A, &a_invite, &msg);
                }
            }
            return;
        }
        if code < 300 {
            if call.answered.is_some() {
                // 2xx retransmission: our ACK was lost.
                return self.resend_ack(id, Side::B);
            }
            call.answered = Some(now);
            call.deadline = None;
            call.b.remote_tag = msg.to_tag().map(str::to_string);
            update_target(&mut call.b, &msg);
            call.b.route_set = msg
                .headers_named("Record-Route")
                .map(str::to_string)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let setup = now.duration_since(call.created).as_secs_f64();
            self.metrics.call_setup(setup);
            if state == CallState::Cancelled {
                // A gave up before B answered: confirm and hang up B.
                call.state = CallState::Terminating;
                self.send_ack(id, Side::B, b_cseq, None);
                self.send_bye(now, id, Side::B);
                return;
            }
            let a_tag = call.a.local_tag.clone();
            let late_offer = call.late_offer;
            let (profile_a, profile_b) = (call.a_profile, call.route_media);
            let answer_body = if late_offer {
                // Leg B's offer (RFC 3261 §13.2.1: a 2xx to an INVITE without
                // SDP carries it), anchored toward leg A; A answers in its ACK.
                let offer = if is_sdp(&msg) {
                    self.media
                        .offer_from(id, Side::B, &msg.body, profile_a, profile_b, signaling)
                } else {
                    Err(488)
                };
                match offer {
                    Ok(b) => Some(b),
                    Err(code) => {
                        // No offer, or one we cannot relay: end B, refuse A.
                        tracing::info!(call = id, code, "unusable late offer from leg B");
                        metrics::counter!("tollgate_sip_offer_answer_failures_total").increment(1);
                        if let Some(call) = self.calls.get_mut(&id) {
                            call.state = CallState::Terminating;
                            call.answered = None; // A is refused: not answered
                        }
                        let reject = if is_sdp(&msg) {
                            rejecting_answer(&msg.body)
                        } else {
                            None
                        };
                        self.send_ack(id, Side::B, b_cseq, reject);
                        self.send_bye(now, id, Side::B);
                        self.reply(now, &a_invite, code, Vec::new(), Some(&a_tag));
                        self.end_call(id, EndCause::Rejected(code));
                        return;
                    }
                }
            } else if is_sdp(&msg) {
                match self.media.answer(id, &msg.body, signaling) {
                    Ok(b) => Some(b),
                    Err(code) => {
                        // B answered with media we cannot relay: end B, refuse A.
                        if let Some(call) = self.calls.get_mut(&id) {
                            call.state = CallState::Terminating;
                            call.answered = None; // A is refused: not answered
                        }
                        self.send_ack(id, Side::B, b_cseq, None);
                        self.send_bye(now, id, Side::B);
                        self.reply(now, &a_invite, code, Vec::new(), Some(&a_tag));
                        self.end_call(id, EndCause::Rejected(code));
                        return;
                    }
                }
            } else {
                None
            };
            let Some(call) = self.calls.get_mut(&id) else {
                return;
            };
            call.state = CallState::Confirmed;
            call.pending_ack = Some(PendingAck {
                from: Side::A,
                server: a_invite.clone(),
                other_cseq: b_cseq,
                other_answered: true,
                answer_expected: late_offer,
                offer: if late_offer {
                    msg.body.clone()
                } else {
                    Bytes::new()
                },
            });
            self.events.push(CallEvent::Answered { call: id });
            let unix = self.calls.get(&id).map_or(0, |c| {
                c.created_unix + now.saturating_duration_since(c.created).as_secs() as i64
            });
            let budget = self.policy.answered(id, unix);
            let max_until = self.calls.get_mut(&id).and_then(|c| {
                c.max_until = c.max_duration.map(|d| now + Duration::from_secs(d));
                c.max_until
            });
            self.set_limit_deadline(id, now, budget, max_until);
            return self.relay_response_with(now, id, Side::A, &a_invite, &msg, answer_body);
        }
        // 3xx-6xx: the transaction layer ACKed it.
        self.by_client.remove(&key);
        if state == CallState::Setup && self.leg_b_failed(now, id, &msg, code) {
            return;
        }
        if state == CallState::Setup {
            self.relay_response(now, id, Side::A, &a_invite, &msg);
            self.end_call(id, EndCause::Rejected(code));
        } else {
            self.end_call(id, EndCause::Cancelled);
        }
    }

    fn on_client_timeout(&mut self, now: Instant, key: TxnKey) {
        if self.pinger.owns(&key) {
            return self.on_ping_result(&key, None);
        }
        let Some((id, purpose)) = self.by_client.remove(&key) else {
            return;
        };
        match purpose {
            Purpose::InviteB => {
                let Some(call) = self.calls.get(&id) else {
                    return;
                };
                let (state, a_invite, tag) =
                    (call.state, call.a_invite.clone(), call.a.local_tag.clone());
                if state == CallState::Setup && self.leg_b_timed_out(now, id) {
                    return;
                }
                if state == CallState::Setup {
                    self.reply(now, &a_invite, 408, Vec::new(), Some(&tag));
                    self.end_call(id, EndCause::Timeout);
                } else {
                    self.end_call(id, EndCause::Cancelled);
                }
            }
            Purpose::CancelB => {}
            Purpose::Bye => self.end_call(id, EndCause::Completed),
            Purpose::Relay {
                from,
                server,
                reoffer,
                ..
            } => {
                if reoffer {
                    self.media.cancel_offer(id);
                }
                let tag = self.calls.get(&id).map(|c| c.leg(from).local_tag.clone());
                self.reply(now, &server, 408, Vec::new(), tag.as_deref());
                self.forget_pending_ack(id, &server);
            }
        }
    }

    /// When [`B2bua::handle_timeout`] next wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let a = self.txn.poll_timeout();
        let b = self.deadlines.peek().map(|Reverse((t, _))| *t);
        [a, b, self.ping_due()].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        self.send_pings(now);
        self.txn.handle_timeout(now);
        self.drain_txn_events(now);
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(call) = self.calls.get_mut(&id) else {
                continue;
            };
            if call.deadline != Some(at) {
                continue;
            }
            call.deadline = None;
            match call.state {
                // Leg B gave no final answer in time: 408 to A, CANCEL B.
                CallState::Setup => self.abandon_setup(now, id, 408),
                CallState::Confirmed => {
                    let max_until = call.max_until;
                    if max_until.is_some_and(|m| m <= now) {
                        // max_duration spent: BYE both legs.
                        self.hangup(now, id, EndCause::LimitReached);
                        continue;
                    }
                    // The budget slice is used: the next one, or BYE.
                    let unix = call.created_unix
                        + now.saturating_duration_since(call.created).as_secs() as i64;
                    match self.policy.budget_check(id, unix) {
                        Some(0) => self.hangup(now, id, EndCause::LimitReached),
                        budget => self.set_limit_deadline(id, now, budget, max_until),
                    }
                }
                CallState::Cancelled => {
                    // Leg B never answered the CANCEL (RFC 3261 §9.1).
                    let keys = call.clients.clone();
                    for k in &keys {
                        self.txn.forget_client(k);
                    }
                    self.end_call(id, EndCause::Cancelled);
                }
                _ => {}
            }
        }
        self.drain_txn_events(now);
    }

    /// Hangs up a call (admin API, budget, media timeout, shutdown).
    pub fn hangup(&mut self, now: Instant, id: u64, cause: EndCause) {
        self.clock = self.clock.max(now);
        if cause == EndCause::MediaTimeout
            && self
                .calls
                .get(&id)
                .is_some_and(|c| c.state != CallState::Confirmed)
        {
            return; // ringing calls have no media yet; the INVITE timeout bounds them
        }
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        match call.state {
            CallState::Confirmed => {
                call.state = CallState::Terminating;
                self.send_bye(now, id, Side::A);
                self.send_bye(now, id, Side::B);
                self.end_call(id, cause);
            }
            CallState::Setup => {
                self.abandon_setup(now, id, 503);
                self.end_call(id, cause);
            }
            _ => {}
        }
        self.drain_txn_events(now);
    }

    pub fn call_ids(&self) -> Vec<u64> {
        self.calls.keys().copied().collect()
    }
}

fn update_target(leg: &mut Leg, resp: &Message) {
    if let Some(c) = resp.header("Contact").and_then(name_addr_uri) {
        if SipUri::parse(c).is_ok() {
            leg.remote_target = c.to_string();
        }
    }
}

fn strip_tag(v: &str) -> String {
    // Keep the header value without its tag parameter.
    let cut = match v.rfind('>') {
        Some(i) => i + 1,
        None => v.find(';').unwrap_or(v.len()),
    };
    let (head, params) = v.split_at(cut);
    let rest: Vec<&str> = params
        .split(';')
        .filter(|p| !p.is_empty() && !p.trim().to_ascii_lowercase().starts_with("tag="))
        .collect();
    if rest.is_empty() {
        head.to_string()
    } else {
        format!("{head};{}", rest.join(";"))
    }
}

pub(crate) fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// A user part safe to put back into a URI.
fn uri_user(u: &str) -> String {
    let clean: String = u
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "+-_.!~*'()&=$,;?/".contains(*c))
        .take(64)
        .collect();
    if clean.is_empty() {
        "anonymous".into()
    } else {
        clean
    }
}

/// RFC 3261 §18.2.1 / RFC 3581: note the real source in the top Via.
fn mark_received(msg: &mut Message, peer: &Peer) {
    let Some(h) = msg.headers.iter_mut().find(|h| h.name == "Via") else {
        return;
    };
    let Some(via) = crate::message::Via::parse(&h.value) else {
        return;
    };
    let ip = peer.addr.ip().to_string();
    let mut value = String::with_capacity(h.value.len() + 32);
    for (i, part) in h.value.split(';').enumerate() {
        let p = part.trim();
        let lower = p.to_ascii_lowercase();
        if i > 0
            && (lower == "rport" || lower.starts_with("rport=") || lower.starts_with("received="))
        {
            continue;
        }
        if i > 0 {
            value.push(';');
        }
        value.push_str(part);
    }
    if via.host != ip {
        value.push_str(";received=");
        value.push_str(&ip);
    }
    if via.rport {
        value.push_str(&format!(";rport={}", peer.addr.port()));
    }
    h.value = value;
}

/// Where a response to `req` goes: the flow it came on (streams), else the
/// source IP and, with `rport`, the source port (RFC 3581), else the Via port.
fn response_peer(req: &Message, peer: &Peer) -> Peer {
    if peer.transport.reliable() {
        return peer.clone();
    }
    let port = match req.top_via() {
        Some(v) if !v.rport => v.port.unwrap_or(5060),
        _ => peer.addr.port(),
    };
    Peer {
        transport: peer.transport,
        addr: SocketAddr::new(peer.addr.ip(), port),
        flow: peer.flow,
    }
}

fn response_peer_raw(resp: &Message, peer: &Peer) -> Peer {
    response_peer(resp, peer)
}

#[cfg(test)]
mod tests {
    //! The B2BUA driven in memory on a simulated clock: leg A and leg B are
    //! scripted peers, every message goes through the real parser.
    use super::*;
    use crate::message::parse;
    use tollgate_keys::{jwt, Claims, KeyKind, Limits, MemoryKeyStore, MemoryReplayCache};

    const NOW: i64 = 1_800_000_000;

    pub(super) struct Rig {
        pub(super) b2b: B2bua,
        pub(super) t: Instant,
        key: tollgate_keys::ApiKey,
        pub(super) a: Peer,
        pub(super) b: Peer,
    }

    pub(super) fn udp(port: u16) -> Peer {
        Peer {
            transport: Transport::Udp,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            flow: None,
        }
    }

    pub(super) fn rig() -> Rig {
        rig_with(Arc::new(MemoryReplayCache::new()))
    }

    fn rig_with(replay: Arc<dyn ReplayCache>) -> Rig {
        rig_configured(replay, |_| {}, |core| core)
    }

    /// The rig with its config changed by `cfg_tweak` and its core by
    /// `core_tweak` before the first message.
    fn rig_configured(
        replay: Arc<dyn ReplayCache>,
        cfg_tweak: impl FnOnce(&mut Config),
        core_tweak: impl FnOnce(B2bua) -> B2bua,
    ) -> Rig {
        let store = Arc::new(MemoryKeyStore::new());
        let (_, key) = store
            .create(
                "t",
                KeyKind::Secret,
                None,
                Limits::default(),
                None,
                NOW as u64,
            )
            .unwrap();
        let b = udp(5080);
        let target = SipUri::parse("sip:agent@127.0.0.1:5080").unwrap();
        let mut cfg = Config {
            realm: "tollgate".into(),
            digest_algorithms: vec![Algorithm::Sha256, Algorithm::Md5],
            nonce_lifetime_secs: 300,
            bearer_challenge: false,
            digest_by_source: Vec::new(),
            timers: TimerConfig::default(),
            invite_timeout: Duration::from_secs(60),
            local: HashMap::from([(Transport::Udp, SocketAddr::from(([127, 0, 0, 1], 5060)))]),
            advertise: None,
            max_message_bytes: message::DEFAULT_MAX_MESSAGE_BYTES,
            routes: vec![Route {
                model: None,
                prefix: None,
                auth: None,
                targets: Vec::new(),
                ping_interval: None,
                target,
                target_text: "sip:agent@127.0.0.1:5080".into(),
                peer: b.clone(),
                media: MediaProfile::Auto,
                sdes_over_cleartext: false,
            }],
            numbers: NumberPlan::default(),
            checks_numbers: true,
        };
        cfg_tweak(&mut cfg);
        Rig {
            b2b: core_tweak(B2bua::new(cfg, store, replay, [7; 32])),
            t: Instant::now(),
            key,
            a: udp(5070),
            b,
        }
    }

    impl Rig {
        pub(super) fn token(&self, jti: &str) -> String {
            jwt::mint(
                &self.key,
                &Claims {
                    iat: NOW,
                    exp: NOW + 300,
                    jti: jti.into(),
                    to: "+14155550100".into(),
                    from: "+14155550199".into(),
                    model: Some("m1".into()),
                    webhook: None,
                    record: None,
                    max_duration: None,
                },
            )
        }
        pub(super) fn a_sends(&mut self, text: &str) {
            let p = self.a.clone();
            self.b2b.handle_datagram(self.t, NOW, text.as_bytes(), p);
        }
        pub(super) fn b_sends(&mut self, text: String) {
            let p = self.b.clone();
            self.b2b.handle_datagram(self.t, NOW, text.as_bytes(), p);
        }
        /// Messages sent to `peer` since the last call, parsed.
        pub(super) fn sent_to(&mut self, peer: &Peer) -> Vec<Message> {
            let (mine, rest): (Vec<_>, Vec<_>) = self
                .b2b
                .txn
                .out
                .drain(..)
                .partition(|t| t.peer.addr == peer.addr);
            self.b2b.txn.out.extend(rest);
            mine.iter().map(|t| parse(&t.data).unwrap()).collect()
        }
        /// A's BYE (CSeq 2) in the one call of the rig (`call-a`).
        fn bye_from_a(&mut self) {
            let to = self.b2b.calls.values().next().unwrap().a.local_tag.clone();
            self.a_sends(&in_dialog(
                "BYE",
                "<sip:+14155550199@127.0.0.1>;tag=a1",
                &format!("<sip:+14155550100@127.0.0.1>;tag={to}"),
                "call-a",
                2,
                5070,
            ));
        }
        pub(super) fn advance(&mut self, d: Duration) {
            let end = self.t + d;
            while self.t < end {
                self.t += Duration::from_millis(100);
                self.b2b.handle_timeout(self.t);
            }
        }
    }

    /// A shared replay cache that cannot be reached (SPEC §8, `refuse`).
    struct DownCache;
    impl ReplayCache for DownCache {
        fn first_use(&self, _: &str, _: i64, _: i64) -> bool {
            false
        }
        fn record_use(&self, _: &str, _: i64, _: i64) -> tollgate_keys::Use {
            tollgate_keys::Use::Unavailable
        }
    }

    #[test]
    fn shared_state_unreachable_is_503_with_retry_after() {
        let mut r = rig_with(Arc::new(DownCache));
        let tok = r.token("j-down");
        r.a_sends(&invite(
            &format!("Authorization: Bearer {tok}\r\n"),
            "z9hG4bKd1",
        ));
        let to_a = r.sent_to(&r.a.clone());
        assert_eq!(to_a.len(), 1, "one stateless answer");
        assert_eq!(to_a[0].status(), Some(503));
        assert_eq!(to_a[0].header("Retry-After"), Some("5"));
        assert!(r.sent_to(&r.b.clone()).is_empty(), "nothing reaches leg B");
        assert!(r.b2b.calls.is_empty());
    }

    pub(super) fn invite(auth: &str, branch: &str) -> String {
        format!(
            "INVITE sip:+14155550100@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch};rport\r\n\
From: <sip:+14155550199@127.0.0.1>;tag=a1\r\n\
To: <sip:+14155550100@127.0.0.1>\r\n\
Call-ID: call-a\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:a@127.0.0.1:5070>\r\n\
X-Tollgate-Model: spoofed\r\n\
{auth}Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n"
        )
    }

    /// A response from B to a request B received.
    pub(super) fn reply_from_b(req: &Message, code: u16, tag: &str) -> String {
        let mut r = response_to(req, code, reason_phrase(code), Some(tag));
        if code == 200 && req.method() == Some("INVITE") {
            r.headers.push(Header {
                name: "Contact".into(),
                value: "<sip:agent@127.0.0.1:5080>".into(),
            });
        }
        String::from_utf8(r.to_bytes().to_vec()).unwrap()
    }

    fn in_dialog(
        method: &str,
        from: &str,
        to: &str,
        call_id: &str,
        cseq: u32,
        port: u16,
    ) -> String {
        format!(
            "{method} sip:tollgate@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{method}{cseq}{port}\r\n\
From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\r\n"
        )
    }

    /// Sets up an answered call; returns B's INVITE as B saw it.
    fn answered_call(r: &mut Rig) -> Message {
        let tok = r.token("j1");
        r.a_sends(&invite(
            &format!("Authorization: Bearer {tok}\r\n"),
            "z9hG4bKa1",
        ));
        let to_a = r.sent_to(&r.a.clone());
        assert_eq!(to_a[0].status(), Some(100));
        let to_b = r.sent_to(&r.b.clone());
        assert_eq!(to_b.len(), 1);
        let inv = to_b[0].clone();
        r.b_sends(reply_from_b(&inv, 180, "b1"));
        r.b_sends(reply_from_b(&inv, 200, "b1"));
        let to_a = r.sent_to(&r.a.clone());
        assert_eq!(
            to_a.iter().map(|m| m.status().unwrap()).collect::<Vec<_>>(),
            vec![180, 200]
        );
        // A's ACK becomes B's ACK.
        let a_tag = to_a[1].to_tag().unwrap().to_string();
        r.a_sends(&in_dialog(
            "ACK",
            "<sip:+14155550199@127.0.0.1>;tag=a1",
            &format!("<sip:+14155550100@127.0.0.1>;tag={a_tag}"),
            "call-a",
            1,
            5070,
        ));
        let to_b = r.sent_to(&r.b.clone());
        assert_eq!(to_b.len(), 1);
        assert_eq!(to_b[0].method(), Some("ACK"));
        assert_eq!(to_b[0].request_uri(), Some("sip:agent@127.0.0.1:5080"));
        inv
    }

    #[test]
    fn leg_b_is_a_fresh_dialog_with_runtime_headers_and_no_credentials() {
        let mut r = rig();
        let inv = answered_call(&mut r);
        assert_ne!(inv.call_id(), Some("call-a"));
        assert!(inv.header("Authorization").is_none());
        assert_eq!(
            inv.header("X-Tollgate-Model"),
            Some("m1"),
            "from the token, not from A"
        );
        assert_eq!(inv.headers_named("X-Tollgate-Model").count(), 1);
        assert_eq!(inv.header("X-Tollgate-Key"), Some(r.key.id()));
        assert_eq!(&inv.body[..], b"v=0\n");
        assert_eq!(inv.header("Max-Forwards"), Some("69"));
        assert_eq!(r.b2b.calls_active(), 1);
    }

    #[test]
    fn ended_calls_do_not_pile_up_in_the_deadline_heap() {
        let mut r = rig();
        // One call stays up throughout (an idle core simply drops them all);
        // 3,000 calls refused by B within their 60 s INVITE timeout each
        // leave that deadline behind, still far from due.
        answered_call(&mut r);
        for i in 0..3000 {
            let tok = r.token(&format!("jd{i}"));
            let text = invite(
                &format!("Authorization: Bearer {tok}\r\n"),
                &format!("z9hG4bKd{i}"),
            )
            .replace("call-a", &format!("call-{i}"));
            r.a_sends(&text);
            let inv = r.sent_to(&r.b.clone()).pop().expect("the INVITE to B");
            r.b_sends(reply_from_b(&inv, 486, "b1"));
            let to_a = r.sent_to(&r.a.clone());
            assert_eq!(to_a.last().and_then(|m| m.status()), Some(486), "call {i}");
            r.sent_to(&r.b.clone());
        }
        let c = r.b2b.census();
        assert_eq!(c.calls, 1);
        assert!(
            c.deadlines <= COMPACT_DEADLINES_ABOVE + 1,
            "{} deadlines queued after 3,000 ended calls",
            c.deadlines
        );
        // The completed transactions linger (retransmissions), then go.
        assert!(c.transactions > 3000, "{c:?}");
        let index = c.index;
        r.advance(Duration::from_secs(70));
        let c = r.b2b.census();
        assert_eq!((c.calls, c.transactions), (1, 0), "{c:?}");
        assert!(c.index <= index && c.index <= 3, "{c:?}");

        // The last call ends: nothing is left.
        r.bye_from_a();
        let bye = r.sent_to(&r.b.clone());
        r.b_sends(reply_from_b(&bye[0], 200, "b1"));
        r.advance(Duration::from_secs(70));
        assert_eq!(r.b2b.census(), Census::default());
    }

    #[test]
    fn bye_from_either_side_ends_both_legs() {
        for from_b in [false, true] {
            let mut r = rig();
            let inv = answered_call(&mut r);
            if from_b {
                let from = "<sip:agent@127.0.0.1>;tag=b1";
                let to = inv.header("From").unwrap().to_string();
                r.b_sends(in_dialog("BYE", from, &to, inv.call_id().unwrap(), 2, 5080));
                assert_eq!(r.sent_to(&r.b.clone())[0].status(), Some(200));
                let bye = r.sent_to(&r.a.clone());
                assert_eq!(bye[0].method(), Some("BYE"));
                assert_eq!(bye[0].call_id(), Some("call-a"));
                assert_eq!(bye[0].request_uri(), Some("sip:a@127.0.0.1:5070"));
                let ok =
                    String::from_utf8(response_to(&bye[0], 200, "OK", None).to_bytes().to_vec())
                        .unwrap();
                r.a_sends(&ok);
            } else {
                r.bye_from_a();
                assert_eq!(r.sent_to(&r.a.clone())[0].status(), Some(200));
                let bye = r.sent_to(&r.b.clone());
                assert_eq!(bye[0].method(), Some("BYE"));
                assert_eq!(bye[0].to_tag(), Some("b1"));
                r.b_sends(reply_from_b(&bye[0], 200, "b1"));
            }
            assert_eq!(r.b2b.calls_active(), 0, "from_b={from_b}");
            assert!(r.b2b.by_client.is_empty());
        }
    }

    #[test]
    fn record_route_of_leg_a_is_echoed_and_routes_the_edge_bye() {
        let mut r = rig();
        let tok = r.token("rr1");
        let rr = "Record-Route: <sip:127.0.0.1:5070;lr;ftag=a1>\r\n\
                  Record-Route: <sip:127.0.0.3;lr>\r\n";
        r.a_sends(&invite(
            &format!("{rr}Authorization: Bearer {tok}\r\n"),
            "z9hG4bKrr1",
        ));
        r.sent_to(&r.a.clone());
        let inv = r.sent_to(&r.b.clone()).remove(0);
        assert_eq!(
            inv.headers_named("Record-Route").count(),
            0,
            "leg B is a fresh dialog"
        );
        r.b_sends(reply_from_b(&inv, 180, "b1"));
        r.b_sends(reply_from_b(&inv, 200, "b1"));
        let to_a = r.sent_to(&r.a.clone());
        let want = ["<sip:127.0.0.1:5070;lr;ftag=a1>", "<sip:127.0.0.3;lr>"];
        for m in &to_a {
            let got: Vec<_> = m.headers_named("Record-Route").collect();
            assert_eq!(got, want, "{:?}", m.status());
        }
        // The edge's BYE on leg A follows that route set (UAS: same order).
        let from = "<sip:agent@127.0.0.1>;tag=b1";
        let to = inv.header("From").unwrap().to_string();
        r.b_sends(in_dialog("BYE", from, &to, inv.call_id().unwrap(), 2, 5080));
        let bye = r.sent_to(&r.a.clone()).remove(0);
        assert_eq!(bye.method(), Some("BYE"));
        assert_eq!(bye.headers_named("Route").collect::<Vec<_>>(), want);
    }

    #[test]
    fn contact_over_tls_follows_the_request_scheme() {
        let r = rig();
        let sip = parse(invite("", "z9hG4bKc1").as_bytes()).unwrap();
        let sips = invite("", "z9hG4bKc2").replace("INVITE sip:", "INVITE sips:");
        let sips = parse(sips.as_bytes()).unwrap();
        let c = |t, m: &Message| r.b2b.contact_answering(t, m, r.a.addr.ip()).value;
        assert_eq!(
            c(Transport::Tls, &sip),
            "<sip:tollgate@127.0.0.1:5060;transport=tls>"
        );
        assert_eq!(c(Transport::Tls, &sips), "<sips:tollgate@127.0.0.1:5060>");
        assert_eq!(c(Transport::Udp, &sip), "<sip:tollgate@127.0.0.1:5060>");
    }

    #[test]
    fn reinvite_and_update_pass_through_in_both_directions() {
        let mut r = rig();
        let inv = answered_call(&mut r);
        let a_tag = r.b2b.calls.values().next().unwrap().a.local_tag.clone();
        let a_from = "<sip:+14155550199@127.0.0.1>;tag=a1";
        let a_to = format!("<sip:+14155550100@127.0.0.1>;tag={a_tag}");
        // re-INVITE from A with a new offer.
        let reinvite = in_dialog("INVITE", a_from, &a_to, "call-a", 2, 5070).replace(
            "\r\n\r\n",
            "\r\nContent-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=1\n",
        );
        r.a_sends(&reinvite);
        assert_eq!(r.sent_to(&r.a.clone())[0].status(), Some(100));
        let to_b = r.sent_to(&r.b.clone()).remove(0);
        assert_eq!(to_b.method(), Some("INVITE"));
        assert_eq!(to_b.call_id(), inv.call_id());
        assert_eq!(to_b.to_tag(), Some("b1"));
        assert_eq!(to_b.cseq().unwrap().seq, 2);
        assert_eq!(&to_b.body[..], b"v=1\n");
        r.b_sends(reply_from_b(&to_b, 200, "b1"));
        let ok = r.sent_to(&r.a.clone()).remove(0);
        assert_eq!(
            (ok.status(), ok.to_tag()),
            (Some(200), Some(a_tag.as_str()))
        );
        r.a_sends(&in_dialog("ACK", a_from, &a_to, "call-a", 2, 5070));
        let ack = r.sent_to(&r.b.clone()).remove(0);
        assert_eq!((ack.method(), ack.cseq().unwrap().seq), (Some("ACK"), 2));
        // UPDATE from B.
        let b_from = "<sip:agent@127.0.0.1>;tag=b1";
        let b_to = inv.header("From").unwrap().to_string();
        r.b_sends(in_dialog(
            "UPDATE",
            b_from,
            &b_to,
            inv.call_id().unwrap(),
            3,
            5080,
        ));
        let upd = r.sent_to(&r.a.clone()).remove(0);
        assert_eq!(upd.method(), Some("UPDATE"));
        assert_eq!(upd.call_id(), Some("call-a"));
        assert_eq!(upd.from_tag(), Some(a_tag.as_str()));
        assert_eq!(upd.to_tag(), Some("a1"));
        let ok = String::from_utf8(response_to(&upd, 200, "OK", None).to_bytes().to_vec()).unwrap();
        r.a_sends(&ok);
        let ok_b = r.sent_to(&r.b.clone()).remove(0);
        assert_eq!((ok_b.status(), ok_b.cseq().unwrap().seq), (Some(200), 3));
        assert_eq!(r.b2b.calls_active(), 1);
    }

    /// A call ringing on leg B; returns B's INVITE and the CANCEL leg A
    /// would send for it.
    fn ringing_call(r: &mut Rig, jti: &str, branch: &str) -> (Message, String) {
        let tok = r.token(jti);
        let text = invite(&format!("Authorization: Bearer {tok}\r\n"), branch);
        r.a_sends(&text);
        let inv = r.sent_to(&r.b.clone()).remove(0);
        r.b_sends(reply_from_b(&inv, 180, "b1"));
        r.sent_to(&r.a.clone());
        let cancel = text
            .replacen("INVITE sip", "CANCEL sip", 1)
            .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
        (inv, cancel)
    }

    #[test]
    fn cancel_before_answer_gives_487_and_cancels_leg_b() {
        let mut r = rig();
        let (inv, cancel) = ringing_call(&mut r, "j2", "z9hG4bKc1");
        r.a_sends(&cancel);
        let to_a: Vec<_> = r
            .sent_to(&r.a.clone())
            .iter()
            .map(|m| m.status().unwrap())
            .collect();
        assert_eq!(to_a, vec![200, 487]);
        let c = r.sent_to(&r.b.clone()).remove(0);
        assert_eq!(c.method(), Some("CANCEL"));
        assert_eq!(c.top_via().unwrap().branch, inv.top_via().unwrap().branch);
        r.b_sends(reply_from_b(&c, 200, "b1"));
        r.b_sends(reply_from_b(&inv, 487, "b1"));
        assert_eq!(r.sent_to(&r.b.clone())[0].method(), Some("ACK"));
        assert_eq!(r.b2b.calls_active(), 0);
    }

    #[test]
    fn a_cancel_from_another_source_gets_481_and_the_call_goes_on() {
        let mut r = rig();
        let (_, cancel) = ringing_call(&mut r, "jc", "z9hG4bKcs");
        let intruder = Peer {
            addr: SocketAddr::from(([127, 0, 0, 2], 5070)),
            ..r.a.clone()
        };
        r.b2b
            .handle_datagram(r.t, NOW, cancel.as_bytes(), intruder.clone());
        let to_intruder = r.sent_to(&intruder);
        assert_eq!(
            to_intruder.iter().map(|m| m.status()).collect::<Vec<_>>(),
            vec![Some(481)]
        );
        assert!(r.sent_to(&r.a.clone()).is_empty(), "leg A hears nothing");
        assert!(r.sent_to(&r.b.clone()).is_empty(), "no CANCEL to leg B");
        assert_eq!(r.b2b.calls_active(), 1);
        // The caller's own CANCEL still works.
        r.a_sends(&cancel);
        let to_a: Vec<_> = r.sent_to(&r.a.clone()).iter().map(|m| m.status()).collect();
        assert_eq!(to_a, vec![Some(200), Some(487)]);
    }

    #[test]
    fn an_oversized_request_gets_513_without_being_parsed() {
        let mut r = rig();
        let options = |body: usize| {
            format!(
                "OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKbig;rport\r\n\
From: <sip:p@127.0.0.1>;tag=p1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: big\r\n\
CSeq: 1 OPTIONS\r\nContent-Type: text/plain\r\nContent-Length: {body:05}\r\n\r\n{}",
                "x".repeat(body)
            )
        };
        let head = options(0).len();
        let big = options(message::DEFAULT_MAX_MESSAGE_BYTES + 1 - head);
        assert_eq!(big.len(), message::DEFAULT_MAX_MESSAGE_BYTES + 1);
        r.a_sends(&big);
        let to_a = r.sent_to(&r.a.clone());
        assert_eq!(to_a.len(), 1);
        assert_eq!(to_a[0].status(), Some(513));
        assert_eq!(to_a[0].header("Call-ID"), Some("big"));
        // At the cap it is an ordinary OPTIONS.
        let fits = options(message::DEFAULT_MAX_MESSAGE_BYTES - head);
        r.a_sends(&fits);
        assert_eq!(r.sent_to(&r.a.clone())[0].status(), Some(200));
        // An oversized response or ACK gets nothing.
        let ack = big.replacen("OPTIONS sip", "ACK sip", 1);
        r.a_sends(&ack);
        r.a_sends(&format!(
            "SIP/2.0 200 OK\r\n{}",
            &big[big.find("Via").unwrap()..]
        ));
        assert!(r.b2b.txn.out.is_empty());
    }

    #[test]
    fn a_wildcard_listener_names_the_route_source_and_advertise_wins() {
        struct Fixed;
        impl SourceRoute for Fixed {
            fn source_ip(&self, _: IpAddr) -> Option<IpAddr> {
                Some(IpAddr::from([127, 0, 0, 1]))
            }
        }
        for (advertise, expect) in [
            (None, "127.0.0.1:5060"),
            (Some("127.0.0.5"), "127.0.0.5:5060"),
        ] {
            let mut r = rig_configured(
                Arc::new(MemoryReplayCache::new()),
                |cfg| {
                    cfg.local =
                        HashMap::from([(Transport::Udp, SocketAddr::from(([0, 0, 0, 0], 5060)))]);
                    cfg.advertise = advertise.map(|a| a.parse().unwrap());
                },
                |core| core.with_source_route(Arc::new(Fixed)),
            );
            let tok = r.token("jw");
            r.a_sends(&invite(
                &format!("Authorization: Bearer {tok}\r\n"),
                "z9hG4bKw1",
            ));
            let inv = r.sent_to(&r.b.clone()).remove(0);
            r.b_sends(reply_from_b(&inv, 200, "b1"));
            let ok = r.sent_to(&r.a.clone()).pop().unwrap();
            assert_eq!(ok.status(), Some(200));
            assert!(ok.header("Contact").unwrap().contains(expect), "{ok:?}");
            assert!(inv.header("Via").unwrap().contains(expect), "{inv:?}");
            assert!(inv.header("Contact").unwrap().contains(expect), "{inv:?}");
            assert!(
                inv.header("From").unwrap().contains(&expect[..9]),
                "{inv:?}"
            );
            r.bye_from_a();
            let mut sent = vec![inv, ok];
            sent.extend(r.sent_to(&r.a.clone()));
            sent.extend(r.sent_to(&r.b.clone()));
            for m in sent {
                let t = String::from_utf8(m.to_bytes().to_vec()).unwrap();
                assert!(!t.contains("0.0.0.0"), "{t}");
            }
        }
    }

    #[test]
    fn silent_leg_b_gives_408_after_timer_b_and_busy_is_relayed() {
        let mut r = rig();
        let tok = r.token("j3");
        r.a_sends(&invite(
            &format!("Authorization: Bearer {tok}\r\n"),
            "z9hG4bKt1",
        ));
        r.sent_to(&r.a.clone());
        r.advance(Duration::from_secs(33));
        let retrans = r.sent_to(&r.b.clone());
        assert_eq!(retrans.len(), 7, "INVITE + 6 Timer A retransmissions");
        let to_a = r.sent_to(&r.a.clone());
        assert_eq!(to_a[0].status(), Some(408));
        assert_eq!(r.b2b.calls_active(), 0);

        let tok = r.token("j4");
        r.a_sends(&invite(
            &format!("Authorization: Bearer {tok}\r\n"),
            "z9hG4bKt2",
        ));
        let inv = r.sent_to(&r.b.clone()).remove(0);
        r.b_sends(reply_from_b(&inv, 486, "b2"));
        assert_eq!(r.sent_to(&r.b.clone())[0].method(), Some("ACK"));
        let to_a: Vec<_> = r
            .sent_to(&r.a.clone())
            .iter()
            .map(|m| m.status().unwrap())
            .collect();
        assert_eq!(to_a, vec![100, 486]);
        assert_eq!(r.b2b.calls_active(), 0);
    }

    #[test]
    fn ringing_forever_is_cancelled_at_the_invite_timeout_and_given_up_later() {
        let mut r = rig();
        let tok = r.token("j5");
        r.a_sends(&invite(
            &format!("Authorization: Bearer {tok}\r\n"),
            "z9hG4bKr1",
        ));
        let inv = r.sent_to(&r.b.clone()).remove(0);
        r.b_sends(reply_from_b(&inv, 180, "b1"));
        r.advance(Duration::from_secs(61));
        let statuses: Vec<_> = r
            .sent_to(&r.a.clone())
            .iter()
            .map(|m| m.status().unwrap())
            .collect();
        assert!(statuses.contains(&408), "{statuses:?}");
        assert!(r
            .sent_to(&r.b.clone())
            .iter()
            .any(|m| m.method() == Some("CANCEL")));
        // B ignores the CANCEL too: the call is dropped 64*T1 later.
        r.advance(Duration::from_secs(40));
        assert_eq!(r.b2b.calls_active(), 0);
    }

    #[test]
    fn credentials_are_checked_before_any_state_is_kept() {
        let mut r = rig();
        r.a_sends(&invite("", "z9hG4bKn1"));
        let resp = r.sent_to(&r.a.clone()).remove(0);
        assert_eq!(resp.status(), Some(401));
        let ch: Vec<_> = resp.headers_named("WWW-Authenticate").collect();
        // Digest only by default (SPEC §4).
        assert!(!ch.is_empty());
        assert!(ch.iter().all(|c| c.starts_with("Digest ")), "{ch:?}");
        r.a_sends(&invite(
            "Authorization: Bearer abc.def.ghi\r\n",
            "z9hG4bKn2",
        ));
        let resp = r.sent_to(&r.a.clone()).remove(0);
        assert_eq!(
            resp.header("WWW-Authenticate"),
            Some("Bearer realm=\"tollgate\", error=\"invalid_token\"")
        );
        assert_eq!(r.b2b.txn.len(), (0, 0));
        assert_eq!(r.b2b.calls_active(), 0);
        assert!(r.sent_to(&r.b.clone()).is_empty());
    }

    #[test]
    fn retransmitted_invite_is_absorbed_not_rechecked() {
        let mut r = rig();
        let tok = r.token("j6");
        let text = invite(&format!("Authorization: Bearer {tok}\r\n"), "z9hG4bKx1");
        r.a_sends(&text);
        r.a_sends(&text);
        let to_a: Vec<_> = r
            .sent_to(&r.a.clone())
            .iter()
            .map(|m| m.status().unwrap())
            .collect();
        assert_eq!(
            to_a,
            vec![100, 100],
            "the retransmission gets the 100 again, not a 401"
        );
        assert_eq!(r.sent_to(&r.b.clone()).len(), 1);
    }

    /// Offer/answer through anchoring media hooks: late offers (INVITE
    /// without SDP), offers from leg B (re-INVITE, UPDATE), re-INVITEs
    /// without SDP, and their failures.
    mod offer_answer {
        use super::*;
        use std::sync::Mutex;

        /// Anchoring hooks that log every call and rewrite a body by
        /// prefixing who rewrote it; an SDP containing `bad` is refused.
        #[derive(Clone, Default)]
        struct Hooks(Arc<Mutex<Vec<String>>>);

        impl Hooks {
            fn log(&self) -> Vec<String> {
                std::mem::take(&mut *self.0.lock().unwrap())
            }
            fn push(&self, s: String) {
                self.0.lock().unwrap().push(s);
            }
        }

        fn body(sdp: &[u8]) -> String {
            String::from_utf8_lossy(sdp).trim().to_string()
        }

        impl MediaHooks for Hooks {
            fn offer(
                &mut self,
                call: u64,
                sdp: &[u8],
                p: MediaProfile,
                ip: IpAddr,
            ) -> Result<Bytes, u16> {
                self.offer_from(call, Side::A, sdp, MediaProfile::Auto, p, ip)
            }
            fn offer_from(
                &mut self,
                _: u64,
                from: Side,
                sdp: &[u8],
                _: MediaProfile,
                _: MediaProfile,
                _: IpAddr,
            ) -> Result<Bytes, u16> {
                self.push(format!("offer {from:?} {}", body(sdp)));
                if body(sdp).contains("bad") {
                    return Err(488);
                }
                Ok(Bytes::from(format!(
                    "v=0 offer-from-{from:?} {}\n",
                    body(sdp)
                )))
            }
            fn answer(&mut self, _: u64, sdp: &[u8], _: IpAddr) -> Result<Bytes, u16> {
                self.push(format!("answer {}", body(sdp)));
                if body(sdp).contains("bad") {
                    return Err(488);
                }
                Ok(Bytes::from(format!("v=0 answer {}\n", body(sdp))))
            }
            fn release(&mut self, _: u64) {
                self.push("release".into());
            }
            fn anchors(&self) -> bool {
                true
            }
            fn cancel_offer(&mut self, _: u64) {
                self.push("cancel".into());
            }
        }

        fn anchored_rig() -> (Rig, Hooks) {
            let mut r = rig();
            let hooks = Hooks::default();
            r.b2b = r.b2b.with_media(Box::new(hooks.clone()));
            (r, hooks)
        }

        /// `text` (a SIP message) with `sdp` as its body.
        fn with_sdp(text: &str, sdp: &str) -> String {
            let mut m = parse(text.as_bytes()).unwrap();
            m.remove_headers("Content-Type");
            m.headers.push(Header {
                name: "Content-Type".into(),
                value: "application/sdp".into(),
            });
            m.body = Bytes::from(sdp.to_string());
            String::from_utf8(m.to_bytes().to_vec()).unwrap()
        }

        fn text(m: &Message) -> String {
            String::from_utf8(m.to_bytes().to_vec()).unwrap()
        }

        fn without_body(text: &str) -> String {
            let mut m = parse(text.as_bytes()).unwrap();
            m.remove_headers("Content-Type");
            m.body = Bytes::new();
            String::from_utf8(m.to_bytes().to_vec()).unwrap()
        }

        fn statuses(msgs: &[Message]) -> Vec<u16> {
            msgs.iter().filter_map(|m| m.status()).collect()
        }

        fn ended(r: &mut Rig) -> Option<EndCause> {
            r.b2b.events.iter().find_map(|e| match e {
                CallEvent::Ended { cause, .. } => Some(*cause),
                _ => None,
            })
        }

        struct Dialogs {
            /// B's INVITE as B saw it.
            inv: Message,
            a_to: String,
        }

        const A_FROM: &str = "<sip:+14155550199@127.0.0.1>;tag=a1";
        const B_FROM: &str = "<sip:agent@127.0.0.1>;tag=b1";

        /// A late-offer INVITE from A; returns B's INVITE.
        fn late_invite(r: &mut Rig, jti: &str) -> Message {
            let tok = r.token(jti);
            let text = without_body(&invite(
                &format!("Authorization: Bearer {tok}\r\n"),
                "z9hG4bKlate1",
            ));
            r.a_sends(&text);
            assert_eq!(statuses(&r.sent_to(&r.a.clone())), vec![100]);
            let mut to_b = r.sent_to(&r.b.clone());
            assert_eq!(to_b.len(), 1);
            to_b.remove(0)
        }

        fn a_to(r: &Rig) -> String {
            let tag = r.b2b.calls.values().next().unwrap().a.local_tag.clone();
            format!("<sip:+14155550100@127.0.0.1>;tag={tag}")
        }

        fn a_ack(r: &mut Rig, cseq: u32, sdp: Option<&str>) {
            let to = a_to(r);
            let ack = in_dialog("ACK", A_FROM, &to, "call-a", cseq, 5070);
            match sdp {
                Some(s) => r.a_sends(&with_sdp(&ack, s)),
                None => r.a_sends(&ack),
            }
        }

        /// An answered early-offer call (A offers `v=0 A0`, B answers `v=0 B0`).
        fn anchored_call(r: &mut Rig, h: &Hooks) -> Dialogs {
            let tok = r.token("e1");
            r.a_sends(&with_sdp(
                &invite(&format!("Authorization: Bearer {tok}\r\n"), "z9hG4bKe1"),
                "v=0 A0\n",
            ));
            r.sent_to(&r.a.clone());
            let inv = r.sent_to(&r.b.clone()).remove(0);
            assert_eq!(&inv.body[..], b"v=0 offer-from-A v=0 A0\n");
            r.b_sends(with_sdp(&reply_from_b(&inv, 200, "b1"), "v=0 B0\n"));
            let ok = r.sent_to(&r.a.clone()).remove(0);
            assert_eq!(&ok.body[..], b"v=0 answer v=0 B0\n");
            a_ack(r, 1, None);
            assert_eq!(r.sent_to(&r.b.clone())[0].method(), Some("ACK"));
            assert_eq!(h.log(), vec!["offer A v=0 A0", "answer v=0 B0"]);
            let a_to = a_to(r);
            Dialogs { inv, a_to }
        }

        fn b_request(d: &Dialogs, method: &str, cseq: u32) -> String {
            let to = d.inv.header("From").unwrap().to_string();
            in_dialog(method, B_FROM, &to, d.inv.call_id().unwrap(), cseq, 5080)
        }

        #[test]
        fn late_offer_is_anchored_and_the_answer_rides_in_leg_b_ack() {
            let (mut r, h) = anchored_rig();
            let inv = late_invite(&mut r, "l1");
            assert!(inv.body.is_empty(), "no SDP toward B");
            assert!(inv.header("Content-Type").is_none());
            assert!(h.log().is_empty(), "nothing to anchor yet");
            assert_eq!(
                r.b2b.calls.values().next().unwrap().a_profile,
                MediaProfile::Rtp,
                "leg A's signaling is UDP: no SDES keys may be offered to it"
            );
            // B's offer in its 183 and again in its 200: one rewrite.
            let offer = "v=0 B-offer\n";
            r.b_sends(with_sdp(&reply_from_b(&inv, 183, "b1"), offer));
            r.b_sends(with_sdp(&reply_from_b(&inv, 200, "b1"), offer));
            let to_a = r.sent_to(&r.a.clone());
            assert_eq!(statuses(&to_a), vec![183, 200]);
            for m in &to_a {
                assert_eq!(&m.body[..], b"v=0 offer-from-B v=0 B-offer\n");
                assert_eq!(m.header("Content-Type"), Some("application/sdp"));
            }
            assert!(r.sent_to(&r.b.clone()).is_empty(), "B's ACK waits for A's");
            // A's answer in its ACK, rewritten into B's ACK.
            a_ack(&mut r, 1, Some("v=0 A-answer\n"));
            let ack = r.sent_to(&r.b.clone()).remove(0);
            assert_eq!((ack.method(), ack.cseq().unwrap().seq), (Some("ACK"), 1));
            assert_eq!(&ack.body[..], b"v=0 answer v=0 A-answer\n");
            assert_eq!(ack.header("Content-Type"), Some("application/sdp"));
            assert_eq!(
                h.log(),
                vec![
                    "offer B v=0 B-offer",
                    "offer B v=0 B-offer",
                    "answer v=0 A-answer"
                ]
            );
            // B's 200 again (our ACK was lost): the same ACK, answer included.
            r.b_sends(with_sdp(&reply_from_b(&inv, 200, "b1"), offer));
            let again = r.sent_to(&r.b.clone()).remove(0);
            assert_eq!(again.to_bytes(), ack.to_bytes());
            assert!(r.sent_to(&r.a.clone()).is_empty());
            assert_eq!(r.b2b.calls_active(), 1);
            assert!(h.log().is_empty());
        }

        #[test]
        fn late_offer_ack_without_or_with_an_unusable_answer_ends_both_legs() {
            for answer in [None, Some("v=0 bad answer\n")] {
                let (mut r, h) = anchored_rig();
                let inv = late_invite(&mut r, "l2");
                let offer = "v=0 B-offer\nm=audio 4000 RTP/AVP 0 8\nm=video 4002 RTP/AVP 96\n";
                r.b_sends(with_sdp(&reply_from_b(&inv, 200, "b1"), offer));
                assert_eq!(statuses(&r.sent_to(&r.a.clone())), vec![200]);
                a_ack(&mut r, 1, answer);
                let to_b = r.sent_to(&r.b.clone());
                let methods: Vec<_> = to_b.iter().filter_map(|m| m.method()).collect();
                assert_eq!(methods, vec!["ACK", "BYE"], "{answer:?}");
                // RFC 3261 §13.2.1: B's offer gets an answer rejecting every
                // stream (RFC 3264 §6) in the ACK, then the BYE.
                assert_eq!(to_b[0].header("Content-Type"), Some("application/sdp"));
                let sdp = String::from_utf8_lossy(&to_b[0].body).to_string();
                assert!(
                    sdp.contains("m=audio 0 RTP/AVP 0\r\n")
                        && sdp.contains("m=video 0 RTP/AVP 96\r\n")
                        && sdp.matches("m=").count() == 2,
                    "{sdp:?}"
                );
                let to_a = r.sent_to(&r.a.clone());
                assert_eq!(to_a[0].method(), Some("BYE"));
                assert_eq!(r.b2b.calls_active(), 0);
                assert_eq!(ended(&mut r), Some(EndCause::OfferAnswerFailed));
                assert_eq!(EndCause::OfferAnswerFailed.label(), "offer_answer_failed");
                assert!(h.log().contains(&"release".to_string()));
            }
        }

        #[test]
        fn late_offer_2xx_without_an_offer_or_with_a_refused_one_fails_the_call() {
            for b_body in [None, Some("v=0 bad offer\nm=audio 4000 RTP/SAVP 0\n")] {
                let (mut r, _h) = anchored_rig();
                let inv = late_invite(&mut r, "l3");
                let ok = reply_from_b(&inv, 200, "b1");
                r.b_sends(match b_body {
                    Some(s) => with_sdp(&ok, s),
                    None => ok,
                });
                let to_b = r.sent_to(&r.b.clone());
                let methods: Vec<_> = to_b.iter().filter_map(|m| m.method()).collect();
                assert_eq!(methods, vec!["ACK", "BYE"]);
                // An offer in the 2xx is answered (every stream rejected).
                assert_eq!(
                    to_b[0].body.is_empty(),
                    b_body.is_none(),
                    "{:?}",
                    to_b[0].body
                );
                if b_body.is_some() {
                    assert!(String::from_utf8_lossy(&to_b[0].body).contains("m=audio 0 RTP/SAVP 0"));
                }
                assert_eq!(statuses(&r.sent_to(&r.a.clone())), vec![488]);
                assert_eq!(ended(&mut r), Some(EndCause::Rejected(488)));
                assert_eq!(r.b2b.calls_active(), 0);
            }
        }

        #[test]
        fn a_late_offer_that_times_out_without_ack_still_acks_and_byes_leg_b() {
            let (mut r, _h) = anchored_rig();
            let inv = late_invite(&mut r, "l4");
            r.b_sends(with_sdp(&reply_from_b(&inv, 200, "b1"), "v=0 B-offer\n"));
            r.sent_to(&r.a.clone());
            r.advance(Duration::from_secs(40));
            let to_b = r.sent_to(&r.b.clone());
            let methods: Vec<_> = to_b.iter().filter_map(|m| m.method()).collect();
            assert!(methods.starts_with(&["ACK", "BYE"]), "{methods:?}");
            assert_eq!(ended(&mut r), Some(EndCause::NoAck));
        }

        #[test]
        fn a_sip_i_invite_is_anchored_on_its_sdp_part_and_b_gets_sdp_alone() {
            let (mut r, h) = anchored_rig();
            let tok = r.token("mp");
            let mut m =
                parse(invite(&format!("Authorization: Bearer {tok}\r\n"), "z9hG4bKmp1").as_bytes())
                    .unwrap();
            m.set_header("Content-Type", "multipart/mixed;boundary=unique-boundary-1");
            m.body = Bytes::from_static(
                b"--unique-boundary-1\r\nContent-Type: application/sdp\r\n\r\nv=0 A0\r\n--unique-boundary-1\r\nContent-Type: application/ISUP;version=itu-t92+\r\n\r\n\x01\x00\r\n--unique-boundary-1--\r\n",
            );
            r.a_sends(&text(&m));
            assert_eq!(h.log(), vec!["offer A v=0 A0"]);
            let to_b = r.sent_to(&r.b.clone());
            assert_eq!(to_b.len(), 1, "B gets the INVITE");
            assert_eq!(to_b[0].header("Content-Type"), Some("application/sdp"));
            assert!(!body(&to_b[0].body).contains("ISUP"));
        }

        #[test]
        fn an_invite_with_a_body_we_cannot_read_is_refused_415() {
            let (mut r, h) = anchored_rig();
            let tok = r.token("l5");
            let text = invite(&format!("Authorization: Bearer {tok}\r\n"), "z9hG4bKm1")
                .replace("application/sdp", "multipart/mixed;boundary=x");
            r.a_sends(&text);
            let to_a = r.sent_to(&r.a.clone());
            assert_eq!(statuses(&to_a), vec![100, 415]);
            assert_eq!(to_a[1].header("Accept"), Some("application/sdp"));
            assert!(r.sent_to(&r.b.clone()).is_empty());
            assert!(h.log().is_empty());
            assert_eq!(r.b2b.calls_active(), 0);
        }

        #[test]
        fn an_sdp_in_the_ack_of_an_early_offer_call_does_not_pass_unanchored() {
            let (mut r, h) = anchored_rig();
            let tok = r.token("e9");
            r.a_sends(&with_sdp(
                &invite(&format!("Authorization: Bearer {tok}\r\n"), "z9hG4bKe9"),
                "v=0 A0\n",
            ));
            let inv = r.sent_to(&r.b.clone()).remove(0);
            r.b_sends(with_sdp(&reply_from_b(&inv, 200, "b1"), "v=0 B0\n"));
            r.sent_to(&r.a.clone());
            a_ack(&mut r, 1, Some("v=0 stray 10.9.9.9\n"));
            let ack = r.sent_to(&r.b.clone()).remove(0);
            assert_eq!(ack.method(), Some("ACK"));
            assert!(ack.body.is_empty());
            assert_eq!(h.log(), vec!["offer A v=0 A0", "answer v=0 B0"]);
        }

        #[test]
        fn reinvite_and_update_offers_from_leg_b_are_re_anchored() {
            for method in ["INVITE", "UPDATE"] {
                let (mut r, h) = anchored_rig();
                let d = anchored_call(&mut r, &h);
                r.b_sends(with_sdp(&b_request(&d, method, 2), "v=0 B1\n"));
                if method == "INVITE" {
                    assert_eq!(statuses(&r.sent_to(&r.b.clone())), vec![100]);
                }
                let to_a = r.sent_to(&r.a.clone()).remove(0);
                assert_eq!(to_a.method(), Some(method));
                assert_eq!(to_a.call_id(), Some("call-a"));
                assert_eq!(&to_a.body[..], b"v=0 offer-from-B v=0 B1\n");
                assert_eq!(h.log(), vec!["offer B v=0 B1"]);
                // A answers; the answer goes through the relay back to B.
                let ok = response_to(&to_a, 200, "OK", None);
                r.a_sends(&with_sdp(&text(&ok), "v=0 A1\n"));
                let ok_b = r.sent_to(&r.b.clone()).remove(0);
                assert_eq!((ok_b.status(), ok_b.cseq().unwrap().seq), (Some(200), 2));
                assert_eq!(&ok_b.body[..], b"v=0 answer v=0 A1\n");
                assert_eq!(h.log(), vec!["answer v=0 A1"]);
                if method == "INVITE" {
                    r.b_sends(b_request(&d, "ACK", 2));
                    let ack = r.sent_to(&r.a.clone()).remove(0);
                    assert_eq!((ack.method(), ack.cseq().unwrap().seq), (Some("ACK"), 1));
                }
                assert_eq!(r.b2b.calls_active(), 1);
                // A's re-offer still works after B's.
                r.a_sends(&with_sdp(
                    &in_dialog("UPDATE", A_FROM, &d.a_to, "call-a", 3, 5070),
                    "v=0 A2\n",
                ));
                let upd = r.sent_to(&r.b.clone()).remove(0);
                assert_eq!(&upd.body[..], b"v=0 offer-from-A v=0 A2\n");
            }
        }

        #[test]
        fn a_refused_offer_from_leg_b_keeps_the_call_and_the_old_media() {
            let (mut r, h) = anchored_rig();
            let d = anchored_call(&mut r, &h);
            // Refused by the relay: 488 to B, nothing reaches A.
            r.b_sends(with_sdp(&b_request(&d, "INVITE", 2), "v=0 bad B1\n"));
            assert_eq!(statuses(&r.sent_to(&r.b.clone())), vec![488]);
            assert!(r.sent_to(&r.a.clone()).is_empty());
            // Refused by A: B gets A's refusal, the relay restores the media.
            r.b_sends(with_sdp(&b_request(&d, "INVITE", 3), "v=0 B2\n"));
            let to_a = r.sent_to(&r.a.clone()).remove(0);
            let no = response_to(&to_a, 488, "Not Acceptable Here", None);
            r.a_sends(&text(&no));
            let st = statuses(&r.sent_to(&r.b.clone()));
            assert_eq!(st.last(), Some(&488));
            let hop = r.sent_to(&r.a.clone());
            assert_eq!(hop[0].method(), Some("ACK"), "the 488 is ACKed hop by hop");
            assert_eq!(
                h.log(),
                vec!["offer B v=0 bad B1", "offer B v=0 B2", "cancel"]
            );
            assert_eq!(r.b2b.calls_active(), 1);
            // A 200 whose answer the relay cannot serve ends the call.
            r.b_sends(with_sdp(&b_request(&d, "INVITE", 4), "v=0 B3\n"));
            let to_a = r.sent_to(&r.a.clone()).remove(0);
            let ok = response_to(&to_a, 200, "OK", None);
            r.a_sends(&with_sdp(&text(&ok), "v=0 bad A3\n"));
            let to_a = r.sent_to(&r.a.clone());
            let methods: Vec<_> = to_a.iter().filter_map(|m| m.method()).collect();
            assert_eq!(methods, vec!["ACK", "BYE"], "A's 2xx is ACKed, then BYE");
            let to_b = r.sent_to(&r.b.clone());
            assert!(to_b.iter().any(|m| m.status() == Some(488)));
            assert!(to_b.iter().any(|m| m.method() == Some("BYE")));
            assert_eq!(ended(&mut r), Some(EndCause::OfferAnswerFailed));
        }

        #[test]
        fn a_reinvite_without_sdp_from_leg_b_is_anchored_like_a_late_offer() {
            let (mut r, h) = anchored_rig();
            let d = anchored_call(&mut r, &h);
            r.b_sends(b_request(&d, "INVITE", 2));
            assert_eq!(statuses(&r.sent_to(&r.b.clone())), vec![100]);
            let to_a = r.sent_to(&r.a.clone()).remove(0);
            assert!(to_a.body.is_empty());
            // A offers in its 200; B gets the anchored offer.
            let ok = response_to(&to_a, 200, "OK", None);
            let ok = with_sdp(&text(&ok), "v=0 A1\n");
            r.a_sends(&ok);
            let ok_b = r.sent_to(&r.b.clone()).remove(0);
            assert_eq!(&ok_b.body[..], b"v=0 offer-from-A v=0 A1\n");
            // A's 200 again before B's ACK: absorbed (ours is retransmitted
            // by the transaction), never relayed raw.
            r.a_sends(&ok);
            assert!(r
                .sent_to(&r.b.clone())
                .iter()
                .all(|m| m.body.is_empty() || &m.body[..] == b"v=0 offer-from-A v=0 A1\n"));
            // An UPDATE offer now is glare: 491.
            r.a_sends(&with_sdp(
                &in_dialog("UPDATE", A_FROM, &d.a_to, "call-a", 3, 5070),
                "v=0 A9\n",
            ));
            assert_eq!(statuses(&r.sent_to(&r.a.clone())), vec![491]);
            // B's ACK carries the answer, rewritten into A's ACK.
            r.b_sends(with_sdp(&b_request(&d, "ACK", 2), "v=0 B1\n"));
            let ack = r.sent_to(&r.a.clone()).remove(0);
            assert_eq!(ack.method(), Some("ACK"));
            assert_eq!(&ack.body[..], b"v=0 answer v=0 B1\n");
            assert_eq!(h.log(), vec!["offer A v=0 A1", "answer v=0 B1"]);
            assert_eq!(r.b2b.calls_active(), 1);
        }
    }

    /// The SDES rule: leg A's a=crypto over cleartext signaling gets 488
    /// unless the route allows it; over TLS it passes; leg B's `auto` drops to
    /// `rtp` toward a cleartext target and `srtp` there needs the route's
    /// consent.
    #[test]
    fn sdes_keys_only_over_tls_unless_the_route_allows_cleartext() {
        let savp = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 4000 RTP/SAVP 0\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n";
        let offer = |r: &Rig, jti: &str| {
            invite(
                &format!("Authorization: Bearer {}\r\n", r.token(jti)),
                &format!("z9hG4bK{jti}"),
            )
            .replace(
                "Content-Length: 4\r\n\r\nv=0\n",
                &format!("Content-Length: {}\r\n\r\n{savp}", savp.len()),
            )
        };
        assert!(sdp_has_sdes(savp.as_bytes()));
        assert!(!sdp_has_sdes(
            b"v=0\r\nm=audio 4000 RTP/AVP 0\r\na=cryptox\r\n"
        ));

        // Over UDP: refused with 488 and a Warning; nothing reaches B.
        let mut r = rig();
        let inv = offer(&r, "s1");
        r.a_sends(&inv);
        let to_a = r.sent_to(&r.a.clone());
        let last = to_a.last().unwrap();
        assert_eq!(last.status(), Some(488));
        assert!(last.header("Warning").unwrap().contains("TLS"));
        assert!(r.sent_to(&r.b.clone()).is_empty());
        assert_eq!(r.b2b.calls_active(), 0);

        // Over TLS: admitted.
        let mut r = rig();
        r.a.transport = Transport::Tls;
        r.a.flow = Some(crate::transaction::FlowId(1));
        let inv = offer(&r, "s2").replace("SIP/2.0/UDP", "SIP/2.0/TLS");
        r.a_sends(&inv);
        assert_eq!(r.sent_to(&r.b.clone()).len(), 1, "INVITE reaches B");

        // Over UDP on a route that allows cleartext SDES: admitted.
        let mut r = rig();
        r.b2b.cfg.routes[0].sdes_over_cleartext = true;
        let inv = offer(&r, "s3");
        r.a_sends(&inv);
        assert_eq!(r.sent_to(&r.b.clone()).len(), 1);

        // Leg B's profile.
        let mut route = r.b2b.cfg.routes[0].clone();
        route.sdes_over_cleartext = false;
        for (media, want) in [
            (MediaProfile::Auto, Ok(MediaProfile::Rtp)),
            (MediaProfile::Rtp, Ok(MediaProfile::Rtp)),
            (MediaProfile::Srtp, Err(500)),
        ] {
            route.media = media;
            assert_eq!(leg_b_profile(&route), want);
        }
        route.sdes_over_cleartext = true;
        assert_eq!(leg_b_profile(&route), Ok(MediaProfile::Srtp));
        route.sdes_over_cleartext = false;
        route.peer.transport = Transport::Tls;
        assert_eq!(leg_b_profile(&route), Ok(MediaProfile::Srtp));
    }
}
