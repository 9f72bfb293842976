//! The relay's gRPC services: `Registration` (a bootstrap token and a CSR for a certificate) and
//! `Relay` (renewal and the discovery stream, mutual TLS only).
//!
//! Every refusal has a gRPC status whose message says why (never echoing a secret), a warning in
//! the log with the peer address, and a count in `vmesh_relay_refused_total{reason}`.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument as _};
use vmesh_proto::v1::registration_server::Registration;
use vmesh_proto::v1::relay_server::Relay;
use vmesh_proto::v1::{
    AgentMessage, ControllerMessage, IssuedCertificate, RegisterRequest, RegisterResponse,
    RenewRequest, RenewResponse,
};
use vmesh_registry::{AgentRecord, Registry, RegistryError};
use vmesh_tls::tokens::{Secret, TokenError, TokenId};
use vmesh_tls::{certificate_not_after, certificate_serial, CertificateAuthority, SpiffeId};

use super::hub::Hub;
use vmesh_registry::unix_secs;

use crate::metrics::Metrics;

/// What both services share.
pub struct RelayState {
    pub hub: Arc<Hub>,
    pub registry: Registry,
    pub ca: Arc<dyn CertificateAuthority>,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub metrics: Arc<Metrics>,
}

/// The peer of a call: its address and, if it presented one, its verified certificate chain.
struct Peer {
    addr: Option<SocketAddr>,
    leaf: Option<Vec<u8>>,
}

impl Peer {
    fn of<T>(request: &Request<T>) -> Peer {
        let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        Peer {
            addr: info.and_then(|i| i.get_ref().remote_addr()),
            leaf: info
                .and_then(|i| i.peer_certs())
                .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec())),
        }
    }

    fn ip(&self) -> Result<IpAddr, Status> {
        self.addr
            // An IPv4 peer of a dual-stack listener shows as ::ffff:a.b.c.d.
            .map(|a| a.ip().to_canonical())
            .ok_or_else(|| Status::internal("the relay connection has no peer address"))
    }

    fn describe(&self) -> String {
        self.addr
            .map_or_else(|| "unknown".into(), |a| a.to_string())
    }
}

/// An agent identified by its client certificate.
struct Authenticated {
    id: SpiffeId,
    serial: String,
    not_after: SystemTime,
}

impl RelayState {
    fn refuse(&self, reason: &'static str, peer: &Peer, status: Status) -> Status {
        self.metrics.refused(reason);
        warn!(peer = %peer.describe(), reason, error = %status.message(), "relay call refused");
        status
    }

    /// The agent behind a mutual-TLS call. The handshake already verified the chain against the
    /// mesh CA and the validity period; this reads the identity and checks the deny list.
    fn authenticate(&self, peer: &Peer) -> Result<Authenticated, Status> {
        let Some(leaf) = &peer.leaf else {
            return Err(self.refuse(
                "no_client_certificate",
                peer,
                Status::unauthenticated(
                    "the relay needs a client certificate: register with a bootstrap token first",
                ),
            ));
        };
        let bad = |e: String| {
            self.refuse(
                "bad_certificate",
                peer,
                Status::unauthenticated(format!("client certificate: {e}")),
            )
        };
        let id = SpiffeId::from_certificate_der(leaf).map_err(|e| bad(e.to_string()))?;
        if !id.is_agent() || id.trust_domain() != self.trust_domain {
            return Err(bad(format!(
                "{id} is not an agent of trust domain {}",
                self.trust_domain
            )));
        }
        let serial = certificate_serial(leaf).map_err(|e| bad(e.to_string()))?;
        let not_after = certificate_not_after(leaf).map_err(|e| bad(e.to_string()))?;
        // The handshake checked validity then; a connection can outlive the certificate.
        if SystemTime::now() >= not_after {
            return Err(self.refuse(
                "certificate_expired",
                peer,
                Status::unauthenticated(format!(
                    "the certificate of {id} has expired; register again with a bootstrap token"
                )),
            ));
        }
        if self.hub.is_revoked(&id, &serial) {
            return Err(self.refuse(
                "revoked",
                peer,
                Status::permission_denied(format!(
                    "agent {id} is revoked; re-admit it with `vmeshctl agent allow` and a new bootstrap token"
                )),
            ));
        }
        Ok(Authenticated {
            id,
            serial,
            not_after,
        })
    }

