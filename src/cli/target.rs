//! `tidemark target`: the master target.

use std::path::PathBuf;

/// Run the target: apply frames in chain order to the replica images.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// The target's config file (target.toml from `tidemark init`).
    #[arg(long)]
    config: PathBuf,
}

/// Run `target`.
pub fn run(a: TargetArgs) -> anyhow::Result<()> {
    let cfg = tidemark::config::TargetConfig::load(&a.config)?;
    super::run_role("target-rt", |sd| tidemark::target::run(cfg, sd))
}
