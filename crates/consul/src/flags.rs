//! The command-line flags for reaching Consul, shared by `vmesh-controller` and
//! `vmeshctl` so both read the same flags and the same standard variables.

use std::path::PathBuf;

use crate::{ConsulConfig, ConsulEnv, ConsulError};

/// How to reach Consul: Consul's own variables, or flags that override them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConsulFlags {
    /// Consul's HTTP address, host:port or http(s)://host:port [default: 127.0.0.1:8500].
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    pub consul_addr: Option<String>,
    /// Consul ACL token (prefer --consul-token-file or the variable: a flag shows in `ps`).
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,
    /// File holding the Consul ACL token.
    #[arg(long, env = "CONSUL_HTTP_TOKEN_FILE")]
    pub consul_token_file: Option<PathBuf>,
    /// CA bundle to verify an https Consul with (the system's roots without it).
    #[arg(long, env = "CONSUL_CACERT")]
    pub consul_cacert: Option<PathBuf>,
    /// Client certificate, for a Consul that verifies clients (with --consul-client-key).
    #[arg(long, env = "CONSUL_CLIENT_CERT")]
    pub consul_client_cert: Option<PathBuf>,
    /// Client private key, for a Consul that verifies clients.
    #[arg(long, env = "CONSUL_CLIENT_KEY")]
    pub consul_client_key: Option<PathBuf>,
    /// Consul datacenter; the agent's own by default.
    #[arg(long, env = "VMESH_CONSUL_DATACENTER")]
    pub consul_datacenter: Option<String>,
}

impl ConsulFlags {
    pub fn config(&self) -> Result<ConsulConfig, ConsulError> {
        ConsulConfig::from_env(ConsulEnv {
            http_addr: self.consul_addr.clone(),
            http_token: self.consul_token.clone(),
            http_token_file: self.consul_token_file.clone(),
            cacert: self.consul_cacert.clone(),
            client_cert: self.consul_client_cert.clone(),
            client_key: self.consul_client_key.clone(),
            datacenter: self.consul_datacenter.clone(),
        })
    }
}
