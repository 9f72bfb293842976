//! The state of one ADS stream, as a pure state machine.
//!
//! The async server feeds it requests ([`Stream::handle_sotw`],
//! [`Stream::handle_delta`]) and new targets ([`Stream::set_target`]) and sends
//! whatever [`Stream::poll`] returns. All protocol decisions live here:
//!
//! - versions are committed only on ACK; a NACK keeps the last accepted state
//!   and the rejected versions are not sent again until they change;
//! - at most one response per type is in flight, so bursts coalesce;
//! - requests carrying a stale nonce are ignored (for delta, their
//!   subscription changes are still applied, since those are incremental);
//! - make-before-break: a resource that refers to a wildcard-typed resource
//!   (a route to a cluster) is sent only once the proxy has acknowledged what
//!   it refers to, and a resource is removed only when nothing the proxy holds
//!   or is being sent still refers to it;
//! - a changed cluster gets its endpoints sent again (Envoy keeps an EDS
//!   cluster warming until it does);
//! - a proxy that reconnects with versions equal to the current ones
//!   (`initial_resource_versions`, or a SotW `version_info`) is sent nothing;
//! - a refused composed resource (a route configuration) is narrowed down to the parts at
//!   fault, and sent on with those at their last accepted content ([`parts`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};

use crate::resource::{
    content_version, is_wildcard_type, ProxySnapshot, Resource, ResourceRef, CLUSTER, ENDPOINT,
    PUSH_ORDER,
};

mod memory;
mod parts;
pub use memory::SentMemory;
use parts::{PartJudgement, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sotw,
    Delta,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

/// What happened when a request was handled, for metrics, logs and status.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The proxy accepted a response; these resources are now committed at these versions.
    Ack {
        type_url: String,
        committed: Vec<(String, String)>,
    },
    /// The proxy refused a response. `rejected` are the resources that the refused
    /// response changed; the proxy keeps what it had. Of composed resources, `parts` are the
    /// (resource, part key) found at fault, and `trying` those whose changed parts are now
    /// tried one at a time (nobody is blamed for them yet); any other resource of `rejected`
    /// is refused as a whole.
    Nack {
        type_url: String,
        rejected: Vec<(String, String)>,
        parts: Vec<(String, String)>,
        trying: Vec<String>,
        message: String,
    },
    /// A request answered a response that has since been superseded; ignored.
    StaleNonce { type_url: String },
}

/// One response to send, in the order returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Sotw(DiscoveryResponse),
    Delta(DeltaDiscoveryResponse),
}

impl Response {
    pub fn type_url(&self) -> &str {
        match self {
            Response::Sotw(r) => &r.type_url,
            Response::Delta(r) => &r.type_url,
        }
    }

    pub fn nonce(&self) -> &str {
        match self {
            Response::Sotw(r) => &r.nonce,
            Response::Delta(r) => &r.nonce,
        }
    }
}

/// What the proxy holds (or is being sent) of one resource.
#[derive(Clone, Debug)]
struct Held {
    version: String,
    refs: Vec<ResourceRef>,
    /// The body, when known. A delta proxy that reconnects tells us versions only.
    body: Option<Arc<Resource>>,
}

impl Held {
    fn of(resource: &Arc<Resource>) -> Self {
        Held {
            version: resource.version.clone(),
            refs: resource.refs.clone(),
            body: Some(resource.clone()),
        }
    }
}

type View = BTreeMap<String, Held>;

#[derive(Debug)]
struct InFlight {
    nonce: String,
    /// The whole view the proxy will hold once it accepts.
    view: View,
    /// The resources this response changed, with their versions.
    changed: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    acked: View,
    in_flight: Option<InFlight>,
    /// Versions the proxy refused, by name; not sent again until they change.
    rejected: BTreeMap<String, String>,
    /// Names whose acknowledged version must not count: they are sent again.
    resend: BTreeSet<String>,
    /// Of composed resources: the parts the proxy refused, and those being tried.
    parts: PartJudgement,
    last_nonce: Option<String>,
    /// Whether anything was sent or confirmed for this type on this stream.
    answered: bool,
}

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

pub struct Stream {
    mode: Mode,
    target: Arc<ProxySnapshot>,
    types: BTreeMap<String, TypeState>,
    next_nonce: u64,
    /// What this server's streams sent of composed resources ([`SentMemory`]).
    memory: Option<Arc<SentMemory>>,
}

impl Stream {
    pub fn new(mode: Mode, target: Arc<ProxySnapshot>) -> Self {
        Stream {
            mode,
            target,
            types: BTreeMap::new(),
            next_nonce: 0,
            memory: None,
        }
    }

