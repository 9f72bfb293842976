//! The document envelope (`kind`, `name`, `spec`) and parsing.
//!
//! Parsing goes text → `serde_json::Value` → key (kind, name) → spec. The key is
//! read first so that a bad spec is still reported on the right object. Spec
//! errors carry a field path (`spec.routes[2].match.regex: ...`): structural
//! errors (unknown field, wrong type) come from serde, one per document; semantic
//! errors come from validation, all of them at once.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::gateway::GatewaySpec;
use crate::problem::{field, index, Problem};
use crate::upstream::UpstreamSpec;
use crate::validate::{is_valid_name, name_message};
use crate::virtual_service::VirtualServiceSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Upstream,
    VirtualService,
    Gateway,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Upstream, Kind::VirtualService, Kind::Gateway];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Upstream => "Upstream",
            Kind::VirtualService => "VirtualService",
            Kind::Gateway => "Gateway",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a config object: `Kind/name`, e.g. `VirtualService/shop`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }

    pub fn upstream(name: impl Into<String>) -> Self {
        Self::new(Kind::Upstream, name)
    }

    pub fn virtual_service(name: impl Into<String>) -> Self {
        Self::new(Kind::VirtualService, name)
    }

    pub fn gateway(name: impl Into<String>) -> Self {
        Self::new(Kind::Gateway, name)
    }

    /// The key written as `Kind/name` (its [`Display`](fmt::Display) form), if the kind is known
    /// and the name valid.
    pub fn parse(text: &str) -> Option<Self> {
        let (kind, name) = text.split_once('/')?;
        let kind = Kind::parse(kind)?;
        is_valid_name(name).then(|| ObjectKey::new(kind, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// A valid spec of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Upstream(UpstreamSpec),
    VirtualService(VirtualServiceSpec),
    Gateway(GatewaySpec),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Upstream(_) => Kind::Upstream,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::Gateway(_) => Kind::Gateway,
        }
    }

    /// Deserializes the spec of `kind` strictly, then validates it. Paths start with `spec`.
    pub fn from_spec(kind: Kind, spec: Value) -> Result<Object, Vec<Problem>> {
        let object = match kind {
            Kind::Upstream => deserialize_spec(spec).map(Object::Upstream),
            Kind::VirtualService => deserialize_spec(spec).map(Object::VirtualService),
            Kind::Gateway => deserialize_spec(spec).map(Object::Gateway),
        }
        .map_err(|p| vec![p])?;
        let problems = object.validate();
        if problems.is_empty() {
            Ok(object)
        } else {
            Err(problems)
        }
    }

    /// Every semantic problem of the spec, with paths starting with `spec`.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        match self {
            Object::Upstream(s) => s.validate("spec", &mut problems),
            Object::VirtualService(s) => s.validate("spec", &mut problems),
            Object::Gateway(s) => s.validate("spec", &mut problems),
        }
        problems
    }

    /// The spec as JSON (defaults filled in).
    pub fn spec_json(&self) -> Value {
        let result = match self {
            Object::Upstream(s) => serde_json::to_value(s),
            Object::VirtualService(s) => serde_json::to_value(s),
            Object::Gateway(s) => serde_json::to_value(s),
        };
        // Serializing plain structs of strings, numbers and lists cannot fail.
        result.unwrap_or(Value::Null)
    }
}

fn deserialize_spec<T: serde::de::DeserializeOwned>(spec: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let mut path = String::from("spec");
        for segment in e.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index: i } => path = index(&path, *i),
                serde_path_to_error::Segment::Map { key } => path = field(&path, key),
                serde_path_to_error::Segment::Enum { variant } => path = field(&path, variant),
                serde_path_to_error::Segment::Unknown => path = field(&path, "?"),
            }
        }
        Problem::new(path, e.into_inner().to_string())
    })
}

/// A document whose key could be read. `result` is the valid object or every problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub key: ObjectKey,
    /// Content hash of the document as written (canonical JSON), stable across processes.
    pub version: String,
    pub result: Result<Object, Vec<Problem>>,
}

/// One parsed document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Document(Document),
    /// The document's key could not be read (not a mapping, bad `kind` or `name`):
    /// there is no object to report on.
    Invalid(Vec<Problem>),
}

