//! The relay client: registration with a bootstrap token, the mTLS `Relay.Connect` stream that
//! carries discovery (driven by [`AgentDiscovery`]), renewal at half-life with make-before-break,
//! and reconnects with backoff. Everything runs on one task: each turn of the loop waits for one
//! event (a poll tick, a controller message, a reconnect or renewal deadline) and handles it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, error, info, warn};
use vmesh_consul::Client;
use vmesh_proto::relay::AgentDiscovery;
use vmesh_proto::v1::registration_client::RegistrationClient;
use vmesh_proto::v1::relay_client::RelayClient;
use vmesh_proto::v1::{
    agent_message, controller_message, AgentMessage, ConfigAck, ControllerMessage,
    IssuedCertificate, RegisterRequest, RenewRequest, ResyncRequest, ServiceInstance,
};
use vmesh_tls::{certificate_not_after, certificates_to_pem, new_key_and_csr, PrivateKeyPem};

use crate::args::Args;
use crate::backoff::Backoff;
use crate::datadir::{system_to_unix, Credentials, DataDir, Identity};
use crate::discovery::LocalReader;
use crate::VERSION;

/// How long establishing a connection (TCP + TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a unary call (Register, Renew) or the start of a stream may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages queued for one stream before it is considered stuck (and replaced).
const STREAM_QUEUE: usize = 1024;
/// What the agent answers to `ProxyConfig` until it serves local xDS.
const NO_SIDECARS: &str = "sidecar proxies are not supported by this agent yet";

/// Where this agent runs, from the local Consul agent (or, while it is down, the data dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    pub datacenter: String,
    pub address: String,
}

/// One open `Relay.Connect` stream.
struct Stream {
    channel: Channel,
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ControllerMessage>,
    /// The certificate it was opened with (`Identity::chain_sha256`).
    chain_sha256: String,
}

impl Stream {
    /// Queues messages; false if the stream is gone or stuck.
    fn send(&self, messages: impl IntoIterator<Item = AgentMessage>) -> bool {
        messages.into_iter().all(|m| self.tx.try_send(m).is_ok())
    }
}

enum StreamError {
    /// Could not connect (TCP, TLS).
    Transport(String),
    /// The controller answered with an error.
    Status(Status),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Transport(e) => f.write_str(e),
            StreamError::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Many errors repeat their source's message in their own; say it once.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// What ended the wait of one loop turn.
enum Event {
    Poll,
    Current(Result<Option<ControllerMessage>, Status>),
    Pending(Result<Option<ControllerMessage>, Status>),
    Connect,
    Renew,
}

async fn recv(stream: Option<&mut Stream>) -> Result<Option<ControllerMessage>, Status> {
    match stream {
        Some(s) => s.rx.message().await,
        None => std::future::pending().await,
    }
}

fn deadline_for(t: SystemTime) -> Instant {
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(d) => Instant::now() + d.min(Duration::from_secs(365 * 24 * 3600)),
        Err(_) => Instant::now(),
    }
}

/// The source address for the relay connection: `--bind-addr`, else the node address if it can
/// be bound here, else none (the OS chooses).
pub fn choose_bind_addr(explicit: Option<IpAddr>, node_address: &str) -> Option<IpAddr> {
    if explicit.is_some() {
        return explicit;
    }
    match node_address.parse::<IpAddr>() {
        Ok(ip) => match std::net::TcpListener::bind((ip, 0)) {
            Ok(_) => Some(ip),
            Err(e) => {
                warn!(
                    address = %ip,
                    "cannot bind the node address ({e}); letting the OS choose the source address \
                     of the relay connection (the controller refuses instances whose address is not \
                     the connection's; set --bind-addr)"
                );
                None
            }
        },
        Err(_) => {
            warn!(
                address = node_address,
                "the node address is not an IP address; letting the OS choose the source address \
                 of the relay connection"
            );
            None
        }
    }
}

pub(crate) struct Agent {
    args: Args,
    consul: Client,
    data: DataDir,
    token: Option<String>,
}

