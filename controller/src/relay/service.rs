//! The relay's gRPC edge: `Registration` (a bootstrap token and a CSR for a certificate) and
//! `Relay` (renewal and the discovery stream, mutual TLS only). It reads the peer and the
//! request, applies the rules of `registration.rs` and the hub, and turns every [`Refusal`] into
//! a gRPC status whose message says why (never echoing a secret), a warning in the log with the
//! peer address, and a count in `vmesh_relay_refused_total{reason}`.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

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
    AgentMessage, ControllerMessage, RegisterRequest, RegisterResponse, RenewRequest, RenewResponse,
};
use vmesh_relay::{AddressLimiter, Refusal, RefusalKind};

use super::hub::Hub;
use super::registration::Registrar;
use crate::metrics::Metrics;
use crate::refusals::Refusals;

/// The gRPC status of a refusal.
pub fn to_status(refusal: &Refusal) -> Status {
    let message = refusal.message.clone();
    match refusal.kind {
        RefusalKind::InvalidArgument => Status::invalid_argument(message),
        RefusalKind::Unauthenticated => Status::unauthenticated(message),
        RefusalKind::PermissionDenied => Status::permission_denied(message),
        RefusalKind::Unavailable => Status::unavailable(message),
        RefusalKind::RateLimited => Status::resource_exhausted(message),
    }
}

/// What both services share.
pub struct RelayState {
    pub hub: Arc<Hub>,
    pub registrar: Registrar,
    pub metrics: Arc<Metrics>,
    pub refusals: Arc<Refusals>,
    /// Registrations allowed per source address.
    pub registrations: Mutex<AddressLimiter>,
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

impl RelayState {
    /// Logs, counts and answers a refusal. The controller's own trouble (Consul unreachable) is
    /// no refusal of the caller: it was logged where it happened and is not counted.
    fn refuse(&self, peer: &Peer, refusal: Refusal) -> Status {
        if refusal.kind != RefusalKind::Unavailable {
            self.refusals.note(refusal.reason, peer.addr, || {
                warn!(peer = %peer.describe(), reason = refusal.reason, error = %refusal.message, "relay call refused");
            });
        }
        to_status(&refusal)
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
        let address = peer.ip()?;
        // Before anything else: a flood from one address costs a lookup per call.
        let allowed = state
            .registrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(address, Instant::now());
        if !allowed {
            return Err(state.refuse(&peer, Refusal::rate_limited()));
        }
        let req = request.into_inner();
        let registered = state
            .registrar
            .register(
                &req.node,
                (!req.gateway.is_empty()).then_some(req.gateway.as_str()),
                &req.datacenter,
                req.token,
                &req.csr_der,
                address,
                SystemTime::now(),
            )
            .await
            .map_err(|refusal| state.refuse(&peer, refusal))?;
        state.metrics.relay_registrations.inc();
        if registered.id.is_gateway() {
            info!(gateway = %registered.id, node = %req.node, token = %registered.token, peer = %peer.describe(), "gateway registered");
        } else {
            info!(agent = %registered.id, token = %registered.token, peer = %peer.describe(), "agent registered");
        }
        Ok(Response::new(RegisterResponse {
            certificate: Some(registered.certificate),
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
        let now = SystemTime::now();
        let agent = state
            .registrar
            .authenticate(peer.leaf.as_deref(), now)
            .map_err(|r| state.refuse(&peer, r))?;
        let address = peer.ip()?;
        let certificate = state
            .registrar
            .renew(&agent, &request.get_ref().csr_der, address, now)
            .await
            .map_err(|r| state.refuse(&peer, r))?;
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
        let agent = state
            .registrar
            .authenticate(peer.leaf.as_deref(), SystemTime::now())
            .map_err(|r| state.refuse(&peer, r))?;
        if !agent.id.is_agent() {
            let refusal = Refusal::new(
                RefusalKind::PermissionDenied,
                "bad_certificate",
                format!("{} is not an agent: only agents stream discovery", agent.id),
            );
            return Err(state.refuse(&peer, refusal));
        }
        let address = peer.ip()?;
        let attached = state
            .hub
            .attach(&agent.id, &agent.serial, address)
            .map_err(|r| state.refuse(&peer, r))?;
        info!(agent = %agent.id, peer = %peer.describe(), "agent connected");

        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ControllerMessage, Status>>(256);
        let span = tracing::info_span!("agent", id = %agent.id);
        // One task per stream, ended by the agent, a revocation or the certificate's expiry.
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
                            // The hub only ever sends a refusal, then forgets the stream.
                            let status = cancel
                                .borrow()
                                .as_ref()
                                .map_or_else(|| Status::unavailable("stream closed by the controller"), to_status);
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
                state.hub.detach(&agent.id, attached.stream);
                info!(%reason, "agent disconnected");
            }
            .instrument(span),
        );
        debug!("relay stream started");
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
