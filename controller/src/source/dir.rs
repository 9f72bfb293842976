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
//!
//! A directory that cannot be read (out of file descriptors, permissions) is
//! never an empty one: the last config keeps being served and the source says
//! it is degraded. A file over the document size limit or not UTF-8 text is
//! rejected under its own name, in the same words as a Consul value
//! (`vmesh_model::limits`); a file over the limit is not read at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use vmesh_model::{ParsedSource, Problem};

use super::{Change, SourceEvent, SourceHealth};

/// A file's content: its text, or why it has none usable.
type Content = Result<String, Problem>;

/// How often the directory is rescanned even without events.
const RESCAN: Duration = Duration::from_secs(5);

/// How many times in a row a read is retried because files changed while it ran.
const MAX_REREADS: u32 = 20;

pub struct DirSource {
    dir: PathBuf,
    debounce: Duration,
    health: Arc<SourceHealth>,
}

impl DirSource {
    pub fn new(dir: PathBuf, debounce: Duration, health: Arc<SourceHealth>) -> Self {
        DirSource {
            dir,
            debounce,
            health,
        }
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
        let mut known: BTreeMap<String, Content> = BTreeMap::new();
        let mut missing_reported = false;
        let mut first = true;
        // Whether any config was ever read: until then there is no "last config" to serve.
        let mut read_once = false;
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
            // Reading files and parsing them block: off the async workers.
            let dir = self.dir.clone();
            let scanned = tokio::task::spawn_blocking(move || scan(&dir)).await?;
            // A write that landed while we were reading may have torn the read (one file
            // old, another new): read again once things settle, a few times at most.
            if drain(&mut wake) && rereads < MAX_REREADS {
                rereads += 1;
                tokio::time::sleep(self.debounce).await;
                continue;
            }
            rereads = 0;
            match scanned {
                Err(e) => {
                    // Never read as "no files": that would remove every object.
                    if self.health.degraded().is_none() {
                        if read_once {
                            warn!(dir = %self.dir.display(), error = %e, "cannot read the config directory; serving the last config read");
                        } else {
                            warn!(dir = %self.dir.display(), error = %e, "cannot read the config directory; serving no config until it can be read");
                        }
                    }
                    self.health
                        .failed(format!("cannot read {}: {e}", self.dir.display()));
                }
                Ok(Some(files)) => {
                    read_once = true;
                    if self.health.degraded().is_some() {
                        info!(dir = %self.dir.display(), "the config directory can be read again");
                    }
                    self.health.ok();
                    if missing_reported {
                        info!(dir = %self.dir.display(), "config directory is back");
                        missing_reported = false;
                    }
                    let (changes, now) = tokio::task::spawn_blocking(move || {
                        let mut known = known;
                        (diff(&mut known, files), known)
                    })
                    .await?;
                    known = now;
                    if !changes.is_empty() || first {
                        debug!(changes = changes.len(), "config directory changed");
                        if out.send(SourceEvent { changes }).await.is_err() {
                            return Ok(());
                        }
                    }
                    first = false;
                }
                Ok(None) => {
                    if watching {
                        let _ = watcher.unwatch(&self.dir);
                        watching = false;
                    }
                    if !missing_reported {
                        if read_once {
                            warn!(dir = %self.dir.display(), "config directory is missing; serving the last config read");
                        } else {
                            warn!(dir = %self.dir.display(), "config directory does not exist; serving no config until it does (or start the controller with --config-dir DIR or --consul)");
                        }
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

/// Reads every config file under `dir`, by path relative to it. `Ok(None)` if `dir` is not a
/// directory; an error if anything under it cannot be read (a file that vanished meanwhile is
/// simply not there).
fn scan(dir: &Path) -> std::io::Result<Option<BTreeMap<String, Content>>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue; // hidden files, editors' swap and temporary files
            }
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            if !is_config_file(&name) {
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .to_string();
            let content = match read_file(&path) {
                Ok(content) => content,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            files.insert(rel, content);
        }
    }
    Ok(Some(files))
}

/// A config file's content: larger than the limit is refused without reading it.
fn read_file(path: &Path) -> std::io::Result<Content> {
    let size = std::fs::metadata(path)?.len();
    let limit = vmesh_model::limits::MAX_DOCUMENT_BYTES;
    if size > limit as u64 {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        return Ok(Err(Problem::new("", vmesh_model::limits::too_large(size))));
    }
    use std::io::Read as _;
    let mut bytes = Vec::new();
    // A file that grew since: read one byte more than the limit, to see it is over.
    std::fs::File::open(path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(vmesh_model::limits::document_text(bytes))
}

fn is_config_file(name: &str) -> bool {
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Changes from `known` to `now`; `known` becomes `now`.
fn diff(known: &mut BTreeMap<String, Content>, now: BTreeMap<String, Content>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (path, content) in &now {
        if known.get(path) == Some(content) {
            continue;
        }
        changes.push(match content {
            Ok(text) => Change::File {
                source: path.clone(),
                parsed: ParsedSource::file(text),
            },
            Err(problem) => Change::Reject {
                source: path.clone(),
                key: None,
                problem: problem.clone(),
                revision: None,
                created: None,
            },
        });
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

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Content> {
        pairs
            .iter()
            .map(|(p, t)| (p.to_string(), Ok(t.to_string())))
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
                parsed: ParsedSource::file("3")
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
        let got = scan(&dir).unwrap().unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["a.yaml", "sub/b.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(scan(&dir).unwrap().is_none());
    }

    #[test]
    fn files_over_the_limit_or_not_text_are_refused_in_the_words_of_every_source() {
        let dir = std::env::temp_dir().join(format!("vmesh-scan-limits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let limit = vmesh_model::limits::MAX_DOCUMENT_BYTES;
        std::fs::write(dir.join("big.yaml"), vec![b'#'; limit + 1]).unwrap();
        std::fs::write(dir.join("junk.yaml"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::write(dir.join("ok.yaml"), "a: 1\n").unwrap();
        let got = scan(&dir).unwrap().unwrap();
        assert_eq!(
            got["big.yaml"].as_ref().unwrap_err().message,
            "the document is 513 KiB; the limit is 512 KiB"
        );
        assert_eq!(
            got["junk.yaml"].as_ref().unwrap_err().message,
            vmesh_model::limits::NOT_TEXT
        );
        assert!(got["ok.yaml"].is_ok());
        let changes = diff(&mut BTreeMap::new(), got);
        assert!(matches!(
            &changes[0],
            Change::Reject { source, key: None, revision: None, .. } if source == "big.yaml"
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error_not_a_missing_file() {
        let dir =
            std::env::temp_dir().join(format!("vmesh-scan-unreadable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        // A link to itself cannot be read (ELOOP), whoever runs the test: like running out of
        // file descriptors, it must not read as "the file is gone".
        std::os::unix::fs::symlink(dir.join("loop.yaml"), dir.join("loop.yaml")).unwrap();
        let result = scan(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(result.is_err(), "{result:?}");
    }
}
