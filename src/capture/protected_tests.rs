use super::*;
use crate::capture::dirtylog::BACKING_SYNC_EPOCHS;
use crate::capture::journal::{Change, Entry, Policy};
use crate::capture::modes::Mode;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn journal(budget: usize, policy: Policy) -> Arc<CaptureJournal> {
    CaptureJournal::for_tests("g1", budget, policy)
}

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
}

fn setup(size: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    File::create(&img).unwrap().set_len(size).unwrap();
    Setup { dir, img }
}

impl Setup {
    fn open(&self, j: &Arc<CaptureJournal>, initial_copy: bool) -> (ProtectedDisk, OpenReport) {
        ProtectedDisk::open(
            0,
            &self.img,
            j.clone(),
            &self.dir.path().join("state"),
            initial_copy,
        )
        .unwrap()
    }
}

fn take_all(j: &CaptureJournal) -> Vec<Entry> {
    let mut out = Vec::new();
    loop {
        let b = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
        if b.is_empty() {
            return out;
        }
        out.extend(b);
    }
}

fn replay(entries: &[Entry], img: &mut [u8]) {
    for e in entries {
        match &e.change {
            Change::Write(d) => img[e.offset as usize..][..d.len()].copy_from_slice(d),
            Change::Zero(l) => img[e.offset as usize..][..*l as usize].fill(0),
            Change::DiskSize(_) | Change::Tag { .. } | Change::Note { .. } => {}
        }
    }
}

fn drain_all(d: &ProtectedDisk) {
    let j = d.journal().clone();
    let mut buf = Vec::new();
    for _ in 0..10_000 {
        let Some((o, l)) = j.next_pending(d.id(), 0, u64::MAX) else {
            break;
        };
        let mut at = o;
        while at < o + l {
            at = d.copy_step(at, o + l, &mut buf).unwrap().unwrap();
        }
    }
    assert!(j.finish_drain());
}

#[test]
fn write_reaches_disk_and_journal_and_bad_ranges_do_not() {
    let s = setup(MIB);
    let j = journal(64 << 20, Policy::Block);
    let (disk, rep) = s.open(&j, false);
    assert_eq!(rep.pending_bytes, 0);
    assert_eq!(j.mode(), Mode::Data);
    let r = disk.write(4096, vec![7; 512], false).unwrap();
    assert_eq!(r, Recorded::Seq(1));
    let mut b = [0u8; 512];
    File::open(&s.img)
        .unwrap()
        .read_exact_at(&mut b, 4096)
        .unwrap();
    assert_eq!(b, [7; 512]);
    let e = disk.write_at(MIB - 100, vec![1; 512], false).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);
    assert!(disk.write_at(u64::MAX, vec![1; 1], false).is_err());
    assert!(disk.write_at(0, vec![], false).is_err());
    disk.trim(0, 8192, true).unwrap();
    disk.write_zeroes(8192, 4096, false, false).unwrap();
    let e = take_all(&j);
    assert_eq!(e.len(), 3);
    assert!(matches!(e[1].change, Change::Zero(8192)));
    assert_eq!(j.stats().recorded, 3);
}

#[test]
fn first_start_copies_the_disk_skipping_holes_and_zeros() {
    let size = 3 * COPY_CHUNK as u64 + 8192;
    let s = setup(size);
    let f = File::options().write(true).open(&s.img).unwrap();
    f.write_all_at(&[5u8; 100], 70_000).unwrap();
    f.write_all_at(&[0u8; 65536], 2 * MIB).unwrap(); // allocated zeros
    f.write_all_at(&[6u8; 10], size - 10).unwrap();
    let j = journal(64 << 20, Policy::Block);
    let (disk, rep) = s.open(&j, true);
    assert_eq!(rep.pending_bytes, size);
    assert!(rep.reason.contains("initial copy"), "{}", rep.reason);
    assert_eq!(j.mode(), Mode::Drain);
    drain_all(&disk);
    assert_eq!(j.mode(), Mode::Data);
    let entries = take_all(&j);
    assert!(
        entries
            .iter()
            .all(|e| e.ordering == crate::capture::journal::Ordering::M)
    );
    let data: usize = entries.iter().map(Entry::payload_len).sum();
    assert!(
        data <= 2 * COPY_BLOCK + 8192,
        "only non-zero blocks travel: {data}"
    );
    let mut img = vec![0xEEu8; size as usize];
    replay(&entries, &mut img);
    let want = std::fs::read(&s.img).unwrap();
    assert!(img == want);
}

