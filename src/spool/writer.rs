//! The writer thread: group commit of appends.
//!
//! One thread owns every segment file that is written to. It takes what is queued
//! (up to `max_batch_bytes` of payload), checks each append against its group's
//! chain, writes the records, then makes the batch durable — one `fdatasync` per
//! touched segment, an fsync of each directory that gained an entry — publishes the
//! new records to the index, and only then completes the appends, in submission
//! order per group. A failed batch is undone group by group (new files removed,
//! the active segment truncated back) and its appends fail.
//!
//! Two I/O modes (docs/SPOOL.md, "Direct I/O"):
//! * direct (`O_DIRECT`): every byte goes through the thread's one aligned
//!   [`Stage`]; writes are whole zero-padded blocks, and the last partial block
//!   of a segment is rewritten by the next write. The segment's logical length
//!   (end of its last record) is what the writer continues from and what the
//!   index counts; the file may extend past it by up to 4095 zero bytes.
//! * buffered: small records are gathered in a batch buffer and written at the
//!   logical end; large payloads are written straight from the caller's buffer.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;
use tokio::sync::oneshot;

use super::dio::{self, Stage};
use super::index::{Entry, SegIndex, SpoolIndex};
use super::record::{
    FormatVersion, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader,
};
use super::segment::segment_file_name;
use super::state::fsync_dir;
use super::{AppendOutcome, AppendRequest, SpoolError, SpoolHead, io_err, lock};

/// Buffered mode: payloads at least this large are written from the caller's
/// buffer instead of being copied into the batch buffer.
const LARGE_WRITE: usize = 64 << 10;
/// Buffered mode: the batch buffer is written out when it reaches this size.
const FLUSH_AT: usize = 1 << 20;

/// Completion of one append.
pub type Reply = oneshot::Sender<Result<AppendOutcome, SpoolError>>;

/// A message to the writer thread.
pub enum Cmd {
    /// Append a frame and report the outcome.
    Append(AppendRequest, Reply),
    /// Finish what was queued before, then exit.
    Shutdown,
}

/// What recovery tells the writer about a group.
#[derive(Debug, Clone)]
pub struct GroupInit {
    /// Head frame number (0 when none).
    pub head: u64,
    /// Last seq of the head frame.
    pub head_seq: u64,
    /// The segment to keep appending to: (first frame, logical length).
    pub active: Option<(u64, u64)>,
}

struct Active {
    first: u64,
    path: PathBuf,
    /// Logical length: the end of the last record in the file (written, not
    /// necessarily synced). In direct mode the file may extend past it with zero
    /// padding up to the next block boundary.
    len: u64,
    file: Option<File>,
    direct: bool,
    /// Direct mode: bytes `[floor(len), len)` as they are in the file, when
    /// known; `None` makes the next write read them from the file first.
    tail: Option<Vec<u8>>,
    /// A recycled file's size when it was taken: bytes past the logical length
    /// may be left from its earlier use until [`Active::cut_stale`].
    stale_end: u64,
}

impl Active {
    fn new(first: u64, path: PathBuf, len: u64, direct: bool) -> Self {
        Active {
            first,
            path,
            len,
            file: None,
            direct,
            tail: None,
            stale_end: 0,
        }
    }

    /// Cut what is left of a recycled file's earlier use past the logical
    /// length (keeping a direct writer's zero padding), so that only the newest
    /// segment of a group can hold such bytes. Not synced here: the caller's
    /// next `fdatasync` commits the new size.
    fn cut_stale(&mut self) -> Result<(), SpoolError> {
        let keep = if self.direct {
            dio::ceil(self.len)
        } else {
            self.len
        };
        if self.stale_end > keep {
            let path = self.path.clone();
            self.file()?
                .set_len(keep)
                .map_err(io_err("cut the old bytes of a recycled segment", &path))?;
        }
        self.stale_end = 0;
        Ok(())
    }

    fn file(&mut self) -> Result<&File, SpoolError> {
        if self.file.is_none() {
            let f = dio::open_options(self.direct)
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(io_err("open segment", &self.path))?;
            self.file = Some(f);
        }
        match &self.file {
            Some(f) => Ok(f),
            None => unreachable!("file was just opened"),
        }
    }

