//! `tidemark agent`: capture, seal and push a protected machine's writes.

use std::path::PathBuf;

use tidemark::agent::AgentOptions;
use tidemark::agent::workload::{Pattern, WorkloadSpec};

/// Run the agent: protect the configured disks and replicate them through the relay.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// The agent's config file (agent.toml from `tidemark init`).
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// Commands for a running agent.
#[derive(clap::Subcommand)]
enum AgentCommand {
    /// Record an application-consistent tag in the running agent's stream
    /// (pre-hook, fsfreeze, tag, thaw, post-hook).
    Tag(super::agent_tag::TagArgs),
}

/// A synthetic workload written through the capture path (for benchmarks and
/// tests): active when `--workload-seconds` or `--workload-bytes` is given.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Write for this many seconds to the disks of the first group (each
    /// write to one of them, drawn from the seeded generator).
    #[arg(long)]
    pub workload_seconds: Option<f64>,
    /// Write this many bytes (suffixes K, M, G: binary units).
    #[arg(long, value_parser = parse_size)]
    pub workload_bytes: Option<u64>,
    /// Bytes per write (suffixes K, M, G).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub workload_write_size: u64,
    /// Where writes go.
    #[arg(long, value_enum, default_value = "random")]
    pub workload_pattern: Pattern,
    /// Share of the written data that compresses away, 0..=100 %.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub workload_compressibility: u8,
    /// Seed of the written data and offsets.
    #[arg(long, default_value_t = 1)]
    pub workload_seed: u64,
    /// Throttle the workload to this many MB/s (10^6 bytes; 0 = unthrottled).
    #[arg(long, default_value_t = 0.0)]
    pub workload_rate_mb_s: f64,
    /// Stop the agent in order once the workload is done and the relay holds all of it.
    #[arg(long)]
    pub exit_after_workload: bool,
    /// Append one line per acknowledged write, `seq disk offset len index`
    /// (seq `-` when capture kept only its region), and `seq tag name` per
    /// tag; the write's data is `workload::write_data(spec, index)`.
    #[arg(long, value_name = "PATH")]
    pub workload_log: Option<PathBuf>,
    /// Record a tag named `auto-<n>` every SECS seconds while the workload runs.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub workload_tag_every: f64,
}

impl WorkloadArgs {
    /// The workload these flags describe, if any.
    pub fn spec(&self) -> Option<WorkloadSpec> {
        if self.workload_seconds.is_none() && self.workload_bytes.is_none() {
            return None;
        }
        Some(WorkloadSpec {
            seconds: self.workload_seconds.unwrap_or(0.0),
            bytes: self.workload_bytes.unwrap_or(0),
            write_size: self.workload_write_size as usize,
            pattern: self.workload_pattern,
            compressibility: self.workload_compressibility,
            seed: self.workload_seed,
            rate_bytes_per_sec: (self.workload_rate_mb_s.max(0.0) * 1e6) as u64,
            tag_every_secs: if self.workload_tag_every.is_finite() {
                self.workload_tag_every.max(0.0)
            } else {
                0.0
            },
        })
    }
}

/// Parse `4096`, `64K`, `1M`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown size suffix {c:?} (use K, M, G or T)"
                    ));
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number with an optional K, M, G or T)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Run `agent`.
pub fn run(a: AgentArgs) -> anyhow::Result<()> {
    let config = match (a.command, a.config) {
        (Some(AgentCommand::Tag(t)), _) => return super::agent_tag::run(t),
        (None, Some(c)) => c,
        (None, None) => anyhow::bail!("--config is required"),
    };
    let cfg = tidemark::config::AgentConfig::load(&config)?;
    let opts = AgentOptions {
        workload: a.workload.spec(),
        exit_after_workload: a.workload.exit_after_workload,
        workload_log: a.workload.workload_log.clone(),
    };
    super::run_role("agent-rt", |sd| tidemark::agent::run(cfg, opts, sd))
}
