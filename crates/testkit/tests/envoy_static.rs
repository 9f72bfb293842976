//! Proves the harness against a real Envoy: a static bootstrap routes `/a` and `/b` to two echo
//! servers. Fails (never skips) with the install hint when Envoy is missing.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use vmesh_testkit::{
    assert_eventually, eventually, free_port, http_get, EchoServer, Envoy, HttpClient,
    SERVED_BY_HEADER,
};

fn static_bootstrap(listen_port: u16, a_port: u16, b_port: u16) -> String {
    let cluster = |name: &str, port: u16| {
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}"#
        )
    };
    format!(
        r#"
node: {{id: testkit-static, cluster: testkit}}
admin:
  # Port 0: Envoy picks one and the harness reads it from --admin-address-path.
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /a}}
                route: {{cluster: a}}
              - match: {{prefix: /b}}
                route: {{cluster: b}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{a}{b}
"#,
        a = cluster("a", a_port),
        b = cluster("b", b_port),
    )
}

fn service_of(url: &str) -> Result<String, String> {
    let resp = http_get(url, &[])?;
    if resp.status != 200 {
        return Err(format!("{url}: status {}: {}", resp.status, resp.body));
    }
    let v = resp.json()?;
    v["service"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{url}: no service field in {v}"))
}

#[test]
fn static_routes_through_real_envoy() {
    let a = EchoServer::start("svc-a");
    let b = EchoServer::start("svc-b");
    let port = free_port();
    let t0 = Instant::now();
    let envoy = Envoy::start(&static_bootstrap(port, a.port(), b.port()), "static");
    envoy.wait_ready(Duration::from_secs(20));
    eprintln!(
        "envoy ready after {:?} at {}",
        t0.elapsed(),
        envoy.admin_url()
    );

    let base = format!("http://127.0.0.1:{port}");
    // /ready is LIVE once the listener is serving, so the first request must already work.
    assert_eq!(service_of(&format!("{base}/a")).expect("GET /a"), "svc-a");
    assert_eq!(
        service_of(&format!("{base}/b/x?q=1")).expect("GET /b"),
        "svc-b"
    );

    let resp = http_get(&format!("{base}/a/deep/path?k=v"), &[("x-probe", "1")]).expect("GET");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header(SERVED_BY_HEADER), Some("svc-a"));
    let echo = resp.json().expect("json");
    assert_eq!(echo["path"], "/a/deep/path");
    assert_eq!(echo["query"], "k=v");
    assert_eq!(echo["headers"]["x-probe"], "1");
    assert!(
        echo["headers"]["x-request-id"].is_string(),
        "Envoy adds x-request-id: {echo}"
    );

    // No route: Envoy itself answers 404.
    let resp = http_get(&format!("{base}/c"), &[]).expect("GET /c");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header(SERVED_BY_HEADER), None);

    // A pooled client reuses connections to Envoy.
    let client = HttpClient::pooled();
    for i in 0..20 {
        let path = if i % 2 == 0 { "a" } else { "b" };
        let resp = client
            .get(&format!("{base}/{path}"), &[])
            .expect("pooled GET");
        assert_eq!(
            resp.header(SERVED_BY_HEADER),
            Some(format!("svc-{path}").as_str())
        );
    }
    assert_eq!(a.requests(), 12);
    assert_eq!(b.requests(), 11);

    // Stats and config dump from the admin API.
    let total = eventually(
        Duration::from_secs(5),
        "cluster.a.upstream_rq_total",
        || match envoy.stat("cluster.a.upstream_rq_total") {
            Some(n) if n >= 12 => Ok(n),
            other => Err(format!("stat is {other:?}")),
        },
    );
    assert_eq!(total, 12);
    assert_eq!(envoy.stat("cluster.a.no_such_stat"), None);
    assert_eventually!(
        Duration::from_secs(5),
        envoy.stat("http.ingress.downstream_rq_total") >= Some(24)
    );
    let dump = envoy.config_dump();
    let configs = dump["configs"].as_array().expect("configs");
    let listeners: Vec<&str> = configs
        .iter()
        .flat_map(|c| c["static_listeners"].as_array().into_iter().flatten())
        .filter_map(|l| l["listener"]["name"].as_str())
        .collect();
    assert_eq!(listeners, ["ingress"], "{dump}");
    let clusters: Vec<&str> = configs
        .iter()
        .flat_map(|c| c["static_clusters"].as_array().into_iter().flatten())
        .filter_map(|c| c["cluster"]["name"].as_str())
        .collect();
    assert_eq!(clusters, ["a", "b"], "{dump}");
    assert!(envoy.is_running());

    // Dropping the handle stops Envoy: its listener and admin port stop accepting at once.
    let admin = envoy.admin_addr();
    let log_dir = envoy.dir().to_owned();
    drop(envoy);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener still accepting after drop"
    );
    assert!(
        TcpStream::connect(admin).is_err(),
        "admin still accepting after drop"
    );
    assert!(!log_dir.exists(), "temp dir removed after a clean stop");
    assert!(http_get(&format!("{base}/a"), &[]).is_err());
}

