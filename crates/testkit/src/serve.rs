//! An emulator's HTTP server on a thread of its own, with its own runtime, so that synchronous
//! tests can use it and stop it.

use std::future::IntoFuture;
use std::net::TcpListener;
use std::thread::JoinHandle;

/// A server running on its thread; [`Served::stop`] ends it and every connection.
pub(crate) struct Served {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Served {
    /// Stops serving and waits for the thread: dropping the runtime cancels every connection.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Serves what `app` builds on `listener`, from a thread named `name`. `app` runs inside the
/// server's runtime, so it may spawn the server's background tasks. Panics if the thread or its
/// runtime cannot start.
pub(crate) fn serve_on_thread(
    name: String,
    listener: TcpListener,
    app: impl FnOnce() -> axum::Router + Send + 'static,
) -> Served {
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("{name}: set_nonblocking: {e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread_name = name.clone();
    let thread = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => panic!("{name}: tokio runtime: {e}"),
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => panic!("{name}: listener: {e}"),
                };
                let app = app();
                tokio::select! {
                    res = axum::serve(listener, app).into_future() => {
                        if let Err(e) = res {
                            eprintln!("{name}: server failed: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
            // Dropping the runtime cancels every connection (and blocking query) task.
            drop(rt);
        })
        .unwrap_or_else(|e| panic!("spawn the thread of an emulator: {e}"));
    Served { stop, thread }
}
