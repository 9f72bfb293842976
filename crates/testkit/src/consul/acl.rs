//! A small subset of Consul's ACL system: tokens with `key_prefix` rules and a session write
//! permission, default policy `deny`.

use super::util::new_uuid;

/// The AccessorID Consul gives the built-in anonymous token (used when a request has no token).
pub const ANONYMOUS_ACCESSOR_ID: &str = "00000000-0000-0000-0000-000000000002";

/// A `key_prefix` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPolicy {
    Deny,
    Read,
    /// Read and write.
    Write,
}

impl std::str::FromStr for KeyPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deny" => Ok(KeyPolicy::Deny),
            "read" => Ok(KeyPolicy::Read),
            "write" => Ok(KeyPolicy::Write),
            _ => Err(format!("unknown key policy {s:?} (deny, read or write)")),
        }
    }
}

/// What a token may do: `key_prefix "<prefix>" { policy = "…" }` rules (the longest matching
/// prefix wins; no match means deny) and, if `session_write`, `session_prefix "" { policy =
/// "write" }` (create, renew, destroy and read sessions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclRules {
    pub key_prefixes: Vec<(String, KeyPolicy)>,
    pub session_write: bool,
}

impl AclRules {
    /// Everything: `key_prefix ""` write and session write.
    pub fn management() -> Self {
        AclRules::default()
            .key_prefix("", KeyPolicy::Write)
            .with_session_write()
    }

    /// Adds a `key_prefix` rule.
    pub fn key_prefix(mut self, prefix: &str, policy: KeyPolicy) -> Self {
        self.key_prefixes.push((prefix.to_owned(), policy));
        self
    }

    /// Grants session write (and read).
    pub fn with_session_write(mut self) -> Self {
        self.session_write = true;
        self
    }

    /// The policy of the longest `key_prefix` that `key` starts with; `Deny` if none.
    pub fn key_policy(&self, key: &str) -> KeyPolicy {
        self.key_prefixes
            .iter()
            .filter(|(p, _)| key.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map_or(KeyPolicy::Deny, |(_, pol)| *pol)
    }

    pub fn can_read(&self, key: &str) -> bool {
        self.key_policy(key) != KeyPolicy::Deny
    }

    pub fn can_write(&self, key: &str) -> bool {
        self.key_policy(key) == KeyPolicy::Write
    }

    /// Consul's `KeyWritePrefix`: write on the prefix itself and no rule below it that is not
    /// write (needed for `DELETE ?recurse`).
    pub fn can_write_prefix(&self, prefix: &str) -> bool {
        self.can_write(prefix)
            && self
                .key_prefixes
                .iter()
                .filter(|(p, _)| p.starts_with(prefix) && p.len() > prefix.len())
                .all(|(_, pol)| *pol == KeyPolicy::Write)
    }
}

/// One ACL token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclToken {
    /// The secret sent in `X-Consul-Token` / `Authorization: Bearer`.
    pub secret_id: String,
    /// The public ID that error messages name.
    pub accessor_id: String,
    pub rules: AclRules,
}

impl AclToken {
    /// A token with this secret and a random AccessorID.
    pub fn new(secret_id: &str, rules: AclRules) -> Self {
        AclToken {
            secret_id: secret_id.to_owned(),
            accessor_id: new_uuid(),
            rules,
        }
    }
}

/// ACLs enabled with default policy `deny`: only the listed tokens exist; a request without a
/// token gets the anonymous token's rules (none by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclConfig {
    pub tokens: Vec<AclToken>,
    pub anonymous: AclRules,
}

impl AclConfig {
    pub fn with_token(mut self, token: AclToken) -> Self {
        self.tokens.push(token);
        self
    }

    /// Parses the command-line form `SECRET=PREFIX:POLICY,PREFIX:POLICY,session:write`
    /// (`PREFIX` may be empty: `=:read` reads everything).
    pub fn parse_token_spec(spec: &str) -> Result<AclToken, String> {
        let (secret, rules_spec) = spec
            .split_once('=')
            .ok_or_else(|| format!("ACL token spec {spec:?} is not SECRET=RULES"))?;
        if secret.is_empty() {
            return Err(format!("ACL token spec {spec:?} has an empty secret"));
        }
        let mut rules = AclRules::default();
        for part in rules_spec.split(',').filter(|p| !p.is_empty()) {
            if part == "session:write" {
                rules.session_write = true;
                continue;
            }
            let (prefix, policy) = part.rsplit_once(':').ok_or_else(|| {
                format!("ACL rule {part:?} is not PREFIX:POLICY or session:write")
            })?;
            rules = rules.key_prefix(prefix, policy.parse()?);
        }
        Ok(AclToken::new(secret, rules))
    }
}

