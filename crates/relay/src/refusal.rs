//! Why the relay refuses a call or ends a stream: the relay's own error type. The gRPC edge turns
//! it into a `tonic::Status` ([`RefusalKind`] decides the code); the message is what the caller
//! reads (never a secret), and the reason is the bounded label of
//! `vmesh_relay_refused_total{reason}`.

use std::fmt;

use vmesh_tls::SpiffeId;

/// How a refusal is reported to the caller (maps one-to-one to a gRPC code at the edge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request itself is wrong (a bad CSR, a node name that is not one).
    InvalidArgument,
    /// No or an unusable client certificate.
    Unauthenticated,
    /// A known caller that may not do this (revoked, a refused token, a taken node name).
    PermissionDenied,
    /// The controller cannot do it now (Consul unreachable); try again later.
    Unavailable,
    /// Too many calls from the caller's address; try again later.
    RateLimited,
}

/// A refusal: its kind, its reason (a metric label) and the caller's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// A bounded label: `revoked`, `token_expired`, `bad_certificate`, ...
    pub reason: &'static str,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    pub fn new(kind: RefusalKind, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            reason,
            message: message.into(),
        }
    }

    /// An agent whose identity (or this certificate of it) is on the deny list.
    pub fn revoked(id: &SpiffeId) -> Self {
        Refusal::new(
            RefusalKind::PermissionDenied,
            "revoked",
            format!(
                "agent {id} is revoked; re-admit it with `vmeshctl agent allow` and a new bootstrap token"
            ),
        )
    }

    /// An open stream cut because its agent was revoked.
    pub fn revoked_while_connected(id: &SpiffeId) -> Self {
        Refusal::new(
            RefusalKind::PermissionDenied,
            "revoked",
            format!("agent {id} has been revoked"),
        )
    }

    /// Too many registrations from one address.
    pub fn rate_limited() -> Self {
        Refusal::new(
            RefusalKind::RateLimited,
            "rate_limited",
            "too many registrations from this address; try again in a few seconds",
        )
    }

    /// The controller cannot reach its records in Consul; the details belong in its log, not in
    /// an answer to a caller who may hold no certificate.
    pub fn unavailable() -> Self {
        Refusal::new(
            RefusalKind::Unavailable,
            "unavailable",
            "the controller cannot reach its records in Consul; try again later",
        )
    }
}