    /// Direct mode: make `stage` hold this segment's last partial block, from
    /// memory or (after open, recovery or an undo) from the file.
    fn bind(&mut self, stage: &mut Stage) -> Result<(), SpoolError> {
        let want = (self.len - dio::floor(self.len)) as usize;
        match &self.tail {
            Some(t) if t.len() == want => stage.load(self.len, t),
            _ => {
                let len = self.len;
                let path = self.path.clone();
                let f = self.file()?;
                stage
                    .load_from(f, len)
                    .map_err(io_err("read last block of segment", &path))?;
                self.tail = Some(stage.tail().to_vec());
            }
        }
        Ok(())
    }

    /// Direct mode: after `stage` wrote to the file, record what is there.
    fn staged_written(&mut self, stage: &Stage) {
        self.len = stage.written_end();
        let t = self.tail.get_or_insert_with(Vec::new);
        t.clear();
        t.extend_from_slice(stage.tail());
    }

    /// Buffered mode: write `bytes` at the logical end.
    fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let at = self.len;
        let f = self.file()?;
        f.write_all_at(bytes, at)
            .map_err(io_err("write segment", &self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        #[cfg(test)]
        if let Some(e) = fault::hit(&self.path) {
            return Err(io_err("fdatasync segment", &self.path)(e));
        }
        let f = self.file()?;
        f.sync_data()
            .map_err(io_err("fdatasync segment", &self.path))
    }
}

struct WGroup {
    dir: PathBuf,
    dir_ready: bool,
    head: u64,
    head_seq: u64,
    active: Option<Active>,
    poisoned: Option<String>,
}

enum Outcome {
    /// Decided: sent as is whatever happens to the batch.
    Done(Result<AppendOutcome, SpoolError>),
    /// Written in this batch: Stored once the batch is durable.
    Stored,
    /// Duplicate of a frame written in this batch: Duplicate once it is durable.
    DupPending,
}

/// Where a group's bytes wait before they are written.
enum Pending<'s> {
    /// Buffered mode: the batch buffer, written at the active segment's length.
    Buffered(Vec<u8>),
    /// Direct mode: the writer's stage, holding the active segment's last block
    /// once `bound`.
    Direct { stage: &'s mut Stage, bound: bool },
}

struct Work<'s> {
    pending: Pending<'s>,
    /// Active segment has bytes written or buffered in this batch not yet synced.
    dirty: bool,
    new_dir: bool,
    new_files: Vec<PathBuf>,
    /// Free files taken for new segments (their old names, removed on undo).
    recycled: Vec<PathBuf>,
    new_segs: Vec<u64>,
    entries: Vec<(u64, Entry)>,
    /// Latest logical length of each segment written in this batch.
    seg_lens: Vec<(u64, u64)>,
}

impl<'s> Work<'s> {
    fn new(pending: Pending<'s>) -> Self {
        Work {
            pending,
            dirty: false,
            new_dir: false,
            new_files: Vec::new(),
            recycled: Vec::new(),
            new_segs: Vec::new(),
            entries: Vec::new(),
            seg_lens: Vec::new(),
        }
    }

    fn note_len(&mut self, first: u64, len: u64) {
        match self.seg_lens.iter_mut().find(|(f, _)| *f == first) {
            Some(e) => e.1 = len,
            None => self.seg_lens.push((first, len)),
        }
    }

    /// True in direct mode.
    fn direct(&self) -> bool {
        matches!(self.pending, Pending::Direct { .. })
    }

    /// Where the next byte of the active segment `a` goes.
    fn end(&self, a: &Active) -> u64 {
        match &self.pending {
            Pending::Buffered(buf) => a.len + buf.len() as u64,
            Pending::Direct { stage, bound: true } => stage.end(),
            Pending::Direct { bound: false, .. } => a.len,
        }
    }

    /// A new active segment replaced the one the stage was bound to.
    fn unbind(&mut self) {
        if let Pending::Direct { bound, .. } = &mut self.pending {
            *bound = false;
        }
    }

    /// Append `bytes` to the active segment `a`: staged or buffered, written
    /// now when a buffer fills (or, buffered, when the payload is large).
    fn put(&mut self, a: &mut Active, bytes: &[u8]) -> Result<(), SpoolError> {
        match &mut self.pending {
            Pending::Buffered(buf) => {
                if bytes.len() >= LARGE_WRITE {
                    if !buf.is_empty() {
                        a.write(buf)?;
                        buf.clear();
                    }
                    a.write(bytes)?;
                } else {
                    buf.extend_from_slice(bytes);
                    if buf.len() >= FLUSH_AT {
                        a.write(buf)?;
                        buf.clear();
                    }
                }
            }
            Pending::Direct { stage, bound } => {
                if !*bound {
                    a.bind(stage)?;
                    *bound = true;
                }
                let r = stage.push(a.file()?, bytes);
                a.staged_written(stage);
                r.map_err(io_err("write segment", &a.path))?;
            }
        }
        Ok(())
    }

