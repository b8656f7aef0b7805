//! Batched datagram I/O for the relay (Linux only): `recvmmsg` drains up to
//! [`BATCH`] datagrams per system call into buffers preallocated once per
//! worker thread, the relay transforms them in place
//! ([`Relay::process`](crate::relay::Relay)), and what goes on leaves in one
//! system call too: one `sendmsg` with UDP GSO (`UDP_SEGMENT`, Linux 4.18+)
//! when the batch is same-size packets to one peer (the usual case: one
//! codec, one stream per socket), else `sendmmsg`.
//!
//! The receive runs inside `tokio::net::UdpSocket::try_io`, so the
//! reactor's readiness stays right: a receive that fills fewer than
//! [`BATCH`] slots has emptied the queue and clears readiness (tokio's tick
//! keeps a datagram that arrives meanwhile from being missed). Sends do not
//! go through the reactor (see `relay::send_now`).
//!
//! Fallbacks: a kernel without `recvmmsg`/`sendmmsg` (ENOSYS) switches the
//! process to the portable one-datagram path; a kernel or route refusing GSO
//! switches GSO off and the batch goes out with `sendmmsg`.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::relay::{metrics, Action, Relay, Sockets, Tally, Way, BUF_SIZE, MAX_ERRORS};

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 32;

/// Largest GSO segment we use: fits any path MTU >= 1280 (a larger segment
/// than the route's MTU is refused with EINVAL).
const GSO_MAX_SEGMENT: usize = 1200;

/// Set once the kernel said ENOSYS to `recvmmsg` or `sendmmsg`.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
/// Set once the kernel refused a GSO send (old kernel, no checksum offload).
static NO_GSO: AtomicBool = AtomicBool::new(false);

/// Whether the batched path is in use.
pub fn available() -> bool {
    !UNSUPPORTED.load(Ordering::Relaxed)
}

/// Whether batches to one peer may go out as one GSO send.
pub fn gso_available() -> bool {
    !NO_GSO.load(Ordering::Relaxed)
}

/// A datagram to send: which slot, where, from which socket of the leg.
#[derive(Clone, Copy)]
struct Out {
    slot: usize,
    dst: SocketAddr,
    rtcp_socket: bool,
}

/// The per-thread buffers: allocated on a worker thread's first batch and
/// reused by every call's relay task that runs on that thread (the drain is
/// synchronous, so one set per thread is enough and stays in cache).
struct Scratch {
    slots: Vec<BytesMut>,
    lens: [usize; BATCH],
    src: Vec<libc::sockaddr_storage>,
    src_len: [libc::socklen_t; BATCH],
    dst: Vec<libc::sockaddr_storage>,
    out: Vec<Out>,
}

