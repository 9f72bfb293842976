//! Config sources. Each one turns its backend's changes into [`SourceEvent`]s for the index.

pub mod dir;

/// One change to one source (a file, later a KV key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Upsert { source: String, text: String },
    Remove { source: String },
}

/// A batch of changes, applied together. An empty batch says "the source is read, nothing changed".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceEvent {
    pub changes: Vec<Change>,
}
