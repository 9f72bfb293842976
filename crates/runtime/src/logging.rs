//! Logging for vmesh's binaries (`vmesh-controller`, `vmesh-agent`): one definition of the
//! `--log` and `--log-format` flags and of the subscriber they install, so both binaries read
//! the same flags and variables and write the same formats.

use anyhow::Context as _;
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--log` and `--log-format`; flatten into a binary's arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct LogFlags {
    /// Log filter, e.g. `info` or `vmesh_xds=debug,info`.
    #[arg(long, env = "VMESH_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "VMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogFlags {
    /// Installs the global tracing subscriber (once per process).
    pub fn init(&self) -> anyhow::Result<()> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log)
            .with_context(|| format!("--log {:?} is not a valid log filter", self.log))?;
        use std::io::IsTerminal;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal());
        match self.log_format {
            LogFormat::Json => builder.json().flatten_event(true).init(),
            LogFormat::Text => builder.init(),
        }
        Ok(())
    }
}
