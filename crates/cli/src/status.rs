//! `vmeshctl status`: the controller's judgement of every config object, from its admin
//! endpoint or from what the leader wrote to Consul KV.

use std::process::ExitCode;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use vmesh_model::{Kind, ObjectKey};

use crate::consul::{exit, object_key, parse_kind, ConsulArgs, Kv, Layout};

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

pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (objects, source_errors) = if args.uses_consul() {
        let kv = args.consul_args.connect()?;
        from_consul(&kv, &args.consul_args.layout())?
    } else {
        from_admin(&args.admin_addr)?
    };
    let selected: Vec<&Value> = objects
        .iter()
        .filter(|o| args.kind.is_none_or(|k| o["kind"] == k.as_str()))
        .filter(|o| args.name.as_deref().is_none_or(|n| o["name"] == n))
        .collect();
    if args.name.is_some() && selected.is_empty() {
        eprintln!(
            "no {} named {}",
            args.kind.map_or("object", Kind::as_str),
            args.name.as_deref().unwrap_or_default()
        );
        return Ok(ExitCode::from(exit::NOT_FOUND));
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&selected)?),
        Output::Table => print!("{}", table(&selected, &source_errors)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The objects and the problems of no object, as the controller's admin endpoint has them.
fn from_admin(admin_addr: &str) -> anyhow::Result<(Vec<Value>, Value)> {
    let url = format!("http://{admin_addr}/status");
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot reach the controller at {url}"))?
        .body_mut()
        .read_to_string()
        .context("reading the controller's answer")?;
    let mut status: Value =
        serde_json::from_str(&body).context("the controller's answer is not JSON")?;
    let objects = match status["objects"].take() {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    Ok((objects, status["sourceErrors"].take()))
}

/// The objects as the leader wrote them to `<prefix>/status/`, plus every object that has a
/// config key but no status yet (`Pending`), in kind and name order. Config keys that name
/// no object are problems of their key, as the controller reports them.
pub fn from_consul(kv: &dyn Kv, layout: &Layout) -> anyhow::Result<(Vec<Value>, Value)> {
    let config_prefix = layout.config_prefix();
    let status_prefix = layout.status_prefix();
    let mut problems: Map<String, Value> = Map::new();
    let mut problem = |key: &str, message: String| {
        if let Value::Array(list) = problems
            .entry(key.to_string())
            .or_insert_with(|| Value::Array(vec![]))
        {
            list.push(json!({"path": "", "message": message}));
        }
    };
    let mut configs: BTreeMap<ObjectKey, u64> = BTreeMap::new();
    for entry in kv.list(&config_prefix)? {
        if entry.key.ends_with('/') {
            continue;
        }
        match object_key(&config_prefix, &entry.key) {
            Some(key) => {
                configs.insert(key, entry.modify_index);
            }
            None => problem(
                &entry.key,
                format!("config keys are {config_prefix}<Kind>/<name>, with Kind one of Upstream, VirtualService, Gateway; this key is ignored"),
            ),
        }
    }
    let mut statuses: BTreeMap<ObjectKey, Value> = BTreeMap::new();
    for entry in kv.list(&status_prefix)? {
        let Some(key) = object_key(&status_prefix, &entry.key) else {
            continue;
        };
        match serde_json::from_slice::<Value>(&entry.value) {
            Ok(v) if v.is_object() => {
                statuses.insert(key, v);
            }
            _ => problem(&entry.key, "the status is not a JSON object".to_string()),
        }
    }
    let keys: BTreeSet<&ObjectKey> = configs.keys().chain(statuses.keys()).collect();
    let mut objects = Vec::new();
    for key in keys {
        let config_index = configs.get(key).copied();
        let mut object = match statuses.get(key) {
            Some(status) => status.clone(),
            None => json!({
                "kind": key.kind.as_str(),
                "name": key.name,
                "state": "Pending",
                "errors": [],
                "warnings": [],
                "source": layout.config_key(key),
                "servingLastGood": false,
                "proxies": {"total": 0, "acked": 0},
            }),
        };
        let judged = object["configModifyIndex"].as_u64();
        let note = match (config_index, statuses.contains_key(key)) {
            (None, _) => Some(
                "the config key is gone; the controller removes this status".to_string(),
            ),
            (Some(_), false) => None,
            (Some(now), true) => judged.filter(|j| *j != now).map(|j| {
                format!("the controller has not judged the latest change yet (judged ModifyIndex {j}, now {now})")
            }),
        };
        if let Some(note) = note {
            object["note"] = Value::String(note);
        }
        objects.push(object);
    }
    Ok((objects, Value::Object(problems)))
}

/// A readable table: one line per object, then one line per problem under it.
pub fn table(objects: &[&Value], source_errors: &Value) -> String {
    let mut rows = vec![[
        "KIND".to_string(),
        "NAME".to_string(),
        "STATE".to_string(),
        "PROXIES".to_string(),
        "SOURCE".to_string(),
    ]];
    let mut details = Vec::new();
    for o in objects {
        let s = |k: &str| o[k].as_str().unwrap_or_default().to_string();
        rows.push([
            s("kind"),
            s("name"),
            s("state"),
            format!("{}/{}", o["proxies"]["acked"], o["proxies"]["total"]),
            s("source"),
        ]);
        let mut lines = Vec::new();
        for (label, field) in [("error", "errors"), ("warning", "warnings")] {
            for p in o[field].as_array().into_iter().flatten() {
                let path = p["path"].as_str().unwrap_or_default();
                let msg = p["message"].as_str().unwrap_or_default();
                lines.push(if path.is_empty() {
                    format!("  {label}: {msg}")
                } else {
                    format!("  {label}: {path}: {msg}")
                });
            }
        }
        if o["servingLastGood"] == true {
            lines.push("  serving the last accepted version".to_string());
        }
        if let Some(note) = o["note"].as_str() {
            lines.push(format!("  {note}"));
        }
        details.push(lines);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i > 0 {
            for d in &details[i - 1] {
                out.push_str(d);
                out.push('\n');
            }
        }
    }
    if let Some(map) = source_errors.as_object() {
        for (source, problems) in map {
            for p in problems.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "source {source}: {}\n",
                    p["message"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_shows_state_proxies_and_the_field_at_fault() {
        let o = json!({
            "kind": "VirtualService", "name": "web", "state": "Rejected", "source": "web.yaml",
            "errors": [{"path": "spec.routes[0].match.regex", "message": "invalid regex"}],
            "warnings": [], "servingLastGood": true, "proxies": {"total": 2, "acked": 1}
        });
        let t = table(&[&o], &json!({}));
        assert!(t.starts_with("KIND"), "{t}");
        assert!(t.contains("VirtualService  web   Rejected  1/2"), "{t}");
        assert!(
            t.contains("  error: spec.routes[0].match.regex: invalid regex"),
            "{t}"
        );
        assert!(t.contains("serving the last accepted version"), "{t}");
    }
}
