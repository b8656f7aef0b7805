//! The tokio driver around the sans-IO [`B2bua`], sharded by call: the UDP
//! port is read through one `SO_REUSEPORT` socket per shard (the kernel
//! spreads sources over them by their address hash), each with its own
//! receive thread, and every receive thread hands each datagram to the
//! shard that owns its Call-ID, whichever socket it arrived on; each shard
//! is a task owning one `B2bua` (its calls, transactions and timers) and
//! writes through its own socket of the group. Stream connections run in
//! their own tasks (spread over the runtime's workers) and route framed
//! messages the same way.
//!
//! Leg A's Call-ID is hashed; leg B's Call-ID is minted by the shard with its
//! index in it (`<random>.<shard>@tollgate`), so every message of a call, from
//! either side, reaches the shard that holds the call.

use crate::b2bua::{B2bua, CallEvent, Census, EndCause};
use crate::framing::{FramingError, StreamFramer};
use crate::tls::TlsAcceptor;
use crate::tls_client::TlsConnector;
use crate::transaction::{FlowId, Peer, Transmit, Transport};
use bytes::Bytes;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// Most simultaneous stream connections.
pub const MAX_CONNECTIONS: usize = 8192;
/// A stream connection with nothing to say for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Messages queued for one shard before the receiver drops (and counts) more.
pub const SHARD_QUEUE: usize = 16_384;

/// Commands from the rest of the edge.
#[derive(Debug)]
pub enum Control {
    Hangup(u64, EndCause),
    /// Stop admitting calls (SIGTERM drain).
    Drain,
    /// Hang up every call and stop.
    Shutdown,
    /// New routes for new INVITEs (SIGHUP reload); calls up keep theirs.
    SetRoutes(Vec<crate::Route>),
}

enum Inbound {
    Message(Bytes, Peer),
    Unframeable(Bytes, Peer),
    /// The head of a stream message over `[sip] max_message_bytes`.
    Oversized(Bytes, Peer),
    Control(ControlMsg),
}

#[derive(Debug, Clone)]
enum ControlMsg {
    Hangup(u64, EndCause),
    Drain,
    Shutdown,
    SetRoutes(Arc<Vec<crate::Route>>),
    /// No connection to this leg-B address could be set up (TCP connect or
    /// TLS handshake, e.g. a certificate refused).
    TransportFailed(SocketAddr),
}

/// Sockets the cores serve.
pub struct Sockets {
    pub udp: Option<Arc<UdpSocket>>,
    pub tcp: Option<TcpListener>,
    /// SIP over TLS: the TCP listener and the (reloadable) TLS acceptor.
    pub tls: Option<(TcpListener, Arc<TlsAcceptor>)>,
    /// SIP over TLS toward leg B (verified, one connection per target).
    pub tls_client: Option<Arc<TlsConnector>>,
}

/// What the shards share: the sockets' write sides.
struct Shared {
    /// The UDP port's sockets (one per shard where `SO_REUSEPORT` allows);
    /// shard `i` writes through `udp[i % len]`.
    udp: Vec<Arc<UdpSocket>>,
    conns: DashMap<FlowId, mpsc::UnboundedSender<Bytes>>,
    /// Connections the edge opened, by transport and address (reused).
    outbound: DashMap<(Transport, SocketAddr), FlowId>,
    tls_client: Option<Arc<TlsConnector>>,
    next_flow: AtomicU64,
    shards: Vec<mpsc::Sender<Inbound>>,
    /// `[sip] max_message_bytes`, for the stream framers.
    max_message: usize,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The Call-ID of a raw message, found without parsing it.
fn raw_call_id(data: &[u8]) -> Option<&[u8]> {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(data.len());
    for line in data[..end].split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
            return Some(line[colon + 1..].trim_ascii());
        }
    }
    None
}

