//! The relay: what 1,000 agents cost the controller, how fast a service registered on a VM is
//! routed to by the edge Envoy, and what `vmesh-agent` itself costs.
//!
//! Run: `scripts/setup-envoy && cargo build --profile agent -p vmesh-agent &&
//! cargo bench -p vmesh-controller --bench relay` (the agent as it is built for VMs, see the
//! `agent` profile in Cargo.toml).
//! (`VMESH_BENCH_AGENTS=<n>` simulated agents, default 1000; `VMESH_BENCH_SAMPLES=<n>` samples
//! per poll interval in part 2, default 100; `VMESH_BENCH_PARTS=1,2,3` which parts to run,
//! default all; `VMESH_BENCH_LOG=<filter>` the controller's and agents' log filter, default
//! `info`, and keeps their logs).
//!
//! 1. **1,000 simulated agents** (no agent binary): the release controller with its relay on,
//!    reading Consul KV from the test kit's emulator (a Gateway, ten Upstreams on the Consul
//!    services `svc-0..svc-9`, one VirtualService). In this process, on one tokio runtime, N
//!    simulated agents, each a tonic mTLS client from its own loopback address `127.1.x.y`
//!    (`Endpoint::local_address`; the controller accepts only instances at the connection's
//!    source address): each registers (its own key and CSR, one unlimited bootstrap token), then
//!    connects and sends `Hello` + a snapshot of 5 instances (services `svc-<(i+k) mod 10>`),
//!    driven by the agent's own discovery state machine (the test kit's `SimulatedAgent`), and
//!    reconnects with the agent's backoff (200 ms doubling up to 30 s, full jitter, reset by an
//!    ack) whenever its stream ends. Reports
//!    the controller's RSS before and with N agents streaming, the time from the first connect
//!    until every snapshot was acknowledged, its CPU over 10 s of steady state; then SIGKILLs
//!    the controller, starts it again on the same ports and data dir, and reports the time until
//!    `vmesh_relay_agents_connected` = N and every agent had its new snapshot acknowledged.
//! 2. **service registered on a VM → routed by the edge Envoy**: a controller with a Gateway,
//!    the Upstream `{consul: {service: web}}` and a VirtualService to it; one real Envoy; one
//!    "VM" = an emulator as Consul agent of node `vm-1` at 127.0.0.11, a `vmesh-agent` (`agent` profile)
//!    next to it, and two echo servers on 127.0.0.11. Each sample registers `web` on the other
//!    echo server and deregisters the previous instance, then polls through Envoy without
//!    sleeping until an answer comes from the new echo server. Run with the agent's default
//!    `--poll-interval 250ms` and with `50ms`.
//! 3. **the agent's own cost**: a second VM (`vm-2`, 127.0.0.12) and agent (default poll
//!    interval): VmRSS (highest of samples every 200 ms) and CPU (ticks from `/proc/<pid>/stat`
//!    over the window) idle for 20 s, then with 100 services with TTL checks for 10 s
//!    unchanged, and for 30 s while the health of a random 10 % of them flips every 2 s.
//!
//! Fails (never skips) when Envoy is missing, naming how to get it. The agent binary is built
//! (`agent` profile) when it is missing or older than its sources. Every wait is bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use tonic::transport::Endpoint;
use vmesh_proto::v1::{Health, ServiceInstance};
use vmesh_testkit::consul::{CheckStatus, ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::process::{
    cpu_ticks as proc_cpu_ticks, status_kib as proc_status_kib, AgentProcess, ControllerOptions,
    ControllerProcess,
};
use vmesh_testkit::relay::{register_agent, FleetObserver, SimulatedAgent};
use vmesh_testkit::{envoy_binary, free_port, workspace_binary, EchoServer, Envoy, HttpClient};
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

mod support;
use support::{env_count, fail, print_rows, Gaps, Row};

const PROXY: &str = "gateway-proxy";
const PREFIX: &str = "vmesh/config/";
const STARTUP: Duration = Duration::from_secs(60);
/// The longest one change may take to show through Envoy before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the simulated agents may take to (re)connect and be acknowledged.
const FLEET_TIMEOUT: Duration = Duration::from_secs(120);
/// Linux's `CLK_TCK`.
const TICKS_PER_SECOND: f64 = 100.0;
const INSTANCES_PER_AGENT: usize = 5;
const SERVICES: usize = 10;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench binaries without `--bench`: this one needs minutes,
        // Envoy and the agent binary, so it only runs under `cargo bench`.
        println!("relay: run with `cargo bench -p vmesh-controller --bench relay`");
        return;
    }
    let agents = env_count("VMESH_BENCH_AGENTS", 1000);
    let samples = env_count("VMESH_BENCH_SAMPLES", 100);
    let parts = std::env::var("VMESH_BENCH_PARTS").unwrap_or_else(|_| "1,2,3".into());
    let run = |p: &str| parts.split(',').any(|x| x.trim() == p);
    if agents > 60_000 {
        fail("VMESH_BENCH_AGENTS: at most 60,000 (one loopback address each)");
    }
    // Paths are checked before anything runs, so a missing binary fails at once.
    let tools = (run("2") || run("3")).then(|| {
        let envoy = envoy_binary().unwrap_or_else(|e| fail(&e));
        (envoy, agent_binary())
    });
    eprintln!(
        "relay: parts {parts}; {agents} simulated agents; {samples} samples per poll interval; started {}",
        unix_now()
    );
    if run("1") {
        fleet_bench(agents);
    }
    if let Some((envoy, agent)) = tools {
        eprintln!(
            "relay: envoy {}, agent {}",
            envoy.display(),
            agent.display()
        );
        let vm_bench = VmBench::start(&agent);
        if run("2") {
            vm_bench.routing(samples);
        }
        if run("3") {
            vm_bench.agent_cost();
        }
    }
}

