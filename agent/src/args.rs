//! Command-line arguments. Every flag can also be set with an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Clone, Parser)]
#[command(
    name = "vmesh-agent",
    version,
    about = "The vmesh agent: reports the services of this VM's Consul agent to the controller."
)]
pub struct Args {
    /// The controller's relay listener, HOST:PORT.
    #[arg(long, env = "VMESH_RELAY_ADDR")]
    pub relay_addr: String,

    /// Bootstrap token from `vmeshctl token create` (prefer --token-file or the variable: a flag
    /// shows in `ps`). Needed only while the data dir holds no valid certificate.
    #[arg(long, env = "VMESH_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the bootstrap token.
    #[arg(long, env = "VMESH_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM of the CA the controller's relay certificate chains to. Needed for the first
    /// registration; afterwards the trust bundle stored in the data dir is used.
    #[arg(long, env = "VMESH_RELAY_CACERT")]
    pub ca_file: Option<PathBuf>,

    /// Directory of the agent's key (0600), certificate, trust bundle and last discovery.
    #[arg(long, env = "VMESH_DATA_DIR", default_value = "/var/lib/vmesh-agent")]
    pub data_dir: PathBuf,

    /// How often the local Consul agent is read.
    #[arg(long, env = "VMESH_POLL_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Source address of the relay connection [default: the node's address from the local Consul
    /// agent; the OS chooses if that cannot be bound].
    #[arg(long, env = "VMESH_BIND_ADDR")]
    pub bind_addr: Option<IpAddr>,

    /// Run for an edge gateway instead of a VM: obtain the client certificate the controller's
    /// xDS port asks the gateway's Envoy for (proxy id PROXY; the token must be from `vmeshctl
    /// token create --gateway PROXY`), renew it at half-life, and keep it in the data dir with
    /// the files `vmeshctl bootstrap --xds-cert-dir <data-dir>` points Envoy at. No discovery.
    #[arg(long, env = "VMESH_GATEWAY", value_name = "PROXY")]
    pub gateway: Option<String>,

    /// With --gateway: the datacenter in the gateway's identity [default: the local Consul
    /// agent's].
    #[arg(long, env = "VMESH_DATACENTER", requires = "gateway")]
    pub datacenter: Option<String>,

    /// With --gateway: make sure the data dir holds a certificate valid for at least half its
    /// life (registering or renewing if not), then exit, e.g. before Envoy starts.
    #[arg(long, requires = "gateway")]
    pub once: bool,

    #[command(flatten)]
    pub consul: vmesh_consul::ConsulFlags,

    #[command(flatten)]
    pub logging: vmesh_runtime::LogFlags,
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Args")
            .field("relay_addr", &self.relay_addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("data_dir", &self.data_dir)
            .field("poll_interval", &self.poll_interval)
            .field("bind_addr", &self.bind_addr)
            .field("gateway", &self.gateway)
            .field("datacenter", &self.datacenter)
            .field("once", &self.once)
            .field("logging", &self.logging)
            .finish_non_exhaustive()
    }
}

impl Args {
    /// The bootstrap token, from --token or --token-file; `None` if neither is set.
    pub fn read_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = self.token.as_ref().filter(|t| !t.trim().is_empty()) {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read the token file {}: {e}", path.display())
                })?;
                Ok(Some(text.trim().to_string()).filter(|t| !t.is_empty()))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_and_debug_hides_the_token() {
        let args = Args::try_parse_from([
            "vmesh-agent",
            "--relay-addr",
            "ctl:18443",
            "--token",
            "s3cret",
        ])
        .unwrap();
        assert_eq!(args.poll_interval, Duration::from_millis(250));
        assert_eq!(args.data_dir, PathBuf::from("/var/lib/vmesh-agent"));
        assert_eq!(args.logging.log_format, vmesh_runtime::LogFormat::Text);
        assert!(!format!("{args:?}").contains("s3cret"));
        assert_eq!(args.read_token().unwrap().as_deref(), Some("s3cret"));
    }
}
