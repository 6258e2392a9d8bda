//! A short, stable-toolchain smoke of the `cargo fuzz` admission target: the same harness
//! (`fuzz/harness.rs`) over the seed corpus and a few thousand seeded random mutations of it.
//! The real fuzzing run (nightly, libFuzzer, coverage-guided) is `scripts/fuzz`.

#[path = "../../fuzz/harness.rs"]
mod harness;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

fn seeds() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/admission");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "the seed corpus is in {}", dir.display());
    seeds
}

/// Flips, inserts, deletes and splices bytes, biased towards JSON punctuation.
fn mutate(rng: &mut StdRng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b"null",
        b"1e999",
        b"-0",
        b"\\u0000",
        b"\\ud800",
        b"\xff",
        b"\n",
        b".",
        b">",
        b"*",
        b"\"agent_id\":\"agent-2\"",
        b"\"agent_id\":1",
        b"\"status\":\"degraded\"",
        b"[[[[[[[[",
        b"18446744073709551616",
    ];
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..6) {
        let at = rng.random_range(0..=out.len());
        match rng.random_range(0..5) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let piece = INTERESTING[rng.random_range(0..INTERESTING.len())];
                out.splice(at..at, piece.iter().copied());
            }
            2 if at < out.len() => {
                let end = (at + rng.random_range(1..8)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..other.len());
                let to = (from + rng.random_range(1..32)).min(other.len());
                out.splice(at..at, other[from..to].iter().copied());
            }
            _ if !out.is_empty() => out[0] = rng.random(),
            _ => {}
        }
    }
    out
}

#[test]
fn the_admission_fuzz_target_survives_its_corpus_and_seeded_mutations() {
    let seeds = seeds();
    for seed in &seeds {
        harness::run(seed);
    }
    let mut rng = StdRng::seed_from_u64(0x00ac_c0de);
    let mut pool = seeds.clone();
    for _ in 0..20_000 {
        let base = pool[rng.random_range(0..pool.len())].clone();
        let input = mutate(&mut rng, &base, &seeds);
        harness::run(&input);
        if pool.len() < 256 && rng.random_bool(0.05) {
            pool.push(input);
        }
    }
}
