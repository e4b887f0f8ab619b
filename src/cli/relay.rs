//! `tidemark relay`: the process server.

use std::path::PathBuf;

/// Run the relay: spool frames from agents durably, forward them to targets.
#[derive(clap::Args)]
pub struct RelayArgs {
    /// The relay's config file (relay.toml from `tidemark init`).
    #[arg(long)]
    config: PathBuf,
}

/// Run `relay`.
pub fn run(a: RelayArgs) -> anyhow::Result<()> {
    let cfg = tidemark::config::RelayConfig::load(&a.config)?;
    super::run_role("relay-rt", |sd| tidemark::relay::run(cfg, sd))
}
