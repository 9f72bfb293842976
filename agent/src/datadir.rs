//! The agent's data dir (`--data-dir`, mode 0700):
//!
//! | file | content |
//! |------|---------|
//! | `agent.key` | the private key, PKCS#8 PEM, mode 0600 |
//! | `agent.pem` | the certificate chain, PEM (leaf first) |
//! | `ca.pem` | the trust bundle the controller returned |
//! | `identity.json` | SPIFFE id, node, datacenter, validity, and digests of the key and chain |
//! | `discovery.json` | the local instances last read (used when the local Consul agent is down at start) |
//!
//! Every file is written to a temporary file and renamed into place. The credential set is four
//! files; `identity.json` is written last and names the SHA-256 of the key and the chain it goes
//! with, so a set half-replaced by a crash is detected on load instead of presented to the
//! controller.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmesh_proto::v1::{Health, ServiceInstance};
use vmesh_tls::PrivateKeyPem;

pub const KEY_FILE: &str = "agent.key";
pub const CERT_FILE: &str = "agent.pem";
pub const CA_FILE: &str = "ca.pem";
pub const IDENTITY_FILE: &str = "identity.json";
pub const DISCOVERY_FILE: &str = "discovery.json";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What `identity.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub spiffe_id: String,
    pub node: String,
    pub datacenter: String,
    /// When the certificate was received (Unix seconds): the start of its lifetime for renewal.
    pub issued_unix: i64,
    /// When the leaf expires (Unix seconds).
    pub not_after_unix: i64,
    /// The node address the agent registered from, for a start while the local Consul agent is
    /// down.
    #[serde(default)]
    pub node_address: String,
    /// Hex SHA-256 of `agent.key` and `agent.pem`.
    pub key_sha256: String,
    pub chain_sha256: String,
}

/// A key, its certificate chain, the trust bundle and what they are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub key: PrivateKeyPem,
    /// Leaf first, PEM.
    pub chain_pem: String,
    /// The roots to trust for the controller, PEM.
    pub ca_pem: String,
    pub identity: Identity,
}

impl Credentials {
    /// Builds the record for a freshly issued certificate; fills in the digests.
    pub fn new(
        key: PrivateKeyPem,
        chain_pem: String,
        ca_pem: String,
        mut identity: Identity,
    ) -> Self {
        identity.key_sha256 = sha256_hex(key.expose().as_bytes());
        identity.chain_sha256 = sha256_hex(chain_pem.as_bytes());
        Credentials {
            key,
            chain_pem,
            ca_pem,
            identity,
        }
    }

    pub fn not_after(&self) -> SystemTime {
        unix_to_system(self.identity.not_after_unix)
    }

    /// Half-way between when the certificate was received and when it expires.
    pub fn renew_at(&self) -> SystemTime {
        let issued = self.identity.issued_unix.min(self.identity.not_after_unix);
        let half = (self.identity.not_after_unix - issued) / 2;
        unix_to_system(issued + half)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after()
    }

    /// Whether these credentials are for `node` in `datacenter`.
    pub fn is_for(&self, node: &str, datacenter: &str) -> bool {
        self.identity.node == node && self.identity.datacenter == datacenter
    }
}

/// Seconds since the Unix epoch as a time; one before the epoch, or too far in the future to
/// represent, is the epoch (a certificate valid until then is expired: the agent registers again).
pub fn unix_to_system(secs: i64) -> SystemTime {
    u64::try_from(secs)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(UNIX_EPOCH)
}

pub fn system_to_unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// One stored instance (`discovery.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredInstance {
    id: String,
    service: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: std::collections::BTreeMap<String, String>,
    address: String,
    port: u32,
    health: String,
}

impl From<&ServiceInstance> for StoredInstance {
    fn from(i: &ServiceInstance) -> Self {
        let health = match Health::try_from(i.health).unwrap_or(Health::Unspecified) {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical | Health::Unspecified => "critical",
        };
        StoredInstance {
            id: i.id.clone(),
            service: i.service.clone(),
            tags: i.tags.clone(),
            meta: i.meta.clone(),
            address: i.address.clone(),
            port: i.port,
            health: health.to_string(),
        }
    }
}

impl From<StoredInstance> for ServiceInstance {
    fn from(s: StoredInstance) -> Self {
        let health = match s.health.as_str() {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            _ => Health::Critical,
        };
        ServiceInstance {
            id: s.id,
            service: s.service,
            tags: s.tags,
            meta: s.meta,
            address: s.address,
            port: s.port,
            health: health as i32,
        }
    }
}

