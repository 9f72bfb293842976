//! End to end with agents: a controller reading Consul KV with its relay on, "VMs" that are each
//! a local Consul agent (the test kit's emulator on its own loopback address) and a real
//! `vmesh-agent`, echo services on the VMs, and a real Envoy routing to them.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::vm::{create_token, route_to_consul_service, RelayController, Vm, WebVm};
use common::*;
use vmesh_testkit::consul::{CheckStatus, ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::{eventually, free_port};
use vmeshctl::bootstrap::Protocol;

const PROXY: &str = "gateway-proxy";

/// The routing config: every request to the Consul service `web`, passing instances only.
fn routing(consul: &ConsulEmulator, port: u16) {
    route_to_consul_service(consul, port, PROXY);
}

/// Which VMs served 30 requests in a row through Envoy.
fn serving(port: u16) -> Result<BTreeSet<String>, String> {
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let r = get(port, "/", &[])?;
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        seen.insert(served_by(&r));
    }
    Ok(seen)
}

#[track_caller]
fn wait_serving(port: u16, expected: &[&str]) {
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    eventually(
        DEADLINE,
        &format!("traffic to reach exactly {expected:?}"),
        || {
            let seen = serving(port)?;
            (seen == expected)
                .then_some(())
                .ok_or(format!("served by {seen:?}"))
        },
    );
}

/// Requests sent continuously through Envoy while a scenario runs, counting failures.
fn traffic(port: u16) -> Traffic {
    Traffic::start(Duration::from_millis(5), move || {
        match get(port, "/", &[]) {
            Ok(r) if r.status == 200 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    })
}

#[test]
fn three_vms_register_change_health_and_deregister_through_a_real_envoy() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    routing(&consul, port);
    let relay = RelayController::start(&consul, &[]);
    let token = create_token(&consul, Some(Duration::from_secs(3600)), Some(3), None);
    let mut vms: Vec<WebVm> = (1..=3).map(WebVm::new).collect();
    for web in &mut vms {
        web.vm.start_agent(&relay, &token, &[]);
    }
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_serving(port, &["web@vm-1", "web@vm-2", "web@vm-3"]);
    assert!(relay.metric("vmesh_relay_registrations_total", "") >= 3.0);

    // A failing health check takes the instance out of the rotation; passing brings it back.
    vms[1].set_health(CheckStatus::Critical);
    wait_serving(port, &["web@vm-1", "web@vm-3"]);
    vms[1].set_health(CheckStatus::Warning);
    wait_serving(port, &["web@vm-1", "web@vm-3"]);
    vms[1].set_health(CheckStatus::Passing);
    wait_serving(port, &["web@vm-1", "web@vm-2", "web@vm-3"]);

    // Deregistering the service removes it; registering it again adds it back.
    assert!(vms[2].vm.consul.deregister_service("web-1"));
    wait_serving(port, &["web@vm-1", "web@vm-2"]);
    vms[2]
        .vm
        .register(ServiceRegistration::new("web", vms[2].echo.port()).with_id("web-1"));
    wait_serving(port, &["web@vm-1", "web@vm-2", "web@vm-3"]);

    // A second instance on the same VM is another endpoint.
    let second = vms[0].vm.echo("web2@vm-1");
    vms[0]
        .vm
        .register(ServiceRegistration::new("web", second.port()).with_id("web-2"));
    wait_serving(port, &["web@vm-1", "web2@vm-1", "web@vm-2", "web@vm-3"]);
    assert_eq!(relay.metric("vmesh_relay_instances_refused_total", ""), 0.0);
}

#[test]
fn a_killed_agent_keeps_its_endpoints_through_the_grace_period_then_loses_them() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    routing(&consul, port);
    let grace = Duration::from_secs(4);
    let relay = RelayController::start(&consul, &["--discovery-grace", "4s"]);
    let token = create_token(&consul, None, None, None);
    let mut vms: Vec<WebVm> = (21..=22).map(WebVm::new).collect();
    for web in &mut vms {
        web.vm.start_agent(&relay, &token, &[]);
    }
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_serving(port, &["web@vm-21", "web@vm-22"]);

    vms[0].vm.kill_agent();
    let killed = Instant::now();
    eventually(DEADLINE, "the controller to see the agent go", || {
        (relay.metric("vmesh_relay_agents_connected", "") == 1.0)
            .then_some(())
            .ok_or("still 2 connected".to_string())
    });
    // Within the grace period the VM keeps receiving traffic (its service still runs).
    let seen = serving(port).unwrap();
    assert!(
        killed.elapsed() < grace,
        "the check ran too late to mean anything"
    );
    assert!(
        seen.contains("web@vm-21"),
        "endpoints kept through the grace period: {seen:?}"
    );
    // Then they go.
    wait_serving(port, &["web@vm-22"]);
    assert!(
        killed.elapsed() >= grace,
        "removed before the grace period ended"
    );
    assert!(relay.controller.log().contains("grace period ended"));

    // The agent comes back (with the certificate in its data dir, no token) and so does the VM.
    vms[0].vm.start_agent(&relay, "", &[]);
    wait_serving(port, &["web@vm-21", "web@vm-22"]);
}