#[test]
fn crash_resyncs_only_what_the_log_cannot_vouch_for_and_a_clean_stop_nothing() {
    let size = 256 * MIB;
    let s = setup(size);
    {
        let j = journal(64 << 20, Policy::Block);
        let (disk, _) = s.open(&j, false);
        disk.write(100 * MIB, vec![1; 4096], false).unwrap();
        disk.write(200 * MIB + 5, vec![2; 10], false).unwrap();
        // Crash: no clean close.
    }
    let j = journal(64 << 20, Policy::Block);
    let (disk, rep) = s.open(&j, false);
    assert!(
        rep.reason.contains("did not stop in order"),
        "{}",
        rep.reason
    );
    assert_eq!(rep.pending_bytes, 8 * MIB, "two 4 MiB activity-log extents");
    assert_eq!(j.mode(), Mode::Drain);
    drain_all(&disk);
    let e = take_all(&j);
    j.trim_through(e.last().unwrap().seq);
    assert_eq!(disk.close_clean().unwrap(), 0);
    drop(disk);
    let j = journal(64 << 20, Policy::Block);
    let (_disk, rep) = s.open(&j, false);
    assert_eq!(rep.pending_bytes, 0, "{}", rep.reason);
    assert_eq!(j.mode(), Mode::Data);
}

#[test]
fn a_clean_stop_with_unacknowledged_writes_keeps_their_regions() {
    let s = setup(64 * MIB);
    {
        let j = journal(64 << 20, Policy::Block);
        let (disk, _) = s.open(&j, false);
        disk.write(8 * MIB, vec![1; 8192], false).unwrap();
        assert_eq!(disk.close_clean().unwrap(), 8192);
    }
    let j = journal(64 << 20, Policy::Block);
    let (_disk, rep) = s.open(&j, false);
    assert_eq!(rep.pending_bytes, 8192);
    assert!(rep.reason.contains("left dirty"), "{}", rep.reason);
}

#[test]
fn rollover_keeps_unacknowledged_regions_in_the_snapshot() {
    let s = setup(64 * MIB);
    {
        let j = journal(64 << 20, Policy::Block);
        let (disk, _) = s.open(&j, false);
        disk.write(0, vec![1; 4096], false).unwrap();
        for _ in 0..3 {
            disk.rollover(&|| Ok(())).unwrap();
        }
        // Not known durable on the backing disk: the extent stays in the log.
        assert_eq!(disk.activity_log_stats().0, 1);
        disk.flush().unwrap();
        for _ in 0..2 {
            disk.rollover(&|| Ok(())).unwrap();
        }
        // The extent left the activity log, but the region is not acknowledged.
        assert_eq!(disk.activity_log_stats().0, 0);
    }
    let j = journal(64 << 20, Policy::Block);
    let (_disk, rep) = s.open(&j, false);
    assert_eq!(rep.pending_bytes, 4096);
}

#[test]
fn without_flushes_the_rollover_syncs_the_backing_disk_itself() {
    let s = setup(64 * MIB);
    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, false);
    disk.write(0, vec![1; 4096], false).unwrap();
    // No flush ever: the extent stays until the rollover's own sync, due after
    // BACKING_SYNC_EPOCHS rollovers.
    for _ in 0..BACKING_SYNC_EPOCHS {
        disk.rollover(&|| Ok(())).unwrap();
    }
    assert_eq!(disk.activity_log_stats().0, 1);
    disk.rollover(&|| Ok(())).unwrap();
    assert_eq!(disk.activity_log_stats().0, 0);
}

#[test]
fn concurrent_overlapping_writes_are_captured_in_disk_order() {
    let s = setup(4 * MIB);
    let j = journal(256 << 20, Policy::Block);
    let (disk, _) = s.open(&j, false);
    let disk = Arc::new(disk);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let d = disk.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let off = (i * 7919 + u64::from(t) * 4096) % (2 * MIB);
                    d.write(off, vec![t * 50 + (i % 50) as u8; 65536], false)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut img = vec![0u8; 4 * MIB as usize];
    replay(&take_all(&j), &mut img);
    assert!(img == std::fs::read(&s.img).unwrap());
}

