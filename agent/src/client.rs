//! The relay client's IO: the controller's address and TLS, registration with a bootstrap token,
//! renewal, and opening `Relay.Connect` streams. What to do when is decided by the session
//! (`vmesh_relay::Session`, driven by `session.rs`); this module only makes the calls.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::{info, warn};
use vmesh_consul::Client;
use vmesh_proto::v1::registration_client::RegistrationClient;
use vmesh_proto::v1::relay_client::RelayClient;
use vmesh_proto::v1::{
    AgentMessage, ControllerMessage, IssuedCertificate, RegisterRequest, RenewRequest,
};
use vmesh_relay::session::{RETRY_BASE, RETRY_CAP};
use vmesh_relay::{Credential, Ended};
use vmesh_retry::Backoff;
use vmesh_tls::{certificate_not_after, certificates_to_pem, new_key_and_csr, PrivateKeyPem};

use crate::args::Args;
use crate::datadir::{system_to_unix, Credentials, DataDir, Identity};

/// How long establishing a connection (TCP + TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a unary call (Register, Renew) or the start of a stream may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages queued for one stream before it is considered stuck (and replaced).
const STREAM_QUEUE: usize = 1024;

/// Where this agent runs, from the local Consul agent (or, while it is down, the data dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    pub datacenter: String,
    pub address: String,
}

/// One open `Relay.Connect` stream.
pub struct Stream {
    pub channel: Channel,
    tx: mpsc::Sender<AgentMessage>,
    pub rx: tonic::Streaming<ControllerMessage>,
}

impl Stream {
    /// Queues messages; false if the stream is gone or stuck.
    pub fn send(&self, messages: impl IntoIterator<Item = AgentMessage>) -> bool {
        messages.into_iter().all(|m| self.tx.try_send(m).is_ok())
    }
}

pub enum StreamError {
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

impl StreamError {
    /// How the session sees it: a refusal as revoked is `PERMISSION_DENIED`.
    pub fn ended(&self) -> Ended {
        match self {
            StreamError::Status(s) => ended(s),
            StreamError::Transport(e) => Ended::failed(e.clone()),
        }
    }
}

/// How the session sees a stream that ended with `status`.
pub fn ended(status: &Status) -> Ended {
    let reason = format!("{:?}: {}", status.code(), status.message());
    if status.code() == Code::PermissionDenied {
        Ended::revoked(reason)
    } else {
        Ended::failed(reason)
    }
}

/// What the session needs to know of credentials.
pub fn credential(creds: &Credentials) -> Credential {
    Credential {
        id: creds.identity.chain_sha256.clone(),
        renew_at: creds.renew_at(),
        not_after: creds.not_after(),
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

/// The agent's side of the relay: its settings, local Consul agent, data dir and token.
pub struct Relay {
    pub args: Args,
    pub consul: Client,
    pub data: DataDir,
    pub token: Option<String>,
}

impl Relay {
    pub fn new(args: Args) -> anyhow::Result<Self> {
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
        Ok(Relay {
            args,
            consul,
            data,
            token,
        })
    }

    /// Where the agent runs, the source address to use, and credentials: the stored ones if they
    /// are still good for this node, else new ones from registering with the bootstrap token.
    pub async fn start(&self) -> anyhow::Result<(NodeInfo, Option<IpAddr>, Credentials)> {
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
            "vmesh-agent {} starting",
            crate::VERSION
        );
        let bind = choose_bind_addr(self.args.bind_addr, &node.address);
        let creds = match stored {
            Some(c) if !c.is_for(&node.node, &node.datacenter) => {
                warn!(
                    spiffe_id = %c.identity.spiffe_id,
                    "the stored certificate is for another node; registering again"
                );
                self.register(&node, None, bind).await?
            }
            Some(c) if c.is_expired(SystemTime::now()) => {
                warn!(
                    spiffe_id = %c.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(c.not_after()),
                    "the stored certificate expired; registering again"
                );
                self.register(&node, None, bind).await?
            }
            Some(c) => {
                info!(
                    spiffe_id = %c.identity.spiffe_id,
                    not_after = %humantime::format_rfc3339_seconds(c.not_after()),
                    "using the stored certificate"
                );
                c
            }
            None => self.register(&node, None, bind).await?,
        };
        Ok((node, bind, creds))
    }

    /// The node's name, datacenter and address from `/v1/agent/self`. While the local Consul agent
    /// is unreachable: from the stored identity if there is one, else retried with backoff.
    async fn node_info(&self, stored: Option<&Credentials>) -> NodeInfo {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
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

    /// Registers with the bootstrap token (as this node's agent, or as the edge gateway
    /// `gateway`); retries what may pass later, fails on a refusal.
    pub async fn register(
        &self,
        node: &NodeInfo,
        gateway: Option<&str>,
        bind: Option<IpAddr>,
    ) -> anyhow::Result<Credentials> {
        let Some(token) = &self.token else {
            bail!(
                "no valid certificate in {} and no bootstrap token: create one with `vmeshctl \
                 token create` and pass it with --token-file (VMESH_AGENT_TOKEN_FILE) or --token",
                self.data.path().display()
            );
        };
        let ca_pem = self.bootstrap_ca()?;
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
        loop {
            let (key, csr_der) = new_key_and_csr().context("generating a key")?;
            let request = RegisterRequest {
                token: token.clone(),
                node: node.node.clone(),
                datacenter: node.datacenter.clone(),
                csr_der,
                gateway: gateway.unwrap_or_default().to_owned(),
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
                            let creds = self.keep(response.into_inner().certificate, key, node)?;
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

impl Relay {
    /// Opens a stream with `creds` and queues `first` (`Hello` and a snapshot) on it.
    pub async fn open_stream(
        &self,
        creds: &Credentials,
        bind: Option<IpAddr>,
        first: Vec<AgentMessage>,
    ) -> Result<Stream, StreamError> {
        let channel = self.connect(&creds.ca_pem, Some(creds), bind).await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        for m in first {
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
        Ok(Stream {
            channel,
            tx,
            rx: response.into_inner(),
        })
    }

    /// A new certificate for a new key, over `channel` (the current stream's connection) or a
    /// new connection; stored in the data dir before it is returned.
    pub async fn renew(
        &self,
        channel: Option<Channel>,
        creds: &Credentials,
        node: &NodeInfo,
        bind: Option<IpAddr>,
    ) -> anyhow::Result<Credentials> {
        let channel = match channel {
            Some(c) => c,
            None => self
                .connect(&creds.ca_pem, Some(creds), bind)
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
        self.keep(response.into_inner().certificate, key, node)
    }

    /// The credentials of what Register or Renew returned, for `key`, stored in the data dir.
    fn keep(
        &self,
        issued: Option<IssuedCertificate>,
        key: PrivateKeyPem,
        node: &NodeInfo,
    ) -> anyhow::Result<Credentials> {
        let issued = issued.ok_or_else(|| anyhow!("the controller sent no certificate"))?;
        let creds = credentials(issued, key, node)?;
        self.data.store_credentials(&creds)?;
        Ok(creds)
    }
}