fn unix_now() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{} (unix)", now.as_secs())
}

fn log_filter() -> Option<String> {
    std::env::var("VMESH_BENCH_LOG")
        .ok()
        .filter(|f| !f.is_empty())
}

/// `vmesh-agent` as it is built for VMs (the `agent` profile): `target/agent/vmesh-agent`, built
/// first when it is missing or older than its sources.
fn agent_binary() -> PathBuf {
    workspace_binary("vmesh-agent", "vmesh-agent", "agent")
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// xorshift64: a fixed, dependency-free pseudo-random sequence.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// The controller

fn put_config(consul: &ConsulEmulator, doc_kind: &str, name: &str, text: &str) {
    consul.kv_put(&format!("{PREFIX}{doc_kind}/{name}"), text.as_bytes());
}

fn gateway(port: u16) -> String {
    format!(
        "kind: Gateway\nname: edge\nspec:\n  bindAddress: 127.0.0.1\n  bindPort: {port}\n  proxyNames: [{PROXY}]\n"
    )
}

fn consul_upstream(name: &str) -> String {
    format!("kind: Upstream\nname: {name}\nspec:\n  consul:\n    service: {name}\n")
}

/// A controller process with its relay on (the test kit's launcher); killed and started again
/// on the same ports and data directory by `kill` and `spawn`.
struct Controller {
    process: ControllerProcess,
    relay_port: u16,
    /// `--data-dir`: the built-in CA, kept across restarts.
    data: PathBuf,
    admin_client: HttpClient,
}

impl Controller {
    fn start(name: &str, consul_url: &str) -> Controller {
        let relay_port = free_port();
        let data = std::env::temp_dir().join(format!(
            "vmesh-bench-relay-{}-{name}-data",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data);
        let opts = ControllerOptions::new(env!("CARGO_BIN_EXE_vmesh-controller"))
            .name(&format!("bench-relay-{name}"))
            .log(&log_filter().unwrap_or_else(|| "info".into()))
            .keep(log_filter().is_some())
            .args([
                "--consul-addr",
                consul_url,
                "--id",
                "bench",
                "--relay-addr",
                &format!("127.0.0.1:{relay_port}"),
                "--data-dir",
                &data.display().to_string(),
                "--trust-domain",
                "vmesh",
            ]);
        let mut c = Controller {
            process: ControllerProcess::start(opts),
            relay_port,
            data,
            admin_client: HttpClient::with_timeout(Duration::from_secs(5), true),
        };
        c.wait_listening(Instant::now());
        c
    }

    fn spawn(&mut self) {
        self.process.spawn();
    }

    /// SIGKILL, as a crash or a lost machine would.
    fn kill(&mut self) {
        self.process.kill();
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn ca_file(&self) -> PathBuf {
        self.data.join("ca").join("ca.pem")
    }

    fn relay_addr(&self) -> String {
        format!("127.0.0.1:{}", self.relay_port)
    }

    fn admin(&self, path: &str) -> String {
        self.process.admin(path)
    }

    fn log(&self) -> String {
        self.process.log_path().display().to_string()
    }

    /// Waits (polling every 2 ms) until the CA exists and the relay accepts connections;
    /// returns when it did.
    fn wait_listening(&mut self, since: Instant) -> Instant {
        loop {
            if self.ca_file().exists()
                && std::net::TcpStream::connect(("127.0.0.1", self.relay_port)).is_ok()
            {
                return Instant::now();
            }
            if let Some(status) = self.process.try_exit() {
                fail(&format!(
                    "the controller exited ({status}); log {}",
                    self.log()
                ));
            }
            if since.elapsed() > STARTUP {
                fail(&format!(
                    "the relay did not listen within {STARTUP:?}; log {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One metric of `/metrics`, summed over its label sets; `None` when the endpoint does not
    /// answer.
    fn metric(&self, name: &str) -> Option<f64> {
        self.process.metric(name, "")
    }

    /// From `/agents`: (agents connected, their instances in total).
    fn agents(&self) -> (usize, u64) {
        let v = self
            .admin_client
            .get(&self.admin("/agents"), &[])
            .and_then(|r| r.json())
            .unwrap_or_else(|e| fail(&format!("/agents: {e}")));
        let list = v["agents"].as_array().cloned().unwrap_or_default();
        let connected: Vec<_> = list.iter().filter(|a| a["connected"] == true).collect();
        let instances = connected
            .iter()
            .filter_map(|a| a["instances"].as_u64())
            .sum();
        (connected.len(), instances)
    }

    /// Waits until `name` reads `want`.
    fn wait_metric(&self, name: &str, want: f64, timeout: Duration) -> Instant {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if v == Some(want) {
                return Instant::now();
            }
            if t0.elapsed() > timeout {
                fail(&format!(
                    "{name} was {v:?}, not {want}, after {timeout:?}; log {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Creates a bootstrap token with unlimited uses and no expiry in the registry the
    /// controller reads, as `vmeshctl token create` does (`--gateway` with `gateway`). Returns
    /// the secret.
    fn create_token(
        consul: &ConsulEmulator,
        rt: &tokio::runtime::Runtime,
        gateway: Option<&str>,
    ) -> String {
        let config = vmesh_consul::ConsulConfig::from_env(vmesh_consul::ConsulEnv {
            http_addr: Some(consul.url()),
            ..Default::default()
        })
        .unwrap_or_else(|e| fail(&format!("consul config: {e}")));
        let client = rt
            .block_on(async { vmesh_consul::Client::new(&config) })
            .unwrap_or_else(|e| fail(&format!("consul client: {e}")));
        let registry = vmesh_registry::Registry::new(client, "vmesh");
        let now = SystemTime::now();
        let created = match gateway {
            Some(g) => rt.block_on(registry.create_gateway_token(None, None, g.to_owned(), now)),
            None => rt.block_on(registry.create_token(None, None, None, now)),
        };
        let (_, secret) =
            created.unwrap_or_else(|e| fail(&format!("create a bootstrap token: {e}")));
        secret.expose().to_owned()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // The launcher keeps (or removes) the log; the data dir is this bench's.
        if !std::thread::panicking() && log_filter().is_none() {
            let _ = std::fs::remove_dir_all(&self.data);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Part 1: simulated agents

/// What the simulated agents report back to the bench.
struct Fleet {
    /// Bumped by the bench before it kills the controller: a stream opened after that talks to
    /// the new process.
    epoch: AtomicU64,
    base: Instant,
    /// Per agent: 1 + the epoch of the last stream whose snapshot was acknowledged (0: none).
    acked_epoch: Vec<AtomicU64>,
    /// Per agent: when (µs after `base`).
    acked_at: Vec<AtomicU64>,
    connect_failures: AtomicU64,
    streams: AtomicU64,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        Fleet {
            epoch: AtomicU64::new(0),
            base: Instant::now(),
            acked_epoch: (0..n).map(|_| AtomicU64::new(0)).collect(),
            acked_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            connect_failures: AtomicU64::new(0),
            streams: AtomicU64::new(0),
        }
    }

    fn record(&self, agent: usize, epoch: u64) {
        let at = self.base.elapsed().as_micros() as u64;
        self.acked_at[agent].store(at, Ordering::SeqCst);
        self.acked_epoch[agent].store(epoch + 1, Ordering::SeqCst);
    }

    /// How many agents had a snapshot acknowledged on a stream of `epoch`, and when the last of
    /// them was.
    fn acked(&self, epoch: u64) -> (usize, Instant) {
        let mut n = 0;
        let mut last = self.base;
        for (e, at) in self.acked_epoch.iter().zip(&self.acked_at) {
            if e.load(Ordering::SeqCst) == epoch + 1 {
                n += 1;
                last = last.max(self.base + Duration::from_micros(at.load(Ordering::SeqCst)));
            }
        }
        (n, last)
    }

    /// Waits (2 ms polls) until all agents were acknowledged on a stream of `epoch`; returns
    /// when the last one was.
    fn wait_all(&self, epoch: u64, controller: &Controller) -> Instant {
        let t0 = Instant::now();
        loop {
            let (n, last) = self.acked(epoch);
            if n == self.acked_epoch.len() {
                return last;
            }
            if t0.elapsed() > FLEET_TIMEOUT {
                fail(&format!(
                    "only {n} of {} simulated agents were acknowledged within {FLEET_TIMEOUT:?} ({} failed connects); log {}",
                    self.acked_epoch.len(),
                    self.connect_failures.load(Ordering::SeqCst),
                    controller.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl FleetObserver for Fleet {
    fn stream_starting(&self, _agent: usize) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn stream_opened(&self, _agent: usize) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot_acked(&self, agent: usize, epoch: u64) {
        self.record(agent, epoch);
    }

    fn connect_failed(&self, _agent: usize) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Agent `i`'s source address: 127.1.x.y.
fn sim_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

fn sim_instances(i: usize) -> Vec<ServiceInstance> {
    (0..INSTANCES_PER_AGENT)
        .map(|k| {
            let service = format!("svc-{}", (i + k) % SERVICES);
            ServiceInstance {
                id: format!("{service}-{k}"),
                service,
                address: sim_ip(i).to_string(),
                port: 8000 + k as u32,
                health: Health::Passing as i32,
                ..Default::default()
            }
        })
        .collect()
}

/// Registers simulated agent `i` (node `sim-<i>`) with `token`.
async fn register(
    relay_addr: String,
    ca_pem: Arc<String>,
    token: Arc<String>,
    i: usize,
) -> Result<Endpoint, String> {
    register_agent(
        &relay_addr,
        &ca_pem,
        &token,
        &format!("sim-{i}"),
        "dc1",
        sim_ip(i),
    )
    .await
}

fn fleet_bench(n: usize) {
    let consul = ConsulEmulator::start();
    put_config(&consul, "Gateway", "edge", &gateway(free_port()));
    let mut routes = String::new();
    for s in 0..SERVICES {
        let name = format!("svc-{s}");
        put_config(&consul, "Upstream", &name, &consul_upstream(&name));
        routes.push_str(&format!(
            "    - match: {{prefix: /{name}/}}\n      upstream: {name}\n"
        ));
    }
    put_config(
        &consul,
        "VirtualService",
        "sim",
        &format!("kind: VirtualService\nname: sim\nspec:\n  domains: [\"*\"]\n  routes:\n{routes}"),
    );
    let mut controller = Controller::start("fleet", &consul.url());
    let rt = runtime();
    let token = Arc::new(Controller::create_token(&consul, &rt, None));
    std::thread::sleep(Duration::from_secs(2));
    let pid = controller.pid();
    let rss_before = proc_status_kib(pid, "VmRSS");

    // Registration: 16 at a time.
    let ca_pem = Arc::new(
        std::fs::read_to_string(controller.ca_file())
            .unwrap_or_else(|e| fail(&format!("ca.pem: {e}"))),
    );
    let relay_addr = controller.relay_addr();
    let t_register = Instant::now();
    let endpoints: Vec<Endpoint> = rt
        .block_on(
            futures::stream::iter(0..n)
                .map(|i| register(relay_addr.clone(), ca_pem.clone(), token.clone(), i))
                .buffered(16)
                .collect::<Vec<_>>(),
        )
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| fail(&format!("simulated agent {i}: {e}"))))
        .collect();
    let registration = t_register.elapsed();
    let rss_registered = proc_status_kib(pid, "VmRSS");
    eprintln!("relay: {n} agents registered in {}", secs(registration));

    // Connect all at once.
    let fleet = Arc::new(Fleet::new(n));
    let t_connect = Instant::now();
    for (index, endpoint) in endpoints.into_iter().enumerate() {
        let agent = SimulatedAgent {
            index,
            endpoint,
            instances: sim_instances(index),
        };
        rt.spawn(agent.run(fleet.clone()));
    }
    let all_acked = fleet.wait_all(0, &controller);
    let connect = all_acked - t_connect;
    controller.wait_metric("vmesh_relay_agents_connected", n as f64, FLEET_TIMEOUT);
    let failures_first = fleet.connect_failures.load(Ordering::SeqCst);
    eprintln!(
        "relay: {n} agents acknowledged {} after the first connect",
        secs(connect)
    );

    // Steady state.
    std::thread::sleep(Duration::from_secs(3));
    let window = Duration::from_secs(10);
    let (c0, b0) = (proc_cpu_ticks(pid), proc_cpu_ticks(std::process::id()));
    std::thread::sleep(window);
    let (c1, b1) = (proc_cpu_ticks(pid), proc_cpu_ticks(std::process::id()));
    let rss_streaming = proc_status_kib(pid, "VmRSS");
    let hwm = proc_status_kib(pid, "VmHWM");
    let refused = controller
        .metric("vmesh_relay_instances_refused_total")
        .unwrap_or(f64::NAN);
    if refused != 0.0 {
        fail(&format!(
            "the controller refused {refused} instances; log {}",
            controller.log()
        ));
    }
    let (connected, instances) = controller.agents();
    if connected != n || instances != (n * INSTANCES_PER_AGENT) as u64 {
        fail(&format!(
            "/agents: {connected} connected with {instances} instances, expected {n} with {}",
            n * INSTANCES_PER_AGENT
        ));
    }
    let streams_before = fleet.streams.load(Ordering::SeqCst);

    // Crash and restart.
    fleet.epoch.store(1, Ordering::SeqCst);
    let t_kill = Instant::now();
    controller.kill();
    controller.spawn();
    let t_spawn = Instant::now();
    let listening = controller.wait_listening(t_spawn);
    let metric_n = controller.wait_metric("vmesh_relay_agents_connected", n as f64, FLEET_TIMEOUT);
    let last_ack = fleet.wait_all(1, &controller);
    let resynced = metric_n.max(last_ack);
    let failures_restart = fleet.connect_failures.load(Ordering::SeqCst) - failures_first;
    let extra_streams = fleet.streams.load(Ordering::SeqCst) - streams_before - n as u64;
    std::thread::sleep(Duration::from_secs(3));
    let pid2 = controller.pid();
    let rss_after_restart = proc_status_kib(pid2, "VmRSS");
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(controller);

    let per_agent = (rss_streaming as f64 - rss_before as f64) / n as f64;
    println!();
    println!("Controller with {n} simulated agents ({INSTANCES_PER_AGENT} instances each, {SERVICES} services)");
    println!("| | |");
    println!("| --- | --- |");
    println!(
        "| controller RSS before agents | {:.1} MiB |",
        kib_to_mib(rss_before)
    );
    println!(
        "| after {n} registrations | {:.1} MiB ({} to register, 16 at a time) |",
        kib_to_mib(rss_registered),
        secs(registration)
    );
    println!(
        "| with {n} agents connected and streaming | {:.1} MiB (peak {:.1} MiB) → **{per_agent:.1} KiB per agent** |",
        kib_to_mib(rss_streaming),
        kib_to_mib(hwm)
    );
    println!(
        "| first connect → all {n} snapshots acked | {} ({failures_first} failed connects retried) |",
        secs(connect)
    );
    println!(
        "| controller CPU, steady state ({} s) | {:.2} % of one core ({} ticks); bench process {:.2} % |",
        window.as_secs(),
        (c1 - c0) as f64 / TICKS_PER_SECOND / window.as_secs_f64() * 100.0,
        c1 - c0,
        (b1 - b0) as f64 / TICKS_PER_SECOND / window.as_secs_f64() * 100.0
    );
    println!(
        "| SIGKILL + restart → relay listening | {} (spawn → listening {}) |",
        secs(listening - t_kill),
        secs(listening - t_spawn)
    );
    println!(
        "| **restart → all {n} resynced** | **{}** from the kill; {} from the relay listening (`agents_connected` = {n} after {}, last snapshot acked after {}) |",
        secs(resynced - t_kill),
        secs(resynced.saturating_duration_since(listening)),
        secs(metric_n - t_kill),
        secs(last_ack.saturating_duration_since(t_kill))
    );
    println!(
        "| reconnects | {failures_restart} failed connects during the restart; {extra_streams} streams beyond one per agent |"
    );
    println!(
        "| controller RSS after the restart, {n} agents | {:.1} MiB |",
        kib_to_mib(rss_after_restart)
    );
}

// ---------------------------------------------------------------------------------------------
// Parts 2 and 3: real agents

/// A `vmesh-agent` process (the test kit's launcher).
struct Agent(AgentProcess);

impl Agent {
    fn start(
        binary: &Path,
        controller: &Controller,
        vm: &ConsulEmulator,
        data_dir: &Path,
        token: &str,
        extra: &[&str],
    ) -> Agent {
        let mut args: Vec<String> = [
            "--relay-addr",
            &controller.relay_addr(),
            "--ca-file",
            &controller.ca_file().display().to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--consul-addr",
            &vm.url(),
            "--log",
            &log_filter().unwrap_or_else(|| "info".into()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = [("VMESH_AGENT_TOKEN".to_string(), token.to_string())];
        Agent(AgentProcess::start(
            binary,
            vm.node_name(),
            &args,
            &env,
            &data_dir.with_extension("log"),
        ))
    }

    fn pid(&self) -> u32 {
        self.0
            .pid()
            .unwrap_or_else(|| fail("the agent is not running"))
    }

    fn check_alive(&mut self) {
        if let Some(status) = self.0.try_exit() {
            fail(&format!(
                "vmesh-agent exited ({status}); log:\n{}",
                vmesh_testkit::process::tail(&self.0.log(), 30)
            ));
        }
    }
}

/// A "VM": a Consul agent (the emulator) of node `vm-<n>` at 127.0.0.<10 + n>.
fn vm(n: u8) -> ConsulEmulator {
    ConsulEmulator::start_with(ConsulOptions {
        node_name: format!("vm-{n}"),
        node_address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n)),
        ..Default::default()
    })
}

fn echo_on(ip: IpAddr, name: &str) -> EchoServer {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap_or_else(|e| fail(&format!("bind {ip}: {e}")));
    EchoServer::start_on(listener, name)
}

/// Polls `url` on one kept-alive connection, without sleeping, until an answer comes from the
/// echo server `want` (its `x-served-by` header); returns when it did.
fn wait_served(
    client: &HttpClient,
    url: &str,
    want: &str,
    t0: Instant,
    timeout: Duration,
) -> Instant {
    loop {
        let last = match client.get(url, &[]) {
            Ok(r) if r.status == 200 && r.header("x-served-by") == Some(want) => {
                return Instant::now()
            }
            Ok(r) => format!("status {} from {:?}", r.status, r.header("x-served-by")),
            Err(e) => e,
        };
        if t0.elapsed() > timeout {
            fail(&format!(
                "{url} was not served by {want} within {timeout:?}; last: {last}"
            ));
        }
    }
}

/// The controller, Envoy and the routing config of parts 2 and 3.
struct VmBench {
    agent_binary: PathBuf,
    _consul: ConsulEmulator,
    controller: Controller,
    _envoy: Envoy,
    url: String,
    token: String,
    dir: PathBuf,
}

impl VmBench {
    fn start(agent_binary: &Path) -> VmBench {
        let consul = ConsulEmulator::start();
        let port = free_port();
        put_config(&consul, "Gateway", "edge", &gateway(port));
        put_config(&consul, "Upstream", "web", &consul_upstream("web"));
        put_config(
            &consul,
            "VirtualService",
            "web",
            "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: web\n",
        );
        let controller = Controller::start("vm", &consul.url());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")));
        let dir = controller.process.dir().join("vms");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
        // The edge gateway's certificate for the (mutual TLS) xDS port, as an operator gets it.
        let gateway_token = Controller::create_token(&consul, &rt, Some(PROXY));
        let certs = dir.join("gateway-certs");
        let args: Vec<String> = [
            "--gateway",
            PROXY,
            "--datacenter",
            "dc1",
            "--relay-addr",
            &controller.relay_addr(),
            "--ca-file",
            &controller.ca_file().display().to_string(),
            "--data-dir",
            &certs.display().to_string(),
            "--once",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = [("VMESH_AGENT_TOKEN".to_string(), gateway_token)];
        let mut once = AgentProcess::start(
            agent_binary,
            "gateway",
            &args,
            &env,
            &dir.join("gateway-agent.log"),
        );
        if !once.wait_exit(STARTUP).success() {
            fail(&format!(
                "vmesh-agent --gateway --once failed:\n{}",
                once.log()
            ));
        }
        let bootstrap = render(&BootstrapArgs {
            protocol: Protocol::Delta,
            admin_port: 0,
            xds_cert_dir: Some(certs),
            ..BootstrapArgs::new(PROXY.to_string(), controller.process.xds_addr())
        })
        .unwrap_or_else(|e| fail(&format!("render the bootstrap: {e}")));
        let envoy = Envoy::start(&bootstrap, PROXY);
        envoy.wait_ready(STARTUP);
        let token = Controller::create_token(&consul, &rt, None);
        VmBench {
            agent_binary: agent_binary.to_owned(),
            _consul: consul,
            controller,
            _envoy: envoy,
            url: format!("http://127.0.0.1:{port}/"),
            token,
            dir,
        }
    }

    fn agent(&self, vm: &ConsulEmulator, extra: &[&str]) -> Agent {
        let data = self.dir.join(vm.node_name());
        Agent::start(
            &self.agent_binary,
            &self.controller,
            vm,
            &data,
            &self.token,
            extra,
        )
    }

    /// Part 2.
    fn routing(&self, samples: usize) {
        let vm1 = vm(1);
        let ip = vm1.options().node_address;
        let echoes = [echo_on(ip, "web-a"), echo_on(ip, "web-b")];
        let client = HttpClient::new();
        let mut current = (
            vm1.register_service(
                ServiceRegistration::new("web", echoes[0].port()).with_id("web-0"),
            ),
            0usize,
        );
        let mut next_id = 1;
        let mut rows = Vec::new();
        for interval in ["250ms", "50ms"] {
            let mut agent = self.agent(&vm1, &["--poll-interval", interval]);
            // The agent registers (first run) or reuses its certificate, connects and reports.
            wait_served(
                &client,
                &self.url,
                echoes[current.1].name(),
                Instant::now(),
                STARTUP,
            );
            let mut gaps = Gaps::new(Duration::from_millis(500));
            let mut times = Vec::with_capacity(samples);
            for _ in 0..samples {
                gaps.pause();
                let to = 1 - current.1;
                let id = format!("web-{next_id}");
                next_id += 1;
                let t0 = Instant::now();
                vm1.register_service(
                    ServiceRegistration::new("web", echoes[to].port()).with_id(&id),
                );
                vm1.deregister_service(&current.0);
                let t1 = wait_served(&client, &self.url, echoes[to].name(), t0, CHANGE_TIMEOUT);
                times.push(t1 - t0);
                current = (id, to);
                // Settled: 10 answers in a row from the new instance (not measured), so the
                // previous instance is gone before the next sample.
                let settle = Instant::now();
                let mut in_a_row = 0;
                while in_a_row < 10 {
                    match client.get(&self.url, &[]) {
                        Ok(r)
                            if r.status == 200
                                && r.header("x-served-by") == Some(echoes[to].name()) =>
                        {
                            in_a_row += 1
                        }
                        _ => in_a_row = 0,
                    }
                    if settle.elapsed() > CHANGE_TIMEOUT {
                        fail("the previous instance of web was still served after 10 s");
                    }
                }
            }
            agent.check_alive();
            let name: &'static str = if interval == "250ms" {
                "VM register → routed, poll 250ms"
            } else {
                "VM register → routed, poll 50ms"
            };
            rows.push(Row::new(name, times));
            drop(agent);
            // The next agent starts once the controller saw this one go.
            self.controller
                .wait_metric("vmesh_relay_agents_connected", 0.0, CHANGE_TIMEOUT);
        }
        println!();
        println!("Service registered on a VM → first answer from it through the edge Envoy, {samples} samples each (ms)");
        print_rows(&rows);
    }

    /// Part 3.
    fn agent_cost(&self) {
        let vm2 = vm(2);
        let mut agent = self.agent(&vm2, &[]);
        self.controller
            .wait_metric("vmesh_relay_agents_connected", 1.0, STARTUP);
        std::thread::sleep(Duration::from_secs(2));
        let idle = Window::measure(&mut agent, Duration::from_secs(20), |_| {});

        let services = 100;
        let mut checks = Vec::with_capacity(services);
        for k in 0..services {
            let id = format!("app-{k}");
            vm2.register_service(
                ServiceRegistration::new(&format!("app-{}", k % 10), 9000 + k as u16)
                    .with_id(&id)
                    .with_ttl_check(Duration::from_secs(3600)),
            );
            let check = format!("service:{id}");
            vm2.set_check_status(&check, CheckStatus::Passing);
            checks.push((check, true));
        }
        std::thread::sleep(Duration::from_secs(2));
        let loaded = Window::measure(&mut agent, Duration::from_secs(10), |_| {});

        let mut rng = XorShift::new(42);
        let mut flips = 0;
        let mut next_flip = Instant::now();
        let churn = Window::measure(&mut agent, Duration::from_secs(30), |now| {
            if now < next_flip {
                return;
            }
            next_flip += Duration::from_secs(2);
            for _ in 0..services / 10 {
                let (check, passing) = &mut checks[rng.below(services as u64) as usize];
                *passing = !*passing;
                let status = if *passing {
                    CheckStatus::Passing
                } else {
                    CheckStatus::Critical
                };
                if !vm2.set_check_status(check, status) {
                    fail(&format!("no check {check}"));
                }
                flips += 1;
            }
        });
        agent.check_alive();
        let (connected, instances) = self.controller.agents();
        if (connected, instances) != (1, services as u64) {
            fail(&format!(
                "/agents: {connected} connected with {instances} instances, expected 1 with {services}"
            ));
        }
        println!();
        println!(
            "vmesh-agent (`agent` profile, --poll-interval 250ms) against its local Consul agent"
        );
        println!(
            "| phase | window | VmRSS max | RssAnon max | VmHWM | CPU (% of one core) | ticks | goal |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        idle.print("idle, no services", "≤ 8 MB RSS, < 0.5 % CPU");
        loaded.print("100 services, unchanged", "");
        churn.print(
            &format!("100 services, {flips} health flips (10 every 2 s)"),
            "≤ 16 MB RSS",
        );
        println!("(the controller holds the agent's {instances} instances at the end)");
    }
}

struct Window {
    length: Duration,
    rss_max: u64,
    anon_max: u64,
    hwm: u64,
    ticks: u64,
}

impl Window {
    /// Samples the agent's VmRSS every 200 ms for `length`, calling `tick` at each sample, and
    /// its CPU ticks over the whole window.
    fn measure(agent: &mut Agent, length: Duration, mut tick: impl FnMut(Instant)) -> Window {
        agent.check_alive();
        let pid = agent.pid();
        let t0 = Instant::now();
        let c0 = proc_cpu_ticks(pid);
        let (mut rss_max, mut anon_max) = (0, 0);
        let mut k = 0u32;
        loop {
            let now = Instant::now();
            if now - t0 >= length {
                break;
            }
            tick(now);
            rss_max = rss_max.max(proc_status_kib(pid, "VmRSS"));
            anon_max = anon_max.max(proc_status_kib(pid, "RssAnon"));
            k += 1;
            let due = t0 + Duration::from_millis(200) * k;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let ticks = proc_cpu_ticks(pid) - c0;
        Window {
            length: t0.elapsed(),
            rss_max,
            anon_max,
            hwm: proc_status_kib(pid, "VmHWM"),
            ticks,
        }
    }

    fn print(&self, phase: &str, goal: &str) {
        println!(
            "| {phase} | {:.1} s | {:.2} MiB ({} kB) | {:.2} MiB | {:.2} MiB | {:.2} % | {} | {goal} |",
            self.length.as_secs_f64(),
            kib_to_mib(self.rss_max),
            self.rss_max,
            kib_to_mib(self.anon_max),
            kib_to_mib(self.hwm),
            self.ticks as f64 / TICKS_PER_SECOND / self.length.as_secs_f64() * 100.0,
            self.ticks
        );
    }
}
