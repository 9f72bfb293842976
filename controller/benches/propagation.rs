//! Change → Envoy propagation latency, vmesh next to `sovereign`, in one run.
//!
//! Run: `scripts/setup-envoy && scripts/setup-bench && cargo bench -p vmesh-controller --bench propagation`
//! (`VMESH_BENCH_CHANGES=<n>` changes the number of changes per series, default 200).
//!
//! Every series makes the same change N times: the single route of the served virtual host
//! becomes a direct response with body `v<i>`. After writing the change (a temporary file, then
//! a rename) it takes t0, then sends `GET /` through Envoy in a tight loop on one kept-alive
//! connection, without sleeping, until the body is `v<i>`; the sample is t1 - t0. Before each
//! change it idles a pseudo-random 0–1 s (the same sequence in every series, see [`Gaps`]), so
//! changes do not fall in step with sovereign's refresh timer; the idle time is not measured.
//!
//! - vmesh: `vmesh-controller` on a temporary config directory (a Gateway for proxy
//!   `gateway-proxy`, a VirtualService `web`), and a real Envoy with the `vmeshctl` bootstrap,
//!   delta and then state of the world. The file written is the VirtualService's file.
//!   A further series polls only the controller's `/status/VirtualService/web` until it reports
//!   the new version acknowledged by the proxy (`proxies.acked == 1`): change → ACK seen by the
//!   controller (polling the controller during the traffic series would slow it down).
//! - sovereign: started here from `.venv-bench` (see `scripts/setup-bench`) with jinja
//!   templates for one listener (RDS) and one route configuration whose body comes from a
//!   template-context file, refreshed every second (sovereign's refresh rates are whole
//!   seconds; 1 s is its fastest). A second Envoy polls it over REST xDS (`api_type: REST`)
//!   with `refresh_delay` 100 ms, then 1 s. The file written is the context file.
//!
//! Fails (never skips) when Envoy or sovereign is missing, naming the script that installs it.
//! Only loopback addresses are used; every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmesh_testkit::process::{ControllerOptions, ControllerProcess};
use vmesh_testkit::{envoy_binary, free_port, workspace_root, Envoy, HttpClient};
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

mod support;
use support::{fail, ms, wait_for_body, Gaps, Row};

const PROXY: &str = "gateway-proxy";
const STARTUP: Duration = Duration::from_secs(30);
/// The longest one change may take to show before the run fails.
const VMESH_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const SOVEREIGN_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const SOVEREIGN_HINT: &str = "install it by running `scripts/setup-bench` from the repository \
root (it creates .venv-bench/ with the pinned sovereign and writes .venv-bench/sovereign-path)";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench binaries without `--bench`: this one needs minutes
        // and two external control planes, so it only runs under `cargo bench`.
        println!("propagation: run with `cargo bench -p vmesh-controller --bench propagation`");
        return;
    }
    // Both peers are checked before anything starts, so a missing one fails at once.
    let envoy = envoy_binary().unwrap_or_else(|e| fail(&e));
    let sovereign = sovereign_binary().unwrap_or_else(|e| fail(&e));
    let changes: usize = match std::env::var("VMESH_BENCH_CHANGES") {
        Ok(v) => v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
            fail(&format!(
                "VMESH_BENCH_CHANGES={v:?} is not a positive number"
            ))
        }),
        Err(_) => 200,
    };
    eprintln!(
        "propagation: {changes} changes per series; envoy {}, sovereign {}",
        envoy.display(),
        sovereign.display()
    );

    let mut rows = Vec::new();
    let base = scratch_dir("vmesh");
    {
        let controller = Controller::start(&base);
        for protocol in [Protocol::Delta, Protocol::Sotw] {
            let name = match protocol {
                Protocol::Delta => "vmesh delta, change → HTTP",
                Protocol::Sotw => "vmesh sotw, change → HTTP",
            };
            let samples = controller.traffic_series(protocol, changes, rows.len());
            rows.push(Row::new(name, samples));
        }
        let samples = controller.ack_series(changes);
        rows.push(Row::new("vmesh delta, change → ACK (status)", samples));
    }
    let _ = std::fs::remove_dir_all(&base);

    for (delay, label) in [
        ("0.1s", "sovereign, refresh_delay 100 ms"),
        ("1s", "sovereign, refresh_delay 1 s"),
    ] {
        let base = scratch_dir("sovereign");
        let samples = sovereign_series(&sovereign, &base, delay, changes);
        rows.push(Row::new(label, samples));
        let _ = std::fs::remove_dir_all(&base);
    }

    print_table(changes, &rows);
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmesh-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| fail(&format!("create {}: {e}", dir.display())));
    dir
}

