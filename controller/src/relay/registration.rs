//! Who may use the relay, and registration and renewal: the rules, on the registry (Consul KV)
//! and the mesh CA, without the gRPC transport. The services in `service.rs` only read the peer
//! and the request, call these, and turn a [`Refusal`] into a gRPC status.
//!
//! - **Authentication** (every `Relay` call): a client certificate from the mesh CA (the handshake
//!   verified the chain) whose SPIFFE id is an agent of this trust domain, still valid now (a
//!   connection can outlive its certificate), and not revoked.
//! - **Registration**: the checks that need no Consul read come first (the node name, the deny
//!   list, the CSR, the token against the watched copy), so a request that fails them costs no
//!   Consul read; a node holds one registration at a time (a token not bound to the node must
//!   not let another machine take over a live agent's name); the token is redeemed, the
//!   certificate signed, the agent recorded; a token revoked meanwhile revokes the agent.
//! - **Renewal**: only a registered agent renews (after `vmeshctl agent allow` forgot a revoked
//!   one, its old certificates must not live on), and it keeps the token it registered with.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::warn;
use vmesh_layout::unix_secs;
use vmesh_proto::v1::IssuedCertificate;
use vmesh_registry::{AgentRecord, Registry, RegistryError};
use vmesh_relay::{Refusal, RefusalKind};
use vmesh_tls::tokens::{Registrant, Secret, TokenError, TokenId};
use vmesh_tls::{certificate_not_after, certificate_serial, CertificateAuthority, SpiffeId};

use super::hub::Hub;
use super::tokens::Tokens;

/// An agent identified by its client certificate.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
}

/// A registration's answer.
pub struct Registered {
    pub id: SpiffeId,
    pub token: TokenId,
    pub certificate: IssuedCertificate,
}

pub struct Registrar {
    pub hub: Arc<Hub>,
    pub registry: Registry,
    /// The watched copy of the bootstrap tokens, for refusals without a Consul read.
    pub tokens: Arc<Tokens>,
    pub ca: Arc<dyn CertificateAuthority>,
    pub trust_domain: String,
    pub cert_ttl: Duration,
}

/// Consul is unreachable: the details go to the log, not to a caller who may hold no
/// certificate.
fn unavailable(e: &RegistryError) -> Refusal {
    warn!(error = %e, "the relay cannot reach its records in Consul");
    Refusal::unavailable()
}

fn token_refusal(e: &TokenError) -> Refusal {
    let reason = match e {
        TokenError::Unknown | TokenError::NotFound { .. } => "token_unknown",
        TokenError::Revoked { .. } => "token_revoked",
        TokenError::Expired { .. } => "token_expired",
        TokenError::Exhausted { .. } => "token_exhausted",
        TokenError::WrongNode { .. } => "token_wrong_node",
        TokenError::ForGateway { .. }
        | TokenError::NotForGateway { .. }
        | TokenError::WrongGateway { .. } => "token_wrong_scope",
        _ => "token_invalid",
    };
    Refusal::new(RefusalKind::PermissionDenied, reason, e.to_string())
}

