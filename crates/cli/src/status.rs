//! `vmeshctl status`: the controller's judgement of every config object, from its admin
//! endpoint or from what the leader wrote to Consul KV.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use vmesh_layout::{ControllerStatus, ObjectStatus, ProxyCount};
use vmesh_model::{Kind, ObjectKey, Problem};

use crate::consul::{exit, parse_kind, ConsulArgs, Kv, Layout};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only objects of this kind: Upstream, VirtualService or Gateway (any case, plural, or
    /// us, vs, gw).
    #[arg(value_parser = parse_kind)]
    pub kind: Option<Kind>,
    /// Only the object of this name.
    pub name: Option<String>,
    /// The controller's admin address (used unless Consul is chosen).
    #[arg(long, env = "VMESH_ADMIN_ADDR", default_value = "127.0.0.1:19000")]
    pub admin_addr: String,
    /// Read status from Consul KV (`<prefix>/status/`). Also chosen when --consul-addr or
    /// CONSUL_HTTP_ADDR is set.
    #[arg(long)]
    pub consul: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub consul_args: ConsulArgs,
}

impl StatusArgs {
    pub fn uses_consul(&self) -> bool {
        self.consul || self.consul_args.flags.consul_addr.is_some()
    }
}

/// What `vmeshctl status` shows of one object: its status as the controller judged it, or, for a
/// config key the controller has not judged yet, `Pending`; and a note when what it shows is
/// behind.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub shown: Shown,
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Shown {
    Judged(ObjectStatus),
    /// A config key with no status yet.
    Pending {
        key: ObjectKey,
        source: String,
    },
}

impl Row {
    fn judged(status: ObjectStatus) -> Row {
        Row {
            shown: Shown::Judged(status),
            note: None,
        }
    }

    pub fn kind(&self) -> &str {
        match &self.shown {
            Shown::Judged(s) => &s.kind,
            Shown::Pending { key, .. } => key.kind.as_str(),
        }
    }

    pub fn name(&self) -> &str {
        match &self.shown {
            Shown::Judged(s) => &s.name,
            Shown::Pending { key, .. } => &key.name,
        }
    }

    /// `Accepted`, `Warning`, `Rejected` or `Pending`.
    pub fn state(&self) -> String {
        match &self.shown {
            Shown::Judged(s) => s.state.as_str().to_string(),
            Shown::Pending { .. } => "Pending".to_string(),
        }
    }

    fn source(&self) -> &str {
        match &self.shown {
            Shown::Judged(s) => &s.source,
            Shown::Pending { source, .. } => source,
        }
    }

    fn proxies(&self) -> ProxyCount {
        match &self.shown {
            Shown::Judged(s) => s.proxies,
            Shown::Pending { .. } => ProxyCount::default(),
        }
    }

    /// The JSON of `-o json`: the status as the controller wrote it (or a `Pending` one), with
    /// `note` when there is one.
    pub fn to_json(&self) -> Value {
        let mut v = match &self.shown {
            Shown::Judged(s) => serde_json::to_value(s).unwrap_or(Value::Null),
            Shown::Pending { key, source } => json!({
                "kind": key.kind.as_str(),
                "name": key.name,
                "state": "Pending",
                "errors": [],
                "warnings": [],
                "source": source,
                "servingLastGood": false,
                "proxies": {"total": 0, "acked": 0},
            }),
        };
        if let Some(note) = &self.note {
            v["note"] = Value::String(note.clone());
        }
        v
    }
}

/// Problems that belong to no object, by source.
pub type SourceErrors = BTreeMap<String, Vec<Problem>>;

pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (rows, source_errors) = if args.uses_consul() {
        let kv = args.consul_args.connect()?;
        from_consul(&kv, &args.consul_args.layout())?
    } else {
        from_admin(&args.admin_addr)?
    };
    let selected: Vec<&Row> = rows
        .iter()
        .filter(|r| args.kind.is_none_or(|k| r.kind() == k.as_str()))
        .filter(|r| args.name.as_deref().is_none_or(|n| r.name() == n))
        .collect();
    if args.name.is_some() && selected.is_empty() {
        eprintln!(
            "no {} named {}",
            args.kind.map_or("object", Kind::as_str),
            args.name.as_deref().unwrap_or_default()
        );
        return Ok(ExitCode::from(exit::NOT_FOUND));
    }
    // Problems of sources that are not objects are shown unfiltered only: a filter shows the
    // problems of the Consul keys of the objects it selects.
    let filtered = args.kind.is_some() || args.name.is_some();
    let layout = args.consul_args.layout();
    let (shown_errors, hidden): (SourceErrors, SourceErrors) =
        source_errors.into_iter().partition(|(source, _)| {
            !filtered
                || layout.parse_config_key(source).is_some_and(|key| {
                    args.kind.is_none_or(|k| key.kind == k)
                        && args.name.as_deref().is_none_or(|n| key.name == n)
                })
        });
    match args.output {
        Output::Json => {
            let json: Vec<Value> = selected.iter().map(|r| r.to_json()).collect();
            println!("{}", serde_json::to_string_pretty(&json)?)
        }
        Output::Table => {
            print!("{}", table(&selected, &shown_errors));
            if !hidden.is_empty() {
                let n: usize = hidden.values().map(Vec::len).sum();
                println!(
                    "({n} problem(s) of other sources not shown; run `vmeshctl status` without KIND and NAME)"
                );
            }
        }
    }
    let rejected = selected
        .iter()
        .any(|r| matches!(&r.shown, Shown::Judged(s) if s.state == vmesh_model::State::Rejected));
    // JSON shows objects only: only they count there.
    let sources_shown = args.output == Output::Table && !shown_errors.is_empty();
    if rejected || sources_shown {
        return Ok(ExitCode::from(exit::REJECTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// The objects and the problems of no object, as the controller's admin endpoint has them.
fn from_admin(admin_addr: &str) -> anyhow::Result<(Vec<Row>, SourceErrors)> {
    let url = format!("http://{admin_addr}/status");
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot reach the controller at {url}"))?
        .body_mut()
        .read_to_string()
        .context("reading the controller's answer")?;
    let status: ControllerStatus = serde_json::from_str(&body)
        .with_context(|| format!("the controller's answer at {url} is not its status"))?;
    let rows = status.objects.into_iter().map(Row::judged).collect();
    Ok((rows, status.source_errors))
}

/// The objects as the leader wrote them to `<prefix>/status/`, plus every object that has a
/// config key but no status yet (`Pending`), in kind and name order. Config keys that name
/// no object are problems of their key, as the controller reports them.
pub fn from_consul(kv: &dyn Kv, layout: &Layout) -> anyhow::Result<(Vec<Row>, SourceErrors)> {
    let mut problems = SourceErrors::new();
    let mut problem = |key: &str, message: String| {
        problems
            .entry(key.to_string())
            .or_default()
            .push(Problem::new("", message));
    };
    let mut configs: BTreeMap<ObjectKey, u64> = BTreeMap::new();
    for entry in kv.list(&layout.config_prefix())? {
        if entry.key.ends_with('/') {
            continue;
        }
        match layout.parse_config_key(&entry.key) {
            Some(key) => {
                configs.insert(key, entry.modify_index);
            }
            None => problem(
                &entry.key,
                format!(
                    "config keys are {}<Kind>/<name>, with Kind one of Upstream, VirtualService, Gateway; this key is ignored",
                    layout.config_prefix()
                ),
            ),
        }
    }
    let mut statuses: BTreeMap<ObjectKey, ObjectStatus> = BTreeMap::new();
    for entry in kv.list(&layout.status_prefix())? {
        let Some(key) = layout.parse_status_key(&entry.key) else {
            continue;
        };
        match serde_json::from_slice::<ObjectStatus>(&entry.value) {
            Ok(status) => {
                statuses.insert(key, status);
            }
            Err(e) => problem(&entry.key, format!("the status does not decode: {e}")),
        }
    }
    let keys: BTreeSet<&ObjectKey> = configs.keys().chain(statuses.keys()).collect();
    let mut rows = Vec::new();
    for key in keys {
        let config_index = configs.get(key).copied();
        let mut row = match statuses.get(key) {
            Some(status) => Row::judged(status.clone()),
            None => Row {
                shown: Shown::Pending {
                    key: key.clone(),
                    source: layout.config_key(key),
                },
                note: None,
            },
        };
        let judged = statuses.get(key).and_then(|s| s.config_modify_index);
        row.note = match (config_index, statuses.contains_key(key)) {
            (None, _) => Some(
                "the config key is gone; the controller removes this status".to_string(),
            ),
            (Some(_), false) => None,
            (Some(now), true) => judged.filter(|j| *j != now).map(|j| {
                format!("the controller has not judged the latest change yet (judged ModifyIndex {j}, now {now})")
            }),
        };
        rows.push(row);
    }
    Ok((rows, problems))
}

/// A readable table: one line per object, then one line per problem under it.
pub fn table(rows: &[&Row], source_errors: &SourceErrors) -> String {
    let mut lines = vec![[
        "KIND".to_string(),
        "NAME".to_string(),
        "STATE".to_string(),
        "PROXIES".to_string(),
        "SOURCE".to_string(),
    ]];
    let mut details = Vec::new();
    for row in rows {
        let proxies = row.proxies();
        lines.push([
            row.kind().to_string(),
            row.name().to_string(),
            row.state(),
            format!("{}/{}", proxies.acked, proxies.total),
            row.source().to_string(),
        ]);
        let mut under = Vec::new();
        if let Shown::Judged(s) = &row.shown {
            for (label, problems) in [("error", &s.errors), ("warning", &s.warnings)] {
                for p in problems {
                    under.push(format!("  {label}: {p}"));
                }
            }
            for c in &s.certificates {
                under.push(format!(
                    "  certificate: {} ({}), {}, expires {}",
                    c.secret,
                    c.names.join(", "),
                    c.revision,
                    c.not_after
                ));
            }
            if s.serving_last_good {
                under.push("  serving the last accepted version".to_string());
            }
        }
        if let Some(note) = &row.note {
            under.push(format!("  {note}"));
        }
        details.push(under);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| lines.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i > 0 {
            for d in &details[i - 1] {
                out.push_str(d);
                out.push('\n');
            }
        }
    }
    for (source, problems) in source_errors {
        for p in problems {
            // With its field path (`documents[1].name`), as /status has it.
            out.push_str(&format!("source {source}: {p}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_model::State;

    #[test]
    fn the_table_shows_state_proxies_and_the_field_at_fault() {
        let row = Row::judged(ObjectStatus {
            kind: "VirtualService".into(),
            name: "web".into(),
            state: State::Rejected,
            errors: vec![Problem::new("spec.routes[0].match.regex", "invalid regex")],
            warnings: vec![],
            source: "web.yaml".into(),
            version: "abc".into(),
            serving_last_good: true,
            serving_version: Some("def".into()),
            config_modify_index: None,
            proxies: ProxyCount { total: 2, acked: 1 },
            certificates: vec![vmesh_model::CertificateInfo {
                secret: "vmesh/tls/shop".into(),
                revision: "version 3".into(),
                names: vec!["shop.example.com".into()],
                not_after: "2027-01-01T00:00:00Z".into(),
            }],
        });
        let t = table(&[&row], &SourceErrors::new());
        assert!(
            t.contains("  certificate: vmesh/tls/shop (shop.example.com), version 3, expires 2027-01-01T00:00:00Z"),
            "{t}"
        );
        assert!(t.starts_with("KIND"), "{t}");
        assert!(t.contains("VirtualService  web   Rejected  1/2"), "{t}");
        assert!(
            t.contains("  error: spec.routes[0].match.regex: invalid regex"),
            "{t}"
        );
        assert!(t.contains("serving the last accepted version"), "{t}");
        assert_eq!(row.to_json()["servingLastGood"], true);
    }

    #[test]
    fn problems_of_sources_keep_their_field_path() {
        let errors = SourceErrors::from([(
            "config/all.yaml".to_string(),
            vec![
                Problem::new("documents[1].name", "missing field `name`"),
                Problem::new("", "the file is empty"),
            ],
        )]);
        let t = table(&[], &errors);
        assert!(
            t.contains("source config/all.yaml: documents[1].name: missing field `name`\n"),
            "{t}"
        );
        assert!(
            t.contains("source config/all.yaml: the file is empty\n"),
            "{t}"
        );
    }
}
