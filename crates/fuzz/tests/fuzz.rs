//! Runs every fuzz target on a bounded number of cases: its seeds, then cases made from them by
//! the seeded mutator. A case fails if the target panics or takes longer than a bound; its input
//! is then saved, with the seed and case number that make it again (`docs/testing-fuzz.md`).
//!
//! - `VMESH_FUZZ_CASES`: cases per target (default 2,000; CI runs the default).
//! - `VMESH_FUZZ_SEED`: the mutator's seed (default fixed, so CI runs the same cases each time).
//! - `VMESH_FUZZ_INPUT`: a file to run instead (a saved failure).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmesh_fuzz::mutate::{case, Rng};
use vmesh_fuzz::{Target, TARGETS};

/// The longest one case may take (a debug build on a loaded 2-core machine; the release build
/// is about ten times faster).
const MAX_CASE: Duration = Duration::from_secs(3);
const DEFAULT_SEED: u64 = 0x766d_6573_6800_0001;

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number")),
        Err(_) => default,
    }
}

fn failure_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Runs `input` through `target`, failing (with the input saved) on a panic or a slow case.
fn one(target: &Target, input: &[u8], label: &str) -> (bool, Duration) {
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(|| (target.run)(input));
    let took = t0.elapsed();
    let problem = match &result {
        Err(_) => Some("panicked".to_string()),
        Ok(_) if took > MAX_CASE => Some(format!("took {took:?} (the bound is {MAX_CASE:?})")),
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        let path = failure_dir().join(format!("{}-{label}.bin", target.name));
        std::fs::write(&path, input).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        panic!(
            "fuzz target {} {problem} on {label}; the input ({} bytes) is in {}; run it again with \
             VMESH_FUZZ_INPUT={} cargo test -p vmesh-fuzz --test fuzz {}",
            target.name,
            input.len(),
            path.display(),
            path.display(),
            target.name
        );
    }
    (result.unwrap_or(false), took)
}

fn run(name: &str) {
    let target = TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"));
    if let Ok(path) = std::env::var("VMESH_FUZZ_INPUT") {
        let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (reached, took) = one(target, &input, "input");
        eprintln!("{name}: {path}: reached the code under test: {reached}; {took:?}");
        return;
    }
    let cases = env_number("VMESH_FUZZ_CASES", 2000);
    let seed = env_number("VMESH_FUZZ_SEED", DEFAULT_SEED);
    let seeds = (target.seeds)();
    for (i, s) in seeds.iter().enumerate() {
        let (reached, _) = one(target, s, &format!("seed-{i}"));
        assert!(
            reached,
            "{name}: seed {i} does not reach the code under test"
        );
    }
    // Each target its own sequence of cases for a seed.
    let mut rng = Rng::new(
        seed ^ name
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b)),
    );
    let (mut reached, mut slowest) = (0u64, Duration::ZERO);
    let t0 = Instant::now();
    for i in 0..cases {
        let input = case(&mut rng, &seeds);
        let (r, took) = one(target, &input, &format!("seed-{seed}-case-{i}"));
        reached += u64::from(r);
        slowest = slowest.max(took);
    }
    eprintln!(
        "{name}: {cases} cases (seed {seed}) in {:?}; {reached} reached the code under test; slowest {slowest:?}",
        t0.elapsed()
    );
    // The mutations must not all be rejected at the door.
    assert!(
        cases == 0 || reached * 20 >= cases,
        "{name}: only {reached} of {cases} cases got past decoding"
    );
}

#[test]
fn document() {
    run("document");
}

#[test]
fn kv_value() {
    run("kv_value");
}

#[test]
fn relay_message() {
    run("relay_message");
}

#[test]
fn xds_request() {
    run("xds_request");
}
