//! Vault ACL policies, written in Vault's own HCL syntax and enforced per path:
//!
//! ```hcl
//! path "secret/data/vmesh/*" { capabilities = ["read"] }
//! path "secret/metadata/+/tls" { capabilities = ["read", "list"] }
//! ```
//!
//! A path rule is exact, or a glob: `*` at the end matches any suffix, `+` matches one path
//! segment. When several rules match a request path, the most specific wins, as Vault's
//! priority rules order them: the one whose first wildcard comes later, then the one not ending
//! in `*`, then the one with fewer `+`, then the longer one. `deny` in the winning rule refuses
//! everything. The `root` policy allows everything; the `default` policy lets a token look itself
//! up and renew itself.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Deserialize;

/// What a request asks to do to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    Create,
    Read,
    Update,
    Delete,
    List,
    Sudo,
}

impl Capability {
    fn as_str(self) -> &'static str {
        match self {
            Capability::Create => "create",
            Capability::Read => "read",
            Capability::Update => "update",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
        }
    }
}

const KNOWN: [&str; 8] = [
    "create", "read", "update", "patch", "delete", "list", "sudo", "deny",
];

#[derive(Debug, Deserialize)]
struct PolicyFile {
    #[serde(default)]
    path: BTreeMap<String, PathBody>,
}

#[derive(Debug, Deserialize)]
struct PathBody {
    #[serde(default)]
    capabilities: Vec<String>,
}

/// A parsed policy: its path rules.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    pattern: String,
    capabilities: Vec<String>,
}

impl Policy {
    /// Parses a policy's HCL text; the error says what is wrong, as Vault's 400 does.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile =
            hcl::from_str(text).map_err(|e| format!("failed to parse policy: {e}"))?;
        let mut rules = Vec::new();
        for (pattern, body) in file.path {
            if let Some(bad) = body
                .capabilities
                .iter()
                .find(|c| !KNOWN.contains(&c.as_str()))
            {
                return Err(format!(
                    "failed to parse policy: path {pattern:?}: invalid capability {bad:?}"
                ));
            }
            rules.push(Rule {
                pattern: pattern.trim_start_matches('/').to_string(),
                capabilities: body.capabilities,
            });
        }
        Ok(Policy { rules })
    }

    /// The rule for `path` among these policies' rules, if any, with its capabilities.
    fn best<'a>(policies: &[&'a Policy], path: &str) -> Vec<&'a Rule> {
        let mut matching: Vec<&Rule> = policies
            .iter()
            .flat_map(|p| p.rules.iter())
            .filter(|r| matches(&r.pattern, path))
            .collect();
        matching.sort_by(|a, b| priority(&b.pattern, &a.pattern));
        let Some(top) = matching.first().map(|r| r.pattern.clone()) else {
            return Vec::new();
        };
        // Rules with the same pattern in several policies merge their capabilities.
        matching.into_iter().filter(|r| r.pattern == top).collect()
    }
}

/// Whether `policies` (by name, with their texts) allow `capability` on `path`.
pub fn allows(policies: &[&Policy], root: bool, path: &str, capability: Capability) -> bool {
    if root {
        return true;
    }
    let rules = Policy::best(policies, path);
    let caps: Vec<&str> = rules
        .iter()
        .flat_map(|r| r.capabilities.iter().map(String::as_str))
        .collect();
    if caps.contains(&"deny") {
        return false;
    }
    caps.contains(&capability.as_str())
}

/// Whether a rule's pattern covers `path`.
fn matches(pattern: &str, path: &str) -> bool {
    let (body, glob) = match pattern.strip_suffix('*') {
        Some(body) => (body, true),
        None => (pattern, false),
    };
    let mut rest = path;
    let mut segments = body.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "+" {
            let end = rest.find('/').unwrap_or(rest.len());
            if end == 0 && !last {
                return false;
            }
            rest = &rest[end..];
        } else if last && glob {
            return rest.starts_with(segment);
        } else if let Some(after) = rest.strip_prefix(segment) {
            rest = after;
        } else {
            return false;
        }
        if !last {
            match rest.strip_prefix('/') {
                Some(after) => rest = after,
                None => return false,
            }
        }
    }
    glob || rest.is_empty()
}

/// Vault's priority between two matching patterns: `Greater` when `a` is more specific.
fn priority(a: &str, b: &str) -> Ordering {
    let first_wildcard = |p: &str| p.find(['*', '+']).unwrap_or(p.len());
    let plus = |p: &str| p.split('/').filter(|s| *s == "+").count();
    first_wildcard(a)
        .cmp(&first_wildcard(b))
        .then_with(|| b.ends_with('*').cmp(&a.ends_with('*')))
        .then_with(|| plus(b).cmp(&plus(a)))
        .then_with(|| a.len().cmp(&b.len()))
        .then_with(|| b.cmp(a))
}

/// The `default` policy every token has unless told otherwise: look itself up, renew itself.
pub const DEFAULT_POLICY: &str = r#"
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "sys/capabilities-self" { capabilities = ["update"] }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_policies_parse_and_bad_ones_say_why() {
        let p = Policy::parse(
            r#"
            path "secret/data/app/*" { capabilities = ["read"] }
            path "secret/metadata/+/tls" { capabilities = ["read", "list"] }
            "#,
        )
        .unwrap();
        assert_eq!(p.rules.len(), 2);
        assert!(Policy::parse(r#"path "x" { capabilities = ["fly"] }"#)
            .unwrap_err()
            .contains("invalid capability \"fly\""));
        assert!(Policy::parse("path {")
            .unwrap_err()
            .starts_with("failed to parse policy"));
    }

    #[test]
    fn paths_match_exactly_by_glob_and_by_segment() {
        assert!(matches("secret/data/x", "secret/data/x"));
        assert!(!matches("secret/data/x", "secret/data/xy"));
        assert!(matches("secret/data/*", "secret/data/a/b"));
        assert!(matches("secret/data/a*", "secret/data/ab"));
        assert!(matches("secret/+/x", "secret/data/x"));
        assert!(!matches("secret/+/x", "secret/data/y"));
        assert!(!matches("secret/+/x", "secret/a/b/x"));
        assert!(matches("secret/+/*", "secret/data/a/b"));
    }

    #[test]
    fn the_most_specific_rule_wins_and_deny_refuses() {
        let p = Policy::parse(
            r#"
            path "secret/data/*" { capabilities = ["read"] }
            path "secret/data/private/*" { capabilities = ["deny"] }
            path "secret/data/shop" { capabilities = ["read", "update"] }
            "#,
        )
        .unwrap();
        let ok = |path, cap| allows(&[&p], false, path, cap);
        assert!(ok("secret/data/app", Capability::Read));
        assert!(!ok("secret/data/app", Capability::Update));
        assert!(!ok("secret/data/private/key", Capability::Read));
        assert!(ok("secret/data/shop", Capability::Update));
        assert!(!ok("sys/policies/acl/x", Capability::Read));
        assert!(allows(&[], true, "anything", Capability::Sudo));
    }
}