/// Parses a text holding one or more documents separated by `---` (a config
/// directory file). Empty documents are skipped. `Err` is a syntax error that
/// makes the whole text unusable; its message has the line and column.
pub fn parse_multi(text: &str) -> Result<Vec<Parsed>, Problem> {
    let values = read_values(text)?;
    if values.is_empty() {
        return Err(Problem::new("", crate::limits::EMPTY_TEXT));
    }
    Ok(values.into_iter().map(parse_value).collect())
}

/// Parses a text holding exactly one document (a Consul KV value).
pub fn parse_single(text: &str) -> Result<Parsed, Problem> {
    let mut values = read_values(text)?;
    match values.len() {
        1 => Ok(parse_value(values.remove(0))),
        0 => Err(Problem::new("", crate::limits::EMPTY_TEXT)),
        n => Err(Problem::new(
            "",
            format!("expected exactly one document, found {n}"),
        )),
    }
}

/// Reads the documents of a text as JSON values, within the limits.
fn read_values(text: &str) -> Result<Vec<Value>, Problem> {
    crate::read::read_documents(text)
}

/// The documents of a text, each read as `T` (e.g. `serde_yaml_ng::Value`, to keep the written
/// key order), without the limits' checks: call it only on a text [`read_documents`] accepted.
///
/// [`read_documents`]: crate::read_documents
pub fn read_documents_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<T>, Problem> {
    let trimmed = text.trim_start_matches(['\u{feff}', ' ', '\t', '\r', '\n']);
    if trimmed.starts_with('{') {
        let value: Option<T> = serde_json::from_str(trimmed)
            .map_err(|e| Problem::new("", format!("invalid JSON: {e}")))?;
        return Ok(value.into_iter().collect());
    }
    let mut values = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Option::<T>::deserialize(document)
            .map_err(|e| Problem::new("", format!("invalid YAML: {e}")))?;
        values.extend(value);
    }
    Ok(values)
}

/// Parses one document already read as JSON.
pub fn parse_value(value: Value) -> Parsed {
    let version = crate::content_hash(canonical_json(&value).as_bytes());
    let Value::Object(mut map) = value else {
        return Parsed::Invalid(vec![Problem::new(
            "",
            "a document must be a mapping with kind, name and spec",
        )]);
    };
    let mut problems = Vec::new();
    let kind = match map.remove("kind") {
        Some(Value::String(s)) => match Kind::parse(&s) {
            Some(kind) => Some(kind),
            None => {
                problems.push(Problem::new(
                    "kind",
                    format!(
                        "unknown kind {s:?}; expected one of Upstream, VirtualService, Gateway"
                    ),
                ));
                None
            }
        },
        Some(_) => {
            problems.push(Problem::new("kind", "must be a string"));
            None
        }
        None => {
            problems.push(Problem::new("kind", "required field is missing"));
            None
        }
    };
    let name = match map.remove("name") {
        Some(Value::String(s)) if is_valid_name(&s) => Some(s),
        Some(Value::String(s)) => {
            problems.push(Problem::new("name", name_message(&s)));
            None
        }
        Some(_) => {
            problems.push(Problem::new("name", "must be a string"));
            None
        }
        None => {
            problems.push(Problem::new("name", "required field is missing"));
            None
        }
    };
    let (Some(kind), Some(name)) = (kind, name) else {
        return Parsed::Invalid(problems);
    };
    let key = ObjectKey { kind, name };
    let spec = map.remove("spec");
    // Whatever is left is not part of the envelope.
    for unknown in map.keys() {
        problems.push(Problem::new(
            unknown.as_str(),
            "unknown field; a document has only kind, name and spec",
        ));
    }
    let result = match spec {
        None => {
            problems.push(Problem::new("spec", "required field is missing"));
            Err(problems)
        }
        Some(spec) => match Object::from_spec(kind, spec) {
            Ok(object) if problems.is_empty() => Ok(object),
            Ok(_) => Err(problems),
            Err(mut spec_problems) => {
                problems.append(&mut spec_problems);
                Err(problems)
            }
        },
    };
    Parsed::Document(Document {
        key,
        version,
        result,
    })
}

/// JSON with object keys sorted and no whitespace, whatever map type serde_json uses.
pub(crate) fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
