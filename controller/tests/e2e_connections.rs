//! Connections that never speak, against a running controller and a real Envoy: a client that
//! only opens connections must not take the xDS or admin port (or the process's file
//! descriptors) away from the proxies. See `docs/limits.md`, "Ports".

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read as _};
use std::net::TcpStream;

use common::*;
use vmesh_testkit::{eventually, free_port, EchoServer};
use vmeshctl::bootstrap::Protocol;

/// Connections the scenario's client holds open: more than the usual soft limit of 1,024 open
/// files, which the controller raises for itself at start.
const IDLE: usize = 2_000;

/// Sets this process's soft limit on open files (the controller inherits it).
fn set_open_file_limit(soft: u64) {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(
        hard >= soft,
        "this test needs {soft} open files and the hard limit allows {hard}: raise it (ulimit -Hn)"
    );
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
}

/// Opens `n` TCP connections to `addr` that send nothing.
fn idle_connections(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect()
}

/// How many of `conns` the other end has not closed.
fn still_open(conns: &mut [TcpStream]) -> usize {
    let mut buf = [0u8; 64];
    conns
        .iter_mut()
        .filter(|s| matches!((&**s).read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock))
        .count()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn web(upstream: &str) -> String {
    format!("kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: {upstream}\n")
}

fn gateway(name: &str, port: u16, proxy: &str) -> String {
    format!("kind: Gateway\nname: {name}\nspec:\n  bindPort: {port}\n  proxyNames: [{proxy}]\n")
}

#[test]
fn two_thousand_idle_connections_change_nothing_for_a_connected_envoy() {
    let (v1, v2) = (EchoServer::start("v1"), EchoServer::start("v2"));
    let (port, late_port) = (free_port(), free_port());
    // The controller starts with the soft limit of a stock Linux machine (1,024 open files) ...
    set_open_file_limit(1024);
    let mut c = Controller::start_with(
        &[
            ("gateway.yaml", &gateway("edge", port, "edge-proxy")),
            ("late.yaml", &gateway("late", late_port, "late-proxy")),
            ("v1.yaml", &upstream_doc("v1", v1.port())),
            ("v2.yaml", &upstream_doc("v2", v2.port())),
            ("web.yaml", &web("v1")),
        ],
        // Long enough that every idle connection is still open while the scenario runs.
        &["--first-bytes-timeout", "5m"],
    );
    set_open_file_limit((IDLE + 1024) as u64);
    // ... and says that it raised it.
    assert!(
        c.log().contains("raised the soft limit on open files"),
        "{}",
        c.log()
    );
    let _envoy = c.envoy("edge-proxy", Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");
    let baseline = open_files(c.pid());

    let idle = idle_connections(&c.xds_addr(), IDLE);
    // (A few of the baseline's may close meanwhile: the test kit's kept-alive admin connection.)
    eventually(DEADLINE, "the idle connections to be accepted", || {
        let n = open_files(c.pid());
        (n + 8 >= baseline + IDLE)
            .then_some(())
            .ok_or(format!("{n} open files; {baseline} before"))
    });
    // While they are open: a change reaches the connected Envoy, a new Envoy gets its config,
    // the admin port answers, and the config directory is still read (a rescan that could not
    // open it would have emptied it).
    c.write("web.yaml", &web("v2"));
    wait_served_by(port, "/", &[], "v2");
    let _late = c.envoy("late-proxy", Protocol::Sotw);
    wait_served_by(late_port, "/", &[], "v2");
    assert!(c.is_ready(), "the admin port does not answer");
    let gateways = c.status()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "Gateway" && o["state"] == "Accepted")
        .count();
    assert_eq!(gateways, 2, "{}", c.status());

    // The descriptors come back when the clients go.
    drop(idle);
    eventually(
        DEADLINE,
        "the controller's descriptors to be given back",
        || {
            let n = open_files(c.pid());
            (n <= baseline + 16)
                .then_some(())
                .ok_or(format!("{n} open files; {baseline} before"))
        },
    );
    c.write("web.yaml", &web("v1"));
    wait_served_by(port, "/", &[], "v1");
    wait_served_by(late_port, "/", &[], "v1");
    assert_eq!(
        c.process.try_exit(),
        None,
        "the controller is still running"
    );
}

#[test]
fn silent_connections_are_closed_after_the_first_bytes_deadline() {
    let c = Controller::start_with(&[], &["--first-bytes-timeout", "2s"]);
    let mut xds = idle_connections(&c.xds_addr(), 100);
    // More than the admin port's cap of 64: the rest wait, then meet the same deadline.
    let admin_addr = c.admin("").trim_start_matches("http://").to_string();
    let mut admin = idle_connections(&admin_addr, 100);
    eventually(DEADLINE, "the silent connections to be closed", || {
        match still_open(&mut xds) + still_open(&mut admin) {
            0 => Ok(()),
            n => Err(format!("{n} still open")),
        }
    });
    assert!(c.is_ready(), "the admin port does not answer");
}

#[test]
fn at_the_connection_cap_a_new_envoy_gets_its_config_once_the_silent_ones_are_closed() {
    let v1 = EchoServer::start("v1");
    let port = free_port();
    let c = Controller::start_with(
        &[
            ("gateway.yaml", &gateway_doc(port, "edge-proxy")),
            ("v1.yaml", &upstream_doc("v1", v1.port())),
            ("web.yaml", &web("v1")),
        ],
        &["--xds-max-connections", "20", "--first-bytes-timeout", "2s"],
    );
    // Every place on the xDS port is taken by a client that says nothing ...
    let _idle = idle_connections(&c.xds_addr(), 20);
    eventually(
        DEADLINE,
        "the controller to say the xDS port is full",
        || {
            let log = c.log();
            log.contains("connection limit reached")
                .then_some(())
                .ok_or("not said".to_string())
        },
    );
    // ... so the Envoy that starts now waits in the kernel's queue, and is served once those
    // are closed.
    let _envoy = c.envoy("edge-proxy", Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");
}

#[test]
fn an_xds_request_over_the_message_limit_ends_only_its_own_stream() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    let (v1, v2) = (EchoServer::start("v1"), EchoServer::start("v2"));
    let port = free_port();
    let c = Controller::start_with(
        &[
            ("gateway.yaml", &gateway_doc(port, "edge-proxy")),
            ("v1.yaml", &upstream_doc("v1", v1.port())),
            ("v2.yaml", &upstream_doc("v2", v2.port())),
            ("web.yaml", &web("v1")),
        ],
        &["--max-message-bytes", "65536"],
    );
    let _envoy = c.envoy("edge-proxy", Protocol::Delta);
    wait_served_by(port, "/", &[], "v1");

    // A request naming 10,000 clusters is about 0.3 MiB: over this controller's 64 KiB limit.
    let request = DiscoveryRequest {
        node: Some(Node {
            id: "other-proxy".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        resource_names: (0..10_000).map(|i| format!("cluster-number-{i}")).collect(),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = runtime.block_on(async {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", c.xds_addr()))
                .await
                .unwrap();
        let mut responses = client
            .stream_aggregated_resources(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(DEADLINE, responses.message())
            .await
            .expect("no answer to the oversized request")
            .expect_err("the oversized request was answered")
    });
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");
    // The Envoy on its own stream is not affected.
    c.write("web.yaml", &web("v2"));
    wait_served_by(port, "/", &[], "v2");
}

#[test]
fn a_client_is_told_how_many_streams_it_may_open_on_one_connection() {
    let c = Controller::start_with(&[], &["--max-streams-per-connection", "5"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let advertised = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(c.xds_addr()).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        // The server's SETTINGS arrive right after the handshake.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut client = client.ready().await.unwrap();
        loop {
            let n = client.current_max_send_streams();
            if n != usize::MAX || tokio::time::Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            client = client.ready().await.unwrap();
        }
    });
    // Before the limit, one connection took 5,000 ADS streams (about 75 KiB each).
    assert_eq!(advertised, 5);
}
