#![allow(clippy::unwrap_used)]
//! The watch driver against the test kit's Consul emulator: what every KV watch in vmesh sees.

use std::time::Duration;

use vmesh_consul::{Client, ConsulConfig, KvWatcher, WatchConfig, WatchError, WatchEvent};
use vmesh_testkit::consul::{
    AclConfig, AclRules, AclToken, ConsulEmulator, ConsulOptions, KeyPolicy,
};

fn client(consul: &ConsulEmulator, token: Option<&str>) -> Client {
    Client::new(&ConsulConfig {
        address: consul.url(),
        token: token.map(str::to_owned),
        ..ConsulConfig::default()
    })
    .unwrap()
}

fn quick() -> WatchConfig {
    WatchConfig {
        wait: Duration::from_secs(5),
        quiet_pause: Duration::from_millis(10),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
    }
}

fn keys(events: &[WatchEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Upsert(e) => format!("+{}", e.key),
            WatchEvent::Delete(k) => format!("-{k}"),
        })
        .collect()
}

async fn next(w: &mut KvWatcher) -> Vec<String> {
    let changes = tokio::time::timeout(Duration::from_secs(10), w.changed())
        .await
        .expect("a change within 10 s")
        .expect("a successful read");
    keys(&changes.events)
}

#[tokio::test]
async fn a_prefix_watch_reports_everything_once_then_only_what_changed() {
    let consul = ConsulEmulator::start();
    consul.kv_put("p/a", "1");
    consul.kv_put("other/x", "1");
    let mut w = KvWatcher::prefix(client(&consul, None), "p/", quick());
    let first = w.changed().await.unwrap();
    assert!(first.first);
    assert_eq!(keys(&first.events), ["+p/a"]);

    // A write elsewhere wakes the blocking read; it is not a change here, so the watch reads
    // again and reports the next write under the prefix alone.
    let writes = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        consul.kv_put("other/x", "2");
        tokio::time::sleep(Duration::from_millis(50)).await;
        consul.kv_put("p/b", "2");
    };
    let (changed, ()) = tokio::join!(next(&mut w), writes);
    assert_eq!(changed, ["+p/b"]);
    consul.kv_delete("p/a");
    assert_eq!(next(&mut w).await, ["-p/a"]);
}

#[tokio::test]
async fn a_key_watch_sees_the_key_come_and_go() {
    let consul = ConsulEmulator::start();
    consul.kv_put("p/leader-other", "x");
    let mut w = KvWatcher::key(client(&consul, None), "p/leader", quick());
    let first = w.changed().await.unwrap();
    assert!(
        first.events.is_empty(),
        "no key yet: {:?}",
        keys(&first.events)
    );
    consul.kv_put("p/leader", "me");
    assert_eq!(next(&mut w).await, ["+p/leader"]);
    consul.kv_delete("p/leader");
    assert_eq!(next(&mut w).await, ["-p/leader"]);
}

#[tokio::test]
async fn an_outage_is_an_error_and_recovery_reports_only_real_changes() {
    let consul = ConsulEmulator::start();
    consul.kv_put("p/a", "1");
    let mut w = KvWatcher::prefix(client(&consul, None), "p/", quick());
    w.changed().await.unwrap();
    consul.set_failing(true);
    consul.kv_put("p/b", "1");
    let err = tokio::time::timeout(Duration::from_secs(10), w.changed())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, WatchError::Consul(_)), "{err}");
    assert_eq!(w.failures(), 1);
    consul.set_failing(false);
    let back = w.changed().await.unwrap();
    assert!(back.recovered);
    assert_eq!(keys(&back.events), ["+p/b"], "only what changed meanwhile");
    assert_eq!(w.failures(), 0);
}

#[tokio::test]
async fn an_index_reset_reads_afresh_and_still_compares_content() {
    let consul = ConsulEmulator::start();
    consul.kv_put("p/a", "1");
    let mut w = KvWatcher::prefix(client(&consul, None), "p/", quick());
    w.changed().await.unwrap();
    // A snapshot restore: the index goes back; the content is the same, so nothing changed,
    // and the watch goes on blocking on the new index.
    consul.restore_index_to(1);
    consul.kv_put("p/c", "1");
    assert_eq!(next(&mut w).await, ["+p/c"]);
}

#[tokio::test]
async fn an_acl_filtered_answer_deletes_nothing() {
    let consul = ConsulEmulator::start_with(ConsulOptions {
        acl: Some(AclConfig::default().with_token(AclToken::new(
            "reader",
            AclRules::default().key_prefix("p/a", KeyPolicy::Read),
        ))),
        ..Default::default()
    });
    consul.kv_put("p/a", "1");
    consul.kv_put("p/b", "1");
    let mut w = KvWatcher::prefix(client(&consul, Some("reader")), "p/", quick());
    let err = w.changed().await.unwrap_err();
    assert!(matches!(err, WatchError::Filtered { .. }), "{err}");
    assert!(
        err.to_string().contains("key_prefix \"p/\" read"),
        "the message names the permission: {err}"
    );
    assert!(w.retry_in() <= Duration::from_millis(20));
}
