//! Bringing a recovery point back: resolve a point (latest, a tag, a time, a
//! seq) in the catalog, pin it so the target keeps what it needs, and read the
//! group's disks as they were at that point (the replica overlaid with the
//! before-images since the point), while replication goes on. `recover` copies
//! them to images, `expose` serves them read-only over NBD, `promote` rolls the
//! replica itself back to the point and stops replication into it
//! (docs/CONSISTENCY.md, "Recover").

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::catalog::{Catalog, CatalogError, PointRow};
use super::retention::RETENTION_DIR;
use super::retention::journal::{JournalError, PointKind};
use super::retention::pins::{Granted, Pin, Want};
use super::retention::reader::Overlay;
use super::{TargetError, run_group_offline};
use crate::config::{TargetConfig, TargetGroup};
use crate::error::{Classify, ErrorKind};
use crate::frontend::{BlockIo, IoError, IoErrorKind, Op, check_range};
use crate::image::vmdk::export_stream_optimized;
use crate::image::{Engine, Image, ImageError, ImageFormat, ImageSpec, WriteOp, open_image};
use crate::util::lockfile::{self, LockError};

/// How long a reader waits for a running target to answer its pin.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes read per step of a copy.
const CHUNK: usize = 4 << 20;

/// Which point to bring back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSpec {
    /// The newest consistent point.
    Latest,
    /// The newest application-consistent tag.
    LatestApp,
    /// The newest point tagged with this name.
    Tag(String),
    /// The newest point at or before this source time, µs since the epoch.
    Time(u64),
    /// The newest point at or before this seq.
    Seq(u64),
}

impl FromStr for PointSpec {
    type Err = String;

    /// `latest`, `latest-app`, `seq:N` or a bare number (a seq), `time:T` or
    /// a bare `YYYY-MM-DDTHH:MM:SS[.frac][Z]` (UTC) or `@UNIX_SECONDS`,
    /// `tag:NAME` or any other word (a tag name).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty point".into());
        }
        match s {
            "latest" => return Ok(PointSpec::Latest),
            "latest-app" => return Ok(PointSpec::LatestApp),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n
                .parse()
                .map(PointSpec::Seq)
                .map_err(|_| format!("{n:?} is not a seq"));
        }
        if let Some(t) = s.strip_prefix("time:") {
            return parse_time(t).map(PointSpec::Time);
        }
        if let Some(t) = s.strip_prefix("tag:") {
            return Ok(PointSpec::Tag(t.to_string()));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(PointSpec::Seq)
                .map_err(|_| format!("{s:?} is not a seq"));
        }
        if s.starts_with('@')
            || (s.len() >= 19 && s.as_bytes()[4] == b'-' && s.as_bytes()[10] == b'T')
        {
            return parse_time(s).map(PointSpec::Time);
        }
        Ok(PointSpec::Tag(s.to_string()))
    }
}

/// Parse `@SECONDS[.frac]` or `YYYY-MM-DDTHH:MM:SS[.frac][Z]` (UTC) into µs.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a time (use YYYY-MM-DDTHH:MM:SSZ in UTC, or @UNIX_SECONDS)");
    if let Some(secs) = s.strip_prefix('@') {
        let f: f64 = secs.parse().map_err(|_| bad())?;
        if !(0.0..1e11).contains(&f) {
            return Err(bad());
        }
        return Ok((f * 1e6) as u64);
    }
    crate::util::time::parse_utc(s).ok_or_else(bad)
}

/// Format µs since the epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format_time(us: u64) -> String {
    crate::util::time::format_us_exact(us)
}

