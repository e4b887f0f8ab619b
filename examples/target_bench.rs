//! The target's apply and recover bars, measured without a network
//! (`scripts/bench-target.sh` runs every case side by side with fio and
//! qemu-img and prints the table; this program does one step at a time, and
//! prints one JSON object on stdout per step).
//!
//! **What "apply" measures.** `target::run_group_offline(cfg, group)` is the
//! target's start-up without a relay: it opens the group and replays every
//! frame of the group's redo journal after the durable watermark through the
//! real apply path (open: AES-GCM + zstd; validate; before-images when a
//! retention epoch is current; io_uring writes, one `write_batch` per frame;
//! group commit every `apply_batch_mib` with fdatasync of the replica and the
//! watermark), then makes everything durable and returns. So:
//!
//! - `prepare` (not timed) builds a fresh site in `--dir`: a config from
//!   `tidemark init` pointed at a replica of `--disk-size` (raw, or VMDK
//!   monolithicSparse), optionally pre-filled through the image backend with
//!   data (`--fill`: the state of a replica after its initial copy, and the
//!   kind of file fio writes to, which it lays out in full first). It applies a
//!   first tiny frame (DiskSize + one 4 KiB write) through the redo journal and
//!   `run_group_offline`, so the replica and the watermark exist; with
//!   `--retention` it then takes a `latest` point through `recover`'s own
//!   `PointView::open` (so a retention epoch is current and the replayed frames
//!   keep before-images, as on a running target). Then it seals the workload:
//!   frames of `--frame-records` (1024) random 4 KiB writes, uniformly over the
//!   disk, 50 % compressible (`util::datagen::fill`), zstd level 1, the real
//!   group key; the frames' source times are `--frame-interval-ms` apart (so a
//!   target that makes points while replaying turns epochs over at the
//!   retention granularity; the replay of this commit makes no points, so the
//!   whole workload is one epoch: a block written twice keeps one
//!   before-image); and appends them to the group's redo journal (the same
//!   spool options as `target::redo`). It also times opening every frame
//!   once (`open_secs`, the decrypt + decompress work the replay does on its
//!   reader thread, a few frames ahead of the apply thread, as a live target
//!   does in its open pool).
//! - `apply` (timed, in its own process, which does nothing else) takes the
//!   state directory's lock and runs `run_group_offline`; it reports the
//!   seconds, the writes per second, the process's peak RSS (`VmHWM`), the
//!   retention journal's size, and checks that sampled blocks of the replica
//!   hold the bytes of the last write to them (`verified`).
//! - `prepare-recover` builds a raw replica (e.g. 4 GiB) with data in about
//!   `--data-pct` of its 64 KiB blocks (written with `pwrite`, holes
//!   elsewhere), then applies one tiny frame (DiskSize + one 4 KiB write)
//!   through redo + `run_group_offline`, so the group has a consistent point
//!   for `tidemark target recover --point latest`.
//!
//! ```text
//! cargo run --release --example target_bench -- prepare --dir D --disk-size 1G \
//!     --write-bytes 256M --format raw [--fill] [--retention --granularity-ms 100]
//! cargo run --release --example target_bench -- apply --dir D
//! cargo run --release --example target_bench -- prepare-recover --dir D --disk-size 4G
//! ```

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tidemark::config::{ReplicaFormat, TargetConfig, TargetDisk};
use tidemark::frame::{DataKey, FrameKind, FrameMeta, GroupName, Opener, RecordRef, Sealer};
use tidemark::image::{DirectIo, Engine, ImageFormat, ImageSpec, RawImage, WriteOp, open_image};
use tidemark::pki::{InitOptions, init};
use tidemark::spool::{AppendRequest, Spool, SpoolOptions};
use tidemark::target::recover::{PointSpec, PointView};
use tidemark::target::redo::{REDO_DIR, REDO_SEGMENT_BYTES};
use tidemark::target::run_group_offline;
use tidemark::util::lockfile::lock_dir;
use tidemark::util::prng::Prng;
use tidemark::util::time::now_us;

