//! The built-in CA end to end: CSRs made by rcgen, leaves checked with rustls's webpki verifier
//! and x509-parser.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use vmesh_tls::{
    certificate_not_after, certificate_serial, BuiltinCa, CaError, CertificateAuthority, SpiffeId,
    DEFAULT_LEAF_TTL,
};
use x509_parser::extensions::GeneralName;

const TD: &str = "vmesh.test";

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmesh-tls-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A CSR that asks for much more than it will get.
fn greedy_csr() -> Vec<u8> {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(vec!["evil.example.com".to_owned(), "10.0.0.1".to_owned()])
            .expect("params");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://vmesh.test/dc/dc1/svc/payments"
            .try_into()
            .expect("uri"),
    ));
    params
        .distinguished_name
        .push(DnType::CommonName, "controller");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.serialize_request(&key).expect("csr").der().to_vec()
}

fn simple_csr() -> Vec<u8> {
    let key = KeyPair::generate().expect("key");
    CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .der()
        .to_vec()
}

fn verify_client(bundle_pem: &str, chain: &[Vec<u8>], at: SystemTime) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).expect("time"));
    verifier
        .verify_client_cert(
            &CertificateDer::from(chain[0].as_slice()),
            &intermediates,
            at,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn new_ca(name: &str) -> (TempDir, BuiltinCa) {
    let dir = TempDir::new(name);
    let ca = BuiltinCa::load_or_create(&dir.0, TD).expect("ca");
    (dir, ca)
}

#[test]
fn agent_leaf_carries_only_its_spiffe_id_and_chains_to_the_root() {
    let (_dir, ca) = new_ca("agent-leaf");
    let id = SpiffeId::agent(TD, "dc1", "vm-1").expect("id");
    let now = SystemTime::now();
    let issued = ca.sign(&greedy_csr(), &id, DEFAULT_LEAF_TTL).expect("sign");
    assert_eq!(issued.chain_der.len(), 1);
    let leaf = issued.leaf_der();

    assert_eq!(SpiffeId::from_certificate_der(leaf).expect("id"), id);
    assert_eq!(certificate_serial(leaf).expect("serial"), issued.serial);
    assert_eq!(
        certificate_not_after(leaf).expect("not_after"),
        issued.not_after
    );
    let lifetime = issued.not_after.duration_since(now).expect("future");
    assert!(
        lifetime <= DEFAULT_LEAF_TTL && lifetime > DEFAULT_LEAF_TTL - Duration::from_secs(60),
        "{lifetime:?}"
    );

    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("parse");
    let san = cert.subject_alternative_name().expect("san").expect("san");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://vmesh.test/dc/dc1/agent/vm-1")]
    );
    assert!(san.critical, "SAN is critical with an empty subject");
    assert_eq!(
        cert.subject().iter().count(),
        0,
        "the CSR's subject is ignored"
    );
    assert!(!cert.is_ca(), "the CSR's CA request is ignored");
    let eku = cert.extended_key_usage().expect("eku").expect("eku").value;
    assert!(eku.client_auth && !eku.server_auth);

    verify_client(&ca.trust_bundle_pem(), &issued.chain_der, SystemTime::now())
        .expect("chains to the root");
    let err = verify_client(
        &ca.trust_bundle_pem(),
        &issued.chain_der,
        issued.not_after + Duration::from_secs(1),
    )
    .expect_err("expired");
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let (_other_dir, other) = new_ca("agent-leaf-other");
    verify_client(
        &other.trust_bundle_pem(),
        &issued.chain_der,
        SystemTime::now(),
    )
    .expect_err("another CA's leaf is refused");
}