impl Registrar {
    /// The agent behind a mutual-TLS call whose leaf certificate is `leaf`, at `now`.
    pub fn authenticate(
        &self,
        leaf: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Authenticated, Refusal> {
        let Some(leaf) = leaf else {
            return Err(Refusal::new(
                RefusalKind::Unauthenticated,
                "no_client_certificate",
                "the relay needs a client certificate: register with a bootstrap token first",
            ));
        };
        let bad = |e: String| {
            Refusal::new(
                RefusalKind::Unauthenticated,
                "bad_certificate",
                format!("client certificate: {e}"),
            )
        };
        let id = SpiffeId::from_certificate_der(leaf).map_err(|e| bad(e.to_string()))?;
        if !(id.is_agent() || id.is_gateway()) || id.trust_domain() != self.trust_domain {
            return Err(bad(format!(
                "{id} is not an agent or gateway of trust domain {}",
                self.trust_domain
            )));
        }
        let serial = certificate_serial(leaf).map_err(|e| bad(e.to_string()))?;
        let not_after = certificate_not_after(leaf).map_err(|e| bad(e.to_string()))?;
        if now >= not_after {
            return Err(Refusal::new(
                RefusalKind::Unauthenticated,
                "certificate_expired",
                format!(
                    "the certificate of {id} has expired; register again with a bootstrap token"
                ),
            ));
        }
        if self.hub.is_revoked(&id, &serial) {
            return Err(Refusal::revoked(&id));
        }
        Ok(Authenticated {
            id,
            serial,
            not_after,
        })
    }

    /// Registers node `node` of `datacenter` from `address` with bootstrap token `token` and a
    /// CSR for the key it generated.
    #[allow(clippy::too_many_arguments)]
    pub async fn register(
        &self,
        node: &str,
        gateway: Option<&str>,
        datacenter: &str,
        token: String,
        csr_der: &[u8],
        address: IpAddr,
        now: SystemTime,
    ) -> Result<Registered, Refusal> {
        let (id, registrant) = match gateway {
            None => (
                SpiffeId::agent(&self.trust_domain, datacenter, node),
                Registrant::Agent(node),
            ),
            Some(proxy) => (
                SpiffeId::gateway(&self.trust_domain, datacenter, proxy),
                Registrant::Gateway(proxy),
            ),
        };
        let id = id.map_err(|e| {
            let who =
                gateway.map_or_else(|| format!("node {node:?}"), |p| format!("gateway {p:?}"));
            Refusal::new(
                RefusalKind::InvalidArgument,
                "bad_request",
                format!("{who} / datacenter {datacenter:?}: {e}"),
            )
        })?;
        if self.hub.is_revoked(&id, "") {
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                "revoked",
                format!("agent {id} is revoked; re-admit it with `vmeshctl agent allow` first"),
            ));
        }
        // Everything that needs no Consul read comes first: a request that cannot be signed
        // must not spend a use of the token, and a token the watched copy refuses costs nothing.
        vmesh_tls::check_csr(csr_der).map_err(|e| {
            Refusal::new(RefusalKind::InvalidArgument, "bad_request", e.to_string())
        })?;
        let secret = Secret::new(token);
        self.tokens
            .precheck(&secret, registrant, now)
            .await
            .map_err(|e| token_refusal(&e))?;
        // An agent holds one registration at a time; a gateway's proxy id may be served by
        // several Envoys, each with its own certificate.
        let current = match gateway {
            Some(_) => Ok(None),
            None => self.registry.agent(&id).await,
        };
        match current {
            Ok(Some(record)) if record.not_after_unix > unix_secs(now) => {
                return Err(Refusal::new(
                    RefusalKind::PermissionDenied,
                    "already_registered",
                    format!(
                        "{id} is already registered (from {}, certificate valid until {} s since the Unix epoch); \
                         if this VM was rebuilt, run `vmeshctl agent revoke {node}` and `vmeshctl agent allow {node}` first",
                        record.address, record.not_after_unix,
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(unavailable(&e)),
        }
        let token = match self.registry.redeem(&secret, registrant, now).await {
            Ok(info) => info,
            Err(RegistryError::Token(e)) => return Err(token_refusal(&e)),
            Err(e) => return Err(unavailable(&e)),
        };
        let certificate = self
            .issue(&id, csr_der, token.id.clone(), address, now)
            .await?;
        // The token may have been revoked between redeeming it and recording the agent; its
        // revocation then missed this agent, so revoke it here.
        let revoked_meanwhile = self
            .registry
            .list_tokens()
            .await
            .map_err(|e| unavailable(&e))?
            .iter()
            .any(|t| t.id == token.id && t.revoked);
        if revoked_meanwhile {
            if id.is_agent() {
                self.registry
                    .revoke_agent(&id, "its bootstrap token was revoked", now)
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                "token_revoked",
                format!("bootstrap token {} has been revoked", token.id),
            ));
        }
        Ok(Registered {
            id,
            token: token.id,
            certificate,
        })
    }

    /// A new certificate for an authenticated agent, for the key of `csr_der`.
    pub async fn renew(
        &self,
        agent: &Authenticated,
        csr_der: &[u8],
        address: IpAddr,
        now: SystemTime,
    ) -> Result<IssuedCertificate, Refusal> {
        let Some(record) = self
            .registry
            .agent(&agent.id)
            .await
            .map_err(|e| unavailable(&e))?
        else {
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                "not_registered",
                format!(
                    "{} has no registration on record; register again with a bootstrap token",
                    agent.id
                ),
            ));
        };
        self.issue(&agent.id, csr_der, record.token_id, address, now)
            .await
    }

    /// Signs `csr_der` for `id` and records the agent. Returns what the agent stores.
    async fn issue(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
        token_id: TokenId,
        address: IpAddr,
        now: SystemTime,
    ) -> Result<IssuedCertificate, Refusal> {
        let issued = self.ca.sign(csr_der, id, self.cert_ttl).map_err(|e| {
            Refusal::new(RefusalKind::InvalidArgument, "bad_request", e.to_string())
        })?;
        let record = AgentRecord {
            spiffe_id: id.clone(),
            token_id,
            address: address.to_string(),
            serial: issued.serial.clone(),
            registered_unix: unix_secs(now),
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
