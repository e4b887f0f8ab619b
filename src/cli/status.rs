//! `tidemark status`: what a role reports about itself, read from the status
//! snapshot it keeps in its state (or spool) directory.

use std::path::{Path, PathBuf};

use tidemark::agent::AgentStatus;
use tidemark::config::{AgentConfig, RelayConfig, TargetConfig};
use tidemark::relay::RelayStatus;
use tidemark::target::TargetStatus;
use tidemark::util::statusfile::STATUS_FILE;

/// Show the status of the role a config file belongs to (relay, target or agent).
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The role's config file.
    #[arg(long)]
    config: PathBuf,
    /// Print the status snapshot as JSON.
    #[arg(long)]
    json: bool,
}

enum Which {
    Relay(PathBuf),
    Target(PathBuf),
    Agent(PathBuf),
}

fn which(config: &Path) -> anyhow::Result<Which> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| anyhow::anyhow!("{}: cannot read config file: {e}", config.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: not TOML: {e}", config.display()))?;
    Ok(if table.contains_key("relay") {
        Which::Relay(RelayConfig::load(config)?.relay.spool_dir.join(STATUS_FILE))
    } else if table.contains_key("target") {
        Which::Target(
            TargetConfig::load(config)?
                .target
                .state_dir
                .join(STATUS_FILE),
        )
    } else if table.contains_key("agent") {
        Which::Agent(AgentConfig::load(config)?.agent.state_dir.join(STATUS_FILE))
    } else {
        anyhow::bail!(
            "{}: not a role config (no [relay], [target] or [agent] table)",
            config.display()
        )
    })
}

fn load<T: for<'de> serde::Deserialize<'de>>(path: &Path) -> anyhow::Result<(T, f64)> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "{}: no status ({e}); has this role ever run with this config?",
            path.display()
        )
    })?;
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: unreadable status: {e}", path.display()))?;
    Ok((v, age))
}

/// Bytes as B, KiB, MiB, GiB or TiB.
fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn header(role: &str, name: &str, pid: u32, age: f64) {
    let state = if alive(pid) && age < 5.0 {
        format!("running (pid {pid})")
    } else {
        format!("not running (status from {age:.0} s ago, pid {pid})")
    };
    println!("{role} {name}: {state}");
}

