//! Recovery at open: scan every group and segment, verify every record, rebuild
//! the index, cut torn tails, and report every problem.
//!
//! Rules (docs/SPOOL.md, "Recovery"):
//! * Only the newest segment of a group can have a torn tail, because the writer
//!   makes a segment durable before it creates the next. Bad bytes there with no
//!   valid record after them are a torn tail: cut (ftruncate + fsync), warned.
//! * Bad bytes in the newest segment followed by a valid record are corruption.
//!   The bytes from the bad record on are copied to `<segment>.damaged-at-<offset>`
//!   (fsync'd) and then cut, so the group's chain stays a prefix and its head is
//!   the last record before the damage; nothing is deleted.
//! * Bad bytes in an older segment are corruption: the file is left unchanged,
//!   the scan resumes at the next valid record, and the hole is reported.
//! * In the newest segment, a record below the segment's first frame is bytes
//!   left in a reused file (docs/SPOOL.md, "Recycled segment files"): it counts
//!   as bad bytes, so old bytes after the last new record are cut as a torn tail.
//! * Files the spool cannot use are renamed to `<name>.damaged`, never deleted.
//! * Free files (`*.free`, trimmed segments kept for reuse) are removed.
//! * A run of zeros shorter than 4096 bytes that ends a segment at a 4096-aligned
//!   size is padding written by the direct-I/O writer: the segment's logical
//!   length ends before it, nothing is cut or reported.
//!
//! In direct mode every read here is an `O_DIRECT` read too, although no writer
//! runs yet: recovery decides what to cut, so it must see what is on the device,
//! not a page-cache page that could be stale (a buffered reader racing a direct
//! write, in this process or another, can leave one behind), and reading the
//! whole spool through the page cache would allocate and pin it for nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use super::dio::{self, AlignedBuf};
use super::index::{Entry, GroupIndex, SegIndex, SpoolIndex};
use super::record::{
    FormatError, FormatVersion, SEGMENT_HEADER_LEN, SegmentHeader, validate_group,
};
use super::segment::{self, ScanEvent, parse_segment_name};
use super::state::{self, STATE_FILE, STATE_TMP, StateError, fsync_dir};
use super::writer::GroupInit;
use super::{LOCK_FILE, SpoolError, SpoolHead, io_err};

/// What recovery found, per group and outside any group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// One entry per group directory, sorted by name.
    pub groups: Vec<GroupRecovery>,
    /// Problems in the spool directory itself (unknown entries).
    pub problems: Vec<Problem>,
}

impl RecoveryReport {
    /// True when no torn tail was cut and no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
            && self
                .groups
                .iter()
                .all(|g| g.torn_tails.is_empty() && g.problems.is_empty())
    }

    /// The entry for one group.
    pub fn group(&self, name: &str) -> Option<&GroupRecovery> {
        self.groups.iter().find(|g| g.group == name)
    }
}

/// Recovery of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecovery {
    /// Group name.
    pub group: String,
    /// Untrimmed frames indexed.
    pub frames: u64,
    /// Bytes of its segment files after recovery.
    pub bytes: u64,
    /// Segment files in use.
    pub segments: usize,
    /// Recovered head: the later of the newest record and the state file's head.
    pub head: Option<SpoolHead>,
    /// Recovered trim point.
    pub trimmed_through: u64,
    /// Torn tails cut.
    pub torn_tails: Vec<TornTail>,
    /// Everything else that was wrong.
    pub problems: Vec<Problem>,
}

/// A torn tail cut from the newest segment (an append that never completed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Segment file.
    pub file: PathBuf,
    /// Where the file was cut.
    pub offset: u64,
    /// Bytes removed.
    pub bytes_cut: u64,
    /// What was wrong at `offset`.
    pub why: String,
}

/// Kinds of problems recovery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Bytes that are not a valid record, with valid data around them.
    BadRecord,
    /// A valid record whose predecessor is not the record before it: frames
    /// between them are missing.
    ChainGap,
    /// A valid record whose frame number is not above the one before it (or is
    /// below its segment's first frame); not indexed.
    OutOfOrder,
    /// A segment file whose header is unusable; renamed to `.damaged`.
    BadSegment,
    /// The state file is unusable; renamed to `.damaged`, trim point reset.
    BadStateFile,
    /// The state file's head is above every record: acknowledged frames are lost.
    LostFrames,
    /// A quarantine file from an earlier recovery is present.
    Quarantined,
    /// A file or directory the spool does not know; left alone.
    UnknownEntry,
}