#[test]
fn degrading_capture_marks_regions_and_a_drain_repairs_them() {
    let s = setup(16 * MIB);
    let j = journal(2 * (65536 + 96), Policy::Degrade);
    let (disk, _) = s.open(&j, false);
    let mut all = Vec::new();
    for i in 0..20u64 {
        disk.write(i * 65536, vec![i as u8 + 1; 65536], false)
            .unwrap();
    }
    assert_eq!(j.mode(), Mode::Bitmap);
    assert!(j.stats().pending_bytes >= 18 * 65536);
    all.extend(take_all(&j));
    j.trim_through(all.last().unwrap().seq);
    j.set_link(true);
    j.tick();
    assert_eq!(j.mode(), Mode::Drain);
    let mut buf = Vec::new();
    for _ in 0..1000 {
        let Some((o, l)) = j.next_pending(0, 0, u64::MAX) else {
            break;
        };
        j.wait_copy_room(COPY_CHUNK, Duration::ZERO);
        disk.copy_step(o, o + l, &mut buf).unwrap();
        let e = take_all(&j);
        if let Some(last) = e.last() {
            j.trim_through(last.seq);
        }
        all.extend(e);
    }
    assert!(j.finish_drain());
    let mut img = vec![0u8; 16 * MIB as usize];
    replay(&all, &mut img);
    assert!(img == std::fs::read(&s.img).unwrap());
}

/// A backing disk on a 1 MiB tmpfs: writes beyond its space fail with ENOSPC
/// after part of the range may have been written.
#[test]
fn a_failing_backing_write_is_reported_and_its_region_kept_for_resync() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (it mounts a small tmpfs to make the backing disk fail)");
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tidemark-test"])
        .arg(&mnt)
        .status()
        .expect("mount (util-linux) is needed for this test");
    assert!(st.success(), "mount -t tmpfs failed");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let img = mnt.join("disk.img");
    File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let j = journal(64 << 20, Policy::Degrade);
    let (disk, _) =
        ProtectedDisk::open(0, &img, j.clone(), &dir.path().join("state"), false).unwrap();
    disk.write(0, vec![1; 4096], false).unwrap();
    let e = disk
        .write_at(8 * MIB, vec![2; 2 * MIB as usize], false)
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    let st = j.stats();
    assert_eq!(st.mode.mode, Mode::Bitmap);
    assert!(
        st.mode.reason.contains("backing write failed"),
        "{}",
        st.mode.reason
    );
    assert_eq!(st.pending_bytes, 2 * MIB);
    assert_eq!(st.recorded, 1, "the failed write is not recorded as data");
    // Reads and other writes keep working.
    let mut b = vec![0u8; 4096];
    disk.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![1; 4096]);
}

#[test]
fn after_shut_writes_are_refused_and_nothing_reaches_the_disk() {
    let s = setup(MIB);
    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, false);
    disk.write(0, vec![1; 4096], false).unwrap();
    disk.shut();
    let e = disk.write_at(4096, vec![2; 4096], false).unwrap_err();
    assert_eq!(e.errno(), libc::ESHUTDOWN);
    assert!(disk.trim(0, 4096, false).is_err());
    let mut b = vec![9u8; 4096];
    disk.read_at(4096, &mut b).unwrap();
    assert_eq!(b, vec![0; 4096], "the refused write did not reach the disk");
    assert_eq!(j.stats().recorded, 1);
}