#[test]
fn workload_leaf_is_for_server_and_client_auth() {
    let (_dir, ca) = new_ca("workload-leaf");
    let id = SpiffeId::service(TD, "dc1", "web").expect("id");
    let issued = ca
        .sign(&simple_csr(), &id, Duration::from_secs(3600))
        .expect("sign");
    let (_, cert) = x509_parser::parse_x509_certificate(issued.leaf_der()).expect("parse");
    let eku = cert.extended_key_usage().expect("eku").expect("eku").value;
    assert!(eku.client_auth && eku.server_auth);
    assert_eq!(
        SpiffeId::from_certificate_der(issued.leaf_der()).expect("id"),
        id
    );
    verify_client(&ca.trust_bundle_pem(), &issued.chain_der, SystemTime::now()).expect("verify");
    // Serials are unique.
    let again = ca
        .sign(&simple_csr(), &id, Duration::from_secs(3600))
        .expect("sign");
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn refuses_bad_csrs_foreign_ids_and_zero_ttl() {
    let (_dir, ca) = new_ca("refusals");
    let id = SpiffeId::agent(TD, "dc1", "vm-1").expect("id");
    let ttl = Duration::from_secs(60);
    assert!(matches!(
        ca.sign(b"not a csr", &id, ttl),
        Err(CaError::InvalidCsr(_))
    ));
    let mut tampered = simple_csr();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(matches!(
        ca.sign(&tampered, &id, ttl),
        Err(CaError::InvalidCsr(_))
    ));
    let foreign = SpiffeId::agent("other.test", "dc1", "vm-1").expect("id");
    let err = ca.sign(&simple_csr(), &foreign, ttl).expect_err("foreign");
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }));
    assert!(err.to_string().contains("other.test"));
    assert!(matches!(
        ca.sign(&simple_csr(), &id, Duration::ZERO),
        Err(CaError::InvalidTtl)
    ));
}

/// An operator-supplied root valid for one more hour.
fn short_lived_root() -> (String, String, SystemTime) {
    let key = KeyPair::generate().expect("key");
    let now = SystemTime::now();
    let not_after = now + Duration::from_secs(3600);
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "operator CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = time::OffsetDateTime::from(not_after);
    let cert = params.self_signed(&key).expect("root");
    let secs = not_after.duration_since(UNIX_EPOCH).expect("t").as_secs();
    (
        cert.pem(),
        key.serialize_pem(),
        UNIX_EPOCH + Duration::from_secs(secs),
    )
}

#[test]
fn ttl_is_clamped_to_the_ca_validity() {
    let (cert_pem, key_pem, ca_not_after) = short_lived_root();
    let ca = BuiltinCa::from_pem(&cert_pem, &key_pem, TD).expect("operator CA");
    assert_eq!(ca.not_after(), ca_not_after);
    let id = SpiffeId::agent(TD, "dc1", "vm-1").expect("id");
    let issued = ca.sign(&simple_csr(), &id, DEFAULT_LEAF_TTL).expect("sign");
    assert_eq!(issued.not_after, ca_not_after);
    assert_eq!(
        certificate_not_after(issued.leaf_der()).expect("t"),
        ca_not_after
    );
    verify_client(&cert_pem, &issued.chain_der, SystemTime::now()).expect("verify");

    let err = ca
        .sign_at(&simple_csr(), &id, DEFAULT_LEAF_TTL, ca_not_after)
        .expect_err("CA expired");
    assert!(matches!(err, CaError::CaExpired { .. }));
}

