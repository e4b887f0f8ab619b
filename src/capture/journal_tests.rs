use super::*;
use crate::error::{Classify, ErrorKind};
use crate::frame::NoteReason;
use std::sync::atomic::{AtomicU64, Ordering as AO};
use std::time::Instant;

const MIB: u64 = 1 << 20;

fn journal(budget: usize) -> CaptureJournal {
    let j = CaptureJournal::in_memory(budget, 1, Box::new(|from| Ok(from + 10)));
    j.add_disk(
        0,
        64 * MIB,
        RegionBitmap::new(64 * MIB / 4096),
        NoteReason::InitialCopy,
        "",
    );
    j
}

fn degrading(budget: usize, spill: Option<(&std::path::Path, u64)>) -> CaptureJournal {
    let cfg = CaptureConfig {
        group: "g".into(),
        memory_budget: budget,
        spill_dir: spill.map(|(p, _)| p.to_path_buf()),
        spill_budget: spill.map_or(0, |(_, b)| b),
        bitmap_after: Duration::from_millis(50),
        policy: Policy::Degrade,
    };
    let j = CaptureJournal::new(cfg, 1, Box::new(|from| Ok(from + 1000))).unwrap();
    j.add_disk(
        0,
        64 * MIB,
        RegionBitmap::new(64 * MIB / 4096),
        NoteReason::InitialCopy,
        "",
    );
    j
}

fn seq(r: Recorded) -> u64 {
    match r {
        Recorded::Seq(s) => s,
        Recorded::Dirty => panic!("expected a seq"),
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

#[test]
fn seqs_are_consecutive_and_batches_keep_order() {
    let j = journal(1 << 20);
    for i in 0..5u64 {
        let s = seq(j.record_write(0, i * 4096, vec![i as u8; 4096]).unwrap());
        assert_eq!(s, i + 1);
    }
    let b = j.take_batch(8192, Duration::ZERO, Duration::ZERO);
    assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    let b = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
    assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(j.take_batch(1, Duration::ZERO, Duration::ZERO).is_empty());
    assert_eq!(j.stats().entries, 5);
    j.trim_through(3);
    assert_eq!(j.stats().entries, 2);
    j.trim_through(5);
    assert_eq!(j.stats().bytes, 0);
}

#[test]
fn batches_never_mix_orderings() {
    let j = journal(1 << 20);
    let mut pending = RegionBitmap::new(256);
    pending.set_range(0, 1);
    j.add_disk(1, MIB, pending, NoteReason::InitialCopy, "test copy");
    assert_eq!(j.mode(), Mode::Drain);
    j.record_disk_size(1, MIB).unwrap();
    j.record_write(0, 0, vec![1; 10]).unwrap();
    assert!(
        j.record_copy(1, 0, 4096, vec![CopyPart::Zero(0, 4096)])
            .unwrap()
    );
    assert!(j.finish_drain());
    j.record_write(0, 0, vec![2; 10]).unwrap();
    let b = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
    assert_eq!(b.len(), 4);
    assert!(
        b.iter().all(|e| e.ordering == Ordering::M),
        "writes while draining are M"
    );
    assert!(
        matches!(&b[0].change, Change::Note { reason: NoteReason::InitialCopy, text } if text.contains("test copy")),
        "the drain starts with a note: {:?}",
        b[0].change
    );
    assert_eq!(b[0].disk, 1);
    let b = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].ordering, Ordering::W);
}

#[test]
fn empty_changes_and_unknown_disks_are_refused() {
    let j = journal(1 << 20);
    assert!(j.record_write(0, 0, vec![]).is_err());
    assert!(j.record_zero(0, 0, 0).is_err());
    assert!(matches!(
        j.record_write(9, 0, vec![1]),
        Err(CaptureError::UnknownDisk(9))
    ));
    assert_eq!(j.next_seq(), 1);
}