#[test]
fn a_restarted_controller_resyncs_the_agents_and_envoy_never_loses_endpoints() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    routing(&consul, port);
    let mut relay = RelayController::start(&consul, &[]);
    let token = create_token(&consul, None, None, None);
    let mut vms: Vec<WebVm> = (31..=32).map(WebVm::new).collect();
    for web in &mut vms {
        web.vm.start_agent(&relay, &token, &[]);
    }
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_serving(port, &["web@vm-31", "web@vm-32"]);

    let traffic = traffic(port);
    traffic.wait_for(20);
    relay.controller.restart();
    eventually(DEADLINE, "both agents to reconnect", || {
        let n = relay.metric("vmesh_relay_agents_connected", "");
        (n == 2.0).then_some(()).ok_or(format!("{n} connected"))
    });
    // Discovery flows again after the restart: a new instance is routed.
    let extra = vms[1].vm.echo("web2@vm-32");
    vms[1]
        .vm
        .register(ServiceRegistration::new("web", extra.port()).with_id("web-2"));
    wait_serving(port, &["web@vm-31", "web@vm-32", "web2@vm-32"]);
    traffic.wait_for(20);
    let (ok, failures) = traffic.finish();
    assert!(
        ok >= 40,
        "traffic flowed before and after the restart ({ok} requests)"
    );
    assert!(
        failures.is_empty(),
        "requests failed while the controller restarted: {failures:?}"
    );
}

#[test]
fn certificate_renewal_drops_no_stream_and_no_request() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    routing(&consul, port);
    // Certificates live 6 s, so agents renew about every 3 s.
    let relay = RelayController::start(&consul, &["--agent-cert-ttl", "6s"]);
    let token = create_token(&consul, None, Some(1), None);
    let mut web = WebVm::new(41);
    web.vm.start_agent(&relay, &token, &[]);
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_serving(port, &["web@vm-41"]);

    let traffic = traffic(port);
    eventually(Duration::from_secs(30), "three renewals", || {
        let n = relay.metric("vmesh_relay_renewals_total", "");
        (n >= 3.0).then_some(()).ok_or(format!("{n} renewals"))
    });
    // Every stream was handed over before its certificate expired: the controller never had
    // to cut one off, and the agent never needed its (single-use, spent) token again.
    assert_eq!(
        relay.metric("vmesh_relay_refused_total", "certificate_expired"),
        0.0
    );
    assert_eq!(relay.metric("vmesh_relay_agents_connected", ""), 1.0);
    // Discovery still flows on the renewed stream.
    web.set_health(CheckStatus::Critical);
    eventually(DEADLINE, "the VM to leave the rotation", || {
        match get(port, "/", &[]) {
            Ok(r) if r.status == 503 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    });
    web.set_health(CheckStatus::Passing);
    wait_serving(port, &["web@vm-41"]);
    let (ok, failures) = traffic.finish();
    assert!(ok > 50, "{ok} requests");
    // Failures are only the requests sent while the VM's health was critical on purpose.
    assert!(
        failures.iter().all(|f| f == "Ok(503)"),
        "requests failed during renewals: {failures:?}"
    );
    assert_eq!(web.vm.agent_exit(), None, "the agent is still running");
}

#[test]
fn a_revoked_agent_is_cut_off_and_its_endpoints_go_at_once() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    routing(&consul, port);
    // A grace period far longer than the test: only revocation can remove the endpoints.
    let relay = RelayController::start(&consul, &["--discovery-grace", "1h"]);
    let token = create_token(&consul, None, None, None);
    let mut vm = Vm::new(95);
    let echo = vm.echo("web@vm-95");
    vm.register(ServiceRegistration::new("web", echo.port()));
    vm.start_agent(&relay, &token, &[]);
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_served_by(port, "/", &[], "web@vm-95");

    // `vmeshctl agent revoke vm-95`
    let vmeshctl =
        std::path::Path::new(env!("CARGO_BIN_EXE_vmesh-controller")).with_file_name("vmeshctl");
    let out = std::process::Command::new(&vmeshctl)
        .args(["agent", "revoke", "vm-95", "--consul-addr", &consul.url()])
        .output()
        .expect("run vmeshctl (build it with `cargo build -p vmeshctl`)");
    assert!(out.status.success(), "{out:?}");

    eventually(
        DEADLINE,
        "the revoked VM to leave the rotation",
        || match get(port, "/", &[]) {
            Ok(r) if r.status == 503 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| (r.status, served_by(&r))))),
        },
    );
    assert!(relay.metric("vmesh_relay_refused_total", "reason=\"revoked\"") >= 1.0);
    eventually(DEADLINE, "the agent to say it was revoked", || {
        vm.agent_log()
            .contains("revoked")
            .then_some(())
            .ok_or_else(|| "no word of it yet".to_string())
    });
    // Its reconnects are refused too, and its certificate cannot be renewed.
    assert_eq!(relay.metric("vmesh_relay_agents_connected", ""), 0.0);
    let log = relay.controller.log();
    assert!(log.contains("agent revoked"), "{log}");
    relay.assert_alive();
}

