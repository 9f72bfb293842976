//! Helpers shared by the model tests: build documents as JSON, tweak one field,
//! and look at the problems found.
#![allow(dead_code)]

use serde_json::{json, Value};
use vmesh_model::{parse_value, Document, Object, Parsed};

pub fn upstream() -> Value {
    json!({
        "kind": "Upstream",
        "name": "web",
        "spec": {"static": {"hosts": [{"address": "127.0.0.1", "port": 8080}]}}
    })
}

pub fn virtual_service() -> Value {
    json!({
        "kind": "VirtualService",
        "name": "shop",
        "spec": {
            "domains": ["shop.example.com"],
            "routes": [{"upstream": "web"}]
        }
    })
}

pub fn gateway() -> Value {
    json!({"kind": "Gateway", "name": "edge", "spec": {"bindPort": 10000}})
}

/// Sets the value at a JSON pointer, creating the last key if needed.
pub fn set(mut doc: Value, pointer: &str, value: Value) -> Value {
    let (parent, last) = pointer.rsplit_once('/').expect("pointer has a parent");
    let target = doc
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent}"));
    match target {
        Value::Object(map) => {
            map.insert(last.to_string(), value);
        }
        Value::Array(items) => {
            let i: usize = last.parse().expect("array index");
            if i == items.len() {
                items.push(value);
            } else {
                items[i] = value;
            }
        }
        _ => panic!("{parent} is not a container"),
    }
    doc
}

pub fn remove(mut doc: Value, pointer: &str) -> Value {
    let (parent, last) = pointer.rsplit_once('/').expect("pointer has a parent");
    if let Some(Value::Object(map)) = doc.pointer_mut(parent) {
        map.remove(last);
    }
    doc
}

/// Every problem of a document, displayed as `path: message`.
pub fn problems(doc: Value) -> Vec<String> {
    match parse_value(doc) {
        Parsed::Document(Document { result: Ok(_), .. }) => vec![],
        Parsed::Document(Document {
            result: Err(ps), ..
        })
        | Parsed::Invalid(ps) => ps.iter().map(ToString::to_string).collect(),
    }
}

/// The valid object, or a panic listing the problems.
pub fn object(doc: Value) -> Object {
    match parse_value(doc) {
        Parsed::Document(Document { result: Ok(o), .. }) => o,
        other => panic!("expected a valid object, got {other:?}"),
    }
}

/// Asserts that exactly one problem is found, at `path`, with a message containing `message`.
#[track_caller]
pub fn assert_problem(doc: Value, path: &str, message: &str) {
    let found = problems(doc);
    let prefix = format!("{path}: ");
    assert!(
        found.len() == 1 && found[0].starts_with(&prefix) && found[0].contains(message),
        "expected one problem `{path}: ...{message}...`, found {found:#?}"
    );
}

#[track_caller]
pub fn assert_valid(doc: Value) {
    let found = problems(doc);
    assert!(found.is_empty(), "expected no problem, found {found:#?}");
}
