//! SRTP protect/unprotect of a 172-byte RTP packet (12-byte header, 160 bytes
//! of G.711 payload) per suite: ours (`native`, in place) against webrtc-srtp
//! 0.17 (`reference`). The ratio between the two is the figure; absolute
//! numbers depend on the machine.
//!
//! `cargo bench -p tollgate-media --bench srtp`

use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tollgate_media::srtp::{
    Direction, NativeProvider, ReferenceProvider, SrtpKeys, SrtpProvider, Suite,
};

fn packet(seq: u16) -> BytesMut {
    let mut b = BytesMut::with_capacity(256);
    b.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]);
    b[2..4].copy_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&[0xd5; 160]);
    b
}

fn bench(c: &mut Criterion) {
    let providers: [(&str, &dyn SrtpProvider); 2] = [
        ("ours", &NativeProvider),
        ("webrtc-srtp", &ReferenceProvider),
    ];
    for suite in [
        Suite::AesCm128HmacSha1_80,
        Suite::AesCm128HmacSha1_32,
        Suite::AeadAes128Gcm,
    ] {
        let keys = SrtpKeys::generate(suite).unwrap();
        let mut g = c.benchmark_group(format!("srtp/{}", suite.sdes_name()));
        for (name, provider) in providers {
            let mut tx = provider
                .new_context(suite, &keys, Direction::Outbound)
                .unwrap();
            let mut seq = 0u16;
            g.bench_function(format!("protect/{name}"), |b| {
                b.iter_batched_ref(
                    || {
                        seq = seq.wrapping_add(1);
                        packet(seq)
                    },
                    |p| tx.protect_rtp(p).unwrap(),
                    BatchSize::SmallInput,
                )
            });

            // Unprotect: packets protected (untimed) by a separate sender in order.
            let mut sender = NativeProvider
                .new_context(suite, &keys, Direction::Outbound)
                .unwrap();
            let mut rx = provider
                .new_context(suite, &keys, Direction::Inbound)
                .unwrap();
            let mut seq = 0u16;
            g.bench_function(format!("unprotect/{name}"), |b| {
                b.iter_batched_ref(
                    || {
                        seq = seq.wrapping_add(1);
                        let mut p = packet(seq);
                        sender.protect_rtp(&mut p).unwrap();
                        p
                    },
                    |p| rx.unprotect_rtp(p).unwrap(),
                    BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = bench
}
criterion_main!(benches);
