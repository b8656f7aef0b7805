//! Cost per INVITE of the number work (SPEC §4a): canonicalizing the
//! destination and checking it against the edge-wide deny list (number type
//! from libphonenumber's metadata plus the revenue-share prefixes).
//!
//! `cargo bench -p tollgate-trunk --bench deny_list`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tollgate_keys::number::NumberPlan;
use tollgate_trunk::policy::DenyList;
use tollgate_trunk::TrunkConfig;

fn bench(c: &mut Criterion) {
    let plan = NumberPlan::default();
    let deny: DenyList = TrunkConfig::default().deny_list().expect("default list");
    let mut g = c.benchmark_group("numbers");
    for (name, dest) in [
        (
            "us_valid_sip_uri",
            "sip:+14155550100@edge.example.com;user=phone",
        ),
        ("us_national", "4155550100"),
        ("gb_premium_00", "00449090901234"),
        ("us_unallocated_npa", "15551230000"),
        ("name", "agent"),
    ] {
        g.bench_function(format!("canonicalize/{name}"), |b| {
            b.iter(|| plan.canonicalize(black_box(dest)))
        });
        let d = plan.canonicalize(dest);
        g.bench_function(format!("deny_check/{name}"), |b| {
            b.iter(|| deny.denies(black_box(&d)))
        });
        g.bench_function(format!("both/{name}"), |b| {
            b.iter(|| deny.denies(&plan.canonicalize(black_box(dest))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
