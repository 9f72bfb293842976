//! Vault as vmesh uses it (issue 11, first part): a client on `vaultrs` that
//!
//! - logs in with a token (`VAULT_TOKEN`), a token file (as Nomad's `template` or Vault Agent
//!   writes it, read again when renewal is refused), or AppRole (a role id and a secret-id file);
//! - keeps its token renewed at about two thirds of its TTL, and logs in again when renewal is
//!   refused;
//! - reads KV v2 secrets with the version they are at, and polls only their metadata;
//! - never puts a token in an error, a log line or a `Debug` form.
//!
//! `VAULT_CACERT`, `VAULT_CAPATH` and `VAULT_SKIP_VERIFY` are read by `vaultrs`; the address, the
//! namespace, the login and the request timeout are [`Settings`], which the controller's flags
//! ([`VaultFlags`], with `VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_NAMESPACE`) fill.
//!
//! A Vault that cannot be reached at start is not fatal: [`Vault::new`] logs in nowhere, and
//! [`Vault::maintain`] logs in (and again, with backoff, until it works), renews, and logs in
//! again when a token file changes.

#[cfg(feature = "clap")]
mod flags;
#[cfg(feature = "clap")]
pub use flags::VaultFlags;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::RwLock;
use tracing::{info, warn};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

/// A Vault token: shown as `[redacted]` wherever it is formatted.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into().trim().to_string())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// How the client gets its token.
#[derive(Clone, Debug)]
pub enum Login {
    /// A token given once (`VAULT_TOKEN`).
    Token(Token),
    /// A file holding a token, written by something else (Nomad, Vault Agent): read at start and
    /// again whenever the token in hand is refused renewal.
    TokenFile(PathBuf),
    /// AppRole at `mount` (usually `approle`): the role id and a file holding a secret id.
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
}

/// Where Vault is and how to log in.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `http(s)://host:port`.
    pub address: String,
    pub namespace: Option<String>,
    pub login: Login,
    /// How long one request may take.
    pub timeout: Duration,
}

/// The request timeout when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("Vault refused: {0}")]
    Denied(String),
    #[error("not found in Vault: {0}")]
    NotFound(String),
    #[error("cannot reach Vault or read its answer: {0}")]
    Unreachable(String),
    #[error("cannot log in to Vault: {0}")]
    Login(String),
}

/// A certificate to sign with Vault PKI.
#[derive(Clone, Debug, Default)]
pub struct SignRequest {
    pub csr_pem: String,
    /// Empty when the role does not require one (`require_cn = false`).
    pub common_name: String,
    pub alt_names: Vec<String>,
    pub uri_sans: Vec<String>,
    pub ttl: Duration,
}

/// What Vault PKI signed: the certificate, then the CA chain Vault returned, in PEM.
#[derive(Clone, Debug)]
pub struct Signed {
    pub chain_pem: Vec<String>,
    pub serial: String,
}

/// What the client knows of its token.
struct Held {
    token: Token,
    ttl: Duration,
    renewable: bool,
    obtained: Instant,
    /// Why the last login failed, while no login has worked since.
    login_error: Option<String>,
    /// The token file's modification time when it was read.
    file_modified: Option<std::time::SystemTime>,
}

pub struct Vault {
    settings: Settings,
    client: RwLock<VaultClient>,
    held: RwLock<Held>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("address", &self.settings.address)
            .finish_non_exhaustive()
    }
}

/// The text of a vaultrs error, with `token` cut out should it ever appear.
fn text(e: &ClientError, token: &Token) -> String {
    let s = e.to_string();
    if token.0.is_empty() {
        s
    } else {
        s.replace(&token.0, "[redacted]")
    }
}

fn classify(e: ClientError, what: &str, token: &Token) -> VaultError {
    let message = format!("{what}: {}", text(&e, token));
    match &e {
        ClientError::APIError { code: 403, .. } => VaultError::Denied(message),
        ClientError::APIError { code: 404, .. } => VaultError::NotFound(message),
        ClientError::APIError { .. } => VaultError::Denied(message),
        _ => VaultError::Unreachable(message),
    }
}

fn read_secret_file(path: &PathBuf) -> Result<Token, VaultError> {
    std::fs::read_to_string(path)
        .map(Token::new)
        .map_err(|e| VaultError::Login(format!("cannot read {}: {e}", path.display())))
}

impl Vault {
    /// Logs in and learns the token's TTL.
    pub async fn connect(settings: Settings) -> Result<Vault, VaultError> {
        let vault = Vault::new(settings)?;
        vault.login().await?;
        Ok(vault)
    }

