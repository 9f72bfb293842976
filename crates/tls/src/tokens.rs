//! Bootstrap tokens: an agent proves one once to get its first certificate.
//!
//! A token's secret is 256 random bits, returned once by [`TokenStore::create`] and stored only
//! as its SHA-256 hash. [`TokenStore::redeem`] compares hashes in constant time and counts uses
//! down. The store is pure data: the caller persists [`TokenStore::to_json`] (embedded data
//! directory) or each [`TokenRecord`] (Consul KV `<prefix>/tokens/<id>`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq as _;

const SECRET_PREFIX: &str = "vmbt_";
const SECRET_BYTES: usize = 32;
const ID_BYTES: usize = 8;

/// Why a token operation was refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("bootstrap token not recognised (wrong secret, or the token was deleted)")]
    Unknown,
    #[error("bootstrap token {id} has been revoked")]
    Revoked { id: TokenId },
    #[error("bootstrap token {id} expired at {expired_unix} s since the Unix epoch")]
    Expired { id: TokenId, expired_unix: u64 },
    #[error("bootstrap token {id} has no uses left")]
    Exhausted { id: TokenId },
    #[error("bootstrap token {id} is bound to node {bound:?}, not {node:?}")]
    WrongNode {
        id: TokenId,
        bound: String,
        node: String,
    },
    #[error("bootstrap token {id} registers the gateway {gateway:?}, not agents")]
    ForGateway { id: TokenId, gateway: String },
    #[error(
        "bootstrap token {id} registers agents, not gateways; create one for this gateway with `vmeshctl token create --gateway {gateway}`"
    )]
    NotForGateway { id: TokenId, gateway: String },
    #[error("bootstrap token {id} registers the gateway {bound:?}, not {gateway:?}")]
    WrongGateway {
        id: TokenId,
        bound: String,
        gateway: String,
    },
    #[error("no bootstrap token with id {id}")]
    NotFound { id: TokenId },
    #[error("a bootstrap token needs at least one use")]
    ZeroUses,
    #[error("a bootstrap token's TTL must be greater than zero")]
    ZeroTtl,
    #[error("the system random number generator failed")]
    Random,
    #[error("invalid token store data: {0}")]
    Decode(String),
}

/// A token's public id (shown by `token list`, used by `token revoke`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenId(String);

impl TokenId {
    pub fn new(id: impl Into<String>) -> Self {
        TokenId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A token secret. `Debug` and `Display` print `[redacted]`; [`Secret::expose`] gives the value,
/// to print it once at creation or to send it from the agent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret read from a flag, file or request.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// What may be shown about a token: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: TokenId,
    /// Creation time (whole seconds).
    #[serde(rename = "created_unix", with = "unix_secs")]
    pub created: SystemTime,
    /// Expiry (whole seconds); `None` never expires.
    #[serde(
        rename = "expires_unix",
        with = "opt_unix_secs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<SystemTime>,
    /// Redemptions left; `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// The only node that may redeem it, if bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The edge gateway (proxy id) it registers, for a gateway's token; such a token registers
    /// no agent, and an agent's token registers no gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

/// Who redeems a token: the agent of a node, or an edge gateway. A node name (`&str`) is an
/// agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registrant<'a> {
    Agent(&'a str),
    Gateway(&'a str),
}

impl<'a> From<&'a str> for Registrant<'a> {
    fn from(node: &'a str) -> Self {
        Registrant::Agent(node)
    }
}

impl<'a> From<&'a String> for Registrant<'a> {
    fn from(node: &'a String) -> Self {
        Registrant::Agent(node)
    }
}

/// A stored token: its public info and the SHA-256 of its secret. This is what is persisted
/// (one JSON document per token for Consul KV); it never holds the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    #[serde(flatten)]
    pub info: TokenInfo,
    #[serde(rename = "secret_sha256", with = "hex32")]
    hash: [u8; 32],
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("info", &self.info)
            .field("secret_sha256", &"[redacted]")
            .finish()
    }
}

impl TokenRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, TokenError> {
        serde_json::from_str(json).map_err(|e| TokenError::Decode(e.to_string()))
    }
}

