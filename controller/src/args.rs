//! Command-line arguments. Every flag can also be set with a `VMESH_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "vmesh-controller",
    version,
    about = "The vmesh control plane: config in, Envoy xDS out."
)]
pub struct Args {
    /// Directory of YAML/JSON config documents, watched for changes: the embedded default
    /// source, used unless Consul is chosen. Defaults to `/etc/vmesh/config`.
    #[arg(long, env = "VMESH_CONFIG_DIR", conflicts_with = "consul")]
    pub config_dir: Option<PathBuf>,

    /// Read config from Consul KV (`<prefix>/config/<Kind>/<name>`). Also chosen when
    /// CONSUL_HTTP_ADDR is set and --config-dir is not.
    #[arg(long, env = "VMESH_CONSUL")]
    pub consul: bool,

    #[command(flatten)]
    pub consul_flags: vmesh_consul::ConsulFlags,

    /// Prefix of every vmesh key in Consul KV.
    #[arg(long, env = "VMESH_CONSUL_PREFIX", default_value = "vmesh")]
    pub consul_prefix: String,

    /// Address of the xDS (ADS gRPC) server that Envoy proxies connect to.
    #[arg(long, env = "VMESH_XDS_ADDR", default_value = "127.0.0.1:18000")]
    pub xds_addr: SocketAddr,

    /// Serve xDS plaintext and unauthenticated even where it could be authenticated (the relay
    /// is on) or off loopback. Anyone who reaches the port can then read any proxy's config and
    /// acknowledge or reject config for it; the controller warns at start.
    #[arg(long, env = "VMESH_XDS_INSECURE")]
    pub xds_insecure: bool,

    /// Address of the admin HTTP endpoint: /healthz, /readyz, /metrics, /status, /config_dump.
    #[arg(long, env = "VMESH_ADMIN_ADDR", default_value = "127.0.0.1:19000")]
    pub admin_addr: SocketAddr,

    /// This replica's name, in logs and in the leader key. Defaults to `<hostname>-<pid>`.
    #[arg(long, env = "VMESH_ID", default_value_t = default_id())]
    pub id: String,

    /// TTL of the Consul session that holds leadership; a leader that stops renewing
    /// it loses leadership after this long.
    #[arg(long, env = "VMESH_LEADER_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_ttl: Duration,

    /// How long a released leader lock stays untakeable (Consul's lock delay).
    #[arg(long, env = "VMESH_LEADER_LOCK_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub leader_lock_delay: Duration,

    /// How long to wait for a burst of file changes to settle before applying it.
    #[arg(long, env = "VMESH_DEBOUNCE", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,

    /// Address of the relay listener that `vmesh-agent`s register with and stream discovery to
    /// (TLS; mutual TLS after registration). Off unless set; needs the Consul source, which
    /// holds the bootstrap tokens and revocations.
    #[arg(long, env = "VMESH_RELAY_ADDR")]
    pub relay_addr: Option<SocketAddr>,

    /// Directory of the controller's own state: the built-in CA (`ca/ca.key`, mode 0600, and
    /// `ca/ca.pem`), created on first start. Not needed with --ca-cert and --ca-key.
    #[arg(long, env = "VMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// PEM of an operator-supplied CA certificate (optionally followed by its issuers) that
    /// signs agent and controller certificates. Every replica must use the same CA.
    #[arg(long, env = "VMESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// PKCS#8 PEM private key of --ca-cert.
    #[arg(long, env = "VMESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// SPIFFE trust domain of the mesh: agents are `spiffe://<trust-domain>/dc/<dc>/agent/<node>`.
    #[arg(long, env = "VMESH_TRUST_DOMAIN", default_value = "vmesh")]
    pub trust_domain: String,

    /// Lifetime of the client certificates issued to agents; they renew at half-life.
    #[arg(long, env = "VMESH_AGENT_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub agent_cert_ttl: Duration,

