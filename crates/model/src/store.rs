//! [`ConfigSet`]: the config objects of every source (a file of the config
//! directory, or a Consul KV key), with last-good semantics.
//!
//! Rules, also written in docs/configuration.md:
//!
//! - **Last good.** Each object keeps the last version that was accepted. When its
//!   document becomes invalid, or its source stops parsing at all (a YAML syntax
//!   error), the object is reported `Rejected` with the errors while the last
//!   accepted spec keeps being served (`serving_last_good`). An object that was
//!   never valid is not served.
//! - **Deletion.** When a source no longer defines an object (the document was
//!   removed, or the source was deleted), the object and its last good version
//!   are gone.
//! - **Duplicates.** When several sources define the same `Kind/name`, the source
//!   whose name sorts first (byte order) owns it, whether or not its version is
//!   valid: validity never moves ownership, so a typo cannot make another file's
//!   version take over. The other definitions are ignored and reported under
//!   their own source in [`Config::source_errors`]. Within one source the first
//!   document wins the same way.
//! - Problems that belong to no object (syntax errors, documents without a
//!   readable kind or name, ignored duplicates) are listed per source in
//!   [`Config::source_errors`], so nothing is reported under an invented key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::document::{parse_multi, parse_single, Document, Object, ObjectKey, Parsed};
use crate::gateway::GatewaySpec;
use crate::problem::{index, Problem};
use crate::secret::{CertificateInfo, Secrets};
use crate::upstream::UpstreamSpec;
use crate::virtual_service::VirtualServiceSpec;

/// How a source's text is split into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceMode {
    /// Several documents separated by `---` (a config directory file).
    MultiDoc,
    /// Exactly one document (a Consul KV value).
    SingleDoc,
}

/// The status of one config object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum State {
    /// Valid and used as written.
    Accepted,
    /// Used, but part of it has no effect (see the warnings).
    Warning,
    /// Invalid; the last accepted version, if any, is served instead.
    Rejected,
}

impl State {
    /// The name, as in the status JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "Accepted",
            State::Warning => "Warning",
            State::Rejected => "Rejected",
        }
    }
}

/// What the controller reports about one config object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReport {
    pub state: State,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
    /// The source (file path or KV key) that defines the object.
    pub source: String,
    /// Content hash of the document as last written (canonical JSON).
    pub version: String,
    /// True when the object is rejected but its last accepted version is still served.
    pub serving_last_good: bool,
    /// Version of the spec that is served, if any.
    pub serving_version: Option<String>,
    /// The certificates it serves (a gateway with TLS), set by the translator.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateInfo>,
}

impl ObjectReport {
    /// Adds a translation warning: an `Accepted` object becomes `Warning`.
    pub fn add_warning(&mut self, problem: Problem) {
        self.warnings.push(problem);
        if self.state == State::Accepted {
            self.state = State::Warning;
        }
    }

    /// Adds an error: the object becomes `Rejected`.
    pub fn add_error(&mut self, problem: Problem) {
        self.errors.push(problem);
        self.state = State::Rejected;
    }
}

/// The effective config: what to translate, and what to report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    pub virtual_services: BTreeMap<String, VirtualServiceSpec>,
    pub gateways: BTreeMap<String, GatewaySpec>,
    /// One report per object defined by any source (served or not).
    pub reports: BTreeMap<ObjectKey, ObjectReport>,
    /// When each served object was claimed, for first-come rules (a contested domain).
    pub claims: BTreeMap<ObjectKey, Claim>,
    /// Problems that belong to no object, per source.
    pub source_errors: BTreeMap<String, Vec<Problem>>,
    /// Discovered instances of Consul services, for upstreams with `consul` discovery.
    /// Not config: [`ConfigSet::snapshot`] leaves it empty and the controller sets it.
    pub catalog: Catalog,
    /// The secrets the config refers to, as read by the controller; not config either.
    pub secrets: Secrets,
}