impl Scratch {
    fn new() -> Box<Scratch> {
        // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
        let zero: libc::sockaddr_storage = unsafe { mem::zeroed() };
        Box::new(Scratch {
            slots: (0..BATCH)
                .map(|_| BytesMut::with_capacity(BUF_SIZE))
                .collect(),
            lens: [0; BATCH],
            src: vec![zero; BATCH],
            src_len: [0; BATCH],
            dst: vec![zero; BATCH],
            out: Vec::with_capacity(BATCH),
        })
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<Box<Scratch>>> = const { RefCell::new(None) };
}

/// Drains leg `from`'s RTP or RTCP socket in batches. Returns false (having
/// consumed nothing since the last batch) when batching is unsupported:
/// the caller then goes on with the portable path.
pub(crate) fn drain(relay: &mut Relay, socks: &[Sockets; 2], from: Way, rtcp: bool) -> bool {
    SCRATCH.with(|cell| {
        let Ok(mut scratch) = cell.try_borrow_mut() else {
            return false;
        };
        let scratch = scratch.get_or_insert_with(Scratch::new);
        drain_with(scratch, relay, socks, from, rtcp)
    })
}

fn drain_with(
    s: &mut Scratch,
    relay: &mut Relay,
    socks: &[Sockets; 2],
    from: Way,
    rtcp: bool,
) -> bool {
    let (sock, outbound) = from.sockets(socks, rtcp);
    // One clock read per readiness event, not per packet.
    let now = Instant::now();
    let mut tally = Tally::default();
    let mut errors = 0u32;
    let supported = loop {
        let mut got = 0;
        let r = sock.try_io(Interest::READABLE, || {
            got = recv_batch(sock, s)?;
            if got < BATCH {
                // The queue is empty: let tokio clear readiness.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if got > 0 {
            relay_batch(s, relay, outbound, from, rtcp, got, now, &mut tally);
        }
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                break false;
            }
            // ICMP port unreachable and the like surface here: keep going
            // (but not forever on an error that does not clear).
            Err(_) => {
                errors += 1;
                if errors > MAX_ERRORS {
                    break true;
                }
            }
        }
    };
    tally.flush(&relay.stats);
    supported
}

/// One `recvmmsg` into the slots; the number of datagrams received.
fn recv_batch(sock: &UdpSocket, s: &mut Scratch) -> io::Result<usize> {
    // SAFETY: iovec and mmsghdr are plain data; all zeroes is valid.
    let mut iov: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for i in 0..BATCH {
        let slot = &mut s.slots[i];
        slot.clear();
        if slot.capacity() < BUF_SIZE {
            *slot = BytesMut::with_capacity(BUF_SIZE);
        }
        let spare = slot.spare_capacity_mut();
        iov[i] = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&mut s.src[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
    }
    // SAFETY: every header points at a live iovec over a slot's spare
    // capacity and at a live sockaddr_storage, with their true lengths; the
    // kernel writes no more than those lengths. Nothing else touches the
    // slots until this returns.
    let n = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as _,
            libc::MSG_DONTWAIT as _,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (n as usize).min(BATCH);
    for (i, m) in msgs.iter().enumerate().take(n) {
        // A datagram larger than the slot is cut to the slot (and then
        // dropped as too large by the relay).
        s.lens[i] = (m.msg_len as usize).min(s.slots[i].capacity());
        s.src_len[i] = m.msg_hdr.msg_namelen;
    }
    Ok(n)
}

/// Transforms the `n` datagrams received and sends on those that go on.
#[allow(clippy::too_many_arguments)]
fn relay_batch(
    s: &mut Scratch,
    relay: &mut Relay,
    outbound: &Sockets,
    from: Way,
    rtcp: bool,
    n: usize,
    now: Instant,
    tally: &mut Tally,
) {
    s.out.clear();
    for i in 0..n {
        let slot = &mut s.slots[i];
        // SAFETY: recvmmsg initialised the first lens[i] bytes of the
        // slot's spare capacity (lens[i] <= capacity).
        unsafe { slot.set_len(s.lens[i]) };
        let Some(src) = to_std(&s.src[i], s.src_len[i]) else {
            relay.stats.malformed.fetch_add(1, Ordering::Relaxed);
            metrics().dropped_malformed.increment(1);
            continue;
        };
        if let Action::Send { dst, rtcp_socket } = relay.process(from, rtcp, src, slot, now, tally)
        {
            s.out.push(Out {
                slot: i,
                dst,
                rtcp_socket,
            });
        }
    }
    // Runs of datagrams that leave from the same socket.
    let mut i = 0;
    while i < s.out.len() {
        let rtcp_socket = s.out[i].rtcp_socket;
        let mut j = i + 1;
        while j < s.out.len() && s.out[j].rtcp_socket == rtcp_socket {
            j += 1;
        }
        let sock = if rtcp_socket {
            &outbound.rtcp
        } else {
            &outbound.rtp
        };
        send_run(sock, &s.slots, &mut s.dst, &s.out[i..j]);
        i = j;
    }
}

/// Sends datagrams from one socket: one GSO send if they qualify, else
/// `sendmmsg` until done; what cannot be sent is dropped and counted.
fn send_run(
    sock: &UdpSocket,
    slots: &[BytesMut],
    names: &mut [libc::sockaddr_storage],
    outs: &[Out],
) {
    let n = outs.len();
    // SAFETY: iovec and mmsghdr are plain data; all zeroes is valid.
    let mut iov: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for (k, o) in outs.iter().enumerate() {
        let buf = &slots[o.slot];
        iov[k] = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
    }
    if n >= 2 && gso_available() && gso_eligible(slots, outs) {
        let len = to_sockaddr(outs[0].dst, &mut names[0]);
        match send_gso(
            sock,
            &mut iov[..n],
            &mut names[0],
            len,
            slots[outs[0].slot].len(),
        ) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                metrics().dropped_send.increment(n as u64);
                return;
            }
            Err(e) => match e.raw_os_error() {
                // The kernel or the route cannot segment: never again; this
                // batch goes out with sendmmsg below.
                Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP) => {
                    NO_GSO.store(true, Ordering::Relaxed);
                }
                _ => {
                    metrics().dropped_send.increment(n as u64);
                    return;
                }
            },
        }
    }
    for (k, o) in outs.iter().enumerate() {
        let len = to_sockaddr(o.dst, &mut names[k]);
        let h = &mut msgs[k].msg_hdr;
        h.msg_name = (&mut names[k] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = len;
        h.msg_iov = &mut iov[k];
        h.msg_iovlen = 1;
    }
    let mut sent = 0;
    let mut dropped = 0u64;
    while sent < n {
        // Sent now, not through tokio's write readiness (see
        // relay::send_now).
        // SAFETY: headers sent..n point at live iovecs over the slots'
        // initialised bytes and at live addresses of the given lengths; the
        // kernel only reads them.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[sent..n].as_mut_ptr(),
                (n - sent) as _,
                libc::MSG_DONTWAIT as _,
            )
        };
        let r = if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        };
        match r {
            Ok(m) if m > 0 => sent += m,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                for o in &outs[sent..] {
                    if crate::relay::send_now(sock, &slots[o.slot], o.dst).is_err() {
                        dropped += 1;
                    }
                }
                break;
            }
            // Would block (socket buffer full): the rest is dropped, as a
            // single send would have been.
            Ok(_) => {
                dropped += (n - sent) as u64;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dropped += (n - sent) as u64;
                break;
            }
            // The first datagram was refused (unreachable, bad address):
            // drop it, go on with the rest.
            Err(_) => {
                dropped += 1;
                sent += 1;
            }
        }
    }
    if dropped > 0 {
        metrics().dropped_send.increment(dropped);
    }
}