    /// How long the services of an agent that disconnected keep receiving traffic.
    #[arg(long, env = "VMESH_DISCOVERY_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub discovery_grace: Duration,

    /// After a start, how long to wait for the registered agents to report before serving
    /// endpoints of Consul services (so a restart never serves an empty service).
    #[arg(long, env = "VMESH_DISCOVERY_WARMUP", default_value = "10s", value_parser = humantime::parse_duration)]
    pub discovery_warmup: Duration,

    /// Registrations one source address may make at once; then --registration-rate per second.
    /// Over it, a registration is refused (the agent retries later) before any other work.
    #[arg(long, env = "VMESH_REGISTRATION_BURST", default_value_t = 20)]
    pub registration_burst: u32,

    /// Registrations per second one source address may make after its burst.
    #[arg(long, env = "VMESH_REGISTRATION_RATE", default_value_t = 1.0)]
    pub registration_rate: f64,

    /// Connections the xDS port holds at once (each Envoy holds one). At the limit, new
    /// connections wait until one closes.
    #[arg(long, env = "VMESH_XDS_MAX_CONNECTIONS", default_value_t = 4096)]
    pub xds_max_connections: usize,

    /// Connections the relay port holds at once (each agent holds one, two while it renews).
    #[arg(long, env = "VMESH_RELAY_MAX_CONNECTIONS", default_value_t = 16384)]
    pub relay_max_connections: usize,

    /// Connections the admin port holds at once.
    #[arg(long, env = "VMESH_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,

    /// How long a new connection may stay silent (after the TLS handshake, on the relay port)
    /// before it is closed.
    #[arg(long, env = "VMESH_FIRST_BYTES_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub first_bytes_timeout: Duration,

    /// How long a TLS handshake (relay and xDS ports) may take before the connection is closed.
    #[arg(long, env = "VMESH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// How long an admin request may take: to send its headers (or, on a kept-alive
    /// connection, to start), to be answered, and to read the answer.
    #[arg(long, env = "VMESH_ADMIN_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub admin_request_timeout: Duration,

    /// Concurrent HTTP/2 streams one client may open on one xDS or relay connection.
    #[arg(long, env = "VMESH_MAX_STREAMS_PER_CONNECTION", default_value_t = 16)]
    pub max_streams_per_connection: u32,

    /// Largest gRPC message a client may send on the xDS and relay ports, in bytes.
    #[arg(long, env = "VMESH_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// The soft limit on open files the controller raises itself to at start (up to the hard
    /// limit): the ports' connection limits need more than the usual 1,024.
    #[arg(long, env = "VMESH_OPEN_FILES", default_value_t = 65536)]
    pub open_files: u64,

    /// Directory of secrets, when Vault is not used: secret `vmesh/tls/shop` is the directory
    /// `<secrets-dir>/vmesh/tls/shop/` with the files `cert`, `key` and/or `ca`. Watched for
    /// changes.
    #[arg(long, env = "VMESH_SECRETS_DIR", default_value = DEFAULT_SECRETS_DIR, conflicts_with = "vault_addr")]
    pub secrets_dir: PathBuf,

    #[command(flatten)]
    pub vault: vmesh_vault::VaultFlags,

    /// The KV version 2 mount secrets are read from in Vault.
    #[arg(long, env = "VMESH_VAULT_KV_MOUNT", default_value = "secret")]
    pub vault_kv_mount: String,

    /// How often each secret's version is asked of Vault (spread over the interval, ± 10 %).
    #[arg(long, env = "VMESH_VAULT_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub vault_poll_interval: Duration,

    /// Use Vault PKI as the mesh CA: the mount whose `sign/<role>` signs agent and controller
    /// certificates (instead of the built-in CA or --ca-cert). Needs Vault and the relay.
    #[arg(long, env = "VMESH_VAULT_PKI_MOUNT", conflicts_with_all = ["ca_cert", "ca_key"])]
    pub vault_pki_mount: Option<String>,

