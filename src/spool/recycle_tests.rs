//! Spool tests of recycled segment files (docs/SPOOL.md, "Recycled segment
//! files"): trimmed segments become free files, new segments reuse them, and
//! the bytes left from a file's earlier use are never read as frames, after a
//! crash, a clean stop, or a read racing the reuse.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::record::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::segment::{free_file_name, is_free_file_name};
use super::tests::{all, check_frame, file_len, frame_nos, open, opts, req, seg_files, seg_path};
use super::*;

/// Names of the free files of `group`, sorted.
fn free_files(dir: &Path, group: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join(group))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            is_free_file_name(&n).then_some(n)
        })
        .collect();
    v.sort();
    v
}

/// Copy a spool directory as a crash would leave it: every file as it is on
/// disk now (every acknowledged append is complete in it), without the lock.
fn crash_copy(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            crash_copy(&e.path(), &to);
        } else if e.file_name() != LOCK_FILE {
            fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Segment size of these tests: four blocks, so a direct writer's first block
/// of a reused file leaves old bytes after it.
const SEG: u64 = 16384;
/// 300-byte payloads: 48 records fill a segment exactly.
const OLD_LEN: usize = 300;

/// Fill three segments (frames 1..=144), trim the first two (they become free
/// files), then write frames 145..=147 of `new_len` bytes: 145 starts a segment
/// in a reused file, over the records of frames 49.. (or 1..).
fn recycle_one(dir: &Path, direct: bool, new_len: usize) -> Spool {
    let (s, _) = open(opts(dir, SEG, direct));
    for f in 1..=144 {
        s.append_blocking(req("g", f, OLD_LEN)).unwrap();
    }
    assert_eq!(seg_files(dir, "g"), [1, 49, 97]);
    s.trim_through("g", 96).unwrap();
    assert_eq!(seg_files(dir, "g"), [97]);
    assert_eq!(
        free_files(dir, "g"),
        [free_file_name(1), free_file_name(49)]
    );
    for f in 145..=147 {
        s.append_blocking(req("g", f, new_len)).unwrap();
    }
    assert_eq!(seg_files(dir, "g"), [97, 145]);
    assert_eq!(free_files(dir, "g").len(), 1, "one free file was reused");
    assert_eq!(
        file_len(&seg_path(dir, "g", 145)),
        SEG,
        "old bytes still there"
    );
    let v = all(&s, "g");
    assert_eq!(frame_nos(&v), (97..=147).collect::<Vec<_>>());
    v.iter().for_each(|f| {
        let len = if f.frame_no <= 144 { OLD_LEN } else { new_len };
        check_frame("g", f, len)
    });
    s
}

/// After a crash the newest segment is a recycled file with old records after
/// its last one (buffered: at a record boundary when `new_len == OLD_LEN`, in
/// the middle of one otherwise; direct: after the zero padding of its first
/// block): recovery indexes exactly the new frames and cuts the rest
/// as a torn tail, reporting no damage.
fn old_bytes_end_the_newest_segment_after_a_crash(direct: bool, new_len: usize) {
    let dir = tempfile::tempdir().unwrap();
    let s = recycle_one(dir.path(), direct, new_len);
    let copy = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), copy.path());

    let (c, report) = open(opts(copy.path(), SEG, direct));
    let g = report.group("g").unwrap();
    assert!(g.problems.is_empty(), "{report:?}");
    assert_eq!(g.torn_tails.len(), 1, "{report:?}");
    assert_eq!(g.torn_tails[0].file, seg_path(copy.path(), "g", 145));
    assert_eq!(g.head.map(|h| h.frame_no), Some(147));
    assert!(
        free_files(copy.path(), "g").is_empty(),
        "free files dropped"
    );
    let v = all(&c, "g");
    assert_eq!(frame_nos(&v), (97..=147).collect::<Vec<_>>());
    for f in 148..=300 {
        c.append_blocking(req("g", f, 200)).unwrap();
    }
    c.trim_through("g", 290).unwrap();
    assert_eq!(frame_nos(&all(&c, "g")), (291..=300).collect::<Vec<_>>());
    all(&c, "g").iter().for_each(|f| check_frame("g", f, 200));
    c.shutdown();
    drop(c);
    let (c, report) = open(opts(copy.path(), SEG, direct));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(frame_nos(&all(&c, "g")), (291..=300).collect::<Vec<_>>());
    drop(c);

    // The original, stopped cleanly, has its old bytes cut at the stop.
    s.shutdown();
    drop(s);
    let newest = seg_path(dir.path(), "g", 145);
    let logical = (SEGMENT_HEADER_LEN + 3 * (RECORD_HEADER_LEN + new_len)) as u64;
    let want = if direct {
        logical.next_multiple_of(4096)
    } else {
        logical
    };
    assert_eq!(file_len(&newest), want);
    let (s, report) = open(opts(dir.path(), SEG, direct));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(frame_nos(&all(&s, "g")), (97..=147).collect::<Vec<_>>());
}