/// A backing disk whose device returns EIO (a FUSE file over a test double
/// that fails one range): the write fails with EIO, is not recorded, its
/// region is kept for resync; a copy of it fails too and the region stays.
#[test]
fn a_backing_disk_returning_eio_fails_the_write_and_keeps_the_region() {
    use crate::frontend::fuse::FuseOptions;
    use crate::frontend::fuse::testutil::{Fixture, TestDisk};
    let (fx, _double) = Fixture::new("disk", 16 * MIB, &FuseOptions::default(), |b| {
        let mut t = TestDisk::new(b);
        t.eio = Some(8 * MIB..9 * MIB);
        t
    });
    let j = journal(64 << 20, Policy::Degrade);
    let (disk, _) =
        ProtectedDisk::open(0, &fx.file, j.clone(), &fx.dir.path().join("state"), false).unwrap();
    disk.write(0, vec![1; 4096], false).unwrap();
    let e = disk.write_at(8 * MIB, vec![2; 4096], false).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let st = j.stats();
    assert_eq!(st.recorded, 1, "the failed write is not recorded");
    assert_eq!(st.pending_bytes, 4096);
    assert_eq!(st.mode.mode, Mode::Bitmap);
    // The disk keeps serving other ranges.
    disk.write(4096, vec![3; 4096], false).unwrap();
    let mut b = vec![0u8; 8192];
    disk.read_at(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 1) && b[4096..].iter().all(|&x| x == 3));
    // A copy of the failing region fails and leaves it pending.
    j.set_link(true);
    j.tick();
    assert_eq!(j.mode(), Mode::Drain);
    // The write at 4096 came in bitmap mode: pending too; its copy works.
    let (o, l) = j.next_pending(0, 0, u64::MAX).unwrap();
    assert_eq!((o, l), (4096, 4096));
    assert_eq!(
        disk.copy_step(o, o + l, &mut Vec::new()).unwrap(),
        Some(8192)
    );
    let (o, l) = j.next_pending(0, 0, u64::MAX).unwrap();
    assert_eq!(o, 8 * MIB);
    let e = disk.copy_step(o, o + l, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("for a copy"), "{e}");
    assert_eq!(j.stats().pending_bytes, 4096);
    assert!(!j.finish_drain());
}

/// A write that lands in a hole between the copy's hole lookup and its range
/// locks: replaying what capture recorded must still give the disk's content.
/// (The hole used to be trusted as found before the locks: the write was
/// recorded before a zero range that then erased it on the replica.)
#[test]
fn a_write_into_a_hole_during_the_copy_is_never_erased_by_it() {
    let s = setup(8 * MIB);
    let j = journal(256 << 20, Policy::Block);
    let (disk, _) = s.open(&j, true);
    let mut n = 0;
    super::copy_hook::set(Some(Box::new(move |d: &ProtectedDisk| {
        n += 1;
        if n <= 3 {
            // Into the hole the copy step just found, before it locks it.
            d.write(MIB * n + 4096, vec![n as u8; 16384], false)
                .unwrap();
        }
    })));
    drain_all(&disk);
    super::copy_hook::set(None);
    let mut img = vec![0u8; 8 * MIB as usize];
    replay(&take_all(&j), &mut img);
    let disk_bytes = std::fs::read(&s.img).unwrap();
    assert!(disk_bytes.iter().any(|&b| b != 0));
    if let Some(i) = img.iter().zip(&disk_bytes).position(|(a, b)| a != b) {
        panic!("replay differs from the disk at byte {i}");
    }
}

