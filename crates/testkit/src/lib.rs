//! Test harness for vmesh.
//!
//! - [`Envoy`]: a real Envoy process started from a bootstrap YAML, with admin helpers
//!   (readiness, stats, config dump) and its log captured to a file.
//! - [`EchoServer`]: an HTTP/1.1 upstream that echoes each request back as JSON (the same server
//!   runs standalone as the `vmesh-echo` binary).
//! - [`request`] / [`http_get`] / [`HttpClient`]: a small blocking HTTP client that neither follows
//!   redirects nor treats 4xx/5xx as errors.
//! - [`eventually`] / [`assert_eventually!`]: polling instead of sleeping; [`free_port`].
//!
//! Tests that need Envoy fail (never skip) when it is missing; install it with
//! `scripts/setup-envoy`.

mod echo;
mod envoy;
mod http;
mod poll;
mod ports;

pub use echo::{echo_router, EchoServer, ECHO_STATUS_HEADER, SERVED_BY_HEADER};
pub use envoy::{envoy_binary, require_envoy, workspace_root, Envoy, EnvoyOptions, INSTALL_HINT};
pub use http::{http_get, request, HttpClient, Response};
pub use poll::{eventually, POLL_INTERVAL};
pub use ports::{free_port, free_ports};