    /// Write everything of `a` that is still buffered or staged.
    fn flush(&mut self, a: &mut Active) -> Result<(), SpoolError> {
        match &mut self.pending {
            Pending::Buffered(buf) => {
                if !buf.is_empty() {
                    a.write(buf)?;
                    buf.clear();
                }
            }
            Pending::Direct { stage, bound: true } => {
                let r = stage.flush(a.file()?);
                a.staged_written(stage);
                r.map_err(io_err("write segment", &a.path))?;
            }
            Pending::Direct { bound: false, .. } => {}
        }
        self.note_len(a.first, a.len);
        Ok(())
    }
}

/// The writer thread's state.
pub struct Writer {
    root: PathBuf,
    segment_bytes: u64,
    max_batch_bytes: usize,
    /// Direct mode: the one aligned write buffer, lent to each group commit.
    stage: Option<Stage>,
    groups: HashMap<String, WGroup>,
    index: Arc<Mutex<SpoolIndex>>,
    rx: Receiver<Cmd>,
}

impl Writer {
    /// A writer for the spool at `root`, continuing the recovered groups, with
    /// `O_DIRECT` when `direct`.
    pub fn new(
        root: PathBuf,
        segment_bytes: u64,
        max_batch_bytes: usize,
        direct: bool,
        init: Vec<(String, GroupInit)>,
        index: Arc<Mutex<SpoolIndex>>,
        rx: Receiver<Cmd>,
    ) -> Self {
        let groups = init
            .into_iter()
            .map(|(name, gi)| {
                let dir = root.join(&name);
                let active = gi.active.map(|(first, len)| {
                    Active::new(first, dir.join(segment_file_name(first)), len, direct)
                });
                let g = WGroup {
                    dir,
                    dir_ready: true,
                    head: gi.head,
                    head_seq: gi.head_seq,
                    active,
                    poisoned: None,
                };
                (name, g)
            })
            .collect();
        Writer {
            root,
            segment_bytes,
            max_batch_bytes,
            stage: direct.then(Stage::new),
            groups,
            index,
            rx,
        }
    }

    /// Run until shut down (or every sender is gone); then fail what is left queued.
    pub fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let mut stop = false;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Cmd::Append(req, reply) => {
                        bytes = bytes.saturating_add(req.bytes.len());
                        batch.push((req, reply));
                    }
                    Cmd::Shutdown => {
                        stop = true;
                        break;
                    }
                }
                if bytes < self.max_batch_bytes {
                    next = self.rx.try_recv().ok();
                }
            }
            self.commit(batch);
            if stop {
                break;
            }
        }
        self.cut_stale_on_exit();
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Append(_, reply) = cmd {
                let _ = reply.send(Err(SpoolError::Shutdown));
            }
        }
    }

    /// At a clean stop, cut each recycled active segment to its logical
    /// length and sync it, so that the next start finds no old bytes to cut.
    fn cut_stale_on_exit(&mut self) {
        for (name, g) in &mut self.groups {
            if g.poisoned.is_some() {
                continue;
            }
            if let Some(a) = g.active.as_mut()
                && a.stale_end > 0
                && let Err(e) = a.cut_stale().and_then(|()| a.sync())
            {
                tracing::warn!(group = %name, error = %e, "could not cut a recycled segment at stop; the next start will");
            }
        }
    }

    fn commit(&mut self, batch: Vec<(AppendRequest, Reply)>) {
        let mut order: Vec<String> = Vec::new();
        let mut by_group: HashMap<String, Vec<(AppendRequest, Reply)>> = HashMap::new();
        for (req, reply) in batch {
            let items = by_group.entry(req.group.clone()).or_insert_with(|| {
                order.push(req.group.clone());
                Vec::new()
            });
            items.push((req, reply));
        }
        for name in order {
            if let Some(items) = by_group.remove(&name) {
                self.commit_group(&name, items);
            }
        }
    }

    fn commit_group(&mut self, name: &str, items: Vec<(AppendRequest, Reply)>) {
        #[cfg(test)]
        fault::wait_while_held(name);
        let root = self.root.clone();
        let g = self
            .groups
            .entry(name.to_string())
            .or_insert_with(|| WGroup {
                dir: root.join(name),
                dir_ready: false,
                head: 0,
                head_seq: 0,
                active: None,
                poisoned: None,
            });
        if let Some(reason) = &g.poisoned {
            for (_, reply) in items {
                let _ = reply.send(Err(SpoolError::Poisoned {
                    group: name.to_string(),
                    reason: reason.clone(),
                }));
            }
            return;
        }
        let durable_head = g.head;
        let durable_seq = g.head_seq;
        let saved_active = g.active.as_ref().map(|a| (a.first, a.len));
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(items.len());
        let mut work = Work::new(match self.stage.as_mut() {
            Some(stage) => Pending::Direct {
                stage,
                bound: false,
            },
            None => Pending::Buffered(Vec::new()),
        });

        let res = write_group(
            g,
            name,
            self.segment_bytes,
            &self.index,
            durable_head,
            &items,
            &mut outcomes,
            &mut work,
        )
        .and_then(|()| sync_group(g, &root, &mut work));

        match res {
            Ok(()) => {
                publish(&self.index, name, g, &work);
                for ((_, reply), out) in items.into_iter().zip(outcomes) {
                    let r = match out {
                        Outcome::Done(r) => r,
                        Outcome::Stored => Ok(AppendOutcome::Stored),
                        Outcome::DupPending => Ok(AppendOutcome::Duplicate),
                    };
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(group = name, error = %e, "spool group commit failed; undoing the batch");
                undo(g, name, saved_active, &work);
                if e.is_no_space() {
                    release_free(&self.index);
                }
                g.head = durable_head;
                g.head_seq = durable_seq;
                for ((_, reply), out) in items.into_iter().zip(outcomes) {
                    let r = match out {
                        Outcome::Done(r) => r,
                        Outcome::Stored | Outcome::DupPending => Err(e.duplicate()),
                    };
                    let _ = reply.send(r);
                }
            }
        }
    }
}

