//! A problem found in a config object: a field path and a message.

use serde::{Deserialize, Serialize};

/// One error or warning, displayed as `path: message` (or just `message` when the
/// problem is about the whole document). Paths look like `spec.routes[2].match.regex`.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, thiserror::Error,
)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    /// A problem at `path`. Both are cut to a bounded length (a message may quote the value at
    /// fault, which can be as long as a document): see [`crate::limits::MAX_PROBLEM_TEXT`].
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: bounded(path.into()),
            message: bounded(message.into()),
        }
    }
}

/// `text` cut to [`crate::limits::MAX_PROBLEM_TEXT`] bytes (on a character boundary), saying so.
pub(crate) fn bounded(mut text: String) -> String {
    let max = crate::limits::MAX_PROBLEM_TEXT;
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&format!("… ({total} bytes in all)"));
    text
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// `parent.field`, or `field` at the root.
pub(crate) fn field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// `parent[index]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}
