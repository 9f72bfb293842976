//! The CA abstraction and the built-in CA.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::id::{validate_trust_domain, Principal};
use crate::SpiffeId;

/// Default lifetime of a leaf certificate (agents renew at half-life).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Lifetime of a root created by [`BuiltinCa::load_or_create`].
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaves start this long before "now" to tolerate clock skew between VMs.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const KEY_FILE: &str = "ca.key";
const CERT_FILE: &str = "ca.pem";

/// Why the CA could not be loaded or refused to sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    #[error("refusing to sign {id}: this CA serves trust domain {trust_domain:?}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("certificate TTL must be greater than zero")]
    InvalidTtl,
    #[error("the CA certificate is not valid at this time (valid until {not_after_unix} s since the Unix epoch)")]
    CaExpired { not_after_unix: u64 },
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    #[error("invalid CA private key: {0}")]
    InvalidKey(String),
    #[error(transparent)]
    InvalidId(#[from] crate::IdError),
    #[error("the CA private key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotACa,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to load CA key {}: its mode is {mode:04o}, readable or writable by group/others; run `chmod 600 {}`",
        path.display(), path.display()
    )]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error(
        "CA directory is incomplete: {} exists but {} does not; restore it, or remove both to create a new CA (existing agents must then re-register)",
        present.display(), missing.display()
    )]
    IncompleteCaDir { present: PathBuf, missing: PathBuf },
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("the system random number generator failed")]
    Random,
}

/// A signed leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// DER certificates: the leaf first, then any intermediates. The root is not included;
    /// it is in [`CertificateAuthority::trust_bundle_pem`].
    pub chain_der: Vec<Vec<u8>>,
    /// End of validity (whole seconds, as encoded in the certificate).
    pub not_after: SystemTime,
    /// Serial number as colon-separated lowercase hex bytes (Vault's format), e.g. `3f:0a:...`.
    pub serial: String,
}

