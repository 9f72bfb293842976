//! vmesh-relay: the relay between `vmesh-agent` and the controller, as state machines without IO.
//!
//! - [`discovery`]: the discovery half of the `Relay.Connect` stream, both ends
//!   ([`AgentDiscovery`], [`ControllerDiscovery`]): snapshots, acked deltas, resync.
//! - [`merger`]: what agents reported, merged into the catalog the translator reads, with the
//!   least-privilege and grace-period rules ([`DiscoveryMerger`]).
//! - [`replicas`]: the discovery records replicas share through Consul KV and how a replica
//!   reads the others' ([`RemoteView`]).
//! - [`hub`]: the controller's state of all its agents ([`HubState`]): streams, revocation,
//!   warm-up, the catalog to publish, the records to write.
//! - [`session`]: the agent's session ([`Session`]): streams, reconnects, renewal
//!   make-before-break, expiry and re-registration.
//! - [`refusal`]: the relay's own error type ([`Refusal`]), turned into a gRPC status only at the
//!   edge.
//! - [`rate`]: per-address rate limits ([`AddressLimiter`]) and refusals logged as counts
//!   ([`RefusalLog`]).
//!
//! The controller's side (hub, merger, replicas) is behind the default `controller` feature;
//! `vmesh-agent` builds without it.
//!
//! Nothing here reads a clock, opens a socket or spawns a task: the controller's and the agent's
//! async tasks feed events and the time in and carry the effects out. Each machine is tested with
//! synchronous unit tests.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod discovery;
#[cfg(feature = "controller")]
pub mod hub;
#[cfg(feature = "controller")]
pub mod merger;
#[cfg(feature = "controller")]
pub mod rate;
pub mod refusal;
#[cfg(feature = "controller")]
pub mod replicas;
pub mod session;

pub use discovery::{AgentDiscovery, ControllerDiscovery};
#[cfg(feature = "controller")]
pub use hub::{AgentSummary, HubState, Observation, Poll};
#[cfg(feature = "controller")]
pub use merger::{AgentIdentity, DiscoveryMerger, Refusal as InstanceRefusal};
#[cfg(feature = "controller")]
pub use rate::{AddressLimiter, Rate, RefusalLine, RefusalLog, RefusalSummary};
pub use refusal::{Refusal, RefusalKind};
#[cfg(feature = "controller")]
pub use replicas::{DiscoveryRecord, RemoteView, SharedInstance};
pub use session::{Action, Credential, Ended, Note, ProxyConfigs, Session};