#[test]
fn block_policy_waits_until_trimmed() {
    let j = Arc::new(journal(3 * (4096 + ENTRY_OVERHEAD)));
    for _ in 0..2 {
        j.record_write(0, 0, vec![0; 4096]).unwrap();
    }
    let done = Arc::new(AtomicU64::new(0));
    let (j2, d2) = (j.clone(), done.clone());
    let t = std::thread::spawn(move || {
        let s = seq(j2.record_write(0, 0, vec![0; 4096]).unwrap());
        d2.store(s, AO::SeqCst);
    });
    // Bounded wait: the writer must still be blocked.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(done.load(AO::SeqCst), 0);
    let _ = j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO);
    j.trim_through(1);
    t.join().unwrap();
    assert_eq!(done.load(AO::SeqCst), 3);
    assert!(j.stats().budget_waits >= 1);
}

#[test]
fn close_releases_waiters() {
    let j = Arc::new(journal(4096 + ENTRY_OVERHEAD));
    j.record_write(0, 0, vec![0; 4096]).unwrap();
    let j2 = j.clone();
    let t = std::thread::spawn(move || j2.record_write(0, 0, vec![0; 4096]));
    std::thread::sleep(Duration::from_millis(20));
    j.close();
    assert!(matches!(t.join().unwrap(), Err(CaptureError::Closed)));
}

#[test]
fn reservation_is_called_before_seqs_are_used() {
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let j = CaptureJournal::in_memory(
        1 << 20,
        100,
        Box::new(move |from| {
            c2.fetch_add(1, AO::SeqCst);
            Ok(from + 2)
        }),
    );
    j.add_disk(0, MIB, RegionBitmap::new(256), NoteReason::InitialCopy, "");
    for _ in 0..5 {
        j.record_zero(0, 0, 1).unwrap();
    }
    assert_eq!(calls.load(AO::SeqCst), 3);
    let failing = CaptureJournal::in_memory(
        1 << 20,
        1,
        Box::new(|_| Err(std::io::Error::other("disk full"))),
    );
    failing.add_disk(0, MIB, RegionBitmap::new(256), NoteReason::InitialCopy, "");
    assert!(matches!(
        failing.record_zero(0, 0, 1),
        Err(CaptureError::Reserve(_))
    ));
}

#[test]
fn a_rebase_above_a_seq_floor_numbers_what_it_keeps_again_in_order() {
    let froms = Arc::new(Mutex::new(Vec::new()));
    let f2 = froms.clone();
    let j = CaptureJournal::in_memory(
        1 << 20,
        1,
        Box::new(move |from| {
            f2.lock().unwrap().push(from);
            Ok(from + 100)
        }),
    );
    j.add_disk(0, MIB, RegionBitmap::new(256), NoteReason::InitialCopy, "");
    assert_eq!(j.record_disk_size(0, MIB).unwrap(), 1);
    assert_eq!(seq(j.record_zero(0, 0, 1).unwrap()), 2);
    // The relay holds seqs up to 791 that this journal never assigned.
    j.rebase(NoteReason::ChainGap, "foreign head", 792).unwrap();
    let kept: Vec<(u64, bool)> = take_all(&j)
        .iter()
        .map(|e| (e.seq, matches!(e.change, Change::DiskSize(_))))
        .collect();
    assert!(!kept.is_empty(), "{kept:?}");
    assert_eq!(kept[0], (792, true), "the disk size, numbered again first");
    assert!(kept.windows(2).all(|w| w[0].0 < w[1].0), "{kept:?}");
    assert!(kept.iter().all(|&(s, _)| s >= 792), "{kept:?}");
    // A floor below the next seq changes no seq.
    j.rebase(NoteReason::ChainGap, "again", 5).unwrap();
    let again: Vec<u64> = take_all(&j).iter().map(|e| e.seq).collect();
    assert_eq!(again, [792]);
    assert_eq!(froms.lock().unwrap()[..2], [1, 792]);
    // Kept slots below a floor that the next seq already passed (writes
    // captured before the relay's head was known) are numbered above all.
    let j2 = CaptureJournal::in_memory(1 << 20, 1, Box::new(|from| Ok(from + 1000)));
    j2.add_disk(0, MIB, RegionBitmap::new(256), NoteReason::InitialCopy, "");
    assert_eq!(j2.record_disk_size(0, MIB).unwrap(), 1);
    for _ in 0..20 {
        j2.record_zero(0, 0, 1).unwrap();
    }
    j2.rebase(NoteReason::ChainGap, "foreign head", 10).unwrap();
    let kept: Vec<u64> = take_all(&j2).iter().map(|e| e.seq).collect();
    assert_eq!(kept, [22], "the disk size, above the 21 seqs handed out");
}

