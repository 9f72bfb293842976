//! The controller's tasks are supervised: when one dies, the process exits non-zero with a log
//! line that names it, so Nomad or systemd restarts it rather than leaving a controller that
//! answers `/healthz` but no longer translates, serves or discovers. `VMESH_TEST_PANIC` makes the
//! named task panic where it does its work. And `/readyz` shows every component.

mod common;

use common::vm::RelayController;
use common::{gateway_doc, options, upstream_doc, Controller, DEADLINE};
use vmesh_testkit::consul::ConsulEmulator;
use vmesh_testkit::{free_port, http_get, TEST_PANIC_VAR};

#[track_caller]
fn assert_died(c: &mut Controller, task: &str) {
    let status = c.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(1), "{status}\n{}", c.log());
    let log = c.log();
    assert!(
        log.contains(&format!("critical task {task} panicked")),
        "the log names the task: {log}"
    );
    assert!(log.contains("so that its supervisor restarts it"), "{log}");
}

#[test]
fn a_dead_index_ends_the_controller() {
    let dir = vmesh_testkit::process::scratch_dir("e2e-supervision");
    std::fs::write(dir.join("a.yaml"), upstream_doc("a", 1)).unwrap();
    let mut c = Controller::launch(
        options()
            .args(["--config-dir", &dir.display().to_string()])
            .env(TEST_PANIC_VAR, "index"),
    );
    assert_died(&mut c, "index");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dead_discovery_task_ends_a_relay_controller() {
    let consul = ConsulEmulator::start();
    let relay_port = free_port();
    let data = vmesh_testkit::process::scratch_dir("e2e-supervision-data");
    let mut c = Controller::launch(
        options()
            .args([
                "--consul-addr",
                &consul.url(),
                "--relay-addr",
                &format!("127.0.0.1:{relay_port}"),
                "--data-dir",
                &data.display().to_string(),
            ])
            .env(TEST_PANIC_VAR, "discovery"),
    );
    assert_died(&mut c, "discovery");
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn readiness_shows_every_component() {
    let consul = ConsulEmulator::start();
    consul.kv_put(
        "vmesh/config/Gateway/edge",
        gateway_doc(free_port(), "gateway-proxy"),
    );
    let relay = RelayController::start(&consul, &["--discovery-warmup", "1s"]);
    vmesh_testkit::eventually(DEADLINE, "the controller to be ready", || {
        let r = http_get(&relay.controller.admin("/readyz"), &[])?;
        (r.status == 200).then_some(r.body.clone()).ok_or(r.body)
    });
    let body = http_get(&relay.controller.admin("/readyz"), &[])
        .unwrap()
        .body;
    for component in [
        "index: ready",
        "election: ready",
        "status: ready",
        "discovery: ready",
        "revocations: ready",
        "discovery-share: ready",
        "discovery-read: ready",
    ] {
        assert!(body.contains(component), "{component} in:\n{body}");
    }

    // Consul goes away: the controller keeps serving; its components say they are degraded.
    consul.stop();
    vmesh_testkit::eventually(DEADLINE, "readiness to say what is degraded", || {
        let r = http_get(&relay.controller.admin("/readyz"), &[])?;
        (r.status == 200 && r.body.contains("election: degraded"))
            .then_some(())
            .ok_or(r.body)
    });
}
