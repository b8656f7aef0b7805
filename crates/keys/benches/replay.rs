//! `ReplayCache::first_use` of a fresh id (what every accepted INVITE costs):
//! the in-memory cache against the file-backed one (one `write(2)` under a
//! lock per first use), single-threaded and with 4 threads at once. Time per
//! first use (with 4 threads: wall time / uses, i.e. inverse throughput).
//!
//! `cargo bench -p tollgate-keys --bench replay`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_keys::{FileReplayCache, MemoryReplayCache, ReplayCache};

const NOW: i64 = 1_700_000_000;

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `iters` first uses spread over `threads` threads; wall time.
fn run(cache: &Arc<dyn ReplayCache>, next: &Arc<AtomicU64>, threads: u64, iters: u64) -> Duration {
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (c, n) = (cache.clone(), next.clone());
            std::thread::spawn(move || {
                for _ in 0..iters / threads {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    // A realistic id: "<12-char kid>:<uuid-sized jti>".
                    let id = format!("abcdefghijkl:{i:036}");
                    assert!(c.first_use(&id, NOW + 600, NOW));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    t0.elapsed()
}

/// A fresh cache per sample, so that every sample starts from the same state
/// (nothing expires during a bench: `now` is fixed).
fn fresh(name: &str) -> Arc<dyn ReplayCache> {
    match name {
        "memory" => Arc::new(MemoryReplayCache::new()),
        _ => {
            let d = dir("file");
            let (c, _) = FileReplayCache::open(&d, NOW).unwrap();
            Arc::new(c)
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay/first_use");
    g.sample_size(20);
    for name in ["memory", "file"] {
        for threads in [1u64, 4] {
            g.bench_function(format!("{name}/{threads}_threads"), |b| {
                b.iter_custom(|iters| {
                    let cache = fresh(name);
                    run(
                        &cache,
                        &Arc::new(AtomicU64::new(0)),
                        threads,
                        iters.max(threads),
                    )
                })
            });
        }
    }
    g.finish();
    let _ = std::fs::remove_dir_all(dir("file"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
