//! The tokio driver around the sans-IO [`B2bua`]: one task owns the core and
//! the UDP socket (the hot path, no channel hop); stream connections run in
//! their own tasks and hand framed messages to the core over a channel.

use crate::b2bua::{B2bua, CallEvent, EndCause};
use crate::framing::{FramingError, StreamFramer};
use crate::transaction::{FlowId, Peer, Transmit, Transport};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// Most simultaneous stream connections.
pub const MAX_CONNECTIONS: usize = 8192;
/// A stream connection with nothing to say for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Commands from the rest of the edge.
#[derive(Debug)]
pub enum Control {
    Hangup(u64, EndCause),
    /// Stop admitting calls (SIGTERM drain).
    Drain,
    /// Hang up every call and stop.
    Shutdown,
}

enum Inbound {
    Message(Bytes, Peer),
    Unframeable(Bytes, Peer),
    Closed(FlowId),
    Opened(FlowId, mpsc::UnboundedSender<Bytes>),
}

/// Sockets the core serves.
pub struct Sockets {
    pub udp: Option<Arc<UdpSocket>>,
    pub tcp: Option<TcpListener>,
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

/// Runs the signaling core until `ctl` closes.
pub async fn run(
    mut core: B2bua,
    sockets: Sockets,
    mut ctl: mpsc::Receiver<Control>,
    events: mpsc::UnboundedSender<CallEvent>,
) {
    let (in_tx, mut in_rx) = mpsc::channel::<Inbound>(4096);
    let next_flow = Arc::new(std::sync::atomic::AtomicU64::new(1));
    if let Some(listener) = sockets.tcp {
        tokio::spawn(accept_loop(listener, in_tx.clone(), next_flow.clone()));
    }
    let udp = sockets.udp;
    let mut conns: HashMap<FlowId, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    let mut outbound: HashMap<SocketAddr, FlowId> = HashMap::new();
    // One receive buffer for the life of the task: datagrams are parsed from
    // it in place (the parser copies what it keeps).
    let mut buf = vec![0u8; 65_536];
    loop {
        let deadline = core
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = recv_udp(udp.as_deref(), &mut buf) => {
                if let Some((n, from)) = r {
                    let peer = Peer { transport: Transport::Udp, addr: from, flow: None };
                    let (t, unix) = (now(), unix_now());
                    core.handle_datagram(t, unix, &buf[..n], peer);
                    // Drain what else is queued without going back to select.
                    if let Some(sock) = udp.as_deref() {
                        for _ in 0..64 {
                            match sock.try_recv_from(&mut buf) {
                                Ok((n, from)) => {
                                    let peer = Peer { transport: Transport::Udp, addr: from, flow: None };
                                    core.handle_datagram(t, unix, &buf[..n], peer);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                }
            }
            m = in_rx.recv() => {
                let Some(m) = m else { break };
                handle_inbound(&mut core, &mut conns, m);
                while let Ok(m) = in_rx.try_recv() {
                    handle_inbound(&mut core, &mut conns, m);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                core.handle_timeout(now());
            }
            c = ctl.recv() => {
                match c {
                    Some(Control::Hangup(id, cause)) => core.hangup(now(), id, cause),
                    Some(Control::Drain) => core.set_draining(true),
                    Some(Control::Shutdown) | None => {
                        for id in core.call_ids() {
                            core.hangup(now(), id, EndCause::Shutdown);
                        }
                        flush(&mut core, udp.as_deref(), &mut conns, &mut outbound, &in_tx, &next_flow).await;
                        for ev in core.events.drain(..) {
                            let _ = events.send(ev);
                        }
                        break;
                    }
                }
            }
        }
        flush(
            &mut core,
            udp.as_deref(),
            &mut conns,
            &mut outbound,
            &in_tx,
            &next_flow,
        )
        .await;
        for ev in core.events.drain(..) {
            let _ = events.send(ev);
        }
    }
}

fn handle_inbound(
    core: &mut B2bua,
    conns: &mut HashMap<FlowId, mpsc::UnboundedSender<Bytes>>,
    m: Inbound,
) {
    match m {
        Inbound::Message(data, peer) => core.handle_datagram(now(), unix_now(), &data, peer),
        Inbound::Unframeable(head, peer) => core.handle_unframeable(&head, &peer),
        Inbound::Closed(flow) => {
            conns.remove(&flow);
        }
        Inbound::Opened(flow, tx) => {
            conns.insert(flow, tx);
        }
    }
}

async fn recv_udp(sock: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    let Some(sock) = sock else {
        return std::future::pending().await;
    };
    match sock.recv_from(buf).await {
        Ok((n, from)) => Some((n, from)),
        Err(e) => {
            // ICMP port unreachable shows up here on some systems: not fatal.
            tracing::debug!(error = %e, "udp receive error");
            None
        }
    }
}

async fn flush(
    core: &mut B2bua,
    udp: Option<&UdpSocket>,
    conns: &mut HashMap<FlowId, mpsc::UnboundedSender<Bytes>>,
    outbound: &mut HashMap<SocketAddr, FlowId>,
    in_tx: &mpsc::Sender<Inbound>,
    next_flow: &Arc<std::sync::atomic::AtomicU64>,
) {
    while let Some(Transmit { peer, data }) = core.txn.out.pop_front() {
        match peer.transport {
            Transport::Udp => {
                let Some(sock) = udp else { continue };
                match sock.try_send_to(&data, peer.addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let _ = sock.send_to(&data, peer.addr).await;
                    }
                    Err(e) => tracing::debug!(error = %e, to = %peer.addr, "udp send failed"),
                }
            }
            Transport::Tcp | Transport::Tls => {
                let flow = peer.flow.filter(|f| conns.contains_key(f)).or_else(|| {
                    outbound
                        .get(&peer.addr)
                        .copied()
                        .filter(|f| conns.contains_key(f))
                });
                let flow = match flow {
                    Some(f) => f,
                    None if peer.transport == Transport::Tcp => {
                        let id =
                            FlowId(next_flow.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                        let (tx, rx) = mpsc::unbounded_channel();
                        conns.insert(id, tx);
                        outbound.insert(peer.addr, id);
                        tokio::spawn(connect_out(peer.addr, id, in_tx.clone(), rx));
                        id
                    }
                    None => continue,
                };
                if let Some(tx) = conns.get(&flow) {
                    let _ = tx.send(data);
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    in_tx: mpsc::Sender<Inbound>,
    next_flow: Arc<std::sync::atomic::AtomicU64>,
) {
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if live.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        let id = FlowId(next_flow.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        if in_tx.send(Inbound::Opened(id, tx)).await.is_err() {
            return;
        }
        let live = live.clone();
        live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let in_tx = in_tx.clone();
        tokio::spawn(async move {
            serve_stream(stream, addr, id, in_tx, rx).await;
            live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

async fn connect_out(
    addr: SocketAddr,
    id: FlowId,
    in_tx: mpsc::Sender<Inbound>,
    rx: mpsc::UnboundedReceiver<Bytes>,
) {
    match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => serve_stream(stream, addr, id, in_tx, rx).await,
        _ => {
            tracing::warn!(to = %addr, "tcp connect failed");
            let _ = in_tx.send(Inbound::Closed(id)).await;
        }
    }
}

async fn serve_stream(
    stream: TcpStream,
    addr: SocketAddr,
    id: FlowId,
    in_tx: mpsc::Sender<Inbound>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let peer = Peer {
        transport: Transport::Tcp,
        addr,
        flow: Some(id),
    };
    let mut framer = StreamFramer::default();
    'read: loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, rd.read_buf(framer.buffer_mut())).await {
            Ok(Ok(n)) => n,
            _ => break,
        };
        if n == 0 {
            break;
        }
        loop {
            match framer.next_message() {
                Ok(Some(msg)) => {
                    if in_tx
                        .send(Inbound::Message(msg, peer.clone()))
                        .await
                        .is_err()
                    {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(FramingError::ContentLength) => {
                    let head = framer.buffer_mut().split().freeze();
                    let _ = in_tx.send(Inbound::Unframeable(head, peer.clone())).await;
                    // Give the core a moment to answer before the close.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break 'read;
                }
                Err(_) => break 'read,
            }
        }
    }
    let _ = in_tx.send(Inbound::Closed(id)).await;
    writer.abort();
}
