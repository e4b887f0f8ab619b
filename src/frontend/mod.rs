//! Frontends: how a workload reaches a protected disk.
//!
//! Each frontend (the [`nbd`] server, the [`fuse`] file, the [`ublk`] block
//! device) speaks its own protocol and maps every request onto one [`BlockIo`]:
//! the single internal I/O path of a protected disk. For a protected disk that path is
//! [`crate::capture::protected::ProtectedDisk`]: a write reaches the backing disk
//! and is recorded by capture before the call returns, reads go straight to the
//! backing disk. The frontends never see capture; their tests run against a
//! [`crate::capture::backing::BackingDisk`] (the same backing-disk I/O without
//! capture) as well as against the protected disk.
//!
//! Every method blocks (positional I/O, `fdatasync`, capture's locks): frontends
//! call them from threads of their own or from `spawn_blocking`, never on an async
//! executor thread.

pub mod fuse;
pub mod nbd;
pub mod ublk;

use std::fmt;

use thiserror::Error;

use crate::error::{Classify, ErrorKind};

/// The operation an [`IoError`] refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush (make completed writes durable).
    Flush,
    /// Discard a range (reads as zeros afterwards).
    Trim,
    /// Write zeros over a range.
    WriteZeroes,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
        })
    }
}

/// Why an I/O request failed. Frontends map it to their protocol's error code
/// with [`IoError::errno`].
#[derive(Debug, Error)]
pub enum IoErrorKind {
    /// The range reaches beyond the end of the disk.
    #[error("beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Disk size in bytes.
        size: u64,
    },
    /// The request itself is invalid (zero length, misaligned for this path...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The disk is read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The backing disk failed (EIO, ENOSPC...). For a write, the range is marked
    /// for resync by capture, since part of it may have reached the disk.
    #[error("backing disk: {0}")]
    Backing(#[source] std::io::Error),
    /// The disk is shutting down; nothing was done.
    #[error("shutting down")]
    Shutdown,
}

/// A failed I/O request: what was asked, and why it failed.
#[derive(Debug, Error)]
#[error("{op} of {len} bytes at offset {offset}: {kind}")]
pub struct IoError {
    /// The operation.
    pub op: Op,
    /// Byte offset of the request.
    pub offset: u64,
    /// Length of the request in bytes.
    pub len: u64,
    /// Why it failed.
    #[source]
    pub kind: IoErrorKind,
}

impl IoError {
    /// A new error for `op` over `offset..offset+len`.
    pub fn new(op: Op, offset: u64, len: u64, kind: IoErrorKind) -> Self {
        IoError {
            op,
            offset,
            len,
            kind,
        }
    }

    /// The Linux errno that best describes the failure (frontends translate it to
    /// their protocol: NBD error values, FUSE replies). Writes beyond the end are
    /// `ENOSPC` as on a block device; other out-of-range requests `EINVAL`.
    pub fn errno(&self) -> i32 {
        match &self.kind {
            IoErrorKind::OutOfRange { .. } => match self.op {
                Op::Write | Op::WriteZeroes => libc::ENOSPC,
                _ => libc::EINVAL,
            },
            IoErrorKind::Invalid(_) => libc::EINVAL,
            IoErrorKind::ReadOnly => libc::EPERM,
            IoErrorKind::Backing(e) => e.raw_os_error().unwrap_or(libc::EIO),
            IoErrorKind::Shutdown => libc::ESHUTDOWN,
        }
    }
}

impl Classify for IoError {
    fn kind(&self) -> ErrorKind {
        match &self.kind {
            IoErrorKind::OutOfRange { .. } | IoErrorKind::Invalid(_) | IoErrorKind::ReadOnly => {
                ErrorKind::Corrupt
            }
            IoErrorKind::Backing(_) => ErrorKind::Io,
            IoErrorKind::Shutdown => ErrorKind::Shutdown,
        }
    }
}

/// The one internal I/O path of a disk that every frontend uses.
///
/// Offsets and lengths are bytes; no alignment is required by this layer (a
/// frontend may impose its own, e.g. NBD's advertised minimum block size). A
/// zero-length read, write, trim or write-zeroes is refused as
/// [`IoErrorKind::Invalid`]. All methods block.
pub trait BlockIo: Send + Sync {
    /// Size of the disk in bytes (fixed while it is served).
    fn size(&self) -> u64;

    /// True when writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;

    /// Write `data` at `offset`. Returns once the data is on the backing disk (in
    /// its cache; with `fua`, durably) and, for a protected disk, recorded by
    /// capture.
    fn write_at(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError>;

    /// Make every write that completed before this call durable.
    fn flush(&self) -> Result<(), IoError>;

    /// Discard `len` bytes at `offset`: the range reads as zeros afterwards.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError>;

    /// Write zeros over `len` bytes at `offset`; `may_unmap` allows deallocating
    /// the range (punching a hole) instead of writing zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), IoError>;
}

/// Check that `offset..offset+len` is a non-empty range inside a disk of `size`
/// bytes; the shared first step of every [`BlockIo`] implementation.
pub fn check_range(op: Op, offset: u64, len: u64, size: u64) -> Result<(), IoError> {
    if len == 0 {
        return Err(IoError::new(
            op,
            offset,
            len,
            IoErrorKind::Invalid("zero-length request".into()),
        ));
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(IoError::new(
            op,
            offset,
            len,
            IoErrorKind::OutOfRange { size },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_and_errors_map_to_errno() {
        assert!(check_range(Op::Read, 0, 4096, 4096).is_ok());
        let e = check_range(Op::Write, 4096, 1, 4096).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(e.to_string().contains("beyond the end"), "{e}");
        let e = check_range(Op::Read, u64::MAX, 2, 4096).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let e = check_range(Op::Trim, 0, 0, 4096).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let e = IoError::new(
            Op::Write,
            0,
            1,
            IoErrorKind::Backing(std::io::Error::from_raw_os_error(libc::EIO)),
        );
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.kind().is_retryable());
    }
}