/// Which shard owns the message: the index a shard minted into its own
/// Call-IDs, else a hash of the Call-ID (FNV-1a), else shard 0.
pub fn shard_of(data: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let Some(cid) = raw_call_id(data) else {
        return 0;
    };
    if let Some(local) = cid.strip_suffix(b"@tollgate") {
        if let Some(dot) = local.iter().rposition(|b| *b == b'.') {
            if let Some(i) = std::str::from_utf8(&local[dot + 1..])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
            {
                if i < shards {
                    return i;
                }
            }
        }
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cid {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// Runs the signaling cores (one per shard; call ids must be unique across
/// them, see [`B2bua::set_shard`]) until a `Shutdown` arrives or `ctl` closes.
pub async fn run(
    cores: Vec<B2bua>,
    sockets: Sockets,
    mut ctl: mpsc::Receiver<Control>,
    events: mpsc::UnboundedSender<CallEvent>,
) {
    let n = cores.len().max(1);
    let max_message = cores
        .first()
        .map_or(crate::message::DEFAULT_MAX_MESSAGE_BYTES, |c| {
            c.config().max_message_bytes
        });
    let mut receivers = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel::<Inbound>(SHARD_QUEUE);
        senders.push(tx);
        receivers.push(rx);
    }
    let udp = sockets
        .udp
        .as_ref()
        .map_or_else(Vec::new, |u| udp_group(u, n));
    let shared = Arc::new(Shared {
        udp: udp.clone(),
        conns: DashMap::new(),
        outbound: DashMap::new(),
        tls_client: sockets.tls_client.clone(),
        next_flow: AtomicU64::new(1),
        shards: senders,
        max_message,
    });
    let mut tasks = Vec::with_capacity(n);
    for (i, (core, rx)) in cores.into_iter().zip(receivers).enumerate() {
        tasks.push(tokio::spawn(shard_loop(
            i,
            core,
            rx,
            shared.clone(),
            events.clone(),
        )));
    }
    if let Some(listener) = sockets.tcp {
        tokio::spawn(accept_loop(listener, shared.clone(), None));
    }
    if let Some((listener, acceptor)) = sockets.tls {
        tokio::spawn(accept_loop(listener, shared.clone(), Some(acceptor)));
    }
    // Each socket's receive side runs on its own thread (the shards keep
    // sending on the tokio sockets).
    for (i, udp) in udp.iter().enumerate() {
        match udp_receive_handle(udp) {
            Ok(std_sock) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("tollgate-sip-rx{i}"))
                    .spawn(move || udp_receiver_thread(std_sock, shared));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start the SIP receive thread");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot clone the SIP UDP socket"),
        }
    }
    loop {
        let msg = match ctl.recv().await {
            Some(Control::Hangup(id, cause)) => {
                let i = (id % n as u64) as usize;
                let _ = shared.shards[i]
                    .send(Inbound::Control(ControlMsg::Hangup(id, cause)))
                    .await;
                continue;
            }
            Some(Control::Drain) => ControlMsg::Drain,
            Some(Control::SetRoutes(r)) => ControlMsg::SetRoutes(Arc::new(r)),
            Some(Control::Shutdown) | None => ControlMsg::Shutdown,
        };
        for s in &shared.shards {
            let _ = s.send(Inbound::Control(msg.clone())).await;
        }
        if matches!(msg, ControlMsg::Shutdown) {
            break;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Socket buffer asked for each SIP UDP socket: a burst of thousands of
/// messages must not overflow the kernel's default 208 KiB (the kernel caps it
/// at net.core.rmem_max / wmem_max).
const UDP_BUFFER: usize = 4 << 20;

/// Binds the SIP UDP socket at `addr` with `SO_REUSEPORT` set, so that
/// [`run`] can add one socket per shard on the same port (Linux spreads
/// datagrams over them by a hash of the source address and port). Only a
/// process of the same user can join the port this way.
///
/// Port 0 is resolved with a plain socket first: the kernel's choice of a
/// free port for an `SO_REUSEPORT` socket may land on a port another
/// `SO_REUSEPORT` group of the same user already holds (parallel edges
/// would share traffic), while a plain socket's choice never does.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let addr = if addr.port() == 0 {
        let probe = std::net::UdpSocket::bind(addr)?;
        SocketAddr::new(addr.ip(), probe.local_addr()?.port())
    } else {
        addr
    };
    bind_reuse_port(addr)
}

fn bind_reuse_port(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, it only drops earlier.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// `first` and, when it has `SO_REUSEPORT` (see [`bind_udp`]), `n - 1`
/// more sockets on its address: one receive queue and thread per shard.
/// Falls back to fewer sockets (at worst `first` alone) if binding fails.
fn udp_group(first: &Arc<UdpSocket>, n: usize) -> Vec<Arc<UdpSocket>> {
    let mut group = vec![first.clone()];
    let reuse = socket2::SockRef::from(&**first)
        .reuse_port()
        .unwrap_or(false);
    let Ok(addr) = first.local_addr() else {
        return group;
    };
    if !reuse || n <= 1 {
        return group;
    }
    while group.len() < n {
        match bind_reuse_port(addr) {
            Ok(s) => group.push(Arc::new(s)),
            Err(e) => {
                tracing::warn!(error = %e, %addr, "cannot add a SIP UDP socket; fewer receive threads");
                break;
            }
        }
    }
    group
}

/// A second descriptor on the same UDP socket (dup), for the receive thread's
/// own reactor; it shares the socket's non-blocking mode.
fn udp_receive_handle(udp: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    Ok(socket2::SockRef::from(udp).try_clone()?.into())
}

/// The UDP receive loop, on its own OS thread with its own small reactor: it
/// must keep draining the socket even while every tokio worker is busy in a
/// shard, or the kernel queue overflows and retransmission storms follow.
fn udp_receiver_thread(std_sock: std::net::UdpSocket, shared: Arc<Shared>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the SIP receive reactor");
            return;
        }
    };
    rt.block_on(async move {
        match UdpSocket::from_std(std_sock) {
            Ok(udp) => udp_receiver(udp, shared).await,
            Err(e) => tracing::error!(error = %e, "cannot register the SIP receive socket"),
        }
    });
}

