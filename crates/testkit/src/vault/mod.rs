//! A Vault HTTP API emulator for tests, built to `../shared/vault.md` and Vault's API docs, since
//! Vault cannot be installed where vmesh is built. What it has so far:
//!
//! - the response envelope (`request_id`, `lease_id`, `renewable`, `lease_duration`, `data`,
//!   `wrap_info`, `warnings`, `auth`) and `{"errors": [...]}` with Vault's status codes;
//! - `sys/health` (200 active, 503 sealed) and a sealed switch;
//! - tokens: a root token, `auth/token/create` with policies, TTL and renewability,
//!   `lookup-self`, `renew-self`, expiry;
//! - ACL policies in Vault's HCL syntax through `sys/policies/acl/<name>`, enforced per path
//!   ([`policy`]);
//! - KV version 2 at `secret/`: versions, metadata, CAS, `?version=`, delete of the latest version,
//!   LIST;
//! - PKI at `pki/`: a root CA made at start, roles restricting names and URI SANs, `sign/<role>`,
//!   `issue/<role>`, `ca/pem` and `cert/ca_chain` without a token;
//! - AppRole: roles, their role id and secret ids, login.
//!
//! Not yet: namespaces, other mounts, standby answers. `vmesh-vault-emulator` serves it alone,
//! like `vault server -dev`. The conformance tests in
//! `tests/vault_conformance.rs` run against it, and against a real Vault with `VAULT_ADDR` and
//! `VAULT_TOKEN` set (`vault server -dev` is enough).

mod http;
mod pki;
pub mod policy;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use policy::Policy;

/// A token the emulator issued.
#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub accessor: String,
    pub policies: Vec<String>,
    /// `None`: never expires (the root token).
    pub expires: Option<Instant>,
    pub creation_ttl: Duration,
    pub renewable: bool,
    pub issued: SystemTime,
}

/// One version of a KV v2 secret.
#[derive(Clone, Debug)]
pub(crate) struct Version {
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
    pub created: SystemTime,
    pub deleted: Option<SystemTime>,
}

/// A KV v2 secret: its versions, from 1.
#[derive(Clone, Debug, Default)]
pub(crate) struct Secret {
    pub versions: Vec<Version>,
    pub created: Option<SystemTime>,
    pub updated: Option<SystemTime>,
}

/// An AppRole role: the policies and TTL of the tokens it logs in to.
#[derive(Clone, Debug, Default)]
pub(crate) struct AppRole {
    pub role_id: String,
    pub policies: Vec<String>,
    pub token_ttl: Option<Duration>,
    pub secret_ids: std::collections::BTreeSet<String>,
}

#[derive(Default)]
pub(crate) struct State {
    pub tokens: BTreeMap<String, Token>,
    pub policies: BTreeMap<String, (String, Policy)>,
    /// KV v2 at `secret/`, by path.
    pub kv: BTreeMap<String, Secret>,
    /// The PKI engine at `pki/`, with the root CA made at start.
    pub pki: Option<pki::Pki>,
    /// AppRole roles by name.
    pub approles: BTreeMap<String, AppRole>,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub sealed: AtomicBool,
    pub requests: AtomicU64,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An in-process Vault (one unsealed, active node) served from its own thread and runtime, so
/// that synchronous tests can use it. Stops on drop.
pub struct VaultEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    root_token: String,
    running: Mutex<Option<crate::serve::Served>>,
}

impl VaultEmulator {
    /// Starts on a free port of 127.0.0.1 with a random root token.
    pub fn start() -> VaultEmulator {
        Self::start_with_root_token(&format!("hvs.root-{}", crate::consul::new_uuid()))
    }

    /// Starts with this root token (like `vault server -dev -dev-root-token-id`).
    pub fn start_with_root_token(root_token: &str) -> VaultEmulator {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), root_token)
    }

    /// Starts listening on `listen` with this root token. Panics if it cannot listen.
    pub fn start_on(listen: SocketAddr, root_token: &str) -> VaultEmulator {
        let listener = TcpListener::bind(listen)
            .unwrap_or_else(|e| panic!("vault emulator: bind {listen}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("vault emulator: local_addr: {e}"));
        let mut state = State {
            pki: Some(pki::Pki::new().unwrap_or_else(|e| panic!("vault emulator: root CA: {e}"))),
            ..State::default()
        };
        state.tokens.insert(
            root_token.to_string(),
            Token {
                accessor: crate::consul::new_uuid(),
                policies: vec!["root".into()],
                expires: None,
                creation_ttl: Duration::ZERO,
                renewable: false,
                issued: SystemTime::now(),
            },
        );
        let default = Policy::parse(policy::DEFAULT_POLICY).unwrap_or_default();
        state.policies.insert(
            "default".into(),
            (policy::DEFAULT_POLICY.trim().to_string(), default),
        );
        let emu = VaultEmulator {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                sealed: AtomicBool::new(false),
                requests: AtomicU64::new(0),
            }),
            addr,
            root_token: root_token.to_string(),
            running: Mutex::new(None),
        };
        emu.serve(listener);
        emu
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let served = crate::serve::serve_on_thread(
            format!("vault-emulator-{}", self.addr.port()),
            listener,
            move || http::router(shared),
        );
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(served);
    }

    /// `http://127.0.0.1:<port>` (what `VAULT_ADDR` would be).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The root token (what `VAULT_TOKEN` would be for an operator).
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// While `true`, every request but `sys/health` gets 503 `Vault is sealed`.
    pub fn set_sealed(&self, sealed: bool) {
        self.shared.sealed.store(sealed, Ordering::Relaxed);
    }

    /// The PKI root CA certificate (PEM), what `pki/ca/pem` serves.
    pub fn pki_ca_pem(&self) -> String {
        self.shared
            .lock()
            .pki
            .as_ref()
            .map(|p| p.ca_pem().to_string())
            .unwrap_or_default()
    }

    /// Replaces the PKI root CA with a new one, keeping the roles: what an operator's root
    /// rotation looks like to a client (`pki/root/rotate/internal` and `pki/root/replace` in
    /// Vault 1.11+). Returns the new CA (PEM).
    pub fn rotate_pki_root(&self) -> String {
        let mut state = self.shared.lock();
        let roles = state
            .pki
            .as_ref()
            .map(|p| p.roles.clone())
            .unwrap_or_default();
        let mut pki = pki::Pki::new().unwrap_or_else(|e| panic!("vault emulator: root CA: {e}"));
        pki.roles = roles;
        let pem = pki.ca_pem().to_string();
        state.pki = Some(pki);
        pem
    }

    /// How many HTTP requests it has received.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }
}

impl Drop for VaultEmulator {
    fn drop(&mut self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(served) = running {
            served.stop();
        }
    }
}