/// Who is asking: resolved from the request's token.
#[derive(Debug, Clone)]
pub(crate) enum Authz {
    /// ACLs are off.
    All,
    Token {
        accessor_id: String,
        anonymous: bool,
        rules: AclRules,
    },
}

impl Authz {
    /// Resolves a token; `Err` is the 403 body for an unknown token.
    pub(crate) fn resolve(acl: Option<&AclConfig>, token: Option<&str>) -> Result<Authz, String> {
        let Some(acl) = acl else {
            return Ok(Authz::All);
        };
        match token.filter(|t| !t.is_empty() && *t != "anonymous") {
            None => Ok(Authz::Token {
                accessor_id: ANONYMOUS_ACCESSOR_ID.to_owned(),
                anonymous: true,
                rules: acl.anonymous.clone(),
            }),
            Some(t) => acl
                .tokens
                .iter()
                .find(|tok| tok.secret_id == t)
                .map(|tok| Authz::Token {
                    accessor_id: tok.accessor_id.clone(),
                    anonymous: false,
                    rules: tok.rules.clone(),
                })
                .ok_or_else(|| "ACL not found".to_owned()),
        }
    }

    pub(crate) fn rules(&self) -> Option<&AclRules> {
        match self {
            Authz::All => None,
            Authz::Token { rules, .. } => Some(rules),
        }
    }

    pub(crate) fn key_read(&self, key: &str) -> bool {
        self.rules().is_none_or(|r| r.can_read(key))
    }

    pub(crate) fn key_write(&self, key: &str) -> bool {
        self.rules().is_none_or(|r| r.can_write(key))
    }

    pub(crate) fn key_write_prefix(&self, prefix: &str) -> bool {
        self.rules().is_none_or(|r| r.can_write_prefix(prefix))
    }

    pub(crate) fn session_write(&self) -> bool {
        self.rules().is_none_or(|r| r.session_write)
    }

    /// Consul's permission-denied message, e.g. `Permission denied: token with AccessorID '…'
    /// lacks permission 'key:read' on "a/b"`.
    pub(crate) fn denied(&self, permission: &str, name: &str) -> String {
        match self {
            Authz::Token {
                anonymous: true, ..
            } => format!(
                "Permission denied: anonymous token lacks permission '{permission}' on {name:?}. \
                 The anonymous token is used implicitly when a request does not specify a token."
            ),
            Authz::Token { accessor_id, .. } => format!(
                "Permission denied: token with AccessorID '{accessor_id}' lacks permission \
                 '{permission}' on {name:?}"
            ),
            Authz::All => "Permission denied".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let r = AclRules::default()
            .key_prefix("vmesh/", KeyPolicy::Read)
            .key_prefix("vmesh/status/", KeyPolicy::Write)
            .key_prefix("vmesh/secret/", KeyPolicy::Deny);
        assert!(r.can_read("vmesh/config/a"));
        assert!(!r.can_write("vmesh/config/a"));
        assert!(r.can_write("vmesh/status/a"));
        assert!(!r.can_read("vmesh/secret/x"));
        assert!(!r.can_read("other"));
        assert!(r.can_write_prefix("vmesh/status/"));
        let w = AclRules::default()
            .key_prefix("", KeyPolicy::Write)
            .key_prefix("a/b", KeyPolicy::Read);
        assert!(!w.can_write_prefix("a/"));
        assert!(w.can_write_prefix("c/"));
    }

    #[test]
    fn token_spec() {
        let t = AclConfig::parse_token_spec("s3cret=vmesh/:write,vmesh/x:deny,session:write")
            .expect("parse");
        assert_eq!(t.secret_id, "s3cret");
        assert!(t.rules.session_write);
        assert_eq!(t.rules.key_policy("vmesh/a"), KeyPolicy::Write);
        assert_eq!(t.rules.key_policy("vmesh/xy"), KeyPolicy::Deny);
        let all = AclConfig::parse_token_spec("r=:read").expect("parse");
        assert!(all.rules.can_read("anything"));
        assert!(AclConfig::parse_token_spec("nope").is_err());
        assert!(AclConfig::parse_token_spec("a=x:all").is_err());
    }
}
