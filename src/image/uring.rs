//! The io_uring engine: one ring per image, owned by the apply thread.
//!
//! A batch is cut into *pieces* (one SQE each: a write of at most
//! [`MAX_IO_CHUNK`] bytes, a zero write of at most [`ZERO_CHUNK`] bytes from the
//! shared zero buffer, or one fallocate punch). Each in-flight piece sits in a
//! slot whose index is the SQE's user_data. A piece refers to its op by index
//! and byte position, never by pointer: pointers exist only while an SQE is
//! built, borrowed from `ops` (or the `'static` zero buffer).
//!
//! Ordering: ops are started in slice order. Before an op starts, it is checked
//! against every earlier op that has not *fully* completed (including resubmitted
//! remainders of short writes and hole-punch fallbacks); if it overlaps one, no
//! further op starts until completions clear the overlap. IOSQE_IO_DRAIN is not
//! used: it only waits for the earlier SQE's CQE, which is too early when that
//! CQE reports a short write or EAGAIN and the remainder is resubmitted later.
//!
//! Reads of a batch (`read_batch`) are independent: they are cut into pieces of
//! at most [`MAX_IO_CHUNK`] bytes and submitted up to the ring's depth at once,
//! with no ordering; a short read or EINTR/EAGAIN resubmits the remainder.
//!
//! Safety: `write_batch`, `read_batch` and `read_at` do not return (not even on
//! error) until every submitted SQE has been reaped, so every buffer the kernel
//! may read or write outlives its use. If the ring itself fails while SQEs are in flight,
//! the process aborts rather than return and free those buffers.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, Probe, opcode, squeue, types};

use super::{
    Engine, EngineError, IoEngine, MAX_IO_CHUNK, ReadBatchError, WriteOp, ZERO_CHUNK, ZEROS,
    ZeroMode,
};

/// user_data of the single SQE of `read_at` and `sync_data`.
const SINGLE: u64 = u64::MAX;

/// io_uring engine: up to the ring's depth of pieces in flight per batch.
pub struct UringEngine {
    ring: IoUring,
    depth: usize,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("depth", &self.depth)
            .finish()
    }
}

impl UringEngine {
    /// Set up a ring of `entries` submission entries and check that the kernel
    /// supports every opcode this engine uses (write, read, fsync, fallocate).
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Write::CODE, "IORING_OP_WRITE"),
            (opcode::Read::CODE, "IORING_OP_READ"),
            (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
            (opcode::Fallocate::CODE, "IORING_OP_FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel io_uring does not support {name}"),
                ));
            }
        }
        let depth = ring.params().sq_entries() as usize;
        Ok(UringEngine { ring, depth })
    }

    /// Submit pushed SQEs and wait for at least `want` completions. Retryable
    /// failures (EINTR, EAGAIN, EBUSY) return so the caller reaps and comes back.
    /// Any other failure aborts the process: this is only called with SQEs
    /// outstanding, and returning would let the caller free buffers the kernel
    /// may still use (such a failure means the ring itself is broken).
    fn enter(&mut self, want: usize) {
        let Err(e) = self.ring.submit_and_wait(want) else {
            return;
        };
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN | libc::EBUSY) => {
                // Kernel short of resources or completion queue full: let the
                // caller reap; back off a little if there is nothing to reap.
                if self.ring.completion().is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            _ => {
                tracing::error!(error = %e, "io_uring_enter failed with I/O in flight; aborting to keep the kernel off freed buffers");
                std::process::abort();
            }
        }
    }

    /// Push one SQE. The caller has checked that the queue has room.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid (and, for reads, otherwise
    /// unused) until its completion has been reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: forwarded to the caller's contract above.
        let pushed = unsafe { self.ring.submission().push(entry) };
        // Room was checked before building the entry, and only this thread uses the ring.
        debug_assert!(pushed.is_ok(), "submission queue full after a room check");
        if pushed.is_err() {
            // Unreachable; never lose an SQE silently if it were to happen.
            tracing::error!("io_uring submission queue unexpectedly full; aborting");
            std::process::abort();
        }
    }

    /// Run one SQE to completion and return its result (retrying EINTR/EAGAIN
    /// results by rebuilding the SQE).
    ///
    /// # Safety
    /// The buffers `build` points to must stay valid until this returns; it does
    /// not return before the SQE's completion has been reaped.
    unsafe fn run_single(&mut self, build: impl Fn() -> squeue::Entry) -> io::Result<i32> {
        loop {
            if self.ring.submission().is_full() {
                // Nothing of ours is pending between calls; flush anything stale.
                self.enter(0);
            }
            let entry = build().user_data(SINGLE);
            // SAFETY: forwarded to the caller's contract: we wait for the CQE below.
            unsafe { self.push(&entry) };
            let res = loop {
                self.enter(1);
                if let Some(cqe) = self.ring.completion().next() {
                    debug_assert_eq!(cqe.user_data(), SINGLE);
                    break cqe.result();
                }
            };
            if res == -libc::EINTR || res == -libc::EAGAIN {
                continue;
            }
            if res < 0 {
                return Err(io::Error::from_raw_os_error(-res));
            }
            return Ok(res);
        }
    }
}

