//! The target's digest service: answers an agent's sealed digest requests
//! (checksum resync, online verify) with the digests of its replica's blocks.
//!
//! One thread per group, fed by a small bounded channel from the session task
//! (disk reads never run on the async runtime). Each request opens its replica
//! afresh, read-only in effect, next to the apply thread's handle: a VMDK's
//! grain tables change as grains are allocated, and a cached map would answer
//! "absent" for data that exists. Reading while frames are applied is safe
//! for resync: every write the target applies after the read is also in the
//! agent's disk when it compares, and is applied again after the blocks the
//! agent sends (docs/RESYNC.md, "Why a replica that keeps changing can be
//! digested").

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{mpsc, watch};

use super::apply::{DiskSpec, Progress};
use crate::frame::DataKey;
use crate::image::{Engine, ImageError, ImageSpec, open_image};
use crate::resync::{
    BlockDigest, DigestChunk, DigestKey, DigestRequest, MsgBody, MsgCipher, Purpose, digest_range,
};

/// Requests waiting for the digest thread of a group; more are dropped (the
/// agent asks again after its timeout).
pub const QUEUED_REQUESTS: usize = 8;

/// What the session task holds of the digest service.
pub(crate) struct DigestService {
    /// Sealed requests for the thread.
    pub requests: Sender<Vec<u8>>,
    /// Sealed replies for the relay.
    pub replies: mpsc::Receiver<Vec<u8>>,
}

/// Start the digest thread of `group`. It ends when the [`DigestService`] is
/// dropped.
pub(crate) fn spawn(
    group: String,
    key: &DataKey,
    disks: Vec<DiskSpec>,
    progress: watch::Receiver<Progress>,
) -> std::io::Result<(DigestService, JoinHandle<()>)> {
    let (req_tx, req_rx) = crossbeam_channel::bounded(QUEUED_REQUESTS);
    let (rep_tx, rep_rx) = mpsc::channel(QUEUED_REQUESTS);
    let answerer = Answerer {
        group: group.clone(),
        cipher: MsgCipher::new(key),
        digest_key: DigestKey::derive(key),
        disks,
        sync_only: AtomicBool::new(false),
    };
    let thread = std::thread::Builder::new()
        .name(format!("digest-{group}"))
        .spawn(move || serve(&answerer, &req_rx, &rep_tx, &progress))?;
    Ok((
        DigestService {
            requests: req_tx,
            replies: rep_rx,
        },
        thread,
    ))
}

fn serve(
    a: &Answerer,
    requests: &Receiver<Vec<u8>>,
    replies: &mpsc::Sender<Vec<u8>>,
    progress: &watch::Receiver<Progress>,
) {
    while let Ok(bytes) = requests.recv() {
        let applied = progress.borrow().durable.pos.last_seq;
        if let Some(reply) = a.answer(&bytes, applied)
            && replies.blocking_send(reply).is_err()
        {
            return;
        }
    }
}

/// Opens requests and computes their answers.
pub(crate) struct Answerer {
    /// The group.
    pub group: String,
    /// Seals and opens resync messages.
    pub cipher: MsgCipher,
    /// Keys the block digests.
    pub digest_key: DigestKey,
    /// The group's replicas.
    pub disks: Vec<DiskSpec>,
    /// io_uring was found unavailable: read with the sync engine.
    pub sync_only: AtomicBool,
}

impl Answerer {
    /// The sealed reply to the sealed request `bytes`, the replica having
    /// applied through `applied_seq`; `None` for a message that cannot be
    /// answered at all (not authentic: it is logged and dropped).
    pub fn answer(&self, bytes: &[u8], applied_seq: u64) -> Option<Vec<u8>> {
        let (id, body) = match self.cipher.open(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(group = %self.group, "resync message refused: {e}");
                return None;
            }
        };
        let reply = match body {
            MsgBody::Request(r) => match self.digests(id, &r) {
                Ok(chunk) => MsgBody::Digests { applied_seq, chunk },
                Err(why) => {
                    tracing::warn!(group = %self.group, disk = r.disk, request_id = id, "digest request refused: {why}");
                    MsgBody::Refused(why)
                }
            },
            other => {
                tracing::warn!(group = %self.group, request_id = id, "a resync {other:?} is not a request; dropped");
                return None;
            }
        };
        match self.cipher.seal(id, &reply) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(group = %self.group, request_id = id, "cannot seal a resync reply: {e}");
                None
            }
        }
    }

    /// The digests asked for, or why not.
    fn digests(&self, id: u64, r: &DigestRequest) -> Result<DigestChunk, String> {
        let Some(disk) = self.disks.iter().find(|d| d.id == r.disk) else {
            return Err(format!(
                "group {} has no disk {} at the target (disks: {:?})",
                self.group,
                r.disk,
                self.disks.iter().map(|d| d.id).collect::<Vec<_>>()
            ));
        };
        if r.purpose == Purpose::Verify {
            tracing::debug!(group = %self.group, disk = r.disk, first_block = r.first_block, count = r.count, "verify digests");
        }
        let digests = digest_replica(disk, &self.sync_only, &self.digest_key, r)?;
        DigestChunk::new(
            r.disk,
            r.disk_size,
            r.block_size,
            id,
            r.first_block,
            digests,
        )
        .map_err(|e| format!("cannot build the digest chunk: {e}"))
    }
}

