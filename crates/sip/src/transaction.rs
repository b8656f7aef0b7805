//! RFC 3261 §17 transactions (with the RFC 6026 "Accepted" states), sans-IO:
//! every entry point takes `now`, sends by pushing [`Transmit`]s and reports to
//! the transaction user by pushing [`TxnEvent`]s. Timers A, B, D, E, F, G, H,
//! I, J, K, L and M are kept per transaction and driven by [`TxnLayer::handle_timeout`].

use crate::message::{Message, StartLine};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Transport protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }
    /// The name used in `Via` (`SIP/2.0/UDP`).
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// One connection of a stream transport, named by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId(pub u64);

/// Where a message came from or goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// The connection to reuse on stream transports (responses and in-dialog
    /// requests go back over the flow the peer opened).
    pub flow: Option<FlowId>,
}

/// Bytes to put on the wire.
#[derive(Debug, Clone)]
pub struct Transmit {
    pub peer: Peer,
    pub data: Bytes,
}

/// RFC 3261 timer base values.
#[derive(Debug, Clone, Copy)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// A transaction's identity: the top Via branch and the method (ACK maps to
/// INVITE), and for a server transaction the top Via's sent-by too (RFC 3261
/// §17.2.3: a request with the same branch from another sent-by is another
/// transaction). Client transactions match on branch and CSeq method alone
/// (§17.1.3), so their `sent_by` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnKey {
    pub branch: String,
    pub method: String,
    /// `host:port` of the top Via (host lowercased, port 5060/5061 when
    /// absent); empty for client transactions.
    pub sent_by: String,
}

impl TxnKey {
    /// The client-transaction key of a request we send or of a response to
    /// it: branch and method.
    pub fn of(msg: &Message) -> Option<TxnKey> {
        let branch = msg.top_via()?.branch?;
        let method = match msg.method() {
            Some("ACK") => "INVITE".to_string(),
            Some(m) => m.to_string(),
            None => msg.cseq()?.method,
        };
        Some(TxnKey {
            branch,
            method,
            sent_by: String::new(),
        })
    }

    /// The server-transaction key of a request received (§17.2.3): branch,
    /// sent-by and method.
    pub fn server(msg: &Message) -> Option<TxnKey> {
        let via = msg.top_via()?;
        let mut key = TxnKey::of(msg)?;
        let port = via
            .port
            .unwrap_or(if via.transport == "TLS" { 5061 } else { 5060 });
        key.sent_by = format!("{}:{port}", via.host.to_ascii_lowercase());
        Some(key)
    }
}

/// What an incoming request is, as far as transactions go.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestMatch {
    /// A retransmission or an ACK for a non-2xx final: handled here.
    Absorbed,
    /// A new request: the TU answers it, statelessly or by creating a server
    /// transaction with [`TxnLayer::create_server`].
    New,
    /// An ACK that matched no transaction: for a 2xx, so the dialog's.
    Ack2xx,
    /// A CANCEL for the INVITE server transaction named.
    Cancel(TxnKey),
}

