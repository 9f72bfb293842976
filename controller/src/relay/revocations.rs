//! The deny list: revoked agents, watched in Consul KV (`<prefix>/revoked/`) and handed to the
//! hub, which cuts their streams and drops their services at once. While Consul cannot be read,
//! the last list stays in force.

use std::sync::Arc;

use vmesh_registry::{deny_list, Registry, Revocation};
use vmesh_runtime::{Component, Shutdown};

use super::hub::Hub;
use super::records::WatchedRecords;

pub async fn watch(
    registry: Registry,
    hub: Arc<Hub>,
    component: Component,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut revocations = WatchedRecords::new(
        registry.client().clone(),
        registry.layout().revoked_prefix(),
        "revoked agents",
    );
    loop {
        tokio::select! {
            () = revocations.changed(|e| registry.decode_revocation(e), &component) => {}
            () = shutdown.requested() => return Ok(()),
        }
        let list: Vec<Revocation> = revocations.values().cloned().collect();
        hub.set_deny(deny_list(&list));
    }
}
