//! The vmesh relay API: the messages and gRPC services between `vmesh-agent` and the controller,
//! generated from `vmesh/relay/v1/relay.proto` by `build.rs`, and the discovery stream state
//! machines of both ends ([`relay`]), which do no IO.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

/// Generated from `vmesh/relay/v1/relay.proto` (package `vmesh.relay.v1`).
pub mod v1 {
    #![allow(missing_docs)]
    tonic::include_proto!("vmesh.relay.v1");
}

pub mod relay;
