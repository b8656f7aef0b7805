//! No heap allocation per packet once a stream runs: a counting global
//! allocator that counts per thread (this file is its own test binary; each
//! test counts only what its own thread allocates).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use tollgate_media::srtp::{
    new_context, Direction, ReferenceProvider, SrtpKeys, SrtpProvider, Suite,
};

struct Counting;

thread_local! {
    // Each test thread counts its own allocations (libtest's threads and the
    // other test allocate too).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        COUNT.with(|c| c.set(c.get() + 1));
    }
}

fn allocations() -> usize {
    COUNT.with(Cell::get)
}

// SAFETY: delegates to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn zero_allocations_per_packet_once_warm() {
    COUNTING.with(|c| c.set(true));
    for suite in Suite::ALL {
        let keys = SrtpKeys::generate(suite).unwrap();
        let mut tx = new_context(suite, &keys, Direction::Outbound).unwrap();
        let mut rx = new_context(suite, &keys, Direction::Inbound).unwrap();
        let mut buf = BytesMut::with_capacity(2048);
        let packet = |seq: u16, ssrc: u32, buf: &mut BytesMut| {
            buf.clear();
            buf.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            buf[2..4].copy_from_slice(&seq.to_be_bytes());
            buf[8..12].copy_from_slice(&ssrc.to_be_bytes());
            buf.extend_from_slice(&[0x55; 160]);
        };
        let rtcp = |ssrc: u32, buf: &mut BytesMut| {
            buf.clear();
            buf.extend_from_slice(&[0x81, 201, 0, 7]);
            buf.extend_from_slice(&ssrc.to_be_bytes());
            buf.extend_from_slice(&[0x11; 24]);
        };
        // Warm up: the first packet of each SSRC may set up state.
        for ssrc in [1, 2] {
            packet(65530, ssrc, &mut buf);
            tx.protect_rtp(&mut buf).unwrap();
            rx.unprotect_rtp(&mut buf).unwrap();
            rtcp(ssrc, &mut buf);
            tx.protect_rtcp(&mut buf).unwrap();
            rx.unprotect_rtcp(&mut buf).unwrap();
        }
        let before = allocations();
        for i in 1..=2000u16 {
            let ssrc = 1 + u32::from(i % 2);
            packet(65530u16.wrapping_add(i), ssrc, &mut buf); // crosses the rollover
            tx.protect_rtp(&mut buf).unwrap();
            rx.unprotect_rtp(&mut buf).unwrap();
            if i % 50 == 0 {
                rtcp(ssrc, &mut buf);
                tx.protect_rtcp(&mut buf).unwrap();
                rx.unprotect_rtcp(&mut buf).unwrap();
            }
            // A forged packet is rejected without allocating either.
            packet(65530u16.wrapping_add(i), ssrc, &mut buf);
            buf.extend_from_slice(&[0u8; 16]);
            assert!(rx.unprotect_rtp(&mut buf).is_err());
        }
        let allocs = allocations() - before;
        assert_eq!(allocs, 0, "{suite:?}: {allocs} allocations in 2000 packets");

        // The counter does count: webrtc-srtp allocates on every packet.
        let mut reference = ReferenceProvider
            .new_context(suite, &keys, Direction::Outbound)
            .unwrap();
        packet(1, 1, &mut buf);
        reference.protect_rtp(&mut buf).unwrap();
        let before = allocations();
        packet(2, 1, &mut buf);
        reference.protect_rtp(&mut buf).unwrap();
        assert!(allocations() > before);
    }
}

/// The relay's packet path (sans-IO part): RTP from leg A -> SRTP to leg B,
/// SRTP from B -> RTP to A, metrics included, allocates nothing per packet.
#[test]
fn relay_packet_path_allocates_nothing() {
    use std::sync::Arc;
    use std::time::Instant;
    use tollgate_media::relay::{Action, CallStats, Latch, Relay, Side, Way};

    COUNTING.with(|c| c.set(true));
    let suite = Suite::AesCm128HmacSha1_80;
    let (k_to_b, k_from_b) = (
        SrtpKeys::generate(suite).unwrap(),
        SrtpKeys::generate(suite).unwrap(),
    );
    let now = Instant::now();
    let a_addr = "127.0.0.1:4000".parse().unwrap();
    let b_addr = "127.0.0.1:5000".parse().unwrap();
    let side = |addr, tx: Option<&SrtpKeys>, rx: Option<&SrtpKeys>| Side {
        rtp_latch: Latch::new(Some(addr), now),
        rtcp_latch: Latch::new(Some(addr), now),
        mux: true,
        tx: tx.map(|k| new_context(suite, k, Direction::Outbound).unwrap()),
        rx: rx.map(|k| new_context(suite, k, Direction::Inbound).unwrap()),
    };
    let mut relay = Relay {
        sides: [
            side(a_addr, None, None),
            side(b_addr, Some(&k_to_b), Some(&k_from_b)),
        ],
        stats: Arc::new(CallStats::default()),
        stop: Default::default(),
        tap: None,
    };
    let mut b_tx = new_context(suite, &k_from_b, Direction::Outbound).unwrap();
    let mut buf = BytesMut::with_capacity(2048);
    let fill = |seq: u16, buf: &mut BytesMut| {
        buf.clear();
        buf.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        buf[2..4].copy_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(&[0x55; 160]);
    };
    let mut run = |seq: u16, buf: &mut BytesMut| {
        fill(seq, buf);
        let a = relay.on_packet(Way::AtoB, false, a_addr, buf, now);
        assert_eq!(
            a,
            Action::Send {
                dst: b_addr,
                rtcp_socket: false
            }
        );
        fill(seq, buf);
        b_tx.protect_rtp(buf).unwrap();
        let a = relay.on_packet(Way::BtoA, false, b_addr, buf, now);
        assert_eq!(
            a,
            Action::Send {
                dst: a_addr,
                rtcp_socket: false
            }
        );
    };
    run(1, &mut buf);
    let before = allocations();
    for seq in 2..2000 {
        run(seq, &mut buf);
    }
    let allocs = allocations() - before;
    assert_eq!(allocs, 0, "{allocs} allocations in the relay path");
}

