//! `vmeshctl status`: the controller's judgement of every config object.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only objects of this kind (Upstream, VirtualService, Gateway).
    pub kind: Option<String>,
    /// Only the object of this name.
    pub name: Option<String>,
    /// The controller's admin address.
    #[arg(long, env = "VMESH_ADMIN_ADDR", default_value = "127.0.0.1:19000")]
    pub admin_addr: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let url = format!("http://{}/status", args.admin_addr);
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot reach the controller at {url}"))?
        .body_mut()
        .read_to_string()
        .context("reading the controller's answer")?;
    let status: Value =
        serde_json::from_str(&body).context("the controller's answer is not JSON")?;
    let objects: Vec<&Value> = status["objects"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let selected: Vec<&Value> = objects
        .into_iter()
        .filter(|o| {
            args.kind.as_deref().is_none_or(|k| {
                o["kind"]
                    .as_str()
                    .is_some_and(|ok| ok.eq_ignore_ascii_case(k))
            })
        })
        .filter(|o| args.name.as_deref().is_none_or(|n| o["name"] == n))
        .collect();
    if args.name.is_some() && selected.is_empty() {
        eprintln!(
            "no {} named {}",
            args.kind.as_deref().unwrap_or("object"),
            args.name.as_deref().unwrap_or_default()
        );
        return Ok(ExitCode::from(3));
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&selected)?),
        Output::Table => print!("{}", table(&selected, &status["sourceErrors"])),
    }
    Ok(ExitCode::SUCCESS)
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