/// One destination and one size (the last may be shorter), within the
/// limits of one GSO send.
fn gso_eligible(slots: &[BytesMut], outs: &[Out]) -> bool {
    let seg = slots[outs[0].slot].len();
    if seg == 0 || seg > GSO_MAX_SEGMENT || seg * outs.len() > u16::MAX as usize - 100 {
        return false;
    }
    let last = outs.len() - 1;
    outs.iter().enumerate().all(|(k, o)| {
        let len = slots[o.slot].len();
        o.dst == outs[0].dst && (len == seg || (k == last && len > 0 && len < seg))
    })
}

/// One `sendmsg` of the iovecs as segments of `seg` bytes (UDP_SEGMENT).
fn send_gso(
    sock: &UdpSocket,
    iov: &mut [libc::iovec],
    name: &mut libc::sockaddr_storage,
    name_len: libc::socklen_t,
    seg: usize,
) -> io::Result<()> {
    // Room for one cmsg carrying a u16, aligned as the kernel wants.
    #[repr(C, align(8))]
    struct Control([u8; 32]);
    let mut control = Control([0; 32]);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= control.0.len());
    // SAFETY: msghdr is plain data; all zeroes is valid.
    let mut h: libc::msghdr = unsafe { mem::zeroed() };
    h.msg_name = (name as *mut libc::sockaddr_storage).cast();
    h.msg_namelen = name_len;
    h.msg_iov = iov.as_mut_ptr();
    h.msg_iovlen = iov.len() as _;
    h.msg_control = control.0.as_mut_ptr().cast();
    h.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough
    // for one header and a u16 (CMSG_SPACE), so CMSG_FIRSTHDR is non-null
    // and CMSG_DATA stays inside the buffer.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
    // Sent now, not through tokio's write readiness (see relay::send_now).
    // SAFETY: the header points at live iovecs over initialised bytes, a
    // live address and the control buffer above; the kernel only reads
    // them.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &h, libc::MSG_DONTWAIT) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A kernel socket address as std's (the same values std's own receive
/// functions give, so latching compares equal).
fn to_std(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in, which fits in storage.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says sockaddr_in6, which fits in storage.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// std's socket address in the kernel's form; its length.
fn to_sockaddr(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is aligned
            // for it; every field is written.
            let s =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            s.sin_zero = [0; 8];
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let s =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            s.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip() {
        // SAFETY: plain data.
        let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        for a in [
            "127.0.0.1:4000",
            "198.51.100.9:61000",
            "[::1]:5004",
            "[2001:db8::7]:1",
            "[fe80::1%3]:6000",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let len = to_sockaddr(a, &mut ss);
            assert_eq!(to_std(&ss, len), Some(a));
        }
        // A truncated or foreign address is refused, not misread.
        let len = to_sockaddr("[::1]:5004".parse().unwrap(), &mut ss);
        assert_eq!(to_std(&ss, len - 1), None);
        ss.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(to_std(&ss, len), None);
    }

    #[test]
    fn gso_only_for_one_peer_and_one_size() {
        let bufs = |lens: &[usize]| -> Vec<BytesMut> {
            lens.iter()
                .map(|&n| {
                    let mut b = BytesMut::with_capacity(BUF_SIZE);
                    b.resize(n, 0x80);
                    b
                })
                .collect()
        };
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4002".parse().unwrap();
        let outs = |dsts: &[SocketAddr]| -> Vec<Out> {
            dsts.iter()
                .enumerate()
                .map(|(slot, &dst)| Out {
                    slot,
                    dst,
                    rtcp_socket: false,
                })
                .collect()
        };
        let slots = bufs(&[182, 182, 182]);
        assert!(gso_eligible(&slots, &outs(&[a, a, a])));
        assert!(!gso_eligible(&slots, &outs(&[a, b, a])));
        // Only the last may be shorter.
        assert!(gso_eligible(&bufs(&[182, 182, 100]), &outs(&[a, a, a])));
        assert!(!gso_eligible(&bufs(&[182, 100, 182]), &outs(&[a, a, a])));
        assert!(!gso_eligible(&bufs(&[182, 190]), &outs(&[a, a])));
        // Segments that might not fit a path MTU are not segmented.
        assert!(!gso_eligible(&bufs(&[1400, 1400]), &outs(&[a, a])));
    }
}
