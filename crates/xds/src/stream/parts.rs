//! Narrowing a refusal down to the part at fault, so that the other parts keep flowing.
//!
//! A composed resource ([`Resource::from_parts`]: a route configuration, one part per virtual
//! service) that a proxy refuses is judged part by part. When the refused response changed one
//! part, that part is at fault. When it changed several, each is tried alone on top of what the
//! proxy holds, one response at a time, until the ones at fault are known. From then on the
//! resource is sent with each part at fault at the content the proxy last accepted (or left out
//! if it never accepted one), until the part changes again: a bad virtual service freezes only
//! itself.
//!
//! Trials on Envoy 1.40 (docs/architecture.md, "When a proxy refuses config") showed it accepts
//! such a rebuilt route configuration after a refusal, on both protocol variants, and that a
//! refusal's message never names the virtual host at fault: only the server knows what changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Held;
use crate::resource::{Part, Resource, TypeResources};

/// A changed part: its key and its new version ("" when the part was removed).
type Change = (String, String);

/// What a stream knows of the parts of the resources of one type.
#[derive(Debug, Default)]
pub(super) struct PartJudgement {
    /// (resource, part key) → the part version the proxy refused ("" for its removal).
    bad: BTreeMap<(String, String), String>,
    /// Resource → the changes of a refused response still to be tried one at a time.
    suspects: BTreeMap<String, Vec<Change>>,
}

/// How a refusal of one resource was judged.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Not composed, or nothing to narrow down: the whole resource is refused.
    Whole,
    /// These parts are at fault.
    Parts(Vec<String>),
    /// Several parts changed: each will be tried alone.
    Trying,
}

/// What the parts of `resource` are judged against: the parts the proxy holds of it; for a
/// resource it does not hold yet, the first part of `resource` alone (the fields around the
/// repeated parts, without which it is not a valid message). `None` when the proxy holds it
/// with content unknown to this stream (told only its version) or not composed, which cannot
/// be built on.
fn held_parts(held: Option<&Held>, resource: &Resource) -> Option<Vec<Part>> {
    match held {
        None => Some(resource.parts.first().cloned().into_iter().collect()),
        Some(h) => match &h.body {
            Some(body) if !body.parts.is_empty() => Some(body.parts.clone()),
            _ => None,
        },
    }
}

fn find<'p>(parts: &'p [Part], key: &str) -> Option<&'p Part> {
    parts.iter().find(|p| p.key == key)
}

fn version_in<'p>(parts: &'p [Part], key: &str) -> &'p str {
    find(parts, key).map_or("", |p| p.version.as_str())
}

/// What `sent` changes on top of `held`: removals first (a domain a removed part frees may be
/// what another part's change needs), then the rest in `sent`'s order.
fn changes(held: &[Part], sent: &[Part]) -> Vec<Change> {
    let mut out: Vec<Change> = held
        .iter()
        .filter(|p| find(sent, &p.key).is_none())
        .map(|p| (p.key.clone(), String::new()))
        .collect();
    out.extend(
        sent.iter()
            .filter(|p| version_in(held, &p.key) != p.version)
            .map(|p| (p.key.clone(), p.version.clone())),
    );
    out
}