    /// The Vault PKI role that signs: it must allow URI SANs `spiffe://<trust-domain>/*` without a
    /// common name, and the name `vmesh-controller`.
    #[arg(long, env = "VMESH_VAULT_PKI_ROLE", default_value = "vmesh")]
    pub vault_pki_role: String,

    /// How often the Vault PKI CA is read, to see a rotation.
    #[arg(long, env = "VMESH_VAULT_PKI_POLL_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub vault_pki_poll_interval: Duration,

    #[command(flatten)]
    pub logging: vmesh_runtime::LogFlags,
}

impl Args {
    /// The limits of the HTTP/2 servers (xDS and relay).
    pub fn grpc_limits(&self) -> crate::listener::GrpcLimits {
        crate::listener::GrpcLimits {
            max_streams_per_connection: self.max_streams_per_connection,
            max_message_bytes: self.max_message_bytes,
        }
    }

    /// The limits of one port.
    pub fn port_limits(&self, max_connections: usize) -> crate::listener::Limits {
        crate::listener::Limits {
            max_connections,
            first_bytes: self.first_bytes_timeout,
            handshake: self.handshake_timeout,
        }
    }
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "vmesh".to_string());
    format!("{host}-{}", std::process::id())
}

/// Where an installed controller reads its config when told nothing (not a directory of this
/// repository, which an installed binary has no reason to find).
pub const DEFAULT_CONFIG_DIR: &str = "/etc/vmesh/config";

/// Where the controller reads secrets when neither Vault nor a directory is given.
pub const DEFAULT_SECRETS_DIR: &str = "/etc/vmesh/secrets";

/// Where the controller reads its config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceChoice {
    Dir(PathBuf),
    Consul,
}

impl Args {
    pub fn source(&self) -> SourceChoice {
        match (
            &self.config_dir,
            self.consul || self.consul_flags.consul_addr.is_some(),
        ) {
            (Some(dir), _) => SourceChoice::Dir(dir.clone()),
            (None, true) => SourceChoice::Consul,
            (None, false) => SourceChoice::Dir(PathBuf::from(DEFAULT_CONFIG_DIR)),
        }
    }

    pub fn consul_config(&self) -> Result<vmesh_consul::ConsulConfig, vmesh_consul::ConsulError> {
        self.consul_flags.config()
    }

    /// Why secrets may not be sent to proxies, if they may not: xDS is plaintext and
    /// unauthenticated off loopback, where anyone could ask for them.
    pub fn secrets_refused(&self) -> Option<String> {
        (self.xds_insecure && !self.xds_addr.ip().is_loopback()).then(|| {
            format!(
                "certificates and keys are sent only over authenticated xDS, and --xds-insecure serves xDS on {} in plaintext to anyone: drop --xds-insecure (gateways then authenticate with mesh certificates) or serve xDS on loopback",
                self.xds_addr
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("vmesh-controller").chain(args.iter().copied()))
            .expect("arguments parse")
    }

    #[test]
    fn the_source_is_chosen_by_flags() {
        assert_eq!(
            parse(&[]).source(),
            SourceChoice::Dir("/etc/vmesh/config".into())
        );
        assert_eq!(
            parse(&["--config-dir", "x"]).source(),
            SourceChoice::Dir("x".into())
        );
        assert_eq!(parse(&["--consul"]).source(), SourceChoice::Consul);
        assert_eq!(
            parse(&["--consul-addr", "127.0.0.1:8500"]).source(),
            SourceChoice::Consul
        );
        assert_eq!(
            parse(&["--consul-addr", "127.0.0.1:8500", "--config-dir", "x"]).source(),
            SourceChoice::Dir("x".into()),
            "an explicit directory wins over an address from the environment"
        );
        assert!(Args::try_parse_from(["c", "--consul", "--config-dir", "x"]).is_err());
    }
}
