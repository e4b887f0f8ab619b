//! `tidemark target`: the master target, and its recovery commands.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use tidemark::config::TargetConfig;
use tidemark::target::recover::{
    PointDisk, PointSpec, PointView, Progress, format_time, list_points,
};

/// Run the target (apply frames in chain order to the replica images), or one
/// of its recovery commands.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TargetArgs {
    #[command(subcommand)]
    cmd: Option<TargetCmd>,
    /// The target's config file (target.toml from `tidemark init`).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum TargetCmd {
    /// List a group's recovery points and the ranges where its replica was
    /// not consistent.
    Points(PointsArgs),
    /// Write a group's disks as they were at a recovery point, while
    /// replication goes on; or, with --promote, roll the replica itself back to
    /// the point and stop replicating into it (failover).
    Recover(RecoverArgs),
    /// Serve a disk as it was at a recovery point, read-only over NBD, without
    /// copying it (until SIGINT/SIGTERM).
    Expose(ExposeArgs),
}

#[derive(clap::Args)]
struct Common {
    /// The target's config file.
    #[arg(long)]
    config: PathBuf,
    /// The group (default: the only group of the config).
    #[arg(long)]
    group: Option<String>,
}

#[derive(clap::Args)]
struct PointsArgs {
    #[command(flatten)]
    common: Common,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RecoverArgs {
    #[command(flatten)]
    common: Common,
    /// The disk (default: every disk of the group, into the --out directory).
    #[arg(long)]
    disk: Option<u16>,
    /// Which point: latest, latest-app, a tag name (or tag:NAME), a seq (or
    /// seq:N: the newest point at or before it), a UTC time
    /// YYYY-MM-DDTHH:MM:SSZ or @UNIX_SECONDS (the newest point at or before it).
    #[arg(long)]
    point: String,
    /// Output image (with --disk) or directory (one image per disk).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "raw")]
    format: OutFormat,
    /// Roll the replica itself back to the point and stop applying this group
    /// for good (failover): the replica becomes the source.
    #[arg(long)]
    promote: bool,
    /// Print one JSON object on stdout: the point and the files written.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutFormat {
    /// A sparse raw image.
    Raw,
    /// VMDK monolithicSparse (grains allocated where the disk has data).
    Vmdk,
    /// VMDK streamOptimized (compressed grains, for import into a hypervisor).
    VmdkStream,
}

impl OutFormat {
    fn lib(self) -> tidemark::target::recover::OutFormat {
        use tidemark::target::recover::OutFormat as F;
        match self {
            OutFormat::Raw => F::Raw,
            OutFormat::Vmdk => F::Vmdk,
            OutFormat::VmdkStream => F::VmdkStream,
        }
    }

    fn ext(self) -> &'static str {
        match self {
            OutFormat::Raw => "img",
            OutFormat::Vmdk | OutFormat::VmdkStream => "vmdk",
        }
    }
}

#[derive(clap::Args)]
struct ExposeArgs {
    #[command(flatten)]
    common: Common,
    /// The disk (default 0).
    #[arg(long, default_value_t = 0)]
    disk: u16,
    /// Which point (as for `recover`).
    #[arg(long)]
    point: String,
    /// Where to serve it: host:port, or unix:/path.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Export name (default `<group>-<disk>@<seq>`).
    #[arg(long)]
    export: Option<String>,
}

/// Run `target`.
pub fn run(a: TargetArgs) -> anyhow::Result<()> {
    match a.cmd {
        None => {
            let Some(config) = a.config else {
                bail!(
                    "the target needs --config target.toml (or a subcommand: points, recover, expose)"
                );
            };
            let cfg = TargetConfig::load(&config)?;
            super::run_role("target-rt", |sd| tidemark::target::run(cfg, sd))
        }
        Some(TargetCmd::Points(p)) => points(p),
        Some(TargetCmd::Recover(r)) => recover(r),
        Some(TargetCmd::Expose(e)) => expose(e),
    }
}

