//! The subcommands of the `tidemark` binary, one module each; each owns its
//! clap arguments and calls into the library.

pub mod agent;
pub mod agent_tag;
pub mod bench;
pub mod init;
pub mod relay;
pub mod resync;
pub mod status;
pub mod target;

use std::future::Future;

use tidemark::util::shutdown::{self, Shutdown};

/// Run `f` on a multi-threaded tokio runtime whose shutdown signal fires on
/// SIGTERM or SIGINT.
pub fn run_role<F, Fut, T, E>(thread_name: &str, f: F) -> anyhow::Result<T>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    if !tidemark::util::malloc::keep_freed_memory() {
        tracing::debug!("allocator tuning not available on this platform");
    }
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(thread_name)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (trigger, sd) = shutdown::channel();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let signals = tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            }
            trigger.fire();
            // A second signal while stopping ends the process at once.
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = std::future::pending::<()>() => {}
            }
            std::process::exit(130);
        });
        let r = f(sd).await;
        signals.abort();
        Ok(r?)
    })
}
