//! Fuzz targets for everything vmesh reads from outside, and the harness that runs them.
//!
//! Each target takes arbitrary bytes and must neither panic nor take long, whatever they are:
//!
//! - [`document`]: a config document, read and judged the way both config sources do
//!   (`ParsedSource::keyed` and `::file`, with the limits of `docs/limits.md`), then translated
//!   with a gateway and an upstream.
//! - [`kv_value`]: a Consul KV listing as Consul sends it (JSON, values in base64), and each
//!   value decoded as the registry's records (bootstrap tokens, registrations, revocations), as
//!   an object's status, and as another replica's discovery record (merged into the catalog).
//! - [`relay_message`]: `Relay.Connect` messages from an agent, decoded and fed to the
//!   controller's hub (`HubState`), and a `RegisterRequest`.
//! - [`xds_request`]: ADS requests (state of the world or delta), decoded and fed to the xDS
//!   stream state machine serving a translated config.
//!
//! [`mutate`] makes the inputs: seeds (the files of `examples/`, valid protobuf messages) changed
//! by a deterministic, seeded mutator. `tests/fuzz.rs` runs a bounded number of cases per target
//! in CI; `docs/testing-fuzz.md` says how to run them longer.

pub mod mutate;
mod targets;

pub use targets::{document, kv_value, relay_message, xds_request, Target, TARGETS};
