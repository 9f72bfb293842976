//! The command-line flags for reaching Vault, with Vault's own variables (`VAULT_ADDR`,
//! `VAULT_TOKEN`, `VAULT_NAMESPACE`; `VAULT_CACERT` and `VAULT_CAPATH` are read by the client).

use std::path::PathBuf;
use std::time::Duration;

use crate::{Login, Settings, Token};

/// How to reach Vault and log in.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct VaultFlags {
    /// Vault's address, http(s)://host:port. Vault is used (for secrets) only when this is set.
    #[arg(long, env = "VAULT_ADDR")]
    pub vault_addr: Option<String>,
    /// Vault token (prefer --vault-token-file or AppRole: a flag shows in `ps`).
    #[arg(long, env = "VAULT_TOKEN", hide_env_values = true)]
    pub vault_token: Option<String>,
    /// File holding a Vault token, as Nomad's `template` or Vault Agent writes it; read again
    /// whenever it changes.
    #[arg(long, env = "VMESH_VAULT_TOKEN_FILE", conflicts_with = "vault_token")]
    pub vault_token_file: Option<PathBuf>,
    /// AppRole role id: log in with AppRole (with --vault-secret-id-file).
    #[arg(long, env = "VMESH_VAULT_ROLE_ID", requires = "vault_secret_id_file")]
    pub vault_role_id: Option<String>,
    /// File holding the AppRole secret id.
    #[arg(long, env = "VMESH_VAULT_SECRET_ID_FILE", requires = "vault_role_id")]
    pub vault_secret_id_file: Option<PathBuf>,
    /// Where AppRole is mounted.
    #[arg(long, env = "VMESH_VAULT_APPROLE_MOUNT", default_value = "approle")]
    pub vault_approle_mount: String,
    /// Vault Enterprise namespace.
    #[arg(long, env = "VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,
    /// How long one request to Vault may take.
    #[arg(long, env = "VMESH_VAULT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub vault_timeout: Duration,
}

impl VaultFlags {
    /// The settings, when Vault is used (`--vault-addr` or `VAULT_ADDR` is set). AppRole wins
    /// over a token file, which wins over a token.
    pub fn settings(&self) -> Result<Option<Settings>, String> {
        let Some(address) = &self.vault_addr else {
            return Ok(None);
        };
        let login = match (&self.vault_role_id, &self.vault_token_file, &self.vault_token) {
            (Some(role_id), _, _) => Login::AppRole {
                mount: self.vault_approle_mount.clone(),
                role_id: role_id.clone(),
                secret_id_file: self
                    .vault_secret_id_file
                    .clone()
                    .ok_or("--vault-role-id needs --vault-secret-id-file")?,
            },
            (None, Some(file), _) => Login::TokenFile(file.clone()),
            (None, None, Some(token)) => Login::Token(Token::new(token.clone())),
            (None, None, None) => {
                return Err(
                    "Vault is at --vault-addr/VAULT_ADDR, but there is no way to log in: set VAULT_TOKEN, --vault-token-file, or --vault-role-id with --vault-secret-id-file"
                        .into(),
                )
            }
        };
        Ok(Some(Settings {
            address: address.clone(),
            namespace: self.vault_namespace.clone(),
            login,
            timeout: self.vault_timeout,
        }))
    }
}
