//! Vault PKI as the mesh CA: the relay's [`CertificateAuthority`] with every certificate signed
//! by the organisation's Vault (`<pki>/sign/<role>`), as Consul's Vault CA provider does.
//!
//! - An agent's certificate carries exactly one URI SAN, its SPIFFE id, and no common name; the
//!   controller's relay certificate carries the name `vmesh-controller`. The role must allow
//!   both (docs/tls.md gives it); the CSR's own names are never used.
//! - The trust bundle is every CA certificate the mount has had since the controller started
//!   (`<pki>/cert/ca`, read every `--vault-pki-poll-interval`): when the CA rotates, certificates of the old and
//!   the new one verify, and agents get both at their next registration or renewal. A CA is
//!   dropped from the bundle once it has been replaced for longer than [`KEEP_REPLACED`]. Meanwhile
//!   the controller keeps its own certificate from the old CA until agents have renewed
//!   (`tls::renewal_time`).
//!
//! The relay's CA interface is synchronous; signing here waits for Vault on the calling worker
//! ([`tokio::task::block_in_place`]), within the client's request timeout.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tracing::{info, warn};
use vmesh_retry::Backoff;
use vmesh_runtime::Shutdown;
use vmesh_tls::{
    certificate_not_after, check_csr, CaError, CertificateAuthority, IssuedCertificate, SpiffeId,
};
use vmesh_vault::{SignRequest, Vault};

/// How long a replaced CA stays trusted: longer than any certificate it signed lives.
pub const KEEP_REPLACED: Duration = Duration::from_secs(7 * 24 * 3600);

struct Bundle {
    /// The CA certificates trusted, newest last, with when each was replaced.
    cas: Vec<(String, Option<Instant>)>,
    /// When the newest one replaced another (wall clock, for the controller's certificate).
    rotated: Option<SystemTime>,
}

impl Bundle {
    fn pem(&self) -> String {
        self.cas.iter().map(|(pem, _)| pem.as_str()).collect()
    }

    /// Records the mount's current CA. Returns whether it is new.
    fn observe(&mut self, pem: &str, now: Instant) -> bool {
        let pem = normalize(pem);
        self.cas.retain(|(_, replaced)| {
            replaced.is_none_or(|at| now.duration_since(at) < KEEP_REPLACED)
        });
        if self.cas.last().is_some_and(|(last, _)| *last == pem) {
            return false;
        }
        for (_, replaced) in &mut self.cas {
            replaced.get_or_insert(now);
        }
        self.cas.retain(|(old, _)| *old != pem);
        if !self.cas.is_empty() {
            self.rotated = Some(SystemTime::now());
        }
        self.cas.push((pem, None));
        true
    }
}

fn normalize(pem: &str) -> String {
    let mut pem = pem.trim().to_string();
    pem.push('\n');
    pem
}

pub struct VaultCa {
    vault: Arc<Vault>,
    mount: String,
    role: String,
    trust_domain: String,
    bundle: RwLock<Bundle>,
    /// How often the CA is read for a rotation.
    poll: Duration,
}

