//! Reading a text of documents into JSON values, within the limits of [`crate::limits`].
//!
//! The text is checked before it is parsed (its size, and how deep its flow collections nest,
//! since deep flow nesting costs the YAML parser quadratic time), then read by a visitor that
//! counts what it builds, so a YAML alias used a hundred thousand times is refused when the
//! expansion passes the limit, not after it has filled the memory. The visitor also refuses
//! duplicate keys (YAML and JSON readers keep the last one silently), and turns an integer too
//! large for any field into a number the field's own check reports, with its path.
//!
//! Every problem has the path of the value at fault when there is one (`spec.routes[2]`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::limits::{too_large, MAX_DOCUMENT_BYTES, MAX_EXPANDED_BYTES, MAX_NESTING, MAX_NODES};
use crate::problem::{field, index, Problem};

/// The documents of a text, each as a JSON value, within the limits. JSON (a text starting with
/// `{`, after a byte-order mark and white space) is one document, read with the JSON parser for
/// exact error positions; anything else is YAML, documents separated by `---`. Empty documents
/// are skipped.
pub fn read_documents(text: &str) -> Result<Vec<Value>, Problem> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Problem::new("", too_large(text.len())));
    }
    let trimmed = text.trim_start_matches(['\u{feff}', ' ', '\t', '\r', '\n']);
    let budget = Budget::default();
    if trimmed.starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(trimmed);
        let value = Node::root(&budget)
            .deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| budget.problem(format!("invalid JSON: {e}")))?;
        return Ok(vec![value].into_iter().filter(|v| !v.is_null()).collect());
    }
    check_flow_nesting(text)?;
    let mut values = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Node::root(&budget)
            .deserialize(document)
            .map_err(|e| budget.problem(format!("invalid YAML: {e}")))?;
        if !value.is_null() {
            values.push(value);
        }
    }
    Ok(values)
}