    /// Remembers the compositions it sends in `memory`, and recognises those a reconnecting
    /// proxy reports holding.
    pub fn remembering(mut self, memory: Arc<SentMemory>) -> Self {
        self.memory = Some(memory);
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn set_target(&mut self, target: Arc<ProxySnapshot>) {
        self.target = target;
        for (type_url, ts) in &mut self.types {
            ts.parts.prune(self.target.of_type(type_url));
        }
    }

    pub fn target(&self) -> &Arc<ProxySnapshot> {
        &self.target
    }

    /// The versions the proxy has acknowledged, by type and name.
    pub fn acked(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.types.iter().flat_map(|(type_url, ts)| {
            ts.acked
                .iter()
                .map(move |(name, held)| (type_url.as_str(), name.as_str(), held.version.as_str()))
        })
    }

    /// The part versions the proxy has acknowledged of composed resources, by type, name and
    /// part key.
    pub fn acked_parts(&self) -> impl Iterator<Item = (&str, &str, &str, &str)> {
        self.types.iter().flat_map(|(type_url, ts)| {
            ts.acked.iter().flat_map(move |(name, held)| {
                held.body.iter().flat_map(move |body| {
                    body.parts.iter().map(move |p| {
                        (
                            type_url.as_str(),
                            name.as_str(),
                            p.key.as_str(),
                            p.version.as_str(),
                        )
                    })
                })
            })
        })
    }

    /// Whether the proxy holds exactly the target: everything acknowledged, nothing pending.
    pub fn in_sync(&self) -> bool {
        self.types.values().all(|ts| ts.in_flight.is_none())
            && self.target.resources.iter().all(|(type_url, resources)| {
                let Some(ts) = self.types.get(*type_url) else {
                    return false;
                };
                resources
                    .iter()
                    .filter(|(name, _)| ts.wants(name))
                    .all(|(name, r)| ts.acked.get(name).is_some_and(|h| h.version == r.version))
            })
    }

    pub fn handle_sotw(&mut self, req: &DiscoveryRequest) -> Vec<Event> {
        let mut events = Vec::new();
        let first = !self
            .types
            .get(&req.type_url)
            .is_some_and(|ts| ts.subscribed);
        {
            let ts = self.types.entry(req.type_url.clone()).or_default();
            if !req.response_nonce.is_empty() {
                if ts.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                    events.push(Event::StaleNonce {
                        type_url: req.type_url.clone(),
                    });
                    return events;
                }
                if let Some(ev) = settle(ts, &req.type_url, &req.response_nonce, req_error(req)) {
                    events.push(ev);
                }
            }
            ts.subscribed = true;
            let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
            ts.wildcard =
                is_wildcard_type(&req.type_url) && (names.is_empty() || names.contains("*"));
            ts.names = names;
        }
        if first && !req.version_info.is_empty() && req.response_nonce.is_empty() {
            // A proxy reconnecting: if it already holds exactly what we would send, it is in sync.
            let desired = self.desired(&req.type_url);
            let ts = self.types.get_mut(&req.type_url).expect("inserted above");
            let recalled = self
                .memory
                .as_ref()
                .and_then(|m| m.view(&req.type_url, &req.version_info));
            if sotw_version(&desired) == req.version_info {
                ts.acked = desired;
                ts.answered = true;
            } else if let Some(view) = recalled {
                // A composition a stream of this server sent: the proxy holds exactly that.
                ts.acked = view.iter().map(|r| (r.name.clone(), Held::of(r))).collect();
                ts.answered = true;
            } else {
                // It holds something, of content unknown here (a composition another stream
                // made): nothing may be built on it as if it held nothing.
                for name in desired.keys() {
                    ts.acked.insert(
                        name.clone(),
                        Held {
                            version: String::new(),
                            refs: Vec::new(),
                            body: None,
                        },
                    );
                }
            }
        }
        events
    }