#[test]
fn invalid_bootstrap_fails_fast_with_the_log() {
    // Unknown field: Envoy rejects the bootstrap before its admin listener is up.
    let bad = static_bootstrap(free_port(), free_port(), free_port()).replace(
        "stat_prefix: ingress",
        "stat_prefix: ingress\n          no_such_field: 1",
    );
    let msg = panic_message(|| drop(Envoy::start(&bad, "bad-field")));
    assert!(msg.contains("exited during startup"), "{msg}");
    assert!(
        msg.contains("no_such_field"),
        "the log tail names the problem: {msg}"
    );

    // Route to a cluster that does not exist: the admin listener comes up first, then Envoy
    // rejects the listener and exits; wait_ready notices instead of waiting out its timeout.
    let bad = static_bootstrap(free_port(), free_port(), free_port())
        .replace("cluster: b}", "cluster: nope}");
    let t0 = Instant::now();
    let msg = panic_message(|| Envoy::start(&bad, "bad-route").wait_ready(Duration::from_secs(30)));
    assert!(msg.contains("exited"), "{msg}");
    assert!(
        msg.contains("nope"),
        "the log tail names the problem: {msg}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

fn panic_message(f: impl FnOnce()) -> String {
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("must panic");
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

/// Re-runs the main test in a child process with a bogus VMESH_ENVOY and checks that it fails
/// (rather than skips) with the install hint.
#[test]
fn missing_envoy_fails_with_install_hint() {
    if std::env::var_os("VMESH_TESTKIT_CHILD").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "static_routes_through_real_envoy",
            "--test-threads=1",
        ])
        .env("VMESH_ENVOY", "/nonexistent/envoy")
        .env("VMESH_TESTKIT_CHILD", "1")
        .output()
        .expect("run test binary");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "must fail without Envoy:\n{all}");
    assert!(
        all.contains("scripts/setup-envoy"),
        "install hint missing:\n{all}"
    );
    assert!(all.contains("1 failed"), "{all}");
}

/// Runs itself in a child process that starts Envoy and then aborts without unwinding (as a
/// crashed or killed test would); Envoy must die with it rather than linger.
#[test]
fn envoy_dies_when_the_test_process_dies() {
    if std::env::var_os("VMESH_TESTKIT_ABORT_CHILD").is_some() {
        let envoy = Envoy::start(
            "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}",
            "orphan",
        );
        envoy.wait_ready(Duration::from_secs(20));
        println!("ENVOY_PID={}", envoy.pid());
        std::process::abort();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "envoy_dies_when_the_test_process_dies",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMESH_TESTKIT_ABORT_CHILD", "1")
        .output()
        .expect("run test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.split_once("ENVOY_PID=").map(|(_, p)| p))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "child did not start Envoy:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(!out.status.success(), "the child aborts");
    eventually(Duration::from_secs(5), "orphaned Envoy to die", || {
        // Gone, or a zombie waiting for init to reap it.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Ok(()),
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                Ok(())
            }
            Ok(stat) => Err(format!("envoy {pid} still alive: {stat}")),
        }
    });
}