fn disk_spec(d: &DiskSpec, engine: Engine) -> ImageSpec {
    ImageSpec {
        path: d.path.clone(),
        format: d.format,
        engine,
        create_size: None,
        direct_io: crate::image::DirectIo::Off,
    }
}

/// Digests of the requested blocks of replica `disk`: a replica that does
/// not exist yet is all Absent; blocks past the replica's end are Absent.
/// Read through io_uring (several reads in flight), or the sync engine when
/// io_uring is unavailable (`sync_only` remembers it).
fn digest_replica(
    disk: &DiskSpec,
    sync_only: &AtomicBool,
    key: &DigestKey,
    r: &DigestRequest,
) -> Result<Vec<BlockDigest>, String> {
    let n = r.count as usize;
    if !exists(&disk.path) {
        return Ok(vec![BlockDigest::Absent; n]);
    }
    let opened = if sync_only.load(Ordering::Relaxed) {
        open_image(&disk_spec(disk, Engine::Sync))
    } else {
        match open_image(&disk_spec(disk, Engine::Uring)) {
            Err(ImageError::UringUnavailable { source, .. }) => {
                tracing::info!(path = %disk.path.display(), "io_uring unavailable ({source}); digests read with the sync engine");
                sync_only.store(true, Ordering::Relaxed);
                open_image(&disk_spec(disk, Engine::Sync))
            }
            other => other,
        }
    };
    let mut img = opened.map_err(|e| format!("cannot open the replica: {e}"))?;
    // A verify streams through the replica once: bypass the page cache (no
    // copy out of it, no other data evicted), where the image allows. Not
    // during a resync, when the apply thread writes the same replica.
    if r.purpose == Purpose::Verify {
        img.direct_reads();
    }
    let have = r.block_size.blocks_for(img.size());
    let first = r.first_block;
    let inside = have.saturating_sub(first).min(u64::from(r.count));
    let mut out = if inside > 0 {
        digest_range(img.as_mut(), key, r.block_size, first, inside)
            .map_err(|e| format!("cannot digest the replica: {e}"))?
    } else {
        Vec::new()
    };
    out.resize(n, BlockDigest::Absent);
    Ok(out)
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageFormat;
    use crate::resync::{BlockSize, digest_block};

    fn answerer(dir: &Path) -> Answerer {
        let key = DataKey::from_bytes([3; 32]);
        Answerer {
            group: "g".into(),
            cipher: MsgCipher::new(&key),
            digest_key: DigestKey::derive(&key),
            disks: vec![DiskSpec {
                id: 0,
                path: dir.join("replica.img"),
                format: ImageFormat::Raw,
            }],
            sync_only: AtomicBool::new(false),
        }
    }

    fn ask(a: &Answerer, disk: u16, disk_size: u64, first_block: u64, count: u32) -> MsgBody {
        let req = DigestRequest {
            disk,
            disk_size,
            block_size: BlockSize::new(65536).unwrap(),
            first_block,
            count,
            purpose: Purpose::Resync,
        };
        let bytes = a.cipher.seal(42, &MsgBody::Request(req)).unwrap();
        let reply = a.answer(&bytes, 7).expect("a reply");
        let (id, body) = a.cipher.open(&reply).unwrap();
        assert_eq!(id, 42);
        body
    }

    #[test]
    fn a_missing_replica_is_all_absent_and_an_unknown_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = answerer(dir.path());
        match ask(&a, 0, 1 << 20, 0, 16) {
            MsgBody::Digests { applied_seq, chunk } => {
                assert_eq!(applied_seq, 7);
                assert!(chunk.digests().iter().all(|d| *d == BlockDigest::Absent));
            }
            other => panic!("{other:?}"),
        }
        match ask(&a, 5, 1 << 20, 0, 16) {
            MsgBody::Refused(why) => assert!(why.contains("has no disk 5"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn digests_match_the_replica_and_blocks_past_its_end_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let a = answerer(dir.path());
        let mut data = vec![0u8; 3 * 65536];
        data[65536..2 * 65536].fill(0xab);
        data[2 * 65536] = 1;
        std::fs::write(dir.path().join("replica.img"), &data).unwrap();
        // The agent's disk is larger than the replica (it grew).
        match ask(&a, 0, 5 * 65536, 0, 5) {
            MsgBody::Digests { chunk, .. } => {
                let d = chunk.digests();
                assert!(d[0].reads_as_zero());
                assert_eq!(d[1], digest_block(&a.digest_key, &data[65536..2 * 65536]));
                assert_eq!(d[2], digest_block(&a.digest_key, &data[2 * 65536..]));
                assert_eq!(&d[3..], &[BlockDigest::Absent, BlockDigest::Absent]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_message_under_another_key_gets_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let a = answerer(dir.path());
        let other = MsgCipher::new(&DataKey::from_bytes([4; 32]));
        let req = DigestRequest {
            disk: 0,
            disk_size: 1 << 20,
            block_size: BlockSize::new(65536).unwrap(),
            first_block: 0,
            count: 1,
            purpose: Purpose::Verify,
        };
        let bytes = other.seal(1, &MsgBody::Request(req)).unwrap();
        assert!(a.answer(&bytes, 0).is_none());
    }
}