impl Agent {
    pub(crate) fn new(args: Args) -> anyhow::Result<Self> {
        let config = args
            .consul
            .config()
            .context("local Consul agent settings")?;
        let consul = Client::new(&config).context("local Consul agent client")?;
        let data = DataDir::open(&args.data_dir)?;
        // The token is only needed until the agent holds a certificate: a token file removed
        // after the first registration is fine.
        let token = match args.read_token() {
            Ok(token) => token,
            Err(e) if matches!(data.load_credentials(), Ok(Some(_))) => {
                warn!("{e}; using the certificate in the data dir");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Agent {
            args,
            consul,
            data,
            token,
        })
    }

    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let stored = match self.data.load_credentials() {
            Ok(c) => c,
            Err(e) => {
                warn!("ignoring the stored certificate: {e}");
                None
            }
        };
        let node = self.node_info(stored.as_ref()).await;
        info!(
            node = %node.node,
            datacenter = %node.datacenter,
            address = %node.address,
            "vmesh-agent {VERSION} starting"
        );
        let bind = choose_bind_addr(self.args.bind_addr, &node.address);
        let creds = match stored {
            Some(c) if !c.is_for(&node.node, &node.datacenter) => {
                warn!(
                    spiffe_id = %c.identity.spiffe_id,
                    "the stored certificate is for another node; registering again"
                );
                self.register(&node, bind).await?
            }
            Some(c) if c.is_expired(SystemTime::now()) => {
                warn!(
                    spiffe_id = %c.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(c.not_after()),
                    "the stored certificate expired; registering again"
                );
                self.register(&node, bind).await?
            }
            Some(c) => {
                info!(
                    spiffe_id = %c.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(c.not_after()),
                    "using the stored certificate"
                );
                c
            }
            None => self.register(&node, bind).await?,
        };
        Session::new(self, node, bind, creds).run().await
    }