impl IssuedCertificate {
    /// The leaf certificate.
    pub fn leaf_der(&self) -> &[u8] {
        self.chain_der
            .first()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

/// What the relay needs from a certificate authority. Implemented by [`BuiltinCa`] and, later,
/// by a Vault PKI client.
pub trait CertificateAuthority: Send + Sync {
    /// PEM of the certificates that verify issued leaves (the root or roots).
    fn trust_bundle_pem(&self) -> String;

    /// Signs the public key of a CSR (whose signature is verified) for `id`, valid for `ttl` or
    /// until the CA itself expires, whichever is sooner. The CSR's own subject, SANs and
    /// extensions are ignored: the certificate carries exactly one URI SAN, `id`.
    fn sign(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError>;

    /// Signs the public key of a CSR for a controller's relay listener: a server certificate
    /// whose only names are `dns_names` (agents verify [`CONTROLLER_SERVER_NAME`]). Like
    /// [`sign`](Self::sign), the CSR's own names are ignored.
    fn sign_server(
        &self,
        csr_der: &[u8],
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError>;

    /// When the CA that signs last changed while certificates of the one before are still
    /// trusted (a rotation in progress), if it did: the controller then keeps its own
    /// certificate from the old CA until agents have had time to learn the new one.
    fn rotated_at(&self) -> Option<SystemTime> {
        None
    }
}

/// The DNS name every controller's relay certificate carries and every agent verifies,
/// whatever address it dials: the CA issues it only to controllers (agents' certificates carry a
/// SPIFFE URI and client authentication only), so it names "a controller of this mesh".
pub const CONTROLLER_SERVER_NAME: &str = "vmesh-controller";

/// The embedded CA: an ECDSA P-256 root kept in the controller's data directory, or an
/// operator-supplied CA certificate and key.
pub struct BuiltinCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate followed by its issuers, as supplied.
    ca_chain_der: Vec<Vec<u8>>,
    trust_bundle_pem: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl BuiltinCa {
    /// Loads `ca.key` and `ca.pem` from `dir`, or creates them (a new ECDSA P-256 root valid for
    /// ten years) if neither exists. The key file is written with mode 0600; an existing key file
    /// readable or writable by group or others is refused.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        let exists = |p: &Path| p.try_exists().map_err(io_err(p));
        match (exists(&key_path)?, exists(&cert_path)?) {
            (true, true) => {
                let mode = fs::metadata(&key_path)
                    .map_err(io_err(&key_path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(CaError::InsecureKeyFile {
                        path: key_path,
                        mode: mode & 0o7777,
                    });
                }
                let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
                let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
                Self::from_pem(&cert_pem, &key_pem, trust_domain)
            }
            (false, false) => {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
                let (cert_pem, key_pem) = create_root()?;
                // Key first: a directory with a certificate but no key is reported, never
                // silently replaced.
                write_file(&key_path, key_pem.as_bytes(), 0o600)?;
                write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
                Self::from_pem(&cert_pem, &key_pem, trust_domain)
            }
            (true, false) => Err(CaError::IncompleteCaDir {
                present: key_path,
                missing: cert_path,
            }),
            (false, true) => Err(CaError::IncompleteCaDir {
                present: cert_path,
                missing: key_path,
            }),
        }
    }

    /// An operator-supplied CA. `cert_pem` holds the signing CA certificate, optionally followed
    /// by its issuers up to the root; the last certificate is the trust bundle and the others are
    /// sent with each leaf. `key_pem` is the CA's PKCS#8 private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::InvalidKey(e.to_string()))?;
        let mut ca_chain_der = Vec::new();
        for pem in x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes()) {
            let pem = pem.map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
            if pem.label != "CERTIFICATE" {
                return Err(CaError::InvalidCertificate(format!(
                    "unexpected PEM block {:?} in the CA certificate file",
                    pem.label
                )));
            }
            ca_chain_der.push(pem.contents);
        }
        let (Some(signing_der), Some(root_der)) = (ca_chain_der.first(), ca_chain_der.last())
        else {
            return Err(CaError::InvalidCertificate(
                "no PEM certificate found".into(),
            ));
        };
        let (_, cert) = x509_parser::parse_x509_certificate(signing_der)
            .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(CaError::NotACa);
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let not_before = unix_to_system(cert.validity().not_before.timestamp());
        let not_after = unix_to_system(cert.validity().not_after.timestamp());
        let trust_bundle_pem = der_to_pem(root_der);
        let issuer = Issuer::from_ca_cert_der(&signing_der.as_slice().into(), key)
            .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
        let chain_len = ca_chain_der.len();
        ca_chain_der.truncate(chain_len - 1);
        Ok(BuiltinCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            ca_chain_der,
            trust_bundle_pem,
            not_before,
            not_after,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// End of the CA certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// [`CertificateAuthority::sign`] at a given time (for tests and replay).
    pub fn sign_at(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let uri = id
            .to_string()
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Signing(e.to_string()))?;
        let extended_key_usages = match id.principal() {
            // Agents and gateways only ever dial the controller with it.
            Principal::Agent(_) | Principal::Gateway(_) => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
            // Workloads are both ends of mesh mTLS.
            Principal::Service(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        self.issue(
            csr_der,
            vec![SanType::URI(uri)],
            extended_key_usages,
            ttl,
            now,
        )
    }

    /// [`CertificateAuthority::sign_server`] at a given time.
    pub fn sign_server_at(
        &self,
        csr_der: &[u8],
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        if dns_names.is_empty() {
            return Err(CaError::Signing(
                "a server certificate needs a DNS name".into(),
            ));
        }
        let mut sans = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            let dns = name
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Signing(format!("DNS name {name:?}: {e}")))?;
            sans.push(SanType::DnsName(dns));
        }
        self.issue(
            csr_der,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            ttl,
            now,
        )
    }

    fn issue(
        &self,
        csr_der: &[u8],
        subject_alt_names: Vec<SanType>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl);
        }
        if now >= self.not_after || now < self.not_before {
            return Err(CaError::CaExpired {
                not_after_unix: unix_secs(self.not_after),
            });
        }
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|e| CaError::InvalidCsr(e.to_string()))?;

        let not_before = now
            .checked_sub(CLOCK_SKEW)
            .unwrap_or(UNIX_EPOCH)
            .max(self.not_before);
        let not_after = now
            .checked_add(ttl)
            .unwrap_or(self.not_after)
            .min(self.not_after);
        let not_after = unix_to_system(unix_secs(not_after) as i64);

        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        // Empty subject: the identity is in the SANs alone (rcgen then marks them critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);

        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain_der = vec![leaf.der().to_vec()];
        chain_der.extend(self.ca_chain_der.iter().cloned());
        Ok(IssuedCertificate {
            chain_der,
            not_after,
            serial: colon_hex(&serial),
        })
    }
}