/// Reports to the transaction user.
#[derive(Debug)]
pub enum TxnEvent {
    /// A response for a client transaction (each 2xx, retransmissions too; other
    /// responses once).
    Response { key: TxnKey, msg: Message },
    /// Timer B or F: no final response came.
    Timeout { key: TxnKey },
    /// Timer L: a 2xx we sent was never acknowledged.
    /// `request` is the INVITE the 2xx answered, for the TU to find its
    /// dialog by.
    NoAck { key: TxnKey, request: Message },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

#[derive(Debug)]
struct ServerTxn {
    /// Shared with the map and every timer entry: arming a timer copies no
    /// string.
    key: Arc<TxnKey>,
    invite: bool,
    /// The request, until a final response other than an INVITE's 2xx is
    /// sent: after that, absorbing a retransmission needs only the key and
    /// `last` (a completed transaction lingers 32 s over UDP; keeping the
    /// parsed request for it was most of the signaling memory per call).
    /// An accepted INVITE keeps it for [`TxnEvent::NoAck`].
    request: Option<Message>,
    peer: Peer,
    state: State,
    last: Option<Bytes>,
    retransmit_at: Option<Instant>,
    interval: Duration,
    end_at: Option<Instant>,
}

#[derive(Debug)]
struct ClientTxn {
    key: Arc<TxnKey>,
    invite: bool,
    request: Message,
    bytes: Bytes,
    peer: Peer,
    state: State,
    ack: Option<Bytes>,
    retransmit_at: Option<Instant>,
    interval: Duration,
    end_at: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerRef {
    Server(Arc<TxnKey>),
    Client(Arc<TxnKey>),
}

/// All transactions of one endpoint.
#[derive(Debug)]
pub struct TxnLayer {
    cfg: TimerConfig,
    servers: HashMap<Arc<TxnKey>, ServerTxn>,
    clients: HashMap<Arc<TxnKey>, ClientTxn>,
    timers: BinaryHeap<Reverse<(Instant, TimerRef)>>,
    pub out: VecDeque<Transmit>,
    pub events: VecDeque<TxnEvent>,
}

impl TxnLayer {
    pub fn new(cfg: TimerConfig) -> Self {
        Self {
            cfg,
            servers: HashMap::new(),
            clients: HashMap::new(),
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn timers(&self) -> TimerConfig {
        self.cfg
    }

    /// Live transactions (server, client).
    pub fn len(&self) -> (usize, usize) {
        (self.servers.len(), self.clients.len())
    }

    fn arm(&mut self, at: Instant, r: TimerRef) {
        self.timers.push(Reverse((at, r)));
    }

    /// Matches an incoming request against the server transactions.
    pub fn match_request(&mut self, now: Instant, msg: &Message, peer: &Peer) -> RequestMatch {
        let Some(key) = TxnKey::server(msg) else {
            return RequestMatch::New;
        };
        let method = msg.method().unwrap_or("");
        if let Some(txn) = self.servers.get_mut(&key) {
            if method == "ACK" {
                match txn.state {
                    State::Completed => {
                        txn.state = State::Confirmed;
                        txn.retransmit_at = None;
                        let wait = if peer.transport.reliable() {
                            Duration::ZERO
                        } else {
                            self.cfg.t4
                        };
                        txn.end_at = Some(now + wait);
                        let r = TimerRef::Server(txn.key.clone());
                        self.arm(now + wait, r);
                        return RequestMatch::Absorbed;
                    }
                    State::Confirmed => return RequestMatch::Absorbed,
                    _ => return RequestMatch::Ack2xx,
                }
            }
            if let Some(last) = &txn.last {
                self.out.push_back(Transmit {
                    peer: txn.peer.clone(),
                    data: last.clone(),
                });
            }
            return RequestMatch::Absorbed;
        }
        if method == "ACK" {
            return RequestMatch::Ack2xx;
        }
        if method == "CANCEL" {
            let invite = TxnKey {
                method: "INVITE".into(),
                ..key
            };
            // RFC 3261 §9.2: the INVITE with the same branch and sent-by;
            // and only from where that INVITE came (a third party that read
            // the branch cannot cancel the call): else the CANCEL is new,
            // and matches nothing (481).
            if self
                .servers
                .get(&invite)
                .is_some_and(|t| same_source(&t.peer, peer))
            {
                return RequestMatch::Cancel(invite);
            }
        }
        RequestMatch::New
    }

    /// Creates a server transaction for a new request (not ACK).
    pub fn create_server(&mut self, msg: Message, peer: Peer) -> Option<TxnKey> {
        let key = Arc::new(TxnKey::server(&msg)?);
        let invite = key.method == "INVITE";
        self.servers.insert(
            key.clone(),
            ServerTxn {
                key: key.clone(),
                invite,
                request: Some(msg),
                peer,
                state: if invite {
                    State::Proceeding
                } else {
                    State::Trying
                },
                last: None,
                retransmit_at: None,
                interval: self.cfg.t1,
                end_at: None,
            },
        );
        Some(TxnKey::clone(&key))
    }

    /// The request that opened a server transaction.
    pub fn server_request(&self, key: &TxnKey) -> Option<&Message> {
        self.servers.get(key).and_then(|t| t.request.as_ref())
    }

    pub fn server_peer(&self, key: &TxnKey) -> Option<&Peer> {
        self.servers.get(key).map(|t| &t.peer)
    }

    /// Whether a final response was already sent on this server transaction.
    pub fn server_final_sent(&self, key: &TxnKey) -> bool {
        self.servers
            .get(key)
            .is_none_or(|t| !matches!(t.state, State::Trying | State::Proceeding))
    }

    /// Sends a response on a server transaction.
    pub fn respond(&mut self, now: Instant, key: &TxnKey, resp: &Message) {
        let Some(code) = resp.status() else { return };
        let cfg = self.cfg;
        let Some(txn) = self.servers.get_mut(key) else {
            return;
        };
        if !matches!(txn.state, State::Trying | State::Proceeding) {
            return; // a final was sent already
        }
        let data = resp.to_bytes();
        self.out.push_back(Transmit {
            peer: txn.peer.clone(),
            data: data.clone(),
        });
        txn.last = Some(data);
        let reliable = txn.peer.transport.reliable();
        if code < 200 {
            txn.state = State::Proceeding;
            return;
        }
        let wait64 = cfg.t1 * 64;
        if txn.invite {
            txn.state = if code < 300 {
                State::Accepted
            } else {
                State::Completed
            };
            txn.interval = cfg.t1;
            txn.retransmit_at = (!reliable || code < 300).then_some(now + cfg.t1);
            if reliable && code >= 300 {
                txn.retransmit_at = None;
            }
            txn.end_at = Some(now + wait64);
        } else {
            txn.state = State::Completed;
            txn.end_at = Some(if reliable { now } else { now + wait64 });
        }
        if txn.state == State::Completed {
            txn.request = None;
        }
        let r = TimerRef::Server(txn.key.clone());
        let (retransmit_at, end_at) = (txn.retransmit_at, txn.end_at);
        if let Some(at) = retransmit_at {
            self.arm(at, r.clone());
        }
        if let Some(at) = end_at {
            self.arm(at, r);
        }
    }

    /// The TU saw the ACK for the 2xx sent on this INVITE transaction.
    pub fn ack_received(&mut self, key: &TxnKey) {
        if self
            .servers
            .get(key)
            .is_some_and(|t| t.state == State::Accepted)
        {
            self.servers.remove(key);
        }
    }

    /// Starts a client transaction; the request's top Via carries its branch.
    pub fn request(&mut self, now: Instant, req: Message, peer: Peer) -> Option<TxnKey> {
        let key = Arc::new(TxnKey::of(&req)?);
        let invite = key.method == "INVITE";
        let bytes = req.to_bytes();
        self.out.push_back(Transmit {
            peer: peer.clone(),
            data: bytes.clone(),
        });
        let reliable = peer.transport.reliable();
        let retransmit_at = (!reliable).then_some(now + self.cfg.t1);
        let end_at = now + self.cfg.t1 * 64;
        let r = TimerRef::Client(key.clone());
        if let Some(at) = retransmit_at {
            self.arm(at, r.clone());
        }
        self.arm(end_at, r);
        self.clients.insert(
            key.clone(),
            ClientTxn {
                key: key.clone(),
                invite,
                request: req,
                bytes,
                peer,
                state: State::Trying,
                ack: None,
                retransmit_at,
                interval: self.cfg.t1,
                end_at: Some(end_at),
            },
        );
        Some(TxnKey::clone(&key))
    }

    /// The request a client transaction sent.
    pub fn client_request(&self, key: &TxnKey) -> Option<&Message> {
        self.clients.get(key).map(|t| &t.request)
    }

    pub fn client_peer(&self, key: &TxnKey) -> Option<&Peer> {
        self.clients.get(key).map(|t| &t.peer)
    }

    /// Matches a response to its client transaction.
    pub fn on_response(&mut self, now: Instant, msg: Message) {
        let (Some(code), Some(key)) = (msg.status(), TxnKey::of(&msg)) else {
            return;
        };
        let cfg = self.cfg;
        let Some(txn) = self.clients.get_mut(&key) else {
            return;
        };
        let r = TimerRef::Client(txn.key.clone());
        let reliable = txn.peer.transport.reliable();
        match (txn.state, code) {
            (State::Trying | State::Proceeding, 100..=199) => {
                txn.state = State::Proceeding;
                if txn.invite {
                    txn.retransmit_at = None;
                    // Timer B only runs while Calling; the TU's own timer
                    // (Timer C-like) bounds a ringing call.
                    txn.end_at = None;
                } else if txn.retransmit_at.is_some() {
                    txn.interval = cfg.t2;
                }
                self.events.push_back(TxnEvent::Response { key, msg });
            }
            (State::Trying | State::Proceeding, 200..=299) => {
                if txn.invite {
                    txn.state = State::Accepted;
                    txn.retransmit_at = None;
                    let at = now + cfg.t1 * 64;
                    txn.end_at = Some(at);
                    self.arm(at, r.clone());
                } else {
                    Self::complete_non_invite(txn, now, reliable, cfg);
                    let at = txn.end_at.unwrap_or(now);
                    self.arm(at, r.clone());
                }
                self.events.push_back(TxnEvent::Response { key, msg });
            }
            (State::Accepted, 200..=299) => {
                self.events.push_back(TxnEvent::Response { key, msg });
            }
            (State::Trying | State::Proceeding, _) => {
                if txn.invite {
                    let ack = build_ack(&txn.request, &msg).to_bytes();
                    self.out.push_back(Transmit {
                        peer: txn.peer.clone(),
                        data: ack.clone(),
                    });
                    txn.ack = Some(ack);
                    txn.state = State::Completed;
                    txn.retransmit_at = None;
                    let at = if reliable {
                        now
                    } else {
                        now + Duration::from_secs(32)
                    };
                    txn.end_at = Some(at);
                    self.arm(at, r.clone());
                } else {
                    Self::complete_non_invite(txn, now, reliable, cfg);
                    let at = txn.end_at.unwrap_or(now);
                    self.arm(at, r.clone());
                }
                self.events.push_back(TxnEvent::Response { key, msg });
            }
            (State::Completed, 300..) => {
                if let Some(ack) = &txn.ack {
                    self.out.push_back(Transmit {
                        peer: txn.peer.clone(),
                        data: ack.clone(),
                    });
                }
            }
            _ => {}
        }
    }

    fn complete_non_invite(txn: &mut ClientTxn, now: Instant, reliable: bool, cfg: TimerConfig) {
        txn.state = State::Completed;
        txn.retransmit_at = None;
        txn.end_at = Some(if reliable { now } else { now + cfg.t4 });
    }

    /// When the next timer is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, r))) = self.timers.pop() else {
                break;
            };
            match r {
                TimerRef::Server(key) => self.server_timer(now, key),
                TimerRef::Client(key) => self.client_timer(now, key),
            }
        }
    }

