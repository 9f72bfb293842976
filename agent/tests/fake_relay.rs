#![allow(clippy::unwrap_used)]
//! The agent against the test kit's fake controller (the relay API over mTLS, a built-in CA):
//! registration, the discovery stream, the answer to proxy config, renewal at half-life without a
//! moment without a stream, a restart with the stored certificate, and a refused token. The real
//! controller's end-to-end tests live with the controller.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser as _;
use vmesh_agent::Args;
use vmesh_proto::v1::Health;
use vmesh_testkit::consul::{CheckStatus, ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::eventually;
use vmesh_testkit::relay::FakeController;

const DEADLINE: Duration = Duration::from_secs(20);

struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl RunningAgent {
    fn start(args: Args) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(vmesh_agent::run(args, async {
                    let _ = stopped.await;
                }))
        });
        RunningAgent {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmesh-agent-fake-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn args(
    controller: &FakeController,
    consul: &ConsulEmulator,
    dir: &std::path::Path,
    token: Option<&str>,
) -> Args {
    let mut argv = vec![
        "vmesh-agent".to_string(),
        "--relay-addr".into(),
        controller.addr.to_string(),
        "--ca-file".into(),
        controller.ca_file.display().to_string(),
        "--consul-addr".into(),
        consul.url(),
        "--data-dir".into(),
        dir.join("agent").display().to_string(),
        "--poll-interval".into(),
        "50ms".into(),
    ];
    if let Some(t) = token {
        argv.push("--token".into());
        argv.push(t.into());
    }
    Args::try_parse_from(argv).unwrap()
}

fn reported(fake: &FakeController) -> BTreeMap<String, (String, Health)> {
    fake.state()
        .discovery
        .instances()
        .map(|i| {
            (
                i.id.clone(),
                (i.address.clone(), Health::try_from(i.health).unwrap()),
            )
        })
        .collect()
}

#[test]
fn registers_reports_renews_without_a_gap_and_restarts_with_its_certificate() {
    let dir = scratch("main");
    let controller = FakeController::start(&dir, Duration::from_secs(4));
    let consul = ConsulEmulator::start_with(ConsulOptions {
        node_name: "vm-1".into(),
        node_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        ..Default::default()
    });
    consul.register_service(
        ServiceRegistration::new("web", 8080)
            .with_id("web-1")
            .with_ttl_check(Duration::from_secs(3600)),
    );
    let agent = RunningAgent::start(args(&controller, &consul, &dir, Some("good")));
    let fake = &controller;
    eventually(DEADLINE, "web-1 to be reported", || {
        let r = reported(fake);
        match r.get("web-1") {
            Some((addr, Health::Critical)) if addr == "127.0.0.1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(fake.state().registrations, 1);
    assert_eq!(fake.state().peers[0], IpAddr::V4(Ipv4Addr::LOCALHOST));
    let key_mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(dir.join("agent/agent.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);

    consul.set_check_status("service:web-1", CheckStatus::Passing);
    eventually(DEADLINE, "web-1 to pass", || {
        match reported(fake).get("web-1") {
            Some((_, Health::Passing)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    eventually(DEADLINE, "the proxy config to be answered", || {
        let acks = fake.state().config_acks.clone();
        match acks.first() {
            Some((p, v, e)) if p == "web-sidecar" && v == "v1" && e.contains("not supported") => {
                Ok(())
            }
            _ => Err(format!("{acks:?}")),
        }
    });

    // A 4 s certificate renews every ~2 s: two renewals, each a new stream replacing the old one.
    eventually(DEADLINE, "two renewals and their streams", || {
        let st = fake.state();
        if st.renewals >= 2 && st.streams_total >= 3 && st.open_streams == 1 {
            Ok(())
        } else {
            Err(format!(
                "renewals {} streams {} open {}",
                st.renewals, st.streams_total, st.open_streams
            ))
        }
    });
    assert!(!fake.state().gap, "there was a moment without a stream");
    // Discovery still flows on the renewed stream.
    assert!(consul.deregister_service("web-1"));
    eventually(DEADLINE, "web-1 to go", || {
        let r = reported(fake);
        if r.is_empty() {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    agent.stop().unwrap();

    // A restart without a token uses the stored certificate.
    consul.register_service(ServiceRegistration::new("api", 9090));
    let before = fake.state().streams_total;
    let agent = RunningAgent::start(args(&controller, &consul, &dir, None));
    eventually(DEADLINE, "api to be reported after the restart", || {
        let r = reported(fake);
        if r.contains_key("api") {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert!(fake.state().streams_total > before);
    assert_eq!(fake.state().registrations, 1, "no second registration");
    agent.stop().unwrap();
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_refused_token_stops_the_agent() {
    let dir = scratch("refused");
    let controller = FakeController::start(&dir, Duration::from_secs(3600));
    let consul = ConsulEmulator::start_with(ConsulOptions {
        node_name: "vm-2".into(),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(vmesh_agent::run(
            args(&controller, &consul, &dir, Some("bad")),
            std::future::pending::<()>(),
        ))
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("no uses left"), "{text}");
    assert!(!text.contains("bad"), "the token is never shown: {text}");
    // The agent's connection lives on `rt`: close it before the server's graceful shutdown.
    drop(rt);
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}