/// Writes a file the way editors do: a temporary file, then a rename.
fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap_or_else(|e| fail(&format!("write {}: {e}", tmp.display())));
    std::fs::rename(&tmp, dir.join(name))
        .unwrap_or_else(|e| fail(&format!("rename into {name}: {e}")));
}

/// Makes `changes` changes with `apply(i)` (which must make the listener answer `v<i>`) and
/// measures each through `url`. Change numbers start at `first` so consecutive series on the
/// same listener always change something.
fn measure(
    changes: usize,
    first: usize,
    url: &str,
    timeout: Duration,
    mut apply: impl FnMut(usize),
) -> Vec<Duration> {
    let client = HttpClient::with_timeout(Duration::from_secs(5), true);
    let mut gaps = Gaps::new(Duration::from_secs(1));
    let mut samples = Vec::with_capacity(changes);
    for i in first..first + changes {
        gaps.pause();
        apply(i);
        let t0 = Instant::now();
        let t1 = wait_for_body(&client, url, &[], &format!("v{i}"), t0, timeout);
        samples.push(t1 - t0);
    }
    samples
}

// ---------------------------------------------------------------------------------------------
// vmesh

fn virtual_service(i: usize) -> String {
    format!(
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - directResponse: {{status: 200, body: \"v{i}\"}}\n"
    )
}

struct Controller {
    process: ControllerProcess,
    dir: PathBuf,
    listener_port: u16,
}

impl Controller {
    fn start(base: &Path) -> Controller {
        let dir = base.join("config");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("create config dir: {e}")));
        let listener_port = free_port();
        std::fs::write(
            dir.join("gateway.yaml"),
            format!(
                "kind: Gateway\nname: edge\nspec:\n  bindAddress: 127.0.0.1\n  bindPort: {listener_port}\n  proxyNames: [{PROXY}]\n"
            ),
        )
        .unwrap_or_else(|e| fail(&format!("write gateway.yaml: {e}")));
        write_atomically(&dir, "web.yaml", &virtual_service(0));
        let opts = ControllerOptions::new(env!("CARGO_BIN_EXE_vmesh-controller"))
            .name("bench-propagation")
            .args(["--config-dir", &dir.display().to_string()]);
        let mut process = ControllerProcess::start(opts);
        process.wait_ready(STARTUP);
        Controller {
            process,
            dir,
            listener_port,
        }
    }

    fn admin(&self, path: &str) -> String {
        self.process.admin(path)
    }

    fn envoy(&self, protocol: Protocol) -> Envoy {
        let bootstrap = render(&BootstrapArgs {
            protocol,
            admin_port: 0,
            ..BootstrapArgs::new(PROXY.to_string(), self.process.xds_addr())
        })
        .unwrap_or_else(|e| fail(&format!("render the bootstrap: {e}")));
        let envoy = Envoy::start(&bootstrap, PROXY);
        envoy.wait_ready(STARTUP);
        envoy
    }

    /// One Envoy on `protocol`, `changes` changes through it. `series` keeps bodies distinct.
    fn traffic_series(&self, protocol: Protocol, changes: usize, series: usize) -> Vec<Duration> {
        let envoy = self.envoy(protocol);
        let url = format!("http://127.0.0.1:{}/", self.listener_port);
        let base = (series + 1) * 100_000;
        // Warm-up: the current config is served before the first timed change.
        write_atomically(&self.dir, "web.yaml", &virtual_service(base));
        wait_for_body(
            &HttpClient::new(),
            &url,
            &[],
            &format!("v{base}"),
            Instant::now(),
            STARTUP,
        );
        let samples = measure(changes, base + 1, &url, VMESH_CHANGE_TIMEOUT, |i| {
            write_atomically(&self.dir, "web.yaml", &virtual_service(i));
        });
        drop(envoy);
        samples
    }

    /// Change → the controller reports the new version acknowledged by the one proxy.
    fn ack_series(&self, changes: usize) -> Vec<Duration> {
        let _envoy = self.envoy(Protocol::Delta);
        let url = format!("http://127.0.0.1:{}/", self.listener_port);
        let base = 900_000;
        write_atomically(&self.dir, "web.yaml", &virtual_service(base));
        wait_for_body(
            &HttpClient::new(),
            &url,
            &[],
            &format!("v{base}"),
            Instant::now(),
            STARTUP,
        );
        let client = HttpClient::with_timeout(Duration::from_secs(5), true);
        let status_url = self.admin("/status/VirtualService/web");
        let acked_version = |client: &HttpClient| -> Option<String> {
            let s = client.get(&status_url, &[]).ok()?.json().ok()?;
            (s["state"] == "Accepted" && s["proxies"]["acked"] == 1 && s["proxies"]["total"] == 1)
                .then(|| s["version"].as_str().map(str::to_string))
                .flatten()
        };
        let start = Instant::now();
        let mut previous = loop {
            if let Some(v) = acked_version(&client) {
                break v;
            }
            if start.elapsed() > STARTUP {
                fail("the controller never reported VirtualService/web acknowledged");
            }
        };
        let mut gaps = Gaps::new(Duration::from_secs(1));
        let mut samples = Vec::with_capacity(changes);
        for i in base + 1..=base + changes {
            gaps.pause();
            write_atomically(&self.dir, "web.yaml", &virtual_service(i));
            let t0 = Instant::now();
            loop {
                if let Some(v) = acked_version(&client).filter(|v| *v != previous) {
                    samples.push(t0.elapsed());
                    previous = v;
                    break;
                }
                if t0.elapsed() > VMESH_CHANGE_TIMEOUT {
                    fail(&format!(
                        "change {i} was not acknowledged within {VMESH_CHANGE_TIMEOUT:?}"
                    ));
                }
            }
        }
        // The traffic agrees with the status.
        wait_for_body(
            &client,
            &url,
            &[],
            &format!("v{}", base + changes),
            Instant::now(),
            VMESH_CHANGE_TIMEOUT,
        );
        samples
    }
}