/// Check and write every append of one group's part of the batch (not yet synced).
#[allow(clippy::too_many_arguments)]
fn write_group(
    g: &mut WGroup,
    name: &str,
    segment_bytes: u64,
    index: &Mutex<SpoolIndex>,
    durable_head: u64,
    items: &[(AppendRequest, Reply)],
    outcomes: &mut Vec<Outcome>,
    work: &mut Work<'_>,
) -> Result<(), SpoolError> {
    for (req, _) in items {
        if req.frame_no <= g.head {
            outcomes.push(if req.frame_no <= durable_head {
                Outcome::Done(Ok(AppendOutcome::Duplicate))
            } else {
                Outcome::DupPending
            });
            continue;
        }
        if g.head != 0 && req.prev_frame_no != g.head {
            outcomes.push(Outcome::Done(Err(SpoolError::ChainBreak {
                group: name.to_string(),
                frame_no: req.frame_no,
                expected_prev: g.head,
                got_prev: req.prev_frame_no,
            })));
            continue;
        }
        outcomes.push(Outcome::Stored);
        if let Err(e) = write_one(g, name, segment_bytes, index, req, work) {
            // Later items of this group never ran: they fail with the batch.
            while outcomes.len() < items.len() {
                outcomes.push(Outcome::Stored);
            }
            return Err(e);
        }
    }
    if let Some(a) = g.active.as_mut() {
        work.flush(a)?;
    }
    Ok(())
}

/// Create a new, empty segment file.
fn create_segment(path: &std::path::Path, direct: bool) -> Result<File, SpoolError> {
    dio::open_options(direct)
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create segment", path))
}

/// Rename `from` to `to`, failing if `to` exists (as creating a segment with
/// `create_new` does): a segment file is never replaced.
fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    match nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        // A file system without the flag: check, then rename (only this thread
        // creates segment names).
        Err(nix::errno::Errno::EINVAL) => {
            if to.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a segment of that name exists",
                ));
            }
            fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

/// Delete every group's free files (and forget them): called when a write
/// found the disk full, so that the space they hold goes to frames.
fn release_free(index: &Mutex<SpoolIndex>) {
    let files: Vec<PathBuf> = lock(index)
        .groups
        .values_mut()
        .flat_map(|g| std::mem::take(&mut g.free))
        .collect();
    for f in &files {
        if let Err(e) = fs::remove_file(f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %f.display(), error = %e, "could not delete a free segment file");
        }
    }
    if !files.is_empty() {
        tracing::warn!(
            files = files.len(),
            "disk full: deleted the spool's free segment files"
        );
    }
}