    /// The node's name, datacenter and address from `/v1/agent/self`. While the local Consul agent
    /// is unreachable: from the stored identity if there is one, else retried with backoff.
    async fn node_info(&self, stored: Option<&Credentials>) -> NodeInfo {
        let mut backoff = Backoff::relay();
        let mut warned = false;
        loop {
            match self.consul.agent_self().await {
                Ok(me) => {
                    if warned {
                        info!("the local Consul agent is reachable again");
                    }
                    return NodeInfo {
                        node: me.node_name,
                        datacenter: me.datacenter,
                        address: me.address,
                    };
                }
                Err(e) => {
                    if let Some(c) = stored.filter(|c| !c.identity.node_address.is_empty()) {
                        warn!(
                            "cannot read the local Consul agent ({e}); starting as node {} \
                             (from the data dir) with the services last read",
                            c.identity.node
                        );
                        return NodeInfo {
                            node: c.identity.node.clone(),
                            datacenter: c.identity.datacenter.clone(),
                            address: c.identity.node_address.clone(),
                        };
                    }
                    if !warned {
                        warn!(
                            "cannot read the local Consul agent at {} ({e}); it is needed for the \
                             node name before registering; retrying",
                            self.consul.address()
                        );
                        warned = true;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    fn endpoint(
        &self,
        ca_pem: &str,
        creds: Option<&Credentials>,
        bind: Option<IpAddr>,
    ) -> anyhow::Result<Endpoint> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(vmesh_tls::CONTROLLER_SERVER_NAME);
        if let Some(c) = creds {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &c.chain_pem,
                c.key.expose(),
            ));
        }
        Ok(
            Endpoint::from_shared(format!("https://{}", self.args.relay_addr))
                .with_context(|| format!("--relay-addr {:?}", self.args.relay_addr))?
                .tls_config(tls)
                .context("relay TLS settings")?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                .local_address(bind),
        )
    }

    async fn connect(
        &self,
        ca_pem: &str,
        creds: Option<&Credentials>,
        bind: Option<IpAddr>,
    ) -> Result<Channel, StreamError> {
        let endpoint = self
            .endpoint(ca_pem, creds, bind)
            .map_err(|e| StreamError::Transport(format!("{e:#}")))?;
        endpoint
            .connect()
            .await
            .map_err(|e| StreamError::Transport(error_chain(&e)))
    }

    /// The CA to verify the controller with before the agent holds credentials: `--ca-file`, else
    /// the trust bundle left in the data dir.
    fn bootstrap_ca(&self) -> anyhow::Result<String> {
        if let Some(path) = &self.args.ca_file {
            return std::fs::read_to_string(path)
                .with_context(|| format!("--ca-file {}", path.display()));
        }
        match self.data.load_ca()? {
            Some(ca) => Ok(ca),
            None => bail!(
                "no CA to verify the controller with: pass --ca-file (VMESH_RELAY_CACERT) for the \
                 first registration"
            ),
        }
    }

    /// Registers with the bootstrap token; retries what may pass later, fails on a refusal.
    async fn register(&self, node: &NodeInfo, bind: Option<IpAddr>) -> anyhow::Result<Credentials> {
        let Some(token) = &self.token else {
            bail!(
                "no valid certificate in {} and no bootstrap token: create one with `vmeshctl \
                 token create` and pass it with --token-file (VMESH_AGENT_TOKEN_FILE) or --token",
                self.data.path().display()
            );
        };
        let ca_pem = self.bootstrap_ca()?;
        let mut backoff = Backoff::relay();
        loop {
            let (key, csr_der) = new_key_and_csr().context("generating a key")?;
            let request = RegisterRequest {
                token: token.clone(),
                node: node.node.clone(),
                datacenter: node.datacenter.clone(),
                csr_der,
            };
            let error = match self.connect(&ca_pem, None, bind).await {
                Err(e) => e,
                Ok(channel) => {
                    let mut client = RegistrationClient::new(channel);
                    let call = client.register(request);
                    match tokio::time::timeout(CALL_TIMEOUT, call).await {
                        Err(_) => StreamError::Transport("no answer".into()),
                        Ok(Err(status)) => match status.code() {
                            Code::PermissionDenied | Code::Unauthenticated => bail!(
                                "the controller refused the bootstrap token: {}",
                                status.message()
                            ),
                            Code::InvalidArgument => bail!(
                                "the controller refused the registration: {}",
                                status.message()
                            ),
                            _ => StreamError::Status(status),
                        },
                        Ok(Ok(response)) => {
                            let issued = response
                                .into_inner()
                                .certificate
                                .ok_or_else(|| anyhow!("the controller sent no certificate"))?;
                            let creds = credentials(issued, key, node)?;
                            self.data.store_credentials(&creds)?;
                            info!(
                                spiffe_id = %creds.identity.spiffe_id,
                                not_after = %humantime::format_rfc3339_seconds(creds.not_after()),
                                "registered"
                            );
                            return Ok(creds);
                        }
                    }
                }
            };
            let delay = backoff.next_delay();
            warn!(
                relay = %self.args.relay_addr,
                "cannot register ({error}); retrying in {}",
                humantime::format_duration(round_ms(delay))
            );
            tokio::time::sleep(delay).await;
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Turns what Register or Renew returned into a credential set for `key`.
fn credentials(
    issued: IssuedCertificate,
    key: PrivateKeyPem,
    node: &NodeInfo,
) -> anyhow::Result<Credentials> {
    let leaf = issued
        .certificate_chain_der
        .first()
        .ok_or_else(|| anyhow!("the controller sent an empty certificate chain"))?;
    let not_after = certificate_not_after(leaf).context("the issued certificate")?;
    let chain_pem = certificates_to_pem(issued.certificate_chain_der.iter().map(|d| d.as_slice()));
    let ca_pem = String::from_utf8(issued.trust_bundle_pem)
        .map_err(|_| anyhow!("the trust bundle is not PEM text"))?;
    if ca_pem.trim().is_empty() {
        bail!("the controller sent an empty trust bundle");
    }
    Ok(Credentials::new(
        key,
        chain_pem,
        ca_pem,
        Identity {
            spiffe_id: issued.spiffe_id,
            node: node.node.clone(),
            datacenter: node.datacenter.clone(),
            issued_unix: system_to_unix(SystemTime::now()),
            not_after_unix: system_to_unix(not_after),
            node_address: node.address.clone(),
            key_sha256: String::new(),
            chain_sha256: String::new(),
        },
    ))
}

/// The running agent: discovery, the stream(s) and renewal.
struct Session {
    agent: Agent,
    node: NodeInfo,
    bind: Option<IpAddr>,
    creds: Credentials,
    disc: AgentDiscovery,
    reader: LocalReader,
    consul_down: bool,
    last_stored: Option<Vec<ServiceInstance>>,
    current: Option<Stream>,
    /// A stream opened with a renewed certificate and the seq of its snapshot: it replaces
    /// `current` once the controller acknowledged that snapshot.
    pending: Option<(Stream, u64)>,
    connect_backoff: Backoff,
    renew_backoff: Backoff,
    next_connect: Instant,
    next_renew: Instant,
    expired_logged: bool,
}

impl Session {
    fn new(agent: Agent, node: NodeInfo, bind: Option<IpAddr>, creds: Credentials) -> Self {
        let mut disc = AgentDiscovery::new(VERSION);
        let mut last_stored = None;
        match agent.data.load_discovery() {
            Ok(Some(instances)) => {
                debug!(count = instances.len(), "loaded the last discovery");
                disc.on_local(instances.clone());
                last_stored = Some(instances);
            }
            Ok(None) => {}
            Err(e) => warn!("ignoring the stored discovery: {e}"),
        }
        let reader = LocalReader::new(agent.consul.clone(), node.address.clone());
        let next_renew = deadline_for(creds.renew_at());
        Session {
            agent,
            node,
            bind,
            creds,
            disc,
            reader,
            consul_down: false,
            last_stored,
            current: None,
            pending: None,
            connect_backoff: Backoff::relay(),
            renew_backoff: Backoff::relay(),
            next_connect: Instant::now(),
            next_renew,
            expired_logged: false,
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut poll = tokio::time::interval(self.agent.args.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                biased;
                _ = poll.tick() => Event::Poll,
                m = recv(self.current.as_mut()) => Event::Current(m),
                m = recv(self.pending.as_mut().map(|(s, _)| s)) => Event::Pending(m),
                _ = sleep_until(self.next_connect), if self.current.is_none() => Event::Connect,
                _ = sleep_until(self.next_renew) => Event::Renew,
            };
            match event {
                Event::Poll => self.poll_local().await,
                Event::Current(Ok(Some(message))) => self.on_message(message, false),
                Event::Pending(Ok(Some(message))) => self.on_message(message, true),
                Event::Current(ended) => self.current_ended(ended.err()),
                Event::Pending(ended) => self.pending_ended(ended.err()),
                Event::Connect => self.connect().await?,
                Event::Renew => self.renew().await?,
            }
        }
    }

    /// Where discovery messages go: the renewed stream once it is open.
    fn active(&self) -> Option<&Stream> {
        self.pending
            .as_ref()
            .map(|(s, _)| s)
            .or(self.current.as_ref())
    }

    async fn poll_local(&mut self) {
        match self.reader.poll().await {
            Ok(changed) => {
                if self.consul_down {
                    info!("the local Consul agent is reachable again");
                    self.consul_down = false;
                }
                let Some(instances) = changed else { return };
                if self.last_stored.as_ref() != Some(&instances) {
                    if let Err(e) = self.agent.data.store_discovery(&instances) {
                        warn!("cannot record the discovery in the data dir: {e}");
                    }
                    self.last_stored = Some(instances.clone());
                }
                if let Some(message) = self.disc.on_local(instances) {
                    self.send_active(message);
                }
            }
            Err(e) => {
                if !self.consul_down {
                    warn!(
                        "cannot read the local Consul agent ({e}); reporting the services last \
                         read until it answers again"
                    );
                    self.consul_down = true;
                }
            }
        }
    }

    fn send_active(&mut self, message: AgentMessage) {
        let ok = match self.active() {
            Some(s) => s.send([message]),
            None => return,
        };
        if !ok {
            // Stuck or gone: replace the stream; the next connect sends a snapshot.
            if self.pending.is_some() {
                self.pending_ended(None);
            } else {
                self.current_ended(None);
            }
        }
    }

    fn on_message(&mut self, message: ControllerMessage, from_pending: bool) {
        let mut replies = Vec::new();
        match &message.message {
            Some(controller_message::Message::ProxyConfig(config)) => {
                debug!(proxy = %config.proxy, version = %config.version, "proxy config refused");
                replies.push(AgentMessage {
                    message: Some(agent_message::Message::ConfigAck(ConfigAck {
                        proxy: config.proxy.clone(),
                        version: config.version.clone(),
                        error: NO_SIDECARS.to_string(),
                    })),
                });
            }
            Some(controller_message::Message::Resync(resync)) => {
                info!(reason = %resync.reason, "resync requested by the controller");
            }
            Some(controller_message::Message::DiscoveryAck(_)) => {
                // The stream works end to end.
                self.connect_backoff.reset();
            }
            None => {}
        }
        replies.extend(self.disc.on_controller(&message));
        let stream = if from_pending {
            self.pending.as_ref().map(|(s, _)| s)
        } else {
            self.current.as_ref()
        };
        let ok = stream.is_none_or(|s| s.send(replies));
        if !ok {
            if from_pending {
                self.pending_ended(None);
            } else {
                self.current_ended(None);
            }
            return;
        }
        if let Some((_, seq)) = &self.pending {
            if self.disc.last_acked_seq() >= *seq {
                if let Some((stream, _)) = self.pending.take() {
                    self.current = Some(stream);
                    info!(
                        spiffe_id = %self.creds.identity.spiffe_id,
                        "the stream with the renewed certificate is acknowledged; closed the old one"
                    );
                }
            }
        }
    }

    fn current_ended(&mut self, status: Option<Status>) {
        let reason = match &status {
            Some(s) => format!("{:?}: {}", s.code(), s.message()),
            None => "stream closed".to_string(),
        };
        self.current = None;
        if let Some((stream, _)) = self.pending.take() {
            info!(reason = %reason, "the old stream ended during renewal; continuing on the new one");
            self.current = Some(stream);
            return;
        }
        self.disc.on_disconnect();
        let delay = if status
            .as_ref()
            .is_some_and(|s| s.code() == Code::PermissionDenied)
        {
            self.log_revoked(&reason);
            self.connect_backoff.cap()
        } else {
            self.connect_backoff.next_delay()
        };
        info!(
            reason = %reason,
            "disconnected from the controller; reconnecting in {}",
            humantime::format_duration(round_ms(delay))
        );
        self.next_connect = Instant::now() + delay;
    }

    fn pending_ended(&mut self, status: Option<Status>) {
        let reason = match &status {
            Some(s) => format!("{:?}: {}", s.code(), s.message()),
            None => "stream closed".to_string(),
        };
        self.pending = None;
        warn!(reason = %reason, "the stream with the renewed certificate ended before it was acknowledged");
        self.after_failed_switch();
    }

    /// A renewed stream failed after `on_connect` sent its snapshot: what it carried may never have
    /// reached the controller, so the old stream gets a full snapshot, and the switch is retried.
    fn after_failed_switch(&mut self) {
        let resync = ControllerMessage {
            message: Some(controller_message::Message::Resync(ResyncRequest {
                reason: "the renewed stream failed".to_string(),
            })),
        };
        let snapshot = self.disc.on_controller(&resync);
        if let Some(current) = &self.current {
            if !current.send(snapshot) {
                self.current_ended(None);
            }
        } else {
            self.disc.on_disconnect();
        }
        self.next_renew = Instant::now() + self.renew_backoff.next_delay();
    }

    fn log_revoked(&self, reason: &str) {
        error!(
            spiffe_id = %self.creds.identity.spiffe_id,
            "the controller refused this agent: it was revoked ({reason}). Re-admit it with \
             `vmeshctl agent allow {} --datacenter {}` (if its certificate expires meanwhile, \
             restart it with a new bootstrap token from `vmeshctl token create`); retrying every {}",
            self.node.node,
            self.node.datacenter,
            humantime::format_duration(self.connect_backoff.cap())
        );
    }

    /// Opens a stream with `creds` and sends Hello and a snapshot on it.
    async fn open_stream(&mut self, creds: &Credentials) -> Result<(Stream, u64), StreamError> {
        let channel = self
            .agent
            .connect(&creds.ca_pem, Some(creds), self.bind)
            .await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let hello = self.disc.on_connect(BTreeMap::new());
        let snapshot_seq = self.disc.last_sent_seq();
        for m in hello {
            // A fresh queue has room for Hello and the snapshot.
            let _ = tx.try_send(m);
        }
        let mut client = RelayClient::new(channel.clone());
        let call = client.connect(ReceiverStream::new(rx));
        let response = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => return Err(StreamError::Status(status)),
            Err(_) => return Err(StreamError::Transport("no answer".to_string())),
        };
        Ok((
            Stream {
                channel,
                tx,
                rx: response.into_inner(),
                chain_sha256: creds.identity.chain_sha256.clone(),
            },
            snapshot_seq,
        ))
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        if self.creds.is_expired(SystemTime::now()) && !self.reregister().await? {
            self.next_connect = Instant::now() + self.connect_backoff.cap();
            return Ok(());
        }
        let creds = self.creds.clone();
        match self.open_stream(&creds).await {
            Ok((stream, _)) => {
                info!(
                    spiffe_id = %creds.identity.spiffe_id,
                    relay = %self.agent.args.relay_addr,
                    "connected to the controller"
                );
                self.current = Some(stream);
            }
            Err(e) => {
                self.disc.on_disconnect();
                let delay = match &e {
                    StreamError::Status(s) if s.code() == Code::PermissionDenied => {
                        self.log_revoked(s.message());
                        self.connect_backoff.cap()
                    }
                    _ => {
                        let delay = self.connect_backoff.next_delay();
                        warn!(
                            relay = %self.agent.args.relay_addr,
                            "cannot connect to the controller ({e}); retrying in {}",
                            humantime::format_duration(round_ms(delay))
                        );
                        delay
                    }
                };
                self.next_connect = Instant::now() + delay;
            }
        }
        Ok(())
    }

    /// The certificate expired: registers again if a token is available. False if it cannot.
    async fn reregister(&mut self) -> anyhow::Result<bool> {
        if self.agent.token.is_none() {
            if !self.expired_logged {
                error!(
                    spiffe_id = %self.creds.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(self.creds.not_after()),
                    "the agent's certificate expired before it could be renewed and no bootstrap \
                     token is configured: restart the agent with a new token (--token-file); \
                     retrying"
                );
                self.expired_logged = true;
            }
            return Ok(false);
        }
        warn!(
            not_after = %humantime::format_rfc3339_seconds(self.creds.not_after()),
            "the agent's certificate expired; registering again with the bootstrap token"
        );
        self.creds = self.agent.register(&self.node, self.bind).await?;
        self.expired_logged = false;
        self.next_renew = deadline_for(self.creds.renew_at());
        Ok(true)
    }

    async fn renew(&mut self) -> anyhow::Result<()> {
        let now = SystemTime::now();
        if now < self.creds.renew_at() {
            // Not due: a failed switch to the renewed certificate is being retried.
            let stale = self
                .current
                .as_ref()
                .is_some_and(|s| s.chain_sha256 != self.creds.identity.chain_sha256);
            if stale && self.pending.is_none() {
                self.switch_stream().await;
            } else {
                self.next_renew = deadline_for(self.creds.renew_at());
            }
            return Ok(());
        }
        if self.creds.is_expired(now) {
            if self.current.is_some() || self.pending.is_some() {
                // The controller closes such a stream; reconnecting re-registers.
                self.next_renew = Instant::now() + self.renew_backoff.next_delay();
                return Ok(());
            }
            if !self.reregister().await? {
                self.next_renew = Instant::now() + self.renew_backoff.cap();
            }
            return Ok(());
        }
        match self.renew_certificate().await {
            Ok(creds) => {
                info!(
                    spiffe_id = %creds.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(creds.not_after()),
                    "renewed the certificate"
                );
                self.creds = creds;
                self.renew_backoff.reset();
                self.next_renew = deadline_for(self.creds.renew_at());
                if self.current.is_some() && self.pending.is_none() {
                    self.switch_stream().await;
                }
            }
            Err(e) => {
                let delay = self.renew_backoff.next_delay();
                warn!(
                    not_after = %humantime::format_rfc3339_seconds(self.creds.not_after()),
                    "cannot renew the certificate ({e:#}); retrying in {}",
                    humantime::format_duration(round_ms(delay))
                );
                self.next_renew = Instant::now() + delay;
            }
        }
        Ok(())
    }

    async fn renew_certificate(&mut self) -> anyhow::Result<Credentials> {
        let channel = match &self.current {
            Some(s) => s.channel.clone(),
            None => self
                .agent
                .connect(&self.creds.ca_pem, Some(&self.creds), self.bind)
                .await
                .map_err(|e| anyhow!("{e}"))?,
        };
        let (key, csr_der) = new_key_and_csr().context("generating a key")?;
        let mut client = RelayClient::new(channel);
        let call = client.renew(RenewRequest { csr_der });
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| anyhow!("no answer"))?
            .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?;
        let issued = response
            .into_inner()
            .certificate
            .ok_or_else(|| anyhow!("the controller sent no certificate"))?;
        let creds = credentials(issued, key, &self.node)?;
        self.agent.data.store_credentials(&creds)?;
        Ok(creds)
    }

    /// Make-before-break: a new stream with the current certificate; the old one is dropped once
    /// the controller acknowledged the new stream's snapshot (see `on_message`).
    async fn switch_stream(&mut self) {
        let creds = self.creds.clone();
        match self.open_stream(&creds).await {
            Ok((stream, seq)) => {
                info!(
                    spiffe_id = %creds.identity.spiffe_id,
                    "opened a stream with the renewed certificate"
                );
                self.pending = Some((stream, seq));
            }
            Err(e) => {
                warn!("cannot open a stream with the renewed certificate ({e})");
                self.after_failed_switch();
            }
        }
    }
}
