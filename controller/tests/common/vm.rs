//! Test "VMs" for the relay: each is a Consul agent (the test kit's emulator, on its own
//! loopback address, with its own node name) and a real `vmesh-agent` process next to it, and a
//! controller with its relay listener on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use vmesh_testkit::consul::{ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::process::AgentProcess;
use vmesh_testkit::{eventually, free_port, EchoServer};

use super::{Controller, DEADLINE};

/// A controller reading Consul KV at `consul`, with its relay listening on a free port and its
/// built-in CA in its temporary directory.
pub struct RelayController {
    pub controller: Controller,
    pub relay_port: u16,
    /// The controller's `--data-dir` (its built-in CA is in `ca/`).
    data_dir: PathBuf,
}

impl RelayController {
    pub fn start(consul: &ConsulEmulator, extra: &[&str]) -> RelayController {
        let relay_port = free_port();
        let data_dir = std::env::temp_dir().join(format!(
            "vmesh-e2e-relay-{}-{relay_port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        let relay_addr = format!("127.0.0.1:{relay_port}");
        let data = data_dir.display().to_string();
        let mut args = vec![
            "--relay-addr",
            relay_addr.as_str(),
            "--data-dir",
            data.as_str(),
            "--trust-domain",
            "vmesh",
        ];
        args.extend_from_slice(extra);
        let controller = Controller::consul_unready(&consul.url(), &args);
        // Ready means config and discovery are served; with no agents registered the warm-up
        // may still run, so wait for the relay's certificate instead.
        let r = RelayController {
            controller,
            relay_port,
            data_dir,
        };
        // The CA is loaded (or created) before the relay listens.
        eventually(DEADLINE, "the relay to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", relay_port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        r
    }

    /// The built-in CA's key (for other replicas' `--ca-key`).
    pub fn ca_key(&self) -> PathBuf {
        self.ca_file().with_file_name("ca.key")
    }

    /// The built-in CA's certificate: what an operator hands to agents as `--ca-file`.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca").join("ca.pem")
    }

    pub fn relay_addr(&self) -> String {
        format!("127.0.0.1:{}", self.relay_port)
    }

    /// Asserts that the controller still answers (no refusal may take it down).
    #[track_caller]
    pub fn assert_alive(&self) {
        let r = vmesh_testkit::http_get(&self.controller.admin("/healthz"), &[])
            .expect("the controller answers");
        assert_eq!(r.status, 200, "the controller keeps running");
    }

    /// The value of one metric line (summed over label sets matching `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        self.controller.metric(name, labels).unwrap_or_default()
    }
}

impl Drop for RelayController {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// The routing config of the relay scenarios, in Consul KV: a gateway on `proxy` listening on
/// `port`, and every request to the Consul service `web` (passing instances only).
pub fn route_to_consul_service(consul: &ConsulEmulator, port: u16, proxy: &str) {
    let put =
        |what: &str, text: &str| consul.kv_put(&format!("vmesh/config/{what}"), text.as_bytes());
    put("Gateway/edge", &super::gateway_doc(port, proxy));
    put(
        "Upstream/web",
        "kind: Upstream\nname: web\nspec:\n  consul:\n    service: web\n",
    );
    put(
        "VirtualService/web",
        "kind: VirtualService\nname: web\nspec:\n  domains: [\"*\"]\n  routes:\n    - upstream: web\n",
    );
}

/// Creates a bootstrap token in Consul KV, as `vmeshctl token create` does. Returns the secret.
pub fn create_token(
    consul: &ConsulEmulator,
    ttl: Option<Duration>,
    uses: Option<u32>,
    node: Option<&str>,
) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = vmesh_consul::Client::new(
        &vmesh_consul::ConsulConfig::from_env(vmesh_consul::ConsulEnv {
            http_addr: Some(consul.url()),
            ..Default::default()
        })
        .expect("consul config"),
    )
    .expect("consul client");
    let registry = vmesh_registry::Registry::new(client, "vmesh");
    let (_, secret) = runtime
        .block_on(registry.create_token(ttl, uses, node.map(str::to_owned), SystemTime::now()))
        .expect("create token");
    secret.expose().to_owned()
}

/// One VM: its own loopback address, a local Consul agent, and (when started) a `vmesh-agent`.
pub struct Vm {
    pub name: String,
    pub ip: IpAddr,
    pub consul: ConsulEmulator,
    agent: Option<AgentProcess>,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Vm {
    /// VM number `n` (1–200): node `vm-<n>` at `127.0.0.<10 + n>`.
    pub fn new(n: u8) -> Vm {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n));
        let name = format!("vm-{n}");
        let consul = ConsulEmulator::start_with(ConsulOptions {
            node_name: name.clone(),
            node_address: ip,
            ..Default::default()
        });
        let data_dir = std::env::temp_dir().join(format!(
            "vmesh-e2e-vm-{}-{n}-{}",
            std::process::id(),
            consul.port()
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).expect("vm dir");
        let log = data_dir.join("agent.log");
        Vm {
            name,
            ip,
            consul,
            agent: None,
            data_dir: data_dir.join("agent"),
            log,
        }
    }