    pub fn handle_delta(&mut self, req: &DeltaDiscoveryRequest) -> Vec<Event> {
        let mut events = Vec::new();
        let type_url = req.type_url.clone();
        let ts = self.types.entry(type_url.clone()).or_default();
        let first = !ts.subscribed;
        if !req.response_nonce.is_empty() {
            if ts.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                events.push(Event::StaleNonce {
                    type_url: type_url.clone(),
                });
            } else if let Some(ev) = settle(
                ts,
                &type_url,
                &req.response_nonce,
                req.error_detail.as_ref().map(|s| s.message.clone()),
            ) {
                events.push(ev);
            }
        }
        // Subscription changes are incremental, so they apply even on a stale nonce.
        ts.subscribed = true;
        if first && is_wildcard_type(&type_url) && req.resource_names_subscribe.is_empty() {
            ts.wildcard = true;
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                ts.wildcard = true;
            } else {
                ts.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                ts.wildcard = false;
            } else {
                ts.names.remove(name);
                // The proxy forgot it: it must be sent again if asked for again.
                ts.acked.remove(name);
                ts.rejected.remove(name);
                ts.parts.forget(name);
            }
        }
        if first {
            let current = self.target.of_type(&type_url);
            let ts = self.types.get_mut(&type_url).expect("inserted above");
            // A proxy that holds something of this type was initialised before: it needs
            // only what differs, not a first answer.
            ts.answered = !req.initial_resource_versions.is_empty();
            for (name, version) in &req.initial_resource_versions {
                let recalled = self
                    .memory
                    .as_ref()
                    .and_then(|m| m.resource(&type_url, name, version));
                let held = match (current.and_then(|m| m.get(name)), recalled) {
                    (Some(r), _) if &r.version == version => Held::of(r),
                    (_, Some(r)) => Held::of(&r),
                    _ => Held {
                        version: version.clone(),
                        refs: Vec::new(),
                        body: None,
                    },
                };
                ts.acked.insert(name.clone(), held);
            }
        }
        events
    }

    /// The responses to send now, in make-before-break order.
    pub fn poll(&mut self) -> Vec<Response> {
        let mut order: Vec<String> = PUSH_ORDER.iter().map(|t| t.to_string()).collect();
        for type_url in self.types.keys() {
            if !PUSH_ORDER.contains(&type_url.as_str()) {
                order.push(type_url.clone());
            }
        }
        let mut out = Vec::new();
        for type_url in order {
            let ready = self
                .types
                .get(&type_url)
                .is_some_and(|ts| ts.subscribed && ts.in_flight.is_none());
            if !ready {
                continue;
            }
            let desired = self.desired(&type_url);
            if let Some(response) = self.respond(&type_url, desired) {
                out.push(response);
            }
        }
        out
    }

    /// What the proxy should hold of one type right now.
    fn desired(&self, type_url: &str) -> View {
        let Some(ts) = self.types.get(type_url) else {
            return View::new();
        };
        let mut view = View::new();
        if let Some(target) = self.target.of_type(type_url) {
            for (name, resource) in target {
                if !ts.wants(name) {
                    continue;
                }
                // Parts the proxy refused stay at what it accepted.
                let resource = &ts
                    .parts
                    .compose(resource, ts.acked.get(name))
                    .unwrap_or_else(|| resource.clone());
                // What the proxy refused as a whole (composed or not) is not sent again.
                let refused = ts.rejected.get(name) == Some(&resource.version);
                if !refused && self.refs_ready(resource) {
                    view.insert(name.clone(), Held::of(resource));
                } else if let Some(old) = ts.acked.get(name) {
                    view.insert(name.clone(), old.clone());
                }
            }
        }
        let leaving: Vec<&String> = ts
            .acked
            .keys()
            .filter(|name| !view.contains_key(*name) && ts.wants(name))
            .collect();
        if !leaving.is_empty() {
            let referenced = self.referenced(type_url);
            for name in leaving {
                if referenced.contains(name.as_str()) {
                    view.insert(name.clone(), ts.acked[name].clone());
                }
            }
        }
        view
    }

    /// A resource may be sent once every wildcard-typed resource it refers to is held by the
    /// proxy. Named types (endpoints, routes) are asked for by the proxy itself, so a
    /// reference to them never waits.
    fn refs_ready(&self, resource: &Resource) -> bool {
        resource.refs.iter().all(|r| {
            if !is_wildcard_type(r.type_url) {
                return true;
            }
            match self.types.get(r.type_url) {
                Some(ts) if ts.subscribed => ts.acked.contains_key(&r.name),
                _ => true,
            }
        })
    }

    /// Names of `type_url` that something the proxy holds or is being sent refers to.
    fn referenced(&self, type_url: &str) -> HashSet<&str> {
        let mut names = HashSet::new();
        for ts in self.types.values() {
            let in_flight = ts.in_flight.iter().flat_map(|f| f.view.values());
            for held in ts.acked.values().chain(in_flight) {
                for r in &held.refs {
                    if r.type_url == type_url {
                        names.insert(r.name.as_str());
                    }
                }
            }
        }
        names
    }

    fn respond(&mut self, type_url: &str, desired: View) -> Option<Response> {
        let mode = self.mode;
        let ts = self.types.get_mut(type_url)?;
        let changed: Vec<(String, String)> = desired
            .iter()
            .filter(|(name, held)| {
                ts.resend.contains(*name)
                    || ts.acked.get(*name).map(|h| &h.version) != Some(&held.version)
            })
            .map(|(name, held)| (name.clone(), held.version.clone()))
            .collect();
        let removed: Vec<String> = ts
            .acked
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() && ts.answered {
            return None;
        }
        if let Some(memory) = &self.memory {
            let composed: Vec<&Arc<Resource>> = desired
                .values()
                .filter_map(|h| h.body.as_ref())
                .filter(|b| !b.parts.is_empty())
                .collect();
            if !composed.is_empty() {
                for r in &composed {
                    memory.remember_resource(r);
                }
                let view = desired.values().filter_map(|h| h.body.clone()).collect();
                memory.remember_view(type_url, &sotw_version(&desired), view);
            }
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let response = match mode {
            Mode::Sotw => {
                let resources = desired
                    .values()
                    .filter_map(|h| h.body.as_ref().map(|b| b.body.clone()))
                    .collect();
                Response::Sotw(DiscoveryResponse {
                    version_info: sotw_version(&desired),
                    resources,
                    type_url: type_url.to_string(),
                    nonce: nonce.clone(),
                    ..Default::default()
                })
            }
            Mode::Delta => {
                let resources = changed
                    .iter()
                    .filter_map(|(name, _)| desired.get(name))
                    .filter_map(|h| h.body.as_ref())
                    .map(|r| DeltaResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.body.clone()),
                        ..Default::default()
                    })
                    .collect();
                Response::Delta(DeltaDiscoveryResponse {
                    system_version_info: sotw_version(&desired),
                    resources,
                    type_url: type_url.to_string(),
                    removed_resources: removed,
                    nonce: nonce.clone(),
                    ..Default::default()
                })
            }
        };
        for (name, _) in &changed {
            ts.resend.remove(name);
        }
        ts.last_nonce = Some(nonce.clone());
        ts.answered = true;
        ts.in_flight = Some(InFlight {
            nonce,
            view: desired,
            changed: changed.clone(),
        });
        if type_url == CLUSTER {
            // A changed EDS cluster warms until its endpoints arrive again.
            let eds = self.types.entry(ENDPOINT.to_string()).or_default();
            for (name, _) in &changed {
                eds.resend.insert(name.clone());
            }
        }
        Some(response)
    }
}

