#![allow(clippy::unwrap_used)]
//! The agent against a small fake controller (a tonic server with the relay API and a built-in CA):
//! registration, the discovery stream, the answer to proxy config, renewal at half-life without a
//! moment without a stream, a restart with the stored certificate, and a refused token. The real
//! controller's end-to-end tests live with the controller.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use vmesh_agent::Args;
use vmesh_proto::relay::ControllerDiscovery;
use vmesh_proto::v1::registration_server::{Registration, RegistrationServer};
use vmesh_proto::v1::relay_server::{Relay, RelayServer};
use vmesh_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, Health, IssuedCertificate,
    ProxyConfig, RegisterRequest, RegisterResponse, RenewRequest, RenewResponse,
};
use vmesh_testkit::consul::{CheckStatus, ConsulEmulator, ConsulOptions, ServiceRegistration};
use vmesh_testkit::eventually;
use vmesh_tls::{BuiltinCa, CertificateAuthority, SpiffeId};

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct State {
    registrations: u32,
    renewals: u32,
    open_streams: u32,
    streams_total: u32,
    /// After the first connect, whether the number of open streams ever fell to zero.
    gap: bool,
    discovery: ControllerDiscovery,
    config_acks: Vec<(String, String, String)>,
    peers: Vec<IpAddr>,
}

struct Fake {
    ca: BuiltinCa,
    ttl: Duration,
    state: Mutex<State>,
}

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn issue(&self, csr: &[u8], id: &SpiffeId) -> Result<IssuedCertificate, Status> {
        let issued = self
            .ca
            .sign(csr, id, self.ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(IssuedCertificate {
            certificate_chain_der: issued.chain_der.clone(),
            trust_bundle_pem: self.ca.trust_bundle_pem().into_bytes(),
            spiffe_id: id.to_string(),
            not_after_unix: issued
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
        })
    }
}

fn peer_id<T>(request: &Request<T>) -> Result<SpiffeId, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    SpiffeId::from_certificate_der(leaf).map_err(|e| Status::unauthenticated(e.to_string()))
}

#[derive(Clone)]
struct Svc(Arc<Fake>);

#[tonic::async_trait]
impl Registration for Svc {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = request.get_ref();
        if r.token != "good" {
            return Err(Status::permission_denied(
                "bootstrap token t-1 has no uses left",
            ));
        }
        let id = SpiffeId::agent("vmesh", &r.datacenter, &r.node)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let certificate = self.0.issue(&r.csr_der, &id)?;
        self.0.lock().registrations += 1;
        Ok(Response::new(RegisterResponse {
            certificate: Some(certificate),
        }))
    }
}

type Out =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Relay for Svc {
    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let id = peer_id(&request)?;
        let certificate = self.0.issue(&request.get_ref().csr_der, &id)?;
        self.0.lock().renewals += 1;
        Ok(Response::new(RenewResponse {
            certificate: Some(certificate),
        }))
    }

    type ConnectStream = Out;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Out>, Status> {
        peer_id(&request)?;
        let peer = request.remote_addr().map(|a| a.ip());
        let fake = self.0.clone();
        {
            let mut st = fake.lock();
            st.open_streams += 1;
            st.streams_total += 1;
            st.peers.extend(peer);
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        // A sidecar config, which this agent refuses for now.
        let _ = tx
            .send(Ok(ControllerMessage {
                message: Some(controller_message::Message::ProxyConfig(ProxyConfig {
                    proxy: "web-sidecar".into(),
                    version: "v1".into(),
                    resources: vec![],
                })),
            }))
            .await;
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                let reply = {
                    let mut st = fake.lock();
                    if let Some(agent_message::Message::ConfigAck(a)) = &message.message {
                        st.config_acks
                            .push((a.proxy.clone(), a.version.clone(), a.error.clone()));
                    }
                    st.discovery.on_agent(&message).reply
                };
                if let Some(reply) = reply {
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                }
            }
            let mut st = fake.lock();
            st.open_streams -= 1;
            if st.open_streams == 0 {
                st.gap = true;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct FakeController {
    fake: Arc<Fake>,
    addr: SocketAddr,
    ca_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeController {
    fn start(dir: &std::path::Path, ttl: Duration) -> Self {
        let ca = BuiltinCa::load_or_create(&dir.join("ca"), "vmesh").unwrap();
        let ca_file = dir.join("relay-ca.pem");
        std::fs::write(&ca_file, ca.trust_bundle_pem()).unwrap();
        let (key, csr) = vmesh_tls::new_key_and_csr().unwrap();
        let server = ca
            .sign_server(
                &csr,
                &[vmesh_tls::CONTROLLER_SERVER_NAME.to_string()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let server_pem =
            vmesh_tls::certificates_to_pem(server.chain_der.iter().map(|d| d.as_slice()));
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(server_pem, key.expose()))
            .client_ca_root(Certificate::from_pem(ca.trust_bundle_pem()))
            .client_auth_optional(true);
        let fake = Arc::new(Fake {
            ca,
            ttl,
            state: Mutex::new(State::default()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = Svc(fake.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                Server::builder()
                    .tls_config(tls)
                    .unwrap()
                    .add_service(RegistrationServer::new(svc.clone()))
                    .add_service(RelayServer::new(svc))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        FakeController {
            fake,
            addr,
            ca_file,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

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

fn reported(fake: &Fake) -> BTreeMap<String, (String, Health)> {
    fake.lock()
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
    let fake = controller.fake.clone();
    eventually(DEADLINE, "web-1 to be reported", || {
        let r = reported(&fake);
        match r.get("web-1") {
            Some((addr, Health::Critical)) if addr == "127.0.0.1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(fake.lock().registrations, 1);
    assert_eq!(fake.lock().peers[0], IpAddr::V4(Ipv4Addr::LOCALHOST));
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
        match reported(&fake).get("web-1") {
            Some((_, Health::Passing)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    eventually(DEADLINE, "the proxy config to be answered", || {
        let acks = fake.lock().config_acks.clone();
        match acks.first() {
            Some((p, v, e)) if p == "web-sidecar" && v == "v1" && e.contains("not supported") => {
                Ok(())
            }
            _ => Err(format!("{acks:?}")),
        }
    });

    // A 4 s certificate renews every ~2 s: two renewals, each a new stream replacing the old one.
    eventually(DEADLINE, "two renewals and their streams", || {
        let st = fake.lock();
        if st.renewals >= 2 && st.streams_total >= 3 && st.open_streams == 1 {
            Ok(())
        } else {
            Err(format!(
                "renewals {} streams {} open {}",
                st.renewals, st.streams_total, st.open_streams
            ))
        }
    });
    assert!(!fake.lock().gap, "there was a moment without a stream");
    // Discovery still flows on the renewed stream.
    assert!(consul.deregister_service("web-1"));
    eventually(DEADLINE, "web-1 to go", || {
        let r = reported(&fake);
        if r.is_empty() {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    agent.stop().unwrap();

    // A restart without a token uses the stored certificate.
    consul.register_service(ServiceRegistration::new("api", 9090));
    let before = fake.lock().streams_total;
    let agent = RunningAgent::start(args(&controller, &consul, &dir, None));
    eventually(DEADLINE, "api to be reported after the restart", || {
        let r = reported(&fake);
        if r.contains_key("api") {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert!(fake.lock().streams_total > before);
    assert_eq!(fake.lock().registrations, 1, "no second registration");
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