/// What one piece does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    /// Write bytes of a `WriteOp::Write`.
    Write,
    /// Write bytes of the shared zero buffer.
    ZeroWrite,
    /// fallocate(PUNCH_HOLE | KEEP_SIZE) over the whole range.
    Punch,
}

/// A byte range of one op: waiting to be submitted (in the work queue, possibly
/// longer than one SQE) or in flight (in a slot, exactly one SQE).
#[derive(Debug, Clone, Copy)]
struct Piece {
    op: usize,
    kind: PieceKind,
    /// File offset of the first byte.
    pos: u64,
    len: u64,
}

/// Bookkeeping of one batch.
struct Batch {
    /// In-flight pieces, indexed by user_data.
    slots: Vec<Option<Piece>>,
    free: Vec<usize>,
    /// Pieces waiting for a slot, in order; remainders go to the front.
    work: VecDeque<Piece>,
    /// Per op: pieces in flight or waiting. The op is complete at zero.
    refs: Vec<u32>,
    /// Which ops may have to wait for an earlier one (see [`Overlaps`]).
    overlaps: Overlaps,
    /// The failure with the lowest op index, if any.
    failure: Option<(usize, io::Error)>,
}

impl Batch {
    fn new(ops: &[WriteOp<'_>], depth: usize) -> Self {
        Batch {
            slots: vec![None; depth],
            free: (0..depth).rev().collect(),
            work: VecDeque::new(),
            refs: vec![0; ops.len()],
            overlaps: Overlaps::of(ops),
            failure: None,
        }
    }

    /// True while op `op` (started) has pieces in flight or waiting.
    #[cfg(test)]
    fn is_active(&self, op: usize) -> bool {
        self.refs[op] > 0
    }

    /// Op `op` starts with one piece.
    fn start(&mut self, op: usize) {
        self.refs[op] = 1;
        self.overlaps.started(op);
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn release(&mut self, op: usize) {
        self.refs[op] -= 1;
        if self.refs[op] == 0 {
            self.overlaps.completed(op);
        }
    }

    fn fail(&mut self, op: usize, e: io::Error) {
        if self.failure.as_ref().is_none_or(|(i, _)| op < *i) {
            self.failure = Some((op, e));
        }
        // Stop starting anything new; what is in flight is still reaped.
        for p in std::mem::take(&mut self.work) {
            self.release(p.op);
        }
        self.release(op);
    }

    /// True if op `next` (not started; every op before it is) overlaps an
    /// active op: it must wait until that one is complete.
    fn overlaps_active(&self, ops: &[WriteOp<'_>], next: usize) -> bool {
        self.overlaps
            .active_with(next)
            .iter()
            .any(|&a| ops[a].overlaps(&ops[next]))
    }
}

/// The ops of a batch grouped by overlap, so that the ordering rule costs
/// nothing for the usual op that overlaps no other. A cluster is a maximal run
/// of ops, in offset order, each starting before the furthest end of those
/// before it; ops of different clusters never overlap. An op alone in its
/// cluster never waits; any other is checked only against the active members
/// of its cluster (started, not complete: at most the ring's depth + 1).
#[derive(Debug, Default)]
struct Overlaps {
    /// Per op: index of its cluster (of two or more ops), or `NONE` when alone.
    cluster: Vec<usize>,
    /// Per cluster: its members started and not complete.
    active: Vec<Vec<usize>>,
}

impl Overlaps {
    const NONE: usize = usize::MAX;

    fn of(ops: &[WriteOp<'_>]) -> Overlaps {
        let mut order: Vec<usize> = (0..ops.len()).filter(|&i| !ops[i].is_empty()).collect();
        order.sort_unstable_by_key(|&i| ops[i].offset());
        let mut o = Overlaps {
            cluster: vec![Self::NONE; ops.len()],
            active: Vec::new(),
        };
        let mut start = 0;
        while start < order.len() {
            // Saturating, as `WriteOp::overlaps` is (ranges are checked first).
            let end_of = |i: usize| ops[i].offset().saturating_add(ops[i].len());
            let mut reach = end_of(order[start]);
            let mut end = start + 1;
            while end < order.len() && ops[order[end]].offset() < reach {
                reach = reach.max(end_of(order[end]));
                end += 1;
            }
            if end - start > 1 {
                let id = o.active.len();
                for &m in &order[start..end] {
                    o.cluster[m] = id;
                }
                o.active.push(Vec::new());
            }
            start = end;
        }
        o
    }

    fn cluster_of(&self, op: usize) -> Option<usize> {
        self.cluster.get(op).copied().filter(|&c| c != Self::NONE)
    }

    fn started(&mut self, op: usize) {
        if let Some(c) = self.cluster_of(op) {
            self.active[c].push(op);
        }
    }

    fn completed(&mut self, op: usize) {
        if let Some(c) = self.cluster_of(op)
            && let Some(i) = self.active[c].iter().position(|&a| a == op)
        {
            self.active[c].swap_remove(i);
        }
    }

    /// The active ops `op` may overlap (those of its cluster).
    fn active_with(&self, op: usize) -> &[usize] {
        self.cluster_of(op).map_or(&[], |c| &self.active[c])
    }

    /// The ops before `op` that it may overlap (a superset of those it does).
    #[cfg(test)]
    fn earlier(&self, op: usize) -> Vec<usize> {
        self.cluster_of(op).map_or(Vec::new(), |c| {
            (0..op).filter(|&m| self.cluster[m] == c).collect()
        })
    }
}

impl UringEngine {
    /// Handle one completion of a batch piece.
    fn complete(batch: &mut Batch, zero: &mut ZeroMode, user_data: u64, res: i32) {
        let Some(piece) = usize::try_from(user_data)
            .ok()
            .and_then(|s| batch.slots.get_mut(s))
            .and_then(Option::take)
        else {
            tracing::warn!(
                user_data,
                "io_uring completion for no in-flight piece; ignored"
            );
            return;
        };
        batch.free.push(user_data as usize);
        if res == -libc::EINTR || res == -libc::EAGAIN {
            // Resubmit the same piece; the op stays incomplete meanwhile.
            batch.work.push_front(piece);
            return;
        }
        match piece.kind {
            PieceKind::Punch if res == -libc::EOPNOTSUPP => {
                // The file system cannot punch holes: zero this range by writing,
                // before anything that overlaps it, and write zeros from now on.
                *zero = ZeroMode::WriteZeros;
                batch.work.push_front(Piece {
                    kind: PieceKind::ZeroWrite,
                    ..piece
                });
            }
            _ if res < 0 => batch.fail(piece.op, io::Error::from_raw_os_error(-res)),
            PieceKind::Punch => batch.release(piece.op),
            PieceKind::Write | PieceKind::ZeroWrite => {
                let n = res as u64;
                if n == 0 {
                    let e = io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "write at offset {} wrote 0 of {} bytes",
                            piece.pos, piece.len
                        ),
                    );
                    batch.fail(piece.op, e);
                } else if n < piece.len {
                    // Short write: the remainder goes first, the op stays incomplete.
                    batch.work.push_front(Piece {
                        pos: piece.pos + n,
                        len: piece.len - n,
                        ..piece
                    });
                } else {
                    batch.release(piece.op);
                }
            }
        }
    }

    /// Cut the next SQE from the front of the work queue and push it.
    fn submit_front(&mut self, batch: &mut Batch, ops: &[WriteOp<'_>], fd: types::Fd) {
        let Some(front) = batch.work.front_mut() else {
            return;
        };
        let limit = match front.kind {
            PieceKind::Write => MAX_IO_CHUNK as u64,
            PieceKind::ZeroWrite => ZERO_CHUNK as u64,
            PieceKind::Punch => u64::MAX,
        };
        let piece = Piece {
            len: front.len.min(limit),
            ..*front
        };
        front.pos += piece.len;
        front.len -= piece.len;
        if front.len == 0 {
            batch.work.pop_front();
        } else {
            // One range became two: the op now has one more outstanding piece.
            batch.refs[piece.op] += 1;
        }
        let Some(slot) = batch.free.pop() else {
            unreachable!("submit_front called without a free slot");
        };
        let entry = match piece.kind {
            PieceKind::Write => {
                let WriteOp::Write { offset, data } = ops[piece.op] else {
                    unreachable!("write piece of a zero op");
                };
                // In range: pos - offset + len <= data.len() by construction.
                let start = (piece.pos - offset) as usize;
                let bytes = &data[start..start + piece.len as usize];
                opcode::Write::new(fd, bytes.as_ptr(), piece.len as u32)
                    .offset(piece.pos)
                    .build()
            }
            PieceKind::ZeroWrite => opcode::Write::new(fd, ZEROS.as_ptr(), piece.len as u32)
                .offset(piece.pos)
                .build(),
            PieceKind::Punch => opcode::Fallocate::new(fd, piece.len)
                .offset(piece.pos)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(slot as u64);
        batch.slots[slot] = Some(piece);
        // SAFETY: a Write SQE points into `ops[piece.op]`'s data, borrowed for the
        // whole `write_batch` call, or into the `'static` ZEROS buffer; a Punch SQE
        // points to no memory. `write_batch` reaps every SQE it pushed before it
        // returns (on success and on error), so no buffer is released while the
        // kernel may still read it.
        unsafe { self.push(&entry) };
    }
}

/// A byte range of one read of a `read_batch`: `len` bytes, `at` bytes into
/// read `read`'s buffer (and file range). Waiting pieces may be longer than one
/// SQE; an in-flight piece is exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadPiece {
    read: usize,
    at: usize,
    len: usize,
}

/// Bookkeeping of one `read_batch`.
struct ReadBatch {
    /// In-flight pieces, indexed by user_data.
    slots: Vec<Option<ReadPiece>>,
    free: Vec<usize>,
    /// Remainders (short reads, EINTR/EAGAIN) waiting for a slot, first out first.
    work: VecDeque<ReadPiece>,
    /// The next read of the batch not started yet.
    next: usize,
    /// The failure with the lowest read index, if any.
    failure: Option<(usize, io::Error)>,
}

impl ReadBatch {
    fn new(depth: usize) -> Self {
        ReadBatch {
            slots: vec![None; depth],
            free: (0..depth).rev().collect(),
            work: VecDeque::new(),
            next: 0,
            failure: None,
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The next piece to submit (a remainder first, then the next non-empty
    /// read of `lens`), at most `MAX_IO_CHUNK` bytes; what is left of a longer
    /// range goes back to the front of the queue.
    fn next_piece(&mut self, lens: &[usize]) -> Option<ReadPiece> {
        let whole = match self.work.pop_front() {
            Some(p) => p,
            None => {
                while lens.get(self.next).is_some_and(|&l| l == 0) {
                    self.next += 1;
                }
                let len = *lens.get(self.next)?;
                self.next += 1;
                ReadPiece {
                    read: self.next - 1,
                    at: 0,
                    len,
                }
            }
        };
        let len = whole.len.min(MAX_IO_CHUNK);
        if len < whole.len {
            self.work.push_front(ReadPiece {
                at: whole.at + len,
                len: whole.len - len,
                ..whole
            });
        }
        Some(ReadPiece { len, ..whole })
    }

    fn fail(&mut self, read: usize, e: io::Error, reads: usize) {
        if self.failure.as_ref().is_none_or(|(i, _)| read < *i) {
            self.failure = Some((read, e));
        }
        // Start nothing new; what is in flight is still reaped.
        self.work.clear();
        self.next = reads;
    }

    /// Handle the completion of the piece in slot `user_data` with result
    /// `res`, for a batch of `reads` reads.
    fn complete(&mut self, user_data: u64, res: i32, reads: usize) {
        let Some(piece) = usize::try_from(user_data)
            .ok()
            .and_then(|s| self.slots.get_mut(s))
            .and_then(Option::take)
        else {
            tracing::warn!(
                user_data,
                "io_uring completion for no in-flight read; ignored"
            );
            return;
        };
        self.free.push(user_data as usize);
        if res == -libc::EINTR || res == -libc::EAGAIN {
            // Resubmit the same piece.
            self.work.push_front(piece);
        } else if res < 0 {
            self.fail(piece.read, io::Error::from_raw_os_error(-res), reads);
        } else if res == 0 {
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of file with {} bytes of the read left", piece.len),
            );
            self.fail(piece.read, e, reads);
        } else if (res as usize) < piece.len {
            // Short read: the remainder goes first.
            let n = res as usize;
            self.work.push_front(ReadPiece {
                at: piece.at + n,
                len: piece.len - n,
                ..piece
            });
        }
    }

    /// True when nothing is left to submit.
    fn drained(&self, reads: usize) -> bool {
        self.work.is_empty() && self.next >= reads
    }
}

impl IoEngine for UringEngine {
    fn kind(&self) -> Engine {
        Engine::Uring
    }

    fn write_batch(
        &mut self,
        file: &File,
        ops: &[WriteOp<'_>],
        zero: &mut ZeroMode,
    ) -> Result<(), EngineError> {
        let fd = types::Fd(file.as_raw_fd());
        let mut batch = Batch::new(ops, self.depth);
        let mut next = 0usize;
        loop {
            // Fill the ring: waiting pieces first, then new ops in order. A full
            // ring (no free slot or no SQ room) is a throttle: reap, then go on.
            while batch.failure.is_none()
                && !batch.free.is_empty()
                && !self.ring.submission().is_full()
            {
                if !batch.work.is_empty() {
                    self.submit_front(&mut batch, ops, fd);
                    continue;
                }
                let Some(op) = ops.get(next) else { break };
                if op.is_empty() {
                    next += 1;
                    continue;
                }
                if batch.overlaps_active(ops, next) {
                    // Ordering rule: wait until every earlier overlapping op is done.
                    break;
                }
                let kind = match op {
                    WriteOp::Write { .. } => PieceKind::Write,
                    WriteOp::Zero { .. } if *zero == ZeroMode::PunchHole => PieceKind::Punch,
                    WriteOp::Zero { .. } => PieceKind::ZeroWrite,
                };
                batch.work.push_back(Piece {
                    op: next,
                    kind,
                    pos: op.offset(),
                    len: op.len(),
                });
                batch.start(next);
                next += 1;
            }
            if batch.in_flight() == 0 {
                // Nothing pushed and nothing pending: either failed (and drained)
                // or every op has completed.
                if let Some((index, source)) = batch.failure.take() {
                    return Err(EngineError::op(index, &ops[index], source));
                }
                debug_assert!(next == ops.len() && batch.work.is_empty());
                return Ok(());
            }
            self.enter(1);
            for cqe in self.ring.completion() {
                Self::complete(&mut batch, zero, cqe.user_data(), cqe.result());
            }
        }
    }

    fn sync_data(&mut self, file: &File) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let build = || {
            opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        };
        // SAFETY: an fsync SQE points to no memory; the fd is borrowed for the call.
        unsafe { self.run_single(build) }.map(drop)
    }

    fn read_batch(
        &mut self,
        file: &File,
        reads: &mut [(u64, &mut [u8])],
    ) -> Result<(), ReadBatchError> {
        let fd = types::Fd(file.as_raw_fd());
        // Every buffer's pointer, taken once from its exclusive borrow: `reads`
        // is not touched again until every SQE of the batch has been reaped.
        let bufs: Vec<(u64, *mut u8)> = reads
            .iter_mut()
            .map(|(offset, buf)| (*offset, buf.as_mut_ptr()))
            .collect();
        let lens: Vec<usize> = reads.iter().map(|(_, buf)| buf.len()).collect();
        let mut batch = ReadBatch::new(self.depth);
        loop {
            while batch.failure.is_none()
                && !batch.free.is_empty()
                && !self.ring.submission().is_full()
            {
                let Some(piece) = batch.next_piece(&lens) else {
                    break;
                };
                let Some(slot) = batch.free.pop() else {
                    unreachable!("a free slot was checked");
                };
                let (offset, base) = bufs[piece.read];
                // In bounds: piece.at + piece.len <= lens[piece.read] by construction.
                let ptr = base.wrapping_add(piece.at);
                let entry = opcode::Read::new(fd, ptr, piece.len as u32)
                    .offset(offset + piece.at as u64)
                    .build()
                    .user_data(slot as u64);
                batch.slots[slot] = Some(piece);
                // SAFETY: `ptr..ptr + piece.len` lies inside the buffer of
                // `reads[piece.read]`, exclusively borrowed for this whole call;
                // no two in-flight pieces overlap (a piece is in one slot or in
                // the work queue, never both, and pieces of one read are
                // disjoint), and nothing else touches the buffers until this
                // function returns, which is only after every SQE it pushed has
                // been reaped (on success and on error). The fd is borrowed too.
                unsafe { self.push(&entry) };
            }
            if batch.in_flight() == 0 {
                if let Some((index, source)) = batch.failure.take() {
                    return Err(ReadBatchError {
                        index,
                        offset: reads[index].0,
                        len: lens[index] as u64,
                        source,
                    });
                }
                if batch.drained(lens.len()) {
                    return Ok(());
                }
                // Nothing of ours in flight but no room to submit: flush the
                // submission queue and try again.
                self.enter(0);
                continue;
            }
            self.enter(1);
            for cqe in self.ring.completion() {
                batch.complete(cqe.user_data(), cqe.result(), lens.len());
            }
        }
    }

    fn read_at(&mut self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(MAX_IO_CHUNK);
            let ptr = buf[done..].as_mut_ptr();
            let pos = offset + done as u64;
            let build = || opcode::Read::new(fd, ptr, len as u32).offset(pos).build();
            // SAFETY: `ptr..ptr+len` lies inside `buf`, which is exclusively
            // borrowed for this call and not touched until `run_single` returns,
            // which is after the kernel's completion for this read was reaped.
            let n = unsafe { self.run_single(build) }? as usize;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at offset {pos} with {} bytes left to read",
                        buf.len() - done
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_pieces_skip_empty_reads_and_cut_long_ones() {
        let mut b = ReadBatch::new(4);
        let lens = [0, 10, 0, MAX_IO_CHUNK + 5];
        assert_eq!(
            b.next_piece(&lens),
            Some(ReadPiece {
                read: 1,
                at: 0,
                len: 10
            })
        );
        assert_eq!(
            b.next_piece(&lens),
            Some(ReadPiece {
                read: 3,
                at: 0,
                len: MAX_IO_CHUNK
            })
        );
        assert_eq!(
            b.next_piece(&lens),
            Some(ReadPiece {
                read: 3,
                at: MAX_IO_CHUNK,
                len: 5
            })
        );
        assert_eq!(b.next_piece(&lens), None);
        assert!(b.drained(lens.len()));
    }

    fn read_in_flight(piece: ReadPiece) -> (ReadBatch, u64) {
        let mut b = ReadBatch::new(4);
        b.next = 3;
        let slot = b.free.pop().unwrap();
        b.slots[slot] = Some(piece);
        (b, slot as u64)
    }

    const RP: ReadPiece = ReadPiece {
        read: 1,
        at: 100,
        len: 500,
    };

    #[test]
    fn short_reads_and_retryable_errors_resubmit_the_rest() {
        let (mut b, slot) = read_in_flight(RP);
        b.complete(slot, 200, 3);
        assert_eq!(
            b.work.front().copied(),
            Some(ReadPiece {
                read: 1,
                at: 300,
                len: 300
            })
        );
        assert_eq!(b.in_flight(), 0);
        for errno in [libc::EINTR, libc::EAGAIN] {
            let (mut b, slot) = read_in_flight(RP);
            b.complete(slot, -errno, 3);
            assert_eq!(b.work.front().copied(), Some(RP));
            assert!(b.failure.is_none());
        }
        let (mut b, slot) = read_in_flight(RP);
        b.complete(slot, 500, 3);
        assert!(b.work.is_empty() && b.failure.is_none() && b.drained(3));
    }

    #[test]
    fn read_errors_keep_the_lowest_read_and_stop_new_work() {
        let (mut b, slot) = read_in_flight(RP);
        b.next = 1;
        b.work.push_back(ReadPiece { read: 2, ..RP });
        b.complete(slot, -libc::EIO, 3);
        assert!(b.drained(3), "nothing new starts after a failure");
        assert_eq!(b.failure.as_ref().map(|f| f.0), Some(1));
        b.fail(0, io::Error::from_raw_os_error(libc::EBADF), 3);
        assert_eq!(b.failure.as_ref().map(|f| f.0), Some(0));
        b.fail(2, io::Error::from_raw_os_error(libc::EBADF), 3);
        assert_eq!(b.failure.as_ref().map(|f| f.0), Some(0));
        // End of file is an error, not a loop; an unknown slot is ignored.
        let (mut b, slot) = read_in_flight(RP);
        b.complete(slot, 0, 3);
        let (i, e) = b.failure.take().unwrap();
        assert_eq!((i, e.kind()), (1, io::ErrorKind::UnexpectedEof));
        b.complete(999, 0, 3);
        b.complete(u64::MAX, 0, 3);
    }

    /// A batch with op 0 started and one piece of it in flight in slot `slot`.
    fn one_in_flight(piece: Piece) -> (Batch, u64) {
        let data = [0u8; 500];
        let ops = [WriteOp::Write {
            offset: 1000,
            data: &data,
        }; 2];
        let mut b = Batch::new(&ops, 4);
        b.start(piece.op);
        let slot = b.free.pop().unwrap();
        b.slots[slot] = Some(piece);
        (b, slot as u64)
    }

    fn piece(kind: PieceKind) -> Piece {
        Piece {
            op: 0,
            kind,
            pos: 1000,
            len: 500,
        }
    }

    #[test]
    fn short_write_requeues_the_remainder_first_and_keeps_the_op_active() {
        let (mut b, slot) = one_in_flight(piece(PieceKind::Write));
        let mut zero = ZeroMode::PunchHole;
        UringEngine::complete(&mut b, &mut zero, slot, 200);
        let rest = b.work.front().copied().unwrap();
        assert_eq!(
            (rest.pos, rest.len, rest.kind),
            (1200, 300, PieceKind::Write)
        );
        assert_eq!((b.refs[0], b.in_flight()), (1, 0));
        assert!(b.is_active(0));
    }

    #[test]
    fn eintr_and_eagain_resubmit_the_same_piece() {
        for errno in [libc::EINTR, libc::EAGAIN] {
            let (mut b, slot) = one_in_flight(piece(PieceKind::ZeroWrite));
            let mut zero = ZeroMode::WriteZeros;
            UringEngine::complete(&mut b, &mut zero, slot, -errno);
            let again = b.work.front().copied().unwrap();
            assert_eq!((again.pos, again.len), (1000, 500));
            assert!(b.failure.is_none());
            assert_eq!(b.refs[0], 1);
        }
    }

    #[test]
    fn punch_refused_falls_back_to_zero_writes_before_anything_overlapping() {
        let (mut b, slot) = one_in_flight(piece(PieceKind::Punch));
        let mut zero = ZeroMode::PunchHole;
        UringEngine::complete(&mut b, &mut zero, slot, -libc::EOPNOTSUPP);
        assert_eq!(zero, ZeroMode::WriteZeros);
        let fallback = b.work.front().copied().unwrap();
        assert_eq!(
            (fallback.kind, fallback.pos, fallback.len),
            (PieceKind::ZeroWrite, 1000, 500)
        );
        assert!(b.is_active(0), "still blocks overlapping ops");
        let data = [0u8; 500];
        let ops = [WriteOp::Write {
            offset: 1000,
            data: &data,
        }; 2];
        assert!(b.overlaps_active(&ops, 1));
    }

    #[test]
    fn errors_keep_the_lowest_op_and_stop_new_work() {
        let (mut b, slot) = one_in_flight(Piece {
            op: 1,
            ..piece(PieceKind::Write)
        });
        b.work.push_back(Piece {
            op: 1,
            ..piece(PieceKind::Write)
        });
        b.refs[1] += 1;
        let mut zero = ZeroMode::PunchHole;
        UringEngine::complete(&mut b, &mut zero, slot, -libc::EIO);
        assert!(b.work.is_empty());
        assert_eq!(b.refs[1], 0);
        assert!(!b.is_active(1));
        assert_eq!(b.failure.as_ref().map(|f| f.0), Some(1));
        b.start(0);
        b.fail(0, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(b.failure.as_ref().map(|f| f.0), Some(0));
        // A completion for an unknown slot is ignored, not a panic.
        UringEngine::complete(&mut b, &mut zero, 999, 0);
        UringEngine::complete(&mut b, &mut zero, u64::MAX, 0);
    }

    #[test]
    fn full_writes_complete_the_op() {
        let (mut b, slot) = one_in_flight(piece(PieceKind::Write));
        let mut zero = ZeroMode::PunchHole;
        UringEngine::complete(&mut b, &mut zero, slot, 500);
        assert_eq!((b.refs[0], b.in_flight()), (0, 0));
        assert!(!b.is_active(0) && b.work.is_empty());
    }

    fn w(offset: u64, data: &[u8]) -> WriteOp<'_> {
        WriteOp::Write { offset, data }
    }

    #[test]
    fn overlap_clusters_join_what_overlaps_and_nothing_else() {
        let d = [0u8; 100];
        let ops = [
            w(0, &d),                             // 0: [0, 100)
            w(500, &d[..8]),                      // 1: alone
            w(50, &d[..10]),                      // 2: inside 0
            w(10, &d[..10]),                      // 3: inside 0, before 2 in offset order
            w(100, &d[..1]),                      // 4: touches 0's end: alone
            WriteOp::Zero { offset: 20, len: 0 }, // 5: empty: alone
            w(1000, &d),                          // 6: with 7
            w(1099, &d[..2]),                     // 7
        ];
        let o = Overlaps::of(&ops);
        let earlier: Vec<Vec<usize>> = (0..ops.len()).map(|i| o.earlier(i)).collect();
        assert_eq!(earlier, [&[][..], &[], &[0], &[0, 2], &[], &[], &[], &[6]],);
    }

    proptest::proptest! {
        /// Every earlier op an op overlaps is among those it is checked against.
        #[test]
        fn overlap_clusters_cover_every_overlapping_pair(
            ranges in proptest::collection::vec((0u64..64, 0usize..16), 0..40)
        ) {
            let d = [0u8; 16];
            let ops: Vec<WriteOp<'_>> = ranges.iter().map(|&(o, l)| w(o, &d[..l])).collect();
            let o = Overlaps::of(&ops);
            for j in 0..ops.len() {
                for i in 0..j {
                    if ops[i].overlaps(&ops[j]) {
                        proptest::prop_assert!(o.earlier(j).contains(&i), "{i} before {j}");
                    }
                }
                proptest::prop_assert!(o.earlier(j).iter().all(|&i| i < j));
            }
        }
    }
}
