//! The config directory source: every `*.yaml`, `*.yml` and `*.json` file under a
//! directory, watched with `notify`.
//!
//! Any event only says "look again": after a debounce the whole directory is
//! rescanned and compared with what was read before, so editors that write a
//! temporary file and rename it, partial writes (a half-written file is
//! rejected on its own and re-read on the next event) and bursts all come out
//! the same. A directory that disappears keeps the last config served (it is
//! more often a checkout or a copy in progress than a wish to drop every
//! route) and is picked up again when it comes back. A slow periodic rescan
//! catches anything a watch missed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Change, SourceEvent};

/// How often the directory is rescanned even without events.
const RESCAN: Duration = Duration::from_secs(5);

/// How many times in a row a read is retried because files changed while it ran.
const MAX_REREADS: u32 = 20;

pub struct DirSource {
    dir: PathBuf,
    debounce: Duration,
}

impl DirSource {
    pub fn new(dir: PathBuf, debounce: Duration) -> Self {
        DirSource { dir, debounce }
    }

    /// Runs until `out` is closed.
    pub async fn run(self, out: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
        let (wake_tx, mut wake) = mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Opening or reading a file changes nothing, and our own reads would wake us
                // forever.
                if res.is_ok_and(|e| !matches!(e.kind, EventKind::Access(_))) {
                    let _ = wake_tx.send(());
                }
            })?;
        // The parent tells us when the directory itself is removed or re-created.
        let parent = self
            .dir
            .canonicalize()
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf))
            .or_else(|| self.dir.parent().map(Path::to_path_buf))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        if let Err(e) = watcher.watch(&parent, RecursiveMode::NonRecursive) {
            debug!(error = %e, parent = %parent.display(), "cannot watch the parent directory");
        }
        let mut watching = false;
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        let mut missing_reported = false;
        let mut first = true;
        let mut rereads = 0;
        loop {
            if !watching && self.dir.is_dir() {
                match watcher.watch(&self.dir, RecursiveMode::Recursive) {
                    Ok(()) => watching = true,
                    Err(e) => {
                        warn!(error = %e, dir = %self.dir.display(), "cannot watch the config directory")
                    }
                }
            }
            let scanned = scan(&self.dir);
            // A write that landed while we were reading may have torn the read (one file
            // old, another new): read again once things settle, a few times at most.
            if drain(&mut wake) && rereads < MAX_REREADS {
                rereads += 1;
                tokio::time::sleep(self.debounce).await;
                continue;
            }
            rereads = 0;
            match scanned {
                Some(files) => {
                    if missing_reported {
                        info!(dir = %self.dir.display(), "config directory is back");
                        missing_reported = false;
                    }
                    let changes = diff(&mut known, files);
                    if !changes.is_empty() || first {
                        debug!(changes = changes.len(), "config directory changed");
                        if out.send(SourceEvent { changes }).await.is_err() {
                            return Ok(());
                        }
                    }
                    first = false;
                }
                None => {
                    if watching {
                        let _ = watcher.unwatch(&self.dir);
                        watching = false;
                    }
                    if !missing_reported {
                        warn!(dir = %self.dir.display(), "config directory is missing; serving the last config read");
                        missing_reported = true;
                    }
                    if first {
                        // Nothing to serve yet, but say so: an empty config is a valid start.
                        if out
                            .send(SourceEvent {
                                changes: Vec::new(),
                            })
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                        first = false;
                    }
                }
            }
            tokio::select! {
                woke = wake.recv() => {
                    if woke.is_none() {
                        return Ok(());
                    }
                    // Let the burst settle, then take everything that came with it.
                    tokio::time::sleep(self.debounce).await;
                    drain(&mut wake);
                }
                _ = tokio::time::sleep(RESCAN) => {}
                _ = out.closed() => return Ok(()),
            }
        }
    }
}

/// Takes every pending wake-up; true if there was any.
fn drain(wake: &mut mpsc::UnboundedReceiver<()>) -> bool {
    let mut any = false;
    while wake.try_recv().is_ok() {
        any = true;
    }
    any
}

/// Reads every config file under `dir`, by path relative to it. `None` if `dir` is not a directory.
fn scan(dir: &Path) -> Option<BTreeMap<String, String>> {
    if !dir.is_dir() {
        return None;
    }
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue; // hidden files, editors' swap and temporary files
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            if !is_config_file(&name) {
                continue;
            }
            // A file that vanished between listing and reading is simply not there.
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .to_string();
            files.insert(rel, String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    Some(files)
}

fn is_config_file(name: &str) -> bool {
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Changes from `known` to `now`; `known` becomes `now`.
fn diff(known: &mut BTreeMap<String, String>, now: BTreeMap<String, String>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (path, text) in &now {
        if known.get(path) != Some(text) {
            changes.push(Change::File {
                source: path.clone(),
                text: text.clone(),
            });
        }
    }
    for path in known.keys() {
        if !now.contains_key(path) {
            changes.push(Change::Remove {
                source: path.clone(),
            });
        }
    }
    *known = now;
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn only_changed_files_are_reported() {
        let mut known = BTreeMap::new();
        let c = diff(&mut known, files(&[("a.yaml", "1"), ("b.yaml", "2")]));
        assert_eq!(c.len(), 2);
        let c = diff(&mut known, files(&[("a.yaml", "1"), ("b.yaml", "3")]));
        assert_eq!(
            c,
            vec![Change::File {
                source: "b.yaml".into(),
                text: "3".into()
            }]
        );
        let c = diff(&mut known, files(&[("b.yaml", "3")]));
        assert_eq!(
            c,
            vec![Change::Remove {
                source: "a.yaml".into()
            }]
        );
        assert!(diff(&mut known, files(&[("b.yaml", "3")])).is_empty());
    }

    #[test]
    fn scan_reads_config_files_and_skips_hidden_and_other_files() {
        let dir = std::env::temp_dir().join(format!("vmesh-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.yaml"), "x").unwrap();
        std::fs::write(dir.join("sub/b.json"), "y").unwrap();
        std::fs::write(dir.join(".a.yaml.swp"), "z").unwrap();
        std::fs::write(dir.join("README.md"), "z").unwrap();
        let got = scan(&dir).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["a.yaml", "sub/b.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(scan(&dir).is_none());
    }
}
