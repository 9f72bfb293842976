//! Consul KV → Envoy: propagation latency and controller cost under churn, with 1,000 objects.
//!
//! Run: `scripts/setup-envoy && cargo bench -p vmesh-controller --bench consul`
//! (`VMESH_BENCH_CHANGES=<n>` changes per latency series, default 200;
//! `VMESH_BENCH_CHURN_SECS=<s>` length of the churn phase, default 25;
//! `VMESH_BENCH_LOG=<filter>`, e.g. `info,vmesh_xds=debug`, sets the controller's log filter,
//! keeps its log and prints the wall-clock time of every PUT of the first series, to line the
//! two up).
//!
//! Everything runs on 127.0.0.1: the test kit's Consul emulator (in this process, on its own
//! thread), `vmesh-controller` (this package's release build) reading `vmesh/config/` from it,
//! and one real Envoy (delta ADS, the `vmeshctl` bootstrap). The config is 1,000 keys, one
//! document each: the Gateway `edge`, 499 Upstreams `up-NNN` (3 static hosts each), 499
//! VirtualServices `vs-NNN` (domain `vs-NNN.bench`: `/version` answered directly, everything
//! else to `up-NNN`) and the VirtualService `bench` (domain `bench.local`, one route, a direct
//! response whose body the bench changes).
//!
//! 1. **put → Envoy**: N changes of `bench`'s body (`v<i>`). t0 is taken before the HTTP
//!    `PUT /v1/kv/vmesh/config/VirtualService/bench` (kept-alive connection); the sample is the
//!    first `GET /` (Host `bench.local`) through Envoy answering `v<i>`, polled in a tight loop
//!    on one kept-alive connection without sleeping. The PUT's own time (call to return) is
//!    recorded separately. A second series polls only the controller's
//!    `/status/VirtualService/bench` until it shows a new `version` with `proxies.acked == 1`.
//!    Before each change the bench idles a pseudo-random 0–500 ms (fixed xorshift sequence,
//!    not measured), so changes do not fall in step with any timer (e.g. the status writer's).
//!    For scale it also times a `?recurse` read of the prefix, the controller's per-change work
//!    on the same values in this process (`ConfigSet::upsert_keyed` + `snapshot()`,
//!    `translate`, dropping the previous translation), and prints Envoy's `update_duration`
//!    histograms.
//! 2. **churn**: 100 PUTs per second for S seconds, round-robin over the 998 Upstream and
//!    VirtualService keys (an upstream's first endpoint port, a virtual service's `/version`
//!    body), every 100th of them (once a second) to `bench`'s body instead, which a probe
//!    thread waits for through Envoy (1 ms between polls) — the lag under load. The last PUT
//!    is to `bench`; put → served is measured for it with a tight loop. Over the window (first
//!    PUT → last change served) it reads the controller's CPU (utime + stime from
//!    `/proc/<pid>/stat`), RSS (`VmRSS`, `VmHWM` from `/proc/<pid>/status`), and from its
//!    `/metrics` the translations (`vmesh_translations_total`) against the number of changes.
//!
//! Fails (never skips) when Envoy is missing, naming the script that installs it. Every wait
//! is bounded.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmesh_model::{ConfigSet, Kind, ObjectKey};
use vmesh_testkit::consul::ConsulEmulator;
use vmesh_testkit::process::{cpu_ticks, status_kib, ControllerOptions, ControllerProcess};
use vmesh_testkit::{envoy_binary, free_port, Envoy, HttpClient};
use vmesh_translate::translate;
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

mod support;
use support::{fail, ms, print_rows, wait_for_body, Gaps, Row};

