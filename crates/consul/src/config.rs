//! Where Consul is and how to talk to it, from the standard `CONSUL_*` variables
//! (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_CACERT`,
//! `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`) or flags that override them.

use std::fmt;
use std::path::PathBuf;

use crate::ConsulError;

/// How to reach Consul. `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct ConsulConfig {
    /// `http://host:port` or `https://host:port`; `host:port` means http.
    pub address: String,
    /// ACL token sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Datacenter to query (`?dc=`); the agent's own when unset.
    pub datacenter: Option<String>,
    /// CA bundle to verify an https Consul with.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key for a Consul that verifies clients.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

/// The variables a config is read from, so that callers (and tests) pass them in
/// instead of this crate reading the process environment behind their back.
#[derive(Clone, Debug, Default)]
pub struct ConsulEnv {
    pub http_addr: Option<String>,
    pub http_token: Option<String>,
    pub http_token_file: Option<PathBuf>,
    pub cacert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub datacenter: Option<String>,
}

impl ConsulConfig {
    /// Builds a config; `CONSUL_HTTP_TOKEN` wins over `CONSUL_HTTP_TOKEN_FILE`, as in Consul's CLI.
    pub fn from_env(env: ConsulEnv) -> Result<Self, ConsulError> {
        let address = env
            .http_addr
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "127.0.0.1:8500".to_string());
        let token = match (
            env.http_token.filter(|t| !t.is_empty()),
            env.http_token_file,
        ) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConsulError::Config(format!(
                        "cannot read the token file {}: {e}",
                        path.display()
                    ))
                })?;
                Some(text.trim().to_string()).filter(|t| !t.is_empty())
            }
            (None, None) => None,
        };
        let config = ConsulConfig {
            address,
            token,
            datacenter: env.datacenter.filter(|d| !d.is_empty()),
            ca_cert: env.cacert,
            client_cert: env.client_cert,
            client_key: env.client_key,
        };
        config.base_url()?;
        Ok(config)
    }

    /// `scheme://host:port` without a trailing slash.
    pub fn base_url(&self) -> Result<String, ConsulError> {
        let a = self.address.trim_end_matches('/');
        let url = if a.contains("://") {
            a.to_string()
        } else {
            format!("http://{a}")
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.ends_with("://") {
            return Err(ConsulError::Config(format!(
                "CONSUL_HTTP_ADDR {:?} is not an http(s) address",
                self.address
            )));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(ConsulError::Config(
                "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY go together: set both or neither".into(),
            ));
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_the_local_agent() {
        let c = ConsulConfig::from_env(ConsulEnv::default()).unwrap();
        assert_eq!(c.base_url().unwrap(), "http://127.0.0.1:8500");
        assert!(c.token.is_none());
    }

    #[test]
    fn the_token_comes_from_the_variable_or_the_file_and_never_shows() {
        let file = std::env::temp_dir().join(format!("vmesh-token-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").unwrap();
        let c = ConsulConfig::from_env(ConsulEnv {
            http_addr: Some("http://consul:8500/".into()),
            http_token_file: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("from-file"));
        assert_eq!(c.base_url().unwrap(), "http://consul:8500");
        let c = ConsulConfig::from_env(ConsulEnv {
            http_token: Some("s3cret".into()),
            http_token_file: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn a_missing_token_file_says_which() {
        let e = ConsulConfig::from_env(ConsulEnv {
            http_token_file: Some("/nonexistent/token".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let e = ConsulConfig::from_env(ConsulEnv {
            http_addr: Some("https://consul:8501".into()),
            client_cert: Some("/etc/consul/client.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("set both or neither"), "{e}");
        let e = ConsulConfig::from_env(ConsulEnv {
            http_addr: Some("ftp://consul".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not an http(s) address"), "{e}");
    }
}