impl PartJudgement {
    /// What to send of `target`, given what the proxy holds: `None` when that is `target`
    /// itself.
    pub(super) fn compose(
        &self,
        target: &Arc<Resource>,
        held: Option<&Held>,
    ) -> Option<Arc<Resource>> {
        if target.parts.is_empty() {
            return None;
        }
        let held = &held_parts(held, target)?;
        let name = &target.name;
        let live: Vec<&Change> = self
            .suspects
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(key, version)| {
                // Still what the target has, and still a change.
                version_in(&target.parts, key) == version && version_in(held, key) != version
            })
            .collect();
        // One resource is tried at a time (the first by name), so that a refusal is always of
        // one change; the others stay as the proxy holds them meanwhile.
        let waiting = self
            .suspects
            .keys()
            .next()
            .is_some_and(|first| first != name);
        let parts: Vec<Part> = if !live.is_empty() && waiting {
            let mut parts = Vec::with_capacity(target.parts.len());
            for p in &target.parts {
                parts.extend(find(held, &p.key).cloned());
            }
            parts.extend(
                held.iter()
                    .filter(|p| find(&target.parts, &p.key).is_none())
                    .cloned(),
            );
            parts
        } else if let Some((probe, _)) = live.first() {
            // The first suspect alone, on top of what the proxy holds (in the target's order,
            // so that once every part is judged the result is what the rule below makes).
            let mut parts = Vec::with_capacity(target.parts.len());
            for p in &target.parts {
                if &p.key == probe {
                    parts.push(p.clone());
                } else {
                    parts.extend(find(held, &p.key).cloned());
                }
            }
            parts.extend(
                held.iter()
                    .filter(|p| &p.key != probe && find(&target.parts, &p.key).is_none())
                    .cloned(),
            );
            parts
        } else {
            let is_bad = |key: &str, version: &str| {
                self.bad
                    .get(&(name.clone(), key.to_string()))
                    .map(String::as_str)
                    == Some(version)
            };
            let mut substituted = false;
            let mut parts = Vec::with_capacity(target.parts.len());
            for p in &target.parts {
                if is_bad(&p.key, &p.version) {
                    substituted = true;
                    parts.extend(find(held, &p.key).cloned());
                } else {
                    parts.push(p.clone());
                }
            }
            // A removal the proxy refused: it keeps the part.
            for p in held {
                if find(&target.parts, &p.key).is_none() && is_bad(&p.key, "") {
                    substituted = true;
                    parts.push(p.clone());
                }
            }
            if !substituted {
                return None;
            }
            parts
        };
        Some(Arc::new(target.with_parts(parts)))
    }

    /// The proxy refused `sent` while holding `held`; `alone`: nothing else changed in the
    /// refused response (otherwise even one changed part may not be the one at fault).
    pub(super) fn refused(&mut self, held: Option<&Held>, sent: &Resource, alone: bool) -> Verdict {
        if sent.parts.is_empty() {
            return Verdict::Whole;
        }
        let Some(held) = held_parts(held, sent) else {
            return Verdict::Whole;
        };
        let name = &sent.name;
        let changed = changes(&held, &sent.parts);
        if let ([(key, version)], true) = (changed.as_slice(), alone) {
            if let Some(suspects) = self.suspects.get_mut(name) {
                suspects.retain(|c| c != &changed[0]);
                if suspects.is_empty() {
                    self.suspects.remove(name);
                }
            }
            self.bad
                .insert((name.clone(), key.clone()), version.clone());
            return Verdict::Parts(vec![key.clone()]);
        }
        if changed.is_empty() {
            return Verdict::Whole;
        }
        self.suspects.insert(name.clone(), changed);
        Verdict::Trying
    }

    /// The proxy accepted `sent` while holding `held`: what it changed is not at fault. And
    /// since a part may have been refused for what another part held (two virtual services
    /// with one domain), the parts at fault are tried once more after any other change.
    pub(super) fn accepted(&mut self, held: Option<&Held>, sent: &Resource) {
        let name = &sent.name;
        let Some(held) = held_parts(held, sent) else {
            return;
        };
        let changed = changes(&held, &sent.parts);
        if changed.is_empty() {
            return;
        }
        if let Some(suspects) = self.suspects.get_mut(name) {
            suspects.retain(|c| !changed.contains(c));
            if suspects.is_empty() {
                self.suspects.remove(name);
            }
        }
        self.bad.retain(|(n, _), _| n != name);
    }

    /// Forgets what no longer applies to `target` (the resources of this type the proxy
    /// should hold now): judgements of part versions it no longer has.
    pub(super) fn prune(&mut self, target: Option<&TypeResources>) {
        let current = |name: &str, key: &str| -> Option<&str> {
            let resource = target?.get(name)?;
            Some(version_in(&resource.parts, key))
        };
        self.bad
            .retain(|(name, key), version| current(name, key) == Some(version.as_str()));
        self.suspects.retain(|name, changes| {
            changes.retain(|(key, version)| current(name, key) == Some(version.as_str()));
            !changes.is_empty()
        });
    }

    /// The proxy no longer holds the resource.
    pub(super) fn forget(&mut self, name: &str) {
        self.suspects.remove(name);
        self.bad.retain(|(n, _), _| n != name);
    }
}
