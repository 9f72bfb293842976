//! Test "VMs" for the relay: each is a Consul agent (the test kit's emulator, on its own
//! loopback address, with its own node name) and a real `vmesh-agent` process next to it, and a
//! controller with its relay listener on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tonic::transport::Channel;
use vmesh_proto::v1::registration_client::RegistrationClient;
use vmesh_proto::v1::RegisterRequest;
use vmesh_testkit::consul::{CheckStatus, ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::process::AgentProcess;
use vmesh_testkit::{eventually, free_port, EchoServer, Envoy};
use vmeshctl::bootstrap::{render, BootstrapArgs, Protocol};

use super::{Controller, DEADLINE};

/// A controller reading Consul KV at `consul`, with its relay listening on a free port and its
/// built-in CA in its temporary directory.
pub struct RelayController {
    pub controller: Controller,
    pub relay_port: u16,
    /// The controller's `--data-dir` (its built-in CA is in `ca/`).
    data_dir: PathBuf,
    /// Its CA certificate: `--ca-cert` if given, else the built-in CA's.
    ca_cert: PathBuf,
}

impl RelayController {
    pub fn start(consul: &ConsulEmulator, extra: &[&str]) -> RelayController {
        Self::start_with_ca_file(consul, extra, None)
    }

    /// [`RelayController::start`] with a CA that is neither built in nor `--ca-cert` (Vault
    /// PKI): `ca_file` is its certificate, what agents are given.
    pub fn start_with_ca_file(
        consul: &ConsulEmulator,
        extra: &[&str],
        ca_file: Option<PathBuf>,
    ) -> RelayController {
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
        let ca_cert = ca_file.unwrap_or_else(|| {
            extra
                .iter()
                .position(|a| *a == "--ca-cert")
                .and_then(|i| extra.get(i + 1))
                .map_or_else(|| data_dir.join("ca").join("ca.pem"), PathBuf::from)
        });
        let r = RelayController {
            controller,
            relay_port,
            data_dir,
            ca_cert,
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
        self.data_dir.join("ca").join("ca.key")
    }

    /// The built-in CA's certificate: what an operator hands to agents as `--ca-file`.
    pub fn ca_file(&self) -> PathBuf {
        self.ca_cert.clone()
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

    /// Starts an edge gateway for `proxy`, as an operator would: a token for it, `vmesh-agent
    /// --gateway <proxy> --once` to get the certificate before Envoy starts, the same agent left
    /// running to renew it, and Envoy bootstrapped with `--xds-cert-dir`. Waits until Envoy is
    /// ready (it has its config).
    pub fn gateway(&self, consul: &ConsulEmulator, proxy: &str, protocol: Protocol) -> Gateway {
        self.gateway_with(consul, proxy, protocol, &[])
    }

    /// [`RelayController::gateway`] with extra arguments for the gateway's agent.
    pub fn gateway_with(
        &self,
        consul: &ConsulEmulator,
        proxy: &str,
        protocol: Protocol,
        extra: &[&str],
    ) -> Gateway {
        let token = create_gateway_token(consul, proxy);
        let dir = vmesh_testkit::process::scratch_dir(&format!("gateway-{proxy}"));
        let data = dir.join("certs");
        let mut args: Vec<String> = [
            "--gateway",
            proxy,
            "--datacenter",
            "dc1",
            "--relay-addr",
            &self.relay_addr(),
            "--ca-file",
            &self.ca_file().display().to_string(),
            "--data-dir",
            &data.display().to_string(),
            "--log",
            "info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = vec![("VMESH_AGENT_TOKEN".to_string(), token)];
        let log = dir.join("agent.log");
        let mut once_args = args.clone();
        once_args.push("--once".into());
        let mut once = AgentProcess::start(&agent_binary(), proxy, &once_args, &env, &log);
        let status = once.wait_exit(DEADLINE);
        assert!(
            status.success(),
            "vmesh-agent --gateway --once failed ({status}):\n{}",
            once.log()
        );
        let agent = AgentProcess::start(&agent_binary(), proxy, &args, &env, &log);
        let bootstrap = render(&BootstrapArgs {
            protocol,
            admin_port: 0,
            xds_cert_dir: Some(data.clone()),
            ..BootstrapArgs::new(proxy.to_string(), self.controller.xds_addr())
        })
        .expect("bootstrap");
        let envoy = Envoy::start(&bootstrap, proxy);
        envoy.wait_ready(DEADLINE);
        Gateway { envoy, agent, dir }
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

/// A client certificate chain and key, PEM.
pub struct ClientCert {
    pub chain_pem: String,
    pub key_pem: String,
}

/// A TLS channel to `addr` (the relay or the xDS port of `relay`'s controller) from `bind`,
/// trusting the controller's CA, with `cert` if given.
pub async fn tls_channel(
    relay: &RelayController,
    addr: &str,
    cert: Option<&ClientCert>,
    bind: IpAddr,
) -> Result<Channel, String> {
    let ca = std::fs::read_to_string(relay.ca_file()).expect("the CA certificate");
    let identity = cert.map(|c| (c.chain_pem.as_str(), c.key_pem.as_str()));
    vmesh_testkit::relay::tls_channel(addr, &ca, identity, bind).await
}

/// Registers with `token` from `bind`, as the agent of `node` would (or, with `gateway`, as that
/// gateway's `vmesh-agent --gateway`). Returns the certificate or the gRPC status.
pub async fn register(
    relay: &RelayController,
    token: &str,
    node: &str,
    gateway: Option<&str>,
    bind: IpAddr,
) -> Result<ClientCert, tonic::Status> {
    let (key, csr) = vmesh_tls::new_key_and_csr().expect("a key");
    let channel = tls_channel(relay, &relay.relay_addr(), None, bind)
        .await
        .expect("a connection to the relay");
    let response = RegistrationClient::new(channel)
        .register(RegisterRequest {
            token: token.to_owned(),
            node: node.to_owned(),
            datacenter: "dc1".to_owned(),
            csr_der: csr,
            gateway: gateway.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    let issued = response.certificate.expect("a certificate");
    Ok(ClientCert {
        chain_pem: vmesh_tls::certificates_to_pem(
            issued.certificate_chain_der.iter().map(Vec::as_slice),
        ),
        key_pem: key.expose().to_owned(),
    })
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

/// The registry in `consul` (as vmeshctl reaches it), and a runtime to drive it.
fn registry(consul: &ConsulEmulator) -> (tokio::runtime::Runtime, vmesh_registry::Registry) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = runtime.block_on(async {
        vmesh_consul::Client::new(
            &vmesh_consul::ConsulConfig::from_env(vmesh_consul::ConsulEnv {
                http_addr: Some(consul.url()),
                ..Default::default()
            })
            .expect("consul config"),
        )
        .expect("consul client")
    });
    (runtime, vmesh_registry::Registry::new(client, "vmesh"))
}

/// Creates a bootstrap token in Consul KV, as `vmeshctl token create` does. Returns the secret.
pub fn create_token(
    consul: &ConsulEmulator,
    ttl: Option<Duration>,
    uses: Option<u32>,
    node: Option<&str>,
) -> String {
    let (runtime, registry) = registry(consul);
    let (_, secret) = runtime
        .block_on(registry.create_token(ttl, uses, node.map(str::to_owned), SystemTime::now()))
        .expect("create token");
    secret.expose().to_owned()
}

/// Creates a token for the gateway `proxy`, as `vmeshctl token create --gateway` does.
pub fn create_gateway_token(consul: &ConsulEmulator, proxy: &str) -> String {
    let (runtime, registry) = registry(consul);
    let (_, secret) = runtime
        .block_on(registry.create_gateway_token(None, None, proxy.to_owned(), SystemTime::now()))
        .expect("create a gateway token");
    secret.expose().to_owned()
}

/// An edge gateway that takes its config from the controller's xDS port over mutual TLS: its
/// `vmesh-agent --gateway`, which keeps (and renews) the certificate, and its Envoy,
/// bootstrapped with `vmeshctl bootstrap --xds-cert-dir`.
pub struct Gateway {
    pub envoy: Envoy,
    pub agent: AgentProcess,
    /// The agent's data dir (the certificate and the SDS files).
    pub dir: PathBuf,
}

impl Gateway {
    pub fn agent_log(&self) -> String {
        self.agent.log()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.agent.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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

/// A VM running `web` (an echo server named `web@<vm>`) registered with a passing TTL check.
pub struct WebVm {
    pub vm: Vm,
    pub echo: EchoServer,
}

impl WebVm {
    pub fn new(n: u8) -> WebVm {
        let vm = Vm::new(n);
        let echo = vm.echo(&format!("web@vm-{n}"));
        vm.register(
            ServiceRegistration::new("web", echo.port())
                .with_id("web-1")
                .with_ttl_check(Duration::from_secs(3600)),
        );
        vm.consul
            .set_check_status("service:web-1", CheckStatus::Passing);
        WebVm { vm, echo }
    }

    pub fn set_health(&self, status: CheckStatus) {
        assert!(self.vm.consul.set_check_status("service:web-1", status));
    }
}
