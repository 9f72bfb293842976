//! vmeshctl's commands, as a library so that tests build Envoy bootstraps and drive Consul
//! with exactly the code users run.

pub mod agent;
pub mod apply;
pub mod bootstrap;
pub mod consul;
pub mod dev_cert;
pub mod get;
pub mod status;
pub mod token;
pub mod validate;
