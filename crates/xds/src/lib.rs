//! vmesh-xds: the xDS transport. It knows type URLs, versions, nonces and
//! subscriptions, and nothing of the mesh.
//!
//! - [`resource`]: resources, content versions and per-proxy snapshots.
//! - [`stream`]: the per-stream state machine (SotW and delta), pure and synchronous.
//! - `server` (feature `server`): the tonic ADS service that drives it.

pub mod resource;
#[cfg(feature = "server")]
pub mod server;
pub mod stream;

pub use resource::{Part, ProxySnapshot, Resource, ResourceRef, TypeResources};
