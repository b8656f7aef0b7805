// Test helpers of the crates' fuzz tests (`tollgate_media::fuzzing`,
// `tollgate_keys::fuzzing`), `include!`d into their `#[cfg(test)]` modules so
// that both run the same mutator on stable without a shared dependency.
// Not a cargo-fuzz target.

/// `fuzz/seeds/<target>/` holds these seeds (by name; the bytes may
/// differ where a seed has a random part, such as a nonce):
/// `TOLLGATE_WRITE_SEEDS=1 cargo test -p tollgate-media -p tollgate-keys --lib fuzzing`
/// rewrites them. Returns what is on disk, for the oracles.
fn seeds_on_disk(target: &str, seeds: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    if std::env::var_os("TOLLGATE_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    seeds
        .iter()
        .map(|(name, _)| {
            std::fs::read(dir.join(name)).unwrap_or_else(|e| {
                panic!("fuzz/seeds/{target}/{name}: {e} (TOLLGATE_WRITE_SEEDS=1 writes it)")
            })
        })
        .collect()
}

/// Fixed-seed mutations of `seed` (bytes flipped, set from `alphabet`,
/// deleted, inserted, duplicated, truncated): what the tests run through
/// the oracles in place of a fuzzer.
fn mutations(seed: &[u8], alphabet: &[u8], count: usize, mut x: u64) -> Vec<Vec<u8>> {
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut b = seed.to_vec();
        for _ in 0..1 + rnd() % 4 {
            if b.is_empty() {
                break;
            }
            let i = (rnd() as usize) % b.len();
            let pick = alphabet[(rnd() as usize) % alphabet.len().max(1)];
            match rnd() % 7 {
                0 => b[i] = pick,
                1 => {
                    b.remove(i);
                }
                2 => b.insert(i, pick),
                3 => b.truncate(i),
                4 => {
                    let j = i + (rnd() as usize) % (b.len() - i).min(16);
                    let dup = b[i..=j.min(b.len() - 1)].to_vec();
                    b.splice(i..i, dup);
                }
                5 => b[i] ^= 1 << (rnd() % 8),
                _ => b[i] = rnd() as u8,
            }
        }
        out.push(b);
    }
    out
}