/// All bootstrap tokens. Pure logic; persistence is the caller's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenStore {
    tokens: BTreeMap<TokenId, TokenRecord>,
}

#[derive(Serialize, Deserialize)]
struct StoreDoc {
    tokens: Vec<TokenRecord>,
}

impl TokenStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a token valid for `ttl` (forever if `None`), `uses` times (unlimited if `None`),
    /// optionally only for `node`. Returns the id and the secret; the secret is not kept.
    pub fn create(
        &mut self,
        ttl: Option<Duration>,
        uses: Option<u32>,
        node: Option<String>,
        now: SystemTime,
    ) -> Result<(TokenId, Secret), TokenError> {
        self.create_scoped(ttl, uses, node, None, now)
    }

    /// Creates a token that registers only the edge gateway `gateway` (see [`TokenStore::create`]).
    pub fn create_for_gateway(
        &mut self,
        ttl: Option<Duration>,
        uses: Option<u32>,
        gateway: String,
        now: SystemTime,
    ) -> Result<(TokenId, Secret), TokenError> {
        self.create_scoped(ttl, uses, None, Some(gateway), now)
    }

    fn create_scoped(
        &mut self,
        ttl: Option<Duration>,
        uses: Option<u32>,
        node: Option<String>,
        gateway: Option<String>,
        now: SystemTime,
    ) -> Result<(TokenId, Secret), TokenError> {
        if uses == Some(0) {
            return Err(TokenError::ZeroUses);
        }
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(TokenError::ZeroTtl);
        }
        let id = loop {
            let mut raw = [0u8; ID_BYTES];
            crate::random_bytes(&mut raw).map_err(|_| TokenError::Random)?;
            let id = TokenId(crate::hex(&raw));
            if !self.tokens.contains_key(&id) {
                break id;
            }
        };
        let mut raw = [0u8; SECRET_BYTES];
        crate::random_bytes(&mut raw).map_err(|_| TokenError::Random)?;
        let secret = Secret(format!("{SECRET_PREFIX}{}", crate::hex(&raw)));
        let created = whole_secs(now);
        let expires = ttl.map(|t| whole_secs(created.checked_add(t).unwrap_or(created)));
        let info = TokenInfo {
            id: id.clone(),
            created,
            expires,
            uses_left: uses,
            node,
            gateway,
            revoked: false,
        };
        self.tokens.insert(
            id.clone(),
            TokenRecord {
                info,
                hash: sha256(secret.expose()),
            },
        );
        Ok((id, secret))
    }

    /// Checks a token for `who` (a node's agent, or a gateway) without using it: in constant
    /// time against every token, then refused if revoked, expired, exhausted, bound to another
    /// node or for another kind of registrant. Returns its id.
    pub fn check<'a>(
        &self,
        secret: &Secret,
        who: impl Into<Registrant<'a>>,
        now: SystemTime,
    ) -> Result<TokenId, TokenError> {
        let hash = sha256(secret.expose());
        // Compare against every token without stopping at a match.
        let mut found = None;
        for (id, rec) in &self.tokens {
            if bool::from(rec.hash.ct_eq(&hash)) {
                found = Some(id);
            }
        }
        let info = &found
            .and_then(|id| self.tokens.get(id))
            .ok_or(TokenError::Unknown)?
            .info;
        if info.revoked {
            return Err(TokenError::Revoked {
                id: info.id.clone(),
            });
        }
        if let Some(expires) = info.expires {
            if now >= expires {
                return Err(TokenError::Expired {
                    id: info.id.clone(),
                    expired_unix: unix(expires),
                });
            }
        }
        if info.uses_left == Some(0) {
            return Err(TokenError::Exhausted {
                id: info.id.clone(),
            });
        }
        match (who.into(), &info.gateway) {
            (Registrant::Agent(_), Some(gateway)) => {
                return Err(TokenError::ForGateway {
                    id: info.id.clone(),
                    gateway: gateway.clone(),
                });
            }
            (Registrant::Agent(node), None) => {
                if let Some(bound) = &info.node {
                    if bound != node {
                        return Err(TokenError::WrongNode {
                            id: info.id.clone(),
                            bound: bound.clone(),
                            node: node.to_owned(),
                        });
                    }
                }
            }
            (Registrant::Gateway(gateway), None) => {
                return Err(TokenError::NotForGateway {
                    id: info.id.clone(),
                    gateway: gateway.to_owned(),
                });
            }
            (Registrant::Gateway(gateway), Some(bound)) => {
                if bound != gateway {
                    return Err(TokenError::WrongGateway {
                        id: info.id.clone(),
                        bound: bound.clone(),
                        gateway: gateway.to_owned(),
                    });
                }
            }
        }
        Ok(info.id.clone())
    }

    /// Redeems a token for `who`: [`TokenStore::check`], then counts one use down. Returns the
    /// token's info after the redemption.
    pub fn redeem<'a>(
        &mut self,
        secret: &Secret,
        who: impl Into<Registrant<'a>>,
        now: SystemTime,
    ) -> Result<TokenInfo, TokenError> {
        let id = self.check(secret, who, now)?;
        let info = &mut self.tokens.get_mut(&id).ok_or(TokenError::Unknown)?.info;
        if let Some(uses) = &mut info.uses_left {
            *uses -= 1;
        }
        Ok(info.clone())
    }

    /// Revokes a token; it stays listed (as revoked) so a later use gets a clear error.
    pub fn revoke(&mut self, id: &TokenId) -> Result<(), TokenError> {
        let rec = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| TokenError::NotFound { id: id.clone() })?;
        rec.info.revoked = true;
        Ok(())
    }

    /// Deletes a token entirely.
    pub fn remove(&mut self, id: &TokenId) -> Result<(), TokenError> {
        self.tokens
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| TokenError::NotFound { id: id.clone() })
    }

    pub fn get(&self, id: &TokenId) -> Option<&TokenInfo> {
        self.tokens.get(id).map(|r| &r.info)
    }

    /// All tokens, oldest first; never secrets or hashes.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut out: Vec<TokenInfo> = self.tokens.values().map(|r| r.info.clone()).collect();
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// The stored records (hashes, no secrets), e.g. to write one Consul KV key per token.
    pub fn records(&self) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values()
    }

    pub fn record(&self, id: &TokenId) -> Option<&TokenRecord> {
        self.tokens.get(id)
    }

    pub fn from_records(records: impl IntoIterator<Item = TokenRecord>) -> Self {
        TokenStore {
            tokens: records
                .into_iter()
                .map(|r| (r.info.id.clone(), r))
                .collect(),
        }
    }

    /// The whole store as JSON (hashes, never secrets).
    pub fn to_json(&self) -> String {
        let doc = StoreDoc {
            tokens: self.tokens.values().cloned().collect(),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, TokenError> {
        let doc: StoreDoc =
            serde_json::from_str(json).map_err(|e| TokenError::Decode(e.to_string()))?;
        Ok(Self::from_records(doc.tokens))
    }
}

fn sha256(secret: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn whole_secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix(t))
}

