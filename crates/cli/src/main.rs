//! vmeshctl: drives and inspects vmesh.

use std::process::ExitCode;

use clap::Parser;

use vmeshctl::{agent, apply, bootstrap, consul, dev_cert, get, status, token, validate};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  invalid input (nothing was applied), or Consul or the controller could not be used
  2  usage error
  3  not found (get, delete, status with a NAME, token revoke, agent allow)
  4  conflict: a key changed in Consul between reading and writing it (apply, delete,
     token, agent)

Consul commands (apply, get, delete, token, agent, and status with --consul or an address) take
--consul-addr (CONSUL_HTTP_ADDR, default 127.0.0.1:8500), --consul-token
(CONSUL_HTTP_TOKEN), --consul-token-file (CONSUL_HTTP_TOKEN_FILE), --consul-cacert
(CONSUL_CACERT), --consul-client-cert/-key (CONSUL_CLIENT_CERT/KEY), --consul-datacenter
(VMESH_CONSUL_DATACENTER) and --prefix (VMESH_CONSUL_PREFIX, default vmesh).";

#[derive(Parser)]
#[command(
    name = "vmeshctl",
    version,
    about = "Drive and inspect vmesh.",
    after_help = EXIT_CODES
)]
enum Command {
    /// Registered agents and their revocations (Consul KV <prefix>/agents/, <prefix>/revoked/).
    #[command(after_help = EXIT_CODES)]
    Agent(agent::AgentArgs),
    /// Validate config documents, then write each object to Consul KV
    /// (<prefix>/config/<Kind>/<name>) with check-and-set.
    #[command(after_help = EXIT_CODES)]
    Apply(apply::ApplyArgs),
    /// Print an Envoy bootstrap for a gateway or sidecar proxy.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Write a development certificate (and the CA that signed it) into a secrets directory:
    /// for demos and tests on one machine, not production.
    DevCert(dev_cert::DevCertArgs),
    /// Delete a config object from Consul KV (the controller then removes its status).
    #[command(after_help = EXIT_CODES)]
    Delete(get::DeleteArgs),
    /// Print a config object stored in Consul KV, or list the objects of a kind.
    #[command(after_help = EXIT_CODES)]
    Get(get::GetArgs),
    /// Show the state of config objects, as the controller judged them: from Consul KV when
    /// a Consul address is given, else from the controller's admin endpoint.
    #[command(after_help = EXIT_CODES)]
    Status(status::StatusArgs),
    /// Bootstrap tokens agents register with (Consul KV <prefix>/tokens/, hashes only).
    #[command(after_help = EXIT_CODES)]
    Token(token::TokenArgs),
    /// Check config documents offline, without a controller.
    Validate(validate::ValidateArgs),
}

fn main() -> ExitCode {
    let result = match Command::parse() {
        Command::Agent(a) => agent::run(&a),
        Command::Apply(a) => apply::run(&a),
        Command::Bootstrap(a) => bootstrap::run(&a),
        Command::DevCert(a) => dev_cert::run(&a),
        Command::Delete(a) => get::run_delete(&a),
        Command::Get(a) => get::run_get(&a),
        Command::Status(a) => status::run(&a),
        Command::Token(a) => token::run(&a),
        Command::Validate(a) => validate::run(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(consul::exit_code(&e))
        }
    }
}