/// A trimmed segment file of `group` to reuse, if its free list has one.
fn take_free(index: &Mutex<SpoolIndex>, group: &str) -> Option<PathBuf> {
    lock(index).groups.get_mut(group)?.free.pop()
}

fn write_one(
    g: &mut WGroup,
    name: &str,
    segment_bytes: u64,
    index: &Mutex<SpoolIndex>,
    req: &AppendRequest,
    work: &mut Work<'_>,
) -> Result<(), SpoolError> {
    let direct = work.direct();
    if !g.dir_ready {
        match fs::create_dir(&g.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create group directory", &g.dir)(e)),
        }
        g.dir_ready = true;
        work.new_dir = true;
    }
    let rec_len = (RECORD_HEADER_LEN + req.bytes.len()) as u64;
    let rotate = match &g.active {
        None => true,
        Some(a) => {
            let cur = work.end(a);
            cur > SEGMENT_HEADER_LEN as u64 && cur + rec_len > segment_bytes
        }
    };
    if rotate {
        if let Some(a) = g.active.as_mut() {
            // The old segment is complete and durable before the next one exists,
            // so only the newest segment of a group can ever have a torn tail
            // (or, for a recycled file, bytes of its earlier use).
            work.flush(a)?;
            if a.stale_end > 0 {
                a.cut_stale()?;
                work.dirty = true;
            }
            if work.dirty {
                a.sync()?;
                work.dirty = false;
            }
        }
        let path = g.dir.join(segment_file_name(req.frame_no));
        let (file, recycled) = match take_free(index, name) {
            Some(free) => match dio::open_options(direct).read(true).write(true).open(&free) {
                Ok(f) => {
                    // Removed by undo if this batch fails from here on.
                    work.recycled.push(free.clone());
                    let size = f.metadata().map_err(io_err("stat", &free))?.len();
                    (f, Some((free, size)))
                }
                Err(e) => {
                    tracing::warn!(file = %free.display(), error = %e, "cannot reuse a free segment file; creating a new one");
                    let _ = fs::remove_file(&free);
                    (create_segment(&path, direct)?, None)
                }
            },
            None => (create_segment(&path, direct)?, None),
        };
        work.new_files.push(path.clone());
        work.new_segs.push(req.frame_no);
        let mut a = Active::new(req.frame_no, path, 0, direct);
        a.file = Some(file);
        a.tail = Some(Vec::new());
        let a = g.active.insert(a);
        work.unbind();
        let header = SegmentHeader {
            version: FormatVersion::CURRENT,
            group: name.to_string(),
            first_frame_no: req.frame_no,
        };
        work.dirty = true;
        work.put(a, &header.encode())?;
        if let Some((free, size)) = recycled {
            // The new header is durable before the file takes the segment's
            // name: a crash leaves either a free file (dropped at recovery) or
            // a segment whose header matches its name, whose old records are
            // below its first frame and end it like a torn tail.
            work.flush(a)?;
            a.sync()?;
            a.stale_end = size;
            rename_noreplace(&free, &a.path).map_err(io_err("rename free segment file", &free))?;
        }
    }
    let Some(a) = g.active.as_mut() else {
        unreachable!("an active segment exists after rotation")
    };
    let offset = work.end(a);
    let header = RecordHeader::new(req.frame_no, req.prev_frame_no, req.last_seq, &req.bytes);
    work.dirty = true;
    work.put(a, &header.encode())?;
    work.put(a, &req.bytes)?;
    work.entries.push((
        a.first,
        Entry {
            frame_no: req.frame_no,
            // Segments stay below 4 GiB: segment_bytes <= 1 GiB plus one record.
            offset: offset as u32,
            len: req.bytes.len() as u32,
        },
    ));
    g.head = req.frame_no;
    g.head_seq = req.last_seq;
    Ok(())
}

/// Make the batch durable: fdatasync the active segment, fsync the directories
/// that gained entries (group dir for new segments, spool dir for a new group).
fn sync_group(
    g: &mut WGroup,
    root: &std::path::Path,
    work: &mut Work<'_>,
) -> Result<(), SpoolError> {
    if work.dirty
        && let Some(a) = g.active.as_mut()
    {
        a.sync()?;
        work.dirty = false;
    }
    if work.new_dir || !work.new_files.is_empty() {
        fsync_dir(&g.dir)?;
    }
    if work.new_dir {
        fsync_dir(root)?;
    }
    Ok(())
}