fn req_error(req: &DiscoveryRequest) -> Option<String> {
    req.error_detail.as_ref().map(|s| s.message.clone())
}

/// Commits (ACK) or drops (NACK) the response in flight that `nonce` answers.
fn settle(ts: &mut TypeState, type_url: &str, nonce: &str, error: Option<String>) -> Option<Event> {
    let in_flight = ts.in_flight.take_if(|f| f.nonce == nonce)?;
    let sent = |name: &str| in_flight.view.get(name).and_then(|h| h.body.clone());
    match error {
        None => {
            for (name, _) in &in_flight.changed {
                if let Some(sent) = sent(name) {
                    ts.parts.accepted(ts.acked.get(name), &sent);
                }
            }
            ts.acked = in_flight.view;
            for (name, version) in &in_flight.changed {
                if ts.rejected.get(name) != Some(version) {
                    ts.rejected.remove(name);
                }
            }
            Some(Event::Ack {
                type_url: type_url.to_string(),
                committed: in_flight.changed,
            })
        }
        Some(message) => {
            let (mut parts, mut trying) = (Vec::new(), Vec::new());
            let alone = in_flight.changed.len() == 1;
            for (name, version) in &in_flight.changed {
                let verdict = match sent(name) {
                    Some(sent) => ts.parts.refused(ts.acked.get(name), &sent, alone),
                    None => Verdict::Whole,
                };
                match verdict {
                    Verdict::Whole => {
                        ts.rejected.insert(name.clone(), version.clone());
                    }
                    Verdict::Parts(keys) => {
                        parts.extend(keys.into_iter().map(|k| (name.clone(), k)));
                    }
                    Verdict::Trying => trying.push(name.clone()),
                }
            }
            Some(Event::Nack {
                type_url: type_url.to_string(),
                rejected: in_flight.changed,
                parts,
                trying,
                message,
            })
        }
    }
}

/// The version of a whole SotW set: a hash of its names and versions.
fn sotw_version(view: &View) -> String {
    let mut text = String::new();
    for (name, held) in view {
        text.push_str(name);
        text.push('\0');
        text.push_str(&held.version);
        text.push('\n');
    }
    content_version(text.as_bytes())
}

#[cfg(test)]
mod tests;
