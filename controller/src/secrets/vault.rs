//! Secrets from Vault KV v2: secret `vmesh/tls/shop` is `<mount>/data/vmesh/tls/shop`.
//!
//! Vault has no watch, so each secret's metadata (small, and it carries `current_version`) is
//! polled every `--vault-poll-interval`, and its data read only when the version moved. A new
//! name is read at once; after that its polls are spread evenly over the interval (its first
//! poll comes a random part of the interval later, then every interval ± 10 %), so a thousand
//! secrets make a steady trickle of requests rather than a burst every interval.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use vmesh_retry::Backoff;
use vmesh_vault::{Vault, VaultError};

use super::store::SecretRead;
use super::Read;

/// Most secrets read in one go (the rest wait for the next call, a moment later).
const BATCH: usize = 64;

pub struct VaultBackend {
    vault: Arc<Vault>,
    mount: String,
    interval: Duration,
    /// When each name is polled next.
    due: BTreeMap<String, Instant>,
    /// The version each name was read at.
    versions: BTreeMap<String, u64>,
    /// Names read once already (their next poll is spread over the interval).
    polled: BTreeSet<String>,
    /// Pseudo-random numbers for the spreading.
    rng: Backoff,
}

impl VaultBackend {
    pub fn new(vault: Arc<Vault>, mount: String, interval: Duration) -> Self {
        VaultBackend {
            vault,
            mount,
            interval,
            due: BTreeMap::new(),
            versions: BTreeMap::new(),
            polled: BTreeSet::new(),
            rng: Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
        }
    }

    pub fn mount(&self) -> &str {
        &self.mount
    }

    pub fn set_names(&mut self, names: &BTreeSet<String>) {
        let now = Instant::now();
        self.due.retain(|n, _| names.contains(n));
        self.versions.retain(|n, _| names.contains(n));
        self.polled.retain(|n| names.contains(n));
        for name in names {
            self.due.entry(name.clone()).or_insert(now);
        }
    }

    fn next_poll(&mut self, name: &str, now: Instant) -> Instant {
        let unit = self.rng.next_unit();
        if self.polled.insert(name.to_string()) {
            now + self.interval.mul_f64(unit)
        } else {
            now + self.interval.mul_f64(0.9 + 0.2 * unit)
        }
    }

    /// The reads of the secrets due now, waiting for the first to be due.
    pub async fn next(&mut self) -> Vec<Read> {
        loop {
            let Some(first) = self.due.values().min().copied() else {
                // Nothing to watch: wait for names.
                std::future::pending::<()>().await;
                continue;
            };
            tokio::time::sleep_until(first).await;
            let now = Instant::now();
            let names: Vec<String> = self
                .due
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(n, _)| n.clone())
                .take(BATCH)
                .collect();
            let mut out = Vec::new();
            for name in names {
                let reads = self.poll(&name).await;
                let at = self.next_poll(&name, Instant::now());
                self.due.insert(name, at);
                out.extend(reads);
            }
            if !out.is_empty() {
                return out;
            }
        }
    }

    /// Polls one secret: its metadata, and its data when the version moved.
    async fn poll(&mut self, name: &str) -> Vec<Read> {
        if let Err(e) = self.vault.logged_in().await {
            return vec![Read {
                name: name.to_string(),
                request: "login",
                result: SecretRead::Unreachable(format!("not logged in to Vault: {e}")),
            }];
        }
        let version = match self.vault.kv2_version(&self.mount, name).await {
            Ok(v) => v,
            Err(e) => {
                self.versions.remove(name);
                return vec![Read {
                    name: name.to_string(),
                    request: "metadata",
                    result: failed(e),
                }];
            }
        };
        if self.versions.get(name) == Some(&version) {
            // Unchanged: only that Vault answered.
            return vec![Read {
                name: name.to_string(),
                request: "metadata",
                result: SecretRead::Unchanged,
            }];
        }
        let data = match self
            .vault
            .kv2_read_version(&self.mount, name, version)
            .await
        {
            Ok(fields) => {
                self.versions.insert(name.to_string(), version);
                SecretRead::Found {
                    revision: format!("version {version}"),
                    fields,
                }
            }
            Err(VaultError::NotFound(_)) => {
                self.versions.insert(name.to_string(), version);
                SecretRead::Missing(format!(
                    "version {version}, the latest, is deleted or destroyed"
                ))
            }
            Err(e) => failed(e),
        };
        vec![Read {
            name: name.to_string(),
            request: "data",
            result: data,
        }]
    }
}

fn failed(e: VaultError) -> SecretRead {
    match e {
        VaultError::NotFound(_) => SecretRead::Missing("not found in Vault".into()),
        VaultError::Denied(m) | VaultError::Login(m) => SecretRead::Denied(m),
        VaultError::Unreachable(m) => SecretRead::Unreachable(m),
    }
}