fn load(c: &Common) -> anyhow::Result<(TargetConfig, String)> {
    let cfg = TargetConfig::load(&c.config)?;
    let group = match &c.group {
        Some(g) => g.clone(),
        None if cfg.groups.len() == 1 => cfg.groups[0].name.clone(),
        None => bail!(
            "{} has several groups ({}): say which with --group",
            c.config.display(),
            cfg.groups
                .iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Ok((cfg, group))
}

fn points(a: PointsArgs) -> anyhow::Result<()> {
    let (cfg, group) = load(&a.common)?;
    let pts = list_points(&cfg, &group)?;
    let cat = tidemark::target::catalog::Catalog::open_read_only(&cfg.target.state_dir)?;
    let ranges = cat.ranges(&group)?;
    let events = cat.events(&group, 20)?;
    if a.json {
        let v = serde_json::json!({
            "group": group,
            "points": pts,
            "inconsistent": ranges,
            "events": events.iter().map(|(t, w)| serde_json::json!({"time_us": t, "what": w})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("group {group}: {} recovery point(s)", pts.len());
    println!(
        "{:<28} {:>14} {:>10} {:<6} {:<10} tag",
        "time (UTC)", "seq", "frame", "kind", "history"
    );
    for p in &pts {
        println!(
            "{:<28} {:>14} {:>10} {:<6} {:<10} {}",
            format_time(p.time_us),
            p.seq,
            p.frame_no,
            p.kind.as_str(),
            if p.epoch.is_some() { "kept" } else { "newest" },
            p.tag.as_deref().unwrap_or("")
        );
    }
    for r in &ranges {
        match r.end_seq {
            Some(end) => println!(
                "not consistent after seq {} ({}) until seq {} ({}): {}",
                r.after_seq,
                format_time(r.after_time_us),
                end,
                format_time(r.end_time_us.unwrap_or(0)),
                r.reason
            ),
            None => println!(
                "not consistent after seq {} ({}) until now: {}",
                r.after_seq,
                format_time(r.after_time_us),
                r.reason
            ),
        }
    }
    for (t, w) in &events {
        println!("{}: {w}", format_time(*t));
    }
    Ok(())
}

fn recover(a: RecoverArgs) -> anyhow::Result<()> {
    let (cfg, group) = load(&a.common)?;
    let spec: PointSpec = a.point.parse().map_err(anyhow::Error::msg)?;
    if a.promote && a.out.is_some() {
        bail!("--promote rolls the replica back in place: it takes no --out");
    }
    if !a.promote && a.out.is_none() {
        bail!("recover needs --out (an image with --disk, else a directory)");
    }
    let mut view = PointView::open(&cfg, &group, &spec, a.promote)
        .with_context(|| format!("group {group}: point {}", a.point))?;
    let g = view.point().clone();
    let (kind, tag) = view.kind();
    let point_json = serde_json::json!({
        "group": group,
        "seq": g.last_seq,
        "frame_no": g.frame_no,
        "time_us": g.time_us,
        "kind": kind.as_str(),
        "tag": tag,
    });
    eprintln!(
        "group {group}: point seq {} (frame {}, {}, {}{})",
        g.last_seq,
        g.frame_no,
        format_time(g.time_us),
        kind.as_str(),
        tag.map(|t| format!(" {t:?}")).unwrap_or_default()
    );
    if a.promote {
        let mut p = Progress::new(format!("promote {group}: rolling the replica back"));
        let n = view.roll_back(&mut |d, t| p.update(d, t))?;
        eprintln!(
            "group {group}: promoted at seq {}: {n} bytes rolled back; the replica is the source now, nothing more is applied to it",
            g.last_seq
        );
        if a.json {
            println!(
                "{}",
                serde_json::json!({"point": point_json, "promoted": true, "rolled_back_bytes": n})
            );
        }
        return Ok(());
    }
    let out = a.out.unwrap_or_default();
    let disks: Vec<(u16, u64)> = match a.disk {
        Some(d) => view
            .disks()
            .into_iter()
            .filter(|(id, _)| *id == d)
            .collect(),
        None => view.disks(),
    };
    if disks.is_empty() {
        bail!("group {group} has no disk {}", a.disk.unwrap_or(0));
    }
    if a.disk.is_none() {
        tidemark::util::durable::create_dir_durable(&out)
            .with_context(|| format!("creating {}", out.display()))?;
    }
    let mut outputs = Vec::new();
    for (id, _) in disks {
        let path = if a.disk.is_some() {
            out.clone()
        } else {
            out.join(format!("{group}-disk{id}.{}", a.format.ext()))
        };
        let mut p = Progress::new(format!("recover {group} disk {id} → {}", path.display()));
        view.copy_to(id, &path, a.format.lib(), &mut |d, t| p.update(d, t))?;
        if !a.json {
            println!("{}", path.display());
        }
        outputs.push(serde_json::json!({"disk": id, "path": path}));
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"point": point_json, "outputs": outputs})
        );
    }
    Ok(())
}

fn parse_listen(s: &str) -> anyhow::Result<tidemark::frontend::nbd::NbdListen> {
    use tidemark::frontend::nbd::NbdListen;
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(NbdListen::Unix(Path::new(p).to_path_buf()));
    }
    Ok(NbdListen::Tcp(s.parse().with_context(|| {
        format!("--listen {s:?} is not host:port or unix:/path")
    })?))
}

fn expose(a: ExposeArgs) -> anyhow::Result<()> {
    use tidemark::frontend::nbd::{NbdConfig, NbdExport, NbdServer};
    let (cfg, group) = load(&a.common)?;
    let spec: PointSpec = a.point.parse().map_err(anyhow::Error::msg)?;
    let listen = parse_listen(&a.listen)?;
    let view = PointView::open(&cfg, &group, &spec, false)
        .with_context(|| format!("group {group}: point {}", a.point))?;
    let g = view.point().clone();
    let view = Arc::new(Mutex::new(view));
    let disk = PointDisk::new(view, a.disk)?;
    let name = a
        .export
        .unwrap_or_else(|| format!("{group}-{}@{}", a.disk, g.last_seq));
    let export = NbdExport {
        name: name.clone(),
        description: format!(
            "group {group} disk {} at seq {} ({})",
            a.disk,
            g.last_seq,
            format_time(g.time_us)
        ),
        disk: Arc::new(disk),
    };
    super::run_role("expose-rt", |sd| async move {
        let server = NbdServer::bind(NbdConfig::new(vec![listen]), vec![export]).await?;
        for l in server.local_addrs() {
            println!("{}", l.uri(&name));
        }
        eprintln!(
            "serving group {group} disk {} at seq {} read-only; SIGINT or SIGTERM stops",
            a.disk, g.last_seq
        );
        server.run(sd).await
    })
}
