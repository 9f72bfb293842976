//! Secrets from Vault, measured through a real Envoy:
//!
//! 1. **Rotation**: a certificate replaced in Vault KV v2 → Envoy serving it (the time from the
//!    write to the first TLS handshake that presents it), at the default poll interval (10 s)
//!    and, in the same run, at 1 s; each write comes a random time (uniform over one interval)
//!    after the last one was served; HTTPS requests go every 10 ms throughout, and the ones that
//!    fail are counted.
//! 2. **Vault load**: requests per second the controller sends Vault with 1,000 secrets referred
//!    to (1,000 Upstreams with `tls.ca`), at the default interval.
//!
//! `cargo bench -p vmesh-controller --bench secrets` (release controller, the test kit's Vault
//! emulator in this process, Envoy from `scripts/setup-envoy`). `VMESH_BENCH_ROTATIONS` sets
//! the rotations per series (default 50); `VMESH_BENCH_SECRETS` the secrets of part 2 (1,000).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmesh_testkit::process::{scratch_dir, ControllerOptions, ControllerProcess};
use vmesh_testkit::tls::{https_get, TestCa};
use vmesh_testkit::vault::VaultEmulator;
use vmesh_testkit::{free_port, request, EchoServer, Envoy};
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

mod support;
use support::{env_count, fail, print_rows, Gaps, Row};

const ROOT: &str = "bench-root";
const PROXY: &str = "bench-proxy";
const NAME: &str = "shop.example.com";

fn put(vault: &VaultEmulator, name: &str, data: serde_json::Value) {
    let body = json!({ "data": data }).to_string();
    let r = request(
        "POST",
        &format!("{}/v1/secret/data/{name}", vault.url()),
        &[("x-vault-token", ROOT)],
        Some(body.as_bytes()),
    )
    .unwrap_or_else(|e| fail(&e));
    if r.status >= 300 {
        fail(&format!("vault put {name}: {r:?}"));
    }
}

fn controller(
    name: &str,
    dir: &std::path::Path,
    vault: &VaultEmulator,
    interval: Option<&str>,
) -> ControllerProcess {
    let mut opts = ControllerOptions::new(env!("CARGO_BIN_EXE_vmesh-controller"))
        .name(name)
        .log("warn")
        .args(["--config-dir", &dir.display().to_string()])
        .args(["--vault-addr", &vault.url(), "--vault-token", ROOT]);
    if let Some(i) = interval {
        opts = opts.args(["--vault-poll-interval", i]);
    }
    let mut c = ControllerProcess::start(opts);
    c.wait_ready(Duration::from_secs(60));
    c
}