/// One problem, with where it is and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The file (or directory) concerned.
    pub file: PathBuf,
    /// Offset in the file (0 when not about a position).
    pub offset: u64,
    /// What failed and what recovery did.
    pub detail: String,
}

/// Everything `Spool::open` needs from recovery.
pub struct Recovered {
    /// The rebuilt index.
    pub index: SpoolIndex,
    /// The writer's starting point per group.
    pub writer_groups: Vec<(String, GroupInit)>,
    /// The report for the caller.
    pub report: RecoveryReport,
}

fn problem(kind: ProblemKind, file: &Path, offset: u64, detail: String) -> Problem {
    tracing::error!(kind = ?kind, file = %file.display(), offset, %detail, "spool recovery problem");
    Problem {
        kind,
        file: file.to_path_buf(),
        offset,
        detail,
    }
}

/// A path next to `p` with `suffix` appended that does not exist yet.
fn free_name(p: &Path, suffix: &str) -> PathBuf {
    let base = format!("{}{suffix}", p.display());
    let mut cand = PathBuf::from(&base);
    let mut n = 1;
    while cand.exists() {
        cand = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    cand
}

/// Rename `p` out of the way (to `<p>.damaged`), durably. Returns the new path.
fn quarantine(p: &Path, dir: &Path) -> Result<PathBuf, SpoolError> {
    let q = free_name(p, ".damaged");
    fs::rename(p, &q).map_err(io_err("quarantine (rename)", p))?;
    fsync_dir(dir)?;
    Ok(q)
}

/// Copy bytes `[from, end)` of `file` into a new quarantine file, fsync it and its
/// directory. Returns its path. The source is read with block-aligned reads (it
/// may be open with `O_DIRECT`); the copy is written buffered.
fn quarantine_tail(
    file: &File,
    path: &Path,
    dir: &Path,
    from: u64,
    end: u64,
) -> Result<PathBuf, SpoolError> {
    let q = free_name(path, &format!(".damaged-at-{from}"));
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&q)
        .map_err(io_err("create quarantine file", &q))?;
    let mut buf = AlignedBuf::new(1 << 20);
    let mut pos = dio::floor(from);
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let rd = dio::ceil_usize(want);
        dio::read_aligned(file, pos, &mut buf.bytes_mut()[..rd], want)
            .map_err(io_err("read", path))?;
        let skip = from.saturating_sub(pos) as usize;
        out.write_all(&buf.bytes()[skip..want])
            .map_err(io_err("write", &q))?;
        pos += want as u64;
    }
    out.sync_all().map_err(io_err("fsync", &q))?;
    fsync_dir(dir)?;
    Ok(q)
}

fn truncate(file: &File, path: &Path, len: u64) -> Result<(), SpoolError> {
    file.set_len(len).map_err(io_err("truncate", path))?;
    file.sync_all().map_err(io_err("fsync", path))
}

/// Recover the spool at `root` (which exists and is locked by the caller),
/// reading segments with `O_DIRECT` when `direct`.
pub fn recover(root: &Path, direct: bool) -> Result<Recovered, SpoolError> {
    let mut report = RecoveryReport::default();
    let mut index = SpoolIndex::default();
    let mut writer_groups = Vec::new();
    let mut names = Vec::new();
    for ent in fs::read_dir(root).map_err(io_err("list", root))? {
        let ent = ent.map_err(io_err("list", root))?;
        let path = ent.path();
        let name = ent.file_name();
        let Some(name) = name.to_str() else {
            report.problems.push(problem(
                ProblemKind::UnknownEntry,
                &path,
                0,
                "name is not UTF-8; left alone".into(),
            ));
            continue;
        };
        // The lock file, and the relay's status snapshot that lives beside the groups.
        if name == LOCK_FILE
            || name == dio::PROBE_FILE
            || name == crate::util::statusfile::STATUS_FILE
            || name == crate::util::statusfile::STATUS_TMP
        {
            continue;
        }
        let is_dir = ent.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir || validate_group(name).is_err() {
            report.problems.push(problem(
                ProblemKind::UnknownEntry,
                &path,
                0,
                "not a group directory (group names are 1..=32 bytes of a-z, 0-9, '-'); left alone"
                    .into(),
            ));
            continue;
        }
        names.push(name.to_string());
    }
    names.sort();
    for name in names {
        let (gi, init, gr) = recover_group(root, &name, direct)?;
        index.groups.insert(name.clone(), gi);
        writer_groups.push((name, init));
        report.groups.push(gr);
    }
    Ok(Recovered {
        index,
        writer_groups,
        report,
    })
}

