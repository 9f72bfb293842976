//! `vmeshctl get` and `vmeshctl delete`: config objects in Consul KV.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use vmesh_model::{Kind, ObjectKey};

use crate::consul::{parse_kind, ConsulArgs, Failure, Kv, Layout};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Upstream, VirtualService or Gateway: any case, plural, or us, vs, gw.
    #[arg(value_parser = parse_kind)]
    pub kind: Kind,
    /// The object to print; without it, the names of every object of the kind.
    pub name: Option<String>,
    /// yaml: the document as stored (converted when it was stored as JSON); json: as JSON.
    /// A list is one name per line, or a JSON array of names.
    #[arg(short, long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Upstream, VirtualService or Gateway: any case, plural, or us, vs, gw.
    #[arg(value_parser = parse_kind)]
    pub kind: Kind,
    /// The object to delete.
    pub name: String,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

pub fn run_get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let kv = args.consul.connect()?;
    let mut out = std::io::stdout().lock();
    get(
        &kv,
        &args.consul.layout(),
        args.kind,
        args.name.as_deref(),
        args.output,
        &mut out,
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_delete(args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let kv = args.consul.connect()?;
    let key = ObjectKey::new(args.kind, args.name.clone());
    delete(&kv, &args.consul.layout(), &key)?;
    println!("{key} deleted");
    Ok(ExitCode::SUCCESS)
}

fn not_found(key: &ObjectKey) -> anyhow::Error {
    Failure::NotFound(format!("no {} named {}", key.kind, key.name)).into()
}

pub fn get(
    kv: &dyn Kv,
    layout: &Layout,
    kind: Kind,
    name: Option<&str>,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let Some(name) = name else {
        let folder = layout.config_kind_prefix(kind);
        let names: Vec<String> = kv
            .list(&folder)?
            .into_iter()
            .filter_map(|s| layout.parse_config_key(&s.key))
            .filter(|k| k.kind == kind)
            .map(|k| k.name)
            .collect();
        match format {
            Format::Yaml => {
                for n in names {
                    writeln!(out, "{n}")?;
                }
            }
            Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&names)?)?,
        }
        return Ok(());
    };
    let key = ObjectKey::new(kind, name);
    let kv_key = layout.config_key(&key);
    let stored = kv.get(&kv_key)?.ok_or_else(|| not_found(&key))?;
    let text = String::from_utf8(stored.value)
        .map_err(|_| anyhow::anyhow!("{kv_key}: the value is not UTF-8 text"))?;
    let trimmed = text.trim_start_matches(['\u{feff}', ' ', '\t', '\r', '\n']);
    let is_json = trimmed.starts_with('{');
    match format {
        // As written, comments and all, unless it was written as JSON.
        Format::Yaml if !is_json => {
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
        }
        Format::Yaml => {
            let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(trimmed)
                .with_context(|| format!("{kv_key}: the stored value is not valid JSON"))?;
            out.write_all(serde_yaml_ng::to_string(&value)?.as_bytes())?;
        }
        Format::Json => {
            let value: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(&text).with_context(|| {
                    format!("{kv_key}: the stored value is not one YAML or JSON document")
                })?;
            let json = serde_json::to_string_pretty(&value)
                .with_context(|| format!("{kv_key}: the stored value cannot be shown as JSON"))?;
            writeln!(out, "{json}")?;
        }
    }
    Ok(())
}

/// Deletes the object's key if it is still the version just read.
pub fn delete(kv: &dyn Kv, layout: &Layout, key: &ObjectKey) -> anyhow::Result<()> {
    let kv_key = layout.config_key(key);
    let stored = kv.get(&kv_key)?.ok_or_else(|| not_found(key))?;
    if kv.delete_cas(&kv_key, stored.modify_index)? {
        Ok(())
    } else {
        Err(Failure::Conflict(format!(
            "conflict: {kv_key} changed after it was read (someone else wrote or deleted it); {key} was not deleted"
        ))
        .into())
    }
}
