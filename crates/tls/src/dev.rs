//! Development certificates: a throwaway CA and a server certificate it signed, for demos and
//! tests on one machine (`vmeshctl dev-cert`). Not for production: the CA's key is dropped, so
//! nothing else can ever be signed by it, and the certificates are for local names.

use crate::ca::CaError;

/// A server certificate, its key and the CA that signed it, in PEM.
pub struct DevCertificate {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA and a server certificate for `names` (DNS names), valid for `days` days.
pub fn dev_certificate(names: &[String], days: u32) -> Result<DevCertificate, CaError> {
    let err = |e: rcgen::Error| CaError::InvalidCertificate(e.to_string());
    let now = time::OffsetDateTime::now_utc();
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "vmesh development CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(i64::from(days) + 1);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let ca_pem = ca_cert.pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut leaf = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    if let Some(first) = names.first() {
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, first.as_str());
    }
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(i64::from(days));
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
    Ok(DevCertificate {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
