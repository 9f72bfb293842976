//! What a refused registration costs the controller, for each way the relay refuses one, next
//! to registrations that succeed (same run, same controller): controller CPU per call, calls per
//! second, and Consul KV reads per call (blocking watch reads left out).
//!
//! `cargo bench -p vmesh-controller --bench refusals` (release controller, the test kit's Consul
//! emulator). `VMESH_BENCH_CALLS` sets the calls per kind (default 2,000);
//! `VMESH_BENCH_CONTROLLER` runs another `vmesh-controller` binary (an older build, to compare).
//!
//! Calls go 16 at a time on one connection per source address, 16 addresses at once: each
//! address stays within the default burst of 20 registrations, except for the rate-limited
//! kind, which sends every call from one address (garbage CSRs: the few its rate lets through
//! are refused at once). The calls of the other kinds come from many addresses, so their cost
//! includes one TLS handshake per 16 calls.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use tonic::Code;
use vmesh_proto::v1::registration_client::RegistrationClient;
use vmesh_proto::v1::RegisterRequest;
use vmesh_testkit::consul::ConsulEmulator;
use vmesh_testkit::free_port;
use vmesh_testkit::process::{cpu_ticks, ControllerOptions, ControllerProcess};
use vmesh_testkit::relay::registration_channel;

mod support;
use support::{env_count, fail};

/// Linux's `CLK_TCK`.
const TICKS_PER_SECOND: f64 = 100.0;
/// Calls at once on one connection (the controller's default stream limit is 16).
const PER_CONNECTION: usize = 16;
/// Connections at once.
const CONNECTIONS: usize = 16;