async fn udp_receiver(udp: UdpSocket, shared: Arc<Shared>) {
    let n = shared.shards.len();
    let dropped = metrics::counter!("tollgate_sip_queue_drops_total");
    let mut buf = vec![0u8; 65_536];
    loop {
        let first = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP port unreachable shows up here on some systems.
                tracing::debug!(error = %e, "udp receive error");
                continue;
            }
        };
        let mut next = Some(first);
        // Drain what is queued before going back to the reactor.
        while let Some((len, from)) = next.take() {
            let data = &buf[..len];
            let i = shard_of(data, n);
            let peer = Peer {
                transport: Transport::Udp,
                addr: from,
                flow: None,
            };
            let msg = Inbound::Message(Bytes::copy_from_slice(data), peer);
            match shared.shards[i].try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => dropped.increment(1),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
            next = udp.try_recv_from(&mut buf).ok();
        }
    }
}

/// A shard's share of `tollgate_sip_core_entries{table}`: what its core
/// holds ([`B2bua::census`]), added to the shared gauge as it changes, and
/// taken back when the shard ends.
struct CensusGauge {
    last: Census,
    gauges: [metrics::Gauge; 4],
}

impl CensusGauge {
    fn new() -> Self {
        CensusGauge {
            last: Census::default(),
            gauges: Census::default()
                .tables()
                .map(|(table, _)| metrics::gauge!("tollgate_sip_core_entries", "table" => table)),
        }
    }

    fn update(&mut self, now: Census) {
        if now == self.last {
            return;
        }
        for ((g, (_, new)), (_, old)) in
            self.gauges.iter().zip(now.tables()).zip(self.last.tables())
        {
            if new != old {
                g.increment(new as f64 - old as f64);
            }
        }
        self.last = now;
    }
}

impl Drop for CensusGauge {
    fn drop(&mut self) {
        self.update(Census::default());
    }
}