/// The relay task over real loopback sockets, batched path (`recvmmsg`,
/// `sendmmsg`, UDP GSO) and portable path: RTP bursts from A go out as SRTP
/// to B, SRTP bursts from B come back as RTP to A, and once warm nothing is
/// allocated per packet. The runtime is current-thread, so the relay task
/// runs (and is counted) on this test's thread.
#[test]
fn relay_task_allocates_nothing_per_packet() {
    use std::net::UdpSocket as StdSocket;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tollgate_media::relay::{run_with, CallStats, IoMode, Latch, Relay, Side, Sockets};

    for mode in [IoMode::Auto, IoMode::Single] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            if mode == IoMode::Auto && cfg!(target_os = "linux") {
                assert!(tollgate_media::relay::batched_io_available());
            }
            let suite = Suite::AesCm128HmacSha1_80;
            let (k_to_b, k_from_b) = (
                SrtpKeys::generate(suite).unwrap(),
                SrtpKeys::generate(suite).unwrap(),
            );
            let peer = || {
                let s = StdSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            };
            let (a_peer, b_peer) = (peer(), peer());
            let (a_addr, b_addr) = (a_peer.local_addr().unwrap(), b_peer.local_addr().unwrap());
            let now = Instant::now();
            let side = |addr, tx: Option<&SrtpKeys>, rx: Option<&SrtpKeys>| Side {
                rtp_latch: Latch::new(Some(addr), now),
                rtcp_latch: Latch::new(Some(addr), now),
                mux: true,
                tx: tx.map(|k| new_context(suite, k, Direction::Outbound).unwrap()),
                rx: rx.map(|k| new_context(suite, k, Direction::Inbound).unwrap()),
            };
            let stats = Arc::new(CallStats::default());
            let relay = Relay {
                sides: [
                    side(a_addr, None, None),
                    side(b_addr, Some(&k_to_b), Some(&k_from_b)),
                ],
                stats: stats.clone(),
                stop: Default::default(),
                tap: None,
            };
            let leg = || Sockets {
                rtp: tokio::net::UdpSocket::from_std(peer()).unwrap(),
                rtcp: tokio::net::UdpSocket::from_std(peer()).unwrap(),
                ports: None,
            };
            let socks = [leg(), leg()];
            let (relay_a, relay_b) = (
                socks[0].rtp.local_addr().unwrap(),
                socks[1].rtp.local_addr().unwrap(),
            );
            let task = tokio::spawn(run_with(relay, socks, mode));
            let mut b_tx = new_context(suite, &k_from_b, Direction::Outbound).unwrap();
            let mut buf = BytesMut::with_capacity(2048);
            let mut rx = [0u8; 2048];
            let mut seq = 0u16;
            // One round: a burst of 16 each way (same sizes, so GSO applies,
            // or mixed sizes, so sendmmsg does), all received.
            let mut round = async |mixed: bool| {
                for (from, to, srtp) in [(&a_peer, relay_a, false), (&b_peer, relay_b, true)] {
                    for i in 0..16u16 {
                        seq = seq.wrapping_add(1);
                        let payload = if mixed && i % 3 == 0 { 120 } else { 160 };
                        buf.clear();
                        buf.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
                        buf[2..4].copy_from_slice(&seq.to_be_bytes());
                        buf.resize(12 + payload, 0x55);
                        if srtp {
                            b_tx.protect_rtp(&mut buf).unwrap();
                        }
                        from.send_to(&buf, to).unwrap();
                    }
                    let dest = if srtp { &a_peer } else { &b_peer };
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let mut got = 0;
                    while got < 16 {
                        match dest.recv_from(&mut rx) {
                            Ok((n, _)) => {
                                assert!(n == 132 || n == 172 || n == 142 || n == 182, "{n} bytes");
                                got += 1;
                            }
                            Err(_) => {
                                assert!(Instant::now() < deadline, "{mode:?}: {got} of 16 relayed");
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                }
            };
            for i in 0..20 {
                round(i % 2 == 1).await;
            }
            let before = allocations();
            for i in 0..125 {
                round(i % 2 == 1).await;
            }
            let allocs = allocations() - before;
            assert_eq!(
                allocs, 0,
                "{mode:?}: {allocs} allocations in 4000 relayed packets"
            );
            let s = stats.snapshot();
            assert_eq!((s.relayed_a_to_b, s.relayed_b_to_a), (145 * 16, 145 * 16));
            task.abort();
        });
    }
}