const PROXY: &str = "gateway-proxy";
const PREFIX: &str = "vmesh/config/";
/// Upstreams and (non-bench) virtual services; with the gateway and `bench`, 1,000 keys.
const PAIRS: usize = 499;
const BENCH_HOST: &str = "bench.local";
const STARTUP: Duration = Duration::from_secs(60);
/// The longest one change may take to show before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const CHURN_RATE: u32 = 100;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench binaries without `--bench`: this one needs minutes
        // and a real Envoy, so it only runs under `cargo bench`.
        println!("consul: run with `cargo bench -p vmesh-controller --bench consul`");
        return;
    }
    let envoy_path = envoy_binary().unwrap_or_else(|e| fail(&e));
    let changes = support::env_count("VMESH_BENCH_CHANGES", 200);
    let churn_secs = support::env_count("VMESH_BENCH_CHURN_SECS", 25);
    eprintln!(
        "consul: {changes} changes per latency series, {churn_secs} s of churn at {CHURN_RATE}/s; envoy {}",
        envoy_path.display()
    );

    let consul = ConsulEmulator::start();
    let listener_port = free_port();
    let started = Instant::now();
    consul.kv_put(&key("Gateway", "edge"), gateway(listener_port));
    for i in 0..PAIRS {
        consul.kv_put(&key("Upstream", &upstream_name(i)), upstream(i, 0));
        consul.kv_put(&key("VirtualService", &vs_name(i)), virtual_service(i, 0));
    }
    consul.kv_put(&key("VirtualService", "bench"), bench_vs("v0"));
    let objects = consul.kv_list(PREFIX).len();
    assert_eq!(objects, 1000, "objects under {PREFIX}");
    let in_process = in_process_costs(&consul);

    let controller = Controller::start(&consul.url());
    let envoy = controller.envoy();
    let b = Bench {
        consul: &consul,
        controller: &controller,
        envoy: &envoy,
        url: format!("http://127.0.0.1:{listener_port}/"),
        kv: HttpClient::with_timeout(Duration::from_secs(5), true),
    };
    b.put_bench("warm-up");
    wait_for_body(
        &HttpClient::new(),
        &b.url,
        &[("host", BENCH_HOST)],
        "warm-up",
        Instant::now(),
        STARTUP,
    );
    // Every key of the Envoy config works (one upstream-backed and one direct virtual host).
    let probe = HttpClient::new();
    let last = vs_name(PAIRS - 1);
    wait_for_body(
        &probe,
        &format!("{}version", b.url),
        &[("host", &format!("{last}.bench"))],
        &format!("{last} r0"),
        Instant::now(),
        STARTUP,
    );
    b.settle();
    eprintln!(
        "consul: {objects} objects served and status written {:.1} s after the first put",
        started.elapsed().as_secs_f64()
    );
    let rss_ready = controller.memory();
    let recurse = b.recurse_read_times(50);

    let m0 = controller.metrics();
    let (put, http) = b.latency_series(changes, 1);
    let m1 = controller.metrics();
    let envoy_updates = envoy_update_durations(&envoy);
    let ack = b.ack_series(changes, 100_001);
    let churn = b.churn(churn_secs);

    println!();
    println!("Consul KV → Envoy, {objects} objects, {changes} changes per series (ms)");
    print_rows(&[
        Row::new("emulator PUT (call → return)", put),
        Row::new("put → HTTP through Envoy", http),
        Row::new("put → ACK in /status", ack),
        Row::new("GET ?recurse of the prefix (bench)", recurse),
    ]);
    println!(
        "the same config in this process, {} rounds (ms):",
        IN_PROCESS_ROUNDS
    );
    print_rows(&in_process);
    let translations = m1.get("vmesh_translations_total") - m0.get("vmesh_translations_total");
    println!(
        "latency series: {translations:.0} translations for {changes} changes, mean translation {:.2} ms",
        mean_ms(&m0, &m1)
    );
    println!(
        "controller RSS when ready: {:.1} MiB (peak so far {:.1} MiB)",
        rss_ready.0, rss_ready.1
    );
    println!("Envoy's own time to apply updates (its `update_duration` histograms, ms, after the first series):");
    for line in envoy_updates {
        println!("  {line}");
    }
    churn.print();
    drop(envoy);
}

// ---------------------------------------------------------------------------------------------
// The config

fn key(kind: &str, name: &str) -> String {
    format!("{PREFIX}{kind}/{name}")
}

