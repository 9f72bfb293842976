//! Secrets from a directory (`--secrets-dir`, the embedded default): secret `vmesh/tls/shop` is
//! the directory `<dir>/vmesh/tls/shop/`, one file per field (`cert`, `key`, `ca`), as a
//! Kubernetes secret volume or Nomad's `template` lays them out.
//!
//! The directory is watched with `notify`; any event only says "look again", and every secret
//! referred to is read again and compared by content. A rescan every few seconds catches what
//! a watch missed (a directory created later, a watch that failed). A field over
//! [`MAX_PEM_BYTES`] is not read.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::debug;
use vmesh_tls::material::MAX_PEM_BYTES;

use super::store::{SecretRead, CA_FIELD, CERT_FIELD, KEY_FIELD};
use super::Read;

/// How often every secret is read again without an event.
const RESCAN: Duration = Duration::from_secs(5);
/// How long a burst of events may take to settle.
const DEBOUNCE: Duration = Duration::from_millis(20);

pub struct DirBackend {
    dir: PathBuf,
    names: BTreeSet<String>,
    /// What each name read as last time, so only changes are reported.
    last: BTreeMap<String, SecretRead>,
    /// Read everything at the next call, without waiting.
    pending: bool,
    wake: mpsc::UnboundedReceiver<()>,
    watcher: Option<notify::RecommendedWatcher>,
    watching: bool,
}

impl DirBackend {
    pub fn new(dir: PathBuf) -> anyhow::Result<Self> {
        let (tx, wake) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| !matches!(e.kind, EventKind::Access(_))) {
                let _ = tx.send(());
            }
        })?;
        Ok(DirBackend {
            dir,
            names: BTreeSet::new(),
            last: BTreeMap::new(),
            pending: true,
            wake,
            watcher: Some(watcher),
            watching: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn set_names(&mut self, names: &BTreeSet<String>) {
        if names != &self.names {
            self.names = names.clone();
            self.last.retain(|n, _| names.contains(n));
            self.pending = true;
        }
    }

    /// The reads that differ from the last ones: at once when names were added, else after
    /// the next event or rescan.
    pub async fn next(&mut self) -> Vec<Read> {
        loop {
            if !self.watching && self.dir.is_dir() {
                if let Some(w) = &mut self.watcher {
                    match w.watch(&self.dir, RecursiveMode::Recursive) {
                        Ok(()) => self.watching = true,
                        Err(e) => debug!(error = %e, "cannot watch the secrets directory"),
                    }
                }
            }
            if !std::mem::take(&mut self.pending) {
                tokio::select! {
                    _ = self.wake.recv() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        while self.wake.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(RESCAN) => {}
                }
            }
            let dir = self.dir.clone();
            let names = self.names.clone();
            let reads = tokio::task::spawn_blocking(move || {
                names
                    .into_iter()
                    .map(|name| {
                        let read = read_secret(&dir, &name);
                        (name, read)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let mut out = Vec::new();
            for (name, read) in reads {
                if self.last.get(&name) != Some(&read) {
                    self.last.insert(name.clone(), read.clone());
                    out.push(Read {
                        name,
                        request: "file",
                        result: read,
                    });
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
    }
}

/// Reads secret `name` under `dir`.
pub fn read_secret(dir: &Path, name: &str) -> SecretRead {
    let path = dir.join(name);
    if !path.is_dir() {
        return SecretRead::Missing(format!(
            "not found: no directory {} (with files {CERT_FIELD}, {KEY_FIELD} and/or {CA_FIELD})",
            path.display()
        ));
    }
    let mut fields = BTreeMap::new();
    for field in [CERT_FIELD, KEY_FIELD, CA_FIELD] {
        let file = path.join(field);
        let mut text = String::new();
        let read = std::fs::File::open(&file).and_then(|f| {
            f.take(MAX_PEM_BYTES as u64 + 1)
                .read_to_string(&mut text)
                .map(|_| ())
        });
        match read {
            Ok(()) if text.len() > MAX_PEM_BYTES => {
                return SecretRead::Denied(format!(
                    "{} is over {MAX_PEM_BYTES} bytes",
                    file.display()
                ))
            }
            Ok(()) => {
                fields.insert(field.to_string(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return SecretRead::Denied(format!("cannot read {}: {e}", file.display()));
            }
        }
    }
    let mut hash_input = String::new();
    for (k, v) in &fields {
        hash_input.push_str(k);
        hash_input.push('\0');
        hash_input.push_str(v);
        hash_input.push('\0');
    }
    SecretRead::Found {
        revision: format!(
            "content {}",
            vmesh_model::content_hash(hash_input.as_bytes())
        ),
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_a_directory_of_fields() {
        let dir = std::env::temp_dir().join(format!("vmesh-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let shop = dir.join("vmesh/tls/shop");
        std::fs::create_dir_all(&shop).unwrap();
        assert!(
            matches!(read_secret(&dir, "vmesh/tls/none"), SecretRead::Missing(m) if m.contains("no directory"))
        );
        std::fs::write(shop.join("cert"), "C").unwrap();
        std::fs::write(shop.join("key"), "K").unwrap();
        let SecretRead::Found { revision, fields } = read_secret(&dir, "vmesh/tls/shop") else {
            panic!("not found");
        };
        assert_eq!(fields.len(), 2);
        assert_eq!(fields["cert"], "C");
        std::fs::write(shop.join("cert"), "C2").unwrap();
        let SecretRead::Found { revision: r2, .. } = read_secret(&dir, "vmesh/tls/shop") else {
            panic!("not found");
        };
        assert_ne!(revision, r2, "a new content is a new revision");
        std::fs::write(shop.join("ca"), "x".repeat(MAX_PEM_BYTES + 1)).unwrap();
        assert!(
            matches!(read_secret(&dir, "vmesh/tls/shop"), SecretRead::Denied(m) if m.contains("over"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