    fn server_timer(&mut self, now: Instant, key: Arc<TxnKey>) {
        let cfg = self.cfg;
        let Some(txn) = self.servers.get_mut(&key) else {
            return;
        };
        if txn.end_at.is_some_and(|e| e <= now) {
            let txn = self.servers.remove(&key);
            if let Some(request) = txn
                .filter(|t| t.state == State::Accepted)
                .and_then(|t| t.request)
            {
                let key = TxnKey::clone(&key);
                self.events.push_back(TxnEvent::NoAck { key, request });
            }
            return;
        }
        if let Some(at) = txn.retransmit_at.filter(|at| *at <= now) {
            if let Some(last) = &txn.last {
                self.out.push_back(Transmit {
                    peer: txn.peer.clone(),
                    data: last.clone(),
                });
            }
            // Timer G doubles up to T2 (2xx retransmission follows the same
            // schedule, RFC 3261 §13.3.1.4).
            txn.interval = (txn.interval * 2).min(cfg.t2);
            let next = at.max(now) + txn.interval;
            txn.retransmit_at = Some(next);
            self.arm(next, TimerRef::Server(key));
        }
    }

    fn client_timer(&mut self, now: Instant, key: Arc<TxnKey>) {
        let cfg = self.cfg;
        let Some(txn) = self.clients.get_mut(&key) else {
            return;
        };
        if txn.end_at.is_some_and(|e| e <= now) {
            let state = txn.state;
            self.clients.remove(&key);
            if matches!(state, State::Trying | State::Proceeding) {
                let key = TxnKey::clone(&key);
                self.events.push_back(TxnEvent::Timeout { key });
            }
            return;
        }
        if let Some(at) = txn.retransmit_at.filter(|at| *at <= now) {
            self.out.push_back(Transmit {
                peer: txn.peer.clone(),
                data: txn.bytes.clone(),
            });
            txn.interval = if txn.invite {
                txn.interval * 2 // Timer A: no cap
            } else {
                (txn.interval * 2).min(cfg.t2) // Timer E
            };
            let next = at.max(now) + txn.interval;
            txn.retransmit_at = Some(next);
            self.arm(next, TimerRef::Client(key));
        }
    }