fn upstream_name(i: usize) -> String {
    format!("up-{i:03}")
}

fn vs_name(i: usize) -> String {
    format!("vs-{i:03}")
}

fn gateway(port: u16) -> String {
    format!(
        "kind: Gateway\nname: edge\nspec:\n  bindAddress: 127.0.0.1\n  bindPort: {port}\n  proxyNames: [{PROXY}]\n"
    )
}

/// Three hosts in 10.x (never connected to: nothing routes traffic there); `rev` moves the
/// first host's port.
fn upstream(i: usize, rev: usize) -> String {
    let (a, b) = (i / 250, i % 250 + 1);
    format!(
        "kind: Upstream\nname: {}\nspec:\n  static:\n    hosts:\n      - {{address: 10.1.{a}.{b}, port: {}}}\n      - {{address: 10.2.{a}.{b}, port: 8080}}\n      - {{address: 10.3.{a}.{b}, port: 8080}}\n",
        upstream_name(i),
        9000 + rev % 50_000
    )
}

fn virtual_service(i: usize, rev: usize) -> String {
    let name = vs_name(i);
    format!(
        "kind: VirtualService\nname: {name}\nspec:\n  domains: [\"{name}.bench\"]\n  routes:\n    - match: {{exact: /version}}\n      directResponse: {{status: 200, body: \"{name} r{rev}\"}}\n    - upstream: {}\n",
        upstream_name(i)
    )
}

fn bench_vs(body: &str) -> String {
    format!(
        "kind: VirtualService\nname: bench\nspec:\n  domains: [\"{BENCH_HOST}\"]\n  routes:\n    - directResponse: {{status: 200, body: \"{body}\"}}\n"
    )
}

/// What the controller does per change, timed in this process on the same 1,000 values (read
/// from the emulator): `ConfigSet::upsert_keyed` of a changed `bench` value and `snapshot()`,
/// then `vmesh_translate::translate`, then dropping the previous translation.
fn in_process_costs(consul: &ConsulEmulator) -> Vec<Row> {
    let mut set = ConfigSet::new();
    for entry in consul.kv_list(PREFIX) {
        let rest = entry.key.strip_prefix(PREFIX).unwrap_or(&entry.key);
        let (kind, name) = rest.split_once('/').unwrap_or(("", ""));
        let kind = Kind::parse(kind).unwrap_or_else(|| fail(&format!("key {}", entry.key)));
        let text = String::from_utf8_lossy(&entry.value);
        set.upsert_keyed(&entry.key, &ObjectKey::new(kind, name), &text);
    }
    let source = key("VirtualService", "bench");
    let bench = ObjectKey::virtual_service("bench");
    let mut previous = translate(&set.snapshot());
    let (mut apply, mut tr, mut drops) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..IN_PROCESS_ROUNDS {
        let t0 = Instant::now();
        set.upsert_keyed(&source, &bench, &bench_vs(&format!("p{i}")));
        let config = set.snapshot();
        apply.push(t0.elapsed());
        let t0 = Instant::now();
        let translation = translate(&config);
        tr.push(t0.elapsed());
        assert_eq!(translation.proxies.len(), 1, "one proxy");
        let t0 = Instant::now();
        drop(std::mem::replace(&mut previous, translation));
        drops.push(t0.elapsed());
    }
    vec![
        Row::new("upsert_keyed + snapshot()", apply),
        Row::new("translate()", tr),
        Row::new("drop the previous Translation", drops),
    ]
}

const IN_PROCESS_ROUNDS: usize = 30;

// ---------------------------------------------------------------------------------------------
// Waiting

// ---------------------------------------------------------------------------------------------
// The controller

/// The release controller reading the emulator (the test kit's launcher).
struct Controller {
    process: ControllerProcess,
}

