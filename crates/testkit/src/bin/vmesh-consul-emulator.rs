//! `vmesh-consul-emulator`: the test kit's Consul HTTP API emulator as a standalone server, for
//! the demo and for manual use (`CONSUL_HTTP_ADDR=http://127.0.0.1:8500 consul kv put …`).
//! Tests use the in-process `vmesh_testkit::consul::ConsulEmulator`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vmesh_testkit::consul::{
    parse_go_duration, serve_standalone, AclConfig, AclRules, AclToken, ConsulOptions,
    DEFAULT_MAX_VALUE_SIZE,
};

#[derive(Parser, Debug)]
#[command(
    name = "vmesh-consul-emulator",
    version,
    about = "Consul HTTP API emulator (KV, blocking queries, sessions, ACLs) for vmesh demos and tests",
    after_help = "\
ACLs are off unless --acl-token or --acl-file is given; then the default policy is deny and a
request without a token gets the anonymous token's rules (--acl-anonymous, none by default).

  --acl-token 'SECRET=PREFIX:POLICY,PREFIX:POLICY,session:write'
      POLICY is read, write or deny; the longest matching key prefix wins; PREFIX may be empty
      ('root=:write,session:write' is a management token). Repeat for more tokens.

  --acl-file tokens.json
      {\"tokens\": [{\"secret\": \"s3cret\", \"accessor\": \"optional-id\",
                    \"keys\": {\"vmesh/\": \"write\"}, \"session_write\": true}],
       \"anonymous\": {\"keys\": {\"vmesh/config/\": \"read\"}}}

Also serves one local agent's view: /v1/agent/self, services, checks, service/register,
service/deregister, check/pass|warn|fail, and the blocking /v1/catalog/node-services/<node> and
/v1/health/node/<node>. Not implemented: the rest of /v1/agent, /v1/catalog and /v1/health,
/v1/txn, /v1/acl/* (see docs/testing-consul.md)."
)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "VMESH_CONSUL_EMULATOR_LISTEN",
        default_value = "127.0.0.1:8500"
    )]
    listen: SocketAddr,
    /// The datacenter name (`?dc=` naming another one gets 500 `No path to datacenter`).
    #[arg(long, default_value = "dc1")]
    datacenter: String,
    /// The agent's node: sessions are created on it, agent services are registered on it.
    #[arg(long, default_value = "vmesh-consul-emulator")]
    node_name: String,
    /// The node's address (`Member.Addr` in /v1/agent/self, `Node.Address` in the catalog).
    #[arg(long, default_value = "127.0.0.1")]
    node_address: std::net::IpAddr,
    /// Consul's `session_ttl_min`: shorter session TTLs are rejected (Go duration).
    #[arg(long, default_value = "10s", value_parser = parse_go_duration)]
    session_ttl_min: Duration,
    /// Consul's `kv_max_value_size` in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_VALUE_SIZE)]
    max_value_size: usize,
    /// An ACL token: `SECRET=PREFIX:POLICY,...[,session:write]` (repeatable; enables ACLs).
    #[arg(long = "acl-token", value_parser = AclConfig::parse_token_spec)]
    acl_tokens: Vec<AclToken>,
    /// Rules for requests without a token: `PREFIX:POLICY,...[,session:write]`.
    #[arg(long)]
    acl_anonymous: Option<String>,
    /// ACL tokens from a JSON file (see below; enables ACLs).
    #[arg(long)]
    acl_file: Option<std::path::PathBuf>,
}

fn rules_from_json(v: &serde_json::Value) -> Result<AclRules, String> {
    let mut rules = AclRules::default();
    if let Some(keys) = v.get("keys") {
        let keys = keys.as_object().ok_or("\"keys\" must be an object")?;
        for (prefix, policy) in keys {
            let policy = policy
                .as_str()
                .ok_or_else(|| format!("policy for {prefix:?} must be a string"))?;
            rules = rules.key_prefix(prefix, policy.parse()?);
        }
    }
    rules.session_write = v
        .get("session_write")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    Ok(rules)
}

fn acl_from_file(path: &std::path::Path) -> Result<AclConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut acl = AclConfig::default();
    for t in v
        .get("tokens")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let secret = t
            .get("secret")
            .and_then(|s| s.as_str())
            .ok_or("every token needs a \"secret\"")?;
        let mut token = AclToken::new(secret, rules_from_json(t)?);
        if let Some(acc) = t.get("accessor").and_then(|s| s.as_str()) {
            token.accessor_id = acc.to_owned();
        }
        acl.tokens.push(token);
    }
    if let Some(anon) = v.get("anonymous") {
        acl.anonymous = rules_from_json(anon)?;
    }
    Ok(acl)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut acl: Option<AclConfig> = None;
    if let Some(path) = &args.acl_file {
        match acl_from_file(path) {
            Ok(a) => acl = Some(a),
            Err(e) => {
                eprintln!("vmesh-consul-emulator: --acl-file: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !args.acl_tokens.is_empty() || args.acl_anonymous.is_some() {
        let acl = acl.get_or_insert_with(AclConfig::default);
        acl.tokens.extend(args.acl_tokens.iter().cloned());
        if let Some(spec) = &args.acl_anonymous {
            match AclConfig::parse_token_spec(&format!("anonymous={spec}")) {
                Ok(t) => acl.anonymous = t.rules,
                Err(e) => {
                    eprintln!("vmesh-consul-emulator: --acl-anonymous: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if let Some(acl) = &acl {
        for t in &acl.tokens {
            println!("ACL token AccessorID {} (secret given)", t.accessor_id);
        }
    }
    let opts = ConsulOptions {
        datacenter: args.datacenter,
        node_name: args.node_name,
        node_address: args.node_address,
        acl,
        session_ttl_min: args.session_ttl_min,
        max_value_size: args.max_value_size,
        listen: Some(args.listen),
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "vmesh-consul-emulator: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().map_or(args.listen, |a| a);
    println!(
        "vmesh-consul-emulator (datacenter {}) listening on http://{local}",
        opts.datacenter
    );
    if let Err(e) = serve_standalone(opts, listener, shutdown_signal()).await {
        eprintln!("vmesh-consul-emulator: server error: {e}");
        return ExitCode::FAILURE;
    }
    println!("vmesh-consul-emulator stopped");
    ExitCode::SUCCESS
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmesh-consul-emulator: cannot install SIGTERM handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