struct Kind {
    name: &'static str,
    /// What the relay answers.
    expect: Option<Code>,
    /// The token to send.
    token: String,
    /// A real CSR, or garbage.
    real_csr: bool,
    /// Every call from one address (the rate limit), or 16 per address.
    one_address: bool,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("refusals: run with `cargo bench -p vmesh-controller --bench refusals`");
        return;
    }
    let calls = env_count("VMESH_BENCH_CALLS", 2000);
    let consul = ConsulEmulator::start();
    let relay_port = free_port();
    let data = std::env::temp_dir().join(format!("vmesh-bench-refusals-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut controller = ControllerProcess::start(
        ControllerOptions::new(
            std::env::var("VMESH_BENCH_CONTROLLER")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vmesh-controller").to_owned()),
        )
        .name("bench-refusals")
        .log("warn")
        .args([
            "--consul-addr",
            &consul.url(),
            "--relay-addr",
            &format!("127.0.0.1:{relay_port}"),
            "--data-dir",
            &data.display().to_string(),
        ]),
    );
    let relay_addr = format!("127.0.0.1:{relay_port}");
    let ca_file: PathBuf = data.join("ca").join("ca.pem");
    let t0 = Instant::now();
    while !(ca_file.exists() && std::net::TcpStream::connect(&relay_addr).is_ok()) {
        if t0.elapsed() > Duration::from_secs(60) || controller.try_exit().is_some() {
            fail(&format!(
                "the relay did not start; log {}",
                controller.log_path().display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ca_pem = std::fs::read_to_string(&ca_file).unwrap_or_else(|e| fail(&e.to_string()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let registry = rt.block_on(async {
        let config = vmesh_consul::ConsulConfig::from_env(vmesh_consul::ConsulEnv {
            http_addr: Some(consul.url()),
            ..Default::default()
        })
        .unwrap_or_else(|e| fail(&e.to_string()));
        vmesh_registry::Registry::new(
            vmesh_consul::Client::new(&config).unwrap_or_else(|e| fail(&e.to_string())),
            "vmesh",
        )
    });
    let token = |node: Option<&str>| {
        rt.block_on(registry.create_token(None, None, node.map(str::to_owned), SystemTime::now()))
            .unwrap_or_else(|e| fail(&format!("create a token: {e}")))
            .1
            .expose()
            .to_owned()
    };
    let valid = token(None);
    let bound = token(Some("somewhere-else"));
    // The watched copy of the tokens has them once a registration with one passes; the first
    // kind below is that.
    let kinds = [
        Kind {
            name: "registered (for comparison)",
            expect: None,
            token: valid.clone(),
            real_csr: true,
            one_address: false,
        },
        Kind {
            name: "garbage CSR",
            expect: Some(Code::InvalidArgument),
            token: valid.clone(),
            real_csr: false,
            one_address: false,
        },
        Kind {
            name: "token bound to another node",
            expect: Some(Code::PermissionDenied),
            token: bound,
            real_csr: true,
            one_address: false,
        },
        Kind {
            name: "unknown token (waits 1 s for a new token)",
            expect: Some(Code::PermissionDenied),
            token: format!("vmbt_{}", "0".repeat(64)),
            real_csr: true,
            one_address: false,
        },
        Kind {
            name: "rate-limited (one address)",
            expect: Some(Code::ResourceExhausted),
            token: valid.clone(),
            real_csr: false,
            one_address: true,
        },
    ];
    let (_key, csr) = vmesh_tls::new_key_and_csr().unwrap_or_else(|e| fail(&e.to_string()));
    let pid = controller.pid();
    eprintln!("refusals: {calls} calls per kind");
    println!();
    println!("Registrations the relay refuses, {calls} calls each (release build)");
    println!("| refused as | calls/s | controller CPU per call | Consul KV reads per call |");
    println!("| --- | ---: | ---: | ---: |");
    let mut node_base = 0usize;
    for (k, kind) in kinds.iter().enumerate() {
        let reads_before = consul.kv_reads_under("vmesh/");
        let cpu_before = cpu_ticks(pid);
        let t = Instant::now();
        let groups = if kind.one_address {
            1
        } else {
            calls.div_ceil(PER_CONNECTION)
        };
        let per_group = if kind.one_address {
            calls
        } else {
            PER_CONNECTION
        };
        let outcomes: Vec<Vec<Option<Code>>> = rt.block_on(
            futures::stream::iter(0..groups)
                .map(|g| {
                    // 127.2.<kind>.<group>, .. : a source address per group.
                    let bind = IpAddr::V4(Ipv4Addr::new(127, 2 + k as u8, (g / 250) as u8, (g % 250 + 1) as u8));
                    let (relay_addr, ca_pem, csr, token) =
                        (relay_addr.clone(), ca_pem.clone(), csr.clone(), kind.token.clone());
                    let real_csr = kind.real_csr;
                    let first = node_base + g * per_group;
                    async move {
                        let channel = registration_channel(&relay_addr, &ca_pem, bind)
                            .await
                            .unwrap_or_else(|e| fail(&e));
                        futures::stream::iter(0..per_group)
                            .map(|i| {
                                let mut client = RegistrationClient::new(channel.clone());
                                let request = RegisterRequest {
                                    token: token.clone(),
                                    node: format!("bench-{}", first + i),
                                    datacenter: "dc1".into(),
                                    csr_der: if real_csr { csr.clone() } else { b"garbage".to_vec() },
                                    ..Default::default()
                                };
                                async move { client.register(request).await.err().map(|s| s.code()) }
                            })
                            .buffer_unordered(PER_CONNECTION)
                            .collect::<Vec<_>>()
                            .await
                    }
                })
                .buffer_unordered(if kind.one_address { 1 } else { CONNECTIONS })
                .collect(),
        );
        let elapsed = t.elapsed();
        let cpu = (cpu_ticks(pid) - cpu_before) as f64 / TICKS_PER_SECOND;
        let reads = consul.kv_reads_under("vmesh/") - reads_before;
        node_base += groups * per_group;
        let outcomes: Vec<Option<Code>> = outcomes.into_iter().flatten().collect();
        let expected = outcomes.iter().filter(|o| **o == kind.expect).count();
        // The rate-limited kind lets its address's burst (20) and its rate (1/s) through to
        // the token check.
        let allowed = if kind.one_address {
            21 + elapsed.as_secs() as usize
        } else {
            0
        };
        if expected + allowed < outcomes.len() {
            let other: Vec<_> = outcomes
                .iter()
                .filter(|o| **o != kind.expect)
                .take(5)
                .collect();
            fail(&format!(
                "{}: {expected} of {} answered {:?}; others: {other:?}",
                kind.name,
                outcomes.len(),
                kind.expect
            ));
        }
        let n = outcomes.len() as f64;
        println!(
            "| {} | {:.0} | {:.0} µs | {:.2} |",
            kind.name,
            n / elapsed.as_secs_f64(),
            cpu / n * 1e6,
            reads as f64 / n
        );
    }
    let _ = std::fs::remove_dir_all(&data);
}
