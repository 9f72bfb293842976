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
//!
//! Tests that need Envoy fail (never skip) when it is missing; install it with
//! `scripts/setup-envoy`.

pub mod consul;
mod echo;
mod envoy;
mod http;
mod poll;
mod ports;

pub use consul::{ConsulEmulator, ConsulOptions};
pub use echo::{echo_router, EchoServer, ECHO_STATUS_HEADER, SERVED_BY_HEADER};
pub use envoy::{envoy_binary, require_envoy, workspace_root, Envoy, EnvoyOptions, INSTALL_HINT};
pub use http::{http_get, request, HttpClient, Response};
pub use poll::{eventually, POLL_INTERVAL};
pub use ports::{free_port, free_ports};