#[test]
fn degrade_goes_memory_then_spill_then_bitmap_and_never_waits() {
    let dir = tempfile::tempdir().unwrap();
    let w = 4096 + ENTRY_OVERHEAD;
    // Memory for 7 entries' data (7/8 of 8), spill for 3 records.
    let j = degrading(8 * w, Some((dir.path(), 3 * (4096 + 40))));
    let mut seqs = Vec::new();
    for i in 0..12u64 {
        match j.record_write(0, i * 4096, vec![i as u8; 4096]).unwrap() {
            Recorded::Seq(s) => seqs.push(s),
            Recorded::Dirty => {}
        }
    }
    let st = j.stats();
    assert_eq!(seqs.len(), 10, "7 in memory, 3 spilled");
    assert_eq!(st.spill_entries, 3);
    assert_eq!(st.mode.mode, Mode::Bitmap);
    assert_eq!(st.mode.transitions["data->spill"], 1);
    assert_eq!(st.mode.transitions["spill->bitmap"], 1);
    assert_eq!(st.dirty_marks, 2);
    assert_eq!(st.pending_bytes, 2 * 4096);
    // In bitmap mode every write is a mark, even with room.
    let e = take_all(&j);
    assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    for (i, e) in e.iter().enumerate() {
        let Change::Write(d) = &e.change else {
            panic!()
        };
        assert!(d.iter().all(|&b| b == i as u8), "spilled bytes come back");
        assert_eq!(e.ordering, Ordering::W);
    }
    j.trim_through(*seqs.last().unwrap());
    let st = j.stats();
    assert_eq!((st.spill_bytes, st.spill_entries, st.bytes), (0, 0, 0));
    assert_eq!(j.record_write(0, 0, vec![1; 10]).unwrap(), Recorded::Dirty);
}

#[test]
fn spill_mode_returns_to_data_when_the_spill_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let w = 4096 + ENTRY_OVERHEAD;
    let j = degrading(8 * w, Some((dir.path(), MIB)));
    for i in 0..9u64 {
        seq(j.record_write(0, i * 4096, vec![1; 4096]).unwrap());
    }
    assert_eq!(j.mode(), Mode::Spill);
    let e = take_all(&j);
    j.trim_through(e.last().unwrap().seq);
    assert_eq!(j.mode(), Mode::Data);
}

#[test]
fn no_spill_goes_straight_to_bitmap() {
    let j = degrading(2 * (4096 + ENTRY_OVERHEAD), None);
    assert!(matches!(
        j.record_write(0, 0, vec![1; 4096]).unwrap(),
        Recorded::Seq(_)
    ));
    assert_eq!(
        j.record_write(0, 8192, vec![1; 4096]).unwrap(),
        Recorded::Dirty
    );
    let st = j.stats();
    assert_eq!(st.mode.mode, Mode::Bitmap);
    assert!(st.mode.reason.contains("no spill"), "{}", st.mode.reason);
}