#[test]
fn old_records_at_a_record_boundary_end_the_newest_segment_direct() {
    old_bytes_end_the_newest_segment_after_a_crash(true, OLD_LEN);
}

#[test]
fn old_records_at_a_record_boundary_end_the_newest_segment_buffered() {
    old_bytes_end_the_newest_segment_after_a_crash(false, OLD_LEN);
}

#[test]
fn old_bytes_inside_a_record_end_the_newest_segment_direct() {
    old_bytes_end_the_newest_segment_after_a_crash(true, 123);
}

#[test]
fn old_bytes_inside_a_record_end_the_newest_segment_buffered() {
    old_bytes_end_the_newest_segment_after_a_crash(false, 123);
}

/// Damage inside the new records of a recycled newest segment is still
/// damage: the records after it are new, so they are quarantined and
/// reported, not cut quietly as old bytes.
fn damage_before_new_records_is_still_reported(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = recycle_one(dir.path(), direct, OLD_LEN);
    let copy = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), copy.path());
    drop(s);
    let newest = seg_path(copy.path(), "g", 145);
    let mut bytes = fs::read(&newest).unwrap();
    // A payload byte of frame 35 (the second new record).
    let at = SEGMENT_HEADER_LEN + (RECORD_HEADER_LEN + OLD_LEN) + RECORD_HEADER_LEN + 7;
    bytes[at] ^= 0x40;
    fs::write(&newest, &bytes).unwrap();
    let (c, report) = open(opts(copy.path(), SEG, direct));
    let g = report.group("g").unwrap();
    assert_eq!(g.problems.len(), 1, "{report:?}");
    assert_eq!(g.problems[0].kind, ProblemKind::BadRecord, "{report:?}");
    assert_eq!(g.head.map(|h| h.frame_no), Some(145));
    assert_eq!(frame_nos(&all(&c, "g")), (97..=145).collect::<Vec<_>>());
}

#[test]
fn damage_before_new_records_is_still_reported_direct() {
    damage_before_new_records_is_still_reported(true);
}

#[test]
fn damage_before_new_records_is_still_reported_buffered() {
    damage_before_new_records_is_still_reported(false);
}

/// A crash between rewriting a free file's header and giving it the segment's
/// name leaves a free file: recovery removes it and reports nothing.
#[test]
fn a_free_file_left_by_a_crash_is_dropped_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4096, false));
    for f in 1..=5 {
        s.append_blocking(req("g", f, 100)).unwrap();
    }
    s.shutdown();
    drop(s);
    let free = dir.path().join("g").join(free_file_name(3));
    fs::copy(seg_path(dir.path(), "g", 1), &free).unwrap();
    let (s, report) = open(opts(dir.path(), 4096, false));
    assert!(report.is_clean(), "{report:?}");
    assert!(!free.exists());
    assert_eq!(frame_nos(&all(&s, "g")), (1..=5).collect::<Vec<_>>());
}

/// No more free files than `recycle_segments`; 0 deletes every trimmed file.
#[test]
fn the_free_list_is_bounded_and_can_be_off() {
    for keep in [0, 1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), 4096, false);
        o.recycle_segments = keep;
        let (s, _) = open(o);
        for f in 1..=60 {
            s.append_blocking(req("g", f, OLD_LEN)).unwrap();
        }
        s.trim_through("g", 60).unwrap();
        assert_eq!(free_files(dir.path(), "g").len(), keep);
        assert_eq!(
            seg_files(dir.path(), "g").len(),
            1,
            "the active segment stays"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 4096, false);
    o.recycle_segments = MAX_RECYCLE_SEGMENTS + 1;
    let e = Spool::open(o).unwrap_err();
    assert!(e.to_string().contains("recycle_segments"), "{e}");
}