impl Controller {
    fn start(consul_url: &str) -> Controller {
        let opts = ControllerOptions::new(env!("CARGO_BIN_EXE_vmesh-controller"))
            .name("bench-consul")
            .log(&log_filter().unwrap_or_else(|| "info".into()))
            .keep(log_filter().is_some())
            .args(["--consul-addr", consul_url, "--id", "bench"]);
        let mut process = ControllerProcess::start(opts);
        process.wait_ready(STARTUP);
        Controller { process }
    }

    fn admin(&self, path: &str) -> String {
        self.process.admin(path)
    }

    fn envoy(&self) -> Envoy {
        let bootstrap = render(&BootstrapArgs {
            protocol: Protocol::Delta,
            admin_port: 0,
            ..BootstrapArgs::new(PROXY.to_string(), self.process.xds_addr())
        })
        .unwrap_or_else(|e| fail(&format!("render the bootstrap: {e}")));
        let envoy = Envoy::start(&bootstrap, PROXY);
        envoy.wait_ready(STARTUP);
        if log_filter().is_some() {
            // Envoy's xDS client logs when a response arrived and when it was applied.
            let _ = envoy.admin_post("/logging?config=debug");
            eprintln!("consul: envoy log {}", envoy.log_path().display());
        }
        envoy
    }

    /// `/metrics`, every sample summed over its labels, by metric name.
    fn metrics(&self) -> Metrics {
        Metrics(
            self.process
                .metrics()
                .unwrap_or_else(|e| fail(&format!("controller /metrics: {e}"))),
        )
    }

    /// CPU time (user + system) used so far, in seconds.
    fn cpu(&self) -> f64 {
        cpu_seconds(self.process.pid())
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        let pid = self.process.pid();
        let mib = |field: &str| status_kib(pid, field) as f64 / 1024.0;
        (mib("VmRSS"), mib("VmHWM"))
    }
}