impl CertificateAuthority for BuiltinCa {
    fn trust_bundle_pem(&self) -> String {
        self.trust_bundle_pem.clone()
    }

    fn sign(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign_at(csr_der, id, ttl, SystemTime::now())
    }

    fn sign_server(
        &self,
        csr_der: &[u8],
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.sign_server_at(csr_der, dns_names, ttl, SystemTime::now())
    }
}

/// Checks that `csr_der` is a PKCS#10 request whose signature verifies, as signing would,
/// without signing anything (e.g. before spending a bootstrap token on it).
pub fn check_csr(csr_der: &[u8]) -> Result<(), CaError> {
    CertificateSigningRequestParams::from_der(&csr_der.into())
        .map(|_| ())
        .map_err(|e| CaError::InvalidCsr(e.to_string()))
}

/// A private key in PKCS#8 PEM. `Debug` prints `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: impl Into<String>) -> Self {
        PrivateKeyPem(pem.into())
    }

    /// The PEM text, to write to a 0600 file or hand to a TLS library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem([redacted])")
    }
}

/// A new ECDSA P-256 key pair and a CSR for it (DER). The CSR names nothing: the CA sets the
/// identity. The key never leaves the machine that called this; only the CSR is sent.
pub fn new_key_and_csr() -> Result<(PrivateKeyPem, Vec<u8>), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    Ok((PrivateKeyPem(key.serialize_pem()), csr.der().to_vec()))
}

/// PEM of DER certificates, in order.
pub fn certificates_to_pem<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(der_to_pem).collect()
}

/// The serial number of a DER certificate, in the format of [`IssuedCertificate::serial`].
pub fn certificate_serial(der: &[u8]) -> Result<String, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    Ok(colon_hex(cert.raw_serial()))
}

/// The end of validity of a DER certificate (for renewal at half-life).
pub fn certificate_not_after(der: &[u8]) -> Result<SystemTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    Ok(unix_to_system(cert.validity().not_after.timestamp()))
}

fn create_root() -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vmesh");
    dn.push(DnType::CommonName, "vmesh root CA");
    params.distinguished_name = dn;
    // Signs leaves only; a Vault-backed intermediate is a different CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    params.not_before = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
    params.not_after = to_offset(now.checked_add(ROOT_TTL).unwrap_or(now));
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `contents` to `path` through a temporary file and a rename, with `mode` set
/// explicitly (the umask can only narrow the mode given at creation).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let io_err = |p: &Path| {
        let path = p.to_owned();
        move |source| CaError::Io { path, source }
    };
    // A leftover from an interrupted start; it never held a key that was in use.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// 16 random bytes, positive and without a leading zero byte, so the DER encoding is exactly
/// these bytes and the serial string matches what a parser reports.
fn random_serial() -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    crate::random_bytes(&mut serial).map_err(|_| CaError::Random)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

pub(crate) fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn der_to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// A CSR in PEM (`CERTIFICATE REQUEST`), as Vault's `sign` takes it.
pub fn csr_to_pem(csr_der: &[u8]) -> String {
    pem_block("CERTIFICATE REQUEST", csr_der)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_to_system(secs: i64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
        .unwrap_or(UNIX_EPOCH)
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix_secs(t) as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