    /// A client that has not logged in yet ([`Vault::maintain`] does).
    pub fn new(settings: Settings) -> Result<Vault, VaultError> {
        // vaultrs' HTTP client uses the process's rustls provider; vmesh's is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = VaultClientSettingsBuilder::default();
        builder
            .address(&settings.address)
            .token("")
            .timeout(Some(settings.timeout));
        if let Some(ns) = &settings.namespace {
            builder.namespace(Some(ns.clone()));
        }
        let built = builder
            .build()
            .map_err(|e| VaultError::Unreachable(format!("client settings: {e}")))?;
        let client =
            VaultClient::new(built).map_err(|e| VaultError::Unreachable(format!("client: {e}")))?;
        let vault = Vault {
            settings,
            client: RwLock::new(client),
            held: RwLock::new(Held {
                token: Token::new(""),
                ttl: Duration::ZERO,
                renewable: false,
                obtained: Instant::now(),
                login_error: Some("not logged in yet".into()),
                file_modified: None,
            }),
        };
        Ok(vault)
    }

    pub fn address(&self) -> &str {
        &self.settings.address
    }

    /// `Err` with the reason while the client has no token that worked.
    pub async fn logged_in(&self) -> Result<(), String> {
        match &self.held.read().await.login_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn token_file_modified(&self) -> Option<std::time::SystemTime> {
        match &self.settings.login {
            Login::TokenFile(path) => std::fs::metadata(path).and_then(|m| m.modified()).ok(),
            _ => None,
        }
    }

    /// Gets a token the way the settings say, and learns its TTL.
    async fn login(&self) -> Result<(), VaultError> {
        let result = self.try_login().await;
        if let Err(e) = &result {
            self.held.write().await.login_error = Some(e.to_string());
        }
        result
    }

    async fn try_login(&self) -> Result<(), VaultError> {
        let file_modified = self.token_file_modified();
        let token = match &self.settings.login {
            Login::Token(t) => t.clone(),
            Login::TokenFile(path) => read_secret_file(path)?,
            Login::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret_file(secret_id_file)?;
                let client = self.client.read().await;
                let auth = vaultrs::auth::approle::login(&*client, mount, role_id, &secret_id.0)
                    .await
                    .map_err(|e| VaultError::Login(text(&e, &secret_id)))?;
                Token::new(auth.client_token)
            }
        };
        self.client.write().await.set_token(&token.0);
        let lookup = {
            let client = self.client.read().await;
            vaultrs::token::lookup_self(&*client).await
        };
        let lookup = lookup.map_err(|e| match classify(e, "token lookup", &token) {
            VaultError::Denied(m) => VaultError::Login(m),
            other => other,
        })?;
        *self.held.write().await = Held {
            token,
            ttl: Duration::from_secs(lookup.ttl),
            renewable: lookup.renewable.unwrap_or(false),
            obtained: Instant::now(),
            login_error: None,
            file_modified,
        };
        info!(
            ttl_s = lookup.ttl,
            renewable = lookup.renewable.unwrap_or(false),
            "logged in to Vault"
        );
        Ok(())
    }

    /// How long until the token should be renewed: two thirds of its TTL after it was obtained
    /// (never, for a token without a TTL).
    pub async fn renew_in(&self) -> Option<Duration> {
        let held = self.held.read().await;
        if held.ttl.is_zero() {
            return None;
        }
        Some((held.ttl * 2 / 3).saturating_sub(held.obtained.elapsed()))
    }

    /// Renews the token; when Vault refuses (not renewable, expired, revoked), logs in again.
    pub async fn renew_or_login(&self) -> Result<(), VaultError> {
        let (renewable, token) = {
            let held = self.held.read().await;
            (held.renewable, held.token.clone())
        };
        if renewable {
            let renewed = {
                let client = self.client.read().await;
                vaultrs::token::renew_self(&*client, None).await
            };
            match renewed {
                Ok(auth) => {
                    let mut held = self.held.write().await;
                    held.ttl = Duration::from_secs(auth.lease_duration);
                    held.obtained = Instant::now();
                    return Ok(());
                }
                Err(e) => {
                    warn!(error = %text(&e, &token), "Vault refused to renew the token; logging in again")
                }
            }
        }
        self.login().await
    }

