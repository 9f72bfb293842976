//! Test harness for vmesh.
//!
//! - [`Envoy`]: a real Envoy process started from a bootstrap YAML, with admin helpers
//!   (readiness, stats, config dump) and its log captured to a file.
//! - [`EchoServer`]: an HTTP/1.1 upstream that echoes each request back as JSON (the same server
//!   runs standalone as the `vmesh-echo` binary).
//! - [`request`] / [`http_get`] / [`HttpClient`]: a small blocking HTTP client that neither follows
//!   redirects nor treats 4xx/5xx as errors.
//! - [`eventually`] / [`assert_eventually!`]: polling instead of sleeping; [`free_port`].
//! - [`consul::ConsulEmulator`]: an in-process Consul HTTP API emulator (KV, blocking queries,
//!   sessions, ACLs) with knobs for outages, index resets and request counting (also the
//!   `vmesh-consul-emulator` binary); see `docs/testing-consul.md`.
//! - [`process`]: vmesh's own processes — a controller on free ports, an agent — with their logs,
//!   and what `/proc` says of them; [`workspace_binary`] builds the workspace's binaries fresh
//!   for tests that start another package's binary, so a stale one is never run.
//! - [`relay`]: a fake controller with the relay API (for the agent's tests) and simulated agents
//!   (for the controller's benchmarks), speaking the real protocol over mTLS.
//!
//! Tests that need Envoy fail (never skip) when it is missing; install it with
//! `scripts/setup-envoy`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod binary;
pub mod consul;
mod echo;
mod envoy;
mod http;
mod poll;
mod ports;
pub mod process;
pub mod relay;
mod serve;
pub mod tls;
pub mod vault;

pub use binary::{current_profile, target_dir, workspace_binary};

/// The variable that makes a named task of a vmesh binary panic (`vmesh_runtime::TEST_PANIC_VAR`),
/// for tests that check a dead task ends the process.
pub const TEST_PANIC_VAR: &str = "VMESH_TEST_PANIC";
pub use consul::{ConsulEmulator, ConsulOptions};
pub use echo::{echo_router, EchoServer, ECHO_STATUS_HEADER, SERVED_BY_HEADER};
pub use envoy::{envoy_binary, require_envoy, workspace_root, Envoy, EnvoyOptions, INSTALL_HINT};
pub use http::{http_get, raw_request, request, HttpClient, Response};
pub use poll::{eventually, POLL_INTERVAL};
pub use ports::{free_port, free_ports};