impl Config {
    /// The names of every secret the served objects refer to.
    pub fn referenced_secrets(&self) -> std::collections::BTreeSet<String> {
        let gateways = self
            .gateways
            .values()
            .filter_map(|g| g.tls.as_ref())
            .flat_map(|tls| tls.secrets());
        let upstreams = self
            .upstreams
            .values()
            .filter_map(|u| u.tls.as_ref())
            .map(|tls| tls.ca.as_str());
        gateways.chain(upstreams).map(str::to_string).collect()
    }

    /// Builds a config from valid objects, all reported `Accepted` under `source`.
    /// Handy for tests and tools; the controller uses [`ConfigSet::snapshot`].
    pub fn from_objects(source: &str, objects: impl IntoIterator<Item = (String, Object)>) -> Self {
        let mut config = Config::default();
        for (name, object) in objects {
            let key = ObjectKey::new(object.kind(), name);
            let version = crate::content_hash(
                crate::document::canonical_json(&object.spec_json()).as_bytes(),
            );
            config.insert(key.clone(), object);
            config.reports.insert(
                key,
                ObjectReport {
                    state: State::Accepted,
                    errors: vec![],
                    warnings: vec![],
                    source: source.to_string(),
                    version: version.clone(),
                    serving_last_good: false,
                    serving_version: Some(version),
                    certificates: vec![],
                },
            );
        }
        config
    }

