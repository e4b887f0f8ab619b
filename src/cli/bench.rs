//! `tidemark bench`: run the whole pipeline on this machine and measure it.

use std::path::PathBuf;

use tidemark::agent::workload::Pattern;
use tidemark::bench::run::{BenchOptions, BenchReport, SourcePlace};

use super::agent::parse_size;

/// Run relay, target and agent on loopback (TLS on, certificates made on the
/// fly), drive a synthetic write workload, verify the replica byte for byte, and
/// report throughput, lag, CPU and memory per role, and the efficiency.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds of workload.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Size of the protected disk (sparse; suffixes K, M, G, T).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    image_size: u64,
    /// Bytes per write (suffixes K, M, G).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    write_size: u64,
    /// Where writes go.
    #[arg(long, value_enum, default_value = "random")]
    pattern: Pattern,
    /// Share of the written data that compresses away, 0..=100 %.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    compressibility: u8,
    /// zstd level of the agent (negative levels are faster).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    zstd_level: i32,
    /// Throttle the workload to this many MB/s (10^6 bytes/s; 0 = unthrottled).
    #[arg(long, default_value_t = 0.0)]
    rate_mb_s: f64,
    /// Seed of the written data and offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Scratch directory (default: a new directory under $TMPDIR or /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the scratch directory (configs, logs, images) afterwards.
    #[arg(long)]
    keep: bool,
    /// Skip measuring the per-stage bound (no efficiency figure).
    #[arg(long)]
    skip_bound: bool,
    /// Run the relay's spool with O_DIRECT (see docs/SPOOL.md).
    #[arg(long)]
    spool_direct_io: bool,
    /// Put the relay's spool in this (new) directory, e.g. on a second disk as a
    /// relay on its own machine has; by default it shares the scratch directory's
    /// disk with the replica.
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// Put the source disk's image in this (new) directory. By default it goes
    /// to /dev/shm when it fits in memory (the protected machine's own disk is
    /// not the pipeline's; docs/BENCH.md), else to the scratch directory.
    #[arg(long, conflicts_with = "source_on_scratch")]
    source_dir: Option<PathBuf>,
    /// Keep the source disk's image in the scratch directory, on the replica's disk.
    #[arg(long)]
    source_on_scratch: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Run `bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.seconds <= 0.0 || !a.seconds.is_finite() {
        anyhow::bail!("--seconds must be a positive number, got {}", a.seconds);
    }
    if !tidemark::frame::zstd_level_range().contains(&a.zstd_level) {
        anyhow::bail!(
            "--zstd-level {} is outside {:?}",
            a.zstd_level,
            tidemark::frame::zstd_level_range()
        );
    }
    if a.write_size == 0 || a.write_size > a.image_size || a.write_size > 16 << 20 {
        anyhow::bail!(
            "--write-size {} must be between 1 byte and min(16 MiB, --image-size {})",
            a.write_size,
            a.image_size
        );
    }
    let dir = a.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "tidemark-bench-{}-{}",
            std::process::id(),
            tidemark::util::time::now_us()
        ))
    });
    let opts = BenchOptions {
        seconds: a.seconds,
        image_size: a.image_size,
        write_size: a.write_size as usize,
        pattern: a.pattern,
        compressibility: a.compressibility,
        zstd_level: a.zstd_level,
        rate_mb_s: a.rate_mb_s.max(0.0),
        seed: a.seed,
        dir,
        keep: a.keep,
        exe: std::env::current_exe()?,
        progress: true,
        skip_bound: a.skip_bound,
        spool_direct_io: a.spool_direct_io,
        spool_dir: a.spool_dir,
        source: match (a.source_dir, a.source_on_scratch) {
            (Some(d), _) => SourcePlace::Dir(d),
            (None, true) => SourcePlace::Scratch,
            (None, false) => SourcePlace::Auto,
        },
    };
    let report = tidemark::bench::run::run(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if !report.verified {
        anyhow::bail!("verification failed: the replica differs from the source");
    }
    Ok(())
}

fn print_table(r: &BenchReport) {
    let o = &r.options;
    println!(
        "tidemark bench: {:.0} s, {} KiB {:?} writes, {} % compressible, zstd {}, {} cores{}",
        o.seconds,
        o.write_size / 1024,
        o.pattern,
        o.compressibility,
        o.zstd_level,
        r.cores,
        if cfg!(debug_assertions) {
            " (DEBUG BUILD: figures are not representative)"
        } else {
            ""
        }
    );
    println!(
        "  verified (replica == source)   {}",
        if r.verified { "yes" } else { "NO" }
    );
    println!(
        "  source disk                    {}{}",
        r.source_path.display(),
        if r.source_in_memory { " (tmpfs)" } else { "" }
    );
    println!(
        "  written at source              {:9.1} MB/s",
        r.source_mb_s
    );
    println!(
        "  applied at target (end to end) {:9.1} MB/s",
        r.applied_mb_s
    );
    if r.bound_mb_s > 0.0 {
        println!("  bound (per-stage costs)        {:9.1} MB/s", r.bound_mb_s);
        println!("  efficiency                     {:9.2}", r.efficiency);
    }
    println!("  frames/s                       {:9.1}", r.frames_per_s);
    println!(
        "  compression ratio              {:9.2}",
        r.compression_ratio
    );
    println!(
        "  lag p50 / p99                  {:9.1} / {:.1} ms",
        r.lag_p50_ms, r.lag_p99_ms
    );
    println!("                                     agent     relay    target");
    println!(
        "  CPU s per GB                   {:9.2} {:9.2} {:9.2}",
        r.cpu_s_per_gb.agent, r.cpu_s_per_gb.relay, r.cpu_s_per_gb.target
    );
    println!(
        "    of which the workload's writer {:7.2}",
        r.workload_cpu_s_per_gb
    );
    println!(
        "  peak RSS MiB                   {:9.1} {:9.1} {:9.1}",
        r.peak_rss_mib.agent, r.peak_rss_mib.relay, r.peak_rss_mib.target
    );
    println!(
        "  {} writes, {:.1} MB in {:.1} s end to end, {} frames applied",
        r.writes,
        r.bytes as f64 / 1e6,
        r.seconds,
        r.frames
    );
}