#[test]
fn unreachable_too_long_drops_unsent_entries_then_drains_and_returns_to_data() {
    let j = degrading(MIB as usize, None);
    j.record_disk_size(0, 64 * MIB).unwrap();
    let first = seq(j.record_write(0, 0, vec![1; 4096]).unwrap());
    let sent = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
    assert_eq!(sent.len(), 2);
    seq(j.record_write(0, 40960, vec![2; 100]).unwrap());
    seq(j.record_zero(0, 8 * MIB, MIB).unwrap());
    j.set_link(false);
    std::thread::sleep(Duration::from_millis(60));
    j.tick();
    let st = j.stats();
    assert_eq!(st.mode.mode, Mode::Bitmap);
    assert_eq!(st.dropped_entries, 2);
    assert_eq!(st.pending_bytes, 4096 + MIB);
    assert!(st.mode.reason.contains("unreachable"), "{}", st.mode.reason);
    // The batched entries stay for their ack.
    assert_eq!(st.entries, 2);
    assert!(take_all(&j).is_empty());
    // Link back: drain.
    j.set_link(true);
    j.tick();
    assert_eq!(j.mode(), Mode::Drain);
    let (o, l) = j.next_pending(0, 0, 64 * MIB).unwrap();
    assert_eq!((o, l), (40960, 4096));
    assert!(!j.finish_drain());
    assert!(
        j.record_copy(0, o, l, vec![CopyPart::Data(o, vec![2; 4096])])
            .unwrap()
    );
    let (o, l) = j.next_pending(0, 0, 64 * MIB).unwrap();
    assert_eq!((o, l), (8 * MIB, MIB));
    assert!(j.record_copy(0, o, l, vec![CopyPart::Zero(o, l)]).unwrap());
    assert!(j.next_pending(0, 0, 64 * MIB).is_none());
    assert!(j.finish_drain());
    assert_eq!(j.mode(), Mode::Data);
    let e = take_all(&j);
    assert_eq!(e.len(), 3);
    assert!(e.iter().all(|e| e.ordering == Ordering::M && e.seq > first));
    match &e[0].change {
        Change::Note { reason, text } => {
            assert_eq!(*reason, NoteReason::BitmapCatchUp);
            assert!(text.contains("relay keeps up again"), "{text}");
            assert!(text.contains("unreachable"), "the cause is kept: {text}");
        }
        other => panic!("the drain starts with a note, got {other:?}"),
    }
}

#[test]
fn record_tag_in_each_mode() {
    let dir = tempfile::tempdir().unwrap();
    let w = 4096 + ENTRY_OVERHEAD;
    let j = degrading(2 * w, Some((dir.path(), 3 * 4096)));
    // data
    let s1 = seq(j.record_write(0, 0, vec![1; 4096]).unwrap());
    let t1 = j.record_tag("before-spill", 1).unwrap();
    assert_eq!(t1, s1 + 1);
    // spill
    seq(j.record_write(0, 4096, vec![2; 4096]).unwrap());
    assert_eq!(j.mode(), Mode::Spill);
    let t2 = j.record_tag("in-spill", 0).unwrap();
    // bitmap: budgets full
    for i in 0..4 {
        j.record_write(0, 8192 * (i + 2), vec![3; 4096]).unwrap();
    }
    assert_eq!(j.mode(), Mode::Bitmap);
    let next = j.next_seq();
    let e = j.record_tag("in-bitmap", 0).unwrap_err();
    assert!(matches!(
        e,
        CaptureError::NotConsistent { mode: "bitmap", .. }
    ));
    let msg = e.to_string();
    assert!(
        msg.contains("group g is in bitmap mode since ")
            && msg.contains("budgets full")
            && msg.contains("could not be a consistent point"),
        "{msg}"
    );
    assert_eq!(e.kind(), ErrorKind::Throttled);
    assert_eq!(j.next_seq(), next, "a refused tag takes no seq");
    let entries = take_all(&j);
    // drain (the unsent backlog was taken)
    j.set_link(true);
    j.tick();
    assert_eq!(j.mode(), Mode::Drain);
    let e = j.record_tag("in-drain", 0).unwrap_err();
    assert!(e.to_string().contains("drain mode"), "{e}");
    // invalid names and flags, closed
    for (name, flags) in [("", 0), ("-x", 0), ("a b", 0), ("ok", 2)] {
        let e = j.record_tag(name, flags).unwrap_err();
        assert!(matches!(e, CaptureError::InvalidTag { .. }), "{e}");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }
    let tags: Vec<(u64, &str, u64)> = entries
        .iter()
        .filter_map(|e| match &e.change {
            Change::Tag { name, flags } => Some((e.seq, &**name, *flags)),
            _ => None,
        })
        .collect();
    assert_eq!(tags, vec![(t1, "before-spill", 1), (t2, "in-spill", 0)]);
    assert!(
        entries
            .iter()
            .filter(|e| matches!(e.change, Change::Tag { .. }))
            .all(|e| e.ordering == Ordering::W && e.disk == 0)
    );
    assert_eq!(j.stats().tags, 2);
    j.close();
    assert!(matches!(j.record_tag("late", 0), Err(CaptureError::Closed)));
}