async fn shard_loop(
    index: usize,
    mut core: B2bua,
    mut rx: mpsc::Receiver<Inbound>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<CallEvent>,
) {
    let mut census = CensusGauge::new();
    loop {
        let deadline = core
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let mut stop = false;
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { break };
                let (t, unix) = (now(), unix_now());
                stop |= handle_inbound(&mut core, m, t, unix);
                for _ in 0..256 {
                    match rx.try_recv() {
                        Ok(m) => stop |= handle_inbound(&mut core, m, t, unix),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => core.handle_timeout(now()),
        }
        flush(index, &mut core, &shared).await;
        for ev in core.events.drain(..) {
            let _ = events.send(ev);
        }
        census.update(core.census());
        if stop {
            break;
        }
    }
}

/// Handles one inbound item; true when the shard must stop.
fn handle_inbound(core: &mut B2bua, m: Inbound, t: std::time::Instant, unix: i64) -> bool {
    match m {
        Inbound::Message(data, peer) => core.handle_datagram(t, unix, &data, peer),
        Inbound::Unframeable(head, peer) => core.handle_unframeable(&head, &peer),
        Inbound::Oversized(head, peer) => core.handle_oversized(&head, &peer),
        Inbound::Control(ControlMsg::Hangup(id, cause)) => core.hangup(t, id, cause),
        Inbound::Control(ControlMsg::Drain) => core.set_draining(true),
        Inbound::Control(ControlMsg::SetRoutes(r)) => core.set_routes(r.to_vec()),
        Inbound::Control(ControlMsg::TransportFailed(addr)) => core.transport_failed(t, addr),
        Inbound::Control(ControlMsg::Shutdown) => {
            for id in core.call_ids() {
                core.hangup(t, id, EndCause::Shutdown);
            }
            return true;
        }
    }
    false
}

async fn flush(index: usize, core: &mut B2bua, shared: &Arc<Shared>) {
    let udp = shared
        .udp
        .get(index % shared.udp.len().max(1))
        .map(|s| &**s);
    while let Some(Transmit { peer, data }) = core.txn.out.pop_front() {
        match peer.transport {
            Transport::Udp => {
                let Some(sock) = udp else {
                    continue;
                };
                match sock.try_send_to(&data, peer.addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let _ = sock.send_to(&data, peer.addr).await;
                    }
                    Err(e) => tracing::debug!(error = %e, to = %peer.addr, "udp send failed"),
                }
            }
            Transport::Tcp | Transport::Tls => {
                let live = |f: &FlowId| shared.conns.contains_key(f);
                // A connection of the peer's own, else ours to that address
                // over the same transport (never plain TCP for a TLS peer).
                let flow = peer.flow.filter(live).or_else(|| {
                    shared
                        .outbound
                        .get(&(peer.transport, peer.addr))
                        .map(|f| *f)
                        .filter(live)
                });
                let flow = match flow {
                    Some(f) => f,
                    None if peer.transport == Transport::Tcp || shared.tls_client.is_some() => {
                        let id = FlowId(shared.next_flow.fetch_add(1, Ordering::Relaxed));
                        let (tx, rx) = mpsc::unbounded_channel();
                        shared.conns.insert(id, tx);
                        shared.outbound.insert((peer.transport, peer.addr), id);
                        tokio::spawn(connect_out(
                            peer.transport,
                            peer.addr,
                            id,
                            shared.clone(),
                            rx,
                        ));
                        id
                    }
                    None => {
                        tracing::debug!(to = %peer.addr, "no TLS connection to this peer; message dropped");
                        continue;
                    }
                };
                if let Some(tx) = shared.conns.get(&flow) {
                    let _ = tx.send(data);
                }
            }
        }
    }
}

