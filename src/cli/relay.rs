//! `tidemark relay`: the process server, and its maintenance command.

use std::path::PathBuf;

use anyhow::Context;

/// Run the relay: spool frames from agents durably, forward them to targets.
/// Or one of its maintenance commands.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RelayArgs {
    #[command(subcommand)]
    cmd: Option<RelayCmd>,
    /// The relay's config file (relay.toml from `tidemark init`).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum RelayCmd {
    /// Drop every spooled frame of a group, with the relay stopped: the
    /// re-seed of a target that lost its own state. The agent then finds the
    /// relay behind what it acknowledged and compares every disk with the
    /// replica by checksum (docs/RESYNC.md, "A target that lost its state").
    ResetGroup(ResetGroupArgs),
}

#[derive(clap::Args)]
struct ResetGroupArgs {
    /// The relay's config file.
    #[arg(long)]
    config: PathBuf,
    /// The group whose frames are dropped.
    #[arg(long)]
    group: String,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Run `relay`.
pub fn run(a: RelayArgs) -> anyhow::Result<()> {
    match a.cmd {
        Some(RelayCmd::ResetGroup(r)) => reset_group(r),
        None => {
            let Some(config) = a.config else {
                anyhow::bail!("tidemark relay needs --config FILE (or a subcommand, see --help)");
            };
            let cfg = tidemark::config::RelayConfig::load(&config)?;
            super::run_role("relay-rt", |sd| tidemark::relay::run(cfg, sd))
        }
    }
}

fn reset_group(a: ResetGroupArgs) -> anyhow::Result<()> {
    let cfg = tidemark::config::RelayConfig::load(&a.config)?;
    let dir = &cfg.relay.spool_dir;
    let r = tidemark::spool::reset_group(dir, &a.group).with_context(|| {
        format!(
            "resetting group {} in the spool {} (stop the relay first)",
            a.group,
            dir.display()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let at = |v: Option<u64>| v.map_or_else(|| "unknown".to_string(), |n| n.to_string());
    println!(
        "group {}: removed {} ({} files, {} bytes; head was frame {}, trimmed through {}).",
        a.group,
        r.dir.display(),
        r.files,
        r.bytes,
        at(r.head_frame_no),
        at(r.trimmed_through)
    );
    println!(
        "Start the relay again: the agent finds it behind what it acknowledged, compares every disk with the replica by checksum and sends only what differs; the target continues from the agent's REBASE frame."
    );
    Ok(())
}
