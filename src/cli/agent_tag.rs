//! `tidemark agent tag`: record an application-consistent tag in the running
//! agent's stream (see `docs/CAPTURE.md`, "Tags").

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tidemark::agent::control::SOCKET_NAME;
use tidemark::agent::tagcmd::{self, TagOptions};

/// Record a tag: run the pre-hook, freeze the mount points, ask the running
/// agent to record the tag, always thaw, run the post-hook. Prints the tag's
/// seq.
#[derive(clap::Args, Debug)]
pub struct TagArgs {
    /// The running agent's config file (agent.toml).
    #[arg(long)]
    config: PathBuf,
    /// The group to tag (default: the config's only group).
    #[arg(long)]
    group: Option<String>,
    /// Freeze this mounted file system (FIFREEZE) around the tag; repeatable.
    #[arg(long = "freeze", value_name = "MOUNTPOINT")]
    freeze: Vec<PathBuf>,
    /// Longest frozen period, and longest run of each hook, in seconds; past
    /// it the file systems are thawed and the tag fails.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    timeout: f64,
    /// The tag's name: 1 to 128 of A-Z a-z 0-9 . _ : @ + - (not starting with -).
    name: String,
}

/// Run `agent tag`.
pub fn run(a: TagArgs) -> anyhow::Result<()> {
    let cfg = tidemark::config::AgentConfig::load(&a.config)?;
    let group = pick_group(&cfg, a.group.as_deref(), &a.config)?;
    if !(a.timeout.is_finite() && a.timeout > 0.0 && a.timeout <= 3600.0) {
        bail!(
            "--timeout {} must be above 0 and at most 3600 seconds",
            a.timeout
        );
    }
    let opts = TagOptions {
        socket: cfg.agent.state_dir.join(SOCKET_NAME),
        group,
        name: a.name,
        freeze: a.freeze,
        timeout: Duration::from_secs_f64(a.timeout),
        pre_hook: cfg.agent.tag_pre_hook.clone(),
        post_hook: cfg.agent.tag_post_hook.clone(),
    };
    let seq = tagcmd::run(&opts).context("tag not recorded")?;
    println!("{seq}");
    Ok(())
}

/// The group a command on the running agent is for: `--group`, which must be
/// in the config, or the config's only group.
pub fn pick_group(
    cfg: &tidemark::config::AgentConfig,
    group: Option<&str>,
    config: &std::path::Path,
) -> anyhow::Result<String> {
    let names = || {
        cfg.groups
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (group, cfg.groups.as_slice()) {
        (Some(g), groups) => {
            if !groups.iter().any(|x| x.name == g) {
                bail!(
                    "group {g:?} is not in {} (its groups: {})",
                    config.display(),
                    names()
                );
            }
            Ok(g.to_string())
        }
        (None, [one]) => Ok(one.name.clone()),
        (None, groups) => bail!(
            "{} has {} groups; name one with --group ({})",
            config.display(),
            groups.len(),
            names()
        ),
    }
}