    /// Drops a client transaction early (its owner is gone).
    pub fn forget_client(&mut self, key: &TxnKey) {
        self.clients.remove(key);
    }
}

/// Whether `b` is where `a` came from: the same transport and source
/// address (on a stream, the same host: a UA may reconnect).
fn same_source(a: &Peer, b: &Peer) -> bool {
    a.transport == b.transport
        && if a.transport.reliable() {
            a.addr.ip() == b.addr.ip()
        } else {
            a.addr == b.addr
        }
}

/// The hop-by-hop ACK for a non-2xx final response (RFC 3261 §17.1.1.3).
pub fn build_ack(invite: &Message, resp: &Message) -> Message {
    let mut headers = Vec::with_capacity(8);
    if let Some(v) = invite.headers.iter().find(|h| h.name == "Via") {
        headers.push(v.clone());
    }
    for h in &invite.headers {
        match &*h.name {
            "From" | "Call-ID" | "Route" | "Max-Forwards" => headers.push(h.clone()),
            _ => {}
        }
    }
    if let Some(to) = resp.headers.iter().find(|h| h.name == "To") {
        headers.push(to.clone());
    }
    let seq = invite.cseq().map_or(1, |c| c.seq);
    headers.push(crate::message::Header {
        name: "CSeq".into(),
        value: format!("{seq} ACK"),
    });
    Message {
        start: StartLine::Request {
            method: "ACK".into(),
            uri: invite.request_uri().unwrap_or("sip:invalid").to_string(),
        },
        headers,
        body: Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::parse;

    fn peer(t: Transport) -> Peer {
        Peer {
            transport: t,
            addr: "127.0.0.1:5060".parse().unwrap(),
            flow: None,
        }
    }

    fn invite(branch: &str) -> Message {
        parse(format!("INVITE sip:b@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n\r\n").as_bytes()).unwrap()
    }

    fn response(req: &Message, code: u16) -> Message {
        crate::message::response_to(req, code, "X", Some("t2"))
    }

    #[test]
    fn client_invite_retransmits_on_timer_a_and_times_out_on_b() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let key = l
            .request(t0, invite("z9hG4bKa"), peer(Transport::Udp))
            .unwrap();
        assert_eq!(l.out.drain(..).count(), 1);
        // Retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s; Timer B at 32 s.
        let mut sent = 0;
        let mut t = t0;
        while t < t0 + Duration::from_secs(33) {
            t += Duration::from_millis(100);
            l.handle_timeout(t);
            sent += l.out.drain(..).count();
        }
        assert_eq!(sent, 6);
        assert!(matches!(l.events.pop_front(), Some(TxnEvent::Timeout { key: k }) if k == key));
        assert_eq!(l.len(), (0, 0));
    }

    #[test]
    fn client_invite_acks_non_2xx_and_absorbs_retransmissions() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let req = invite("z9hG4bKb");
        l.request(t0, req.clone(), peer(Transport::Udp)).unwrap();
        l.out.clear();
        let busy = response(&req, 486);
        l.on_response(t0, busy.clone());
        let ack = parse(&l.out.pop_front().unwrap().data).unwrap();
        assert_eq!(ack.method(), Some("ACK"));
        assert_eq!(ack.top_via().unwrap().branch.as_deref(), Some("z9hG4bKb"));
        assert_eq!(ack.to_tag(), Some("t2"));
        assert_eq!(l.events.drain(..).count(), 1);
        l.on_response(t0, busy);
        assert_eq!(l.out.drain(..).count(), 1, "ACK resent");
        assert_eq!(l.events.drain(..).count(), 0, "retransmission not reported");
    }