    /// Signs `csr_der` for `id` and records the agent. Returns what the agent stores.
    async fn issue(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
        token_id: TokenId,
        address: IpAddr,
        peer: &Peer,
    ) -> Result<IssuedCertificate, Status> {
        let issued = self.ca.sign(csr_der, id, self.cert_ttl).map_err(|e| {
            self.refuse("bad_request", peer, Status::invalid_argument(e.to_string()))
        })?;
        let record = AgentRecord {
            spiffe_id: id.clone(),
            token_id,
            address: address.to_string(),
            serial: issued.serial.clone(),
            registered_unix: unix_secs(SystemTime::now()),
            not_after_unix: unix_secs(issued.not_after),
        };
        self.registry
            .record_agent(&record)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(IssuedCertificate {
            certificate_chain_der: issued.chain_der,
            trust_bundle_pem: self.ca.trust_bundle_pem().into_bytes(),
            spiffe_id: id.to_string(),
            not_after_unix: unix_secs(issued.not_after) as i64,
        })
    }
}

/// Consul is unreachable: the details go to the log, not to a caller who may hold no
/// certificate.
fn unavailable(e: &RegistryError) -> Status {
    warn!(error = %e, "the relay cannot reach its records in Consul");
    Status::unavailable("the controller cannot reach its records in Consul; try again later")
}

fn token_reason(e: &TokenError) -> &'static str {
    match e {
        TokenError::Unknown | TokenError::NotFound { .. } => "token_unknown",
        TokenError::Revoked { .. } => "token_revoked",
        TokenError::Expired { .. } => "token_expired",
        TokenError::Exhausted { .. } => "token_exhausted",
        TokenError::WrongNode { .. } => "token_wrong_node",
        _ => "token_invalid",
    }
}

