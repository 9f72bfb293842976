//! Stand-ins for the two ends of the relay, speaking the real protocol over real mTLS:
//!
//! - [`FakeController`]: a small controller with the relay API and a built-in CA, which
//!   registers any agent with the token `good`, renews, answers discovery with the controller's
//!   own state machine, sends one `ProxyConfig`, and records what it saw ([`FakeState`]). Tests
//!   of `vmesh-agent` run against it.
//! - [`register_agent`] and [`SimulatedAgent`]: an agent without the binary, for loads of
//!   thousands: it registers with its own key and CSR from its own source address, streams a
//!   fixed set of instances with the agent's state machine, and reconnects with the agent's
//!   backoff. Benchmarks of the controller run many of them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use vmesh_proto::v1::registration_client::RegistrationClient;
use vmesh_proto::v1::registration_server::{Registration, RegistrationServer};
use vmesh_proto::v1::relay_client::RelayClient;
use vmesh_proto::v1::relay_server::{Relay, RelayServer};
use vmesh_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, IssuedCertificate,
    ProxyConfig, RegisterRequest, RegisterResponse, RenewRequest, RenewResponse, ServiceInstance,
};
use vmesh_relay::session::{RETRY_BASE, RETRY_CAP};
use vmesh_relay::{AgentDiscovery, ControllerDiscovery};
use vmesh_retry::Backoff;
use vmesh_tls::{BuiltinCa, CertificateAuthority, SpiffeId};

/// What the fake controller saw.
#[derive(Debug, Default)]
pub struct FakeState {
    pub registrations: u32,
    pub renewals: u32,
    pub open_streams: u32,
    pub streams_total: u32,
    /// After the first connect, whether the number of open streams ever fell to zero.
    pub gap: bool,
    /// The agent's discovery, as the controller's state machine holds it.
    pub discovery: ControllerDiscovery,
    /// (proxy, version, error) of every `ConfigAck`.
    pub config_acks: Vec<(String, String, String)>,
    /// Source addresses of the streams.
    pub peers: Vec<IpAddr>,
}

struct Fake {
    ca: BuiltinCa,
    ttl: Duration,
    state: Mutex<FakeState>,
}

