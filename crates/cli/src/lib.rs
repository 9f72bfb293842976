//! vmeshctl's commands, as a library so that tests build Envoy bootstraps with
//! exactly the code users run.

pub mod bootstrap;
pub mod status;
pub mod validate;