/// Errors of recover, expose and promote.
#[derive(Debug, Error)]
pub enum RecoverError {
    /// The request names something the configuration does not have.
    #[error("{0}")]
    Config(String),
    /// No retained point matches.
    #[error("{0}")]
    NoPoint(String),
    /// The catalog cannot be read.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The target refused the pin (the point is gone, nothing applied yet...).
    #[error("the target refused: {0}")]
    Refused(String),
    /// A running target did not answer the pin in time.
    #[error(
        "the target holds {state_dir} but did not answer within {secs} s (is group {group} stalled or paused?)"
    )]
    NoAnswer {
        /// Its state directory.
        state_dir: PathBuf,
        /// The group.
        group: String,
        /// How long we waited.
        secs: u64,
    },
    /// Running the group's start-up without a target failed.
    #[error(transparent)]
    Target(#[from] Box<TargetError>),
    /// The retention journal cannot be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A replica or an output image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl Classify for RecoverError {
    fn kind(&self) -> ErrorKind {
        match self {
            RecoverError::Config(_) | RecoverError::NoPoint(_) | RecoverError::Refused(_) => {
                ErrorKind::Config
            }
            RecoverError::Catalog(e) => e.kind(),
            RecoverError::NoAnswer { .. } => ErrorKind::Throttled,
            RecoverError::Target(e) => e.kind(),
            RecoverError::Journal(e) => e.kind(),
            RecoverError::Image(e) => e.kind(),
            RecoverError::Io { .. } => ErrorKind::Io,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RecoverError + '_ {
    move |source| RecoverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The points of `group`, from the catalog (oldest first).
pub fn list_points(cfg: &TargetConfig, group: &str) -> Result<Vec<PointRow>, RecoverError> {
    group_cfg(cfg, group)?;
    let c = Catalog::open_read_only(&cfg.target.state_dir)?;
    Ok(c.points(group)?)
}

fn group_cfg<'a>(cfg: &'a TargetConfig, group: &str) -> Result<&'a TargetGroup, RecoverError> {
    cfg.groups.iter().find(|g| g.name == group).ok_or_else(|| {
        RecoverError::Config(format!(
            "target config has no group {group:?} (groups: {})",
            cfg.groups
                .iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// What to pin for `spec`, from the catalog.
fn resolve(
    cfg: &TargetConfig,
    group: &str,
    spec: &PointSpec,
) -> Result<(Want, Option<PointRow>), RecoverError> {
    if *spec == PointSpec::Latest {
        return Ok((Want::Latest, None));
    }
    let rows = Catalog::open_read_only(&cfg.target.state_dir)?.points(group)?;
    let newest_frame = rows.iter().map(|r| r.frame_no).max();
    let pick = match spec {
        PointSpec::Latest => None,
        PointSpec::LatestApp => rows.iter().rev().find(|r| r.kind == PointKind::App),
        PointSpec::Tag(name) => rows.iter().rev().find(|r| r.tag.as_deref() == Some(name)),
        PointSpec::Time(t) => rows.iter().rev().find(|r| r.time_us <= *t),
        PointSpec::Seq(s) => rows.iter().rev().find(|r| r.seq <= *s),
    };
    let Some(row) = pick.cloned() else {
        let oldest = rows
            .first()
            .map(|r| {
                format!(
                    "the oldest retained point is seq {} at {}",
                    r.seq,
                    format_time(r.time_us)
                )
            })
            .unwrap_or_else(|| "no point is retained".into());
        return Err(RecoverError::NoPoint(format!(
            "group {group}: no recovery point matches {spec:?} ({oldest})"
        )));
    };
    match row.epoch {
        Some(epoch) => Ok((Want::Epoch { epoch }, Some(row))),
        // Without before-images only the newest point can be read, while the
        // replica is still at it.
        None if Some(row.frame_no) == newest_frame => Ok((Want::Latest, Some(row))),
        None => Err(RecoverError::NoPoint(format!(
            "group {group}: the point at seq {} is no longer recoverable (retention is off or has dropped its before-images)",
            row.seq
        ))),
    }
}

/// One replica disk being read.
#[derive(Debug)]
struct Replica {
    id: u16,
    image: Box<dyn Image>,
    size: u64,
}

/// The format of a recovered image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    /// A sparse raw file.
    Raw,
    /// VMDK monolithicSparse.
    Vmdk,
    /// VMDK streamOptimized (compressed, for import into a hypervisor).
    VmdkStream,
}

/// A group's disks as they were at one point, readable while replication goes
/// on (the pin is held until this is dropped).
#[derive(Debug)]
pub struct PointView {
    group: String,
    granted: Granted,
    overlay: Overlay,
    replicas: Vec<Replica>,
    _pin: Pin,
    promoted: bool,
}

impl PointView {
    /// Resolve `spec` for `group`, pin it and open the replicas. With
    /// `promote`, the target also stops applying the group for good before
    /// answering. Blocking.
    pub fn open(
        cfg: &TargetConfig,
        group: &str,
        spec: &PointSpec,
        promote: bool,
    ) -> Result<PointView, RecoverError> {
        let g = group_cfg(cfg, group)?;
        let (want, row) = resolve(cfg, group, spec)?;
        let gdir = cfg.target.state_dir.join(group);
        crate::util::durable::create_dir_durable(&gdir).map_err(io_at(&gdir))?;
        let pin = Pin::create(&gdir, want, promote).map_err(io_at(&gdir))?;
        // No target running: run the group's start-up here (replay of the redo
        // journal, then the pin is answered). A target that starts later sees
        // the pin too and keeps what it needs.
        match lockfile::lock_dir(&cfg.target.state_dir) {
            Ok(lock) => {
                run_group_offline(cfg, group).map_err(Box::new)?;
                drop(lock);
            }
            Err(LockError::Locked { .. }) => {}
            Err(LockError::Io { path, source }) => return Err(RecoverError::Io { path, source }),
        }
        let ack = pin
            .wait_ack(ACK_TIMEOUT)
            .map_err(io_at(&gdir))?
            .ok_or_else(|| RecoverError::NoAnswer {
                state_dir: cfg.target.state_dir.clone(),
                group: group.to_string(),
                secs: ACK_TIMEOUT.as_secs(),
            })?;
        let granted = match (ack.granted, ack.error) {
            (Some(g), _) => g,
            (None, e) => {
                return Err(RecoverError::Refused(
                    e.unwrap_or_else(|| "no reason given".into()),
                ));
            }
        };
        if let Some(row) = &row
            && row.epoch.is_none()
            && row.frame_no != granted.frame_no
        {
            return Err(RecoverError::NoPoint(format!(
                "group {group}: the point at seq {} is no longer recoverable: the replica has moved on to seq {} and retention is off",
                row.seq, granted.last_seq
            )));
        }
        if promote && !ack.stopped {
            return Err(RecoverError::Refused(format!(
                "group {group}: the target did not stop applying"
            )));
        }
        let overlay = Overlay::new(&gdir.join(RETENTION_DIR), group, &granted)?;
        let mut replicas = Vec::new();
        for d in &g.disks {
            let id = u16::try_from(d.id)
                .map_err(|_| RecoverError::Config(format!("disk id {} above 65535", d.id)))?;
            let image = open_image(&ImageSpec {
                path: d.path.clone(),
                format: d.format.image_format(),
                engine: Engine::Sync,
                create_size: None,
                direct_io: crate::image::DirectIo::Off,
            })?;
            let size = image.size();
            replicas.push(Replica { id, image, size });
        }
        Ok(PointView {
            group: group.to_string(),
            granted,
            overlay,
            replicas,
            _pin: pin,
            promoted: promote,
        })
    }

    /// The point being read.
    pub fn point(&self) -> &Granted {
        &self.granted
    }

    /// Its kind and tag (from the journal's point record).
    pub fn kind(&self) -> (PointKind, Option<&str>) {
        let p = self.overlay.point();
        (p.kind, p.tag.as_deref())
    }

    /// The disks: (id, size).
    pub fn disks(&self) -> Vec<(u16, u64)> {
        self.replicas.iter().map(|r| (r.id, r.size)).collect()
    }

    fn replica(&self, disk: u16) -> Result<usize, RecoverError> {
        self.replicas
            .iter()
            .position(|r| r.id == disk)
            .ok_or_else(|| RecoverError::Config(format!("group {} has no disk {disk}", self.group)))
    }

    /// Read `buf.len()` bytes of `disk` at `offset`, as they were at the point.
    pub fn read(&mut self, disk: u16, offset: u64, buf: &mut [u8]) -> Result<(), RecoverError> {
        let i = self.replica(disk)?;
        self.replicas[i].image.read_at(offset, buf)?;
        // The replica first, then the journal: see retention::reader.
        self.overlay.apply(disk, offset, buf)?;
        Ok(())
    }

    /// Like [`PointView::read`], but reads from the replica only the ranges
    /// that may hold data (holes read as zeros without a read) and returns
    /// `false` when the whole range read as zeros at the point (a hole that
    /// nothing has changed since the point), so copies skip holes.
    pub fn read_or_hole(
        &mut self,
        disk: u16,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool, RecoverError> {
        let i = self.replica(disk)?;
        let len = buf.len() as u64;
        let img = &mut self.replicas[i].image;
        let data = img.data_ranges(offset, len)?;
        // The replica first (its holes are part of it)...
        buf.fill(0);
        for &(o, l) in &data {
            let (o, l) = (o.max(offset), (o + l).min(offset + len));
            if o < l {
                let s = (o - offset) as usize;
                img.read_at(o, &mut buf[s..s + (l - o) as usize])?;
            }
        }
        // ...then the journal: a write since the point has put its
        // before-image there before it changed the replica.
        self.overlay.refresh()?;
        let changed = self.overlay.changed_in(disk, offset, len);
        if data.is_empty() && !changed {
            return Ok(false);
        }
        if changed {
            self.overlay.apply(disk, offset, buf)?;
        }
        Ok(true)
    }

    /// Copy `disk` at the point to an image at `out` in `format` (holes and
    /// all-zero chunks are not written), reporting progress (bytes done,
    /// total). Returns the bytes of data written.
    pub fn copy_to(
        &mut self,
        disk: u16,
        out: &Path,
        format: OutFormat,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, RecoverError> {
        let size = self.replicas[self.replica(disk)?].size;
        if out.exists() {
            return Err(RecoverError::Config(format!(
                "{} exists: recover never overwrites a file (remove it first)",
                out.display()
            )));
        }
        if format == OutFormat::VmdkStream {
            let mut err: Option<RecoverError> = None;
            let mut read = |off: u64, buf: &mut [u8]| -> Result<(), ImageError> {
                match self.read_or_hole(disk, off, buf) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        buf.fill(0);
                        Ok(())
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        err = Some(e);
                        Err(ImageError::Export {
                            path: out.to_path_buf(),
                            offset: off,
                            source: io::Error::other(msg),
                        })
                    }
                }
            };
            let r = export_stream_optimized(out, size, &mut read, None, Some(progress));
            if let Some(e) = err {
                return Err(e);
            }
            return Ok(r?.file_bytes);
        }
        let mut img = open_image(&ImageSpec {
            path: out.to_path_buf(),
            format: match format {
                OutFormat::Vmdk => ImageFormat::VmdkSparse,
                _ => ImageFormat::Raw,
            },
            engine: Engine::Sync,
            create_size: Some(size),
            direct_io: crate::image::DirectIo::Off,
        })?;
        // Reads here, writes on a second thread: the two disks' work overlaps.
        let (full_tx, full_rx) = crossbeam_channel::bounded::<(u64, Vec<u8>)>(2);
        let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<u8>>(3);
        for _ in 0..3 {
            let _ = empty_tx.send(vec![0u8; CHUNK]);
        }
        let recycle = empty_tx.clone();
        std::thread::scope(|scope| -> Result<u64, RecoverError> {
            let writer = scope.spawn(move || -> Result<u64, ImageError> {
                let mut written = 0u64;
                for (off, buf) in full_rx {
                    let ops = nonzero_runs(off, &buf);
                    if !ops.is_empty() {
                        img.write_batch(&ops)?;
                        written += ops.iter().map(|o| o.len()).sum::<u64>();
                    }
                    drop(ops);
                    if empty_tx.send(buf).is_err() {
                        break;
                    }
                }
                img.flush()?;
                Ok(written)
            });
            let mut off = 0u64;
            let mut failed = None;
            while off < size {
                let n = (size - off).min(CHUNK as u64) as usize;
                let Ok(mut buf) = empty_rx.recv() else {
                    break;
                };
                buf.resize(n, 0);
                match self.read_or_hole(disk, off, &mut buf) {
                    Ok(true) => {
                        if full_tx.send((off, buf)).is_err() {
                            break;
                        }
                    }
                    Ok(false) => {
                        let _ = recycle.send(buf);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                off += n as u64;
                progress(off, size);
            }
            drop(full_tx);
            let written = writer
                .join()
                .map_err(|_| RecoverError::Config("the writer thread panicked".into()))?;
            if let Some(e) = failed {
                return Err(e);
            }
            Ok(written?)
        })
    }

    /// Roll the replicas themselves back to the point (the target has stopped
    /// applying the group: [`PointView::open`] with `promote`). Writes the
    /// before-image of every block changed since the point into the replica;
    /// running it again after a crash gives the same result. Returns the bytes
    /// written.
    pub fn roll_back(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64, RecoverError> {
        if !self.promoted {
            return Err(RecoverError::Config(
                "roll_back needs a view opened with promote".into(),
            ));
        }
        self.overlay.refresh()?;
        let work: Vec<(u16, Vec<(u64, u64)>)> = self
            .replicas
            .iter()
            .map(|r| (r.id, self.overlay.changed_ranges(r.id)))
            .collect();
        let total: u64 = work
            .iter()
            .flat_map(|(_, v)| v.iter().map(|(_, l)| *l))
            .sum();
        let mut done = 0u64;
        let mut buf = Vec::new();
        for (disk, ranges) in work {
            let i = self.replica(disk)?;
            for (off, len) in ranges {
                let size = self.replicas[i].size;
                let mut o = off;
                let end = (off + len).min(size);
                while o < end {
                    let n = (end - o).min(CHUNK as u64) as usize;
                    buf.resize(n, 0);
                    self.overlay.apply(disk, o, &mut buf[..n])?;
                    self.replicas[i].image.write_batch(&[WriteOp::Write {
                        offset: o,
                        data: &buf[..n],
                    }])?;
                    o += n as u64;
                    done += n as u64;
                    progress(done, total);
                }
            }
        }
        for r in &mut self.replicas {
            r.image.flush()?;
        }
        Ok(done)
    }
}

/// The writes of a chunk read at `off`: its runs of 64 KiB blocks that are
/// not all zeros (a recovered image keeps holes where the disk reads zeros).
fn nonzero_runs(off: u64, buf: &[u8]) -> Vec<WriteOp<'_>> {
    const BLOCK: usize = 64 * 1024;
    let mut ops = Vec::new();
    let mut start: Option<usize> = None;
    for (i, b) in buf.chunks(BLOCK).enumerate() {
        let at = i * BLOCK;
        if crate::util::zero::is_zero(b) {
            if let Some(s) = start.take() {
                ops.push(WriteOp::Write {
                    offset: off + s as u64,
                    data: &buf[s..at],
                });
            }
        } else if start.is_none() {
            start = Some(at);
        }
    }
    if let Some(s) = start {
        ops.push(WriteOp::Write {
            offset: off + s as u64,
            data: &buf[s..],
        });
    }
    ops
}

/// A disk of a [`PointView`] as a read-only [`BlockIo`], for `expose`.
pub struct PointDisk {
    view: std::sync::Arc<std::sync::Mutex<PointView>>,
    disk: u16,
    size: u64,
}

impl PointDisk {
    /// Disk `disk` of `view`.
    pub fn new(
        view: std::sync::Arc<std::sync::Mutex<PointView>>,
        disk: u16,
    ) -> Result<PointDisk, RecoverError> {
        let size = {
            let v = view.lock().unwrap_or_else(|e| e.into_inner());
            let i = v.replica(disk)?;
            v.replicas[i].size
        };
        Ok(PointDisk { view, disk, size })
    }
}

impl BlockIo for PointDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len() as u64;
        check_range(Op::Read, offset, len, self.size)?;
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        v.read(self.disk, offset, buf).map_err(|e| {
            IoError::new(
                Op::Read,
                offset,
                len,
                IoErrorKind::Backing(io::Error::other(e.to_string())),
            )
        })
    }

    fn write_at(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), IoError> {
        Err(IoError::new(
            Op::Write,
            offset,
            data.len() as u64,
            IoErrorKind::ReadOnly,
        ))
    }

    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
        Err(IoError::new(Op::Trim, offset, len, IoErrorKind::ReadOnly))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        _fua: bool,
    ) -> Result<(), IoError> {
        Err(IoError::new(
            Op::WriteZeroes,
            offset,
            len,
            IoErrorKind::ReadOnly,
        ))
    }
}

/// Prints progress to stderr at most once a second (and at the end).
pub struct Progress {
    what: String,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    /// Progress of `what`.
    pub fn new(what: impl Into<String>) -> Progress {
        Progress {
            what: what.into(),
            started: Instant::now(),
            last: None,
        }
    }

    /// Report `done` of `total` bytes.
    pub fn update(&mut self, done: u64, total: u64) {
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if !due && done < total {
            return;
        }
        self.last = Some(now);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        eprintln!(
            "{}: {:.1} / {:.1} MiB ({pct:.0} %), {:.0} MB/s",
            self.what,
            done as f64 / 1048576.0,
            total as f64 / 1048576.0,
            done as f64 / secs / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_specs_parse() {
        assert_eq!("latest".parse::<PointSpec>().unwrap(), PointSpec::Latest);
        assert_eq!(
            "latest-app".parse::<PointSpec>().unwrap(),
            PointSpec::LatestApp
        );
        assert_eq!("12345".parse::<PointSpec>().unwrap(), PointSpec::Seq(12345));
        assert_eq!("seq:7".parse::<PointSpec>().unwrap(), PointSpec::Seq(7));
        assert_eq!(
            "nightly".parse::<PointSpec>().unwrap(),
            PointSpec::Tag("nightly".into())
        );
        assert_eq!(
            "tag:123".parse::<PointSpec>().unwrap(),
            PointSpec::Tag("123".into())
        );
        assert_eq!(
            "@1.5".parse::<PointSpec>().unwrap(),
            PointSpec::Time(1_500_000)
        );
        assert_eq!(
            "2026-12-06T05:21:58Z".parse::<PointSpec>().unwrap(),
            PointSpec::Time(1_796_534_518_000_000)
        );
        assert!("seq:x".parse::<PointSpec>().is_err());
        assert!("2026-13-06T05:21:58Z".parse::<PointSpec>().is_err());
        assert!("".parse::<PointSpec>().is_err());
    }

    #[test]
    fn times_format_and_parse_back() {
        for us in [0u64, 1_796_534_518_123_456, 951_782_400_000_000] {
            let s = format_time(us);
            assert_eq!(parse_time(&s).unwrap(), us, "{s}");
        }
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000000Z");
    }
}