impl VaultCa {
    /// Reads the CA certificate and waits for the Vault login, for up to `patience` (Vault may
    /// be starting too).
    pub async fn start(
        vault: Arc<Vault>,
        mount: String,
        role: String,
        trust_domain: String,
        poll: Duration,
        patience: Duration,
    ) -> anyhow::Result<VaultCa> {
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let pem = loop {
            match vault.pki_ca_pem(&mount).await {
                Ok(pem) => break pem,
                Err(e) if Instant::now() < deadline => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, "cannot read the Vault PKI CA yet");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => anyhow::bail!("cannot read the CA of Vault PKI mount {mount:?}: {e}"),
            }
        };
        check_pem(&pem)?;
        // Signing needs the token that the token task logs in with.
        while let Err(e) = vault.logged_in().await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "Vault PKI is the mesh CA, but the controller cannot log in to Vault: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        info!(mount = %mount, role = %role, "Vault PKI is the mesh CA");
        let mut bundle = Bundle {
            cas: Vec::new(),
            rotated: None,
        };
        bundle.observe(&pem, Instant::now());
        Ok(VaultCa {
            vault,
            mount,
            role,
            trust_domain,
            bundle: RwLock::new(bundle),
            poll,
        })
    }

    /// Reads the CA every poll interval and trusts a new one next to the old, until shutdown.
    pub async fn watch_rotation(self: Arc<Self>, mut shutdown: Shutdown) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.poll) => {}
                () = shutdown.requested() => return Ok(()),
            }
            match self.vault.pki_ca_pem(&self.mount).await {
                Ok(pem) if check_pem(&pem).is_ok() => {
                    let new = self
                        .bundle
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .observe(&pem, Instant::now());
                    if new {
                        info!(mount = %self.mount, "the Vault PKI CA changed: certificates of the old and the new CA are trusted");
                    }
                }
                Ok(_) => {
                    warn!(mount = %self.mount, "the Vault PKI CA is not a PEM certificate; keeping the CA trusted so far")
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the Vault PKI CA; keeping the CA trusted so far")
                }
            }
        }
    }

    fn sign_request(
        &self,
        csr_der: &[u8],
        request: SignRequest,
    ) -> Result<IssuedCertificate, CaError> {
        check_csr(csr_der)?;
        let vault = self.vault.clone();
        let (mount, role) = (self.mount.clone(), self.role.clone());
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| CaError::InvalidCertificate("Vault PKI needs the async runtime".into()))?;
        let signed = tokio::task::block_in_place(|| {
            handle.block_on(async move { vault.pki_sign(&mount, &role, &request).await })
        })
        .map_err(|e| CaError::InvalidCertificate(format!("Vault PKI: {e}")))?;
        let mut chain_der = Vec::new();
        for pem in &signed.chain_pem {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der =
                    der.map_err(|e| CaError::InvalidCertificate(format!("Vault PKI answer: {e}")))?;
                chain_der.push(der.as_ref().to_vec());
            }
        }
        if chain_der.is_empty() {
            return Err(CaError::InvalidCertificate(
                "Vault PKI returned no certificate".into(),
            ));
        }
        let leaf = chain_der.remove(0);
        let not_after = certificate_not_after(&leaf)?;
        // The roots are in the trust bundle; the chain is the leaf and any intermediates.
        let bundle = self.trust_bundle_pem();
        let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(bundle.as_bytes())
            .filter_map(Result::ok)
            .map(|d| d.as_ref().to_vec())
            .collect();
        chain_der.retain(|der| !roots.contains(der) && *der != leaf);
        chain_der.dedup();
        chain_der.insert(0, leaf);
        Ok(IssuedCertificate {
            chain_der,
            not_after,
            serial: signed.serial,
        })
    }
}

fn check_pem(pem: &str) -> anyhow::Result<()> {
    let n = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the Vault PKI CA is not PEM: {e}"))?
        .len();
    anyhow::ensure!(n > 0, "the Vault PKI CA holds no certificate");
    Ok(())
}

impl CertificateAuthority for VaultCa {
    fn trust_bundle_pem(&self) -> String {
        self.bundle.read().unwrap_or_else(|e| e.into_inner()).pem()
    }

    fn rotated_at(&self) -> Option<SystemTime> {
        let bundle = self.bundle.read().unwrap_or_else(|e| e.into_inner());
        // Only while the old CA is still trusted.
        bundle.rotated.filter(|_| bundle.cas.len() > 1)
    }

    fn sign(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl);
        }
        self.sign_request(
            csr_der,
            SignRequest {
                csr_pem: vmesh_tls::csr_to_pem(csr_der),
                common_name: String::new(),
                alt_names: vec![],
                uri_sans: vec![id.to_string()],
                ttl,
            },
        )
    }

    fn sign_server(
        &self,
        csr_der: &[u8],
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl);
        }
        let (first, rest) = dns_names.split_first().ok_or_else(|| {
            CaError::InvalidCertificate("a server certificate needs a name".into())
        })?;
        self.sign_request(
            csr_der,
            SignRequest {
                csr_pem: vmesh_tls::csr_to_pem(csr_der),
                common_name: first.clone(),
                alt_names: rest.to_vec(),
                uri_sans: vec![],
                ttl,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_ca_is_trusted_next_to_the_old_one_until_it_has_been_replaced_long_enough() {
        let t0 = Instant::now();
        let mut b = Bundle {
            cas: Vec::new(),
            rotated: None,
        };
        assert!(b.observe("OLD", t0));
        assert!(!b.observe("OLD\n", t0 + Duration::from_secs(60)));
        assert_eq!(b.pem(), "OLD\n");
        assert_eq!(b.rotated, None, "the first CA is no rotation");
        assert!(b.observe("NEW", t0 + Duration::from_secs(120)));
        assert_eq!(b.pem(), "OLD\nNEW\n");
        assert!(b.rotated.is_some());
        // Long after the rotation, the old one goes.
        assert!(!b.observe("NEW", t0 + KEEP_REPLACED + Duration::from_secs(121)));
        assert_eq!(b.pem(), "NEW\n");
    }
}
