//! Golden files: the translation of each example directory, rendered with
//! `vmesh_translate::render::render_translation`, compared exactly with
//! `tests/golden/<example>.txt`.
//!
//! After an intended change of the output, regenerate them with
//!
//! ```sh
//! UPDATE_GOLDEN=1 cargo test -p vmesh-translate --test golden
//! ```
//!
//! and review the diff like code.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use vmesh_model::{ConfigSet, SourceMode};
use vmesh_translate::{render::render_translation, translate};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Loads every `*.yaml` / `*.json` file of an example directory as one source.
fn load_example(dir: &str) -> ConfigSet {
    let dir_path = workspace_root().join("examples").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir_path)
        .unwrap_or_else(|e| panic!("{}: {e}", dir_path.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    let mut set = ConfigSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let source = format!("{dir}/{}", file.file_name().unwrap().to_string_lossy());
        set.upsert_source(&source, &text, SourceMode::MultiDoc);
    }
    set
}

fn check_golden(example: &str) {
    let mut config = load_example(example).snapshot();
    // Secrets are not files of the examples: what needs them is left out, with a warning.
    config.secrets.offline = true;
    assert!(
        config.source_errors.is_empty(),
        "{:?}",
        config.source_errors
    );
    let rendered = render_translation(&translate(&config));
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{example}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run UPDATE_GOLDEN=1 cargo test -p vmesh-translate --test golden",
            golden.display()
        )
    });
    if expected != rendered {
        let first_diff = expected
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(rendered.lines().count()));
        panic!(
            "{} differs from the translation, first at line {}:\n  golden: {:?}\n  actual: {:?}\n\
             If the change is intended, run UPDATE_GOLDEN=1 cargo test -p vmesh-translate --test golden",
            golden.display(),
            first_diff + 1,
            expected.lines().nth(first_diff),
            rendered.lines().nth(first_diff),
        );
    }
}

#[test]
fn demo() {
    check_golden("demo");
}

#[test]
fn reference() {
    check_golden("reference");
}