const GROUP: &str = "g1";
const BLOCK: u64 = 4096;
/// Sealed frames waiting for their redo append at most (bounds prepare's memory).
const APPEND_WINDOW: usize = 16;
/// Blocks whose final content `apply` checks: the first writes of the
/// workload and the last ones.
const CHECKS: usize = 128;

#[derive(Parser)]
#[command(about = "Target apply / recover benchmark steps (see the doc comment)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a site and seal the workload into its redo journal (not timed).
    Prepare(PrepareArgs),
    /// Replay the redo journal with run_group_offline (timed).
    Apply(ApplyArgs),
    /// Build a site with a raw replica half full of data, with a point.
    PrepareRecover(RecoverArgs),
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum Format {
    Raw,
    Vmdk,
}

/// `--direct-io`: target.toml's `direct_io`.
#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum DirectIoArg {
    Auto,
    On,
    Off,
}

impl From<DirectIoArg> for tidemark::config::DirectIo {
    fn from(d: DirectIoArg) -> Self {
        match d {
            DirectIoArg::Auto => tidemark::config::DirectIo::Auto,
            DirectIoArg::On => tidemark::config::DirectIo::On,
            DirectIoArg::Off => tidemark::config::DirectIo::Off,
        }
    }
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Work directory (must not exist, or be empty).
    #[arg(long)]
    dir: PathBuf,
    /// Disk size (K, M, G, T suffixes: powers of 1024).
    #[arg(long, value_parser = parse_size)]
    disk_size: u64,
    /// Bytes of 4 KiB random writes in the workload.
    #[arg(long, value_parser = parse_size)]
    write_bytes: u64,
    /// Replica format.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Fill the whole replica with data first (through the image backend).
    #[arg(long)]
    fill: bool,
    /// Retention on (before-images).
    #[arg(long)]
    retention: bool,
    /// Retention granularity.
    #[arg(long, default_value_t = 100)]
    granularity_ms: u64,
    /// Source time between two frames (default: the granularity).
    #[arg(long)]
    frame_interval_ms: Option<u64>,
    /// Writes per frame.
    #[arg(long, default_value_t = 1024)]
    frame_records: usize,
    /// The target's `direct_io` setting (as target.toml's: auto by default).
    #[arg(long, value_enum, default_value = "auto")]
    direct_io: DirectIoArg,
    /// The target's `apply_batch_mib` (default: the config's default).
    #[arg(long)]
    apply_batch_mib: Option<u64>,
    /// PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct ApplyArgs {
    /// Work directory made by `prepare`.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct RecoverArgs {
    /// Work directory (must not exist, or be empty).
    #[arg(long)]
    dir: PathBuf,
    /// Disk size.
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    disk_size: u64,
    /// Percentage of 64 KiB blocks holding data.
    #[arg(long, default_value_t = 50)]
    data_pct: u64,
    /// PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// What `prepare` leaves for `apply` (`<dir>/meta.json`).
#[derive(Serialize, Deserialize)]
struct Meta {
    format: Format,
    retention: bool,
    fill: bool,
    direct_io: DirectIoArg,
    disk_size: u64,
    /// Timed writes (the seed frame's write is not counted).
    writes: u64,
    write_bytes: u64,
    frames: u64,
    sealed_bytes: u64,
    seal_secs: f64,
    open_secs: f64,
    fill_secs: f64,
    replica: PathBuf,
    /// Sampled blocks: offset → CRC32C of the last data written there.
    checks: Vec<(u64, u32)>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 256M, 1G, 1T)"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Absolute paths: the config written is loaded back relative to itself.
    match Cli::parse().cmd {
        Cmd::Prepare(mut a) => {
            a.dir = std::path::absolute(&a.dir)?;
            prepare(a)
        }
        Cmd::Apply(mut a) => {
            a.dir = std::path::absolute(&a.dir)?;
            apply(a)
        }
        Cmd::PrepareRecover(mut a) => {
            a.dir = std::path::absolute(&a.dir)?;
            prepare_recover(a)
        }
    }
}

