//! vmesh-agent: runs on every VM next to the local Consul agent, reads the services and health
//! checks registered there ([`discovery`]) and streams them to the controller over the mutually
//! authenticated relay, with a certificate it obtained with a bootstrap token and renews at
//! half-life ([`datadir`] keeps it).
//!
//! The relay's rules are the session state machine of `vmesh-relay`; [`session`] drives it and
//! [`client`] makes the calls. [`run`] starts the two tasks — `discovery` and `relay` — in one
//! supervisor: if either ends or panics, the agent exits non-zero and its supervisor (Nomad,
//! systemd) restarts it.
//!
//! With `--gateway`, the agent instead keeps the client certificate of an edge gateway's Envoy
//! ([`gateway`]).
//!
//! The binary is `main.rs`; everything is callable from tests through [`run`].
#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod datadir;
pub mod discovery;
pub mod gateway;
pub mod session;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;
use vmesh_runtime::Supervisor;

pub use args::Args;
pub use client::{choose_bind_addr, NodeInfo};
pub use datadir::{Credentials, DataDir, DataDirError, Identity};
pub use discovery::LocalReader;

/// This agent's version, sent in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long the tasks get to finish after a stop.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` completes (then `Ok`). An error means retrying cannot help
/// (e.g. the controller refused the bootstrap token, or no token and no valid certificate) or a
/// task died: the binary exits with status 1.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if let Some(proxy) = args.gateway.clone() {
        return gateway::run(client::Relay::new(args)?, proxy, shutdown).await;
    }
    let relay = client::Relay::new(args)?;
    tokio::pin!(shutdown);
    let (node, bind, creds) = tokio::select! {
        started = relay.start() => started?,
        () = &mut shutdown => return Ok(()),
    };
    let last = match relay.data.load_discovery() {
        Ok(last) => last,
        Err(e) => {
            warn!("ignoring the stored discovery: {e}");
            None
        }
    };
    let (local_tx, local_rx) = watch::channel(None);
    let reader = LocalReader::new(relay.consul.clone(), node.address.clone());
    let mut tasks = Supervisor::new();
    tasks.spawn(
        "discovery",
        discovery::poll(
            reader,
            relay.data.clone(),
            relay.args.poll_interval,
            local_tx,
            tasks.shutdown(),
        ),
    );
    let shutdown_handle = tasks.shutdown();
    tasks.spawn(
        "relay",
        session::run(relay, node, bind, creds, last, local_rx, shutdown_handle),
    );
    tasks.run(shutdown, STOP_GRACE).await?;
    Ok(())
}