/// HTTPS requests every 10 ms until stopped: (succeeded, failed).
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Traffic {
    fn start(port: u16, ca: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match https_get(port, NAME, "/", &ca) {
                    Ok(r) if r.status == 200 => o.fetch_add(1, Ordering::Relaxed),
                    _ => f.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Traffic {
            stop,
            ok,
            failed,
            thread,
        }
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// `rotations` certificate rotations at `interval` (None: the default); the time from each
/// write to Envoy presenting the new certificate, and the requests that failed meanwhile.
fn rotations(
    label: &'static str,
    interval: Option<&str>,
    period: Duration,
    rotations: usize,
    vault: &VaultEmulator,
    ca: &TestCa,
) -> (Row, u64, u64) {
    let web = EchoServer::start("web");
    let port = free_port();
    let dir = scratch_dir("bench-secrets");
    std::fs::write(
        dir.join("config.yaml"),
        format!(
            "kind: Upstream\nname: web\nspec:\n  static:\n    hosts: [{{address: 127.0.0.1, port: {}}}]\n---\nkind: VirtualService\nname: shop\nspec:\n  domains: [{NAME}]\n  routes: [{{upstream: web}}]\n---\nkind: Gateway\nname: https\nspec:\n  bindPort: {port}\n  proxyNames: [{PROXY}]\n  tls:\n    certificates: [{{secret: bench/shop}}]\n",
            web.port()
        ),
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    let first = ca.issue(&[NAME], 30);
    put(
        vault,
        "bench/shop",
        json!({"cert": first.cert_pem, "key": first.key_pem}),
    );
    let c = controller(label, &dir, vault, interval);
    let bootstrap = render(&BootstrapArgs {
        protocol: Protocol::Delta,
        admin_port: 0,
        ..BootstrapArgs::new(PROXY.to_string(), c.xds_addr())
    })
    .unwrap_or_else(|e| fail(&e.to_string()));
    let envoy = Envoy::start(&bootstrap, PROXY);
    envoy.wait_ready(Duration::from_secs(60));
    let t0 = Instant::now();
    while https_get(port, NAME, "/", ca.pem()).map(|r| r.peer) != Ok(first.der.clone()) {
        if t0.elapsed() > Duration::from_secs(60) {
            fail("the first certificate was never served");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let traffic = Traffic::start(port, ca.pem().to_string());
    // Writes land at random points of the poll period, as an operator's would.
    let mut gaps = Gaps::new(period);
    let mut samples = Vec::new();
    for i in 0..rotations {
        gaps.pause();
        let next = ca.issue(&[NAME], 30);
        let written = Instant::now();
        put(
            vault,
            "bench/shop",
            json!({"cert": next.cert_pem, "key": next.key_pem}),
        );
        loop {
            if let Ok(r) = https_get(port, NAME, "/", ca.pem()) {
                if r.peer == next.der {
                    break;
                }
            }
            if written.elapsed() > Duration::from_secs(60) {
                fail(&format!("rotation {i} was not served within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        samples.push(written.elapsed());
        eprintln!(
            "{label}: rotation {}/{rotations}: {:?}",
            i + 1,
            written.elapsed()
        );
    }
    let (ok, failed) = traffic.stop();
    drop(envoy);
    drop(c);
    (Row::new(label, samples), ok, failed)
}

/// Vault requests per second with `n` secrets referred to, at the default interval.
fn load(n: usize, vault: &VaultEmulator, ca: &TestCa) -> (f64, f64) {
    let dir = scratch_dir("bench-secrets-load");
    let mut docs = String::new();
    for i in 0..n {
        put(vault, &format!("bench/ca/{i}"), json!({"ca": ca.pem()}));
        docs.push_str(&format!(
            "kind: Upstream\nname: u{i}\nspec:\n  static:\n    hosts: [{{address: 127.0.0.1, port: 9}}]\n  tls:\n    ca: bench/ca/{i}\n---\n"
        ));
    }
    std::fs::write(dir.join("upstreams.yaml"), docs).unwrap_or_else(|e| fail(&e.to_string()));
    let before_start = vault.requests();
    let c = controller("bench-load", &dir, vault, None);
    let started = vault.requests() - before_start;
    // Past the first reads and the first spread-out polls: one interval.
    std::thread::sleep(Duration::from_secs(12));
    let window = Duration::from_secs(30);
    let before = vault.requests();
    std::thread::sleep(window);
    let rate = (vault.requests() - before) as f64 / window.as_secs_f64();
    drop(c);
    (started as f64, rate)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("secrets: run with `cargo bench -p vmesh-controller --bench secrets`");
        return;
    }
    let n = env_count("VMESH_BENCH_ROTATIONS", 50);
    let secrets = env_count("VMESH_BENCH_SECRETS", 1000);
    let vault = VaultEmulator::start_with_root_token(ROOT);
    let ca = TestCa::new("bench CA");
    let (default, ok_d, failed_d) = rotations(
        "rotation → served, poll 10s (default)",
        None,
        Duration::from_secs(10),
        n,
        &vault,
        &ca,
    );
    let (fast, ok_f, failed_f) = rotations(
        "rotation → served, poll 1s",
        Some("1s"),
        Duration::from_secs(1),
        n,
        &vault,
        &ca,
    );
    let (startup, rate) = load(secrets, &vault, &ca);
    println!();
    print_rows(&[default, fast]);
    println!();
    println!(
        "requests during the rotations (HTTPS every 10 ms): default interval {ok_d} ok, {failed_d} failed; 1s interval {ok_f} ok, {failed_f} failed"
    );
    println!(
        "{secrets} secrets at the default interval: {startup:.0} Vault requests to start, then {rate:.1} requests/s (over 30 s)"
    );
}