#[test]
fn compare_step_records_only_blocks_whose_digest_differs_and_clears_the_step() {
    use crate::resync::{BlockDigest, DigestKey, digest_block};
    const B: u64 = 64 << 10;
    let s = setup(4 * MIB);
    // Data in blocks 0..4; the rest is a hole.
    let data: Vec<u8> = (0..4 * B).map(|i| (i % 251) as u8 + 1).collect();
    File::options()
        .write(true)
        .open(&s.img)
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();
    let j = journal(64 << 20, Policy::Block);
    let (disk, rep) = s.open(&j, true);
    assert_eq!(rep.pending_bytes, 4 * MIB);
    take_all(&j);
    let key = DigestKey::from_bytes([1; 32]);
    // The target has blocks 0 and 2 equal, block 1 different, block 3
    // absent; blocks 4.. are Absent (equal to the source's zeros) except
    // block 9, which holds data at the target.
    let mut target: Vec<BlockDigest> = vec![BlockDigest::Absent; 64];
    target[0] = digest_block(&key, &data[..B as usize]);
    target[1] = digest_block(&key, &[9u8; B as usize]);
    target[2] = digest_block(&key, &data[2 * B as usize..3 * B as usize]);
    target[9] = digest_block(&key, &[5u8; B as usize]);
    let mut buf = StepBuf::default();
    let step = disk
        .compare_step(0, 4 * MIB, B, &target, &key, &mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(step.next, 4 * MIB);
    assert_eq!(step.compared, 4 * MIB);
    assert_eq!(step.differing, 3 * B, "blocks 1, 3 and 9");
    let entries = take_all(&j);
    let mut got: Vec<(u64, u64, bool)> = entries
        .iter()
        .filter_map(|e| match &e.change {
            Change::Write(d) => Some((e.offset, d.len() as u64, true)),
            Change::Zero(l) => Some((e.offset, *l, false)),
            _ => None,
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![(B, B, true), (3 * B, B, true), (9 * B, B, false)]);
    // The whole step is no longer pending.
    assert_eq!(j.next_pending(0, 0, u64::MAX), None);
}

/// A sparse source: blocks wholly in holes are not read, compare equal to a
/// target block that reads as zeros (Absent or Zero) and are recorded as zero
/// ranges when the target holds data there; blocks with data only in part
/// (a hole edge inside a block) are read and hashed whole.
#[test]
fn compare_and_digest_steps_skip_source_holes() {
    use crate::resync::{BlockDigest, DigestKey, digest_block};
    const B: u64 = 64 << 10;
    const K4: u64 = 4096;
    let s = setup(4 * MIB);
    let f = File::options().write(true).open(&s.img).unwrap();
    let fill = |at: u64, len: u64, seed: u64| {
        let d: Vec<u8> = (0..len).map(|i| ((i * 7 + seed) % 251) as u8 + 1).collect();
        f.write_all_at(&d, at).unwrap();
    };
    fill(0, 3 * B, 1); // blocks 0..3: data
    fill(4 * B - K4, K4, 2); // block 3: data only in its last 4 KiB
    fill(5 * B - K4, 2 * K4, 3); // straddles blocks 4 and 5
    f.write_all_at(&vec![0u8; B as usize], 12 * B).unwrap(); // block 12: written zeros
    f.sync_all().unwrap();
    drop(f);
    let source = std::fs::read(&s.img).unwrap();
    let blk = |img: &[u8], i: u64| img[(i * B) as usize..((i + 1) * B) as usize].to_vec();

    // The target: blocks 0..4 equal; 4 other data; 5 zeros (source: data);
    // 6, 7, 8 data (source: holes); 10 written zeros; 12 data (source:
    // written zeros); the rest not allocated.
    let mut target_img = source.clone();
    let mut put = |i: u64, v: u8| target_img[(i * B) as usize..((i + 1) * B) as usize].fill(v);
    put(4, 9);
    put(5, 0);
    put(6, 5);
    put(7, 6);
    put(8, 7);
    put(12, 8);
    let key = DigestKey::from_bytes([1; 32]);
    let target: Vec<BlockDigest> = (0..64)
        .map(|i| match i {
            0..=4 | 6..=8 | 12 => digest_block(&key, &blk(&target_img, i)),
            5 | 10 => BlockDigest::Zero,
            _ => BlockDigest::Absent,
        })
        .collect();
    assert_eq!(target[5], digest_block(&key, &blk(&target_img, 5)));

    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, true);
    take_all(&j);
    // A stale buffer: hole blocks must not be taken from it.
    let mut buf = StepBuf {
        buf: vec![0xee; 4 * MIB as usize],
        ..StepBuf::default()
    };
    let holes_known = disk.backing.data_ranges(0, 4 * MIB) != vec![(0, 4 * MIB)];

    let digests = disk.digest_step(0, 4 * MIB, B, &key, &mut buf).unwrap();
    assert_eq!(digests.len(), 64);
    for i in 0..64u64 {
        let d = digests[i as usize];
        let want = digest_block(&key, &blk(&source, i));
        assert!(d.same_data(&want), "block {i}: {d:?} vs {want:?}");
        if matches!(i, 0..=5) {
            assert_eq!(d, want, "block {i} holds data");
        } else if holes_known && i != 12 {
            assert_eq!(d, BlockDigest::Absent, "block {i} is a hole: not read");
        }
    }
    assert_eq!(digests[12], BlockDigest::Zero, "written zeros are read");

    buf.buf.fill(0xee);
    let step = disk
        .compare_step(0, 4 * MIB, B, &target, &key, &mut buf)
        .unwrap()
        .unwrap();
    assert_eq!((step.next, step.compared), (4 * MIB, 4 * MIB));
    assert_eq!(step.differing, 6 * B, "blocks 4, 5, 6, 7, 8 and 12");
    let entries = take_all(&j);
    let zeros: Vec<(u64, u64)> = entries
        .iter()
        .filter_map(|e| match e.change {
            Change::Zero(l) => Some((e.offset, l)),
            _ => None,
        })
        .collect();
    assert!(zeros.contains(&(12 * B, B)), "{zeros:?}");
    if holes_known {
        // Adjacent hole blocks become one zero range.
        assert!(zeros.contains(&(6 * B, 3 * B)), "{zeros:?}");
    }
    let written: u64 = entries
        .iter()
        .map(|e| match &e.change {
            Change::Write(d) => d.len() as u64,
            _ => 0,
        })
        .sum();
    assert_eq!(written, 2 * B, "only blocks 4 and 5 carry data");
    replay(&entries, &mut target_img);
    if let Some(i) = target_img.iter().zip(&source).position(|(a, b)| a != b) {
        panic!("the repaired replica differs from the source at byte {i}");
    }
    assert_eq!(j.next_pending(0, 0, u64::MAX), None);
}

/// A step that does not start at the disk's start, over a disk whose last
/// block is short and lies in a hole: equal to Absent, and a zero range of
/// only the bytes that exist when the target holds data there.
#[test]
fn compare_step_short_last_block_in_a_hole() {
    use crate::resync::{BlockDigest, DigestKey, digest_block};
    const B: u64 = 64 << 10;
    let size = 2 * MIB + 4096;
    let s = setup(size);
    File::options()
        .write(true)
        .open(&s.img)
        .unwrap()
        .write_all_at(&[3u8; 4096], MIB)
        .unwrap();
    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, true);
    take_all(&j);
    let key = DigestKey::from_bytes([2; 32]);
    let mut block = vec![0u8; B as usize];
    block[..4096].fill(3);
    // Blocks 16..33 of the disk; block 16 (at 1 MiB) has data.
    let mut target = vec![BlockDigest::Absent; 17];
    target[0] = digest_block(&key, &block);
    let mut buf = StepBuf::default();
    let step = disk
        .compare_step(MIB, size, B, &target, &key, &mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(
        (step.next, step.compared, step.differing),
        (size, size - MIB, 0)
    );
    assert!(
        take_all(&j)
            .iter()
            .all(|e| !matches!(e.change, Change::Write(_) | Change::Zero(_)))
    );
    // The target holds data in the short last block.
    target[16] = digest_block(&key, &[4u8; 4096]);
    let step = disk
        .compare_step(MIB, size, B, &target, &key, &mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(step.differing, 4096);
    let zeros: Vec<(u64, u64)> = take_all(&j)
        .iter()
        .filter_map(|e| match e.change {
            Change::Zero(l) => Some((e.offset, l)),
            Change::Write(_) => panic!("a hole is sent as zeros"),
            _ => None,
        })
        .collect();
    assert_eq!(zeros, vec![(2 * MIB, 4096)]);
}

/// A step read ahead (outside the range locks) is used only when it is that
/// very step and no write through the disk touched its range since. Changing
/// the file behind the disk's back (no write through it) is how the test sees
/// which bytes a step used: the read-ahead's or a fresh read's.
#[test]
fn a_step_read_ahead_is_used_only_while_no_write_touched_its_range() {
    use crate::resync::{DigestKey, digest_block};
    const B: u64 = 64 << 10;
    let s = setup(16 * MIB);
    let raw = File::options().write(true).open(&s.img).unwrap();
    raw.write_all_at(&vec![1u8; 8 * MIB as usize], 0).unwrap();
    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, true); // drain mode: compare_step records
    take_all(&j);
    let key = DigestKey::from_bytes([3; 32]);
    let ones = digest_block(&key, &[1u8; B as usize]);
    let twos = digest_block(&key, &[2u8; B as usize]);
    let mut buf = StepBuf::default();

    // Read ahead, then the file changes behind the disk: the step takes the
    // bytes read ahead, not the file's bytes now.
    disk.read_ahead(0, 4 * MIB, B, &mut buf);
    assert!(buf.is_read_ahead());
    raw.write_all_at(&vec![2u8; B as usize], 0).unwrap();
    let d = disk.digest_step(0, 4 * MIB, B, &key, &mut buf).unwrap();
    assert!(buf.used_read_ahead() && !buf.is_read_ahead());
    assert_eq!(d[0], ones);
    // Used once: the same step again reads the file.
    let d = disk.digest_step(0, 4 * MIB, B, &key, &mut buf).unwrap();
    assert!(!buf.used_read_ahead());
    assert_eq!(d[0], twos);

    // A write through the disk elsewhere (another stripe) leaves it valid.
    disk.read_ahead(0, 4 * MIB, B, &mut buf);
    disk.write(10 * MIB, vec![7u8; 4096], false).unwrap();
    disk.digest_step(0, 4 * MIB, B, &key, &mut buf).unwrap();
    assert!(buf.used_read_ahead(), "a write in another stripe");

    // A write through the disk into the step: read again, the write seen.
    disk.read_ahead(0, 4 * MIB, B, &mut buf);
    disk.write(3 * MIB, vec![7u8; 4096], false).unwrap();
    let d = disk.digest_step(0, 4 * MIB, B, &key, &mut buf).unwrap();
    assert!(!buf.used_read_ahead(), "a write inside the step");
    let mut block = vec![1u8; B as usize];
    block[..4096].fill(7);
    assert_eq!(d[48], digest_block(&key, &block));

    // Another step (other start, other length, other block size) does not
    // take it.
    for (a, e, bs) in [(MIB, 5 * MIB, B), (0, 2 * MIB, B), (0, 4 * MIB, 2 * B)] {
        disk.read_ahead(0, 4 * MIB, B, &mut buf);
        disk.digest_step(a, e, bs, &key, &mut buf).unwrap();
        assert!(!buf.used_read_ahead(), "step {a}..{e} / {bs}");
    }

    // A checksum resync step with a write between its read-ahead and its
    // turn records the written bytes, never the stale ones: replaying the
    // journal over the replica gives the disk.
    take_all(&j);
    let mut replica = vec![0u8; 16 * MIB as usize];
    replica[..4 * MIB as usize].fill(9);
    disk.read_ahead(0, 4 * MIB, B, &mut buf);
    disk.write(2 * MIB, vec![8u8; 8192], false).unwrap();
    let target = vec![digest_block(&key, &[9u8; B as usize]); 64];
    let step = disk
        .compare_step(0, 4 * MIB, B, &target, &key, &mut buf)
        .unwrap()
        .unwrap();
    assert!(!buf.used_read_ahead());
    assert_eq!(step.differing, 4 * MIB);
    replay(&take_all(&j), &mut replica);
    let mut now = vec![0u8; 4 * MIB as usize];
    File::open(&s.img)
        .unwrap()
        .read_exact_at(&mut now, 0)
        .unwrap();
    assert!(
        replica[..4 * MIB as usize] == now[..],
        "replica equals the disk"
    );
}

/// The reader thread hands back the step asked for, read ahead; a step not
/// asked for (or asked for and then skipped) reads in its turn.
#[test]
fn the_step_reader_reads_the_step_asked_for_and_nothing_else() {
    use crate::capture::readahead::StepReader;
    use crate::resync::{DigestKey, digest_block};
    const B: u64 = 64 << 10;
    let s = setup(16 * MIB);
    let raw = File::options().write(true).open(&s.img).unwrap();
    raw.write_all_at(&vec![1u8; 16 * MIB as usize], 0).unwrap();
    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, false);
    let disk = Arc::new(disk);
    let key = DigestKey::from_bytes([4; 32]);
    let mut r = StepReader::new("test-readahead");
    for i in 0..4u64 {
        let (a, e) = (i * 4 * MIB, (i + 1) * 4 * MIB);
        if i == 0 {
            r.ask(&disk, a, e, B);
            r.ask(&disk, a, e, B); // the same step again: still one read
        }
        let mut buf = r.take(0, a, e, B);
        if i < 2 {
            r.ask(&disk, e, e + 4 * MIB, B);
        }
        let d = disk.digest_step(a, e, B, &key, &mut buf).unwrap();
        assert_eq!(d.len(), 64);
        assert!(
            d.iter()
                .all(|x| *x == digest_block(&key, &[1u8; B as usize]))
        );
        assert_eq!(buf.used_read_ahead(), i < 3, "step {i}");
        r.give_back(buf);
    }
    // A take of a step not asked for leaves what was read ahead unused.
    r.ask(&disk, 0, 4 * MIB, B);
    let mut buf = r.take(0, 4 * MIB, 8 * MIB, B);
    disk.digest_step(4 * MIB, 8 * MIB, B, &key, &mut buf)
        .unwrap();
    assert!(!buf.used_read_ahead());
    r.give_back(buf);
    assert_eq!(r.counts(), (4, 3));

    // READ_DEPTH steps in flight at once; a take of the second drops the
    // first; asking beyond the depth starts nothing.
    use crate::capture::readahead::READ_DEPTH;
    for k in 0..=READ_DEPTH as u64 {
        r.ask(&disk, k * 4 * MIB, (k + 1) * 4 * MIB, B);
    }
    assert_eq!(r.counts().0, 4 + READ_DEPTH as u64);
    let mut buf = r.take(0, 4 * MIB, 8 * MIB, B);
    disk.digest_step(4 * MIB, 8 * MIB, B, &key, &mut buf)
        .unwrap();
    assert!(buf.used_read_ahead());
    r.give_back(buf);
    let mut buf = r.take(0, 0, 4 * MIB, B);
    disk.digest_step(0, 4 * MIB, B, &key, &mut buf).unwrap();
    assert!(
        !buf.used_read_ahead(),
        "dropped by the take of a later step"
    );
    r.give_back(buf);
}

