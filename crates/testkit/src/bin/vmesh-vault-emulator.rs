//! `vmesh-vault-emulator`: the test kit's Vault HTTP API emulator as a standalone server, like
//! `vault server -dev` (KV v2 at `secret/`, PKI at `pki/` with a root CA, AppRole enabled), for
//! demos and manual use (`VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=root vault kv get …`).
//! Tests use the in-process `vmesh_testkit::vault::VaultEmulator`.

use std::net::SocketAddr;

use clap::Parser;
use vmesh_testkit::vault::VaultEmulator;

#[derive(Parser, Debug)]
#[command(
    name = "vmesh-vault-emulator",
    version,
    about = "Vault HTTP API emulator (tokens, HCL policies, KV v2, PKI, AppRole) for vmesh demos and tests",
    after_help = "What it implements and what it does not: docs/testing-vault.md."
)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "VMESH_VAULT_EMULATOR_LISTEN",
        default_value = "127.0.0.1:8200"
    )]
    listen: SocketAddr,
    /// The root token, as `vault server -dev -dev-root-token-id` takes it.
    #[arg(long, env = "VMESH_VAULT_EMULATOR_ROOT_TOKEN", default_value = "root")]
    dev_root_token_id: String,
}

fn main() {
    let args = Args::parse();
    let vault = VaultEmulator::start_on(args.listen, &args.dev_root_token_id);
    eprintln!(
        "vault emulator listening on {} (KV v2 at secret/, PKI at pki/, AppRole enabled)",
        vault.url()
    );
    loop {
        std::thread::park();
    }
}
