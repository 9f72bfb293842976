//! Checks of TLS material read from Vault or a secrets directory, before any of it reaches a
//! proxy: a certificate chain and its key ([`check_certificate`]) and a CA bundle
//! ([`check_ca_bundle`]). Errors say what is wrong without quoting the material.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// Most certificates one chain or bundle may hold, and the most bytes of PEM in one field.
pub const MAX_CERTIFICATES: usize = 32;
pub const MAX_PEM_BYTES: usize = 256 * 1024;

/// A certificate chain and key that belong together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedCertificate {
    /// The leaf's DNS names, lowercase, wildcards as `*.example.com`.
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// A CA bundle that parses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedBundle {
    pub certificates: usize,
    /// The earliest `notAfter` among them.
    pub not_after: SystemTime,
}

fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(format!(
            "{what} is {} bytes; the limit is {MAX_PEM_BYTES}",
            pem.len()
        ));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .take(MAX_CERTIFICATES + 1)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{what} is not PEM"))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no PEM certificate"));
    }
    if certs.len() > MAX_CERTIFICATES {
        return Err(format!(
            "{what} holds more than {MAX_CERTIFICATES} certificates"
        ));
    }
    Ok(certs)
}

fn parse<'a>(der: &'a CertificateDer<'_>, what: &str) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|_| format!("{what} is not an X.509 certificate"))
}

fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = cert.validity().not_after.timestamp();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Checks `cert` (PEM chain, leaf first) against `key` (PEM private key: PKCS#8, PKCS#1 or
/// SEC1): both parse, the key is the leaf's, the leaf has at least one DNS name and has not
/// expired at `now`.
pub fn check_certificate(
    cert: &str,
    key: &str,
    now: SystemTime,
) -> Result<CheckedCertificate, String> {
    let chain = certificates(cert, "cert")?;
    let leaf = parse(&chain[0], "the first certificate of cert")?;
    for (i, der) in chain.iter().enumerate().skip(1) {
        parse(der, &format!("certificate {} of cert", i + 1))?;
    }
    if key.len() > MAX_PEM_BYTES {
        return Err(format!("key is over {MAX_PEM_BYTES} bytes"));
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|_| "key is not a PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string())?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| "key is not an RSA, ECDSA or Ed25519 private key".to_string())?;
    let public = signing
        .public_key()
        .ok_or_else(|| "the public half of key cannot be derived".to_string())?;
    if public.as_ref() != leaf.tbs_certificate.subject_pki.raw {
        return Err("key does not match the certificate (the first one of cert)".into());
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                let dns = dns.to_ascii_lowercase();
                if !names.contains(&dns) {
                    names.push(dns);
                }
            }
        }
    }
    if names.is_empty() {
        return Err(
            "the certificate has no DNS name (subject alternative name): clients would refuse it"
                .into(),
        );
    }
    let expires = not_after(&leaf);
    if expires <= now {
        return Err(format!(
            "the certificate expired at {}",
            humantime_rfc3339(expires)
        ));
    }
    Ok(CheckedCertificate {
        names,
        not_after: expires,
    })
}

/// Checks a CA bundle: PEM certificates that parse.
pub fn check_ca_bundle(ca: &str) -> Result<CheckedBundle, String> {
    let certs = certificates(ca, "ca")?;
    let mut earliest = None;
    for (i, der) in certs.iter().enumerate() {
        let cert = parse(der, &format!("certificate {} of ca", i + 1))?;
        let t = not_after(&cert);
        earliest = Some(earliest.map_or(t, |e: SystemTime| e.min(t)));
    }
    Ok(CheckedBundle {
        certificates: certs.len(),
        not_after: earliest.unwrap_or(UNIX_EPOCH),
    })
}

/// RFC 3339 (UTC, seconds) of a time.
pub fn humantime_rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dt = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str], days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_good_pair_gives_its_names_and_expiry() {
        let (cert, key) = self_signed(&["Shop.example.com", "*.example.com"], 30);
        let checked = check_certificate(&cert, &key, SystemTime::now()).unwrap();
        assert_eq!(checked.names, ["shop.example.com", "*.example.com"]);
        assert!(checked.not_after > SystemTime::now() + Duration::from_secs(29 * 86400));
    }

    #[test]
    fn bad_material_is_refused_with_the_reason_and_without_quoting_it() {
        let (cert, key) = self_signed(&["shop.example.com"], 30);
        let (_, other_key) = self_signed(&["shop.example.com"], 30);
        let now = SystemTime::now();
        let e = check_certificate(&cert, &other_key, now).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let e = check_certificate("hello", &key, now).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = check_certificate(
            &cert,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            now,
        )
        .unwrap_err();
        assert!(e.contains("key"), "{e}");
        assert!(!e.contains("AAAA"));
        let (expired, expired_key) = self_signed(&["shop.example.com"], -1);
        let e = check_certificate(&expired, &expired_key, now).unwrap_err();
        assert!(e.contains("expired at"), "{e}");
        // No DNS name: only an IP address.
        let (ip_only, ip_key) = self_signed(&["127.0.0.1"], 30);
        let e = check_certificate(&ip_only, &ip_key, now).unwrap_err();
        assert!(e.contains("no DNS name"), "{e}");
    }

    #[test]
    fn oversized_material_is_refused_before_it_is_parsed() {
        let huge = "A".repeat(MAX_PEM_BYTES + 1);
        let e = check_certificate(&huge, "k", SystemTime::now()).unwrap_err();
        assert_eq!(
            e,
            format!(
                "cert is {} bytes; the limit is {MAX_PEM_BYTES}",
                MAX_PEM_BYTES + 1
            )
        );
        let (cert, _) = self_signed(&["a"], 30);
        let e = check_certificate(&cert, &huge, SystemTime::now()).unwrap_err();
        assert!(e.contains("key is over"), "{e}");
        let many = cert.repeat(MAX_CERTIFICATES + 1);
        let e = check_ca_bundle(&many).unwrap_err();
        assert!(e.contains("more than 32 certificates"), "{e}");
    }

    #[test]
    fn a_ca_bundle_counts_its_certificates() {
        let (a, _) = self_signed(&["ca-a"], 30);
        let (b, _) = self_signed(&["ca-b"], 10);
        let checked = check_ca_bundle(&format!("{a}{b}")).unwrap();
        assert_eq!(checked.certificates, 2);
        assert!(check_ca_bundle("nope").is_err());
    }
}
