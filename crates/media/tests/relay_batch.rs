//! The relay task's batched path (`recvmmsg`/`sendmmsg`/UDP GSO on Linux)
//! against the portable one-datagram path, over real loopback sockets: a
//! burst larger than a batch, queued before the relay reads, comes out in
//! order and byte-identical (checked with the webrtc-srtp reference), with
//! strangers, forged tags and replays in the middle of the burst dropped and
//! counted, RTCP on its own socket and muxed, and every counter right.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tollgate_media::relay::{
    run_with, CallStats, IoMode, Latch, Relay, Side, Sockets, StatsSnapshot, StopSignal,
};
use tollgate_media::srtp::{new_context, reference, Direction, SrtpKeys, SrtpTransform, Suite};

async fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

fn rtp(seq: u16, ssrc: u32, payload: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(2048);
    b.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    b[2..4].copy_from_slice(&seq.to_be_bytes());
    b[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    b[8..12].copy_from_slice(&ssrc.to_be_bytes());
    b.extend((0..payload).map(|i| (i as u8) ^ (seq as u8)));
    b
}

fn rtcp_sr(ssrc: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(2048);
    b.extend_from_slice(&[0x80, 200, 0, 6]);
    b.extend_from_slice(&ssrc.to_be_bytes());
    b.extend_from_slice(&[0x33; 20]);
    b
}

/// Receives until `n` datagrams came or nothing more comes for a while.
async fn recv_all(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    recv_for(s, n, Duration::from_secs(20)).await
}

/// What arrives on `s` within `quiet` (for "nothing may come").
async fn recv_none(s: &UdpSocket, quiet: Duration) -> Vec<Vec<u8>> {
    recv_for(s, usize::MAX, quiet).await
}

/// Up to `n` datagrams, waiting at most `within` in all (no gap timeout: a
/// loaded machine may pause the sender or the relay for seconds).
async fn recv_for(s: &UdpSocket, n: usize, within: Duration) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = vec![0u8; 4096];
    let deadline = Instant::now() + within;
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, s.recv_from(&mut b)).await {
            Ok(Ok((len, _))) => out.push(b[..len].to_vec()),
            _ => break,
        }
    }
    out
}

