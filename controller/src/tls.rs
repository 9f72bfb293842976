//! The TLS of the controller's mesh ports (the relay, and the xDS port when it is
//! authenticated), from the mesh CA.
//!
//! - [`load_ca`]: the mesh CA: an operator's (`--ca-cert`, `--ca-key`) or the built-in one in
//!   `--data-dir`.
//! - [`ServerCert`]: the controller's server certificate for [`CONTROLLER_SERVER_NAME`], one
//!   for both ports; its key is made in memory and never written anywhere. It is re-issued at
//!   half-life without a restart: new handshakes get the new one.
//! - [`server_config`]: a client certificate, when presented, must chain to the mesh CA, be
//!   valid now and be meant for client authentication, or the handshake fails. On the relay it
//!   is optional at the handshake (`Registration` has none: the bootstrap token is its
//!   credential; the `Relay` service then requires one); on the xDS port it is required.
//! - [`incoming`]: handshakes done concurrently under the port's limits; every refused
//!   handshake is counted by reason and logged (once per reason and window).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};
use vmesh_layout::unix_secs;
use vmesh_retry::Backoff;
use vmesh_runtime::Shutdown;
use vmesh_tls::{
    certificate_not_after, new_key_and_csr, BuiltinCa, CertificateAuthority, CONTROLLER_SERVER_NAME,
};

use crate::listener::{Acceptor, Guarded};
use crate::refusals::Refusals;