struct SegFile {
    first: u64,
    path: PathBuf,
    file: File,
    len: u64,
    version: FormatVersion,
}

/// Open and check the header of every segment file; quarantine unusable ones.
fn open_segments(
    gdir: &Path,
    group: &str,
    mut names: Vec<(u64, PathBuf)>,
    direct: bool,
    gr: &mut GroupRecovery,
) -> Result<Vec<SegFile>, SpoolError> {
    names.sort();
    let count = names.len();
    let mut out = Vec::new();
    for (i, (first, path)) in names.into_iter().enumerate() {
        let newest = i + 1 == count;
        let file = dio::open_options(direct)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open segment", &path))?;
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        let verdict: Result<FormatVersion, String> = if len > u64::from(u32::MAX) {
            Err(format!("{len} bytes, above the 4 GiB segment limit"))
        } else if len < SEGMENT_HEADER_LEN as u64 {
            if newest {
                // Created, header not yet durable: it was never acknowledged into.
                drop(file);
                fs::remove_file(&path).map_err(io_err("remove torn segment", &path))?;
                fsync_dir(gdir)?;
                tracing::warn!(file = %path.display(), len, "removed a segment whose header was torn (it held no records)");
                gr.torn_tails.push(TornTail {
                    file: path,
                    offset: 0,
                    bytes_cut: len,
                    why: format!(
                        "segment header torn ({len} of {SEGMENT_HEADER_LEN} bytes); file removed"
                    ),
                });
                continue;
            }
            Err(format!("{len} bytes, shorter than a segment header"))
        } else {
            let hb = dio::read_exact_at(&file, 0, SEGMENT_HEADER_LEN)
                .map_err(io_err("read segment header", &path))?;
            match SegmentHeader::decode(&hb) {
                Err(FormatError::UnsupportedVersion { version, supported }) => {
                    return Err(SpoolError::UnsupportedVersion {
                        file: path,
                        version,
                        supported,
                    });
                }
                Err(e) => Err(e.to_string()),
                Ok(h) if h.group != group => Err(format!("header names group {:?}", h.group)),
                Ok(h) if h.first_frame_no != first => Err(format!(
                    "header names first frame {}, file name {first}",
                    h.first_frame_no
                )),
                Ok(h) => Ok(h.version),
            }
        };
        match verdict {
            Ok(version) => out.push(SegFile {
                first,
                path,
                file,
                len,
                version,
            }),
            Err(why) => {
                drop(file);
                let q = quarantine(&path, gdir)?;
                gr.problems.push(problem(
                    ProblemKind::BadSegment,
                    &path,
                    0,
                    format!("unusable segment: {why}; renamed to {}", q.display()),
                ));
            }
        }
    }
    Ok(out)
}