/// Notes and DiskSizes of `entries`, in order.
fn markers(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| match &e.change {
            Change::Note { reason, .. } => Some(reason.to_string()),
            Change::DiskSize(s) => Some(format!("size {s}")),
            _ => None,
        })
        .collect()
}

#[test]
fn a_growth_is_announced_again_until_the_relay_acknowledged_its_announcement() {
    let s = setup(MIB);
    // Run 1: first start, everything acknowledged, orderly stop.
    let j = journal(64 << 20, Policy::Block);
    let (disk, _) = s.open(&j, false);
    disk.shut();
    disk.close_clean().unwrap();
    drop(disk);
    // The disk grows. Run 2 announces it, but stops before the relay
    // acknowledged anything.
    File::options()
        .write(true)
        .open(&s.img)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let j = journal(64 << 20, Policy::Block);
    let (disk, rep) = s.open(&j, false);
    assert!(rep.reason.contains("grew"), "{}", rep.reason);
    assert_eq!(j.unannounced_growth(0), Some(MIB));
    let first = take_all(&j);
    assert_eq!(
        markers(&first),
        ["disk-grown".to_string(), format!("size {}", 2 * MIB)]
    );
    disk.shut();
    disk.close_clean().unwrap();
    drop(disk);
    // Run 3: announced again, although the log now has the new size.
    let j = journal(64 << 20, Policy::Block);
    let (disk, rep) = s.open(&j, false);
    assert!(rep.reason.contains("grew from 1048576"), "{}", rep.reason);
    let entries = take_all(&j);
    assert_eq!(markers(&entries)[..2], markers(&first)[..]);
    // The relay acknowledges it: the next snapshot no longer carries it.
    j.trim_through(entries.last().unwrap().seq);
    assert_eq!(j.unannounced_growth(0), None);
    drain_all(&disk);
    disk.shut();
    disk.close_clean().unwrap();
    drop(disk);
    let j = journal(64 << 20, Policy::Block);
    let (_disk, rep) = s.open(&j, false);
    assert!(!rep.reason.contains("grew"), "{}", rep.reason);
    assert!(markers(&take_all(&j)).iter().all(|m| m != "disk-grown"));
}