    /// An echo server on this VM's address.
    pub fn echo(&self, name: &str) -> EchoServer {
        let listener = TcpListener::bind(SocketAddr::new(self.ip, 0)).expect("bind on the VM");
        EchoServer::start_on(listener, name)
    }

    /// Registers a service instance with the VM's Consul agent; returns its id.
    pub fn register(&self, registration: ServiceRegistration) -> String {
        self.consul.register_service(registration)
    }

    /// Starts `vmesh-agent` with `token` (empty: none, it must already hold a certificate).
    pub fn start_agent(&mut self, relay: &RelayController, token: &str, extra: &[&str]) {
        self.start_agent_at(&relay.relay_addr(), &relay.ca_file(), token, extra);
    }

    pub fn start_agent_at(
        &mut self,
        relay_addr: &str,
        ca_file: &Path,
        token: &str,
        extra: &[&str],
    ) {
        assert!(
            self.agent.is_none(),
            "the agent of {} already runs",
            self.name
        );
        let mut args: Vec<String> = [
            "--relay-addr",
            relay_addr,
            "--ca-file",
            &ca_file.display().to_string(),
            "--data-dir",
            &self.data_dir.display().to_string(),
            "--consul-addr",
            &self.consul.url(),
            "--poll-interval",
            "100ms",
            "--log",
            "info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = if token.is_empty() {
            Vec::new()
        } else {
            vec![("VMESH_AGENT_TOKEN".into(), token.into())]
        };
        self.agent = Some(AgentProcess::start(
            &agent_binary(),
            &self.name,
            &args,
            &env,
            &self.log,
        ));
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().and_then(AgentProcess::pid)
    }

    /// Whether the agent process has exited, and with which code.
    pub fn agent_exit(&mut self) -> Option<Option<i32>> {
        self.agent.as_mut()?.try_exit().map(|s| s.code())
    }

    /// Waits until the agent exits on its own; its exit code.
    pub fn wait_agent_exit(&mut self) -> Option<i32> {
        self.agent
            .as_mut()
            .expect("the agent runs")
            .wait_exit(DEADLINE)
            .code()
    }

    /// Kills the agent (SIGKILL), as a crash or a VM power-off would.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The agent process prints its log's tail if a test panics.
        self.kill_agent();
        if !std::thread::panicking() {
            if let Some(parent) = self.data_dir.parent() {
                let _ = std::fs::remove_dir_all(parent);
            }
        }
    }
}

/// The `vmesh-agent` binary, built from the current sources (never a stale one).
pub fn agent_binary() -> PathBuf {
    vmesh_testkit::workspace_binary(
        "vmesh-agent",
        "vmesh-agent",
        vmesh_testkit::current_profile(),
    )
}