// ---------------------------------------------------------------------------------------------
// sovereign

/// `$VMESH_SOVEREIGN` if set, else the path `scripts/setup-bench` recorded.
fn sovereign_binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os("VMESH_SOVEREIGN").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let record = workspace_root().join(".venv-bench/sovereign-path");
            let text = std::fs::read_to_string(&record).map_err(|e| {
                format!(
                    "sovereign not found ({}: {e}); {SOVEREIGN_HINT}",
                    record.display()
                )
            })?;
            PathBuf::from(text.trim())
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "sovereign not found at {}; {SOVEREIGN_HINT}",
            path.display()
        ))
    }
}

/// A sovereign process (gunicorn master and its worker), stopped on drop.
struct Sovereign {
    child: Child,
    log: PathBuf,
}

impl Sovereign {
    fn start(
        binary: &Path,
        base: &Path,
        port: u16,
        listener_port: u16,
        refresh_delay: &str,
    ) -> Sovereign {
        let listeners = format!(
            r#"resources:
  - name: edge
    address:
      socket_address: {{address: 127.0.0.1, port_value: {listener_port}}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: edge
              rds:
                route_config_name: edge-routes
                config_source:
                  resource_api_version: V3
                  api_config_source:
                    api_type: REST
                    transport_api_version: V3
                    cluster_names: [sovereign]
                    refresh_delay: {refresh_delay}
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        );
        let routes = r#"resources:
  - name: edge-routes
    virtual_hosts:
      - name: web
        domains: ["*"]
        routes:
          - match: {prefix: /}
            direct_response:
              status: 200
              body: {inline_string: "{{ route.body }}"}
"#;
        let write = |name: &str, text: &str| {
            std::fs::write(base.join(name), text)
                .unwrap_or_else(|e| fail(&format!("write {name}: {e}")));
        };
        write("listeners.yaml", &listeners);
        write("routes.yaml", routes);
        let spec = |name: &str, ser: &str| {
            format!(
                "{{protocol: file, serialization: {ser}, path: {}}}",
                base.join(name).display()
            )
        };
        write(
            "sovereign.yaml",
            &format!(
                "templates:\n  default:\n    - type: listeners\n      spec: {}\n    - type: routes\n      spec: {}\n\
                 template_context:\n  context:\n    route: {}\n  refresh: true\n  refresh_rate: 1\n",
                spec("listeners.yaml", "jinja2"),
                spec("routes.yaml", "jinja2"),
                spec("route.json", "json"),
            ),
        );
        write_atomically(base, "route.json", "{\"body\": \"v0\"}");
        let log = base.join("sovereign.log");
        let log_file =
            std::fs::File::create(&log).unwrap_or_else(|e| fail(&format!("create log: {e}")));
        let log_err = log_file
            .try_clone()
            .unwrap_or_else(|e| fail(&format!("dup log: {e}")));
        let child = Command::new(binary)
            .env(
                "SOVEREIGN_CONFIG",
                format!("file://{}", base.join("sovereign.yaml").display()),
            )
            .env("SOVEREIGN_HOST", "127.0.0.1")
            .env("SOVEREIGN_PORT", port.to_string())
            .env("SOVEREIGN_WORKERS", "1")
            .env("SOVEREIGN_ENABLE_ACCESS_LOGS", "false")
            .current_dir(base)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| {
                fail(&format!(
                    "start {}: {e}; {SOVEREIGN_HINT}",
                    binary.display()
                ))
            });
        Sovereign { child, log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until sovereign answers a routes discovery request.
    fn wait_ready(&mut self, port: u16) {
        let client = HttpClient::new();
        let url = format!("http://127.0.0.1:{port}/v3/discovery:routes");
        let body = br#"{"node": {"id": "sovereign-proxy", "cluster": "sovereign-proxy"}}"#;
        let headers = [("content-type", "application/json")];
        let start = Instant::now();
        loop {
            if client
                .request("POST", &url, &headers, Some(body))
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                fail(&format!(
                    "sovereign exited during startup ({status}):\n{}",
                    self.log_tail()
                ));
            }
            if start.elapsed() > STARTUP {
                fail(&format!(
                    "sovereign did not answer within {STARTUP:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sovereign {
    fn drop(&mut self) {
        // gunicorn: the master stops its worker on SIGTERM. Remember the worker too, in case
        // the master has to be killed.
        let pid = self.child.id();
        let workers =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in workers.split_whitespace() {
            if Path::new(&format!("/proc/{worker}")).exists() {
                let _ = Command::new("kill").args(["-KILL", worker]).status();
            }
        }
    }
}

fn sovereign_bootstrap(port: u16, refresh_delay: &str) -> String {
    format!(
        r#"node: {{id: sovereign-proxy, cluster: sovereign-proxy}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  lds_config:
    resource_api_version: V3
    initial_fetch_timeout: 0s
    api_config_source:
      api_type: REST
      transport_api_version: V3
      cluster_names: [sovereign]
      refresh_delay: {refresh_delay}
static_resources:
  clusters:
    - name: sovereign
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: sovereign
        endpoints:
          - lb_endpoints:
              - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

fn sovereign_series(
    binary: &Path,
    base: &Path,
    refresh_delay: &str,
    changes: usize,
) -> Vec<Duration> {
    let (port, listener_port) = (free_port(), free_port());
    let mut sovereign = Sovereign::start(binary, base, port, listener_port, refresh_delay);
    sovereign.wait_ready(port);
    let envoy = Envoy::start(&sovereign_bootstrap(port, refresh_delay), "sovereign-proxy");
    envoy.wait_ready(STARTUP);
    let url = format!("http://127.0.0.1:{listener_port}/");
    wait_for_body(&HttpClient::new(), &url, &[], "v0", Instant::now(), STARTUP);
    let samples = measure(changes, 1, &url, SOVEREIGN_CHANGE_TIMEOUT, |i| {
        write_atomically(base, "route.json", &format!("{{\"body\": \"v{i}\"}}"));
    });
    drop(envoy);
    drop(sovereign);
    samples
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_table(changes: usize, rows: &[Row]) {
    println!();
    println!("change → Envoy propagation, {changes} changes per series (ms)");
    println!(
        "| {:<36} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} |",
        "series", "min", "p50", "p90", "p99", "max", "mean"
    );
    println!(
        "|{:-<38}|{:->11}|{:->11}|{:->11}|{:->11}|{:->11}|{:->11}|",
        "", "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<36} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} |",
            r.name,
            ms(r.sorted[0]),
            ms(r.pct(50.0)),
            ms(r.pct(90.0)),
            ms(r.pct(99.0)),
            ms(r.pct(100.0)),
            ms(r.mean)
        );
    }
    let p50 = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.pct(50.0));
    if let (Some(v), Some(s100), Some(s1)) = (
        p50("vmesh delta, change → HTTP"),
        p50("sovereign, refresh_delay 100 ms"),
        p50("sovereign, refresh_delay 1 s"),
    ) {
        let ratio = |s: Duration| s.as_secs_f64() / v.as_secs_f64().max(1e-9);
        println!();
        println!(
            "p50 ratio sovereign / vmesh delta: {:.0}x (refresh_delay 100 ms), {:.0}x (1 s)",
            ratio(s100),
            ratio(s1)
        );
    }
}