/// Run `status`.
pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    match which(&a.config)? {
        Which::Relay(p) => {
            let (s, age): (RelayStatus, f64) = load(&p)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            header("relay", &s.name, s.pid, age);
            println!(
                "  listen {}, spool {:.1} MB in {} frames (throttles above {:.1} GB)",
                s.listen,
                s.spool_bytes as f64 / 1e6,
                s.spool_frames,
                s.spool_max_bytes as f64 / 1e9
            );
            for g in &s.groups {
                let c = &g.counters;
                println!(
                    "  group {}: head {} trimmed {} queued {} frames, agent {}, target {} (acked {})",
                    g.name,
                    g.head.map_or(0, |h| h.frame_no),
                    g.trimmed_through,
                    g.frames,
                    if c.agent_connected {
                        "connected"
                    } else {
                        "away"
                    },
                    if c.target_connected {
                        "connected"
                    } else {
                        "away"
                    },
                    c.target_acked
                );
                if let Some(e) = &g.last_target_error {
                    println!("    target refused: {e}");
                }
                if let Some(e) = &g.last_agent_error {
                    println!("    agent refused: {e}");
                }
            }
        }
        Which::Target(p) => {
            let (s, age): (TargetStatus, f64) = load(&p)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            header("target", &s.name, s.pid, age);
            for g in &s.groups {
                println!(
                    "  group {}: watermark frame {} seq {}, {} frames applied ({:.1} MB), {}, lag p50 {:.1} ms p99 {:.1} ms",
                    g.name,
                    g.watermark.frame_no,
                    g.watermark.last_seq,
                    g.frames_applied,
                    g.bytes_applied as f64 / 1e6,
                    if g.connected {
                        "connected"
                    } else {
                        "not connected"
                    },
                    g.lag_us.p50 as f64 / 1e3,
                    g.lag_us.p99 as f64 / 1e3
                );
                if let Some(why) = &g.stalled {
                    println!("    STALLED: {why}");
                }
            }
        }
        Which::Agent(p) => {
            let (s, age): (AgentStatus, f64) = load(&p)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            header("agent", &s.name, s.pid, age);
            for g in &s.groups {
                let j = &g.journal;
                println!(
                    "  group {}: {}, next seq {}, last relay ack frame {} seq {}{}, {} frames sealed",
                    g.name,
                    if g.connected {
                        "connected"
                    } else {
                        "not connected"
                    },
                    j.next_seq,
                    g.acked.frame_no,
                    g.acked.last_seq,
                    if g.last_ack_us > 0 {
                        format!(" ({:.1} s ago)", ago_s(g.last_ack_us))
                    } else {
                        String::new()
                    },
                    g.frames_sealed
                );
                println!(
                    "    capture: mode {} for {:.0} s ({}); policy {:?}",
                    j.mode.mode.as_str(),
                    ago_s(j.mode.since_us),
                    j.mode.reason,
                    j.policy
                );
                println!(
                    "    pending: memory {} of {} ({} entries), spill {} of {} ({} entries), bitmap {}",
                    human(j.bytes as u64),
                    human(j.budget as u64),
                    j.entries,
                    human(j.spill_bytes),
                    human(j.spill_budget),
                    j.spill_entries,
                    human(j.pending_bytes)
                );
                if !j.mode.transitions.is_empty() {
                    let t: Vec<String> = j
                        .mode
                        .transitions
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    println!("    mode changes: {}", t.join(", "));
                }
                for d in &g.disks {
                    let fe: Vec<String> = d
                        .frontends
                        .iter()
                        .map(|f| format!("{} {}", f.kind, f.address))
                        .collect();
                    println!(
                        "    disk {} {} ({}): {}; bitmap {}, unacknowledged {}, copied {}",
                        d.id,
                        d.path.display(),
                        human(d.size),
                        if fe.is_empty() {
                            "no frontend".to_string()
                        } else {
                            fe.join(", ")
                        },
                        human(d.capture.pending_bytes),
                        human(d.capture.unacked_bytes),
                        human(d.capture.copied_bytes)
                    );
                    println!("      at start: {}", d.start_reason);
                    if let Some(now) = d.grown_to {
                        println!(
                            "      grew to {} while the agent runs: restart the agent to export and protect the new space",
                            human(now)
                        );
                    }
                }
                let r = &g.resync;
                println!(
                    "    copies ({}): compared {}, differing sent {}, copied whole {}; {} digest requests ({} failed, {} blocks, {} of replies){}",
                    r.mode,
                    human(r.compared_bytes),
                    human(r.differing_bytes),
                    human(r.copied_bytes),
                    r.digest_requests,
                    r.digest_failures,
                    r.digest_blocks,
                    human(r.digest_reply_bytes),
                    if r.capped_us > 0 {
                        format!(
                            ", {:.1} s held by the bandwidth cap",
                            r.capped_us as f64 / 1e6
                        )
                    } else {
                        String::new()
                    }
                );
                for v in &g.verifies {
                    match &v.result {
                        Ok(rep) => println!(
                            "    last verify of disk {} ({:.0} s ago): {}",
                            v.disk,
                            ago_s(v.at_us),
                            if rep.mismatch_ranges == 0 {
                                "equal".to_string()
                            } else {
                                format!(
                                    "{} ranges ({}) differ{}",
                                    rep.mismatch_ranges,
                                    human(rep.mismatch_bytes),
                                    if rep.repaired {
                                        ", marked for resync"
                                    } else {
                                        ""
                                    }
                                )
                            }
                        ),
                        Err(e) => println!(
                            "    last verify of disk {} ({:.0} s ago) could not run: {e}",
                            v.disk,
                            ago_s(v.at_us)
                        ),
                    }
                }
                if let Some(e) = &g.last_error {
                    if g.last_error_us > 0 {
                        println!("    last error ({:.0} s ago): {e}", ago_s(g.last_error_us));
                    } else {
                        println!("    last error: {e}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Seconds since `us` (µs since the Unix epoch).
fn ago_s(us: u64) -> f64 {
    tidemark::util::time::now_us().saturating_sub(us) as f64 / 1e6
}
