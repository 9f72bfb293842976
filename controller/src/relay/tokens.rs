//! Bootstrap tokens, watched in Consul KV (`<prefix>/tokens/`) on the shared watch driver. A
//! registration is checked against this copy before anything reads Consul, so a token that
//! cannot be redeemed (unknown, revoked, expired, used up, bound to another node) costs no
//! Consul read. Redeeming one that can (counting a use down) still reads and writes Consul with
//! a check-and-set: the copy decides only refusals.
//!
//! A token created a moment ago may not be in the copy yet: a secret the copy does not know
//! waits (up to [`NEW_TOKEN_WAIT`]) for the copy to change before it is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use vmesh_registry::Registry;
use vmesh_runtime::{Component, Shutdown};
use vmesh_tls::tokens::{Registrant, Secret, TokenError, TokenStore};

use super::records::WatchedRecords;

/// How long a secret the copy does not know waits for the copy to change.
pub const NEW_TOKEN_WAIT: Duration = Duration::from_secs(1);

/// The copy of the bootstrap tokens; `None` until it was first read.
#[derive(Debug)]
pub struct Tokens {
    current: watch::Sender<Option<Arc<TokenStore>>>,
}

impl Tokens {
    pub fn new() -> Arc<Self> {
        Arc::new(Tokens {
            current: watch::Sender::new(None),
        })
    }

    fn set(&self, store: TokenStore) {
        self.current.send_replace(Some(Arc::new(store)));
    }

    /// Refuses a token the copy says cannot be redeemed for `who` at `now`. Passes it when it
    /// may be (Consul decides) or when the copy has not been read yet.
    pub async fn precheck(
        &self,
        secret: &Secret,
        who: Registrant<'_>,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let mut current = self.current.subscribe();
        let checked = match current.borrow_and_update().as_deref() {
            None => return Ok(()),
            Some(store) => store.check(secret, who, now),
        };
        match checked {
            Ok(_) => Ok(()),
            Err(TokenError::Unknown) => {
                // Perhaps created a moment ago: give the watch a chance to bring it.
                if tokio::time::timeout(NEW_TOKEN_WAIT, current.changed())
                    .await
                    .is_err()
                {
                    return Err(TokenError::Unknown);
                }
                match current.borrow().as_deref() {
                    None => Ok(()),
                    Some(store) => store.check(secret, who, now).map(|_| ()),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Keeps `tokens` up to date with Consul. While Consul cannot be read, the last copy stays.
pub async fn watch(
    registry: Registry,
    tokens: Arc<Tokens>,
    component: Component,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut records = WatchedRecords::new(
        registry.client().clone(),
        registry.layout().tokens_prefix(),
        "bootstrap tokens",
    );
    loop {
        tokio::select! {
            () = records.changed(|e| registry.decode_token(e), &component) => {}
            () = shutdown.requested() => return Ok(()),
        }
        tokens.set(TokenStore::from_records(records.values().cloned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_created_a_moment_ago_passes_once_the_copy_has_it() {
        let tokens = Tokens::new();
        let now = SystemTime::now();
        let unknown = Secret::new("vmbt_unknown");
        // Not read yet: Consul decides.
        assert_eq!(tokens.precheck(&unknown, "vm-1".into(), now).await, Ok(()));

        let mut store = TokenStore::new();
        tokens.set(store.clone());
        let (_, secret) = store.create(None, Some(1), None, now).unwrap();
        // The copy learns of the token while the registration waits.
        let later = {
            let tokens = tokens.clone();
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tokens.set(store);
            })
        };
        assert_eq!(tokens.precheck(&secret, "vm-1".into(), now).await, Ok(()));
        later.await.unwrap();
        // An unknown secret waits for a change that never comes, then is refused.
        assert_eq!(
            tokens.precheck(&unknown, "vm-1".into(), now).await,
            Err(TokenError::Unknown)
        );
        // Known to be used up: refused at once.
        store.redeem(&secret, "vm-1", now).unwrap();
        tokens.set(store);
        assert!(matches!(
            tokens.precheck(&secret, "vm-1".into(), now).await,
            Err(TokenError::Exhausted { .. })
        ));
    }
}
