//! `vmeshctl apply`: validate config documents locally, then write each object to its own
//! Consul key `<prefix>/config/<Kind>/<name>` with check-and-set.
//!
//! Nothing is written unless every document is valid. Each write is conditional on the
//! ModifyIndex read just before it, so a concurrent change is never overwritten blindly:
//! it stops the run with exit code 4 and says which objects were already written.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::Value;
use vmesh_model::{parse_single, parse_value, ObjectKey, Parsed, Problem};

use crate::consul::{ConsulArgs, Failure, Kv, Layout};

/// Consul's default value limit; the controller rejects larger values.
pub const MAX_VALUE_BYTES: usize = vmesh_model::limits::MAX_DOCUMENT_BYTES;

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A file (several documents separated by `---` allowed), a directory of *.yaml, *.yml
    /// and *.json files (searched recursively), or `-` for standard input. Repeatable.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Show what would be created, configured or left unchanged, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

/// One valid object, ready to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub key: ObjectKey,
    /// Where it came from: `shop.yaml documents[1]`.
    pub origin: String,
    /// The value to store: this one document as YAML.
    pub value: String,
    /// Content hash of the document (the model's `version`), to compare with what is stored.
    pub version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

pub fn run(args: &ApplyArgs) -> anyhow::Result<ExitCode> {
    let planned = match load(&args.files, &mut std::io::stdin().lock())? {
        Ok(planned) => planned,
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            anyhow::bail!(
                "{} problem{} found; nothing was applied",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
        }
    };
    let kv = args.consul.connect()?;
    let mut out = std::io::stdout().lock();
    apply(&kv, &args.consul.layout(), &planned, args.dry_run, &mut out)?;
    Ok(ExitCode::SUCCESS)
}

