//! `vmeshctl token`: bootstrap tokens in Consul KV (`<prefix>/tokens/<id>`, hashes only).
//! Also what `vmeshctl agent` shares with it: the connection to the registry and how its
//! errors map to exit codes.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use vmesh_consul::Client;
use vmesh_layout::unix_secs;
use vmesh_registry::{Registry, RegistryError, TokenState};
use vmesh_tls::tokens::{TokenError, TokenId, TokenInfo};

use crate::consul::{ConsulArgs, Failure};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a bootstrap token and print its secret, once.
    Create(CreateArgs),
    /// List bootstrap tokens (never their secrets).
    List(ListArgs),
    /// Revoke a bootstrap token, and every agent that registered with it.
    Revoke(RevokeArgs),
}

/// A token lifetime: a humantime duration (`24h`, `30m`, `7d`), or `never`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttl(pub Option<Duration>);

pub fn parse_ttl(s: &str) -> Result<Ttl, String> {
    if s.eq_ignore_ascii_case("never") {
        return Ok(Ttl(None));
    }
    let d = humantime::parse_duration(s).map_err(|e| {
        format!("invalid TTL {s:?}: {e} (expected a duration such as 24h, 30m or 7d, or \"never\")")
    })?;
    if d.is_zero() {
        return Err(
            "a TTL of 0 would create a token that is already expired; give a duration such as 24h, or \"never\""
                .to_string(),
        );
    }
    Ok(Ttl(Some(d)))
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// How long the token may be redeemed: a duration (24h, 30m, 7d) or "never".
    #[arg(long, value_parser = parse_ttl, default_value = "24h")]
    pub ttl: Ttl,
    /// How many agents (or gateway instances) may register with it [default: unlimited].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: Option<u32>,
    /// Only the agent of this node may redeem it.
    #[arg(long, conflicts_with = "gateway")]
    pub node: Option<String>,
    /// A token for the edge gateway whose Envoy has this proxy id (node id), for
    /// `vmesh-agent --gateway` to get the client certificate the controller's xDS port asks for.
    /// It registers nothing else; an agent's token registers no gateway.
    #[arg(long)]
    pub gateway: Option<String>,
    /// text: the secret alone on standard output (details on standard error); json: one object.
    #[arg(long, short = 'o', visible_alias = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

/// `token list` and `agent list`: where and how to print.
#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long, short = 'o', visible_alias = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The token's id, as `token list` shows it.
    pub id: String,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

/// The registry under the prefix, and a runtime to drive its calls.
pub struct Conn {
    runtime: tokio::runtime::Runtime,
    pub registry: Registry,
}

impl Conn {
    pub fn new(args: &ConsulArgs) -> anyhow::Result<Self> {
        let config = args.config()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        // The client's connector spawns onto the runtime it is built in.
        let client = runtime.block_on(async { Client::new(&config) })?;
        Ok(Conn {
            runtime,
            registry: Registry::new(client, &args.prefix),
        })
    }

    /// Runs one registry call; its error mapped to vmeshctl's exit codes.
    pub fn run<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RegistryError>>,
    ) -> anyhow::Result<T> {
        self.runtime.block_on(call).map_err(failure)
    }
}

/// A registry error as vmeshctl reports it: a missing token exits 3, a conflict 4.
pub fn failure(e: RegistryError) -> anyhow::Error {
    match e {
        RegistryError::Token(TokenError::NotFound { id }) => {
            Failure::NotFound(format!("no bootstrap token with id {id}")).into()
        }
        RegistryError::Conflict { .. } => Failure::Conflict(format!("conflict: {e}")).into(),
        other => other.into(),
    }
}

pub fn run(args: &TokenArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        TokenCommand::Create(a) => create(a),
        TokenCommand::List(a) => list(a),
        TokenCommand::Revoke(a) => revoke(a),
    }
}

const AGENT_HAND_TO: &str =
    "the agent as\nVMESH_AGENT_TOKEN=<secret>, or in a file: vmesh-agent --token-file <file>";

/// `vmeshctl token create --format json`
#[derive(Serialize)]
struct Created<'a> {
    id: &'a TokenId,
    secret: &'a str,
    expires_unix: Option<u64>,
    uses: Option<u32>,
    node: Option<&'a str>,
    gateway: Option<&'a str>,
}

