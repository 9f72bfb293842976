//! Certificates and identities for vmesh.
//!
//! - [`SpiffeId`]: the SPIFFE identities of workloads and agents.
//! - [`CertificateAuthority`]: what the relay needs from a CA; [`BuiltinCa`] is the embedded
//!   implementation (a Vault PKI one implements the same trait).
//! - [`tokens`]: bootstrap tokens, stored only as hashes.
//! - [`DenyList`]: revoked agents, checked on every stream.
//! - [`material`]: checks of TLS material (certificate, key, CA bundle) before it is served.
//! - [`envoy`]: the SDS files a gateway's Envoy reads its xDS client certificate from.
//!
//! Pure library: no I/O except [`BuiltinCa::load_or_create`], no async runtime.

mod ca;
mod deny;
pub mod dev;
pub mod envoy;
mod id;
pub mod material;
pub mod tokens;

pub use ca::{
    certificate_not_after, certificate_serial, certificates_to_pem, check_csr, csr_to_pem,
    new_key_and_csr, BuiltinCa, CaError, CertificateAuthority, IssuedCertificate, PrivateKeyPem,
    CONTROLLER_SERVER_NAME, DEFAULT_LEAF_TTL,
};
pub use deny::DenyList;
pub use id::{IdError, Principal, SpiffeId};

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), ring::error::Unspecified> {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new().fill(buf)
}