/// Reads and validates every document of `inputs` (`-` is `stdin`). `Ok(Err(problems))`
/// when any document is invalid: every problem, each naming its file, document and field.
/// Objects are ordered Upstreams, VirtualServices, Gateways (what refers to something comes
/// after it), in input order within a kind.
pub fn load(
    inputs: &[PathBuf],
    stdin: &mut dyn Read,
) -> anyhow::Result<Result<Vec<Planned>, Vec<String>>> {
    let mut texts = Vec::new();
    let mut problems = Vec::new();
    let mut stdin_read = false;
    for input in inputs {
        if input.as_os_str() == "-" {
            anyhow::ensure!(
                !stdin_read,
                "-f - is given twice: standard input is read once"
            );
            stdin_read = true;
            let mut bytes = Vec::new();
            stdin
                .take(vmesh_model::limits::MAX_DOCUMENT_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .context("reading standard input")?;
            match vmesh_model::limits::document_text(bytes) {
                Ok(text) => texts.push(("<stdin>".to_string(), text)),
                Err(p) => problems.push(format!("<stdin>: {p}")),
            }
            continue;
        }
        for file in crate::validate::collect(input)? {
            match crate::validate::read_text(&file)? {
                Ok(text) => texts.push((file.display().to_string(), text)),
                Err(p) => problems.push(format!("{}: {p}", file.display())),
            }
        }
    }
    let mut planned: Vec<Planned> = Vec::new();
    let mut seen: BTreeMap<ObjectKey, String> = BTreeMap::new();
    for (source, text) in &texts {
        let documents = match read_documents(text) {
            Ok(d) => d,
            Err(p) => {
                problems.push(format!("{source}: {p}"));
                continue;
            }
        };
        for (i, (value, ordered)) in documents.into_iter().enumerate() {
            let origin = format!("{source} documents[{i}]");
            match plan_document(value, ordered) {
                Err(ps) => problems.extend(ps.iter().map(|p| at(&origin, p))),
                Ok(p) => {
                    if let Some(first) = seen.get(&p.key) {
                        problems.push(format!(
                            "{origin}: {} is also defined in {first}; each object may be given once",
                            p.key
                        ));
                        continue;
                    }
                    seen.insert(p.key.clone(), origin.clone());
                    planned.push(Planned { origin, ..p });
                }
            }
        }
    }
    if !problems.is_empty() {
        return Ok(Err(problems));
    }
    if planned.is_empty() {
        return Ok(Err(vec![
            "no documents in the input; nothing to apply".into()
        ]));
    }
    planned.sort_by_key(|p| p.key.kind);
    Ok(Ok(planned))
}

fn at(origin: &str, p: &Problem) -> String {
    if p.path.is_empty() {
        format!("{origin}: {}", p.message)
    } else {
        format!("{origin}: {}: {}", p.path, p.message)
    }
}

/// The documents of a text, each as JSON (what the model validates, read exactly as the
/// controller reads it) and, when it could be read so, as YAML in its written key order
/// (what is stored, so that the stored value reads like the input).
fn read_documents(text: &str) -> Result<Vec<(Value, Option<serde_yaml_ng::Value>)>, Problem> {
    let values: Vec<Value> = vmesh_model::read_documents(text)?;
    // Within the limits (read_documents checked), so reading again costs as little.
    let ordered = vmesh_model::read_documents_as::<serde_yaml_ng::Value>(text)
        .ok()
        .filter(|o| o.len() == values.len())
        .map_or_else(
            || vec![None; values.len()],
            |o| o.into_iter().map(Some).collect(),
        );
    Ok(values.into_iter().zip(ordered).collect())
}

/// Validates one document and renders the value to store.
fn plan_document(
    value: Value,
    ordered: Option<serde_yaml_ng::Value>,
) -> Result<Planned, Vec<Problem>> {
    let document = match parse_value(value.clone()) {
        Parsed::Invalid(problems) => return Err(problems),
        Parsed::Document(d) => d,
    };
    document.result?;
    // What is stored must be exactly what was validated: re-read the rendering as the
    // controller will, and fall back to the JSON reading (keys sorted) if it differs.
    let renderings = [
        ordered.and_then(|o| serde_yaml_ng::to_string(&o).ok()),
        serde_yaml_ng::to_string(&value).ok(),
    ];
    let text = renderings
        .into_iter()
        .flatten()
        .find(|text| same_document(text, &document.key, &document.version))
        .ok_or_else(|| {
            vec![Problem::new(
                "",
                "cannot be written back as a YAML document that reads the same",
            )]
        })?;
    if text.len() > MAX_VALUE_BYTES {
        return Err(vec![Problem::new(
            "",
            format!(
                "the document is {} KiB as YAML; a Consul value is limited to {} KiB",
                text.len() / 1024,
                MAX_VALUE_BYTES / 1024
            ),
        )]);
    }
    Ok(Planned {
        key: document.key,
        origin: String::new(),
        value: text,
        version: document.version,
    })
}

/// Whether `text` is one document, of `key`, whose content hash is `version`.
fn same_document(text: &str, key: &ObjectKey, version: &str) -> bool {
    matches!(parse_single(text), Ok(Parsed::Document(d)) if &d.key == key && d.version == version)
}

/// What applying `planned` over what is stored does.
pub fn outcome(planned: &Planned, stored: Option<&[u8]>) -> Outcome {
    match stored {
        None => Outcome::Created,
        Some(bytes) if bytes == planned.value.as_bytes() => Outcome::Unchanged,
        Some(bytes) => match std::str::from_utf8(bytes) {
            // The same document written differently (comments, layout, JSON) is unchanged.
            Ok(text) if same_document(text, &planned.key, &planned.version) => Outcome::Unchanged,
            _ => Outcome::Configured,
        },
    }
}

/// Writes every planned object (or, with `dry_run`, says what it would do), printing one
/// line per object as it goes. Stops at the first conflict or Consul error, which then
/// says what was already written.
pub fn apply(
    kv: &dyn Kv,
    layout: &Layout,
    planned: &[Planned],
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut done: Vec<String> = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        let key = layout.config_key(&p.key);
        let step = || -> anyhow::Result<Outcome> {
            let stored = kv.get(&key)?;
            let outcome = outcome(p, stored.as_ref().map(|s| s.value.as_slice()));
            if dry_run || outcome == Outcome::Unchanged {
                return Ok(outcome);
            }
            let cas = stored.map_or(0, |s| s.modify_index);
            if kv.put_cas(&key, p.value.as_bytes(), cas)? {
                Ok(outcome)
            } else {
                Err(Failure::Conflict(format!(
                    "conflict: {key} changed after it was read (someone else wrote or deleted it); {} was not written",
                    p.key
                ))
                .into())
            }
        };
        match step() {
            Ok(outcome) => {
                let suffix = if dry_run { " (dry run)" } else { "" };
                writeln!(out, "{} {}{suffix}", p.key, outcome.as_str())?;
                if outcome != Outcome::Unchanged {
                    done.push(format!("{} {}", p.key, outcome.as_str()));
                }
            }
            Err(e) => {
                let rest: Vec<String> =
                    planned[i + 1..].iter().map(|p| p.key.to_string()).collect();
                let written = if done.is_empty() {
                    "nothing was written before it".to_string()
                } else {
                    format!("already written: {}", done.join(", "))
                };
                let not_attempted = if rest.is_empty() {
                    String::new()
                } else {
                    format!("; not attempted: {}", rest.join(", "))
                };
                return Err(e.context(format!(
                    "apply stopped at {} ({written}{not_attempted}); run apply again to retry",
                    p.key
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::consul::{exit_code, Stored};

    fn load_text(text: &str) -> Result<Vec<Planned>, Vec<String>> {
        load(&[PathBuf::from("-")], &mut text.as_bytes()).unwrap()
    }

    const SHOP: &str = "kind: VirtualService\nname: shop\nspec:\n  domains: [\"shop.example.com\"]\n  routes:\n    - upstream: shop\n";
    const UPSTREAM: &str =
        "kind: Upstream\nname: shop\nspec:\n  static:\n    hosts:\n      - {address: 127.0.0.1, port: 8080}\n";

    #[test]
    fn documents_become_one_yaml_value_each_in_kind_order() {
        let planned = load_text(&format!("{SHOP}---\n# a comment\n{UPSTREAM}")).unwrap();
        let keys: Vec<String> = planned.iter().map(|p| p.key.to_string()).collect();
        assert_eq!(keys, ["Upstream/shop", "VirtualService/shop"]);
        assert_eq!(planned[0].origin, "<stdin> documents[1]");
        let v = &planned[1].value;
        assert!(
            v.starts_with("kind: VirtualService\nname: shop\nspec:\n"),
            "{v}"
        );
        assert!(
            v.find("domains").unwrap() < v.find("routes").unwrap(),
            "{v}"
        );
        assert!(!v.contains("---"), "{v}");
        assert!(matches!(parse_single(v), Ok(Parsed::Document(_))));
    }

    #[test]
    fn json_documents_are_stored_as_yaml() {
        let planned = load_text(
            r#"{"kind": "Upstream", "name": "a", "spec": {"static": {"hosts": [{"address": "127.0.0.1", "port": 1}]}}}"#,
        )
        .unwrap();
        assert!(
            planned[0].value.starts_with("kind: Upstream\nname: a\n"),
            "{}",
            planned[0].value
        );
    }

    #[test]
    fn every_problem_names_its_document_and_field() {
        let bad = "kind: VirtualService\nname: bad\nspec:\n  domains: [\"*\"]\n  routes:\n    - match: {regex: \"(\"}\n      upstream: x\n";
        let problems = load_text(&format!(
            "{UPSTREAM}---\n{bad}---\nkind: Route\nname: x\n---\n{UPSTREAM}"
        ))
        .unwrap_err();
        let all = problems.join("\n");
        assert!(
            all.contains("<stdin> documents[1]: spec.routes[0].match.regex: invalid regex"),
            "{all}"
        );
        assert!(
            all.contains("<stdin> documents[2]: kind: unknown kind"),
            "{all}"
        );
        assert!(
            all.contains(
                "<stdin> documents[3]: Upstream/shop is also defined in <stdin> documents[0]"
            ),
            "{all}"
        );
        let problems = load_text("kind: [").unwrap_err();
        assert!(
            problems[0].starts_with("<stdin>: invalid YAML"),
            "{problems:?}"
        );
        let problems = load_text("# nothing\n").unwrap_err();
        assert!(problems[0].contains("no documents"), "{problems:?}");
    }

    #[test]
    fn the_same_document_written_differently_is_unchanged() {
        let p = &load_text(SHOP).unwrap()[0];
        assert_eq!(outcome(p, None), Outcome::Created);
        assert_eq!(outcome(p, Some(p.value.as_bytes())), Outcome::Unchanged);
        assert_eq!(outcome(p, Some(SHOP.as_bytes())), Outcome::Unchanged);
        let edited = SHOP.replace("shop.example.com", "shop.example.org");
        assert_eq!(outcome(p, Some(edited.as_bytes())), Outcome::Configured);
        assert_eq!(outcome(p, Some(b"\xff")), Outcome::Configured);
    }

    /// A KV whose writes are refused, as when another writer moved the key's ModifyIndex
    /// between this run's read and its write.
    #[derive(Default)]
    struct Fake {
        stored: RefCell<BTreeMap<String, Stored>>,
        refuse: Option<String>,
    }

    impl Kv for Fake {
        fn get(&self, key: &str) -> anyhow::Result<Option<Stored>> {
            Ok(self.stored.borrow().get(key).cloned())
        }
        fn list(&self, prefix: &str) -> anyhow::Result<Vec<Stored>> {
            Ok(self
                .stored
                .borrow()
                .values()
                .filter(|s| s.key.starts_with(prefix))
                .cloned()
                .collect())
        }
        fn put_cas(&self, key: &str, value: &[u8], cas: u64) -> anyhow::Result<bool> {
            if self.refuse.as_deref() == Some(key) {
                return Ok(false);
            }
            let mut stored = self.stored.borrow_mut();
            let current = stored.get(key).map_or(0, |s| s.modify_index);
            if current != cas {
                return Ok(false);
            }
            stored.insert(
                key.into(),
                Stored {
                    key: key.into(),
                    modify_index: current + 1,
                    value: value.to_vec(),
                },
            );
            Ok(true)
        }
        fn delete_cas(&self, key: &str, cas: u64) -> anyhow::Result<bool> {
            let mut stored = self.stored.borrow_mut();
            if stored.get(key).map(|s| s.modify_index) != Some(cas) {
                return Ok(false);
            }
            stored.remove(key);
            Ok(true)
        }
    }

    #[test]
    fn a_cas_conflict_stops_with_exit_4_and_says_what_was_written() {
        let gateway = "kind: Gateway\nname: edge\nspec:\n  bindPort: 10000\n";
        let planned = load_text(&format!("{SHOP}---\n{UPSTREAM}---\n{gateway}")).unwrap();
        let kv = Fake {
            refuse: Some("vmesh/config/VirtualService/shop".into()),
            ..Fake::default()
        };
        let mut out = Vec::new();
        let e = apply(&kv, &Layout::new("vmesh"), &planned, false, &mut out).unwrap_err();
        assert_eq!(exit_code(&e), 4);
        let msg = format!("{e:#}");
        assert!(
            msg.contains("conflict: vmesh/config/VirtualService/shop changed"),
            "{msg}"
        );
        assert!(
            msg.contains("already written: Upstream/shop created"),
            "{msg}"
        );
        assert!(msg.contains("not attempted: Gateway/edge"), "{msg}");
        assert_eq!(String::from_utf8(out).unwrap(), "Upstream/shop created\n");
        assert!(kv
            .stored
            .borrow()
            .contains_key("vmesh/config/Upstream/shop"));
        assert!(!kv.stored.borrow().contains_key("vmesh/config/Gateway/edge"));
    }

    #[test]
    fn a_dry_run_writes_nothing() {
        let planned = load_text(SHOP).unwrap();
        let kv = Fake::default();
        let mut out = Vec::new();
        apply(&kv, &Layout::new("vmesh"), &planned, true, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "VirtualService/shop created (dry run)\n"
        );
        assert!(kv.stored.borrow().is_empty());
    }
}