/// The agent's data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// Opens (creating it, mode 0700) the data dir. An existing directory is tightened to 0700.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, DataDirError> {
        let path = path.into();
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(io)?;
        let mode = fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
        if mode != 0o700 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(DataDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `name` atomically: a temporary file with `mode`, synced, then renamed into place.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), DataDirError> {
        let tmp = self.file(&format!(".{name}.tmp"));
        let target = self.file(name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DataDirError::Io { path, source }
        };
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        // The umask may have cleared bits; set the mode exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(io(&target))?;
        // Make the rename durable.
        if let Ok(dir) = fs::File::open(&self.path) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn read_optional(&self, name: &str) -> Result<Option<String>, DataDirError> {
        let path = self.file(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DataDirError::Io { path, source }),
        }
    }

    /// Stores a credential set; `identity.json` last (see the module doc).
    pub fn store_credentials(&self, creds: &Credentials) -> Result<(), DataDirError> {
        let identity =
            serde_json::to_vec_pretty(&creds.identity).map_err(|e| DataDirError::Invalid {
                path: self.file(IDENTITY_FILE),
                message: e.to_string(),
            })?;
        self.write_atomic(KEY_FILE, creds.key.expose().as_bytes(), 0o600)?;
        self.write_atomic(CERT_FILE, creds.chain_pem.as_bytes(), 0o644)?;
        self.write_atomic(CA_FILE, creds.ca_pem.as_bytes(), 0o644)?;
        self.write_atomic(IDENTITY_FILE, &identity, 0o644)?;
        Ok(())
    }

    /// The stored credential set: `Ok(None)` if there is none, an error if it is incomplete or
    /// inconsistent (e.g. a key that is not the one `identity.json` names). Expiry is not checked
    /// here.
    pub fn load_credentials(&self) -> Result<Option<Credentials>, DataDirError> {
        let Some(identity_text) = self.read_optional(IDENTITY_FILE)? else {
            return Ok(None);
        };
        let invalid = |name: &str, message: String| DataDirError::Invalid {
            path: self.file(name),
            message,
        };
        let identity: Identity = serde_json::from_str(&identity_text)
            .map_err(|e| invalid(IDENTITY_FILE, e.to_string()))?;
        let read = |name: &str| {
            self.read_optional(name)?
                .ok_or_else(|| invalid(name, "missing".to_string()))
        };
        let key = read(KEY_FILE)?;
        let chain_pem = read(CERT_FILE)?;
        let ca_pem = read(CA_FILE)?;
        if sha256_hex(key.as_bytes()) != identity.key_sha256 {
            return Err(invalid(
                KEY_FILE,
                format!("is not the key {IDENTITY_FILE} names (an interrupted write?)"),
            ));
        }
        if sha256_hex(chain_pem.as_bytes()) != identity.chain_sha256 {
            return Err(invalid(
                CERT_FILE,
                format!("is not the certificate {IDENTITY_FILE} names (an interrupted write?)"),
            ));
        }
        Ok(Some(Credentials {
            key: PrivateKeyPem::new(key),
            chain_pem,
            ca_pem,
            identity,
        }))
    }

    /// Records the last local instances read.
    pub fn store_discovery(&self, instances: &[ServiceInstance]) -> Result<(), DataDirError> {
        let stored: Vec<StoredInstance> = instances.iter().map(StoredInstance::from).collect();
        let json = serde_json::to_vec(&stored).map_err(|e| DataDirError::Invalid {
            path: self.file(DISCOVERY_FILE),
            message: e.to_string(),
        })?;
        self.write_atomic(DISCOVERY_FILE, &json, 0o600)
    }

    /// The last local instances recorded, if any.
    pub fn load_discovery(&self) -> Result<Option<Vec<ServiceInstance>>, DataDirError> {
        let Some(text) = self.read_optional(DISCOVERY_FILE)? else {
            return Ok(None);
        };
        let stored: Vec<StoredInstance> =
            serde_json::from_str(&text).map_err(|e| DataDirError::Invalid {
                path: self.file(DISCOVERY_FILE),
                message: e.to_string(),
            })?;
        Ok(Some(stored.into_iter().map(Into::into).collect()))
    }

    /// The trust bundle stored with the credentials, if any (even if they are expired).
    pub fn load_ca(&self) -> Result<Option<String>, DataDirError> {
        self.read_optional(CA_FILE)
    }
}