mod unix_secs {
    use super::*;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(unix(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        time(u64::deserialize(d)?)
    }

    /// A time in seconds since the Unix epoch, refused when the system cannot represent it (a
    /// record is outside input: `UNIX_EPOCH + huge` would panic).
    pub(super) fn time<E: serde::de::Error>(secs: u64) -> Result<SystemTime, E> {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(|| E::custom(format!("{secs} is not a time this system can represent")))
    }
}

mod opt_unix_secs {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        t.map(unix).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<u64>::deserialize(d)?
            .map(super::unix_secs::time)
            .transpose()
    }
}

mod hex32 {
    use super::*;

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::hex(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("secret_sha256 must be 64 hex digits");
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn a_record_with_a_time_out_of_range_is_refused_not_a_panic() {
        // Found by the kv_value fuzz target: the watch of <prefix>/tokens/ panicked on it.
        let json = r#"{"id":"0123456789abcdef","created_unix":1700000000,"expires_unix":18000000000000000000,"secret_sha256":"00000000000000000000000000000000000000000000000000000000000000ff"}"#;
        let e = TokenRecord::from_json(json).unwrap_err();
        assert!(e.to_string().contains("not a time"), "{e}");
        let json = json
            .replace("\"expires_unix\":18000000000000000000,", "")
            .replace("1700000000", "18000000000000000000");
        assert!(TokenRecord::from_json(&json).is_err());
    }

    #[test]
    fn checking_a_token_does_not_use_it() {
        let mut store = TokenStore::new();
        let (id, secret) = store.create(None, Some(1), None, t(0)).expect("create");
        for _ in 0..3 {
            assert_eq!(store.check(&secret, "vm-1", t(1)), Ok(id.clone()));
        }
        assert_eq!(store.get(&id).unwrap().uses_left, Some(1));
        store.redeem(&secret, "vm-1", t(1)).unwrap();
        assert_eq!(
            store.check(&secret, "vm-1", t(1)),
            Err(TokenError::Exhausted { id })
        );
        assert_eq!(
            store.check(&Secret::new("vmbt_nope"), "vm-1", t(1)),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn create_and_redeem() {
        let mut store = TokenStore::new();
        let (id, secret) = store.create(None, None, None, t(0)).expect("create");
        assert!(secret.expose().starts_with(SECRET_PREFIX));
        assert_eq!(
            secret.expose().len(),
            SECRET_PREFIX.len() + 2 * SECRET_BYTES
        );
        let info = store.redeem(&secret, "vm-1", t(10)).expect("redeem");
        assert_eq!(info.id, id);
        assert_eq!(info.uses_left, None);
        // Unlimited uses: redeem again from another node.
        store.redeem(&secret, "vm-2", t(20)).expect("redeem again");
        let (_, other) = store.create(None, None, None, t(0)).expect("create");
        assert_ne!(other, secret);
    }

    #[test]
    fn uses_are_counted_down_then_exhausted() {
        let mut store = TokenStore::new();
        let (id, secret) = store.create(None, Some(2), None, t(0)).expect("create");
        assert_eq!(
            store.redeem(&secret, "a", t(1)).expect("1").uses_left,
            Some(1)
        );
        assert_eq!(
            store.redeem(&secret, "b", t(2)).expect("2").uses_left,
            Some(0)
        );
        let err = store.redeem(&secret, "c", t(3)).expect_err("exhausted");
        assert_eq!(err, TokenError::Exhausted { id: id.clone() });
        assert!(err.to_string().contains("no uses left"));
        assert_eq!(store.get(&id).expect("info").uses_left, Some(0));
        assert_eq!(
            store.create(None, Some(0), None, t(0)),
            Err(TokenError::ZeroUses)
        );
    }

    #[test]
    fn expired() {
        let mut store = TokenStore::new();
        let (id, secret) = store
            .create(Some(Duration::from_secs(60)), None, None, t(0))
            .expect("create");
        store.redeem(&secret, "a", t(59)).expect("before expiry");
        let err = store.redeem(&secret, "a", t(60)).expect_err("expired");
        assert!(matches!(err, TokenError::Expired { id: ref e, .. } if *e == id));
        assert!(err.to_string().contains("expired"));
        assert_eq!(
            store.create(Some(Duration::ZERO), None, None, t(0)),
            Err(TokenError::ZeroTtl)
        );
    }

    #[test]
    fn revoked() {
        let mut store = TokenStore::new();
        let (id, secret) = store.create(None, Some(5), None, t(0)).expect("create");
        store.revoke(&id).expect("revoke");
        let err = store.redeem(&secret, "a", t(1)).expect_err("revoked");
        assert_eq!(err, TokenError::Revoked { id: id.clone() });
        assert!(err.to_string().contains("revoked"));
        assert!(store.list()[0].revoked);
        let missing = TokenId::new("nope");
        assert_eq!(
            store.revoke(&missing),
            Err(TokenError::NotFound {
                id: missing.clone()
            })
        );
        store.remove(&id).expect("remove");
        assert_eq!(store.redeem(&secret, "a", t(1)), Err(TokenError::Unknown));
    }

    #[test]
    fn bound_to_node() {
        let mut store = TokenStore::new();
        let (id, secret) = store
            .create(None, Some(1), Some("vm-1".into()), t(0))
            .expect("create");
        let err = store.redeem(&secret, "vm-2", t(1)).expect_err("wrong node");
        assert_eq!(
            err,
            TokenError::WrongNode {
                id: id.clone(),
                bound: "vm-1".into(),
                node: "vm-2".into()
            }
        );
        // A refused attempt does not use the token up.
        assert_eq!(store.get(&id).expect("info").uses_left, Some(1));
        store.redeem(&secret, "vm-1", t(2)).expect("right node");
    }

    #[test]
    fn wrong_secret() {
        let mut store = TokenStore::new();
        let (_, secret) = store.create(None, None, None, t(0)).expect("create");
        let mut wrong = secret.expose().to_owned();
        let last = wrong.pop().expect("char");
        wrong.push(if last == '0' { '1' } else { '0' });
        let err = store
            .redeem(&Secret::new(wrong.clone()), "a", t(1))
            .expect_err("wrong");
        assert_eq!(err, TokenError::Unknown);
        assert!(!err.to_string().contains(&wrong));
        assert_eq!(
            store.redeem(&Secret::new(""), "a", t(1)),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn errors_never_echo_the_secret() {
        let mut store = TokenStore::new();
        let (id, secret) = store
            .create(
                Some(Duration::from_secs(5)),
                Some(1),
                Some("n".into()),
                t(0),
            )
            .expect("create");
        let mut errors = vec![
            store.redeem(&secret, "other", t(1)).expect_err("node"),
            store.redeem(&secret, "n", t(10)).expect_err("expired"),
        ];
        store.revoke(&id).expect("revoke");
        errors.push(store.redeem(&secret, "n", t(1)).expect_err("revoked"));
        for e in errors {
            assert!(!e.to_string().contains(secret.expose()), "{e}");
            assert!(!format!("{e:?}").contains(secret.expose()), "{e:?}");
        }
    }

    #[test]
    fn json_round_trip_without_secrets() {
        let mut store = TokenStore::new();
        let (a, secret_a) = store
            .create(
                Some(Duration::from_secs(3600)),
                Some(3),
                Some("vm-1".into()),
                t(0),
            )
            .expect("create");
        let (b, secret_b) = store.create(None, None, None, t(5)).expect("create");
        store.revoke(&b).expect("revoke");
        let json = store.to_json();
        assert!(!json.contains(secret_a.expose()));
        assert!(!json.contains(secret_b.expose()));
        assert!(!json.contains(&secret_a.expose()[SECRET_PREFIX.len()..]));
        assert!(json.contains("secret_sha256"));
        let mut back = TokenStore::from_json(&json).expect("from json");
        assert_eq!(back, store);
        let ids: Vec<TokenId> = back.list().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![a.clone(), b.clone()]);
        // The reloaded store still redeems by hash.
        assert_eq!(
            back.redeem(&secret_a, "vm-1", t(10))
                .expect("redeem")
                .uses_left,
            Some(2)
        );
        // One record per key (Consul KV), also without secrets.
        let rec = back.record(&a).expect("record").to_json();
        assert!(!rec.contains(secret_a.expose()));
        let rec = TokenRecord::from_json(&rec).expect("record json");
        assert_eq!(TokenStore::from_records([rec]).list().len(), 1);
        assert!(TokenStore::from_json(
            "{\"tokens\":[{\"id\":\"x\",\"created_unix\":1,\"secret_sha256\":\"zz\"}]}"
        )
        .is_err());
        // list() has no hash.
        let listed = serde_json::to_string(&back.list()).expect("json");
        assert!(!listed.contains("sha256"));
    }

    #[test]
    fn secret_is_redacted() {
        let secret = Secret::new("vmbt_supersecret");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(secret.expose(), "vmbt_supersecret");
        let mut store = TokenStore::new();
        let (id, secret) = store.create(None, None, None, t(0)).expect("create");
        let debug = format!("{store:?} {:?}", store.record(&id));
        assert!(!debug.contains(secret.expose()));
        assert!(!debug.contains(&crate::hex(&sha256(secret.expose()))));
    }
}
