//! `vmesh-agent`: see the crate documentation of `vmesh_agent`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = vmesh_agent::Args::parse();
    if let Err(e) = args.logging.init() {
        eprintln!("vmesh-agent: {e:#}");
        return ExitCode::FAILURE;
    }
    // One thread: the agent moves a few small messages; this keeps it to a few MB and idle CPU.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmesh-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vmesh_agent::run(args, vmesh_runtime::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
