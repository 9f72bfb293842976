//! vmesh-registry: the relay's records in Consul KV, shared by the controller (which redeems
//! tokens, records agents and watches revocations) and `vmeshctl token` / `vmeshctl agent`.
//!
//! # KV layout (a contract: the controller, vmeshctl, the docs and ACL policies rely on it)
//!
//! | Key | Value |
//! |---|---|
//! | `<prefix>/tokens/<token-id>` | [`TokenRecord`] JSON: id, `created_unix`, `expires_unix`, `uses_left`, `node`, `revoked`, `secret_sha256`. Never the secret. |
//! | `<prefix>/agents/<dc>/<node>` | [`AgentRecord`] JSON: `spiffe_id`, `token_id`, `address`, `serial`, `registered_unix`, `not_after_unix`. Written by the controller at registration and renewal. |
//! | `<prefix>/revoked/<dc>/<node>` | [`Revocation`] JSON: `spiffe_id`, `revoked_unix`, `reason`. |
//!
//! The prefix is the controller's `--consul-prefix` (default `vmesh`).
//!
//! # Concurrency
//!
//! Every read-modify-write is a check-and-set on the ModifyIndex just read, retried (after a short
//! jittered pause) with a fresh read when someone else wrote in between: two agents redeeming one single-use token at
//! the same time never both succeed, and revoking a token never loses a concurrent redemption's
//! count (or the other way round). A token is created with `cas=0`, so it never overwrites one.
//!
//! # Records that do not decode
//!
//! - `list_tokens`, `list_agents`, `list_revocations` and `deny` fail with
//!   [`RegistryError::Corrupt`] naming the first such key: an incomplete deny list or listing
//!   must not look complete.
//! - `revoke_token` fails with `Corrupt` when the token's own record does not decode, and
//!   (after revoking the token) when an agent record does not decode.
//! - `redeem` skips records that do not decode (logging their keys): one bad key must not block
//!   every registration. A skipped token cannot be redeemed.
//!
//! Errors never contain a secret or a hash.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use vmesh_consul::{Client, ConsulError, KvEntry, WriteOptions};
use vmesh_layout::{unix_secs, Layout};
use vmesh_retry::Backoff;
use vmesh_tls::tokens::{
    Registrant, Secret, TokenError, TokenId, TokenInfo, TokenRecord, TokenStore,
};
use vmesh_tls::{DenyList, Principal, SpiffeId};

/// How many times a check-and-set write is retried after someone else wrote the key first.
/// Each failed attempt means another writer succeeded, so this bounds contention, not time.
const CAS_ATTEMPTS: usize = 16;

/// The pause after losing a check-and-set race: short and jittered (the one retry policy), so
/// writers that collided spread apart instead of colliding again at once.
fn contention() -> Backoff {
    Backoff::new(Duration::from_millis(2), Duration::from_millis(100))
}

/// Why a registry operation failed. Never contains a secret or a hash.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The token was refused (unknown, revoked, expired, ...) or does not exist.
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// A stored value does not decode (or does not match its key).
    #[error("{key}: invalid record: {message}")]
    Corrupt { key: String, message: String },
    /// A check-and-set write kept losing to other writers.
    #[error("{key} kept changing while it was being updated; try again")]
    Conflict { key: String },
    /// Consul left out keys the ACL token may not read: the answer would be incomplete.
    #[error("listing {prefix}: the ACL token may not read every key under it (Consul filtered the answer); it needs key_prefix \"{prefix}\" read")]
    Incomplete { prefix: String },
    /// An operation on agents was given a workload's identity.
    #[error("{id} is not an agent identity (spiffe://<trust-domain>/dc/<dc>/agent/<node>)")]
    NotAnAgent { id: String },
    /// A registration record was asked for an identity that registers nowhere (a workload's).
    #[error("{id} is neither an agent nor a gateway identity")]
    NotRegistered { id: String },
}

/// A registered agent (`<prefix>/agents/<dc>/<node>`) or edge gateway
/// (`<prefix>/gateways/<dc>/<proxy>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// `spiffe://<trust-domain>/dc/<dc>/agent/<node>` or `.../gateway/<proxy>`
    pub spiffe_id: SpiffeId,
    /// The bootstrap token it registered with (revoking the token revokes the agent).
    pub token_id: TokenId,
    /// The address it registered from, e.g. `10.0.0.7`.
    pub address: String,
    /// Serial of its current certificate, e.g. `3f:0a:..`.
    pub serial: String,
    pub registered_unix: u64,
    /// When its current certificate expires.
    pub not_after_unix: u64,
}

