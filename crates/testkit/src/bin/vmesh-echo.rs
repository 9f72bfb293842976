//! `vmesh-echo`: an HTTP/1.1 upstream that answers every request with 200 and a JSON echo of it
//! (`{"service", "method", "path", "query", "headers", "body"}`) plus `x-served-by: <name>`.
//! Used by the demo and by hand; tests use the in-process `vmesh_testkit::EchoServer`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "vmesh-echo",
    version,
    about = "HTTP echo upstream for vmesh demos and tests"
)]
struct Args {
    /// Service name reported in the body's `service` field and the `x-served-by` header.
    #[arg(long, env = "VMESH_ECHO_NAME", default_value = "echo")]
    name: String,
    /// Address to listen on.
    #[arg(long, env = "VMESH_ECHO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmesh-echo: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().map_or(args.listen, |a| a);
    println!("vmesh-echo {} listening on http://{local}", args.name);
    let router = vmesh_testkit::echo_router(&args.name, Arc::new(AtomicU64::new(0)));
    let served = axum::serve(listener, router).with_graceful_shutdown(shutdown_signal());
    if let Err(e) = served.await {
        eprintln!("vmesh-echo: server error: {e}");
        return ExitCode::FAILURE;
    }
    println!("vmesh-echo {} stopped", args.name);
    ExitCode::SUCCESS
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmesh-echo: cannot install SIGTERM handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
