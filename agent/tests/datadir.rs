#![allow(clippy::unwrap_used)]
//! The data dir: modes, atomic replacement, reload, and detection of a half-written set.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use vmesh_agent::datadir::{unix_to_system, CERT_FILE, DISCOVERY_FILE, IDENTITY_FILE, KEY_FILE};
use vmesh_agent::{Credentials, DataDir, Identity};
use vmesh_proto::v1::{Health, ServiceInstance};

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vmesh-agent-datadir-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn creds(chain: &str, issued: i64, not_after: i64) -> Credentials {
    let (key, _csr) = vmesh_tls::new_key_and_csr().unwrap();
    Credentials::new(
        key,
        chain.to_string(),
        "-----BEGIN CERTIFICATE-----\nroots\n-----END CERTIFICATE-----\n".to_string(),
        Identity {
            spiffe_id: "spiffe://vmesh/dc/dc1/agent/vm-1".into(),
            node: "vm-1".into(),
            datacenter: "dc1".into(),
            issued_unix: issued,
            not_after_unix: not_after,
            node_address: "10.0.0.7".into(),
            key_sha256: String::new(),
            chain_sha256: String::new(),
        },
    )
}

#[test]
fn the_directory_is_created_0700_and_an_existing_one_tightened() {
    let root = scratch("modes");
    let dir = root.join("a/b");
    DataDir::open(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);

    let loose = root.join("loose");
    std::fs::create_dir_all(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    DataDir::open(&loose).unwrap();
    assert_eq!(mode(&loose), 0o700);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn credentials_are_stored_with_a_0600_key_and_reload() {
    let root = scratch("store");
    let data = DataDir::open(&root).unwrap();
    assert_eq!(data.load_credentials().unwrap(), None);

    let first = creds("chain one", 1_000, 2_000);
    data.store_credentials(&first).unwrap();
    assert_eq!(mode(&root.join(KEY_FILE)), 0o600);
    assert_eq!(data.load_credentials().unwrap(), Some(first.clone()));
    // The key is PEM on disk and never in Debug output.
    let on_disk = std::fs::read_to_string(root.join(KEY_FILE)).unwrap();
    assert!(on_disk.contains("PRIVATE KEY"));
    assert!(!format!("{first:?}").contains(on_disk.trim()));

    // Replacing swaps everything and leaves no temporary files.
    let second = creds("chain two", 3_000, 5_000);
    data.store_credentials(&second).unwrap();
    let reopened = DataDir::open(&root).unwrap();
    assert_eq!(reopened.load_credentials().unwrap(), Some(second.clone()));
    assert_eq!(mode(&root.join(KEY_FILE)), 0o600);
    let leftovers: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(reopened.load_ca().unwrap(), Some(second.ca_pem.clone()));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_half_replaced_set_is_detected() {
    let root = scratch("torn");
    let data = DataDir::open(&root).unwrap();
    data.store_credentials(&creds("chain one", 1_000, 2_000))
        .unwrap();
    // A crash after the new key was renamed into place, before identity.json.
    let (other_key, _) = vmesh_tls::new_key_and_csr().unwrap();
    data.write_atomic(KEY_FILE, other_key.expose().as_bytes(), 0o600)
        .unwrap();
    let err = data.load_credentials().unwrap_err().to_string();
    assert!(err.contains(KEY_FILE), "{err}");

    data.store_credentials(&creds("chain one", 1_000, 2_000))
        .unwrap();
    data.write_atomic(CERT_FILE, b"another chain", 0o644)
        .unwrap();
    assert!(data.load_credentials().is_err());

    std::fs::write(root.join(IDENTITY_FILE), "{not json").unwrap();
    assert!(data.load_credentials().is_err());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn renewal_is_due_at_half_life() {
    let c = creds("chain", 1_000, 3_000);
    assert_eq!(c.renew_at(), unix_to_system(2_000));
    assert_eq!(c.not_after(), unix_to_system(3_000));
    assert!(!c.is_expired(unix_to_system(2_999)));
    assert!(c.is_expired(unix_to_system(3_000)));
    assert!(c.is_for("vm-1", "dc1"));
    assert!(!c.is_for("vm-2", "dc1"));
    assert!(!c.is_for("vm-1", "dc2"));
    let now = SystemTime::now();
    let fresh = creds(
        "chain",
        vmesh_agent::datadir::system_to_unix(now),
        vmesh_agent::datadir::system_to_unix(now + Duration::from_secs(24 * 3600)),
    );
    let half = fresh.renew_at().duration_since(now).unwrap();
    assert!(half > Duration::from_secs(11 * 3600) && half <= Duration::from_secs(12 * 3600));
}

#[test]
fn discovery_round_trips() {
    let root = scratch("discovery");
    let data = DataDir::open(&root).unwrap();
    assert_eq!(data.load_discovery().unwrap(), None);
    let instances = vec![
        ServiceInstance {
            id: "web-1".into(),
            service: "web".into(),
            tags: vec!["v1".into()],
            meta: BTreeMap::from([("zone".into(), "a".into())]),
            address: "10.0.0.7".into(),
            port: 8080,
            health: Health::Passing as i32,
        },
        ServiceInstance {
            id: "db".into(),
            service: "db".into(),
            tags: vec![],
            meta: BTreeMap::new(),
            address: "10.0.0.7".into(),
            port: 5432,
            health: Health::Warning as i32,
        },
    ];
    data.store_discovery(&instances).unwrap();
    assert_eq!(mode(&root.join(DISCOVERY_FILE)), 0o600);
    assert_eq!(data.load_discovery().unwrap(), Some(instances));
    data.store_discovery(&[]).unwrap();
    assert_eq!(data.load_discovery().unwrap(), Some(vec![]));
    std::fs::remove_dir_all(&root).unwrap();
}
