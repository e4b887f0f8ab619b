//! The target's redo journal: every frame the gate lets through is appended,
//! sealed as received, to a per-group [`Spool`] and made durable there before
//! any of its bytes reach a replica. After a crash (of the process, or of the
//! machine) the frames after the durable watermark are read back from it and
//! applied again, so the replica reaches the end of a whole frame without the
//! relay (docs/CONSISTENCY.md, "Redo").
//!
//! The spool brings everything a redo journal needs: group commit with
//! `fdatasync`, a chain check, torn-tail recovery, trimming by frame number.
//! The journal is trimmed up to the watermark once a batch is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::{Classify, ErrorKind};
use crate::spool::{AppendOutcome, AppendRequest, Spool, SpoolError, SpoolOptions, SpooledFrame};

/// Name of a group's redo directory inside its state directory.
pub const REDO_DIR: &str = "redo";
/// Segment size of the redo spool: small, since it holds only what is not yet
/// applied durably (a few batches) and whole segments are what trimming frees.
pub const REDO_SEGMENT_BYTES: u64 = 32 << 20;

/// The completion of one append: `Ok` once the frame is durable in the redo
/// journal.
pub(crate) type RedoTicket = oneshot::Receiver<Result<AppendOutcome, SpoolError>>;

/// A redo journal append that failed, with the sealed frame kept so the apply
/// thread can append it again (after the disk has room again, for example).
#[derive(Debug)]
pub(crate) struct RedoFailed {
    /// Why the append failed.
    pub error: SpoolError,
    /// The sealed frame as received.
    pub sealed: Arc<Vec<u8>>,
}

/// A group's redo journal.
#[derive(Debug, Clone)]
pub(crate) struct Redo {
    group: String,
    spool: Spool,
}

impl Redo {
    /// Open (creating) the redo journal of `group` under `group_dir`, for a
    /// replica durably applied through frame `watermark_frame`. A journal whose
    /// head is behind the watermark (stale, e.g. from before a state directory
    /// was restored) or which does not continue it is emptied: the frames it
    /// would need come from the relay then; the second value says why. Blocking.
    pub fn open(
        group_dir: &Path,
        group: &str,
        watermark_frame: u64,
    ) -> Result<(Redo, Option<String>), SpoolError> {
        let dir = group_dir.join(REDO_DIR);
        let (redo, report) = Self::open_dir(&dir, group)?;
        for p in &report.problems {
            tracing::warn!(group, file = %p.file.display(), offset = p.offset, "redo journal: {}", p.detail);
        }
        if let Some(g) = report.group(group) {
            for t in &g.torn_tails {
                tracing::warn!(group, file = %t.file.display(), offset = t.offset, bytes = t.bytes_cut, "redo journal: torn tail cut: {}", t.why);
            }
            for p in &g.problems {
                tracing::warn!(group, file = %p.file.display(), offset = p.offset, "redo journal: {}", p.detail);
            }
        }
        let head = redo.head();
        let trimmed = redo.spool.stats(group).map_or(0, |s| s.trimmed_through);
        let reset = if head == 0 || head == watermark_frame {
            None
        } else if head < watermark_frame {
            Some(format!(
                "its last frame {head} is behind the watermark (frame {watermark_frame})"
            ))
        } else if trimmed > watermark_frame {
            Some(format!(
                "it was trimmed through frame {trimmed}, beyond the watermark (frame {watermark_frame})"
            ))
        } else {
            match redo.read_after(watermark_frame, 1) {
                Ok(f)
                    if f.first()
                        .is_some_and(|f| f.prev_frame_no == watermark_frame) =>
                {
                    None
                }
                Ok(f) => Some(format!(
                    "its first frame after the watermark (frame {watermark_frame}) names frame {} as predecessor",
                    f.first().map_or(0, |f| f.prev_frame_no)
                )),
                Err(e) => Some(format!("reading it failed: {e}")),
            }
        };
        let Some(why) = reset else {
            return Ok((redo, None));
        };
        tracing::warn!(
            group,
            "redo journal emptied: {why}; the relay redelivers what the replica needs"
        );
        redo.shutdown();
        drop(redo);
        std::fs::remove_dir_all(&dir).map_err(|source| SpoolError::Io {
            op: "remove stale redo journal",
            path: dir.clone(),
            source,
        })?;
        let (redo, _) = Self::open_dir(&dir, group)?;
        Ok((redo, Some(why)))
    }

    fn open_dir(
        dir: &Path,
        group: &str,
    ) -> Result<(Redo, crate::spool::RecoveryReport), SpoolError> {
        let mut opts = SpoolOptions::new(dir);
        opts.segment_bytes = REDO_SEGMENT_BYTES;
        let (spool, report) = Spool::open(opts)?;
        Ok((
            Redo {
                group: group.to_string(),
                spool,
            },
            report,
        ))
    }

    /// Queue `sealed` (frame `frame_no`, following `prev_frame_no` in apply
    /// order, last seq `last_seq`) for appending; the ticket completes once it is durable.
    /// Never blocks.
    pub fn append(
        &self,
        frame_no: u64,
        prev_frame_no: u64,
        last_seq: u64,
        sealed: Arc<Vec<u8>>,
    ) -> RedoTicket {
        self.spool.append(AppendRequest {
            group: self.group.clone(),
            frame_no,
            prev_frame_no,
            last_seq,
            bytes: sealed,
        })
    }

    /// Append again a frame whose append failed, waiting until it is durable.
    /// Blocking.
    pub fn append_blocking(&self, sealed: &Arc<Vec<u8>>) -> Result<AppendOutcome, SpoolError> {
        let h = crate::frame::FrameHeader::parse(sealed).map_err(|e| SpoolError::Corrupt {
            file: PathBuf::from("(frame being appended)"),
            offset: 0,
            what: e.to_string(),
        })?;
        // A REBASE frame may name a predecessor the chain passed: in the redo
        // journal it follows the frame applied before it.
        let prev_frame_no = if h.rebase {
            self.head()
        } else {
            h.prev_frame_no
        };
        self.spool.append_blocking(AppendRequest {
            group: self.group.clone(),
            frame_no: h.frame_no,
            prev_frame_no,
            last_seq: h.last_seq,
            bytes: Arc::clone(sealed),
        })
    }

    /// Up to `max_count` frames after `frame_no`, in chain order. Blocking.
    pub fn read_after(
        &self,
        frame_no: u64,
        max_count: usize,
    ) -> Result<Vec<SpooledFrame>, SpoolError> {
        self.spool
            .read_after(&self.group, frame_no, 64 << 20, max_count)
    }

    /// The last frame durably in the journal (0 if none).
    pub fn head(&self) -> u64 {
        self.spool.head(&self.group).map_or(0, |h| h.frame_no)
    }

    /// Forget frames through `frame_no` (durably applied). Blocking.
    pub fn trim_through(&self, frame_no: u64) -> Result<(), SpoolError> {
        self.spool
            .trim_through(&self.group, frame_no.min(self.head()))
    }

    /// Untrimmed frames and bytes on disk.
    pub fn usage(&self) -> (u64, u64) {
        self.spool
            .stats(&self.group)
            .map_or((0, 0), |s| (s.frames, s.bytes))
    }

    /// Stop the spool's writer thread (queued appends still complete).
    pub fn shutdown(&self) {
        self.spool.shutdown();
    }
}

/// Classification of a failed redo append, for the stall message.
pub(crate) fn redo_kind(e: &SpoolError) -> ErrorKind {
    match e.kind() {
        ErrorKind::Corrupt => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}
