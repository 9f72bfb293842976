//! What the Consul commands share: the connection flags, kind names, and a small synchronous
//! view of Consul KV ([`Kv`]) that the commands are written against, so that their logic is
//! tested with the real client and with injected outcomes alike. The keys are
//! [`vmesh_layout::Layout`]'s, the controller's own.

use anyhow::Context;
use clap::Args;
use vmesh_consul::{Client, ConsulConfig, ConsulFlags, WriteOptions};
pub use vmesh_layout::Layout;
use vmesh_model::Kind;

/// How to reach Consul; the same flags and variables as `vmesh-controller` and Consul's CLI.
#[derive(Args, Clone, Debug, Default)]
pub struct ConsulArgs {
    #[command(flatten)]
    pub flags: ConsulFlags,
    /// Prefix of every vmesh key in Consul KV (the controller's --consul-prefix).
    #[arg(
        long,
        visible_alias = "consul-prefix",
        env = "VMESH_CONSUL_PREFIX",
        default_value = "vmesh"
    )]
    pub prefix: String,
}

impl ConsulArgs {
    pub fn config(&self) -> anyhow::Result<ConsulConfig> {
        Ok(self.flags.config()?)
    }

    /// A connected view of Consul KV.
    pub fn connect(&self) -> anyhow::Result<ConsulKv> {
        ConsulKv::new(&self.config()?)
    }

    pub fn layout(&self) -> Layout {
        Layout::new(&self.prefix)
    }
}

/// A kind as typed on the command line: any case, singular or plural, or a short form.
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    let kind = match s.to_ascii_lowercase().as_str() {
        "upstream" | "upstreams" | "us" => Kind::Upstream,
        "virtualservice" | "virtualservices" | "vs" => Kind::VirtualService,
        "gateway" | "gateways" | "gw" => Kind::Gateway,
        _ => {
            return Err(format!(
                "unknown kind {s:?}: expected Upstream (upstreams, us), VirtualService (virtualservices, vs) or Gateway (gateways, gw)"
            ))
        }
    };
    Ok(kind)
}

/// A failure with its own exit code (see [`exit_code`]).
#[derive(Debug)]
pub enum Failure {
    /// Exit 3: the object asked for does not exist.
    NotFound(String),
    /// Exit 4: a key changed between reading and writing it (CAS).
    Conflict(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound(m) | Failure::Conflict(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

/// Exit codes scripts can rely on.
pub mod exit {
    pub const OK: u8 = 0;
    /// Invalid input, or Consul could not be read or written.
    pub const ERROR: u8 = 1;
    /// Bad usage (clap's own code).
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const CONFLICT: u8 = 4;
    /// `status`: an object shown is `Rejected`, or a source shown has problems.
    pub const REJECTED: u8 = 5;
}

/// The exit code an error ends vmeshctl with.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Failure>() {
        Some(Failure::NotFound(_)) => exit::NOT_FOUND,
        Some(Failure::Conflict(_)) => exit::CONFLICT,
        None => exit::ERROR,
    }
}

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub key: String,
    pub modify_index: u64,
    pub value: Vec<u8>,
}

/// The KV calls the commands make, synchronous.
pub trait Kv {
    fn get(&self, key: &str) -> anyhow::Result<Option<Stored>>;
    /// Every key under `prefix`, in key order.
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<Stored>>;
    /// Writes only if the key is still at `cas` (0: only if absent); false when it was not.
    fn put_cas(&self, key: &str, value: &[u8], cas: u64) -> anyhow::Result<bool>;
    /// Deletes only if the key is still at `cas`; false when it was not.
    fn delete_cas(&self, key: &str, cas: u64) -> anyhow::Result<bool>;
}

/// [`Kv`] on the vmesh-consul client, driven by a current-thread runtime.
pub struct ConsulKv {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl ConsulKv {
    pub fn new(config: &ConsulConfig) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        // The client's connector spawns onto the runtime it is built in.
        let client = runtime.block_on(async { Client::new(config) })?;
        Ok(ConsulKv { runtime, client })
    }

    pub fn address(&self) -> &str {
        self.client.address()
    }
}

fn stored(e: vmesh_consul::KvEntry) -> Stored {
    Stored {
        key: e.key,
        modify_index: e.modify_index,
        value: e.value,
    }
}

impl Kv for ConsulKv {
    fn get(&self, key: &str) -> anyhow::Result<Option<Stored>> {
        let entry = self
            .runtime
            .block_on(self.client.kv_get(key))
            .with_context(|| format!("reading {key}"))?;
        Ok(entry.map(stored))
    }

    fn list(&self, prefix: &str) -> anyhow::Result<Vec<Stored>> {
        let read = self
            .runtime
            .block_on(self.client.kv_list(prefix, None, std::time::Duration::ZERO))
            .with_context(|| format!("listing {prefix}"))?;
        anyhow::ensure!(
            !read.filtered_by_acls,
            "listing {prefix}: the ACL token may not read every key under it (Consul filtered the answer); it needs key_prefix \"{prefix}\" read"
        );
        let mut entries: Vec<Stored> = read.value.into_iter().map(stored).collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    fn put_cas(&self, key: &str, value: &[u8], cas: u64) -> anyhow::Result<bool> {
        let options = WriteOptions {
            cas: Some(cas),
            ..WriteOptions::default()
        };
        self.runtime
            .block_on(self.client.kv_put(key, value.to_vec(), &options))
            .with_context(|| format!("writing {key}"))
    }

    fn delete_cas(&self, key: &str, cas: u64) -> anyhow::Result<bool> {
        self.runtime
            .block_on(self.client.kv_delete(key, Some(cas)))
            .with_context(|| format!("deleting {key}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_case_insensitive_with_plurals_and_short_forms() {
        for s in [
            "VirtualService",
            "virtualservice",
            "VirtualServices",
            "vs",
            "VS",
        ] {
            assert_eq!(parse_kind(s), Ok(Kind::VirtualService), "{s}");
        }
        assert_eq!(parse_kind("upstreams"), Ok(Kind::Upstream));
        assert_eq!(parse_kind("gw"), Ok(Kind::Gateway));
        let e = parse_kind("Route").unwrap_err();
        assert!(e.contains("unknown kind \"Route\""), "{e}");
    }
}