/// Accepts stream connections: plain TCP, or TLS when `tls` is set (the
/// handshake runs in the connection's task, within the acceptor's timeout
/// and concurrent-handshake cap, so a slowloris cannot stall the loop).
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<Arc<TlsAcceptor>>) {
    let live = Arc::new(AtomicUsize::new(0));
    let what = if tls.is_some() { "tls" } else { "tcp" };
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let Some(acceptor) = tls.clone() else {
            let id = FlowId(shared.next_flow.fetch_add(1, Ordering::Relaxed));
            let (tx, rx) = mpsc::unbounded_channel();
            shared.conns.insert(id, tx);
            let live = live.clone();
            live.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                serve_stream(stream, addr, Transport::Tcp, id, &shared, rx).await;
                live.fetch_sub(1, Ordering::Relaxed);
            });
            continue;
        };
        let Some(slot) = acceptor.slot(addr.ip()) else {
            metrics::counter!("tollgate_sip_tls_handshake_failures_total", "reason" => "busy")
                .increment(1);
            drop(stream);
            continue;
        };
        let live = live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            match acceptor.handshake(stream, slot).await {
                Ok(tls_stream) => {
                    let id = FlowId(shared.next_flow.fetch_add(1, Ordering::Relaxed));
                    let (tx, rx) = mpsc::unbounded_channel();
                    shared.conns.insert(id, tx);
                    serve_stream(tls_stream, addr, Transport::Tls, id, &shared, rx).await;
                }
                Err(e) => {
                    metrics::counter!("tollgate_sip_tls_handshake_failures_total", "reason" => e.label())
                        .increment(1);
                    tracing::debug!(from = %addr, error = %e, "tls handshake refused");
                }
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connect_out(
    transport: Transport,
    addr: SocketAddr,
    id: FlowId,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let failure = match (transport, &shared.tls_client) {
        (Transport::Tls, Some(tls)) => match tls.connect(addr).await {
            Ok(stream) => {
                return serve_stream(stream, addr, Transport::Tls, id, &shared, rx).await;
            }
            Err(e) => e.to_string(),
        },
        (Transport::Tls, None) => "no TLS client".to_owned(),
        _ => match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return serve_stream(stream, addr, Transport::Tcp, id, &shared, rx).await;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        },
    };
    tracing::warn!(to = %addr, transport = transport.label(), error = %failure, "outbound connection failed");
    metrics::counter!("tollgate_sip_outbound_connect_failures_total", "transport" => transport.label())
        .increment(1);
    shared.conns.remove(&id);
    shared
        .outbound
        .remove_if(&(transport, addr), |_, f| *f == id);
    // The calls waiting on it try their next target, or leg A gets 503.
    for s in &shared.shards {
        let _ = s.try_send(Inbound::Control(ControlMsg::TransportFailed(addr)));
    }
}

/// One stream connection (TCP, or TLS after the handshake): a writer task
/// drains the flow's queue, this task frames what arrives and routes each
/// message to its shard.
async fn serve_stream<S>(
    stream: S,
    addr: SocketAddr,
    transport: Transport,
    id: FlowId,
    shared: &Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let peer = Peer {
        transport,
        addr,
        flow: Some(id),
    };
    let n = shared.shards.len();
    let mut framer = StreamFramer::new(shared.max_message);
    'read: loop {
        let read = tokio::time::timeout(IDLE_TIMEOUT, rd.read_buf(framer.buffer_mut())).await;
        match read {
            Ok(Ok(len)) if len > 0 => {}
            _ => break,
        }
        loop {
            match framer.next_message() {
                Ok(Some(msg)) => {
                    let i = shard_of(&msg, n);
                    if shared.shards[i]
                        .send(Inbound::Message(msg, peer.clone()))
                        .await
                        .is_err()
                    {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e @ (FramingError::ContentLength | FramingError::TooLarge)) => {
                    let head = framer.buffer_mut().split().freeze();
                    let i = shard_of(&head, n);
                    let item = if e == FramingError::TooLarge {
                        Inbound::Oversized(head, peer.clone())
                    } else {
                        Inbound::Unframeable(head, peer.clone())
                    };
                    let _ = shared.shards[i].send(item).await;
                    // Give the shard a moment to answer before the close.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break 'read;
                }
            }
        }
    }
    shared.conns.remove(&id);
    shared
        .outbound
        .remove_if(&(transport, addr), |_, f| *f == id);
    writer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_stays_on_one_shard() {
        let a = b"INVITE sip:x@y SIP/2.0\r\nCall-ID: abc@host\r\n\r\n";
        let a_again = b"BYE sip:x@y SIP/2.0\r\ni: abc@host\r\n\r\n";
        for n in 1..5 {
            assert_eq!(shard_of(a, n), shard_of(a_again, n));
            for i in 0..n {
                let b = format!("SIP/2.0 200 OK\r\nCall-ID: 0f3a.{i}@tollgate\r\n\r\n");
                assert_eq!(shard_of(b.as_bytes(), n), i);
            }
        }
        assert_eq!(shard_of(b"garbage", 3), 0);
        let out_of_range = b"SIP/2.0 200 OK\r\nCall-ID: 0f3a.9@tollgate\r\n\r\n";
        assert!(shard_of(out_of_range, 2) < 2);
    }
}
