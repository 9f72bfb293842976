//! Readiness: each component of a binary says whether it is starting, ready or degraded.
//!
//! A component registers under a name ([`Readiness::component`]) and updates its state through
//! the [`Component`] handle. The binary is ready when every component is ready or degraded
//! (degraded still serves: the controller keeps serving the last config while Consul is down); a
//! component still starting, or a task that stopped, makes it unready. The [`Supervisor`]
//! marks the component of a task that ended as stopped.
//!
//! [`Supervisor`]: crate::Supervisor

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// The state of one component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ComponentState {
    /// Not serving yet, and why.
    Starting(String),
    Ready,
    /// Serving, but something is wrong (e.g. its backend is unreachable), and what.
    Degraded(String),
    /// Its task ended; the process is about to exit.
    Stopped(String),
}

impl ComponentState {
    /// Ready or degraded: serving.
    pub fn is_serving(&self) -> bool {
        matches!(self, ComponentState::Ready | ComponentState::Degraded(_))
    }
}

impl fmt::Display for ComponentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComponentState::Starting(why) => write!(f, "starting: {why}"),
            ComponentState::Ready => f.write_str("ready"),
            ComponentState::Degraded(why) => write!(f, "degraded: {why}"),
            ComponentState::Stopped(why) => write!(f, "stopped: {why}"),
        }
    }
}

/// Every component's state, shared by the components and whoever reports readiness.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Mutex<BTreeMap<&'static str, ComponentState>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, ComponentState>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers component `name`, starting.
    pub fn component(&self, name: &'static str) -> Component {
        self.lock()
            .insert(name, ComponentState::Starting("starting".into()));
        Component {
            name,
            readiness: self.clone(),
        }
    }

    fn set(&self, name: &'static str, state: ComponentState) {
        let mut map = self.lock();
        // A stopped component stays stopped.
        if !matches!(map.get(name), Some(ComponentState::Stopped(_))) {
            map.insert(name, state);
        }
    }

    /// Marks a component stopped (its task ended), if it is registered.
    pub fn stopped(&self, name: &str, why: &str) {
        let mut map = self.lock();
        if let Some(state) = map.get_mut(name) {
            *state = ComponentState::Stopped(why.to_string());
        }
    }

    /// Every component and its state, by name.
    pub fn states(&self) -> Vec<(&'static str, ComponentState)> {
        self.lock().iter().map(|(n, s)| (*n, s.clone())).collect()
    }

    /// Whether every component is serving.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(ComponentState::is_serving)
    }
}

/// One component's handle on its state.
#[derive(Clone, Debug)]
pub struct Component {
    name: &'static str,
    readiness: Readiness,
}

impl Component {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn ready(&self) {
        self.readiness.set(self.name, ComponentState::Ready);
    }

    pub fn degraded(&self, why: impl Into<String>) {
        self.readiness
            .set(self.name, ComponentState::Degraded(why.into()));
    }

    pub fn starting(&self, why: impl Into<String>) {
        self.readiness
            .set(self.name, ComponentState::Starting(why.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_component_serves() {
        let r = Readiness::new();
        assert!(r.is_ready(), "nothing registered");
        let a = r.component("a");
        let b = r.component("b");
        assert!(!r.is_ready(), "both starting");
        a.ready();
        b.degraded("Consul is unreachable");
        assert!(r.is_ready(), "degraded still serves");
        assert_eq!(
            r.states(),
            [
                ("a", ComponentState::Ready),
                (
                    "b",
                    ComponentState::Degraded("Consul is unreachable".into())
                )
            ]
        );
        b.starting("waiting for agents");
        assert!(!r.is_ready());
        b.ready();
        r.stopped("a", "panicked");
        a.ready();
        assert!(!r.is_ready(), "a stopped task stays stopped");
        assert_eq!(r.states()[0].1.to_string(), "stopped: panicked");
    }
}