    /// Logs in (until it works), keeps the token renewed, and logs in again when the token
    /// file changes, until the future is dropped.
    pub async fn maintain(&self) {
        // A token file is looked at this often for a new token.
        const FILE_CHECK: Duration = Duration::from_secs(2);
        let mut backoff =
            vmesh_retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            if self.logged_in().await.is_err() {
                match self.login().await {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        let wait = backoff.next_delay();
                        warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot log in to Vault");
                        tokio::time::sleep(wait).await;
                    }
                }
                continue;
            }
            let renew_in = self.renew_in().await;
            let file = matches!(self.settings.login, Login::TokenFile(_));
            let wait = match (renew_in, file) {
                (Some(w), true) => w.min(FILE_CHECK),
                (Some(w), false) => w,
                (None, true) => FILE_CHECK,
                (None, false) => Duration::from_secs(3600),
            };
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
            if file {
                let read_at = self.held.read().await.file_modified;
                if self.token_file_modified() != read_at {
                    info!("the Vault token file changed; logging in with the new token");
                    if let Err(e) = self.login().await {
                        warn!(error = %e, "cannot log in with the new Vault token");
                    }
                    continue;
                }
            }
            if self.renew_in().await.is_some_and(|w| w.is_zero()) {
                if let Err(e) = self.renew_or_login().await {
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot renew the Vault token");
                    tokio::time::sleep(wait).await;
                } else {
                    backoff.reset();
                }
            }
        }
    }

    /// The version a KV v2 secret is at: what a watcher polls.
    pub async fn kv2_version(&self, mount: &str, path: &str) -> Result<u64, VaultError> {
        let token = self.held.read().await.token.clone();
        let client = self.client.read().await;
        vaultrs::kv2::read_metadata(&*client, mount, path)
            .await
            .map(|m| m.current_version)
            .map_err(|e| classify(e, &format!("{mount}/metadata/{path}"), &token))
    }

    /// A KV v2 secret's keys and values at `version`.
    pub async fn kv2_read_version(
        &self,
        mount: &str,
        path: &str,
        version: u64,
    ) -> Result<BTreeMap<String, String>, VaultError> {
        let token = self.held.read().await.token.clone();
        let client = self.client.read().await;
        vaultrs::kv2::read_version(&*client, mount, path, version)
            .await
            .map_err(|e| classify(e, &format!("{mount}/data/{path}"), &token))
    }

    /// The CA certificate (PEM) of the PKI engine at `mount` (`GET <mount>/cert/ca`).
    pub async fn pki_ca_pem(&self, mount: &str) -> Result<String, VaultError> {
        let token = self.held.read().await.token.clone();
        let client = self.client.read().await;
        vaultrs::pki::cert::read(&*client, mount, "ca")
            .await
            .map(|r| r.certificate)
            .map_err(|e| classify(e, &format!("{mount}/cert/ca"), &token))
    }

    /// Signs a CSR (PEM) with the PKI engine at `mount` as `role` allows
    /// (`POST <mount>/sign/<role>`).
    pub async fn pki_sign(
        &self,
        mount: &str,
        role: &str,
        request: &SignRequest,
    ) -> Result<Signed, VaultError> {
        let token = self.held.read().await.token.clone();
        let client = self.client.read().await;
        let mut opts = vaultrs::api::pki::requests::SignCertificateRequest::builder();
        if !request.alt_names.is_empty() {
            opts.alt_names(request.alt_names.join(","));
        }
        if !request.uri_sans.is_empty() {
            opts.uri_sans(request.uri_sans.join(","));
        }
        opts.ttl(format!("{}s", request.ttl.as_secs()));
        opts.exclude_cn_from_sans(false);
        let response = vaultrs::pki::cert::ca::sign(
            &*client,
            mount,
            role,
            &request.csr_pem,
            &request.common_name,
            Some(&mut opts),
        )
        .await
        .map_err(|e| classify(e, &format!("{mount}/sign/{role}"), &token))?;
        let mut chain = vec![response.certificate];
        chain.extend(response.ca_chain.unwrap_or_default());
        Ok(Signed {
            chain_pem: chain,
            serial: response.serial_number,
        })
    }

    /// A KV v2 secret's keys and values at its current version, and that version.
    pub async fn kv2_read(
        &self,
        mount: &str,
        path: &str,
    ) -> Result<(u64, BTreeMap<String, String>), VaultError> {
        let version = self.kv2_version(mount, path).await?;
        let token = self.held.read().await.token.clone();
        let client = self.client.read().await;
        let data: BTreeMap<String, String> =
            vaultrs::kv2::read_version(&*client, mount, path, version)
                .await
                .map_err(|e| classify(e, &format!("{mount}/data/{path}"), &token))?;
        Ok((version, data))
    }
}
