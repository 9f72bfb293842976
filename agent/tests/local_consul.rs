#![allow(clippy::unwrap_used)]
//! The local reader against the Consul emulator, and `run` up to the point where it needs a
//! controller.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser as _;
use vmesh_agent::{Args, LocalReader};
use vmesh_consul::{Client, ConsulConfig, ConsulEnv};
use vmesh_proto::v1::{Health, ServiceInstance};
use vmesh_testkit::consul::{CheckStatus, ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::eventually;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn emulator() -> ConsulEmulator {
    ConsulEmulator::start_with(ConsulOptions {
        node_name: "vm-1".into(),
        node_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        ..Default::default()
    })
}

fn client(consul: &ConsulEmulator) -> Client {
    Client::new(
        &ConsulConfig::from_env(ConsulEnv {
            http_addr: Some(consul.url()),
            ..Default::default()
        })
        .unwrap(),
    )
    .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmesh-agent-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn health(instances: &[ServiceInstance], id: &str) -> Health {
    let i = instances.iter().find(|i| i.id == id).unwrap();
    Health::try_from(i.health).unwrap()
}

#[test]
fn the_reader_follows_the_local_agent() {
    let consul = emulator();
    let client = client(&consul);
    let rt = runtime();
    let me = rt.block_on(client.agent_self()).unwrap();
    assert_eq!(me.node_name, "vm-1");
    assert_eq!(me.datacenter, "dc1");
    assert_eq!(me.address, "127.0.0.1");

    consul.register_service(
        ServiceRegistration::new("web", 8080)
            .with_id("web-1")
            .with_ttl_check(Duration::from_secs(3600)),
    );
    consul.register_service(
        ServiceRegistration::new("api", 9090)
            .with_id("api-1")
            .with_address("10.0.0.9")
            .with_tags(&["v2"])
            .with_meta("zone", "b"),
    );
    let mut reader = LocalReader::new(client.clone(), me.address.clone());
    let instances = rt.block_on(reader.poll()).unwrap().unwrap();
    assert_eq!(
        instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["api-1", "web-1"]
    );
    let api = &instances[0];
    assert_eq!(api.service, "api");
    assert_eq!(api.address, "10.0.0.9");
    assert_eq!(api.port, 9090);
    assert_eq!(api.tags, ["v2"]);
    assert_eq!(api.meta["zone"], "b");
    assert_eq!(health(&instances, "api-1"), Health::Passing, "no checks");
    let web = &instances[1];
    assert_eq!(web.address, "127.0.0.1", "the node's address");
    assert_eq!(
        health(&instances, "web-1"),
        Health::Critical,
        "TTL checks start critical"
    );

    // Nothing changed: nothing to parse.
    assert_eq!(rt.block_on(reader.poll()).unwrap(), None);

    consul.set_check_status("service:web-1", CheckStatus::Passing);
    let instances = rt.block_on(reader.poll()).unwrap().unwrap();
    assert_eq!(health(&instances, "web-1"), Health::Passing);
    consul.set_check_status("service:web-1", CheckStatus::Warning);
    let instances = rt.block_on(reader.poll()).unwrap().unwrap();
    assert_eq!(health(&instances, "web-1"), Health::Warning);

    assert!(consul.deregister_service("api-1"));
    let instances = rt.block_on(reader.read()).unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].id, "web-1");

    // The local agent goes away: errors, and the last read is kept.
    consul.stop();
    assert!(rt.block_on(reader.poll()).is_err());
    assert_eq!(reader.last().unwrap().len(), 1);
    consul.restart();
    let again = eventually(Duration::from_secs(10), "the emulator to answer", || {
        rt.block_on(reader.read()).map_err(|e| e.to_string())
    });
    assert_eq!(again, instances);
}

#[test]
fn run_without_a_token_or_certificate_fails() {
    let consul = emulator();
    let data_dir = scratch("no-token");
    let addr = consul.url();
    let args = Args::try_parse_from([
        "vmesh-agent",
        "--relay-addr",
        "127.0.0.1:1",
        "--consul-addr",
        addr.as_str(),
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])
    .unwrap();
    let rt = runtime();
    let err = rt
        .block_on(vmesh_agent::run(args, std::future::pending::<()>()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("no bootstrap token"), "{err:#}");
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn run_retries_registration_until_shutdown() {
    let consul = emulator();
    let data_dir = scratch("retry");
    let ca = vmesh_tls::BuiltinCa::load_or_create(&data_dir.join("ca"), "vmesh").unwrap();
    drop(ca);
    let ca_file = std::fs::read_dir(data_dir.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pem"))
        .unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = consul.url();
    let agent_dir = data_dir.join("agent");
    let args = Args::try_parse_from([
        "vmesh-agent",
        "--relay-addr",
        &format!("127.0.0.1:{port}"),
        "--token",
        "not-a-real-token",
        "--ca-file",
        ca_file.to_str().unwrap(),
        "--consul-addr",
        addr.as_str(),
        "--data-dir",
        agent_dir.to_str().unwrap(),
    ])
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = std::thread::spawn(move || {
        runtime().block_on(vmesh_agent::run(args, async {
            let _ = stop_rx.await;
        }))
    });
    // It read the local agent (agent/self) and keeps retrying the controller.
    eventually(
        Duration::from_secs(10),
        "the agent to read /v1/agent/self",
        || {
            if consul.requests() >= 1 {
                Ok(())
            } else {
                Err(format!("{} requests", consul.requests()))
            }
        },
    );
    assert!(!handle.is_finished());
    assert!(std::fs::metadata(&agent_dir).unwrap().is_dir());
    stop_tx.send(()).unwrap();
    handle.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}