#[derive(Clone)]
pub struct RegistrationService(pub Arc<RelayState>);

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let state = &self.0;
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let id = SpiffeId::agent(&state.trust_domain, &req.datacenter, &req.node).map_err(|e| {
            state.refuse(
                "bad_request",
                &peer,
                Status::invalid_argument(format!(
                    "node {:?} / datacenter {:?}: {e}",
                    req.node, req.datacenter
                )),
            )
        })?;
        let address = peer.ip()?;
        if state.hub.is_revoked(&id, "") {
            return Err(state.refuse(
                "revoked",
                &peer,
                Status::permission_denied(format!(
                    "agent {id} is revoked; re-admit it with `vmeshctl agent allow` first"
                )),
            ));
        }
        // A node holds one registration at a time: a token (unless bound to the node) must not
        // let another machine take over a live agent's name.
        match state.registry.agent(&id).await {
            Ok(Some(record)) if record.not_after_unix > unix_secs(SystemTime::now()) => {
                return Err(state.refuse(
                    "already_registered",
                    &peer,
                    Status::permission_denied(format!(
                        "{id} is already registered (from {}, certificate valid until {} s since the Unix epoch); \
                         if this VM was rebuilt, run `vmeshctl agent revoke {node}` and `vmeshctl agent allow {node}` first",
                        record.address,
                        record.not_after_unix,
                        node = req.node,
                    )),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(unavailable(&e)),
        }
        // A request that cannot be signed must not spend a use of the token.
        vmesh_tls::check_csr(&req.csr_der).map_err(|e| {
            state.refuse(
                "bad_request",
                &peer,
                Status::invalid_argument(e.to_string()),
            )
        })?;
        let secret = Secret::new(req.token);
        let token = match state
            .registry
            .redeem(&secret, &req.node, SystemTime::now())
            .await
        {
            Ok(info) => info,
            Err(RegistryError::Token(e)) => {
                return Err(state.refuse(
                    token_reason(&e),
                    &peer,
                    Status::permission_denied(e.to_string()),
                ));
            }
            Err(e) => return Err(unavailable(&e)),
        };
        let certificate = state
            .issue(&id, &req.csr_der, token.id.clone(), address, &peer)
            .await?;
        // The token may have been revoked between redeeming it and recording the agent; its
        // revocation then missed this agent, so revoke it here.
        let revoked_meanwhile = state
            .registry
            .list_tokens()
            .await
            .map_err(|e| unavailable(&e))?
            .iter()
            .any(|t| t.id == token.id && t.revoked);
        if revoked_meanwhile {
            if let Err(e) = state
                .registry
                .revoke_agent(&id, "its bootstrap token was revoked", SystemTime::now())
                .await
            {
                return Err(unavailable(&e));
            }
            return Err(state.refuse(
                "token_revoked",
                &peer,
                Status::permission_denied(format!("bootstrap token {} has been revoked", token.id)),
            ));
        }
        state.metrics.relay_registrations.inc();
        info!(agent = %id, token = %token.id, peer = %peer.describe(), "agent registered");
        Ok(Response::new(RegisterResponse {
            certificate: Some(certificate),
        }))
    }
}

#[derive(Clone)]
pub struct RelayService(pub Arc<RelayState>);

type ControllerStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Relay for RelayService {
    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let state = &self.0;
        let peer = Peer::of(&request);
        let agent = state.authenticate(&peer)?;
        let address = peer.ip()?;
        // Only a registered agent renews, and the token it registered with stays on record
        // (revoking the token revokes the agent). No record: `vmeshctl agent allow` forgot it
        // after a revocation, so the certificates from before must not live on.
        let Some(record) = state
            .registry
            .agent(&agent.id)
            .await
            .map_err(|e| unavailable(&e))?
        else {
            return Err(state.refuse(
                "not_registered",
                &peer,
                Status::permission_denied(format!(
                    "{} has no registration on record; register again with a bootstrap token",
                    agent.id
                )),
            ));
        };
        let token_id = record.token_id;
        let certificate = state
            .issue(
                &agent.id,
                &request.get_ref().csr_der,
                token_id,
                address,
                &peer,
            )
            .await?;
        state.metrics.relay_renewals.inc();
        info!(agent = %agent.id, not_after_unix = certificate.not_after_unix, "agent certificate renewed");
        Ok(Response::new(RenewResponse {
            certificate: Some(certificate),
        }))
    }

    type ConnectStream = ControllerStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let state = self.0.clone();
        let peer = Peer::of(&request);
        let agent = state.authenticate(&peer)?;
        let address = peer.ip()?;
        let attached = state
            .hub
            .attach(&agent.id, &agent.serial, address)
            .map_err(|status| state.refuse("revoked", &peer, status))?;
        info!(agent = %agent.id, peer = %peer.describe(), "agent connected");

        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ControllerMessage, Status>>(256);
        let span = tracing::info_span!("agent", id = %agent.id);
        tokio::spawn(
            async move {
                let mut cancel = attached.cancel;
                let expires = tokio::time::sleep(
                    agent
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default(),
                );
                tokio::pin!(expires);
                let reason = loop {
                    tokio::select! {
                        // A revocation or an expiry wins over a message that arrived with it.
                        biased;
                        _ = cancel.changed() => {
                            // The hub only ever sends a status, then forgets the stream.
                            let status = cancel
                                .borrow()
                                .clone()
                                .unwrap_or_else(|| Status::unavailable("stream closed by the controller"));
                            let reason = status.message().to_owned();
                            let _ = tx.send(Err(status)).await;
                            break reason;
                        }
                        () = &mut expires => {
                            state.metrics.refused("certificate_expired");
                            let _ = tx.send(Err(Status::unauthenticated("the agent's certificate expired; renew it before it does"))).await;
                            break "certificate expired".to_owned();
                        }
                        message = inbound.next() => match message {
                            Some(Ok(message)) => {
                                if let Some(reply) = state.hub.on_message(&agent.id, attached.stream, &message) {
                                    // Never wait on a peer that stopped reading: that would
                                    // hold off revocation and expiry too.
                                    match tx.try_send(Ok(reply)) {
                                        Ok(()) => {}
                                        Err(mpsc::error::TrySendError::Full(_)) => {
                                            break "the agent stopped reading its stream".to_owned();
                                        }
                                        Err(mpsc::error::TrySendError::Closed(_)) => {
                                            break "the agent went away".to_owned();
                                        }
                                    }
                                }
                            }
                            Some(Err(status)) => break format!("stream error: {}", status.message()),
                            None => break "the agent closed the stream".to_owned(),
                        },
                        () = tx.closed() => break "the agent went away".to_owned(),
                    }
                };
                state.hub.detach(&agent.id, attached.stream, Instant::now());
                info!(%reason, "agent disconnected");
            }
            .instrument(span),
        );
        debug!("relay stream started");
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
