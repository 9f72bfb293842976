#![allow(clippy::unwrap_used)]
//! The agent's tasks are supervised: when one dies, the agent exits non-zero with a line that
//! names it, so Nomad or systemd restarts it (instead of an agent that stays up but no longer
//! reports or no longer talks to the controller). `VMESH_TEST_PANIC` makes the named task panic
//! where it does its work.

use std::time::Duration;

use vmesh_testkit::consul::{ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::process::{scratch_dir, AgentProcess};
use vmesh_testkit::relay::FakeController;
use vmesh_testkit::{eventually, TEST_PANIC_VAR};

const DEADLINE: Duration = Duration::from_secs(20);

fn start(task: &str) -> (AgentProcess, FakeController, ConsulEmulator) {
    let dir = scratch_dir(&format!("agent-supervision-{task}"));
    let controller = FakeController::start(&dir, Duration::from_secs(3600));
    let consul = ConsulEmulator::start_with(ConsulOptions {
        node_name: "vm-1".into(),
        ..Default::default()
    });
    consul.register_service(ServiceRegistration::new("web", 8080));
    let args: Vec<String> = [
        "--relay-addr",
        &controller.addr.to_string(),
        "--ca-file",
        &controller.ca_file.display().to_string(),
        "--consul-addr",
        &consul.url(),
        "--data-dir",
        &dir.join("agent").display().to_string(),
        "--poll-interval",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = [
        ("VMESH_AGENT_TOKEN".to_string(), "good".to_string()),
        (TEST_PANIC_VAR.to_string(), task.to_string()),
    ];
    let agent = AgentProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_vmesh-agent")),
        "vm-1",
        &args,
        &env,
        &dir.join("agent.log"),
    );
    (agent, controller, consul)
}

#[test]
fn a_dead_task_ends_the_agent_with_a_non_zero_exit_naming_it() {
    for task in ["discovery", "relay"] {
        let (mut agent, controller, _consul) = start(task);
        let status = agent.wait_exit(DEADLINE);
        assert_eq!(status.code(), Some(1), "{task}: {status}\n{}", agent.log());
        let log = agent.log();
        assert!(
            log.contains(&format!("critical task {task} panicked")),
            "{task}: {log}"
        );
        assert!(
            log.contains("so that its supervisor restarts it"),
            "{task}: {log}"
        );
        // It had registered: the process, not its state, was at fault.
        eventually(DEADLINE, "the registration", || {
            (controller.state().registrations == 1)
                .then_some(())
                .ok_or_else(|| "not registered".to_string())
        });
    }
}
