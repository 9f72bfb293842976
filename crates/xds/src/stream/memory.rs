//! What the streams of one server sent of composed resources, so that a proxy that reconnects
//! (a network blip, a controller that restarted its stream) is known to hold what it holds.
//!
//! A composition (a route configuration with a refused virtual service at its last accepted
//! content) is made by one stream; the proxy that reconnects reports only its version. Without
//! this, the new stream could not build on it and would judge the whole route configuration
//! again (docs/architecture.md, "When a proxy refuses config"). Bounded: the oldest entries go
//! first past [`SentMemory::CAPACITY`]. It lives as long as the server: a controller that
//! restarts, or another replica, does not have it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::resource::Resource;

type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    /// (type URL, name, version) → the resource sent.
    resources: HashMap<Key, Arc<Resource>>,
    /// (type URL, SotW version of the whole view) → the view sent.
    views: HashMap<(String, String), Vec<Arc<Resource>>>,
    /// Insertion order, for eviction: `true` for a view key.
    order: VecDeque<(bool, Key)>,
}

/// Shared by the streams of one server.
#[derive(Default)]
pub struct SentMemory {
    inner: Mutex<Inner>,
}

impl SentMemory {
    /// Entries kept (resources and views together).
    pub const CAPACITY: usize = 4096;

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn remember_resource(&self, r: &Arc<Resource>) {
        let key = (r.type_url.to_string(), r.name.clone(), r.version.clone());
        let mut inner = self.lock();
        if inner.resources.insert(key.clone(), r.clone()).is_none() {
            inner.order.push_back((false, key));
            evict(&mut inner);
        }
    }

    pub(super) fn remember_view(&self, type_url: &str, version: &str, view: Vec<Arc<Resource>>) {
        let key = (type_url.to_string(), version.to_string());
        let mut inner = self.lock();
        if inner.views.insert(key.clone(), view).is_none() {
            inner.order.push_back((true, (key.0, key.1, String::new())));
            evict(&mut inner);
        }
    }

    pub(super) fn resource(
        &self,
        type_url: &str,
        name: &str,
        version: &str,
    ) -> Option<Arc<Resource>> {
        self.lock()
            .resources
            .get(&(type_url.to_string(), name.to_string(), version.to_string()))
            .cloned()
    }

    pub(super) fn view(&self, type_url: &str, version: &str) -> Option<Vec<Arc<Resource>>> {
        self.lock()
            .views
            .get(&(type_url.to_string(), version.to_string()))
            .cloned()
    }

    /// Entries held now (for tests and metrics).
    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.resources.len() + inner.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn evict(inner: &mut Inner) {
    while inner.order.len() > SentMemory::CAPACITY {
        let Some((view, (a, b, c))) = inner.order.pop_front() else {
            return;
        };
        if view {
            inner.views.remove(&(a, b));
        } else {
            inner.resources.remove(&(a, b, c));
        }
    }
}
