//! Command-line arguments. Every flag can also be set with a `VMESH_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "vmesh-controller",
    version,
    about = "The vmesh control plane: config in, Envoy xDS out."
)]
pub struct Args {
    /// Directory of YAML/JSON config documents, watched for changes (the embedded default source).
    #[arg(long, env = "VMESH_CONFIG_DIR", default_value = "examples/demo")]
    pub config_dir: PathBuf,

    /// Address of the xDS (ADS gRPC) server that Envoy proxies connect to.
    #[arg(long, env = "VMESH_XDS_ADDR", default_value = "127.0.0.1:18000")]
    pub xds_addr: SocketAddr,

    /// Address of the admin HTTP endpoint: /healthz, /readyz, /metrics, /status, /config_dump.
    #[arg(long, env = "VMESH_ADMIN_ADDR", default_value = "127.0.0.1:19000")]
    pub admin_addr: SocketAddr,

    /// How long to wait for a burst of file changes to settle before applying it.
    #[arg(long, env = "VMESH_DEBOUNCE", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,

    /// Log format.
    #[arg(long, env = "VMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `vmesh_xds=debug,info`.
    #[arg(long, env = "VMESH_LOG", default_value = "info")]
    pub log: String,
}