    fn insert(&mut self, key: ObjectKey, object: Object) {
        match object {
            Object::Upstream(s) => {
                self.upstreams.insert(key.name, s);
            }
            Object::VirtualService(s) => {
                self.virtual_services.insert(key.name, s);
            }
            Object::Gateway(s) => {
                self.gateways.insert(key.name, s);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Good {
    object: Object,
    version: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct DocState {
    /// Where the document is in its source: `documents[i]` for multi-document sources.
    location: String,
    /// Its index among the source's documents.
    position: usize,
    version: String,
    errors: Vec<Problem>,
    last_good: Option<Good>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SourceEntry {
    text_hash: String,
    mode: SourceMode,
    /// Set while the text does not parse; `docs` then still holds what it defined before.
    syntax_error: Option<Problem>,
    docs: BTreeMap<ObjectKey, DocState>,
    /// Documents without a readable key, and duplicates within the source.
    problems: Vec<Problem>,
}

impl SourceEntry {
    fn same_content(&self, other: &SourceEntry) -> bool {
        self.syntax_error == other.syntax_error
            && self.docs == other.docs
            && self.problems == other.problems
    }
}

/// A source's text, parsed: what [`ConfigSet::apply`] records. Parsing is the costly part of a
/// change (bounded by [`crate::limits`]); building this where the text arrives keeps a slow
/// document from delaying anything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSource {
    text_hash: String,
    mode: SourceMode,
    /// The documents, or the syntax error that makes the whole text unusable.
    documents: Result<Vec<Parsed>, Problem>,
}

impl ParsedSource {
    /// A text of any number of documents (a file of the config directory).
    pub fn file(text: &str) -> Self {
        ParsedSource {
            text_hash: crate::content_hash(text.as_bytes()),
            mode: SourceMode::MultiDoc,
            documents: parse_multi(text),
        }
    }

    /// A text of exactly one document.
    pub fn single(text: &str) -> Self {
        ParsedSource {
            text_hash: crate::content_hash(text.as_bytes()),
            mode: SourceMode::SingleDoc,
            documents: parse_single(text).map(|p| vec![p]),
        }
    }

    /// The value of a source that is one object by its name, such as the Consul key
    /// `vmesh/config/<Kind>/<name>`: whatever the value holds, it is reported under `key`. A
    /// value that does not parse, or names another object, is `Rejected` on its own (and the
    /// object keeps its last good version), rather than becoming a problem of no object.
    pub fn keyed(key: &ObjectKey, text: &str) -> Self {
        let text_hash = crate::content_hash(text.as_bytes());
        let rejected = |errors: Vec<Problem>| {
            Parsed::Document(Document {
                key: key.clone(),
                version: text_hash.clone(),
                result: Err(errors),
            })
        };
        let document = match parse_single(text) {
            Err(syntax_error) => rejected(vec![syntax_error]),
            Ok(Parsed::Invalid(problems)) => rejected(problems),
            Ok(Parsed::Document(doc)) if &doc.key != key => {
                let path = if doc.key.kind != key.kind {
                    "kind"
                } else {
                    "name"
                };
                rejected(vec![Problem::new(
                    path,
                    format!("the document is {} but its key says {key}", doc.key),
                )])
            }
            Ok(parsed) => parsed,
        };
        ParsedSource {
            text_hash,
            mode: SourceMode::SingleDoc,
            documents: Ok(vec![document]),
        }
    }
}

/// When an object was claimed: earlier claims sort first. The same on every replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    /// When its source was created: the Consul CreateIndex of its key; 0 for files.
    pub created: u64,
    /// Its source's place in path order.
    pub source: usize,
    /// Its place among the documents of its source.
    pub position: usize,
}

/// Every source's objects, with last-good versions. Pure and deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSet {
    sources: BTreeMap<String, SourceEntry>,
    /// When sources were created (Consul's CreateIndex), for [`Claim`]s.
    created: BTreeMap<String, u64>,
}

impl ConfigSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the current text of `source`. Returns whether what it defines changed
    /// (objects, their validity or its problems); a new comment alone is no change.
    pub fn upsert_source(&mut self, source: &str, text: &str, mode: SourceMode) -> bool {
        let parsed = match mode {
            SourceMode::MultiDoc => ParsedSource::file(text),
            SourceMode::SingleDoc => ParsedSource::single(text),
        };
        self.apply(source, parsed)
    }

    /// Records the value of a source that is one object by its name, such as the Consul key
    /// `vmesh/config/<Kind>/<name>` (see [`ParsedSource::keyed`]).
    pub fn upsert_keyed(&mut self, source: &str, key: &ObjectKey, text: &str) -> bool {
        self.apply(source, ParsedSource::keyed(key, text))
    }

    /// Records a source's text, parsed elsewhere (parsing is the costly part, and the controller
    /// does it off the path every other change takes). Returns whether what the source defines
    /// changed.
    pub fn apply(&mut self, source: &str, parsed: ParsedSource) -> bool {
        let old = self.sources.get(source);
        if old.is_some_and(|o| o.text_hash == parsed.text_hash && o.mode == parsed.mode) {
            return false;
        }
        let entry = match parsed.documents {
            Err(syntax_error) => SourceEntry {
                text_hash: parsed.text_hash,
                mode: parsed.mode,
                syntax_error: Some(syntax_error),
                docs: old.map(|o| o.docs.clone()).unwrap_or_default(),
                problems: vec![],
            },
            Ok(documents) => build_entry(parsed.text_hash, parsed.mode, documents, old),
        };
        // Changed means what the source defines changed, not its bytes (comments, layout).
        let changed = old.is_none_or(|o| !o.same_content(&entry));
        self.sources.insert(source.to_string(), entry);
        changed
    }

    /// Records that `source` holds nothing usable, for a reason found before parsing (a
    /// value that is not text, or too large; a key that names no object). With `key`, the
    /// object is `Rejected` and keeps its last good version; without, it is a source problem.
    pub fn reject_source(
        &mut self,
        source: &str,
        key: Option<&ObjectKey>,
        problem: Problem,
    ) -> bool {
        let text_hash = crate::content_hash(problem.to_string().as_bytes());
        let old = self.sources.get(source);
        let entry = match key {
            Some(key) => build_entry(
                text_hash.clone(),
                SourceMode::SingleDoc,
                vec![Parsed::Document(Document {
                    key: key.clone(),
                    version: text_hash,
                    result: Err(vec![problem]),
                })],
                old,
            ),
            None => SourceEntry {
                text_hash,
                mode: SourceMode::SingleDoc,
                syntax_error: None,
                docs: BTreeMap::new(),
                problems: vec![problem],
            },
        };
        let changed = old.is_none_or(|o| !o.same_content(&entry));
        self.sources.insert(source.to_string(), entry);
        changed
    }

    /// Forgets `source` and every object it defined. Returns whether it was known.
    pub fn remove_source(&mut self, source: &str) -> bool {
        self.created.remove(source);
        self.sources.remove(source).is_some()
    }

    /// Records when `source` was created (a Consul key's CreateIndex): of two objects claiming
    /// the same thing, the older keeps it. Returns whether it changed.
    pub fn set_created(&mut self, source: &str, created: u64) -> bool {
        self.created.insert(source.to_string(), created) != Some(created)
    }

    /// The sources currently known, in order.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    /// The effective objects and the parse-level reports.
    pub fn snapshot(&self) -> Config {
        let mut config = Config::default();
        // Sources iterate in sorted order, so the first definition seen wins.
        let mut owners: BTreeMap<&ObjectKey, &str> = BTreeMap::new();
        for (rank, (source, entry)) in self.sources.iter().enumerate() {
            let mut problems = Vec::new();
            if let Some(e) = &entry.syntax_error {
                problems.push(e.clone());
            }
            problems.extend(entry.problems.iter().cloned());
            for (key, doc) in &entry.docs {
                if let Some(owner) = owners.get(key) {
                    problems.push(Problem::new(
                        doc.location.clone(),
                        format!(
                            "{key} is also defined in {owner}, which takes precedence; this definition is ignored"
                        ),
                    ));
                    continue;
                }
                owners.insert(key, source);
                let errors = match &entry.syntax_error {
                    Some(e) => vec![e.clone()],
                    None => doc.errors.clone(),
                };
                let state = if errors.is_empty() {
                    State::Accepted
                } else {
                    State::Rejected
                };
                let serving_version = doc.last_good.as_ref().map(|g| g.version.clone());
                if let Some(good) = &doc.last_good {
                    config.insert(key.clone(), good.object.clone());
                    config.claims.insert(
                        key.clone(),
                        Claim {
                            created: self.created.get(source).copied().unwrap_or(0),
                            source: rank,
                            position: doc.position,
                        },
                    );
                }
                config.reports.insert(
                    key.clone(),
                    ObjectReport {
                        state,
                        serving_last_good: state == State::Rejected && serving_version.is_some(),
                        errors,
                        warnings: vec![],
                        source: source.clone(),
                        version: doc.version.clone(),
                        serving_version,
                        certificates: vec![],
                    },
                );
            }
            if !problems.is_empty() {
                config.source_errors.insert(source.clone(), problems);
            }
        }
        config
    }
}

fn build_entry(
    text_hash: String,
    mode: SourceMode,
    documents: Vec<Parsed>,
    old: Option<&SourceEntry>,
) -> SourceEntry {
    let mut docs: BTreeMap<ObjectKey, DocState> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, parsed) in documents.into_iter().enumerate() {
        let location = match mode {
            SourceMode::MultiDoc => index("documents", i),
            SourceMode::SingleDoc => String::new(),
        };
        let within = |p: Problem| Problem {
            path: match (location.is_empty(), p.path.is_empty()) {
                (true, _) => p.path,
                (false, true) => location.clone(),
                (false, false) => format!("{location}.{}", p.path),
            },
            message: p.message,
        };
        match parsed {
            Parsed::Invalid(ps) => problems.extend(ps.into_iter().map(within)),
            Parsed::Document(doc) => {
                if let Some(first) = docs.get(&doc.key) {
                    problems.push(Problem::new(
                        location.clone(),
                        format!(
                            "{} is already defined in {} of this source; this definition is ignored",
                            doc.key, first.location
                        ),
                    ));
                    continue;
                }
                let previous = old.and_then(|o| o.docs.get(&doc.key));
                let (errors, last_good) = match doc.result {
                    Ok(object) => (
                        vec![],
                        Some(Good {
                            object,
                            version: doc.version.clone(),
                        }),
                    ),
                    Err(errors) => (errors, previous.and_then(|p| p.last_good.clone())),
                };
                docs.insert(
                    doc.key,
                    DocState {
                        location: location.clone(),
                        position: i,
                        version: doc.version,
                        errors,
                        last_good,
                    },
                );
            }
        }
    }
    SourceEntry {
        text_hash,
        mode,
        syntax_error: None,
        docs,
        problems,
    }
}