#[test]
fn replicas_share_discovery_and_keep_a_dead_replicas_agents_for_the_grace_period() {
    let consul = ConsulEmulator::start_with(ConsulOptions {
        session_ttl_min: Duration::from_secs(1),
        ..Default::default()
    });
    let port = free_port();
    routing(&consul, port);
    // Two replicas with one CA; the agent streams to A, the edge Envoy is served by B.
    let mut a = RelayController::start(&consul, &["--leader-ttl", "2s"]);
    let (ca_cert, ca_key) = (a.ca_file(), a.ca_key());
    let b = RelayController::start(
        &consul,
        &[
            "--leader-ttl",
            "2s",
            "--ca-cert",
            ca_cert.to_str().unwrap(),
            "--ca-key",
            ca_key.to_str().unwrap(),
        ],
    );
    let token = create_token(&consul, None, None, None);
    let mut web = WebVm::new(51);
    web.vm.start_agent(&a, &token, &[]);
    let _gateway = b.gateway(&consul, PROXY, Protocol::Delta);
    wait_serving(port, &["web@vm-51"]);

    // Changes reported to A reach B's proxies.
    web.set_health(CheckStatus::Critical);
    eventually(DEADLINE, "the VM to leave B's rotation", || {
        match get(port, "/", &[]) {
            Ok(r) if r.status == 503 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    });
    web.set_health(CheckStatus::Passing);
    wait_serving(port, &["web@vm-51"]);

    // A dies: its session expires and Consul deletes its record; B keeps the VM's endpoints
    // for the grace period (60 s) from then on.
    a.controller.kill();
    eventually(
        DEADLINE,
        "A's discovery record to be deleted with its session",
        || {
            let left = consul.kv_list("vmesh/discovery/").len();
            (left == 0).then_some(()).ok_or(format!("{left} records"))
        },
    );
    let seen = serving(port).unwrap();
    assert_eq!(
        seen,
        BTreeSet::from(["web@vm-51".to_string()]),
        "B still routes to the dead replica's agent"
    );
    b.assert_alive();
}

#[test]
fn a_restarting_local_consul_agent_or_vmesh_agent_loses_no_endpoint() {
    let consul = ConsulEmulator::start();
    let port = free_port();
    routing(&consul, port);
    let relay = RelayController::start(&consul, &[]);
    let token = create_token(&consul, None, Some(1), None);
    let mut web = WebVm::new(61);
    web.vm.start_agent(&relay, &token, &[]);
    let _gateway = relay.gateway(&consul, PROXY, Protocol::Delta);
    wait_serving(port, &["web@vm-61"]);

    // The VM's Consul agent goes down: the vmesh agent keeps reporting what it last read.
    let traffic = traffic(port);
    web.vm.consul.stop();
    eventually(
        DEADLINE,
        "the agent to notice its Consul agent is down",
        || {
            web.vm
                .agent_log()
                .contains("Consul agent")
                .then_some(())
                .ok_or_else(|| "nothing logged yet".to_string())
        },
    );
    traffic.wait_for(20);
    // While it is down, the vmesh agent restarts too: it reports its last discovery from the
    // data dir, with the certificate it holds (its token was single-use and is spent).
    web.vm.kill_agent();
    web.vm.start_agent(&relay, "", &[]);
    eventually(DEADLINE, "the restarted agent to reconnect", || {
        let n = relay.metric("vmesh_relay_agents_connected", "");
        (n == 1.0).then_some(()).ok_or(format!("{n} connected"))
    });
    traffic.wait_for(20);
    web.vm.consul.restart();
    // Changes flow again once the Consul agent is back.
    web.set_health(CheckStatus::Critical);
    eventually(DEADLINE, "the VM to leave the rotation", || {
        match get(port, "/", &[]) {
            Ok(r) if r.status == 503 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    });
    let (ok, failures) = traffic.finish();
    assert!(ok >= 40, "{ok} requests");
    assert!(
        failures.iter().all(|f| f == "Ok(503)"),
        "requests failed before the health check did: {failures:?}"
    );
}