#[test]
fn operator_ca_with_a_chain() {
    // Root -> intermediate (the signing CA); cert_pem = intermediate + root.
    let root_key = KeyPair::generate().expect("key");
    let mut root_params = CertificateParams::default();
    root_params
        .distinguished_name
        .push(DnType::CommonName, "corp root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = rcgen::Issuer::new(root_params, &root_key);
    let int_key = KeyPair::generate().expect("key");
    let mut int_params = CertificateParams::default();
    int_params
        .distinguished_name
        .push(DnType::CommonName, "vmesh intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let int = int_params.signed_by(&int_key, &root_issuer).expect("int");

    let cert_pem = format!("{}{}", int.pem(), root.pem());
    let ca = BuiltinCa::from_pem(&cert_pem, &int_key.serialize_pem(), TD).expect("ca");
    let bundle = ca.trust_bundle_pem();
    assert_eq!(
        CertificateDer::pem_slice_iter(bundle.as_bytes())
            .map(|c| c.expect("pem").to_vec())
            .collect::<Vec<_>>(),
        vec![root.der().to_vec()]
    );
    let id = SpiffeId::agent(TD, "dc1", "vm-1").expect("id");
    let issued = ca.sign(&simple_csr(), &id, DEFAULT_LEAF_TTL).expect("sign");
    assert_eq!(issued.chain_der.len(), 2);
    assert_eq!(issued.chain_der[1], int.der().to_vec());
    verify_client(&bundle, &issued.chain_der, SystemTime::now()).expect("verify through int");
}

#[test]
fn operator_ca_is_checked() {
    let (cert_pem, key_pem, _) = short_lived_root();
    let other_key = KeyPair::generate().expect("key").serialize_pem();
    assert!(matches!(
        BuiltinCa::from_pem(&cert_pem, &other_key, TD),
        Err(CaError::KeyMismatch)
    ));
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["x.test".to_owned()])
        .expect("params")
        .self_signed(&leaf_key)
        .expect("leaf");
    assert!(matches!(
        BuiltinCa::from_pem(&leaf.pem(), &leaf_key.serialize_pem(), TD),
        Err(CaError::NotACa)
    ));
    assert!(matches!(
        BuiltinCa::from_pem("", &key_pem, TD),
        Err(CaError::InvalidCertificate(_))
    ));
    assert!(matches!(
        BuiltinCa::from_pem(&cert_pem, "garbage", TD),
        Err(CaError::InvalidKey(_))
    ));
    assert!(matches!(
        BuiltinCa::from_pem(&cert_pem, &key_pem, "Bad Domain"),
        Err(CaError::InvalidId(_))
    ));
}

#[test]
fn load_or_create_keeps_the_same_root() {
    let dir = TempDir::new("same-root");
    let first = BuiltinCa::load_or_create(&dir.0, TD).expect("create");
    let key_mode = fs::metadata(dir.0.join("ca.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(dir.0.join("ca.pem").exists());
    assert!(!dir.0.join("ca.key.tmp").exists());
    assert!(!dir.0.join("ca.pem.tmp").exists());
    let key_pem = fs::read_to_string(dir.0.join("ca.key")).expect("key");
    assert!(key_pem.contains("PRIVATE KEY"));
    assert!(
        !format!("{first:?}").contains(&key_pem[30..60]),
        "Debug hides the key"
    );

    let id = SpiffeId::agent(TD, "dc1", "vm-1").expect("id");
    let issued = first
        .sign(&simple_csr(), &id, DEFAULT_LEAF_TTL)
        .expect("sign");
    drop(first);

    let second = BuiltinCa::load_or_create(&dir.0, TD).expect("load");
    assert_eq!(
        second.trust_bundle_pem(),
        fs::read_to_string(dir.0.join("ca.pem")).expect("pem")
    );
    // A leaf from before the restart still verifies, and new leaves chain to the same root.
    verify_client(
        &second.trust_bundle_pem(),
        &issued.chain_der,
        SystemTime::now(),
    )
    .expect("old leaf");
    let issued2 = second
        .sign(&simple_csr(), &id, DEFAULT_LEAF_TTL)
        .expect("sign");
    verify_client(
        &second.trust_bundle_pem(),
        &issued2.chain_der,
        SystemTime::now(),
    )
    .expect("new leaf");
    let (_, root) =
        x509_parser::pem::parse_x509_pem(second.trust_bundle_pem().as_bytes()).expect("pem");
    let root = root.parse_x509().expect("root");
    assert!(root.is_ca());
    assert!(second.not_after() > SystemTime::now() + Duration::from_secs(9 * 365 * 86400));
}

#[test]
fn refuses_a_key_file_readable_by_others() {
    let dir = TempDir::new("perms");
    BuiltinCa::load_or_create(&dir.0, TD).expect("create");
    let key = dir.0.join("ca.key");
    for mode in [0o644, 0o640, 0o602] {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).expect("chmod");
        let err = BuiltinCa::load_or_create(&dir.0, TD).expect_err("insecure");
        assert!(matches!(err, CaError::InsecureKeyFile { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&key.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
    }
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).expect("chmod");
    BuiltinCa::load_or_create(&dir.0, TD).expect("0400 is fine");
}

#[test]
fn refuses_an_incomplete_directory() {
    let dir = TempDir::new("incomplete");
    BuiltinCa::load_or_create(&dir.0, TD).expect("create");
    fs::remove_file(dir.0.join("ca.pem")).expect("rm");
    let err = BuiltinCa::load_or_create(&dir.0, TD).expect_err("incomplete");
    assert!(matches!(err, CaError::IncompleteCaDir { .. }));
    assert!(err.to_string().contains("ca.pem"), "{err}");
    // It was not silently replaced.
    assert!(!dir.0.join("ca.pem").exists());
}

#[test]
fn from_certificate_der_needs_exactly_one_spiffe_uri() {
    let key = KeyPair::generate().expect("key");
    let no_uri = CertificateParams::new(vec!["x.test".to_owned()])
        .expect("p")
        .self_signed(&key)
        .expect("cert");
    let err = SpiffeId::from_certificate_der(no_uri.der()).expect_err("no uri");
    assert!(err.to_string().contains("no URI SAN"), "{err}");

    let mut two = CertificateParams::default();
    for uri in [
        "spiffe://vmesh.test/dc/dc1/agent/a",
        "spiffe://vmesh.test/dc/dc1/agent/b",
    ] {
        two.subject_alt_names
            .push(SanType::URI(uri.try_into().expect("uri")));
    }
    let two = two.self_signed(&key).expect("cert");
    let err = SpiffeId::from_certificate_der(two.der()).expect_err("two uris");
    assert!(err.to_string().contains("2 URI SANs"), "{err}");

    let mut other = CertificateParams::default();
    other.subject_alt_names.push(SanType::URI(
        "spiffe://vmesh.test/ns/default/sa/web"
            .try_into()
            .expect("uri"),
    ));
    let other = other.self_signed(&key).expect("cert");
    assert!(matches!(
        SpiffeId::from_certificate_der(other.der()),
        Err(CaError::InvalidId(_))
    ));
    assert!(SpiffeId::from_certificate_der(b"junk").is_err());
}

#[test]
fn controller_server_certificate_verifies_for_its_dns_name_only() {
    use rustls::client::danger::ServerCertVerifier as _;
    let (_dir, ca) = new_ca("server");
    let (key, csr) = vmesh_tls::new_key_and_csr().expect("key and csr");
    assert!(!format!("{key:?}").contains("PRIVATE"), "key is redacted");
    let issued = ca
        .sign_server(
            &csr,
            &[vmesh_tls::CONTROLLER_SERVER_NAME.to_owned()],
            DEFAULT_LEAF_TTL,
        )
        .expect("server certificate");

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    let leaf = CertificateDer::from(issued.leaf_der());
    let now = UnixTime::now();
    let verify = |name: &str| {
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
        verifier.verify_server_cert(&leaf, &[], &name, &[], now)
    };
    verify(vmesh_tls::CONTROLLER_SERVER_NAME).expect("verifies as the controller");
    assert!(verify("evil.example.com").is_err(), "no other name");

    // The agent's client certificate cannot serve as a controller.
    let id = SpiffeId::agent(TD, "dc1", "vm-1").expect("id");
    let agent = ca
        .sign(&simple_csr(), &id, DEFAULT_LEAF_TTL)
        .expect("agent");
    let agent_leaf = CertificateDer::from(agent.leaf_der());
    let name =
        rustls::pki_types::ServerName::try_from(vmesh_tls::CONTROLLER_SERVER_NAME).expect("name");
    assert!(verifier
        .verify_server_cert(&agent_leaf, &[], &name, &[], now)
        .is_err());
    assert!(ca.sign_server(&csr, &[], DEFAULT_LEAF_TTL).is_err());
}