impl Fake {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
                .map_or(0, |d| d.as_secs() as i64),
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
        // A sidecar config, which the agent refuses for now.
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

/// A fake controller on 127.0.0.1, served from its own thread and runtime; stops when dropped.
pub struct FakeController {
    fake: Arc<Fake>,
    pub addr: SocketAddr,
    /// The CA that signs its server certificate (the agent's `--ca-file`).
    pub ca_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeController {
    /// Starts it with its CA in `dir`, issuing agent certificates valid for `ttl`.
    pub fn start(dir: &Path, ttl: Duration) -> Self {
        let ca = BuiltinCa::load_or_create(&dir.join("ca"), "vmesh").expect("the fake's CA");
        let ca_file = dir.join("relay-ca.pem");
        std::fs::write(&ca_file, ca.trust_bundle_pem()).expect("write the CA file");
        let (key, csr) = vmesh_tls::new_key_and_csr().expect("a server key");
        let server = ca
            .sign_server(
                &csr,
                &[vmesh_tls::CONTROLLER_SERVER_NAME.to_string()],
                Duration::from_secs(3600),
            )
            .expect("a server certificate");
        let server_pem =
            vmesh_tls::certificates_to_pem(server.chain_der.iter().map(|d| d.as_slice()));
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(server_pem, key.expose()))
            .client_ca_root(Certificate::from_pem(ca.trust_bundle_pem()))
            .client_auth_optional(true);
        let fake = Arc::new(Fake {
            ca,
            ttl,
            state: Mutex::new(FakeState::default()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = Svc(fake.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // Stopping is not graceful (an agent still connected would hold it up): the
            // server future and then the runtime, with every connection, are dropped.
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let serve = Server::builder()
                    .tls_config(tls)
                    .expect("TLS config")
                    .add_service(RegistrationServer::new(svc.clone()))
                    .add_service(RelayServer::new(svc))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    served = serve => if let Err(e) = served {
                        eprintln!("the fake controller stopped: {e}");
                    },
                    _ = stopped => {}
                }
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

    /// What it saw so far.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.fake.lock()
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

fn client_tls(ca_pem: &str, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(vmesh_tls::CONTROLLER_SERVER_NAME);
    match identity {
        Some((chain, key)) => tls.identity(Identity::from_pem(chain, key)),
        None => tls,
    }
}

fn endpoint(relay_addr: &str, tls: ClientTlsConfig, bind: IpAddr) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("https://{relay_addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| format!("relay endpoint: {e}"))?
        .local_address(Some(bind))
        .connect_timeout(Duration::from_secs(5)))
}

/// A TLS connection to one of the controller's ports at `addr` (verified with `ca_pem`, for
/// the name `vmesh-controller`) from source address `bind`, presenting `identity` (chain and key
/// PEM) if given.
pub async fn tls_channel(
    addr: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    bind: IpAddr,
) -> Result<tonic::transport::Channel, String> {
    endpoint(addr, client_tls(ca_pem, identity), bind)?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

/// A connection to the relay at `relay_addr` without a client certificate: what registrations
/// are sent on.
pub async fn registration_channel(
    relay_addr: &str,
    ca_pem: &str,
    bind: IpAddr,
) -> Result<tonic::transport::Channel, String> {
    tls_channel(relay_addr, ca_pem, None, bind).await
}

/// Registers node `node` of `dc` with the controller's relay at `relay_addr` (verified with
/// `ca_pem`), from source address `bind`, with bootstrap `token`, for a key it generates. Returns
/// the endpoint to connect with, carrying the issued certificate.
pub async fn register_agent(
    relay_addr: &str,
    ca_pem: &str,
    token: &str,
    node: &str,
    dc: &str,
    bind: IpAddr,
) -> Result<Endpoint, String> {
    let (key, csr) = vmesh_tls::new_key_and_csr().map_err(|e| e.to_string())?;
    let channel = registration_channel(relay_addr, ca_pem, bind).await?;
    let issued = RegistrationClient::new(channel)
        .register(RegisterRequest {
            token: token.to_string(),
            node: node.to_string(),
            datacenter: dc.to_string(),
            csr_der: csr,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("register: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .certificate
        .ok_or("register: no certificate")?;
    let chain =
        vmesh_tls::certificates_to_pem(issued.certificate_chain_der.iter().map(Vec::as_slice));
    endpoint(
        relay_addr,
        client_tls(ca_pem, Some((&chain, key.expose()))),
        bind,
    )
}

/// What a simulated agent tells whoever runs it.
pub trait FleetObserver: Send + Sync + 'static {
    /// Agent `agent` is about to open a stream; the value is handed back when that stream's
    /// snapshot is acknowledged (e.g. which controller process it talks to).
    fn stream_starting(&self, _agent: usize) -> u64 {
        0
    }
    /// A stream is open.
    fn stream_opened(&self, _agent: usize) {}
    /// The controller acknowledged the snapshot of the stream that started with `token`.
    fn snapshot_acked(&self, _agent: usize, _token: u64) {}
    /// A connect or the stream's start failed.
    fn connect_failed(&self, _agent: usize) {}
}

/// One simulated agent: number `index`, its registered endpoint and the instances it reports.
pub struct SimulatedAgent {
    pub index: usize,
    pub endpoint: Endpoint,
    pub instances: Vec<ServiceInstance>,
}

impl SimulatedAgent {
    /// Connects and streams, and reconnects with the agent's backoff (200 ms doubling to 30 s,
    /// full jitter, reset by an acknowledged snapshot) whenever the stream ends; runs until its
    /// runtime stops.
    pub async fn run(self, observer: Arc<dyn FleetObserver>) {
        let mut discovery = AgentDiscovery::new("simulated");
        let _ = discovery.on_local(self.instances.clone());
        let mut backoff = Backoff::with_seed(RETRY_BASE, RETRY_CAP, self.index as u64 + 1);
        loop {
            let token = observer.stream_starting(self.index);
            match self.stream(&mut discovery, observer.as_ref(), token).await {
                Ok(true) => backoff.reset(),
                Ok(false) => {}
                Err(_) => observer.connect_failed(self.index),
            }
            discovery.on_disconnect();
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One stream: Hello + snapshot, then answers the controller until the stream ends. Returns
    /// whether the snapshot was acknowledged.
    async fn stream(
        &self,
        discovery: &mut AgentDiscovery,
        observer: &dyn FleetObserver,
        token: u64,
    ) -> Result<bool, String> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        for m in discovery.on_connect(BTreeMap::new()) {
            tx.send(m).await.map_err(|e| e.to_string())?;
        }
        let snapshot_seq = discovery.last_sent_seq();
        let mut inbound = RelayClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        observer.stream_opened(self.index);
        let mut acked = false;
        while let Ok(Some(message)) = inbound.message().await {
            for reply in discovery.on_controller(&message) {
                if tx.send(reply).await.is_err() {
                    return Ok(acked);
                }
            }
            if !acked && discovery.last_acked_seq() >= snapshot_seq {
                acked = true;
                observer.snapshot_acked(self.index, token);
            }
        }
        Ok(acked)
    }
}
