//! The open pool of one group: a fixed number of std threads that verify,
//! decrypt and decompress frames (CPU work, kept off the async runtime). Each
//! thread owns its own [`Opener`]; results go to the apply thread tagged with
//! their index, in whatever order they finish (the apply thread reorders).
//!
//! A job arrives with the ticket of its redo-journal append. The thread waits
//! for it before opening: the frame is then durable in the journal, the spool
//! has let go of the shared bytes, and the frame is opened in place without a
//! copy. A failed append keeps the sealed bytes (the frame is opened from a
//! copy) so the apply thread can append it again.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::TargetError;
use super::apply::Opened;
use super::budget::Charge;
use super::gate::Link;
use super::redo::{RedoFailed, RedoTicket};
use crate::frame::{DataKey, GroupName, Opener};
use crate::spool::SpoolError;

/// Threads per group. Two fit the 2-core machines this is built on: AES-GCM and
/// zstd of one frame run at several hundred MiB/s per core, which the apply
/// thread's fdatasync rarely outpaces.
pub const OPEN_THREADS: usize = 2;

/// A frame to open.
#[derive(Debug)]
pub(crate) struct OpenJob {
    /// Position in the order frames were handed to the pipeline.
    pub index: u64,
    /// Chain fields from its header.
    pub link: Link,
    /// The sealed frame, shared with its redo-journal append.
    pub bytes: Arc<Vec<u8>>,
    /// Completes once the frame is durable in the redo journal.
    pub redo: RedoTicket,
    /// Its budget share.
    pub charge: Charge,
}

/// Start `threads` open threads reading `jobs` and sending to `out`. They end
/// when `jobs` is disconnected and drained (or `out` is gone).
pub(crate) fn spawn(
    group: GroupName,
    keys: &[(u32, DataKey)],
    threads: usize,
    jobs: Receiver<OpenJob>,
    out: Sender<Opened>,
) -> Result<Vec<JoinHandle<()>>, TargetError> {
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let keys: Vec<(u32, DataKey)> = keys.to_vec();
        let mut opener = Opener::new(group, keys).map_err(|source| TargetError::Key {
            group: group.to_string(),
            source: Box::new(source),
        })?;
        let jobs = jobs.clone();
        let out = out.clone();
        let h = std::thread::Builder::new()
            .name(format!("open-{group}-{i}"))
            .spawn(move || {
                for job in jobs {
                    let OpenJob {
                        index,
                        link,
                        bytes,
                        redo,
                        mut charge,
                    } = job;
                    let appended = match redo.blocking_recv() {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(SpoolError::Shutdown),
                    };
                    let (result, redo) = match appended {
                        // Decrypted in place: a raw frame's buffer becomes its
                        // plaintext (copied only if the spool still holds it).
                        Ok(()) => (opener.open_owned(Arc::unwrap_or_clone(bytes)), Ok(())),
                        Err(error) => (
                            opener.open_owned(bytes.as_ref().clone()),
                            Err(RedoFailed {
                                error,
                                sealed: bytes,
                            }),
                        ),
                    };
                    charge.release_sealed();
                    let opened = Opened {
                        index,
                        link,
                        result,
                        redo,
                        charge,
                    };
                    if out.send(opened).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| TargetError::Spawn {
                what: "open thread",
                source,
            })?;
        handles.push(h);
    }
    Ok(handles)
}
