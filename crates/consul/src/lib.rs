//! vmesh-consul: the Consul HTTP calls vmesh makes ([`Client`]), configured from the
//! standard `CONSUL_*` variables ([`ConsulConfig`]), the blocking-query watch as a pure state
//! machine ([`KvWatch`]) and the one driver every KV watch runs on ([`KvWatcher`]).

mod agent;
mod client;
mod config;
#[cfg(feature = "clap")]
mod flags;
pub mod watch;
mod watcher;

pub use agent::{
    parse_agent_checks, parse_agent_self, parse_agent_services, AgentSelf, LocalCheck, LocalService,
};
pub use client::{decode_entries, Client, Indexed, KvEntry, SessionRequest, WriteOptions};
pub use config::{ConsulConfig, ConsulEnv};
#[cfg(feature = "clap")]
pub use flags::ConsulFlags;
pub use watch::{Filtered, KvWatch, Next, WatchConfig, WatchEvent};
pub use watcher::{Changes, KvWatcher, WatchError};

/// What went wrong talking to Consul. Messages never contain the ACL token.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("Consul configuration: {0}")]
    Config(String),
    #[error("cannot reach Consul at {0}")]
    Transport(String),
    #[error("Consul answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected answer from Consul: {0}")]
    Decode(String),
}

impl ConsulError {
    fn status(status: hyper::StatusCode, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        ConsulError::Status {
            status: status.as_u16(),
            message: text.trim().chars().take(500).collect(),
        }
    }

    /// 403: the token lacks a permission (the message names it).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, ConsulError::Status { status: 403, .. })
    }
}