fn recover_group(
    root: &Path,
    group: &str,
    direct: bool,
) -> Result<(GroupIndex, GroupInit, GroupRecovery), SpoolError> {
    let gdir = root.join(group);
    let mut gr = GroupRecovery {
        group: group.to_string(),
        frames: 0,
        bytes: 0,
        segments: 0,
        head: None,
        trimmed_through: 0,
        torn_tails: Vec::new(),
        problems: Vec::new(),
    };
    let mut seg_names = Vec::new();
    let mut removed_free = false;
    for ent in fs::read_dir(&gdir).map_err(io_err("list", &gdir))? {
        let ent = ent.map_err(io_err("list", &gdir))?;
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        let is_file = ent.file_type().map(|t| t.is_file()).unwrap_or(false);
        if name == STATE_FILE && is_file {
            continue;
        }
        if name == STATE_TMP && is_file {
            // An interrupted state update; `state` (if any) is still the durable one.
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            tracing::info!(file = %path.display(), "removed an interrupted state update");
            continue;
        }
        if is_file && segment::is_free_file_name(&name) {
            // A trimmed segment file kept for reuse: its bytes are acknowledged
            // frames only. The free list starts empty after a restart.
            fs::remove_file(&path).map_err(io_err("remove free segment file", &path))?;
            removed_free = true;
            continue;
        }
        if let Some(first) = parse_segment_name(&name).filter(|_| is_file) {
            seg_names.push((first, path));
        } else if name.contains(".damaged") {
            gr.problems.push(problem(
                ProblemKind::Quarantined,
                &path,
                0,
                "quarantined by an earlier recovery; inspect it, then remove it".into(),
            ));
        } else {
            gr.problems.push(problem(
                ProblemKind::UnknownEntry,
                &path,
                0,
                "not a spool file; left alone".into(),
            ));
        }
    }

    if removed_free {
        fsync_dir(&gdir)?;
    }
    let st = match state::read_state(&gdir) {
        Ok(st) => st,
        Err(StateError::Format(FormatError::UnsupportedVersion { version, supported })) => {
            return Err(SpoolError::UnsupportedVersion {
                file: state::state_path(&gdir),
                version,
                supported,
            });
        }
        Err(e) => {
            let p = state::state_path(&gdir);
            let q = quarantine(&p, &gdir)?;
            gr.problems.push(problem(
                ProblemKind::BadStateFile,
                &p,
                0,
                format!(
                    "{e}; renamed to {}; trim point reset to 0 (trimmed frames still on disk may be sent again)",
                    q.display()
                ),
            ));
            None
        }
    };
    let st = st.unwrap_or_default();
    let trimmed = st.trimmed_through;

    let segs = open_segments(&gdir, group, seg_names, direct, &mut gr)?;
    let mut gi = GroupIndex {
        trimmed_through: trimmed,
        ..GroupIndex::default()
    };
    let mut last: Option<(u64, u64)> = None;
    let n = segs.len();
    let mut active = None;
    for (i, sf) in segs.into_iter().enumerate() {
        let newest = i + 1 == n;
        let mut seg = SegIndex::new(sf.first, sf.len);
        let mut cut: Option<(u64, String, Option<u64>)> = None;
        let mut padding_at: Option<u64> = None;
        // The newest segment may be a recycled file (docs/SPOOL.md, "Recycled
        // segment files"): records older than its first frame are what is left
        // of its earlier use, so they end it like a torn tail. Older segments
        // were cut to their logical length before the next one was made.
        let min_frame = if newest { sf.first } else { 0 };
        let scanned = segment::scan(
            &sf.file,
            SEGMENT_HEADER_LEN as u64,
            sf.len,
            min_frame,
            |ev| match ev {
                ScanEvent::Record { offset, header: h } => {
                    if let Some((lf, _)) = last
                        && h.frame_no <= lf
                    {
                        gr.problems.push(problem(
                            ProblemKind::OutOfOrder,
                            &sf.path,
                            offset,
                            format!("frame {} is not after frame {lf}; not indexed", h.frame_no),
                        ));
                        return ControlFlow::Continue(());
                    }
                    if h.frame_no < sf.first {
                        gr.problems.push(problem(
                            ProblemKind::OutOfOrder,
                            &sf.path,
                            offset,
                            format!(
                                "frame {} is below the segment's first frame {}; not indexed",
                                h.frame_no, sf.first
                            ),
                        ));
                        return ControlFlow::Continue(());
                    }
                    if let Some((lf, _)) = last
                        && h.prev_frame_no != lf
                    {
                        gr.problems.push(problem(
                        ProblemKind::ChainGap,
                        &sf.path,
                        offset,
                        format!(
                            "frame {} names prev {}, but the record before it is frame {lf}: frames in between are missing",
                            h.frame_no, h.prev_frame_no
                        ),
                    ));
                    }
                    last = Some((h.frame_no, h.last_seq));
                    seg.last_frame_no = h.frame_no;
                    if h.frame_no > trimmed {
                        seg.entries.push_back(Entry {
                            frame_no: h.frame_no,
                            offset: offset as u32,
                            len: h.payload_len,
                        });
                    }
                    ControlFlow::Continue(())
                }
                ScanEvent::Bad {
                    offset,
                    why,
                    resume_at,
                } => {
                    if newest {
                        cut = Some((offset, why, resume_at));
                        return ControlFlow::Break(());
                    }
                    let action = match resume_at {
                        Some(r) => format!(
                            "skipped {} bytes to the next valid record at offset {r}",
                            r - offset
                        ),
                        None => format!(
                            "no valid record follows: the last {} bytes are not indexed",
                            sf.len - offset
                        ),
                    };
                    gr.problems.push(problem(
                        ProblemKind::BadRecord,
                        &sf.path,
                        offset,
                        format!("{why}; {action}; file left unchanged"),
                    ));
                    ControlFlow::Continue(())
                }
                ScanEvent::Padding { offset } => {
                    padding_at = Some(offset);
                    ControlFlow::Break(())
                }
            },
        );
        scanned.map_err(|e: io::Error| io_err("scan segment", &sf.path)(e))?;
        if let Some((x, why, resume_at)) = cut {
            match resume_at {
                None => {
                    truncate(&sf.file, &sf.path, x)?;
                    tracing::warn!(file = %sf.path.display(), offset = x, bytes_cut = sf.len - x, %why, "cut a torn tail");
                    gr.torn_tails.push(TornTail {
                        file: sf.path.clone(),
                        offset: x,
                        bytes_cut: sf.len - x,
                        why,
                    });
                }
                Some(r) => {
                    let q = quarantine_tail(&sf.file, &sf.path, &gdir, x, sf.len)?;
                    truncate(&sf.file, &sf.path, x)?;
                    gr.problems.push(problem(
                        ProblemKind::BadRecord,
                        &sf.path,
                        x,
                        format!(
                            "{why}; a valid record follows at offset {r}, so this is damage, not a torn append: \
                             bytes {x}..{} were copied to {} and cut from the segment; the frames there are not \
                             indexed and the head is the last record before offset {x} (if they had been \
                             acknowledged, the sender must resync)",
                            sf.len,
                            q.display()
                        ),
                    ));
                }
            }
            seg.file_len = x;
        } else if let Some(p) = padding_at {
            // Padding is part of the format: the logical length ends at the last
            // record, which is where the writer continues.
            seg.file_len = p;
        }
        // Keep last_frame_no monotonic across segments (binary search relies on
        // it) even for a segment where nothing could be indexed.
        seg.last_frame_no = seg.last_frame_no.max(last.map_or(0, |l| l.0));
        gi.frames += seg.entries.len() as u64;
        gi.disk_bytes += seg.file_len;
        // The writer appends only to a segment of the version it writes; for an
        // older one it starts a new segment.
        if newest && sf.version == FormatVersion::CURRENT {
            active = Some((seg.first_frame_no, seg.file_len));
        }
        gi.segments.push_back(seg);
    }

    let rec_head = last.unwrap_or((0, 0));
    let head = if st.head_frame_no > rec_head.0 {
        let lost_from = rec_head.0.max(st.trimmed_through) + 1;
        if st.head_frame_no >= lost_from {
            gr.problems.push(problem(
                ProblemKind::LostFrames,
                &state::state_path(&gdir),
                0,
                format!(
                    "the state file's head is frame {} but the newest record is frame {}: frames {lost_from}..={} \
                     are missing (the sender must resync them)",
                    st.head_frame_no,
                    rec_head.0,
                    st.head_frame_no
                ),
            ));
        }
        (st.head_frame_no, st.head_last_seq)
    } else {
        rec_head
    };
    gi.head = (head.0 > 0).then_some(SpoolHead {
        frame_no: head.0,
        last_seq: head.1,
    });
    gr.frames = gi.frames;
    gr.bytes = gi.disk_bytes;
    gr.segments = gi.segments.len();
    gr.head = gi.head;
    gr.trimmed_through = trimmed;
    if gr.torn_tails.is_empty() && gr.problems.is_empty() {
        tracing::info!(
            group,
            frames = gr.frames,
            bytes = gr.bytes,
            head = head.0,
            "spool group recovered"
        );
    }
    let init = GroupInit {
        head: head.0,
        head_seq: head.1,
        active,
    };
    Ok((gi, init, gr))
}
