//! vmesh-agent: runs on every VM next to the local Consul agent, reads the services and health
//! checks registered there ([`discovery`]) and streams them to the controller over the mutually
//! authenticated relay ([`relay`]), with a certificate it obtained with a bootstrap token and renews
//! at half-life ([`datadir`] keeps it).
//!
//! The binary is `main.rs`; everything is callable from tests through [`run`].
#![forbid(unsafe_code)]

pub mod args;
pub mod backoff;
pub mod datadir;
pub mod discovery;
pub mod relay;

use std::future::Future;

use tracing::info;

pub use args::Args;
pub use backoff::Backoff;
pub use datadir::{Credentials, DataDir, DataDirError, Identity};
pub use discovery::LocalReader;
pub use relay::{choose_bind_addr, NodeInfo};

/// This agent's version, sent in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs the agent until `shutdown` completes (then `Ok`). An error means retrying cannot help
/// (e.g. the controller refused the bootstrap token, or no token and no valid certificate): the
/// binary exits with status 1.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let agent = relay::Agent::new(args)?;
    tokio::select! {
        result = agent.run() => result,
        _ = shutdown => {
            info!("stopping");
            Ok(())
        }
    }
}
