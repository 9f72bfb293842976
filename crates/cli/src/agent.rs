//! `vmeshctl agent`: registered agents (`<prefix>/agents/<dc>/<node>`) and their revocations
//! (`<prefix>/revoked/<dc>/<node>`), which the controller turns into its deny list.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use serde::Serialize;
use vmesh_registry::{AgentRecord, Revocation};
use vmesh_tls::SpiffeId;

use crate::consul::{ConsulArgs, Failure};
use crate::token::{header, table, time, Conn, Format, ListArgs};

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// List registered and revoked agents.
    List(ListArgs),
    /// Revoke a node's agent: its certificates are refused from now on, and it cannot
    /// register again until `agent allow`.
    Revoke(RevokeArgs),
    /// Lift a node's revocation.
    Allow(AllowArgs),
}

/// Which agent: `spiffe://<trust-domain>/dc/<datacenter>/agent/<node>`.
#[derive(Args, Debug)]
pub struct AgentId {
    /// The node the agent runs on.
    pub node: String,
    /// The agent's datacenter.
    #[arg(long, default_value = "dc1")]
    pub datacenter: String,
    /// The mesh's SPIFFE trust domain (the controller's --trust-domain).
    #[arg(long, env = "VMESH_TRUST_DOMAIN", default_value = "vmesh")]
    pub trust_domain: String,
}

impl AgentId {
    pub fn spiffe_id(&self) -> anyhow::Result<SpiffeId> {
        Ok(SpiffeId::agent(
            &self.trust_domain,
            &self.datacenter,
            &self.node,
        )?)
    }
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub agent: AgentId,
    /// Why (shown by `agent list`).
    #[arg(long, default_value = "revoked with vmeshctl")]
    pub reason: String,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub struct AllowArgs {
    #[command(flatten)]
    pub agent: AgentId,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

pub fn run(args: &AgentArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        AgentCommand::List(a) => list(a),
        AgentCommand::Revoke(a) => revoke(a),
        AgentCommand::Allow(a) => allow(a),
    }
}

/// One agent as `agent list --format json` shows it: registered, revoked, or both.
#[derive(Debug, Serialize)]
pub struct Row {
    pub node: String,
    pub dc: String,
    pub spiffe_id: SpiffeId,
    #[serde(flatten)]
    pub registration: Option<Registration>,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_unix: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Registration {
    pub address: String,
    pub token_id: String,
    pub serial: String,
    pub registered_unix: u64,
    pub not_after_unix: u64,
}

/// Agents and revocations joined by identity, by datacenter and node.
pub fn rows(agents: Vec<AgentRecord>, revocations: Vec<Revocation>) -> Vec<Row> {
    let mut by_id = BTreeMap::new();
    for a in agents {
        entry(&mut by_id, &a.spiffe_id).registration = Some(Registration {
            address: a.address,
            token_id: a.token_id.to_string(),
            serial: a.serial,
            registered_unix: a.registered_unix,
            not_after_unix: a.not_after_unix,
        });
    }
    for r in revocations {
        let row = entry(&mut by_id, &r.spiffe_id);
        row.revoked = true;
        row.revoked_unix = Some(r.revoked_unix);
        row.reason = Some(r.reason);
    }
    by_id.into_values().collect()
}

type RowKey = (String, String, SpiffeId);

fn entry<'a>(rows: &'a mut BTreeMap<RowKey, Row>, id: &SpiffeId) -> &'a mut Row {
    let dc = id.dc().to_string();
    let node = id.agent_node().unwrap_or_default().to_string();
    rows.entry((dc.clone(), node.clone(), id.clone()))
        .or_insert_with(|| Row {
            node,
            dc,
            spiffe_id: id.clone(),
            registration: None,
            revoked: false,
            revoked_unix: None,
            reason: None,
        })
}

/// The `agent list` table: node, dc, address, certificate expiry, token, revoked.
pub fn agent_table(rows: &[Row]) -> String {
    let mut out = vec![header(&[
        "NODE",
        "DC",
        "ADDRESS",
        "CERT EXPIRES",
        "TOKEN",
        "REVOKED",
    ])];
    for r in rows {
        let reg = r.registration.as_ref();
        out.push(vec![
            r.node.clone(),
            r.dc.clone(),
            reg.map_or("-".to_string(), |a| a.address.clone()),
            reg.map_or("-".to_string(), |a| {
                vmesh_layout::from_unix_secs(a.not_after_unix)
                    .map_or_else(|| format!("{} (invalid)", a.not_after_unix), time)
            }),
            reg.map_or("-".to_string(), |a| a.token_id.clone()),
            match &r.reason {
                Some(reason) if r.revoked && !reason.is_empty() => format!("yes ({reason})"),
                _ if r.revoked => "yes".to_string(),
                _ => "no".to_string(),
            },
        ]);
    }
    table(&out)
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let conn = Conn::new(&args.consul)?;
    let agents = conn.run(conn.registry.list_agents())?;
    let revocations = conn.run(conn.registry.list_revocations())?;
    let rows = rows(agents, revocations);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Text if rows.is_empty() => eprintln!("no agents registered or revoked"),
        Format::Text => print!("{}", agent_table(&rows)),
    }
    Ok(ExitCode::SUCCESS)
}

fn revoke(args: &RevokeArgs) -> anyhow::Result<ExitCode> {
    let id = args.agent.spiffe_id()?;
    let conn = Conn::new(&args.consul)?;
    conn.run(
        conn.registry
            .revoke_agent(&id, &args.reason, SystemTime::now()),
    )?;
    println!("agent {id} revoked");
    if conn.run(conn.registry.agent(&id))?.is_none() {
        eprintln!(
            "note: no agent is registered as {id}; it will be refused if it tries to register"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn allow(args: &AllowArgs) -> anyhow::Result<ExitCode> {
    let id = args.agent.spiffe_id()?;
    let conn = Conn::new(&args.consul)?;
    if !conn.run(conn.registry.allow_agent(&id))? {
        return Err(Failure::NotFound(format!("agent {id} is not revoked")).into());
    }
    println!("agent {id} allowed");
    Ok(ExitCode::SUCCESS)
}