/// Refuses YAML whose flow collections (`[...]`, `{...}`) nest deeper than [`MAX_NESTING`],
/// before the parser sees it. Quoted scalars and comments are skipped; brackets inside plain
/// scalars (a regex, say) balance out and count little.
fn check_flow_nesting(text: &str) -> Result<(), Problem> {
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    let mut chars = text.chars().peekable();
    let mut previous = '\n';
    while let Some(c) = chars.next() {
        column += 1;
        match c {
            '\n' => {
                line += 1;
                column = 0;
            }
            '#' if previous.is_whitespace() => {
                // A comment: to the end of the line.
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            '"' | '\'' if !previous.is_alphanumeric() => {
                // A quoted scalar: to its closing quote ('' and \" are escapes).
                let quote = c;
                while let Some(q) = chars.next() {
                    column += 1;
                    if q == '\n' {
                        line += 1;
                        column = 0;
                    } else if quote == '"' && q == '\\' {
                        chars.next();
                        column += 1;
                    } else if q == quote {
                        if quote == '\'' && chars.peek() == Some(&'\'') {
                            chars.next();
                            column += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Problem::new(
                        "",
                        format!(
                            "collections nest more than {MAX_NESTING} levels deep (at line {line} column {column})"
                        ),
                    ));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
    }
    Ok(())
}

/// What reading may still spend, and the first problem found with its path.
#[derive(Default)]
struct Budget {
    bytes: Cell<usize>,
    nodes: Cell<usize>,
    /// Where the visitor is, as a field path.
    path: RefCell<Vec<Segment>>,
    failure: RefCell<Option<Problem>>,
}

enum Segment {
    Key(String),
    Index(usize),
}

impl Budget {
    fn path(&self) -> String {
        let mut out = String::new();
        for s in self.path.borrow().iter() {
            out = match s {
                Segment::Key(k) => field(&out, k),
                Segment::Index(i) => index(&out, *i),
            };
        }
        out
    }

    /// Records a problem at the current path; the reader then fails with `E::custom`.
    fn fail<E: de::Error>(&self, message: String) -> E {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some(Problem::new(self.path(), message.clone()));
        }
        E::custom(message)
    }

    /// The problem to report: the one recorded with its path, or the reader's own error.
    fn problem(&self, otherwise: String) -> Problem {
        self.failure
            .borrow_mut()
            .take()
            .unwrap_or_else(|| Problem::new("", otherwise))
    }

    fn spend<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let nodes = self.nodes.get() + 1;
        let spent = self.bytes.get() + bytes;
        self.nodes.set(nodes);
        self.bytes.set(spent);
        if nodes > MAX_NODES {
            return Err(self.fail(format!(
                "the document expands to more than {MAX_NODES} values (aliases included)"
            )));
        }
        if spent > MAX_EXPANDED_BYTES {
            return Err(self.fail(format!(
                "the document expands to more than {} KiB of keys and strings (aliases included)",
                MAX_EXPANDED_BYTES / 1024
            )));
        }
        Ok(())
    }
}

/// One value at `depth`.
struct Node<'b> {
    budget: &'b Budget,
    depth: usize,
}

impl<'b> Node<'b> {
    fn root(budget: &'b Budget) -> Self {
        Node { budget, depth: 0 }
    }

    fn child(&self) -> Self {
        Node {
            budget: self.budget,
            depth: self.depth + 1,
        }
    }

    fn nest<E: de::Error>(&self) -> Result<(), E> {
        self.budget.spend(0)?;
        if self.depth >= MAX_NESTING {
            return Err(self.budget.fail(format!(
                "collections nest more than {MAX_NESTING} levels deep"
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(v.into()))
    }

    // Integers beyond 64 bits fit no field: as a float, the field's own check refuses them with
    // its path ("expected u16"), instead of the whole text failing.
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.spend(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.spend(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.nest()?;
        let mut items = Vec::new();
        loop {
            self.budget
                .path
                .borrow_mut()
                .push(Segment::Index(items.len()));
            let item = seq.next_element_seed(self.child());
            self.budget.path.borrow_mut().pop();
            match item? {
                Some(v) => items.push(v),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.nest()?;
        let mut out = Map::new();
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key_seed(Key(self.budget))? {
            if !seen.insert(key.clone()) {
                self.budget
                    .path
                    .borrow_mut()
                    .push(Segment::Key(key.clone()));
                let e = self.budget.fail(format!(
                    "duplicate key {key:?}: a key appears once in a mapping"
                ));
                return Err(e);
            }
            self.budget
                .path
                .borrow_mut()
                .push(Segment::Key(key.clone()));
            let value = map.next_value_seed(self.child());
            self.budget.path.borrow_mut().pop();
            out.insert(key, value?);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping key: a string, or a number or boolean written as one (as YAML allows).
struct Key<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.0.spend(v.len())?;
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        self.0.spend(v.len())?;
        Ok(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn problem(text: &str) -> Problem {
        read_documents(text).expect_err("refused")
    }

    #[test]
    fn ordinary_documents_read_as_before() {
        let values = read_documents("a: 1\nb: [x, {c: true}]\n---\n---\nd: 1.5\n").unwrap();
        assert_eq!(values.len(), 2, "the empty document is skipped");
        assert_eq!(values[0]["b"][1]["c"], true);
        let json = read_documents("\u{feff} {\"a\": [1, 2]}").unwrap();
        assert_eq!(json[0]["a"][1], 2);
        assert!(read_documents("").unwrap().is_empty());
        // Keys YAML writes as numbers or booleans are strings, as in JSON.
        assert_eq!(read_documents("1: x\ntrue: y\n").unwrap()[0]["true"], "y");
    }

    #[test]
    fn a_text_over_the_size_limit_is_refused_before_it_is_parsed() {
        let p = problem(&format!("a: \"{}\"\n", "x".repeat(MAX_DOCUMENT_BYTES)));
        assert_eq!(p.message, "the document is 513 KiB; the limit is 512 KiB");
    }

    #[test]
    fn one_large_anchor_used_many_times_is_refused_quickly() {
        // ~490 KiB of text; the alias expansion would be about 20 GB.
        let big = "x".repeat(200_000);
        let aliases = "*x, ".repeat(70_000);
        let text = format!("kind: Upstream\nname: a\nspec:\n  hosts: [&x \"{big}\", {aliases}]\n");
        assert!(text.len() < MAX_DOCUMENT_BYTES);
        let started = Instant::now();
        let p = problem(&text);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(p.message.contains("aliases included"), "{p}");
        assert_eq!(
            p.path, "spec.hosts[10]",
            "the path of the value that went over"
        );
    }

    #[test]
    fn many_small_aliases_are_counted_too() {
        let text = format!(
            "a: &x [1, 2, 3, 4, 5, 6, 7, 8]\nb: [{}]\n",
            "*x, ".repeat(30_000)
        );
        assert!(problem(&text).message.contains("values (aliases included)"));
    }

    #[test]
    fn deep_nesting_is_refused_before_the_parser_sees_it() {
        for text in [
            format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("a: {}1{}", "{b: ".repeat(50_000), "}".repeat(50_000)),
        ] {
            let started = Instant::now();
            let p = problem(&text);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
            assert!(p.message.contains("nest more than 64 levels"), "{p}");
        }
        // Block nesting is counted by the reader.
        let mut block = String::new();
        for i in 0..70 {
            block.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
        }
        block.push_str(&format!("{}x: 1\n", "  ".repeat(70)));
        assert!(problem(&block).message.contains("nest more than 64"));
        // Brackets in quotes, comments and plain scalars do not count.
        let regexes = format!(
            "a: \"{}\"\nb: '{}'\n# {}\nc: /x[a-z]{{2}}/\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100)
        );
        read_documents(&regexes).unwrap();
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        let p = problem("kind: Upstream\nspec:\n  hosts:\n    - address: a\n      address: b\n");
        assert_eq!(p.path, "spec.hosts[0].address");
        assert!(p.message.starts_with("duplicate key \"address\""), "{p}");
        let p = problem("{\"a\": 1, \"a\": 2}");
        assert_eq!(p.path, "a");
    }

    #[test]
    fn an_integer_beyond_64_bits_reads_as_a_number_its_field_refuses() {
        let v = read_documents("port: 99999999999999999999\n").unwrap();
        assert!(v[0]["port"].is_f64());
    }
}
