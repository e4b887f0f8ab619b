//! Serve raw image files as FUSE files (without capture), for trying the FUSE
//! frontend by hand and for benchmarking it with fio through a loop device:
//!
//! ```text
//! cargo run --release --example fuse_serve -- \
//!     [--threads N] [--max-background N] MOUNTPOINT IMAGE...
//! losetup --find --show --direct-io=on MOUNTPOINT/<image file name>
//! ```
//!
//! Each image appears under its file name. Serves until SIGINT or SIGTERM, then
//! unmounts (lazily when a loop device still holds a file) and prints the counters.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use nix::sys::signal::{SigSet, Signal};
use tidemark::capture::backing::BackingDisk;
use tidemark::frontend::fuse::{FuseFile, FuseOptions, mount};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut opts = FuseOptions::default();
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => opts.threads = args.next().context("--threads N")?.parse()?,
            "--max-background" => {
                opts.max_background = args.next().context("--max-background N")?.parse()?
            }
            _ => paths.push(PathBuf::from(a)),
        }
    }
    if paths.len() < 2 {
        bail!("usage: fuse_serve [--threads N] [--max-background N] MOUNTPOINT IMAGE...");
    }
    let mountpoint = paths.remove(0);
    let mut files = Vec::new();
    for p in &paths {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .context("image path without a UTF-8 file name")?
            .to_string();
        let disk = BackingDisk::open(p).with_context(|| format!("opening {}", p.display()))?;
        files.push(FuseFile {
            name,
            disk: Arc::new(disk),
        });
    }
    // Block the signals before the serving threads start, so that they all
    // inherit the mask and only the sigwait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    let m = mount(&mountpoint, files, &opts)?;
    println!("{}", m.mountpoint().display());
    let sig = signals.wait()?;
    let stats = m.stats();
    let how = m.unmount()?;
    eprintln!("{sig:?}: unmounted ({how:?}); {:?}", stats.snapshot());
    Ok(())
}