/// The relay's counters once they show at least `relayed` (A->B, B->A)
/// packets: it adds a batch to them after sending it, so a peer may hold
/// the last packets a moment before the counters do (10 s at most).
async fn settled_stats(stats: &CallStats, relayed: (u64, u64)) -> StatsSnapshot {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats.snapshot();
        if (s.relayed_a_to_b >= relayed.0 && s.relayed_b_to_a >= relayed.1)
            || Instant::now() >= deadline
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Call {
    a_rtp: UdpSocket,
    a_rtcp: UdpSocket,
    b: Arc<UdpSocket>,
    relay_a: (SocketAddr, SocketAddr),
    relay_b: SocketAddr,
    stats: Arc<CallStats>,
    stop: StopSignal,
    task: tokio::task::JoinHandle<()>,
}

/// Leg A plain RTP (RTCP on its own port), leg B SRTP with rtcp-mux.
async fn call(mode: IoMode, suite: Suite, to_b: &SrtpKeys, from_b: &SrtpKeys) -> Call {
    let (a_rtp, a_rtcp, b) = (bind().await, bind().await, bind().await);
    let now = Instant::now();
    let a = Side {
        rtp_latch: Latch::new(Some(a_rtp.local_addr().unwrap()), now),
        rtcp_latch: Latch::new(Some(a_rtcp.local_addr().unwrap()), now),
        mux: false,
        tx: None,
        rx: None,
    };
    let b_side = Side {
        rtp_latch: Latch::new(Some(b.local_addr().unwrap()), now),
        rtcp_latch: Latch::new(Some(b.local_addr().unwrap()), now),
        mux: true,
        tx: Some(new_context(suite, to_b, Direction::Outbound).unwrap()),
        rx: Some(new_context(suite, from_b, Direction::Inbound).unwrap()),
    };
    let stats = Arc::new(CallStats::default());
    let stop = StopSignal::default();
    let relay = Relay {
        sides: [a, b_side],
        stats: stats.clone(),
        stop: stop.clone(),
        tap: None,
    };
    let socks = [
        Sockets {
            rtp: bind().await,
            rtcp: bind().await,
            ports: None,
        },
        Sockets {
            rtp: bind().await,
            rtcp: bind().await,
            ports: None,
        },
    ];
    let relay_a = (
        socks[0].rtp.local_addr().unwrap(),
        socks[0].rtcp.local_addr().unwrap(),
    );
    let relay_b = socks[1].rtp.local_addr().unwrap();
    let task = tokio::spawn(run_with(relay, socks, mode));
    Call {
        a_rtp,
        a_rtcp,
        b: Arc::new(b),
        relay_a,
        relay_b,
        stats,
        stop,
        task,
    }
}

/// What one mode delivers for the same traffic: (to B decrypted, to A).
async fn exchange(mode: IoMode) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, StatsSnapshot) {
    let suite = Suite::AesCm128HmacSha1_80;
    let (to_b, from_b) = (
        SrtpKeys::generate(suite).unwrap(),
        SrtpKeys::generate(suite).unwrap(),
    );
    let c = call(mode, suite, &to_b, &from_b).await;
    let stranger = bind().await;

    // A -> B: 100 RTP (three batches and a bit), varying sizes in the
    // second half, 3 strangers and 2 RTCP on A's RTCP port in between. The
    // relay is busy with nothing else, so most of this is queued when it
    // first reads.
    let (mut rtp_to_b, mut rtcp_to_b) = (Vec::new(), Vec::new());
    for seq in 0..100u16 {
        let p = rtp(seq, 0xA, if seq < 50 { 160 } else { 20 + usize::from(seq) });
        c.a_rtp.send_to(&p, c.relay_a.0).await.unwrap();
        rtp_to_b.push(p.to_vec());
        if seq % 40 == 7 {
            stranger
                .send_to(&rtp(seq, 0xBAD, 160), c.relay_a.0)
                .await
                .unwrap();
        }
        if seq == 30 || seq == 90 {
            let r = rtcp_sr(0xA);
            c.a_rtcp.send_to(&r, c.relay_a.1).await.unwrap();
            rtcp_to_b.push(r.to_vec());
        }
    }
    let got = recv_all(&c.b, rtp_to_b.len() + rtcp_to_b.len()).await;
    let mut b_rx = reference::Context::new(suite, &to_b, Direction::Inbound).unwrap();
    let (mut rtp_at_b, mut rtcp_at_b) = (Vec::new(), Vec::new());
    for p in got {
        let mut buf = BytesMut::from(&p[..]);
        // RTP and RTCP come from two sockets: ordered within each only.
        if (192..=223).contains(&p[1]) {
            b_rx.unprotect_rtcp(&mut buf).unwrap();
            rtcp_at_b.push(buf.to_vec());
        } else {
            b_rx.unprotect_rtp(&mut buf).unwrap();
            rtp_at_b.push(buf.to_vec());
        }
    }
    assert_eq!(rtp_at_b, rtp_to_b, "{mode:?}: A->B");
    assert_eq!(rtcp_at_b, rtcp_to_b, "{mode:?}: A->B RTCP");
    let mut to_b_plain = rtp_at_b;
    to_b_plain.extend(rtcp_at_b);

    // B -> A: 70 SRTP, a forged tag, a replay and a stranger in between, a
    // muxed SRTCP (goes to A's RTCP port).
    let mut b_tx = reference::Context::new(suite, &from_b, Direction::Outbound).unwrap();
    let mut rtp_to_a = Vec::new();
    for seq in 0..70u16 {
        let p = rtp(seq, 0xB, 160);
        let mut s = p.clone();
        b_tx.protect_rtp(&mut s).unwrap();
        if seq == 10 {
            // A forged tag first (fails authentication, not the replay
            // check), then the real one, then a replay and a stranger.
            let mut forged = s.clone();
            let n = forged.len();
            forged[n - 1] ^= 1;
            c.b.send_to(&forged, c.relay_b).await.unwrap();
            c.b.send_to(&s, c.relay_b).await.unwrap();
            c.b.send_to(&s, c.relay_b).await.unwrap();
            stranger.send_to(&s, c.relay_b).await.unwrap();
        } else {
            c.b.send_to(&s, c.relay_b).await.unwrap();
        }
        rtp_to_a.push(p.to_vec());
    }
    let mut sr = rtcp_sr(0xB);
    let sr_plain = sr.to_vec();
    b_tx.protect_rtcp(&mut sr).unwrap();
    c.b.send_to(&sr, c.relay_b).await.unwrap();
    let to_a = recv_all(&c.a_rtp, rtp_to_a.len()).await;
    assert_eq!(to_a, rtp_to_a, "{mode:?}: B->A");
    let rtcp_to_a = recv_all(&c.a_rtcp, 1).await;
    assert_eq!(rtcp_to_a, vec![sr_plain], "{mode:?}: B->A RTCP");

    // Counters are added after each batch is sent: wait until what the
    // peers received shows in them, then settle.
    let relayed = (
        to_b_plain.len() as u64,
        (to_a.len() + rtcp_to_a.len()) as u64,
    );
    let stats = settled_stats(&c.stats, relayed).await;
    c.task.abort();
    (to_b_plain, to_a, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_and_single_paths_relay_the_same() {
    let (b1, a1, s1) = exchange(IoMode::Auto).await;
    let (b2, a2, s2) = exchange(IoMode::Single).await;
    assert_eq!((b1.len(), a1.len()), (102, 70));
    assert_eq!((b2.len(), a2.len()), (102, 70));
    for s in [s1, s2] {
        assert_eq!(
            s,
            StatsSnapshot {
                relayed_a_to_b: 102,
                relayed_b_to_a: 71,
                auth_failures: 1,
                replayed: 1,
                strangers: 4,
                malformed: 0,
                latched_late: 0,
            }
        );
    }
}

/// A full batch and then some, all the same size, from many streams at once
/// (one task per call, as in the edge): every packet arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_in_bursts() {
    let suite = Suite::AesCm128HmacSha1_80;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (to_b, from_b) = (
            SrtpKeys::generate(suite).unwrap(),
            SrtpKeys::generate(suite).unwrap(),
        );
        calls.push(call(IoMode::Auto, suite, &to_b, &from_b).await);
    }
    // Each B reads while the bursts go out, and 120 datagrams fit a
    // default socket buffer even unread: no loss but the relay's.
    let readers: Vec<_> = calls
        .iter()
        .map(|c| {
            let b = c.b.clone();
            tokio::spawn(async move { recv_all(&b, 120).await })
        })
        .collect();
    for burst in 0..3u16 {
        for c in &calls {
            for i in 0..40u16 {
                let p = rtp(burst * 40 + i, 0xA, 160);
                c.a_rtp.send_to(&p, c.relay_a.0).await.unwrap();
            }
        }
    }
    for (c, r) in calls.iter().zip(readers) {
        let got = r.await.unwrap();
        assert_eq!(got.len(), 120);
        assert!(got.iter().all(|p| p.len() == 182));
        let stats = settled_stats(&c.stats, (120, 0)).await;
        assert_eq!(stats.relayed_a_to_b, 120);
        c.task.abort();
    }
}

