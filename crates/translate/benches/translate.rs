//! Translation time and allocated memory for 100, 1,000 and 10,000 upstreams.
//!
//! The config is what a real gateway looks like at that size: one Gateway on one
//! proxy, N Upstreams with 10 static endpoints each, and N/10 VirtualServices of
//! 10 routes each (one domain per service), so every upstream is used by exactly
//! one route and ends up on the proxy as a Cluster plus a ClusterLoadAssignment.
//! It is generated as YAML text, one file per object as in a config directory, and
//! loaded through `ConfigSet` the way the controller loads it; none of that is
//! timed.
//!
//! Run: `cargo bench -p vmesh-translate --bench translate`
//!
//! Before criterion runs, `main` measures memory once per size with the counting
//! global allocator `cap::Cap<System>` (the workspace forbids `unsafe_code`, so the
//! `unsafe impl GlobalAlloc` lives in that small dependency, not here):
//! - "allocated": bytes requested from the allocator during one `translate` call
//!   (the sum of all allocations, freed or not);
//! - "peak": the highest number of live heap bytes during that call minus the live
//!   bytes before it, i.e. the extra memory translation needs on top of the loaded
//!   config, including the `Translation` it returns.
//!   Cap only tracks the process-wide maximum, so the config is loaded one small
//!   file at a time (keeping the loading peak small) and the bench checks that the
//!   maximum rose during `translate`; otherwise it stops with an error;
//! - "first call": the wall time of that same call, the first translation of that size in the
//!   process (cold heap, as at controller start; includes the counting allocator's overhead).

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use cap::Cap;
use criterion::{BenchmarkId, Criterion, Throughput};
use vmesh_model::{Config, ConfigSet, SourceMode};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

const SIZES: [usize; 3] = [100, 1_000, 10_000];
const ENDPOINTS: usize = 10;
const ROUTES_PER_SERVICE: usize = 10;

/// One file per object, as `(file name, YAML text)`.
fn files(upstreams: usize) -> Vec<(String, String)> {
    let mut files = vec![(
        "gateway.yaml".to_string(),
        "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n  proxyNames: [gateway-proxy]\n"
            .to_string(),
    )];
    for u in 0..upstreams {
        let mut text = format!("kind: Upstream\nname: up-{u}\nspec:\n  static:\n    hosts:\n");
        for e in 0..ENDPOINTS {
            // 10.<u / 256>.<u % 256>.<e>: distinct per upstream, within 10/8 for u < 65536.
            text.push_str(&format!(
                "      - address: 10.{}.{}.{}\n        port: 8080\n",
                u / 256,
                u % 256,
                e + 1
            ));
        }
        files.push((format!("upstream-{u}.yaml"), text));
    }
    for s in 0..upstreams / ROUTES_PER_SERVICE {
        let mut text = format!(
            "kind: VirtualService\nname: svc-{s}\nspec:\n  domains: [\"svc-{s}.example.com\"]\n  routes:\n"
        );
        for r in 0..ROUTES_PER_SERVICE {
            let u = s * ROUTES_PER_SERVICE + r;
            text.push_str(&format!(
                "    - match: {{prefix: /r{r}/}}\n      upstream: up-{u}\n      options: {{timeout: 5s}}\n"
            ));
        }
        files.push((format!("vs-{s}.yaml"), text));
    }
    files
}

fn load(upstreams: usize) -> (ConfigSet, Config) {
    let mut set = ConfigSet::new();
    for (name, text) in files(upstreams) {
        set.upsert_source(&name, &text, SourceMode::MultiDoc);
    }
    let config = set.snapshot();
    assert_eq!(config.upstreams.len(), upstreams);
    assert_eq!(
        config.virtual_services.len(),
        upstreams / ROUTES_PER_SERVICE
    );
    (set, config)
}

/// Translates once and checks the output is what the config asks for.
fn check(config: &Config, upstreams: usize) {
    let t = vmesh_translate::translate(config);
    let bad: Vec<_> = t
        .reports
        .iter()
        .filter(|(_, r)| !r.errors.is_empty() || !r.warnings.is_empty())
        .take(3)
        .collect();
    assert!(bad.is_empty(), "the generated config has problems: {bad:?}");
    let proxy = t.proxies.get("gateway-proxy").expect("the gateway's proxy");
    let clusters = proxy
        .origins
        .keys()
        .filter(|(type_url, _)| type_url.ends_with(".Cluster"))
        .count();
    assert_eq!(clusters, upstreams, "one cluster per upstream");
}

struct Memory {
    /// Wall time of this call: the first translation of that size in the process, on heap
    /// pages mostly never touched before (as at controller start), with the counting allocator.
    first_call: Duration,
    allocated: usize,
    peak: usize,
    config: usize,
}

fn measure_memory(upstreams: usize) -> Memory {
    let live_at_start = ALLOCATOR.allocated();
    let (set, config) = load(upstreams);
    let before = ALLOCATOR.allocated();
    let max_before = ALLOCATOR.max_allocated();
    let total_before = ALLOCATOR.total_allocated();
    let t0 = Instant::now();
    let translation = vmesh_translate::translate(black_box(&config));
    let first_call = t0.elapsed();
    let max_after = ALLOCATOR.max_allocated();
    let total_after = ALLOCATOR.total_allocated();
    assert!(
        max_after > max_before,
        "the peak of translating {upstreams} upstreams is hidden by an earlier peak \
         ({max_after} <= {max_before} bytes); measure it in a fresh process"
    );
    drop(translation);
    drop((set, config));
    Memory {
        first_call,
        allocated: total_after - total_before,
        peak: max_after - before,
        config: before - live_at_start,
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_memory() {
    println!("translate memory (one translate call; counting global allocator)");
    println!(
        "{:>10} {:>16} {:>16} {:>22} {:>18}",
        "upstreams", "allocated MiB", "peak extra MiB", "loaded config MiB", "first call ms"
    );
    for &n in &SIZES {
        let m = measure_memory(n);
        println!(
            "{:>10} {:>16.2} {:>16.2} {:>22.2} {:>18.1}",
            n,
            mib(m.allocated),
            mib(m.peak),
            mib(m.config),
            m.first_call.as_secs_f64() * 1000.0
        );
    }
    println!();
}

/// Two groups per size: `translate` times the call alone (the returned `Translation` is dropped
/// outside the timed region); `translate+drop` also drops it, as the controller does when a
/// new translation replaces the previous one.
fn bench_translate(c: &mut Criterion) {
    let configs: Vec<(usize, Config)> = SIZES
        .iter()
        .map(|&n| {
            let (_set, config) = load(n);
            check(&config, n);
            (n, config)
        })
        .collect();
    for (group_name, with_drop) in [("translate", false), ("translate+drop", true)] {
        let mut group = c.benchmark_group(group_name);
        for (n, config) in &configs {
            let n = *n;
            if n >= 10_000 {
                group
                    .sample_size(10)
                    .measurement_time(Duration::from_secs(20));
            } else {
                group
                    .sample_size(20)
                    .measurement_time(Duration::from_secs(10));
            }
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::from_parameter(n), config, |b, config| {
                if with_drop {
                    b.iter(|| vmesh_translate::translate(black_box(config)))
                } else {
                    b.iter_with_large_drop(|| vmesh_translate::translate(black_box(config)))
                }
            });
        }
        group.finish();
    }
}

fn main() {
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let benching = std::env::args().any(|a| a == "--bench");
    if benching {
        print_memory();
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_translate(&mut criterion);
    criterion.final_summary();
}
