//! The client against the test kit's Vault emulator: logins, renewal, logging in again, KV v2,
//! and no token in anything it prints.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use vmesh_testkit::request;
use vmesh_testkit::vault::VaultEmulator;
use vmesh_vault::{Login, Settings, Token, Vault, VaultError};

fn call(vault: &VaultEmulator, method: &str, path: &str, body: Value) -> Value {
    let r = request(
        method,
        &format!("{}/v1/{path}", vault.url()),
        &[("x-vault-token", vault.root_token())],
        Some(body.to_string().as_bytes()),
    )
    .unwrap();
    assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.body);
    r.json().unwrap_or(Value::Null)
}

fn settings(vault: &VaultEmulator, login: Login) -> Settings {
    Settings {
        address: vault.url(),
        namespace: None,
        login,
        timeout: vmesh_vault::DEFAULT_TIMEOUT,
    }
}

/// The secret `app` (`k = v`) and the policy `app` that reads it.
fn app_secret(vault: &VaultEmulator) {
    call(
        vault,
        "POST",
        "secret/data/app",
        json!({"data": {"k": "v"}}),
    );
    allow_reading(vault, "app");
}

/// The policy `app`: read the KV v2 secret (or secrets, with `*`) at `path`.
fn allow_reading(vault: &VaultEmulator, path: &str) {
    let rules = format!(
        "path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{path}\" {{ capabilities = [\"read\"] }}"
    );
    call(
        vault,
        "PUT",
        "sys/policies/acl/app",
        json!({ "policy": rules }),
    );
}