    #[test]
    fn a_completed_server_transaction_keeps_only_what_absorbing_needs() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let p = peer(Transport::Udp);
        // A rejected INVITE: retransmissions of it and its ACK are absorbed
        // (the final resent) with the request gone.
        let req = invite("z9hG4bKm");
        let key = l.create_server(req.clone(), p.clone()).unwrap();
        assert!(l.server_request(&key).is_some());
        l.respond(t0, &key, &response(&req, 486));
        assert!(
            l.server_request(&key).is_none(),
            "request kept after the final"
        );
        l.out.clear();
        assert_eq!(l.match_request(t0, &req, &p), RequestMatch::Absorbed);
        let resent = parse(&l.out.pop_front().unwrap().data).unwrap();
        assert_eq!(resent.status(), Some(486));
        let ack = build_ack(&req, &response(&req, 486));
        assert_eq!(l.match_request(t0, &ack, &p), RequestMatch::Absorbed);
        // An accepted INVITE keeps it until the ACK, for NoAck.
        let req = invite("z9hG4bKn");
        let key = l.create_server(req.clone(), p.clone()).unwrap();
        l.respond(t0, &key, &response(&req, 200));
        assert!(l.server_request(&key).is_some(), "a 2xx'd INVITE keeps it");
        l.handle_timeout(t0 + Duration::from_secs(40));
        assert!(l.events.iter().any(
            |e| matches!(e, TxnEvent::NoAck { request, .. } if request.call_id() == req.call_id())
        ));
    }

    #[test]
    fn server_invite_retransmits_final_until_ack() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let req = invite("z9hG4bKc");
        let p = peer(Transport::Udp);
        assert_eq!(l.match_request(t0, &req, &p), RequestMatch::New);
        let key = l.create_server(req.clone(), p.clone()).unwrap();
        l.respond(t0, &key, &response(&req, 100));
        assert_eq!(l.match_request(t0, &req, &p), RequestMatch::Absorbed);
        assert_eq!(l.out.drain(..).count(), 2, "100 then its resend");
        l.respond(t0, &key, &response(&req, 486));
        l.out.clear();
        l.handle_timeout(t0 + Duration::from_millis(600));
        assert_eq!(l.out.drain(..).count(), 1, "Timer G");
        let ack = build_ack(&req, &response(&req, 486));
        assert_eq!(l.match_request(t0, &ack, &p), RequestMatch::Absorbed);
        l.handle_timeout(t0 + Duration::from_secs(3));
        assert_eq!(l.out.drain(..).count(), 0, "no resend once confirmed");
        l.handle_timeout(t0 + Duration::from_secs(40));
        assert_eq!(l.len(), (0, 0));
    }

    #[test]
    fn unacknowledged_2xx_is_reported() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let req = invite("z9hG4bKd");
        let key = l.create_server(req.clone(), peer(Transport::Udp)).unwrap();
        l.respond(t0, &key, &response(&req, 200));
        for i in 1..=70 {
            l.handle_timeout(t0 + Duration::from_millis(500 * i));
        }
        assert!(l.out.len() > 5);
        assert!(matches!(l.events.pop_front(), Some(TxnEvent::NoAck { .. })));
    }

    #[test]
    fn cancel_matches_its_invite() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let req = invite("z9hG4bKe");
        let p = peer(Transport::Udp);
        let key = l.create_server(req.clone(), p.clone()).unwrap();
        let cancel = parse(b"CANCEL sip:b@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKe\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c1\r\nCSeq: 1 CANCEL\r\n\r\n").unwrap();
        assert_eq!(l.match_request(t0, &cancel, &p), RequestMatch::Cancel(key));
    }

    fn with_via(req: &Message, sent_by: &str) -> Message {
        let mut m = req.clone();
        let branch = m.top_via().unwrap().branch.unwrap();
        m.set_header("Via", format!("SIP/2.0/UDP {sent_by};branch={branch}"));
        m
    }

    #[test]
    fn the_same_branch_from_another_sent_by_is_another_transaction() {
        // RFC 3261 §17.2.3: branch + sent-by + method.
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let req = invite("z9hG4bKsb");
        let p = peer(Transport::Udp);
        let key = l.create_server(req.clone(), p.clone()).unwrap();
        l.respond(t0, &key, &response(&req, 100));
        l.out.clear();
        assert_eq!(l.match_request(t0, &req, &p), RequestMatch::Absorbed);
        assert_eq!(
            l.out.drain(..).count(),
            1,
            "a true retransmission is answered"
        );
        let other = with_via(&req, "127.0.0.9:5070");
        assert_eq!(l.match_request(t0, &other, &p), RequestMatch::New);
        assert_eq!(l.out.len(), 0, "not answered as a retransmission");
        let other_key = l.create_server(other, p.clone()).unwrap();
        assert_ne!(other_key, key);
        assert_eq!(l.len(), (2, 0), "both transactions live side by side");
        // The sent-by's host is case-insensitive and the port defaults.
        let same = with_via(&req, "127.0.0.1:5070");
        assert_eq!(l.match_request(t0, &same, &p), RequestMatch::Absorbed);
        let no_port = with_via(&invite("z9hG4bKnp"), "Host.Example");
        let k = l.create_server(no_port.clone(), p.clone()).unwrap();
        assert_eq!(k.sent_by, "host.example:5060");
        let spelled = with_via(&no_port, "host.example:5060");
        assert_eq!(l.match_request(t0, &spelled, &p), RequestMatch::Absorbed);
    }

    #[test]
    fn a_cancel_from_another_source_or_sent_by_matches_nothing() {
        let t0 = Instant::now();
        let mut l = TxnLayer::new(TimerConfig::default());
        let req = invite("z9hG4bKcx");
        let p = peer(Transport::Udp);
        let key = l.create_server(req.clone(), p.clone()).unwrap();
        let cancel = parse(b"CANCEL sip:b@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKcx\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c1\r\nCSeq: 1 CANCEL\r\n\r\n").unwrap();
        let elsewhere = Peer {
            addr: "127.0.0.2:5060".parse().unwrap(),
            ..p.clone()
        };
        assert_eq!(l.match_request(t0, &cancel, &elsewhere), RequestMatch::New);
        let other_port = Peer {
            addr: "127.0.0.1:5999".parse().unwrap(),
            ..p.clone()
        };
        assert_eq!(l.match_request(t0, &cancel, &other_port), RequestMatch::New);
        let forged = with_via(&cancel, "127.0.0.9:5070");
        assert_eq!(l.match_request(t0, &forged, &p), RequestMatch::New);
        assert_eq!(l.match_request(t0, &cancel, &p), RequestMatch::Cancel(key));
        // On a stream, the same host on another connection may cancel.
        let tcp = peer(Transport::Tcp);
        let req = invite("z9hG4bKct");
        let key = l.create_server(req, tcp.clone()).unwrap();
        let cancel = with_via(&cancel, "127.0.0.1:5070");
        let mut cancel = cancel;
        cancel.set_header("Via", "SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bKct");
        let reconnected = Peer {
            addr: "127.0.0.1:6000".parse().unwrap(),
            flow: Some(FlowId(9)),
            ..tcp
        };
        assert_eq!(
            l.match_request(t0, &cancel, &reconnected),
            RequestMatch::Cancel(key)
        );
    }
}