/// A segment trimmed and reused after a reader opened it: the reader finds
/// the new bytes where it planned an old frame, sees that frame is trimmed,
/// and plans again (without that, it would report damage).
fn a_reader_overtaken_by_reuse_plans_again(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), SEG, direct));
    for f in 1..=144 {
        s.append_blocking(req("race", f, OLD_LEN)).unwrap();
    }
    let s2 = s.clone();
    let reused = seg_path(dir.path(), "race", 145);
    let probe = reused.clone();
    super::read_fault::once("race", move || {
        // Frames 1..=96 go: files 1 and 49 become free; 145 takes file 49,
        // the one the reader has open for frame 49.
        s2.trim_through("race", 144).unwrap();
        for f in 145..=147 {
            s2.append_blocking(req("race", f, OLD_LEN)).unwrap();
        }
        assert!(probe.exists());
    });
    let v = s.read_after("race", 48, usize::MAX, 10).unwrap();
    assert_eq!(frame_nos(&v), [145, 146, 147]);
    v.iter().for_each(|f| check_frame("race", f, OLD_LEN));
    assert!(reused.exists());
}

#[test]
fn a_reader_overtaken_by_reuse_plans_again_direct() {
    a_reader_overtaken_by_reuse_plans_again(true);
}

#[test]
fn a_reader_overtaken_by_reuse_plans_again_buffered() {
    a_reader_overtaken_by_reuse_plans_again(false);
}

/// A reader whose planned segment is trimmed and reused under it plans again:
/// it never returns wrong bytes and never reports damage that is not there.
fn reads_racing_trims_and_reuse_return_the_right_frames(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), SEG, direct));
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            for f in 1..=1500u64 {
                s.append_blocking(req("g", f, 150 + (f as usize * 13) % 200))
                    .unwrap();
                if f > 30 && f % 5 == 0 {
                    s.trim_through("g", f - 30).unwrap();
                }
            }
            done.store(true, Ordering::Release);
        });
        let mut reads = 0u64;
        while !done.load(Ordering::Acquire) && reads < 200_000 {
            let from = s.stats("g").map_or(0, |st| st.trimmed_through);
            for f in s.read_after("g", from, usize::MAX, 40).unwrap() {
                check_frame("g", &f, 150 + (f.frame_no as usize * 13) % 200);
            }
            reads += 1;
        }
        writer.join().unwrap();
    });
    assert!(
        seg_files(dir.path(), "g").len() <= 5,
        "trimmed segments are gone"
    );
    assert!(free_files(dir.path(), "g").len() <= DEFAULT_RECYCLE_SEGMENTS);
}

#[test]
fn reads_racing_trims_and_reuse_return_the_right_frames_direct() {
    reads_racing_trims_and_reuse_return_the_right_frames(true);
}

#[test]
fn reads_racing_trims_and_reuse_return_the_right_frames_buffered() {
    reads_racing_trims_and_reuse_return_the_right_frames(false);
}

/// A write that finds the disk full deletes every group's free files, so that
/// the space they hold goes to frames; the failed appends succeed when retried.
#[test]
fn a_full_disk_releases_the_free_files() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), SEG, false));
    for g in ["nospace-a", "nospace-b"] {
        for f in 1..=144 {
            s.append_blocking(req(g, f, OLD_LEN)).unwrap();
        }
        s.trim_through(g, 96).unwrap();
        assert_eq!(free_files(dir.path(), g).len(), 2);
    }
    super::writer::fault::fail_sync_no_space("nospace-a", 0);
    let e = s
        .append_blocking(req("nospace-a", 145, OLD_LEN))
        .unwrap_err();
    assert!(e.is_no_space(), "{e}");
    for g in ["nospace-a", "nospace-b"] {
        assert!(free_files(dir.path(), g).is_empty(), "{g}");
    }
    assert_eq!(
        s.append_blocking(req("nospace-a", 145, OLD_LEN)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(
        frame_nos(&all(&s, "nospace-a")),
        (97..=145).collect::<Vec<_>>()
    );
    s.shutdown();
    drop(s);
    let (_, report) = open(opts(dir.path(), SEG, false));
    assert!(report.is_clean(), "{report:?}");
}