/// A relay told to stop forwards nothing more, even while its task is still
/// alive (the engine also aborts it, but an abort lands only when the task's
/// current poll returns, which on a loaded machine can be after the next
/// packet arrived), and its task then ends by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_forwards_nothing() {
    let suite = Suite::AesCm128HmacSha1_80;
    for mode in [IoMode::Auto, IoMode::Single] {
        let (to_b, from_b) = (
            SrtpKeys::generate(suite).unwrap(),
            SrtpKeys::generate(suite).unwrap(),
        );
        let mut c = call(mode, suite, &to_b, &from_b).await;
        c.a_rtp
            .send_to(&rtp(1, 0xA, 160), c.relay_a.0)
            .await
            .unwrap();
        assert_eq!(recv_all(&c.b, 1).await.len(), 1, "{mode:?}: relayed before");

        c.stop.stop();
        for seq in 2..12u16 {
            c.a_rtp
                .send_to(&rtp(seq, 0xA, 160), c.relay_a.0)
                .await
                .unwrap();
        }
        let ended = timeout(Duration::from_secs(20), &mut c.task).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "{mode:?}: the task ends on its own once stopped: {ended:?}"
        );
        assert!(
            recv_none(&c.b, Duration::from_millis(1500))
                .await
                .is_empty(),
            "{mode:?}: nothing after the stop"
        );
        assert_eq!(c.stats.snapshot().relayed_a_to_b, 1, "{mode:?}");
    }
}

/// The first packets of a call are often queued on the offerer's port
/// before the answer starts the relay, and the relay then sends them on
/// from sockets the reactor has not reported writable yet (it registered
/// them a moment before). They must go out all the same: tokio's own
/// `try_send_to` refuses without trying then, and the first packet of a
/// call was lost now and then on a loaded machine.
///
/// Made deterministic with a current-thread runtime: leg A's sockets are
/// registered and a packet is queued on them, the reactor turns (it knows A
/// readable), then leg B's sockets are registered and the relay polled
/// before the reactor's next turn.
#[test]
fn the_first_packet_goes_out_before_the_reactor_saw_the_sending_socket() {
    for mode in [IoMode::Auto, IoMode::Single] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a_peer, b_peer) = (bind().await, bind().await);
            let (a_rtp, a_rtcp) = (bind().await, bind().await);
            let first = rtp(1, 0xA, 160);
            a_peer
                .send_to(&first, a_rtp.local_addr().unwrap())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;

            let std_bind = || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                UdpSocket::from_std(s).unwrap()
            };
            let (b_rtp, b_rtcp) = (std_bind(), std_bind());
            let now = Instant::now();
            let side = |peer: SocketAddr| Side {
                rtp_latch: Latch::new(Some(peer), now),
                rtcp_latch: Latch::new(Some(peer), now),
                mux: true,
                tx: None,
                rx: None,
            };
            let stats = Arc::new(CallStats::default());
            let relay = Relay {
                sides: [
                    side(a_peer.local_addr().unwrap()),
                    side(b_peer.local_addr().unwrap()),
                ],
                stats: stats.clone(),
                stop: StopSignal::default(),
                tap: None,
            };
            let socks = [
                Sockets {
                    rtp: a_rtp,
                    rtcp: a_rtcp,
                    ports: None,
                },
                Sockets {
                    rtp: b_rtp,
                    rtcp: b_rtcp,
                    ports: None,
                },
            ];
            let task = tokio::spawn(run_with(relay, socks, mode));
            let got = recv_all(&b_peer, 1).await;
            assert_eq!(got, vec![first.to_vec()], "{mode:?}: the first packet");
            assert_eq!(stats.snapshot().relayed_a_to_b, 1, "{mode:?}");
            task.abort();
        });
    }
}