/// `tidemark init` in `dir/site`, and a config at `dir/target.toml` with one
/// disk (id 0) at `replica`.
fn site(dir: &Path, replica: &Path, format: ReplicaFormat) -> anyhow::Result<TargetConfig> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    std::fs::create_dir_all(dir)?;
    let mut o = InitOptions::new(dir.join("site"));
    o.groups = vec![GROUP.into()];
    init(&o).context("tidemark init")?;
    let mut cfg = TargetConfig::load(&dir.join("site").join("target.toml"))?;
    cfg.target.state_dir = dir.join("state");
    cfg.target.engine = tidemark::config::Engine::Uring;
    let g = &mut cfg.groups[0];
    g.disks = vec![TargetDisk {
        id: 0,
        path: replica.to_path_buf(),
        format,
    }];
    Ok(cfg)
}

fn save(dir: &Path, cfg: &TargetConfig) -> anyhow::Result<PathBuf> {
    let path = dir.join("target.toml");
    std::fs::write(&path, cfg.to_toml_string()?)?;
    // Load it back as the CLI would (validation, path resolution).
    TargetConfig::load(&path)?;
    Ok(path)
}

/// The group's redo journal, opened as `target::redo` opens it.
fn redo_spool(cfg: &TargetConfig) -> anyhow::Result<Spool> {
    let mut opts = SpoolOptions::new(cfg.target.state_dir.join(GROUP).join(REDO_DIR));
    opts.segment_bytes = REDO_SEGMENT_BYTES;
    let (spool, _) = Spool::open(opts)?;
    Ok(spool)
}

fn request(f: &tidemark::frame::SealedFrame) -> AppendRequest {
    AppendRequest {
        group: GROUP.into(),
        frame_no: f.header.frame_no,
        prev_frame_no: f.header.prev_frame_no,
        last_seq: f.header.last_seq,
        bytes: Arc::new(f.bytes.clone()),
    }
}

/// Chain state of the frames being sealed.
struct ChainState {
    sealer: Sealer,
    group: GroupName,
    key_epoch: u32,
    next_frame: u64,
    prev_frame: u64,
    last_seq: u64,
}

impl ChainState {
    fn new(cfg: &TargetConfig) -> anyhow::Result<(ChainState, DataKey)> {
        let g = &cfg.groups[0];
        let key = DataKey::load(&g.key_file)?;
        Ok((
            ChainState {
                sealer: Sealer::new(&key, g.key_epoch, 1)?,
                group: GroupName::new(GROUP)?,
                key_epoch: g.key_epoch,
                next_frame: 1,
                prev_frame: 0,
                last_seq: 0,
            },
            key,
        ))
    }

    /// Seal the next W frame; `recs` get consecutive seqs from the chain.
    fn seal<'a>(
        &mut self,
        build: impl FnOnce(&mut u64) -> Vec<RecordRef<'a>>,
    ) -> anyhow::Result<tidemark::frame::SealedFrame> {
        let mut seq = self.last_seq;
        let recs = build(&mut seq);
        let meta = FrameMeta {
            group: self.group,
            key_epoch: self.key_epoch,
            frame_no: self.next_frame,
            prev_frame_no: self.prev_frame,
            prev_last_seq: self.last_seq,
            kind: FrameKind::Write,
            heartbeat: false,
            rebase: false,
            time_us: now_us(),
        };
        let f = self.sealer.seal(&meta, &recs)?;
        self.prev_frame = f.header.frame_no;
        self.last_seq = f.header.last_seq;
        self.next_frame += 1;
        Ok(f)
    }
}

/// Append the first frame (DiskSize + one 4 KiB write at `t0`) to the redo
/// journal and replay it, so the replica (created or opened) and the watermark
/// exist.
fn seed_frame(
    cfg: &TargetConfig,
    chain: &mut ChainState,
    disk_size: u64,
    t0: u64,
) -> anyhow::Result<(u64, Vec<u8>)> {
    let mut rng = Prng::new(0x5eed);
    let mut data = vec![0u8; BLOCK as usize];
    tidemark::util::datagen::fill(&mut data, 50, &mut rng);
    let off = (disk_size / BLOCK / 2) * BLOCK;
    let f = chain.seal(|seq| {
        let a = *seq + 1;
        let b = *seq + 2;
        *seq = b;
        vec![
            RecordRef::disk_size(a, 0, disk_size, t0),
            RecordRef::write(b, 0, off, t0, &data),
        ]
    })?;
    {
        let spool = redo_spool(cfg)?;
        spool.append_blocking(request(&f))?;
        spool.shutdown();
    }
    let lock = lock_dir(&cfg.target.state_dir)?;
    run_group_offline(cfg, GROUP)?;
    drop(lock);
    Ok((off, data))
}

