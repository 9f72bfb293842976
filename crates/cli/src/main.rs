//! vmeshctl: drives and inspects vmesh.

use std::process::ExitCode;

use clap::Parser;

use vmeshctl::{bootstrap, status, validate};

#[derive(Parser)]
#[command(name = "vmeshctl", version, about = "Drive and inspect vmesh.")]
enum Command {
    /// Print an Envoy bootstrap for a gateway or sidecar proxy.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Show the state of config objects, as the controller judged them.
    Status(status::StatusArgs),
    /// Check config documents offline, without a controller.
    Validate(validate::ValidateArgs),
}

fn main() -> ExitCode {
    let result = match Command::parse() {
        Command::Bootstrap(a) => bootstrap::run(&a),
        Command::Status(a) => status::run(&a),
        Command::Validate(a) => validate::run(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