#[test]
fn a_tag_ends_its_batch() {
    let j = journal(MIB as usize);
    j.record_write(0, 0, vec![1; 100]).unwrap();
    let t = j.record_tag("t", 0).unwrap();
    j.record_write(0, 0, vec![2; 100]).unwrap();
    // Even with a long linger, the batch ends at the tag at once.
    let t0 = Instant::now();
    let b = j.take_batch(usize::MAX, Duration::from_secs(5), Duration::ZERO);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "no linger after a tag"
    );
    assert_eq!(b.len(), 2);
    assert_eq!(b.last().unwrap().seq, t);
    let b = j.take_batch(usize::MAX, Duration::ZERO, Duration::ZERO);
    assert_eq!(b.len(), 1);
    assert!(matches!(b[0].change, Change::Write(_)));
}

#[test]
fn a_waiting_batcher_is_woken_by_what_can_end_its_wait() {
    // Writes below a lingering batcher's byte target do not wake it (no
    // futex call per write); the write that meets the target does, at once
    // rather than at the end of its (long) linger. The same for a waiter for a
    // first entry and for a tag.
    let j = Arc::new(journal(MIB as usize));
    let long = Duration::from_secs(60);
    let batcher = {
        let j = j.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let first = j.take_batch(usize::MAX, Duration::ZERO, long);
            let lingered = j.take_batch(3000, long, long);
            let tagged = j.take_batch(usize::MAX, long, long);
            (first, lingered, tagged, t0.elapsed())
        })
    };
    let wait_for = |cond: &dyn Fn(&Inner) -> bool| {
        for _ in 0..10_000 {
            if cond(&j.lock()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the batcher never reached the expected wait");
    };
    wait_for(&|g| g.waiters.first == 1);
    j.record_write(0, 0, vec![1; 1000]).unwrap();
    // The batcher took the first write and waits for a first entry again, then
    // lingers for 3000 bytes.
    wait_for(&|g| g.unbatched == 1 && g.waiters.first == 1);
    j.record_write(0, 4096, vec![2; 1000]).unwrap();
    wait_for(&|g| g.waiters.linger == 1 && g.waiters.linger_bytes == 3000);
    assert!(!j.lock().batcher_should_wake(), "1000 of 3000 bytes");
    j.record_write(0, 8192, vec![3; 1000]).unwrap();
    assert!(!j.lock().batcher_should_wake(), "2000 of 3000 bytes");
    j.record_write(0, 12288, vec![4; 1000]).unwrap();
    wait_for(&|g| g.unbatched == 4 && g.waiters.first == 1);
    j.record_write(0, 16384, vec![5; 10]).unwrap();
    wait_for(&|g| g.waiters.linger == 1);
    j.record_tag("now", 0).unwrap();
    let (first, lingered, tagged, took) = batcher.join().unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        lingered.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(tagged.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
    assert!(took < long / 2, "woken, not timed out ({took:?})");
    let g = j.lock();
    assert_eq!((g.waiters.first, g.waiters.linger), (0, 0));
}

#[test]
fn unsent_tags_are_dropped_with_the_writes_when_capture_degrades() {
    let j = degrading(MIB as usize, None);
    j.record_write(0, 0, vec![1; 4096]).unwrap();
    j.record_tag("lost", 0).unwrap();
    j.record_disk_size(0, 64 * MIB).unwrap();
    j.set_link(false);
    std::thread::sleep(Duration::from_millis(60));
    j.tick();
    assert_eq!(j.mode(), Mode::Bitmap);
    let st = j.stats();
    assert_eq!((st.dropped_entries, st.dropped_tags), (1, 1));
    let left = take_all(&j);
    assert_eq!(left.len(), 1);
    assert!(matches!(left[0].change, Change::DiskSize(_)));
    assert_eq!(
        left[0].ordering,
        Ordering::M,
        "kept entries are no recovery point"
    );
}

#[test]
fn a_note_for_each_disk_that_starts_copying() {
    let j = journal(MIB as usize);
    let mut p = RegionBitmap::new(256);
    p.set_range(0, 2);
    j.add_disk(
        1,
        MIB,
        p.clone(),
        NoteReason::UncleanStop,
        "previous run crashed",
    );
    j.add_disk(2, MIB, p, NoteReason::InitialCopy, "initial copy of 1 MiB");
    j.add_disk(
        3,
        MIB,
        RegionBitmap::new(256),
        NoteReason::InitialCopy,
        "nothing",
    );
    let e = take_all(&j);
    let notes: Vec<(u16, NoteReason)> = e
        .iter()
        .filter_map(|e| match &e.change {
            Change::Note { reason, .. } => Some((e.disk, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        notes,
        vec![(1, NoteReason::UncleanStop), (2, NoteReason::InitialCopy)]
    );
    assert!(e.iter().all(|e| e.ordering == Ordering::M));
    // A backing write failure: bitmap, then a note with code 4 when copying.
    let j = journal(MIB as usize);
    j.set_link(true);
    j.mark_pending(0, 4096, 4096, NoteReason::BackingWriteFailure, "EIO");
    assert_eq!(j.mode(), Mode::Bitmap);
    j.tick();
    assert_eq!(j.mode(), Mode::Drain);
    let e = take_all(&j);
    assert!(
        matches!(&e[0].change, Change::Note { reason: NoteReason::BackingWriteFailure, text } if text.contains("EIO")),
        "{:?}",
        e[0].change
    );
}

#[test]
fn a_grown_disk_has_its_new_size_in_the_frame_of_its_note() {
    let j = journal(MIB as usize);
    let mut p = RegionBitmap::new(512);
    p.set_range(256, 512);
    j.add_grown_disk(
        1,
        2 * MIB,
        p,
        NoteReason::DiskGrown,
        "grew from 1 MiB",
        Some(MIB),
    );
    // Batches of one byte: the note alone exceeds it, its DiskSize still joins.
    let mut batches = Vec::new();
    loop {
        let b = j.take_batch(1, Duration::ZERO, Duration::ZERO);
        if b.is_empty() {
            break;
        }
        batches.push(b);
    }
    let with_note: Vec<&Vec<Entry>> = batches
        .iter()
        .filter(|b| {
            b.iter().any(|e| {
                matches!(
                    &e.change,
                    Change::Note {
                        reason: NoteReason::DiskGrown,
                        ..
                    }
                )
            })
        })
        .collect();
    assert_eq!(with_note.len(), 1, "{batches:?}");
    let b = with_note[0];
    let at = b
        .iter()
        .position(|e| matches!(&e.change, Change::Note { .. }))
        .unwrap();
    assert!(
        matches!(b.get(at + 1).map(|e| (&e.change, e.disk)), Some((Change::DiskSize(s), 1)) if *s == 2 * MIB),
        "the new size follows its note in the same batch: {b:?}"
    );
}

#[test]
fn a_chain_gap_announces_this_run_s_growth_again() {
    let j = journal(MIB as usize);
    let mut p = RegionBitmap::new(512);
    p.set_range(256, 512);
    j.add_grown_disk(1, 2 * MIB, p, NoteReason::DiskGrown, "grew", Some(MIB));
    let first = take_all(&j);
    j.trim_through(first.last().unwrap().seq);
    assert_eq!(j.unannounced_growth(1), None, "acknowledged");
    // The relay lost those frames: the announcement goes out again with the
    // chain-gap note.
    j.rebase(NoteReason::ChainGap, "relay lost frames", 0)
        .unwrap();
    assert_eq!(j.unannounced_growth(1), Some(MIB));
    let again: Vec<String> = take_all(&j)
        .iter()
        .filter(|e| e.disk == 1)
        .filter_map(|e| match &e.change {
            Change::Note { reason, .. } => Some(reason.to_string()),
            Change::DiskSize(s) => Some(format!("size {s}")),
            _ => None,
        })
        .collect();
    assert_eq!(again, ["chain-gap", "disk-grown", "size 2097152"]);
}

#[test]
fn unacknowledged_regions_leave_the_dirty_set_after_two_acks() {
    let j = journal(MIB as usize);
    let s1 = seq(j.record_write(0, 0, vec![1; 4096]).unwrap());
    assert_eq!(j.dirty_regions(0).unwrap().count(), 1);
    take_all(&j);
    j.trim_through(s1); // rotation: the region is in the previous generation
    assert_eq!(j.dirty_regions(0).unwrap().count(), 1);
    let s2 = seq(j.record_write(0, 8192, vec![1; 4096]).unwrap());
    take_all(&j);
    j.trim_through(s2);
    let d = j.dirty_regions(0).unwrap();
    assert_eq!(d.count(), 1, "only the second write's region");
    assert!(d.get(2));
    assert_eq!(
        j.final_dirty_regions(0).unwrap().count(),
        0,
        "everything acknowledged"
    );
}

#[test]
fn a_corrupt_spill_record_turns_the_rest_into_dirty_regions() {
    let dir = tempfile::tempdir().unwrap();
    let w = 4096 + ENTRY_OVERHEAD;
    let j = degrading(2 * w, Some((dir.path(), MIB)));
    seq(j.record_write(0, 0, vec![1; 4096]).unwrap());
    seq(j.record_write(0, 4096, vec![2; 4096]).unwrap()); // spilled
    seq(j.record_write(0, 8192, vec![3; 4096]).unwrap()); // spilled
    assert_eq!(j.stats().spill_entries, 2);
    // Corrupt the first spilled record's data.
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = std::fs::read(&seg).unwrap();
    b[100] ^= 1;
    std::fs::write(&seg, &b).unwrap();
    let e = take_all(&j);
    assert_eq!(e.len(), 1, "the entry before the bad record is sent");
    let st = j.stats();
    assert_eq!(st.mode.mode, Mode::Bitmap);
    assert!(
        st.mode.reason.contains("spill read failed"),
        "{}",
        st.mode.reason
    );
    assert_eq!(st.pending_bytes, 2 * 4096);
    assert_eq!(st.spill_entries, 0);
}

#[test]
fn a_rebase_drops_every_unacknowledged_entry_and_makes_every_disk_pending() {
    let j = journal(1 << 20);
    for i in 0..6u64 {
        seq(j.record_write(0, i * 4096, vec![1; 4096]).unwrap());
    }
    // Two acknowledged, two in frames (batched), two not yet batched.
    let b = j.take_batch(4 * 4096, Duration::ZERO, Duration::ZERO);
    assert_eq!(b.len(), 4);
    j.trim_through(2);
    assert_eq!(j.stats().entries, 4);
    assert_eq!(j.mode(), Mode::Data);
    let dropped = j
        .rebase(NoteReason::ChainGap, "chain gap: test", 0)
        .unwrap();
    assert_eq!(dropped, 4);
    let st = j.stats();
    assert_eq!((st.entries, st.bytes), (0, 0));
    assert_eq!(st.pending_bytes, 64 * MIB, "the whole disk is pending");
    assert_eq!(j.mode(), Mode::Bitmap, "no W frame before the compare");
    assert!(
        j.take_batch(1 << 20, Duration::ZERO, Duration::ZERO)
            .is_empty()
    );
    // New writes get new seqs, and a late ack of the dropped frames is harmless.
    j.trim_through(4);
    let next = j.next_seq();
    assert!(next > 6);
}