fn prepare(a: PrepareArgs) -> anyhow::Result<()> {
    if a.disk_size < 1 << 20 || !a.disk_size.is_multiple_of(1 << 20) {
        bail!("--disk-size must be a multiple of 1 MiB");
    }
    let (replica, format) = match a.format {
        Format::Raw => (a.dir.join("replica.img"), ReplicaFormat::Raw),
        Format::Vmdk => (a.dir.join("replica.vmdk"), ReplicaFormat::Vmdk),
    };
    let mut cfg = site(&a.dir, &replica, format)?;
    cfg.target.direct_io = a.direct_io.into();
    if let Some(m) = a.apply_batch_mib {
        cfg.target.apply_batch_mib = m;
    }
    let r = &mut cfg.groups[0].retention;
    r.enabled = a.retention;
    r.granularity_ms = a.granularity_ms;
    save(&a.dir, &cfg)?;

    // Fill the replica (the state after an initial copy), not timed.
    let mut fill_secs = 0.0;
    if a.fill {
        let t = Instant::now();
        fill(&replica, format.image_format(), a.disk_size, a.seed)?;
        fill_secs = t.elapsed().as_secs_f64();
    }

    let interval_us = a.frame_interval_ms.unwrap_or(a.granularity_ms) * 1000;
    let records = a.frame_records.max(1);
    let writes = a.write_bytes / BLOCK;
    let frames = writes.div_ceil(records as u64);
    // Source times in the past, `interval_us` apart.
    let t0 = now_us().saturating_sub((frames + 2) * interval_us);
    let (mut chain, key) = ChainState::new(&cfg)?;
    let (seed_off, seed_data) = seed_frame(&cfg, &mut chain, a.disk_size, t0)?;
    if a.retention {
        // A `latest` point, taken as `recover` takes one: the epoch it starts
        // is current when the workload is replayed, so before-images are kept.
        let view = PointView::open(&cfg, GROUP, &PointSpec::Latest, false)
            .context("taking a point before the workload")?;
        drop(view);
    }

    // Seal the workload and append it to the redo journal.
    let blocks = a.disk_size / BLOCK;
    let mut rng = Prng::new(a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xbe7c);
    let mut pool = vec![0u8; records * BLOCK as usize];
    let mut checks: HashMap<u64, u32> = HashMap::new();
    checks.insert(seed_off, crc32c::crc32c(&seed_data));
    let mut first_checks = 0usize;
    let spool = redo_spool(&cfg)?;
    let mut opener = Opener::new(GroupName::new(GROUP)?, vec![(cfg.groups[0].key_epoch, key)])?;
    let (mut seal_secs, mut open_secs) = (0.0, 0.0);
    let mut sealed_bytes = 0u64;
    let mut window = VecDeque::new();
    let mut left = writes;
    for fi in 0..frames {
        let n = (left as usize).min(records);
        left -= n as u64;
        tidemark::util::datagen::fill(&mut pool[..n * BLOCK as usize], 50, &mut rng);
        let offs: Vec<u64> = (0..n).map(|_| rng.below(blocks) * BLOCK).collect();
        for (i, &off) in offs.iter().enumerate() {
            let d = &pool[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            let last = fi + 1 == frames && i + CHECKS >= n;
            if checks.contains_key(&off) || first_checks < CHECKS || last {
                if !checks.contains_key(&off) && !last {
                    first_checks += 1;
                }
                checks.insert(off, crc32c::crc32c(d));
            }
        }
        let ft = t0 + (fi + 2) * interval_us;
        let t = Instant::now();
        let f = chain.seal(|seq| {
            offs.iter()
                .enumerate()
                .map(|(i, &off)| {
                    *seq += 1;
                    RecordRef::write(
                        *seq,
                        0,
                        off,
                        ft + i as u64,
                        &pool[i * BLOCK as usize..(i + 1) * BLOCK as usize],
                    )
                })
                .collect()
        })?;
        seal_secs += t.elapsed().as_secs_f64();
        sealed_bytes += f.bytes.len() as u64;
        let t = Instant::now();
        opener.open_owned(f.bytes.clone())?;
        open_secs += t.elapsed().as_secs_f64();
        window.push_back(spool.append(request(&f)));
        while window.len() >= APPEND_WINDOW {
            wait_append(window.pop_front())?;
        }
    }
    while let Some(t) = window.pop_front() {
        wait_append(Some(t))?;
    }
    spool.shutdown();
    drop(spool);

    let meta = Meta {
        format: a.format,
        retention: a.retention,
        fill: a.fill,
        direct_io: a.direct_io,
        disk_size: a.disk_size,
        writes,
        write_bytes: writes * BLOCK,
        frames,
        sealed_bytes,
        seal_secs,
        open_secs,
        fill_secs,
        replica,
        checks: checks.into_iter().collect(),
    };
    std::fs::write(a.dir.join("meta.json"), serde_json::to_vec(&meta)?)?;
    println!(
        "{}",
        serde_json::json!({
            "step": "prepare",
            "format": meta.format,
            "retention": meta.retention,
            "fill": meta.fill,
            "writes": meta.writes,
            "frames": meta.frames,
            "sealed_mib": sealed_bytes as f64 / 1048576.0,
            "seal_secs": seal_secs,
            "open_secs": open_secs,
            "fill_secs": fill_secs,
        })
    );
    Ok(())
}

type Ticket = tokio::sync::oneshot::Receiver<
    Result<tidemark::spool::AppendOutcome, tidemark::spool::SpoolError>,
>;

fn wait_append(t: Option<Ticket>) -> anyhow::Result<()> {
    if let Some(t) = t {
        t.blocking_recv()
            .map_err(|_| anyhow::anyhow!("the redo spool stopped"))??;
    }
    Ok(())
}

/// Write data over the whole replica (created at `size`) through the image
/// backend, then flush it.
fn fill(path: &Path, format: ImageFormat, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut img = open_image(&ImageSpec {
        path: path.to_path_buf(),
        format,
        engine: Engine::Uring,
        create_size: Some(size),
        direct_io: DirectIo::Off,
    })?;
    const CHUNK: u64 = 1 << 20;
    const BATCH: u64 = 64;
    let mut rng = Prng::new(seed ^ 0xf111);
    let mut pool = vec![0u8; (16 * CHUNK) as usize];
    tidemark::util::datagen::fill(&mut pool, 50, &mut rng);
    let mut off = 0;
    while off < size {
        let ops: Vec<WriteOp<'_>> = (0..BATCH)
            .map(|i| off + i * CHUNK)
            .take_while(|&o| o < size)
            .map(|o| {
                let at = ((o / CHUNK) % 16 * CHUNK) as usize;
                let n = CHUNK.min(size - o) as usize;
                WriteOp::Write {
                    offset: o,
                    data: &pool[at..at + n],
                }
            })
            .collect();
        img.write_batch(&ops)?;
        off += BATCH * CHUNK;
    }
    img.flush()?;
    Ok(())
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn apply(a: ApplyArgs) -> anyhow::Result<()> {
    let meta: Meta = serde_json::from_slice(&std::fs::read(a.dir.join("meta.json"))?)?;
    let cfg = TargetConfig::load(&a.dir.join("target.toml"))?;
    // What the setting gives this replica as the apply starts (raw only:
    // sparse VMDKs always write through the page cache).
    let direct_used = match meta.format {
        Format::Raw => RawImage::open(&ImageSpec {
            path: meta.replica.clone(),
            format: ImageFormat::Raw,
            engine: Engine::Sync,
            create_size: None,
            direct_io: cfg.target.direct_io,
        })?
        .direct_io(),
        Format::Vmdk => false,
    };
    let lock = lock_dir(&cfg.target.state_dir)?;
    let t = Instant::now();
    run_group_offline(&cfg, GROUP)?;
    let secs = t.elapsed().as_secs_f64();
    drop(lock);
    let usage = tidemark::util::procstat::read_self()?;

    // The sampled blocks hold the last data written to them.
    let mut img = open_image(&ImageSpec {
        path: meta.replica.clone(),
        format: match meta.format {
            Format::Raw => ImageFormat::Raw,
            Format::Vmdk => ImageFormat::VmdkSparse,
        },
        engine: Engine::Sync,
        create_size: None,
        direct_io: DirectIo::Off,
    })?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut bad = 0;
    for &(off, crc) in &meta.checks {
        img.read_at(off, &mut buf)?;
        if crc32c::crc32c(&buf) != crc {
            bad += 1;
        }
    }
    let retention_bytes = dir_bytes(&cfg.target.state_dir.join(GROUP).join("retention"));
    let replica_alloc = std::fs::metadata(&meta.replica)?.blocks() * 512;
    println!(
        "{}",
        serde_json::json!({
            "step": "apply",
            "format": meta.format,
            "retention": meta.retention,
            "fill": meta.fill,
            "direct_io": meta.direct_io,
            "direct_io_used": direct_used,
            "disk_size": meta.disk_size,
            "writes": meta.writes,
            "frames": meta.frames,
            "secs": secs,
            "iops": meta.writes as f64 / secs,
            "mb_s": meta.write_bytes as f64 / secs / 1e6,
            "open_secs": meta.open_secs,
            "peak_rss_mib": usage.peak_rss_bytes as f64 / 1048576.0,
            "cpu_secs": usage.cpu_seconds,
            "retention_mib": retention_bytes as f64 / 1048576.0,
            "replica_alloc_mib": replica_alloc as f64 / 1048576.0,
            "checked": meta.checks.len(),
            "verified": bad == 0,
        })
    );
    if bad > 0 {
        bail!(
            "{bad} of {} sampled blocks do not hold their last write",
            meta.checks.len()
        );
    }
    Ok(())
}

fn prepare_recover(a: RecoverArgs) -> anyhow::Result<()> {
    const DBLOCK: u64 = 64 << 10;
    if !a.disk_size.is_multiple_of(DBLOCK) {
        bail!("--disk-size must be a multiple of 64 KiB");
    }
    let replica = a.dir.join("replica.img");
    let cfg = site(&a.dir, &replica, ReplicaFormat::Raw)?;
    let config = save(&a.dir, &cfg)?;
    let t = Instant::now();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&replica)?;
    f.set_len(a.disk_size)?;
    let mut rng = Prng::new(a.seed ^ 0x4ec0);
    let mut pool = vec![0u8; 8 << 20];
    tidemark::util::datagen::fill(&mut pool, 50, &mut rng);
    // Runs of data blocks, each written with one pwrite (at most 4 MiB).
    let mut data = 0u64;
    let mut run: Option<(u64, u64)> = None;
    let flush_run = |run: &mut Option<(u64, u64)>, f: &File| -> std::io::Result<()> {
        if let Some((at, len)) = run.take() {
            let from = ((at / DBLOCK) % 64 * DBLOCK) as usize;
            f.write_all_at(&pool[from..from + len as usize], at)?;
        }
        Ok(())
    };
    for b in 0..a.disk_size / DBLOCK {
        if rng.below(100) < a.data_pct {
            data += DBLOCK;
            match &mut run {
                Some((_, len)) if *len < 4 << 20 => *len += DBLOCK,
                _ => {
                    flush_run(&mut run, &f)?;
                    run = Some((b * DBLOCK, DBLOCK));
                }
            }
        } else {
            flush_run(&mut run, &f)?;
        }
    }
    flush_run(&mut run, &f)?;
    f.sync_all()?;
    drop(f);
    let fill_secs = t.elapsed().as_secs_f64();
    let (mut chain, _) = ChainState::new(&cfg)?;
    seed_frame(&cfg, &mut chain, a.disk_size, now_us())?;
    let alloc = std::fs::metadata(&replica)?.blocks() * 512;
    println!(
        "{}",
        serde_json::json!({
            "step": "prepare-recover",
            "config": config,
            "replica": replica,
            "disk_size": a.disk_size,
            "data_mib": data as f64 / 1048576.0,
            "replica_alloc_mib": alloc as f64 / 1048576.0,
            "fill_secs": fill_secs,
        })
    );
    Ok(())
}