fn token_with(vault: &VaultEmulator, body: Value) -> String {
    call(vault, "POST", "auth/token/create", body)["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vmesh-vault-client-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_token_reads_a_secret_at_its_current_version() {
    let vault = VaultEmulator::start();
    call(
        &vault,
        "POST",
        "secret/data/vmesh/tls/shop",
        json!({"data": {"cert": "one"}}),
    );
    let client = Vault::connect(settings(
        &vault,
        Login::Token(Token::new(vault.root_token())),
    ))
    .await
    .unwrap();
    let (version, data) = client.kv2_read("secret", "vmesh/tls/shop").await.unwrap();
    assert_eq!((version, data["cert"].as_str()), (1, "one"));
    call(
        &vault,
        "POST",
        "secret/data/vmesh/tls/shop",
        json!({"data": {"cert": "two"}}),
    );
    assert_eq!(
        client
            .kv2_version("secret", "vmesh/tls/shop")
            .await
            .unwrap(),
        2
    );
    let (_, data) = client.kv2_read("secret", "vmesh/tls/shop").await.unwrap();
    assert_eq!(data["cert"], "two");
    assert!(matches!(
        client.kv2_read("secret", "vmesh/tls/none").await,
        Err(VaultError::NotFound(_))
    ));
    assert_eq!(client.renew_in().await, None, "the root token has no TTL");
}

#[tokio::test]
async fn a_renewable_token_is_renewed_and_a_refused_one_read_again_from_its_file() {
    let vault = VaultEmulator::start();
    app_secret(&vault);
    let dir = scratch("file");
    let file = dir.join("token");
    std::fs::write(
        &file,
        format!(
            "{}\n",
            token_with(&vault, json!({"ttl": "3s", "policies": ["app"]}))
        ),
    )
    .unwrap();
    let client = Vault::connect(settings(&vault, Login::TokenFile(file.clone())))
        .await
        .unwrap();
    let first = client.renew_in().await.unwrap();
    assert!(
        first <= Duration::from_secs(2),
        "two thirds of 3 s: {first:?}"
    );
    client.renew_or_login().await.unwrap();
    assert!(client.renew_in().await.unwrap() <= Duration::from_secs(2));

    // A token that cannot be renewed runs out; whatever writes the file puts a new one there,
    // and the client reads it again.
    std::fs::write(
        &file,
        token_with(
            &vault,
            json!({"ttl": "1s", "renewable": false, "policies": ["app"]}),
        ),
    )
    .unwrap();
    let client = Vault::connect(settings(&vault, Login::TokenFile(file.clone())))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(
        client.kv2_read("secret", "app").await,
        Err(VaultError::Denied(_))
    ));
    std::fs::write(
        &file,
        token_with(&vault, json!({"ttl": "1h", "policies": ["app"]})),
    )
    .unwrap();
    client.renew_or_login().await.unwrap();
    assert_eq!(client.kv2_read("secret", "app").await.unwrap().1["k"], "v");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn approle_logs_in_and_logs_in_again_once_its_token_expired() {
    let vault = VaultEmulator::start();
    call(
        &vault,
        "POST",
        "secret/data/app/db",
        json!({"data": {"password": "s"}}),
    );
    allow_reading(&vault, "app/*");
    call(
        &vault,
        "POST",
        "auth/approle/role/vmesh",
        json!({"token_policies": ["app"], "token_ttl": "2s"}),
    );
    let role_id = call(&vault, "GET", "auth/approle/role/vmesh/role-id", json!({}))["data"]
        ["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = call(
        &vault,
        "POST",
        "auth/approle/role/vmesh/secret-id",
        json!({}),
    )["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = scratch("approle");
    std::fs::write(dir.join("secret-id"), &secret_id).unwrap();
    let client = Vault::connect(settings(
        &vault,
        Login::AppRole {
            mount: "approle".into(),
            role_id,
            secret_id_file: dir.join("secret-id"),
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        client.kv2_read("secret", "app/db").await.unwrap().1["password"],
        "s"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        client.kv2_read("secret", "app/db").await.is_err(),
        "the token expired"
    );
    client.renew_or_login().await.unwrap();
    assert_eq!(
        client.kv2_read("secret", "app/db").await.unwrap().1["password"],
        "s"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn no_token_appears_in_what_the_client_prints() {
    let secret = "hvs.recognisable-TOKEN-0f-the-operator";
    let vault = VaultEmulator::start_with_root_token(secret);
    let s = settings(&vault, Login::Token(Token::new(secret)));
    assert!(!format!("{s:?}").contains(secret));
    let client = Vault::connect(s).await.unwrap();
    assert!(!format!("{client:?}").contains(secret));
    let e = client.kv2_read("secret", "missing").await.unwrap_err();
    assert!(!e.to_string().contains(secret), "{e}");

    let wrong = "hvs.recognisable-WRONG-token";
    let e = Vault::connect(settings(&vault, Login::Token(Token::new(wrong))))
        .await
        .unwrap_err();
    assert!(matches!(e, VaultError::Login(_)), "{e}");
    assert!(!e.to_string().contains(wrong), "{e}");
}

#[tokio::test]
async fn maintain_logs_in_late_and_picks_up_a_new_token_file_without_being_asked() {
    let vault = VaultEmulator::start();
    app_secret(&vault);
    let dir = scratch("maintain");
    let file = dir.join("token");
    // No file yet: the client starts anyway and says why it is not logged in.
    let client =
        std::sync::Arc::new(Vault::new(settings(&vault, Login::TokenFile(file.clone()))).unwrap());
    assert!(client.logged_in().await.is_err());
    let maintained = client.clone();
    let task = tokio::spawn(async move { maintained.maintain().await });
    // A token that may not read the secret (the wrong policy), then a good one in its place.
    let first = token_with(&vault, json!({"ttl": "1h", "policies": ["default"]}));
    std::fs::write(&file, &first).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.logged_in().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "never logged in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        client.kv2_read("secret", "app").await,
        Err(VaultError::Denied(_))
    ));
    // A different modification time, whatever the file system's resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(
        &file,
        token_with(&vault, json!({"ttl": "1h", "policies": ["app"]})),
    )
    .unwrap();
    loop {
        if client.kv2_read("secret", "app").await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new token was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
    let _ = std::fs::remove_dir_all(dir);
}