/// Envoy's `*.update_duration` histograms (time to apply an xDS update) that saw updates, as
/// its admin `/stats` prints them (percentiles, cumulative over Envoy's life).
fn envoy_update_durations(envoy: &Envoy) -> Vec<String> {
    let text = envoy
        .admin_get("/stats?filter=update_duration&histogram_buckets=none")
        .map(|r| r.body)
        .unwrap_or_else(|e| format!("(admin /stats: {e})"));
    text.lines()
        .filter(|l| !l.contains("No recorded values") && !l.contains("P100(nan,0)"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// `VMESH_BENCH_LOG`, when set.
fn log_filter() -> Option<String> {
    std::env::var("VMESH_BENCH_LOG")
        .ok()
        .filter(|f| !f.is_empty())
}

struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}

/// Mean translation time between two `/metrics` readings, in ms.
fn mean_ms(before: &Metrics, after: &Metrics) -> f64 {
    let n = after.get("vmesh_translation_duration_seconds_count")
        - before.get("vmesh_translation_duration_seconds_count");
    let s = after.get("vmesh_translation_duration_seconds_sum")
        - before.get("vmesh_translation_duration_seconds_sum");
    if n > 0.0 {
        s / n * 1000.0
    } else {
        f64::NAN
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid) as f64 / clock_ticks()
}

// ---------------------------------------------------------------------------------------------
// The measurements

struct Bench<'a> {
    consul: &'a ConsulEmulator,
    controller: &'a Controller,
    envoy: &'a Envoy,
    /// `http://127.0.0.1:<listener>/`
    url: String,
    /// Writes to the emulator over HTTP, on a kept-alive connection (as a Consul client would).
    kv: HttpClient,
}

impl Bench<'_> {
    /// `PUT /v1/kv/<key>` over HTTP; returns when the emulator answered `true`.
    fn put(&self, key: &str, value: &str) {
        let url = format!("{}/v1/kv/{key}", self.consul.url());
        match self.kv.request("PUT", &url, &[], Some(value.as_bytes())) {
            Ok(r) if r.status == 200 && r.body.trim() == "true" => {}
            Ok(r) => fail(&format!("PUT {key}: status {} body {:?}", r.status, r.body)),
            Err(e) => fail(&format!("PUT {key}: {e}")),
        }
    }

    fn put_bench(&self, body: &str) {
        self.put(&key("VirtualService", "bench"), &bench_vs(body));
    }

    /// Waits until the controller has written every object's status and Consul has been quiet
    /// (no write) for a second: the leader's first status round writes 1,000 keys.
    fn settle(&self) {
        let start = Instant::now();
        let mut last = (self.consul.index(), Instant::now());
        loop {
            let written = self.consul.kv_list("vmesh/status/").len();
            let index = self.consul.index();
            if index != last.0 {
                last = (index, Instant::now());
            } else if written >= 1000 && last.1.elapsed() > Duration::from_secs(1) {
                return;
            }
            if start.elapsed() > STARTUP {
                fail(&format!(
                    "the controller did not settle within {STARTUP:?} ({written} status keys)"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What one read of the whole config prefix costs a client (the controller makes one per
    /// change): `GET /v1/kv/vmesh/config/?recurse`, kept-alive connection.
    fn recurse_read_times(&self, n: usize) -> Vec<Duration> {
        let url = format!("{}/v1/kv/{PREFIX}?recurse", self.consul.url());
        (0..n)
            .map(|_| {
                let t0 = Instant::now();
                match self.kv.get(&url, &[]) {
                    Ok(r) if r.status == 200 => t0.elapsed(),
                    Ok(r) => fail(&format!("GET {url}: status {}", r.status)),
                    Err(e) => fail(&format!("GET {url}: {e}")),
                }
            })
            .collect()
    }

    /// Series 1: put → the first HTTP response showing it; the PUT's own time separately.
    fn latency_series(&self, changes: usize, first: usize) -> (Vec<Duration>, Vec<Duration>) {
        let client = HttpClient::with_timeout(Duration::from_secs(5), true);
        let mut gaps = Gaps::new(Duration::from_millis(500));
        let (mut put, mut http) = (Vec::new(), Vec::new());
        for i in first..first + changes {
            gaps.pause();
            let body = format!("v{i}");
            let t0 = Instant::now();
            self.put_bench(&body);
            put.push(t0.elapsed());
            let t1 = wait_for_body(
                &client,
                &self.url,
                &[("host", BENCH_HOST)],
                &body,
                t0,
                CHANGE_TIMEOUT,
            );
            http.push(t1 - t0);
            if log_filter().is_some() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let at = now.saturating_sub(t1.elapsed() + (t1 - t0));
                eprintln!(
                    "consul: put {body} at {}.{:06} (unix), put {} ms, served after {} ms",
                    at.as_secs(),
                    at.subsec_micros(),
                    ms(put[put.len() - 1]),
                    ms(t1 - t0)
                );
            }
        }
        (put, http)
    }

    /// Series 2: put → the controller's `/status/VirtualService/bench` shows a new version,
    /// Accepted, acknowledged by the one proxy.
    fn ack_series(&self, changes: usize, first: usize) -> Vec<Duration> {
        let client = HttpClient::with_timeout(Duration::from_secs(5), true);
        let status_url = self.controller.admin("/status/VirtualService/bench");
        let acked_version = || -> Option<String> {
            let s = client.get(&status_url, &[]).ok()?.json().ok()?;
            (s["state"] == "Accepted" && s["proxies"]["acked"] == 1 && s["proxies"]["total"] == 1)
                .then(|| s["version"].as_str().map(str::to_string))
                .flatten()
        };
        let start = Instant::now();
        let mut previous = loop {
            if let Some(v) = acked_version() {
                break v;
            }
            if start.elapsed() > STARTUP {
                fail("the controller never reported VirtualService/bench acknowledged");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut gaps = Gaps::new(Duration::from_millis(500));
        let mut samples = Vec::with_capacity(changes);
        for i in first..first + changes {
            gaps.pause();
            let t0 = Instant::now();
            self.put_bench(&format!("v{i}"));
            loop {
                if let Some(v) = acked_version().filter(|v| *v != previous) {
                    samples.push(t0.elapsed());
                    previous = v;
                    break;
                }
                if t0.elapsed() > CHANGE_TIMEOUT {
                    fail(&format!(
                        "change {i} was not acknowledged within {CHANGE_TIMEOUT:?}"
                    ));
                }
            }
        }
        // The traffic agrees with the status.
        wait_for_body(
            &client,
            &self.url,
            &[("host", BENCH_HOST)],
            &format!("v{}", first + changes - 1),
            Instant::now(),
            CHANGE_TIMEOUT,
        );
        samples
    }

    /// Phase 2: `CHURN_RATE` puts per second for `secs` seconds.
    fn churn(&self, secs: usize) -> Churn {
        // Idle baseline first: what the controller uses with nothing changing.
        let idle_wall = Duration::from_secs(5);
        let cpu0 = self.controller.cpu();
        std::thread::sleep(idle_wall);
        let idle_cpu = self.controller.cpu() - cpu0;

        let total = secs * CHURN_RATE as usize;
        let period = Duration::from_secs(1) / CHURN_RATE;
        let (probe_tx, probe_rx) = mpsc::channel::<(String, Instant)>();
        let url = self.url.clone();
        let prober = std::thread::spawn(move || probe(&url, probe_rx));

        let m0 = self.controller.metrics();
        let requests0 = self.consul.requests();
        let mem0 = self.controller.memory();
        let (cpu_c0, cpu_e0, cpu_b0) = (
            self.controller.cpu(),
            cpu_seconds(self.envoy.pid()),
            cpu_seconds(std::process::id()),
        );
        let start = Instant::now();
        let mut behind = Duration::ZERO;
        let mut last_vs = None;
        let mut cursor = 0usize;
        let mut final_t0 = start;
        for k in 0..total {
            let due = start + period * k as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                behind = behind.max(now - due);
            }
            let last = k + 1 == total;
            if last || k % CHURN_RATE as usize == CHURN_RATE as usize - 1 {
                let body = format!("c{k}");
                let t0 = Instant::now();
                self.put_bench(&body);
                if last {
                    final_t0 = t0;
                } else {
                    let _ = probe_tx.send((body, t0));
                }
                continue;
            }
            // Round-robin over up-000, vs-000, up-001, vs-001, ...
            let (j, rev) = (cursor % (2 * PAIRS), cursor / (2 * PAIRS) + 1);
            let i = j / 2;
            cursor += 1;
            if j % 2 == 0 {
                self.put(&key("Upstream", &upstream_name(i)), &upstream(i, rev));
            } else {
                self.put(
                    &key("VirtualService", &vs_name(i)),
                    &virtual_service(i, rev),
                );
                last_vs = Some((i, rev));
            }
        }
        let puts_done = start.elapsed();
        drop(probe_tx);
        let client = HttpClient::with_timeout(Duration::from_secs(5), true);
        let served = wait_for_body(
            &client,
            &self.url,
            &[("host", BENCH_HOST)],
            &format!("c{}", total - 1),
            final_t0,
            CHANGE_TIMEOUT,
        );
        let wall = served - start;
        let (cpu_c1, cpu_e1, cpu_b1) = (
            self.controller.cpu(),
            cpu_seconds(self.envoy.pid()),
            cpu_seconds(std::process::id()),
        );
        let final_lag = served - final_t0;
        let requests = self.consul.requests() - requests0;
        // Let coalesced work finish before reading the counters.
        std::thread::sleep(Duration::from_secs(1));
        let m1 = self.controller.metrics();
        let mem1 = self.controller.memory();
        let lags = prober
            .join()
            .unwrap_or_else(|_| fail("the probe thread panicked"));
        // The last virtual service change (not bench) is served too.
        if let Some((i, rev)) = last_vs {
            let name = vs_name(i);
            wait_for_body(
                &client,
                &format!("{}version", self.url),
                &[("host", &format!("{name}.bench"))],
                &format!("{name} r{rev}"),
                Instant::now(),
                CHANGE_TIMEOUT,
            );
        }
        Churn {
            changes: total,
            puts_done,
            behind,
            wall,
            final_lag,
            lags,
            idle_cpu: idle_cpu / idle_wall.as_secs_f64(),
            controller_cpu: (cpu_c1 - cpu_c0) / wall.as_secs_f64(),
            envoy_cpu: (cpu_e1 - cpu_e0) / wall.as_secs_f64(),
            bench_cpu: (cpu_b1 - cpu_b0) / wall.as_secs_f64(),
            translations: m1.get("vmesh_translations_total") - m0.get("vmesh_translations_total"),
            translation_ms: mean_ms(&m0, &m1),
            pushes: m1.get("vmesh_xds_pushes_total") - m0.get("vmesh_xds_pushes_total"),
            requests,
            mem0,
            mem1,
        }
    }
}

/// Waits for each `(body, t0)` through Envoy (1 ms between polls, so the probe takes little CPU
/// from the run); a body superseded by the next probe before it showed counts as missed.
fn probe(url: &str, rx: mpsc::Receiver<(String, Instant)>) -> Probes {
    let client = HttpClient::with_timeout(Duration::from_secs(5), true);
    let mut out = Probes::default();
    let mut pending = rx.recv().ok();
    while let Some((want, t0)) = pending.take() {
        loop {
            if let Ok(next) = rx.try_recv() {
                out.missed += 1;
                pending = Some(next);
                break;
            }
            if client
                .get(url, &[("host", BENCH_HOST)])
                .is_ok_and(|r| r.status == 200 && r.body == want)
            {
                out.lags.push(t0.elapsed());
                pending = rx.recv().ok();
                break;
            }
            if t0.elapsed() > CHANGE_TIMEOUT {
                fail(&format!(
                    "churn: {want:?} not served within {CHANGE_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    out
}

#[derive(Default)]
struct Probes {
    lags: Vec<Duration>,
    missed: usize,
}

struct Churn {
    changes: usize,
    puts_done: Duration,
    behind: Duration,
    wall: Duration,
    final_lag: Duration,
    lags: Probes,
    idle_cpu: f64,
    controller_cpu: f64,
    envoy_cpu: f64,
    bench_cpu: f64,
    translations: f64,
    translation_ms: f64,
    pushes: f64,
    requests: u64,
    mem0: (f64, f64),
    mem1: (f64, f64),
}

impl Churn {
    fn print(&self) {
        let Churn {
            changes,
            puts_done,
            wall,
            ..
        } = *self;
        println!();
        println!(
            "churn: {changes} puts in {:.2} s ({:.1}/s; at most {:.1} ms behind schedule), last change served {:.2} s after the first put",
            puts_done.as_secs_f64(),
            changes as f64 / puts_done.as_secs_f64(),
            ms(self.behind),
            wall.as_secs_f64()
        );
        println!(
            "  last put → served: {} ms; bench changes during the churn seen through Envoy (1 ms polls): {} seen, {} superseded before they showed",
            ms(self.final_lag),
            self.lags.lags.len(),
            self.lags.missed
        );
        if !self.lags.lags.is_empty() {
            print_rows(&[Row::new(
                "put → HTTP during churn (1 ms polls)",
                self.lags.lags.clone(),
            )]);
        }
        println!(
            "  controller CPU: {:.1} % of one core during the churn, {:.1} % idle (5 s before); envoy {:.1} %; bench process (emulator + client) {:.1} %",
            self.controller_cpu * 100.0,
            self.idle_cpu * 100.0,
            self.envoy_cpu * 100.0,
            self.bench_cpu * 100.0
        );
        println!(
            "  translations: {:.0} for {changes} changes ({:.1} changes per translation), mean {:.2} ms; xDS pushes {:.0}; HTTP requests to the emulator {} (the bench's puts: {changes})",
            self.translations,
            changes as f64 / self.translations.max(1.0),
            self.translation_ms,
            self.pushes,
            self.requests
        );
        println!(
            "  controller RSS: {:.1} MiB before, {:.1} MiB after; peak {:.1} MiB",
            self.mem0.0, self.mem1.0, self.mem1.1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Report
