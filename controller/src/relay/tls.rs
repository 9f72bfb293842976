//! The relay listener's TLS.
//!
//! - The server certificate comes from the mesh CA for [`CONTROLLER_SERVER_NAME`]; its key is
//!   made in memory and never written anywhere. It is re-issued at half-life without a restart:
//!   new handshakes get the new one.
//! - A client certificate is optional at the handshake (`Registration` has none: the bootstrap
//!   token is its credential) but, when one is presented, it must chain to the mesh CA, be valid
//!   now and be meant for client authentication, or the handshake fails. The `Relay` service then
//!   requires one (see `service.rs`).
//! - Every refused handshake is logged with the peer address and counted by reason.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
use vmesh_tls::{new_key_and_csr, CertificateAuthority, CONTROLLER_SERVER_NAME};

use super::refusals::Refusals;
use crate::listener::{Acceptor, Guarded};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The controller's current server certificate, swapped in place when renewed.
#[derive(Debug)]
pub struct ServerCert {
    names: Vec<String>,
    ttl: Duration,
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<SystemTime>,
}

impl ServerCert {
    /// Issues the first certificate for [`CONTROLLER_SERVER_NAME`] and `extra_names`.
    pub fn issue(
        ca: &dyn CertificateAuthority,
        extra_names: &[String],
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        let mut names = vec![CONTROLLER_SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().cloned());
        names.dedup();
        let (key, not_after) = certified_key(ca, &names, ttl)?;
        Ok(ServerCert {
            names,
            ttl,
            current: RwLock::new(Arc::new(key)),
            not_after: RwLock::new(not_after),
        })
    }

    /// When the current certificate should be replaced: half-way through its life.
    pub fn renew_at(&self, issued: SystemTime) -> SystemTime {
        let not_after = *self.not_after.read().unwrap_or_else(|e| e.into_inner());
        let life = not_after.duration_since(issued).unwrap_or_default();
        issued + life / 2
    }

    /// Issues a new certificate and serves it to new handshakes from now on.
    pub fn renew(&self, ca: &dyn CertificateAuthority) -> anyhow::Result<SystemTime> {
        let (key, not_after) = certified_key(ca, &self.names, self.ttl)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *self.not_after.write().unwrap_or_else(|e| e.into_inner()) = not_after;
        Ok(not_after)
    }

    /// Renews the certificate at every half-life, until a shutdown is asked for.
    pub async fn keep_renewed(
        self: Arc<Self>,
        ca: Arc<dyn CertificateAuthority>,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let mut issued = SystemTime::now();
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut wait = Duration::ZERO;
        loop {
            if wait.is_zero() {
                wait = self
                    .renew_at(issued)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
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
                        "relay server certificate renewed"
                    );
                }
                Err(e) => {
                    wait = backoff.next_delay().max(Duration::from_secs(1));
                    warn!(error = %e, retry_in_s = wait.as_secs(), "cannot renew the relay server certificate");
                }
            }
        }
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

/// The listener's TLS configuration: our certificate, and client certificates verified against
/// `trust_bundle_pem` when presented.
pub fn server_config(
    cert: Arc<ServerCert>,
    trust_bundle_pem: &str,
) -> anyhow::Result<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
        let der = der.map_err(|e| anyhow::anyhow!("trust bundle: {e}"))?;
        roots
            .add(der)
            .map_err(|e| anyhow::anyhow!("trust bundle: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()?;
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
    let first_bytes = listener.limits().first_bytes;
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
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        // The place under the cap goes with the connection; the silence
                        // deadline starts after the handshake.
                        let _ = tx.send(Ok(Guarded::new(tls, permit, first_bytes))).await;
                    }
                    Ok(Err(e)) => refused(&refusals, peer, &e),
                    Err(_) => refusals.note("handshake_timeout", Some(peer), || {
                        warn!(%peer, "relay TLS handshake refused: not completed within 10 s");
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
                debug!(%peer, error = %error, "relay connection closed during the TLS handshake");
            });
            return;
        }
    };
    refusals.note(reason, Some(peer), || {
        warn!(%peer, reason, error = %error, "relay TLS handshake refused");
    });
}
