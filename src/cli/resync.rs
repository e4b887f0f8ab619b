//! `tidemark resync` and `tidemark verify`: ask the running agent to resync a
//! disk by checksum, or to compare it with its replica (see docs/RESYNC.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tidemark::agent::control::{self, Request, Response, ResyncRequest, VerifyRequest};

use super::agent_tag::pick_group;

/// Longest a verify may take before the command gives up waiting (the agent
/// finishes it anyway).
const VERIFY_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Which disk of the running agent a command is for.
#[derive(clap::Args, Debug)]
pub struct AgentDisk {
    /// The running agent's config file (agent.toml).
    #[arg(long)]
    config: PathBuf,
    /// The group (default: the config's only group).
    #[arg(long)]
    group: Option<String>,
    /// The disk id.
    #[arg(long)]
    disk: u16,
}

/// Resync a disk: compare every block with the replica's digest and send the
/// differing ones (with --full: send every block).
#[derive(clap::Args, Debug)]
pub struct ResyncArgs {
    #[command(flatten)]
    at: AgentDisk,
    /// Send every block without comparing (the replica is not trusted at all).
    #[arg(long)]
    full: bool,
}

/// Compare a disk with its replica while replication goes on; exits non-zero
/// when they differ.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    at: AgentDisk,
    /// Byte range START..END to compare (default: the whole disk); sizes take
    /// K, M, G, T suffixes (powers of 1024).
    #[arg(long, value_parser = parse_range)]
    range: Option<(u64, u64)>,
    /// Mark the differing ranges for resync.
    #[arg(long)]
    repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?}: expected START..END"))?;
    let a = super::agent::parse_size(a).map_err(|e| format!("start {a:?}: {e}"))?;
    let b = super::agent::parse_size(b).map_err(|e| format!("end {b:?}: {e}"))?;
    if a >= b {
        return Err(format!("{s:?}: START must be below END"));
    }
    Ok((a, b))
}

/// The group of `at`, and a function sending a request to the agent.
fn ask(
    at: &AgentDisk,
    make: impl FnOnce(String) -> Request,
    wait: Duration,
) -> anyhow::Result<(String, Response)> {
    let cfg = tidemark::config::AgentConfig::load(&at.config)?;
    let group = pick_group(&cfg, at.group.as_deref(), &at.config)?;
    let socket = cfg.agent.state_dir.join(control::SOCKET_NAME);
    let req = make(group.clone());
    let r = control::request(&socket, &req, wait).context("no answer from the agent")?;
    if let Response::Error { error, kind } = r {
        bail!("the agent refused ({kind}): {error}");
    }
    Ok((group, r))
}

/// Run `resync`.
pub fn run_resync(a: ResyncArgs) -> anyhow::Result<()> {
    let disk = a.at.disk;
    let make = |group| {
        Request::Resync(ResyncRequest {
            group,
            disk,
            full: a.full,
        })
    };
    match ask(&a.at, make, Duration::from_secs(60))? {
        (group, Response::Resync { marked_bytes }) => {
            println!(
                "group {group} disk {disk}: {marked_bytes} bytes marked for {} resync; `tidemark status` shows its progress",
                if a.full { "a full" } else { "a checksum" }
            );
            Ok(())
        }
        (_, other) => bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Run `verify`: exit status 0 when equal, 1 when they differ (or on error).
pub fn run_verify(a: VerifyArgs) -> anyhow::Result<()> {
    let make = |group| {
        Request::Verify(VerifyRequest {
            group,
            disk: a.at.disk,
            range: a.range,
            repair: a.repair,
        })
    };
    let (group, Response::Verify { verify: r }) = ask(&a.at, make, VERIFY_WAIT)? else {
        bail!("unexpected answer from the agent");
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "group {group} disk {}: compared {} bytes in blocks of {}: {}",
            r.disk,
            r.compared_bytes,
            r.block_size,
            if r.mismatch_ranges == 0 {
                "the replica equals the source".to_string()
            } else {
                format!(
                    "{} ranges ({} bytes) differ{}",
                    r.mismatch_ranges,
                    r.mismatch_bytes,
                    if r.repaired {
                        "; marked for resync"
                    } else {
                        ""
                    }
                )
            }
        );
        for (s, e) in &r.mismatches {
            println!("  differs: {s}..{e}");
        }
        if r.mismatch_ranges > r.mismatches.len() as u64 {
            println!(
                "  … and {} more ranges",
                r.mismatch_ranges - r.mismatches.len() as u64
            );
        }
    }
    if r.mismatch_ranges > 0 {
        bail!("the replica differs from the source");
    }
    Ok(())
}
