//! `vmeshctl validate`: judge config documents offline, exactly as the controller would.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use vmesh_model::{ConfigSet, SourceMode, State};

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// A file or a directory of *.yaml, *.yml and *.json files.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
}

/// A config file's text, or why it has none usable (over the size limit, not UTF-8): the
/// controller's rules (`vmesh_model::limits`). An error if it cannot be read at all.
pub fn read_text(file: &Path) -> anyhow::Result<Result<String, vmesh_model::Problem>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(vmesh_model::limits::document_text(bytes))
}

/// Exit 0 when every object is accepted (warnings allowed), 1 when any is rejected.
pub fn run(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut set = ConfigSet::new();
    for path in &args.files {
        for file in collect(path)? {
            let source = file.display().to_string();
            // The same limits and words as the controller's config directory.
            match read_text(&file)? {
                Ok(text) => set.upsert_source(&source, &text, SourceMode::MultiDoc),
                Err(problem) => set.reject_source(&source, None, problem),
            };
        }
    }
    let mut config = set.snapshot();
    config.secrets.offline = true;
    let translation = vmesh_translate::translate(&config);
    let mut rejected = 0;
    for (key, report) in &translation.reports {
        let state = match report.state {
            State::Accepted => "ok",
            State::Warning => "warning",
            State::Rejected => {
                rejected += 1;
                "rejected"
            }
        };
        println!("{key}: {state} ({})", report.source);
        for p in &report.errors {
            println!("  error: {p}");
        }
        for p in &report.warnings {
            println!("  warning: {p}");
        }
    }
    for (source, problems) in &config.source_errors {
        for p in problems {
            rejected += 1;
            println!("{source}: {p}");
        }
    }
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The files a `-f` argument names: the file itself, or a directory's *.yaml, *.yml and
/// *.json files (recursively, hidden ones skipped), sorted.
pub(crate) fn collect(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        anyhow::ensure!(path.exists(), "{} does not exist", path.display());
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
    {
        let p = entry?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            files.extend(collect(&p)?);
        } else if [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e)) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}