/// The mesh CA: the operator's (`ca_cert` and `ca_key`, PEM files), else the built-in one in
/// `<data_dir>/ca/` (created on first start).
pub fn load_ca(
    ca_cert: Option<&Path>,
    ca_key: Option<&Path>,
    data_dir: Option<&Path>,
    trust_domain: &str,
) -> anyhow::Result<BuiltinCa> {
    match (ca_cert, ca_key, data_dir) {
        (Some(cert), Some(key), _) => {
            let cert_pem = std::fs::read_to_string(cert)
                .with_context(|| format!("--ca-cert {}", cert.display()))?;
            let key_pem = std::fs::read_to_string(key)
                .with_context(|| format!("--ca-key {}", key.display()))?;
            BuiltinCa::from_pem(&cert_pem, &key_pem, trust_domain).context("--ca-cert/--ca-key")
        }
        (_, _, Some(dir)) => {
            let dir = dir.join("ca");
            let ca = BuiltinCa::load_or_create(&dir, trust_domain)
                .with_context(|| format!("built-in CA in {}", dir.display()))?;
            info!(dir = %dir.display(), "using the built-in CA");
            Ok(ca)
        }
        _ => anyhow::bail!(
            "the relay needs a CA: --data-dir (the built-in CA keeps its key there) or --ca-cert and --ca-key"
        ),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The controller's current server certificate, swapped in place when renewed.
#[derive(Debug)]
pub struct ServerCert {
    names: Vec<String>,
    /// The lifetime of each certificate: twice the agents', so that the one in hand outlives a
    /// hold ([`renewal_time`]).
    ttl: Duration,
    /// After a CA rotation, how long the certificate from the old CA is kept: longer than the
    /// half-life at which every connected agent renews and learns the new CA.
    hold: Duration,
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<SystemTime>,
}

impl ServerCert {
    /// Issues the first certificate for [`CONTROLLER_SERVER_NAME`] and `extra_names`.
    ///
    /// `agent_ttl` is the lifetime of agents' certificates: the controller's lives twice as long.
    pub fn issue(
        ca: &dyn CertificateAuthority,
        extra_names: &[String],
        agent_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let mut names = vec![CONTROLLER_SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().cloned());
        names.dedup();
        let ttl = agent_ttl * 2;
        let (key, not_after) = certified_key(ca, &names, ttl)?;
        Ok(ServerCert {
            names,
            ttl,
            hold: agent_ttl * 3 / 5,
            current: RwLock::new(Arc::new(key)),
            not_after: RwLock::new(not_after),
        })
    }

    /// When the current certificate should be replaced: half-way through its life, or, during a
    /// CA rotation, later ([`renewal_time`]).
    pub fn renew_at(&self, issued: SystemTime, rotated_at: Option<SystemTime>) -> SystemTime {
        let not_after = *self.not_after.read().unwrap_or_else(|e| e.into_inner());
        renewal_time(issued, not_after, rotated_at, self.hold)
    }

    /// Issues a new certificate and serves it to new handshakes from now on.
    pub fn renew(&self, ca: &dyn CertificateAuthority) -> anyhow::Result<SystemTime> {
        let (key, not_after) = certified_key(ca, &self.names, self.ttl)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *self.not_after.write().unwrap_or_else(|e| e.into_inner()) = not_after;
        Ok(not_after)
    }

    /// Renews the certificate at every half-life (later during a CA rotation), until a shutdown
    /// is asked for.
    pub async fn keep_renewed(
        self: Arc<Self>,
        ca: Arc<dyn CertificateAuthority>,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        // A rotation may start while we wait: look again at least this often.
        const RECHECK: Duration = Duration::from_secs(60);
        let mut issued = SystemTime::now();
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut wait = Duration::ZERO;
        loop {
            let retrying = !wait.is_zero();
            if !retrying {
                let due = self
                    .renew_at(issued, ca.rotated_at())
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if due > RECHECK {
                    tokio::select! {
                        () = tokio::time::sleep(RECHECK) => continue,
                        () = shutdown.requested() => return Ok(()),
                    }
                }
                wait = due.max(Duration::from_secs(1));
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.requested() => return Ok(()),
            }
            match self.renew(ca.as_ref()) {
                Ok(not_after) => {
                    issued = SystemTime::now();
                    backoff.reset();
                    wait = Duration::ZERO;
                    info!(
                        not_after_unix = unix_secs(not_after),
                        "controller server certificate renewed"
                    );
                }
                Err(e) => {
                    wait = backoff.next_delay().max(Duration::from_secs(1));
                    warn!(error = %e, retry_in_s = wait.as_secs(), "cannot renew the controller server certificate");
                }
            }
        }
    }
}

/// When a certificate issued at `issued` and valid until `not_after` should be replaced:
///
/// - at its half-life;
/// - but when the CA rotated after it was issued (`rotated_at`), not before `rotated_at + hold`:
///   agents verify the controller against the bundle they got at their last renewal, so a
///   certificate from the new CA would be refused by every agent that has not renewed since the
///   rotation. Holding the old one past their half-life lets every connected agent renew (and
///   learn the new CA) first;
/// - never later than nine tenths of its life.
pub fn renewal_time(
    issued: SystemTime,
    not_after: SystemTime,
    rotated_at: Option<SystemTime>,
    hold: Duration,
) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    let half = issued + life / 2;
    match rotated_at {
        Some(rotated) if rotated > issued => {
            let latest = issued + life * 9 / 10;
            half.max(rotated + hold).min(latest)
        }
        _ => half,
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn certified_key(
    ca: &dyn CertificateAuthority,
    names: &[String],
    ttl: Duration,
) -> anyhow::Result<(CertifiedKey, SystemTime)> {
    let (key, csr) = new_key_and_csr()?;
    let issued = ca.sign_server(&csr, names, ttl)?;
    let chain: Vec<CertificateDer<'static>> = issued
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key_der = PrivateKeyDer::from_pem_slice(key.expose().as_bytes())
        .map_err(|e| anyhow::anyhow!("the new server key does not parse: {e}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| anyhow::anyhow!("the new server key cannot sign: {e}"))?;
    Ok((CertifiedKey::new(chain, signing), issued.not_after))
}

/// Whether a port's clients must present a certificate at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCert {
    /// Verified when presented (the relay: registration has none).
    Optional,
    /// Required (the xDS port).
    Required,
}

/// A client certificate verifier over `trust_bundle_pem`.
fn webpki_verifier(
    trust_bundle_pem: &str,
    client: ClientCert,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
        let der = der.map_err(|e| anyhow::anyhow!("trust bundle: {e}"))?;
        roots
            .add(der)
            .map_err(|e| anyhow::anyhow!("trust bundle: {e}"))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    Ok(match client {
        ClientCert::Optional => builder.allow_unauthenticated().build()?,
        ClientCert::Required => builder.build()?,
    })
}

/// Verifies client certificates against the CA's trust bundle as it is at each handshake: when
/// a CA rotates (Vault PKI), certificates of the old and the new CA both verify without a
/// restart.
struct CurrentBundleVerifier {
    ca: Arc<dyn CertificateAuthority>,
    client: ClientCert,
    /// The bundle the verifier was built from, and the verifier.
    current: RwLock<(String, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for CurrentBundleVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentBundleVerifier")
            .finish_non_exhaustive()
    }
}

impl CurrentBundleVerifier {
    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let bundle = self.ca.trust_bundle_pem();
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0 == bundle {
                return current.1.clone();
            }
        }
        match webpki_verifier(&bundle, self.client) {
            Ok(v) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (bundle, v.clone());
                v
            }
            Err(e) => {
                warn!(error = %e, "the CA's new trust bundle is unusable; verifying against the last one");
                self.current
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .1
                    .clone()
            }
        }
    }
}

impl ClientCertVerifier for CurrentBundleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client == ClientCert::Required
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Hints are optional; clients here have one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// A listener's TLS configuration: our certificate, and client certificates verified against
/// the CA's trust bundle as it is at each handshake.
pub fn server_config(
    cert: Arc<ServerCert>,
    ca: Arc<dyn CertificateAuthority>,
    client: ClientCert,
) -> anyhow::Result<rustls::ServerConfig> {
    let first = webpki_verifier(&ca.trust_bundle_pem(), client)?;
    let verifier = Arc::new(CurrentBundleVerifier {
        current: RwLock::new((ca.trust_bundle_pem(), first)),
        ca,
        client,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    // gRPC is HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepted TLS connections (under the port's limits), handshakes done concurrently; refused
/// ones are logged and counted, never passed on. Ends when the stream is dropped.
pub fn incoming(
    mut listener: Acceptor,
    config: rustls::ServerConfig,
    refusals: Arc<Refusals>,
) -> ReceiverStream<Result<Guarded<TlsStream<TcpStream>>, io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let limits = listener.limits();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer, permit) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        // The place under the cap goes with the connection; the silence
                        // deadline starts after the handshake; the connection ends when the
                        // client certificate does.
                        let expiry = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|leaf| certificate_not_after(leaf).ok());
                        let mut conn = Guarded::new(tls, permit, limits.first_bytes);
                        if let Some(not_after) = expiry {
                            conn = conn.with_lifetime(
                                not_after
                                    .duration_since(SystemTime::now())
                                    .unwrap_or_default(),
                            );
                        }
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => refused(&refusals, peer, &e),
                    Err(_) => refusals.note("handshake_timeout", Some(peer), || {
                        warn!(%peer, timeout = ?limits.handshake, "TLS handshake refused: not completed in time");
                    }),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(refusals: &Refusals, peer: SocketAddr, error: &io::Error) {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let reason = match tls {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "certificate_expired"
            }
            rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. } => "certificate_not_yet_valid",
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => {
                "unknown_ca"
            }
            rustls::CertificateError::Revoked => "certificate_revoked",
            _ => "bad_certificate",
        },
        Some(_) => "tls_handshake",
        // The client hung up or spoke something else than TLS.
        None => {
            refusals.note("tls_handshake", Some(peer), || {
                debug!(%peer, error = %error, "connection closed during the TLS handshake");
            });
            return;
        }
    };
    refusals.note(reason, Some(peer), || {
        warn!(%peer, reason, error = %error, "TLS handshake refused");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_certificate_is_renewed_at_half_life_or_held_through_a_ca_rotation() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // Agents' certificates live 24 h: the controller's 48 h, held 14.4 h after a rotation.
        let (not_after, hold) = (t0 + 48 * HOUR, HOUR * 144 / 10);
        assert_eq!(renewal_time(t0, not_after, None, hold), t0 + 24 * HOUR);
        // A rotation before this certificate was issued: it is from the new CA already.
        assert_eq!(
            renewal_time(t0, not_after, Some(t0 - HOUR), hold),
            t0 + 24 * HOUR
        );
        // A rotation just before the half-life: held until every agent has renewed.
        assert_eq!(
            renewal_time(t0, not_after, Some(t0 + 23 * HOUR), hold),
            t0 + 23 * HOUR + hold
        );
        // Early in its life: the half-life comes after the hold anyway.
        assert_eq!(
            renewal_time(t0, not_after, Some(t0 + HOUR), hold),
            t0 + 24 * HOUR
        );
        // Never past nine tenths of its life.
        assert_eq!(
            renewal_time(t0, not_after, Some(t0 + 40 * HOUR), hold),
            t0 + HOUR * 432 / 10
        );
    }
}