fn create(args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let conn = Conn::new(&args.consul)?;
    let now = SystemTime::now();
    let (id, secret) = match &args.gateway {
        Some(gateway) => conn.run(conn.registry.create_gateway_token(
            args.ttl.0,
            args.uses,
            gateway.clone(),
            now,
        ))?,
        None => {
            conn.run(
                conn.registry
                    .create_token(args.ttl.0, args.uses, args.node.clone(), now),
            )?
        }
    };
    // As the record has it: whole seconds.
    let expires_unix = args
        .ttl
        .0
        .map(|ttl| unix_secs(now).saturating_add(ttl.as_secs()));
    match args.format {
        Format::Json => {
            let created = Created {
                id: &id,
                secret: secret.expose(),
                expires_unix,
                uses: args.uses,
                node: args.node.as_deref(),
                gateway: args.gateway.as_deref(),
            };
            println!("{}", serde_json::to_string_pretty(&created)?);
        }
        Format::Text => {
            println!("{}", secret.expose());
            let (registers, hand_to) = match (&args.gateway, &args.node) {
                (Some(g), _) => (
                    format!("gateway {g} only"),
                    format!(
                        "the gateway's agent as\nVMESH_AGENT_TOKEN=<secret>, or in a file: \
                         vmesh-agent --gateway {g} --token-file <file>"
                    ),
                ),
                (None, Some(n)) => (
                    format!("the agent of node {n} only"),
                    AGENT_HAND_TO.to_string(),
                ),
                (None, None) => ("agents on any node".to_string(), AGENT_HAND_TO.to_string()),
            };
            eprintln!(
                "Created bootstrap token {id}: expires {}, {}, registers {registers}.\n\
                 The secret above is shown only this once. Give it to {hand_to}.",
                expires_unix.map_or("never".to_string(), |s| {
                    time(UNIX_EPOCH + Duration::from_secs(s))
                }),
                args.uses
                    .map_or("unlimited uses".to_string(), |n| format!("{n} use(s)")),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One row of `vmeshctl token list --format json`.
#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    info: &'a TokenInfo,
    state: TokenState,
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let conn = Conn::new(&args.consul)?;
    let tokens = conn.run(conn.registry.list_tokens())?;
    let now = SystemTime::now();
    match args.format {
        Format::Json => {
            let rows: Vec<Listed<'_>> = tokens
                .iter()
                .map(|info| Listed {
                    info,
                    state: TokenState::of(info, now),
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Format::Text if tokens.is_empty() => eprintln!("no bootstrap tokens"),
        Format::Text => print!("{}", token_table(&tokens, now)),
    }
    Ok(ExitCode::SUCCESS)
}

/// What a token registers, in a word or two.
fn registers(t: &TokenInfo) -> String {
    match (&t.gateway, &t.node) {
        (Some(g), _) => format!("gateway {g}"),
        (None, Some(n)) => format!("agent {n}"),
        (None, None) => "any agent".to_string(),
    }
}

/// The `token list` table: id, created, expires, uses left, what it registers, state.
pub fn token_table(tokens: &[TokenInfo], now: SystemTime) -> String {
    let mut rows = vec![header(&[
        "ID",
        "CREATED",
        "EXPIRES",
        "USES LEFT",
        "REGISTERS",
        "STATE",
    ])];
    for t in tokens {
        rows.push(vec![
            t.id.to_string(),
            time(t.created),
            t.expires.map_or("never".to_string(), time),
            t.uses_left
                .map_or("unlimited".to_string(), |n| n.to_string()),
            registers(t),
            TokenState::of(t, now).to_string(),
        ]);
    }
    table(&rows)
}

fn revoke(args: &RevokeArgs) -> anyhow::Result<ExitCode> {
    let conn = Conn::new(&args.consul)?;
    let id = TokenId::new(args.id.clone());
    let agents = conn.run(conn.registry.revoke_token(&id, SystemTime::now()))?;
    println!("bootstrap token {id} revoked");
    for agent in agents {
        println!("agent {agent} revoked");
    }
    Ok(ExitCode::SUCCESS)
}

/// A time as RFC 3339 (UTC, whole seconds).
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_string()).collect()
}

/// Left-aligned columns two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_a_duration_or_never_but_not_zero() {
        assert_eq!(
            parse_ttl("24h"),
            Ok(Ttl(Some(Duration::from_secs(24 * 3600))))
        );
        assert_eq!(parse_ttl("never"), Ok(Ttl(None)));
        let e = parse_ttl("0").unwrap_err();
        assert!(e.contains("already expired"), "{e}");
        let e = parse_ttl("0s").unwrap_err();
        assert!(e.contains("already expired"), "{e}");
        let e = parse_ttl("soon").unwrap_err();
        assert!(e.contains("invalid TTL \"soon\""), "{e}");
    }

    #[test]
    fn the_table_shows_state_and_defaults() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let tokens = [
            TokenInfo {
                id: TokenId::new("aaaa"),
                created: at(0),
                expires: None,
                uses_left: None,
                node: None,
                gateway: None,
                revoked: false,
            },
            TokenInfo {
                id: TokenId::new("bbbb"),
                created: at(0),
                expires: Some(at(60)),
                uses_left: Some(1),
                node: Some("vm-1".into()),
                gateway: None,
                revoked: false,
            },
            TokenInfo {
                id: TokenId::new("cccc"),
                created: at(0),
                expires: None,
                uses_left: Some(2),
                node: None,
                gateway: Some("edge".into()),
                revoked: false,
            },
        ];
        let out = token_table(&tokens, at(60));
        assert_eq!(
            out,
            "\
ID    CREATED               EXPIRES               USES LEFT  REGISTERS     STATE
aaaa  1970-01-01T00:00:00Z  never                 unlimited  any agent     active
bbbb  1970-01-01T00:00:00Z  1970-01-01T00:01:00Z  1          agent vm-1    expired
cccc  1970-01-01T00:00:00Z  never                 2          gateway edge  active
"
        );
    }
}
