//! The plain engine: `pwrite`, `pread`, `fallocate`, `fdatasync`, one op at a
//! time in slice order, so overlapping ops are ordered by construction.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use super::{Engine, EngineError, IoEngine, WriteOp, ZERO_CHUNK, ZEROS, ZeroMode};

/// Synchronous engine: each op completes before the next one starts.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncEngine;

impl SyncEngine {
    /// A new synchronous engine (no setup, cannot fail).
    pub fn new() -> Self {
        SyncEngine
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// `pwrite` all of `buf` at `offset`: short writes continue, EINTR/EAGAIN retry.
pub(crate) fn pwrite_all(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("pwrite at offset {offset} wrote 0 of {} bytes", buf.len()),
                ));
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if retryable(&e) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pread` exactly `buf.len()` bytes at `offset`: short reads continue, EINTR/EAGAIN retry.
pub(crate) fn pread_exact(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at offset {offset} with {} bytes left to read",
                        buf.len()
                    ),
                ));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if retryable(&e) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Zero `len` bytes at `offset` by writing the shared zero buffer in chunks.
fn write_zeros(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let n = len.min(ZERO_CHUNK as u64) as usize;
        pwrite_all(file, &ZEROS[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn off_t(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{v} does not fit in off_t"),
        )
    })
}

pub(crate) fn zero_range(
    file: &File,
    offset: u64,
    len: u64,
    mode: &mut ZeroMode,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if *mode == ZeroMode::PunchHole {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let (o, l) = (off_t(offset)?, off_t(len)?);
        loop {
            match fallocate(file, flags, o, l) {
                Ok(()) => return Ok(()),
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(Errno::EOPNOTSUPP) => {
                    *mode = ZeroMode::WriteZeros;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    write_zeros(file, offset, len)
}

impl IoEngine for SyncEngine {
    fn kind(&self) -> Engine {
        Engine::Sync
    }

    fn write_batch(
        &mut self,
        file: &File,
        ops: &[WriteOp<'_>],
        zero: &mut ZeroMode,
    ) -> Result<(), EngineError> {
        for (index, op) in ops.iter().enumerate() {
            let res = match *op {
                WriteOp::Write { offset, data } => pwrite_all(file, data, offset),
                WriteOp::Zero { offset, len } => zero_range(file, offset, len, zero),
            };
            res.map_err(|source| EngineError::op(index, op, source))?;
        }
        Ok(())
    }

    fn sync_data(&mut self, file: &File) -> io::Result<()> {
        loop {
            match file.sync_data() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn read_at(&mut self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        pread_exact(file, buf, offset)
    }
}