impl AgentRecord {
    pub fn node(&self) -> &str {
        self.spiffe_id.agent_node().unwrap_or_default()
    }

    pub fn dc(&self) -> &str {
        self.spiffe_id.dc()
    }
}

/// A revoked agent: `<prefix>/revoked/<dc>/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub spiffe_id: SpiffeId,
    pub revoked_unix: u64,
    #[serde(default)]
    pub reason: String,
}

/// What a token's state is at a given time, as `vmeshctl token list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    Active,
    Expired,
    Exhausted,
    Revoked,
}

impl TokenState {
    /// Revoked first, then expired, then exhausted (the order `redeem` checks them in).
    pub fn of(info: &TokenInfo, now: SystemTime) -> Self {
        if info.revoked {
            TokenState::Revoked
        } else if info.expires.is_some_and(|e| now >= e) {
            TokenState::Expired
        } else if info.uses_left == Some(0) {
            TokenState::Exhausted
        } else {
            TokenState::Active
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::Exhausted => "exhausted",
            TokenState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The registry under one KV prefix.
#[derive(Debug, Clone)]
pub struct Registry {
    client: Client,
    layout: Layout,
}

impl Registry {
    /// `prefix` is the controller's `--consul-prefix` (a trailing `/` is ignored).
    pub fn new(client: Client, prefix: &str) -> Self {
        Registry {
            client,
            layout: Layout::new(prefix),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Where the records are.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// `<prefix>/tokens/<id>`
    pub fn token_key(&self, id: &TokenId) -> String {
        self.layout.token_key(id.as_str())
    }

    /// `<prefix>/agents/<dc>/<node>`
    pub fn agent_key(&self, id: &SpiffeId) -> Result<String, RegistryError> {
        let (dc, node) = dc_node(id)?;
        Ok(self.layout.agent_key(dc, node))
    }

    /// Where the registration of `id` is recorded: `<prefix>/agents/<dc>/<node>` for an agent,
    /// `<prefix>/gateways/<dc>/<proxy>` for a gateway.
    pub fn registration_key(&self, id: &SpiffeId) -> Result<String, RegistryError> {
        match id.principal() {
            Principal::Agent(node) => Ok(self.layout.agent_key(id.dc(), node)),
            Principal::Gateway(proxy) => Ok(self.layout.gateway_key(id.dc(), proxy)),
            Principal::Service(_) => Err(RegistryError::NotRegistered { id: id.to_string() }),
        }
    }

    /// `<prefix>/revoked/<dc>/<node>`
    pub fn revocation_key(&self, id: &SpiffeId) -> Result<String, RegistryError> {
        let (dc, node) = dc_node(id)?;
        Ok(self.layout.revocation_key(dc, node))
    }

    /// Creates a token and stores its record (never overwriting one). Returns the id and the
    /// secret, which is stored nowhere: show it once.
    pub async fn create_token(
        &self,
        ttl: Option<Duration>,
        uses: Option<u32>,
        node: Option<String>,
        now: SystemTime,
    ) -> Result<(TokenId, Secret), RegistryError> {
        self.store_new_token(|store| store.create(ttl, uses, node.clone(), now))
            .await
    }

    /// Creates a token that registers only the edge gateway `gateway` (see
    /// [`Registry::create_token`]).
    pub async fn create_gateway_token(
        &self,
        ttl: Option<Duration>,
        uses: Option<u32>,
        gateway: String,
        now: SystemTime,
    ) -> Result<(TokenId, Secret), RegistryError> {
        self.store_new_token(|store| store.create_for_gateway(ttl, uses, gateway.clone(), now))
            .await
    }

    async fn store_new_token(
        &self,
        create: impl Fn(&mut TokenStore) -> Result<(TokenId, Secret), TokenError>,
    ) -> Result<(TokenId, Secret), RegistryError> {
        let mut last_key = self.layout.tokens_prefix();
        for _ in 0..CAS_ATTEMPTS {
            let mut store = TokenStore::new();
            let (id, secret) = create(&mut store)?;
            let Some(record) = store.record(&id) else {
                return Err(TokenError::NotFound { id }.into());
            };
            let key = self.token_key(&id);
            // cas=0: only if no token has this id (64 random bits, so practically always).
            if self.put(&key, record.to_json(), Some(0)).await? {
                return Ok((id, secret));
            }
            last_key = key;
        }
        Err(RegistryError::Conflict { key: last_key })
    }

    /// Every token, oldest first; never a secret or hash.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, RegistryError> {
        let mut out = Vec::new();
        for entry in self.list(&self.layout.tokens_prefix()).await? {
            out.push(self.decode_token(&entry)?.info);
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Marks the token revoked (it stays listed, so a later use gets a clear error), then
    /// revokes every registered agent whose record names this token. Returns those agents,
    /// including ones that were already revoked (their revocation is left as it was).
    /// `Token(NotFound)` when there is no such token.
    pub async fn revoke_token(
        &self,
        id: &TokenId,
        now: SystemTime,
    ) -> Result<Vec<SpiffeId>, RegistryError> {
        if !is_valid_token_id(id) {
            return Err(TokenError::NotFound { id: id.clone() }.into());
        }
        let key = self.token_key(id);
        let mut revoked = false;
        let mut backoff = contention();
        for _ in 0..CAS_ATTEMPTS {
            let entry = self
                .client
                .kv_get(&key)
                .await?
                .ok_or_else(|| TokenError::NotFound { id: id.clone() })?;
            let mut record = self.decode_token(&entry)?;
            if record.info.revoked {
                revoked = true;
                break;
            }
            record.info.revoked = true;
            if self
                .put(&key, record.to_json(), Some(entry.modify_index))
                .await?
            {
                revoked = true;
                break;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        if !revoked {
            return Err(RegistryError::Conflict { key });
        }

        let already: DenyList = deny_list(&self.list_revocations().await?);
        let reason = format!("bootstrap token {id} revoked");
        let mut agents = Vec::new();
        for agent in self.list_agents().await? {
            if agent.token_id != *id {
                continue;
            }
            if !already.is_revoked(&agent.spiffe_id, "") {
                self.revoke_agent(&agent.spiffe_id, &reason, now).await?;
            }
            agents.push(agent.spiffe_id);
        }
        Ok(agents)
    }

    /// Redeems a token for `who` (a node's agent or a gateway): reads every token record, checks the secret in constant
    /// time against all of them ([`TokenStore::redeem`]), and writes the counted-down record
    /// back with a check-and-set at the ModifyIndex read. When someone else wrote it first,
    /// reads again and retries. Returns the token's info after the redemption.
    ///
    /// Records that do not decode are skipped (and logged), so one bad key cannot block every
    /// registration.
    pub async fn redeem<'a>(
        &self,
        secret: &Secret,
        who: impl Into<Registrant<'a>> + Copy,
        now: SystemTime,
    ) -> Result<TokenInfo, RegistryError> {
        let folder = self.layout.tokens_prefix();
        let mut backoff = contention();
        for _ in 0..CAS_ATTEMPTS {
            let mut indexes = BTreeMap::new();
            let mut records = Vec::new();
            for entry in self.list(&folder).await? {
                match self.decode_token(&entry) {
                    Ok(record) => {
                        indexes.insert(record.info.id.clone(), entry.modify_index);
                        records.push(record);
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping a bootstrap token record"),
                }
            }
            let mut store = TokenStore::from_records(records);
            let info = store.redeem(secret, who, now)?;
            if info.uses_left.is_none() {
                // Unlimited uses: nothing changed, nothing to write.
                return Ok(info);
            }
            let (Some(record), Some(&index)) = (store.record(&info.id), indexes.get(&info.id))
            else {
                return Err(TokenError::Unknown.into());
            };
            if self
                .put(&self.token_key(&info.id), record.to_json(), Some(index))
                .await?
            {
                return Ok(info);
            }
            tracing::debug!(token = %info.id, "bootstrap token changed while redeeming it; retrying");
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(RegistryError::Conflict {
            key: folder.trim_end_matches('/').to_owned(),
        })
    }

    /// Writes (or overwrites) an agent's record.
    pub async fn record_agent(&self, record: &AgentRecord) -> Result<(), RegistryError> {
        let key = self.registration_key(&record.spiffe_id)?;
        self.put(&key, to_json(record), None).await?;
        Ok(())
    }

    /// One agent's (or gateway's) record, if it registered.
    pub async fn agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, RegistryError> {
        let key = self.registration_key(id)?;
        match self.client.kv_get(&key).await? {
            Some(entry) => Ok(Some(self.decode_registration(&entry)?)),
            None => Ok(None),
        }
    }

    /// Every registered agent, by datacenter and node.
    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        self.list(&self.layout.agents_prefix())
            .await?
            .iter()
            .map(|e| self.decode_registration(e))
            .collect()
    }

    /// Revokes an agent (registered or not): its certificates are refused from then on, and it
    /// cannot register again until [`Registry::allow_agent`]. Revoking again replaces the
    /// reason and time.
    pub async fn revoke_agent(
        &self,
        id: &SpiffeId,
        reason: &str,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        let key = self.revocation_key(id)?;
        let revocation = Revocation {
            spiffe_id: id.clone(),
            revoked_unix: unix_secs(now),
            reason: reason.to_owned(),
        };
        self.put(&key, to_json(&revocation), None).await?;
        Ok(())
    }

    /// Lifts a revocation and forgets the agent's registration. Returns false if it was not
    /// revoked.
    pub async fn allow_agent(&self, id: &SpiffeId) -> Result<bool, RegistryError> {
        let key = self.revocation_key(id)?;
        let mut backoff = contention();
        for _ in 0..CAS_ATTEMPTS {
            let Some(entry) = self.client.kv_get(&key).await? else {
                return Ok(false);
            };
            if self
                .client
                .kv_delete(&key, Some(entry.modify_index))
                .await?
            {
                // The old registration goes too, so the node can register again with a new
                // bootstrap token (the relay refuses to register over a live registration).
                self.client.kv_delete(&self.agent_key(id)?, None).await?;
                return Ok(true);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(RegistryError::Conflict { key })
    }

    /// Every revocation, by datacenter and node.
    pub async fn list_revocations(&self) -> Result<Vec<Revocation>, RegistryError> {
        self.list(&self.layout.revoked_prefix())
            .await?
            .iter()
            .map(|e| self.decode_revocation(e))
            .collect()
    }

    /// The deny list as it is now (the controller reads it once at start; after that it
    /// watches `<prefix>/revoked/`).
    pub async fn deny(&self) -> Result<DenyList, RegistryError> {
        Ok(deny_list(&self.list_revocations().await?))
    }

    async fn list(&self, folder: &str) -> Result<Vec<KvEntry>, RegistryError> {
        let read = self.client.kv_list(folder, None, Duration::ZERO).await?;
        if read.filtered_by_acls {
            return Err(RegistryError::Incomplete {
                prefix: folder.to_owned(),
            });
        }
        let mut entries: Vec<KvEntry> = read
            .value
            .into_iter()
            .filter(|e| !e.key.ends_with('/'))
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn put(&self, key: &str, value: String, cas: Option<u64>) -> Result<bool, RegistryError> {
        let options = WriteOptions {
            cas,
            ..WriteOptions::default()
        };
        Ok(self
            .client
            .kv_put(key, value.into_bytes(), &options)
            .await?)
    }
}

/// The deny list of these revocations (by identity).
pub fn deny_list(revocations: &[Revocation]) -> DenyList {
    let mut deny = DenyList::new();
    for r in revocations {
        deny.deny_id(r.spiffe_id.clone());
    }
    deny
}

/// Token ids are generated hex; anything else (`..`, `/`) cannot name one and must not be
/// turned into a key.
fn is_valid_token_id(id: &TokenId) -> bool {
    let s = id.as_str();
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `<dc>/<node>` of an agent identity.
fn dc_node(id: &SpiffeId) -> Result<(&str, &str), RegistryError> {
    let node = id
        .agent_node()
        .ok_or_else(|| RegistryError::NotAnAgent { id: id.to_string() })?;
    Ok((id.dc(), node))
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn corrupt(entry: &KvEntry, message: impl Into<String>) -> RegistryError {
    RegistryError::Corrupt {
        key: entry.key.clone(),
        message: message.into(),
    }
}

fn utf8(entry: &KvEntry) -> Result<&str, RegistryError> {
    std::str::from_utf8(&entry.value).map_err(|_| corrupt(entry, "the value is not UTF-8"))
}

impl Registry {
    /// A token record, checked against its key.
    pub fn decode_token(&self, entry: &KvEntry) -> Result<TokenRecord, RegistryError> {
        let record = TokenRecord::from_json(utf8(entry)?).map_err(|e| match e {
            TokenError::Decode(m) => corrupt(entry, m),
            other => corrupt(entry, other.to_string()),
        })?;
        if self.layout.parse_token_key(&entry.key) != Some(record.info.id.as_str()) {
            return Err(corrupt(
                entry,
                format!("the record is for token {:?}", record.info.id.as_str()),
            ));
        }
        Ok(record)
    }

    /// A record of an agent, checked against its key (`key_of` builds the key its identity
    /// belongs under).
    fn decode_keyed<T: serde::de::DeserializeOwned>(
        &self,
        entry: &KvEntry,
        id: impl Fn(&T) -> &SpiffeId,
        key_of: impl Fn(&Self, &SpiffeId) -> Result<String, RegistryError>,
    ) -> Result<T, RegistryError> {
        let value: T =
            serde_json::from_str(utf8(entry)?).map_err(|e| corrupt(entry, e.to_string()))?;
        let spiffe_id = id(&value);
        match key_of(self, spiffe_id) {
            Ok(key) if key == entry.key => Ok(value),
            Ok(key) => Err(corrupt(
                entry,
                format!("the record is for {spiffe_id}, which belongs under {key}"),
            )),
            Err(e) => Err(corrupt(entry, e.to_string())),
        }
    }

    /// A registration record (an agent's or a gateway's), checked against its key.
    pub fn decode_registration(&self, entry: &KvEntry) -> Result<AgentRecord, RegistryError> {
        self.decode_keyed(
            entry,
            |a: &AgentRecord| &a.spiffe_id,
            Self::registration_key,
        )
    }

    /// A revocation record, checked against its key.
    pub fn decode_revocation(&self, entry: &KvEntry) -> Result<Revocation, RegistryError> {
        self.decode_keyed(entry, |r: &Revocation| &r.spiffe_id, Self::revocation_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn info(revoked: bool, expires: Option<u64>, uses_left: Option<u32>) -> TokenInfo {
        TokenInfo {
            id: TokenId::new("ab"),
            created: UNIX_EPOCH,
            expires: expires.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            uses_left,
            node: None,
            gateway: None,
            revoked,
        }
    }

    #[test]
    fn token_state_follows_redeem_order() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(
            TokenState::of(&info(false, None, None), now),
            TokenState::Active
        );
        assert_eq!(
            TokenState::of(&info(false, Some(101), Some(1)), now),
            TokenState::Active
        );
        assert_eq!(
            TokenState::of(&info(false, Some(100), Some(0)), now),
            TokenState::Expired
        );
        assert_eq!(
            TokenState::of(&info(false, None, Some(0)), now),
            TokenState::Exhausted
        );
        assert_eq!(
            TokenState::of(&info(true, Some(1), Some(0)), now),
            TokenState::Revoked
        );
        assert_eq!(TokenState::Exhausted.to_string(), "exhausted");
    }

    #[test]
    fn token_ids_that_could_escape_the_folder_are_refused() {
        assert!(is_valid_token_id(&TokenId::new("0123456789abcdef")));
        for bad in ["", "..", "a/b", "../agents/dc1/x", "a b", "a?b"] {
            assert!(!is_valid_token_id(&TokenId::new(bad)), "{bad:?}");
        }
    }

    #[test]
    fn records_must_match_their_keys() {
        let id = SpiffeId::agent("vmesh", "dc1", "vm-1").expect("id");
        let revocation = Revocation {
            spiffe_id: id.clone(),
            revoked_unix: 5,
            reason: "lost".into(),
        };
        let entry = |key: &str, value: Vec<u8>| KvEntry {
            key: key.into(),
            value,
            create_index: 1,
            modify_index: 1,
            lock_index: 0,
            flags: 0,
            session: None,
        };
        let json = to_json(&revocation).into_bytes();
        let client = Client::new(&vmesh_consul::ConsulConfig {
            address: "http://127.0.0.1:1".into(),
            ..Default::default()
        })
        .expect("client");
        let reg = Registry::new(client, "vmesh");
        assert_eq!(
            reg.decode_revocation(&entry("vmesh/revoked/dc1/vm-1", json.clone()))
                .expect("decodes"),
            revocation
        );
        let err = reg
            .decode_revocation(&entry("vmesh/revoked/dc1/vm-2", json))
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::Corrupt { key, .. } if key == "vmesh/revoked/dc1/vm-2"),
            "{err}"
        );
        let err = reg
            .decode_revocation(&entry("vmesh/revoked/dc1/x", b"{".to_vec()))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("vmesh/revoked/dc1/x: invalid record"),
            "{err}"
        );
        let service = SpiffeId::service("vmesh", "dc1", "web").expect("id");
        assert!(matches!(
            dc_node(&service),
            Err(RegistryError::NotAnAgent { .. })
        ));
    }
}
