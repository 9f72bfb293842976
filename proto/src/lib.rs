//! The vmesh relay API: the messages and (with the `grpc` feature) the gRPC services between
//! `vmesh-agent` and the controller, generated from `vmesh/relay/v1/relay.proto` by `build.rs`.
//! Generated code only: the protocol's state machines are in `vmesh-relay`.
#![forbid(unsafe_code)]

/// Generated from `vmesh/relay/v1/relay.proto` (package `vmesh.relay.v1`).
pub mod v1 {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/vmesh.relay.v1.rs"));
}