/// Show the durable batch to readers: new segments, entries, lengths, head.
fn publish(index: &Mutex<SpoolIndex>, name: &str, g: &WGroup, work: &Work<'_>) {
    let mut idx = lock(index);
    let gi = idx.groups.entry(name.to_string()).or_default();
    // Entries are in write order; a rotation inside the batch shows up as the
    // first entry of a new segment, which is added to the index just before it.
    for (first, e) in &work.entries {
        if gi.segments.back().map(|s| s.first_frame_no) != Some(*first)
            && work.new_segs.contains(first)
        {
            gi.segments.push_back(SegIndex::new(*first, 0));
        }
        gi.push_entry(*first, *e);
    }
    for (first, len) in &work.seg_lens {
        if let Some(seg) = gi
            .segments
            .iter_mut()
            .rev()
            .find(|s| s.first_frame_no == *first)
        {
            gi.disk_bytes = (gi.disk_bytes + len).saturating_sub(seg.file_len);
            seg.file_len = *len;
        }
    }
    if g.head > 0 {
        gi.head = Some(SpoolHead {
            frame_no: g.head,
            last_seq: g.head_seq,
        });
    }
}

/// Undo a failed batch of one group: remove the segments it created, truncate
/// the previously active segment to its durable logical length (dropping any
/// padding; the next direct write reloads its last block from the file). If that
/// fails too, the group refuses further appends (its files are in an unknown
/// state).
fn undo(g: &mut WGroup, name: &str, saved: Option<(u64, u64)>, work: &Work<'_>) {
    let direct = work.direct();
    let mut failures = Vec::new();
    for p in work.new_files.iter().chain(&work.recycled) {
        if let Err(e) = fs::remove_file(p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            failures.push(format!("remove {}: {e}", p.display()));
        }
    }
    if !work.new_files.is_empty()
        && let Err(e) = fsync_dir(&g.dir)
    {
        failures.push(e.to_string());
    }
    if work.new_dir {
        // The directory may not be durable: fsync the spool dir again next time.
        g.dir_ready = false;
    }
    g.active = saved
        .map(|(first, len)| Active::new(first, g.dir.join(segment_file_name(first)), len, direct));
    // Always truncate: a failed write may have left bytes beyond the length the
    // writer had recorded.
    if let Some((_, len)) = saved
        && let Some(a) = g.active.as_mut()
    {
        let path = a.path.clone();
        let r = a.file().and_then(|f| {
            f.set_len(len)
                .and_then(|()| f.sync_data())
                .map_err(io_err("truncate segment after failed write", &path))
        });
        if let Err(e) = r {
            failures.push(e.to_string());
        }
    }
    if !failures.is_empty() {
        let reason = failures.join("; ");
        tracing::error!(group = name, %reason, "could not undo a failed spool write; group refuses appends until restart");
        g.poisoned = Some(reason);
    }
}

/// Test-only fault injection: make the n-th segment sync of a group fail.
#[cfg(test)]
pub mod fault {
    use std::path::Path;
    use std::sync::Mutex;

    static PLAN: Mutex<Vec<(String, u32, bool)>> = Mutex::new(Vec::new());
    static HELD: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Make the writer stop before committing anything of `group` until released.
    pub fn hold(group: &str) {
        super::lock(&HELD).push(group.to_string());
    }

    /// Let the writer continue with `group`.
    pub fn release(group: &str) {
        super::lock(&HELD).retain(|g| g != group);
    }

    pub(super) fn wait_while_held(group: &str) {
        while super::lock(&HELD).iter().any(|g| g == group) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Fail the sync after `skip` successful ones in group directory `group`
    /// (matched as a path component, so use a name no other test uses).
    pub fn fail_sync(group: &str, skip: u32) {
        super::lock(&PLAN).push((format!("/{group}/"), skip, false));
    }

    /// As [`fail_sync`], with the error of a full disk (ENOSPC).
    pub fn fail_sync_no_space(group: &str, skip: u32) {
        super::lock(&PLAN).push((format!("/{group}/"), skip, true));
    }

    pub(super) fn hit(path: &Path) -> Option<std::io::Error> {
        let p = path.to_string_lossy();
        let mut plan = super::lock(&PLAN);
        let i = plan.iter().position(|(g, _, _)| p.contains(g.as_str()))?;
        if plan[i].1 == 0 {
            let (_, _, no_space) = plan.remove(i);
            Some(if no_space {
                std::io::Error::from_raw_os_error(nix::libc::ENOSPC)
            } else {
                std::io::Error::other("injected fault")
            })
        } else {
            plan[i].1 -= 1;
            None
        }
    }
}
