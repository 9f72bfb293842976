//! The workspace's own binaries for tests and benchmarks that start several of them, built fresh.
//!
//! Cargo gives a test the path of its own package's binaries (`CARGO_BIN_EXE_<name>`), built for
//! that run, but not of other packages': a controller test that starts `vmesh-agent` by path would
//! run whatever was built last, perhaps from older sources. [`workspace_binary`] never hands out
//! such a binary. It checks the binary against every source file it was built from (Cargo's
//! dep-info file beside it); when the binary is missing or any of them is newer, it runs
//! `cargo build` for it first (once per process), saying so on stderr.
//!
//! When the whole workspace is tested (`scripts/test`), every binary is already fresh and
//! nothing is built.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::envoy::workspace_root;

/// The profile the calling test or benchmark was compiled with: `dev` for tests, `release` for
/// benchmarks.
pub fn current_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    }
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root, where cargo
/// is run), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

/// Where `profile`'s artifacts go (`dev` builds into `debug/`).
fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// The path of binary `bin` of workspace package `package` built with cargo profile `profile`,
/// built first if it is missing or older than its sources. Panics if the build fails.
pub fn workspace_binary(package: &str, bin: &str, profile: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    let path = target_dir().join(profile_dir(profile)).join(bin);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let key = (bin.to_string(), profile.to_string());
    if built.contains(&key) {
        return path;
    }
    if let Some(why) = stale(&path) {
        eprintln!("[testkit] building {bin} ({profile}): {why}");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--package",
                package,
                "--bin",
                bin,
                "--profile",
                profile,
            ])
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
        assert!(
            status.success(),
            "cargo build of {bin} ({profile}) failed: {status}"
        );
        if let Some(why) = stale(&path) {
            panic!("{} is still stale after building it: {why}", path.display());
        }
    }
    built.insert(key);
    path
}

/// Why the binary at `path` must be built, if it must.
fn stale(path: &Path) -> Option<String> {
    let Ok(built) = std::fs::metadata(path).and_then(|m| m.modified()) else {
        return Some(format!("{} does not exist", path.display()));
    };
    let dep_info = path.with_extension("d");
    let Ok(text) = std::fs::read_to_string(&dep_info) else {
        return Some(format!("{} does not exist", dep_info.display()));
    };
    // The dep-info lists every source file the binary was built from, the dependencies' too
    // (a changed lock file that changes a dependency changes the files listed).
    dep_info_sources(&text)
        .into_iter()
        .find(|source| newer(source, built))
        .map(|source| format!("{} changed since it was built", source.display()))
}

fn newer(source: &Path, than: SystemTime) -> bool {
    std::fs::metadata(source)
        .and_then(|m| m.modified())
        // A source that is gone (a file removed or renamed) means the sources changed.
        .map_or(true, |m| m > than)
}

/// The files a dep-info file lists (`target: a.rs b\ c.rs ...`; spaces in names are escaped).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let Some(line) = text.lines().next() else {
        return Vec::new();
    };
    let Some((_, deps)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut files = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => {
                if !current.is_empty() {
                    files.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        files.push(PathBuf::from(current));
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_lists_every_source_with_escaped_spaces() {
        let text =
            "/t/debug/vmesh-agent: /w/agent/src/main.rs /w/a\\ b/lib.rs /w/c.rs\n\n/w/c.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            [
                PathBuf::from("/w/agent/src/main.rs"),
                PathBuf::from("/w/a b/lib.rs"),
                PathBuf::from("/w/c.rs")
            ]
        );
    }

    #[test]
    fn a_binary_older_than_a_source_is_stale_and_a_missing_one_too() {
        let dir = std::env::temp_dir().join(format!("vmesh-testkit-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("tool");
        assert!(stale(&bin).unwrap().contains("does not exist"));
        let source = dir.join("main.rs");
        std::fs::write(&source, "fn main() {}").unwrap();
        std::fs::write(&bin, "").unwrap();
        std::fs::write(
            dir.join("tool.d"),
            format!("{}: {}\n", bin.display(), source.display()),
        )
        .unwrap();
        // Built after its source: fresh.
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&bin)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(stale(&bin), None);
        // The source is edited after the build: stale.
        std::fs::File::options()
            .write(true)
            .open(&source)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(1))
            .unwrap();
        assert!(stale(&bin).unwrap().contains("main.rs changed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
