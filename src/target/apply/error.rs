//! Why a frame was not applied, or a group had to stop.

use std::path::PathBuf;

use super::super::redo::redo_kind;
use super::super::retention::RetentionError;
use super::super::watermark::WatermarkError;
use crate::error::{Classify, ErrorKind};
use crate::frame::FrameError;
use crate::image::{ImageError, OpKind};
use crate::spool::SpoolError;

/// Why a frame was not applied, or the group could not continue.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The frame failed to open (wrong key, tampered, corrupt payload).
    #[error("group {group} frame {frame_no}: cannot open: {source}")]
    Open {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Why.
        source: Box<FrameError>,
    },
    /// The frame does not continue the last applied frame (never expected:
    /// the gate orders frames; counted as a chain violation).
    #[error(
        "group {group} frame {frame_no}: chain violation: it names predecessor frame \
         {prev_frame_no} (last seq {prev_last_seq}) but the last frame applied is \
         {applied_frame_no} (last seq {applied_last_seq})"
    )]
    Chain {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Predecessor it names.
        prev_frame_no: u64,
        /// Predecessor's last seq it names.
        prev_last_seq: u64,
        /// Last frame applied.
        applied_frame_no: u64,
        /// Its last seq.
        applied_last_seq: u64,
    },
    /// A record names a disk id the group does not configure.
    #[error(
        "group {group} frame {frame_no}: record {index} names disk {disk}, which is not \
         configured for this group (configured disks: {configured:?})"
    )]
    UnknownDisk {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Record index.
        index: usize,
        /// Disk id.
        disk: u16,
        /// Configured ids.
        configured: Vec<u16>,
    },
    /// The replica is smaller than the source disk.
    #[error(
        "group {group} frame {frame_no}: replica {path} of disk {disk} is {size} bytes, \
         smaller than the source disk's {disk_size} bytes; refusing to apply \
         (give the replica at least the source disk's size)"
    )]
    TooSmall {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Disk id.
        disk: u16,
        /// Replica path.
        path: PathBuf,
        /// Replica size.
        size: u64,
        /// Source disk size (DiskSize record).
        disk_size: u64,
    },
    /// A Write or Zero record lies (partly) outside the replica.
    #[error(
        "group {group} frame {frame_no}: record {index} ({kind} at offset {offset}, len {len}) \
         lies outside replica {path} of disk {disk} ({size} bytes)"
    )]
    OutOfRange {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Record index.
        index: usize,
        /// Write or zero.
        kind: OpKind,
        /// Disk id.
        disk: u16,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Replica path.
        path: PathBuf,
        /// Replica size.
        size: u64,
    },
    /// A record writes a disk whose replica is not open, and no DiskSize
    /// record announced its size.
    #[error(
        "group {group} frame {frame_no}: record {index} writes disk {disk} but no replica is \
         open for it: {path} does not exist and no DiskSize record announced the disk's size"
    )]
    NoImage {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Record index.
        index: usize,
        /// Disk id.
        disk: u16,
        /// Replica path.
        path: PathBuf,
    },
    /// Opening, creating, writing or flushing a replica failed.
    #[error("group {group} frame {frame_no}: {source}")]
    Image {
        /// Group.
        group: String,
        /// Frame (for a flush: the last frame of the batch).
        frame_no: u64,
        /// Why.
        source: Box<ImageError>,
    },
    /// Writing the apply log failed.
    #[error("group {group} frame {frame_no}: apply log {path}: {source}")]
    Log {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Log path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The frame could not be made durable in the redo journal, so none of
    /// its bytes may reach a replica.
    #[error("group {group} frame {frame_no}: redo journal: {source}")]
    Redo {
        /// Group.
        group: String,
        /// Frame.
        frame_no: u64,
        /// Why.
        source: Box<SpoolError>,
    },
    /// Retention (before-images, the journal) failed.
    #[error("group {group} frame {frame_no}: retention: {source}")]
    Retention {
        /// Group.
        group: String,
        /// Frame (the last applied one, or the one about to be).
        frame_no: u64,
        /// Why.
        source: Box<RetentionError>,
    },
    /// The group was promoted: nothing more is applied to it.
    #[error("group {group}: {why}")]
    Promoted {
        /// Group.
        group: String,
        /// Last frame applied.
        frame_no: u64,
        /// What happened.
        why: String,
    },
    /// Storing the watermark failed.
    #[error("group {group} frame {frame_no}: {source}")]
    Watermark {
        /// Group.
        group: String,
        /// Last frame of the batch.
        frame_no: u64,
        /// Why.
        source: Box<WatermarkError>,
    },
}

impl ApplyError {
    /// The frame concerned.
    pub fn frame_no(&self) -> u64 {
        use ApplyError::*;
        match self {
            Open { frame_no, .. }
            | Chain { frame_no, .. }
            | UnknownDisk { frame_no, .. }
            | TooSmall { frame_no, .. }
            | OutOfRange { frame_no, .. }
            | NoImage { frame_no, .. }
            | Image { frame_no, .. }
            | Log { frame_no, .. }
            | Redo { frame_no, .. }
            | Retention { frame_no, .. }
            | Promoted { frame_no, .. }
            | Watermark { frame_no, .. } => *frame_no,
        }
    }
}

impl Classify for ApplyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::Open { source, .. } => source.kind(),
            ApplyError::Chain { .. }
            | ApplyError::UnknownDisk { .. }
            | ApplyError::OutOfRange { .. } => ErrorKind::Corrupt,
            ApplyError::TooSmall { .. } | ApplyError::NoImage { .. } => ErrorKind::Config,
            ApplyError::Image { source, .. } => match source.kind() {
                // A refusal by the image (e.g. not a file) is the operator's to fix;
                // everything else is I/O.
                ErrorKind::Config => ErrorKind::Config,
                _ => ErrorKind::Io,
            },
            ApplyError::Redo { source, .. } => redo_kind(source),
            ApplyError::Retention { source, .. } => source.kind(),
            ApplyError::Promoted { .. } => ErrorKind::Config,
            ApplyError::Log { .. } | ApplyError::Watermark { .. } => ErrorKind::Io,
        }
    }
}
