//! Spool tests: round trips, group commit, chain rules, recovery, trim.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::record::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::segment::segment_file_name;
use super::*;
use crate::error::{Classify, ErrorKind};
use crate::util::prng::Prng;

pub(super) fn opts(dir: &Path, segment_bytes: u64, direct: bool) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_path_buf(),
        segment_bytes,
        max_batch_bytes: 1 << 20,
        queue_depth: 4096,
        direct_io: direct,
        recycle_segments: DEFAULT_RECYCLE_SEGMENTS,
    }
}

/// Run a test body once with direct I/O and once buffered, as two tests
/// (`<name>::direct`, `<name>::buffered`).
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            #[test]
            fn direct() {
                super::$name(true)
            }
            #[test]
            fn buffered() {
                super::$name(false)
            }
        }
    };
}

pub(super) fn payload(group: &str, frame: u64, len: usize) -> Vec<u8> {
    let mut rng = Prng::new(frame ^ (group.len() as u64) << 40);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

pub(super) fn req(group: &str, frame: u64, len: usize) -> AppendRequest {
    AppendRequest {
        group: group.to_string(),
        frame_no: frame,
        prev_frame_no: frame - 1,
        last_seq: frame * 10,
        bytes: Arc::new(payload(group, frame, len)),
    }
}

/// Open, and check the spool uses the I/O mode asked for: a test that claims to
/// cover direct I/O must not silently run buffered. (Needs a temp directory on a
/// filesystem with O_DIRECT: ext4, xfs, btrfs, or tmpfs on Linux 6.6+.)
pub(super) fn open(o: SpoolOptions) -> (Spool, RecoveryReport) {
    let want = o.direct_io;
    let (s, r) = Spool::open(o).expect("open spool");
    assert_eq!(
        s.direct_io(),
        want,
        "direct_io {want} asked for; is TMPDIR on a filesystem without O_DIRECT?"
    );
    (s, r)
}

pub(super) fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// Segment files against the logical bytes the spool counts: equal when
/// buffered; in direct mode each file is padded with zeros to a block boundary.
pub(super) fn check_disk_bytes(dir: &Path, group: &str, counted: u64, direct: bool) {
    let segs = seg_files(dir, group);
    let lens: Vec<u64> = segs
        .iter()
        .map(|f| file_len(&seg_path(dir, group, *f)))
        .collect();
    let disk: u64 = lens.iter().sum();
    if direct {
        assert!(lens.iter().all(|l| l % 4096 == 0), "{lens:?}");
        assert!(
            counted <= disk && disk - counted < 4096 * segs.len() as u64,
            "counted {counted}, on disk {lens:?}"
        );
    } else {
        assert_eq!(counted, disk);
    }
}

pub(super) fn all(s: &Spool, group: &str) -> Vec<SpooledFrame> {
    s.read_after(group, 0, usize::MAX, usize::MAX).unwrap()
}

pub(super) fn frame_nos(v: &[SpooledFrame]) -> Vec<u64> {
    v.iter().map(|f| f.frame_no).collect()
}

pub(super) fn check_frame(group: &str, f: &SpooledFrame, len: usize) {
    assert_eq!(f.prev_frame_no, f.frame_no - 1);
    assert_eq!(f.last_seq, f.frame_no * 10);
    assert_eq!(
        f.bytes,
        payload(group, f.frame_no, len),
        "frame {}",
        f.frame_no
    );
}

pub(super) fn seg_path(dir: &Path, group: &str, first: u64) -> PathBuf {
    dir.join(group).join(segment_file_name(first))
}

pub(super) fn seg_files(dir: &Path, group: &str) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir.join(group))
        .unwrap()
        .filter_map(|e| segment::parse_segment_name(e.unwrap().file_name().to_str()?))
        .collect();
    v.sort();
    v
}

pub(super) fn len_of(frame: u64) -> usize {
    (frame as usize * 37) % 700
}

both_modes!(round_trip_across_segments_groups_trim_and_reopen);
fn round_trip_across_segments_groups_trim_and_reopen(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, report) = open(opts(dir.path(), 4096, direct));
    assert!(report.is_clean() && report.groups.is_empty());
    for f in 1..=60 {
        for g in ["alpha", "b-2"] {
            assert_eq!(
                s.append_blocking(req(g, f, len_of(f))).unwrap(),
                AppendOutcome::Stored
            );
        }
    }
    assert_eq!(s.groups(), ["alpha", "b-2"]);
    for g in ["alpha", "b-2"] {
        let v = all(&s, g);
        assert_eq!(frame_nos(&v), (1..=60).collect::<Vec<_>>());
        v.iter().for_each(|f| check_frame(g, f, len_of(f.frame_no)));
        assert_eq!(
            s.head(g),
            Some(SpoolHead {
                frame_no: 60,
                last_seq: 600
            })
        );
    }
    let segs = seg_files(dir.path(), "alpha");
    assert!(segs.len() > 3, "rotation happened: {segs:?}");
    for w in segs.windows(2) {
        let len = file_len(&seg_path(dir.path(), "alpha", w[0]));
        assert!(len <= 4096, "segment {} is {len} bytes", w[0]);
    }
    let st = s.stats("alpha").unwrap();
    assert_eq!(
        (st.frames, st.first_frame_no, st.segments),
        (60, Some(1), segs.len())
    );
    check_disk_bytes(dir.path(), "alpha", st.bytes, direct);
    assert_eq!(s.total_bytes(), st.bytes + s.stats("b-2").unwrap().bytes);

    // Partial reads: count and byte limits, and after a given frame.
    assert_eq!(
        frame_nos(&s.read_after("alpha", 10, usize::MAX, 5).unwrap()),
        [11, 12, 13, 14, 15]
    );
    let limited = s.read_after("alpha", 10, 1000, 100).unwrap();
    assert!(limited.iter().map(|f| f.bytes.len()).sum::<usize>() <= 1000);
    assert_eq!(limited[0].frame_no, 11);
    assert_eq!(
        s.read_after("alpha", 10, 0, 100).unwrap().len(),
        1,
        "at least one frame"
    );
    assert!(
        s.read_after("alpha", 60, usize::MAX, 100)
            .unwrap()
            .is_empty()
    );
    assert!(
        s.read_after("nobody", 0, usize::MAX, 100)
            .unwrap()
            .is_empty()
    );

    // Trim: whole segments whose frames are all trimmed go; the rest stays readable.
    s.trim_through("alpha", 30).unwrap();
    assert_eq!(frame_nos(&all(&s, "alpha")), (31..=60).collect::<Vec<_>>());
    assert_eq!(
        frame_nos(&s.read_after("alpha", 5, usize::MAX, 2).unwrap()),
        [31, 32]
    );
    let after = seg_files(dir.path(), "alpha");
    assert!(after.len() < segs.len());
    assert!(after[0] <= 31, "segment holding frame 31 kept: {after:?}");
    let st = s.stats("alpha").unwrap();
    assert_eq!(
        (st.frames, st.first_frame_no, st.trimmed_through),
        (30, Some(31), 30)
    );
    let e = s.trim_through("alpha", 61).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Peer);
    assert!(
        e.to_string().contains("alpha") && e.to_string().contains("61"),
        "{e}"
    );
    s.shutdown();
    drop(s);

    let (s, report) = open(opts(dir.path(), 4096, direct));
    assert!(report.is_clean(), "{report:?}");
    let ga = report.group("alpha").unwrap();
    assert_eq!((ga.frames, ga.trimmed_through), (30, 30));
    assert_eq!(frame_nos(&all(&s, "alpha")), (31..=60).collect::<Vec<_>>());
    assert_eq!(frame_nos(&all(&s, "b-2")), (1..=60).collect::<Vec<_>>());
    all(&s, "alpha")
        .iter()
        .for_each(|f| check_frame("alpha", f, len_of(f.frame_no)));
    for f in 61..=70 {
        assert_eq!(
            s.append_blocking(req("alpha", f, 100)).unwrap(),
            AppendOutcome::Stored
        );
    }
    assert_eq!(s.head("alpha").unwrap().frame_no, 70);
    assert_eq!(all(&s, "alpha").len(), 40);
}

both_modes!(group_commit_many_threads_all_complete_in_order);
fn group_commit_many_threads_all_complete_in_order(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 64 << 10, direct));
    const THREADS: u64 = 6;
    const PER: u64 = 200;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let s = s.clone();
            scope.spawn(move || {
                let g = format!("g{t}");
                let rxs: Vec<_> = (1..=PER).map(|f| s.append(req(&g, f, 64))).collect();
                let mut rxs = rxs.into_iter().rev();
                // When the last append is done, every earlier one of the group is too.
                let last = rxs.next().unwrap();
                assert_eq!(
                    last.blocking_recv().unwrap().unwrap(),
                    AppendOutcome::Stored
                );
                for mut rx in rxs {
                    assert_eq!(rx.try_recv().unwrap().unwrap(), AppendOutcome::Stored);
                }
            });
        }
    });
    for t in 0..THREADS {
        let g = format!("g{t}");
        let v = all(&s, &g);
        assert_eq!(frame_nos(&v), (1..=PER).collect::<Vec<_>>());
        v.iter().for_each(|f| check_frame(&g, f, 64));
    }
}

both_modes!(concurrent_blocking_appends_to_one_group_keep_the_chain);
fn concurrent_blocking_appends_to_one_group_keep_the_chain(direct: bool) {
    // Threads take turns through a shared counter; the spool sees one chain.
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 8192, direct));
    let next = std::sync::Mutex::new(1u64);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let mut n = next.lock().unwrap();
                    if *n > 100 {
                        break;
                    }
                    let rx = s.append(req("one", *n, 10));
                    *n += 1;
                    drop(n);
                    assert_eq!(rx.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
                }
            });
        }
    });
    assert_eq!(frame_nos(&all(&s, "one")), (1..=100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_from_async_code() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 1 << 20, true));
    for f in 1..=10 {
        assert_eq!(
            s.append(req("a", f, 10)).await.unwrap().unwrap(),
            AppendOutcome::Stored
        );
    }
    let s2 = s.clone();
    let v = tokio::task::spawn_blocking(move || all(&s2, "a"))
        .await
        .unwrap();
    assert_eq!(v.len(), 10);
    tokio::task::spawn_blocking(move || s.shutdown())
        .await
        .unwrap();
}

both_modes!(duplicates_chain_breaks_and_refusals);
fn duplicates_chain_breaks_and_refusals(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 1 << 20, direct));
    // An empty group accepts any predecessor (the chain may have started elsewhere).
    let first = AppendRequest {
        group: "g".into(),
        frame_no: 42,
        prev_frame_no: 41,
        last_seq: 420,
        bytes: Arc::new(b"x".to_vec()),
    };
    assert_eq!(
        s.append_blocking(first.clone()).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(
        s.append_blocking(req("g", 43, 5)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(
        s.append_blocking(req("g", 43, 5)).unwrap(),
        AppendOutcome::Duplicate
    );
    assert_eq!(s.append_blocking(first).unwrap(), AppendOutcome::Duplicate);
    assert_eq!(
        s.append_blocking(req("g", 7, 5)).unwrap(),
        AppendOutcome::Duplicate
    );
    let bytes_before = s.total_bytes();

    let mut gap = req("g", 45, 5);
    gap.prev_frame_no = 44;
    let e = s.append_blocking(gap).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Peer);
    let m = e.to_string();
    assert!(
        m.contains("group g") && m.contains("expected prev 43") && m.contains("got prev 44"),
        "{m}"
    );

    let mut self_prev = req("g", 44, 5);
    self_prev.prev_frame_no = 44;
    assert_eq!(
        s.append_blocking(self_prev).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let e = s
        .append_blocking(AppendRequest {
            group: "Bad/Name".into(),
            ..req("g", 44, 1)
        })
        .unwrap_err();
    assert!(matches!(e, SpoolError::InvalidGroup { .. }), "{e}");
    let e = s
        .append_blocking(AppendRequest {
            bytes: Arc::new(vec![0u8; record::MAX_PAYLOAD + 1]),
            ..req("g", 44, 0)
        })
        .unwrap_err();
    assert!(
        matches!(e, SpoolError::FrameTooLarge { frame_no: 44, .. }),
        "{e}"
    );
    assert_eq!(
        s.total_bytes(),
        bytes_before,
        "refused appends write nothing"
    );

    // A duplicate of a frame in the same batch completes after it, as Duplicate.
    let a = s.append(req("g", 44, 5));
    let b = s.append(req("g", 44, 5));
    assert_eq!(a.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
    assert_eq!(
        b.blocking_recv().unwrap().unwrap(),
        AppendOutcome::Duplicate
    );
    assert_eq!(frame_nos(&all(&s, "g")), [42, 43, 44]);
}

both_modes!(shutdown_finishes_queued_appends_then_refuses);
fn shutdown_finishes_queued_appends_then_refuses(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 1 << 20, direct));
    let rxs: Vec<_> = (1..=50).map(|f| s.append(req("g", f, 100))).collect();
    s.shutdown();
    for rx in rxs {
        assert_eq!(rx.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
    }
    let e = s.append_blocking(req("g", 51, 1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shutdown);
    let e = s
        .append(req("g", 51, 1))
        .blocking_recv()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shutdown);
    assert_eq!(all(&s, "g").len(), 50);
    s.trim_through("g", 10).unwrap();
    s.shutdown();
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, _) = open(opts(dir.path(), 1 << 20, true));
    let e = Spool::open(opts(dir.path(), 1 << 20, true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let mut bad = opts(dir.path(), 100, true);
    assert!(matches!(
        Spool::open(bad.clone()),
        Err(SpoolError::BadOption { .. })
    ));
    bad.segment_bytes = 1 << 20;
    bad.queue_depth = 0;
    assert!(matches!(
        Spool::open(bad),
        Err(SpoolError::BadOption { .. })
    ));
}

#[test]
fn queue_full_is_a_throttle() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1 << 20, true);
    o.queue_depth = 1;
    let (s, _) = open(o);
    // With the writer held, at most one append is in its hands and one queued:
    // of three, at least one is refused at once.
    writer::fault::hold("qfull");
    let rxs: Vec<_> = (1..=3).map(|f| s.append(req("qfull", f, 10))).collect();
    let mut throttled = Vec::new();
    let mut pending = Vec::new();
    for mut rx in rxs {
        match rx.try_recv() {
            Ok(Err(e)) => throttled.push(e),
            Ok(Ok(o)) => panic!("completed while the writer is held: {o:?}"),
            Err(_) => pending.push(rx),
        }
    }
    writer::fault::release("qfull");
    assert!(!throttled.is_empty());
    for e in &throttled {
        assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
        assert!(e.to_string().contains("queue full"), "{e}");
    }
    // Accepted appends complete once released (a later one may be a chain break
    // when the one before it was throttled).
    let first = pending.into_iter().next().unwrap().blocking_recv().unwrap();
    assert_eq!(first.unwrap(), AppendOutcome::Stored);
    assert_eq!(frame_nos(&all(&s, "qfull"))[0], 1);
}

/// A one-group spool with `n` frames in a single segment; returns the segment
/// path, the offset of each record and the segment's logical length (the file
/// is padded to a block boundary in direct mode).
pub(super) fn single_segment(dir: &Path, n: u64, direct: bool) -> (PathBuf, Vec<u64>, u64) {
    let (s, _) = open(opts(dir, 1 << 20, direct));
    for f in 1..=n {
        s.append_blocking(req("g", f, len_of(f) + 20)).unwrap();
    }
    s.shutdown();
    let mut offs = Vec::new();
    let mut off = SEGMENT_HEADER_LEN as u64;
    for f in 1..=n {
        offs.push(off);
        off += (RECORD_HEADER_LEN + len_of(f) + 20) as u64;
    }
    let p = seg_path(dir, "g", 1);
    let phys = if direct {
        off.div_ceil(4096) * 4096
    } else {
        off
    };
    assert_eq!(file_len(&p), phys);
    (p, offs, off)
}

both_modes!(torn_tail_at_every_offset_of_the_last_record);
fn torn_tail_at_every_offset_of_the_last_record(direct: bool) {
    let master = tempfile::tempdir().unwrap();
    let (p, offs, end) = single_segment(master.path(), 3, direct);
    let orig = fs::read(&p).unwrap();
    let (last, end) = (offs[2] as usize, end as usize);
    let aligned = orig.len() % 4096 == 0;
    assert_eq!(aligned, direct, "only direct mode pads");
    // Every cut inside the last record, with and without zeros up to the old
    // size; in direct mode also cuts inside the padding.
    let mut cases: Vec<(usize, bool)> = (last..end)
        .flat_map(|cut| [(cut, false), (cut, true)])
        .collect();
    if direct {
        cases.extend([(end, false), (end + 1, false), (orig.len() - 1, false)]);
    }
    for (cut, zero_fill) in cases {
        let dir = tempfile::tempdir().unwrap();
        let gdir = dir.path().join("g");
        fs::create_dir(&gdir).unwrap();
        let mut bytes = orig[..cut].to_vec();
        if zero_fill {
            bytes.resize(orig.len(), 0);
        }
        let sp = gdir.join(segment_file_name(1));
        fs::write(&sp, &bytes).unwrap();
        let (s, report) = open(opts(dir.path(), 1 << 20, direct));
        let gr = report.group("g").unwrap();
        assert!(gr.problems.is_empty(), "cut {cut}: {:?}", gr.problems);
        let whole = cut >= end;
        // Zeros from a record boundary to a block-aligned end: padding.
        let padding = zero_fill && cut == last && aligned;
        let (cut_at, len_after) = if whole { (end, end) } else { (last, last) };
        if (cut == cut_at && !zero_fill) || padding {
            assert!(gr.torn_tails.is_empty(), "cut {cut} zero {zero_fill}");
            let len = if padding { orig.len() } else { cut };
            assert_eq!(file_len(&sp), len as u64, "nothing cut");
        } else {
            assert_eq!(gr.torn_tails.len(), 1, "cut {cut} zero {zero_fill}");
            assert_eq!(gr.torn_tails[0].offset, cut_at as u64);
            assert_eq!(gr.torn_tails[0].file, sp);
            assert_eq!(file_len(&sp), cut_at as u64, "tail cut at the record");
        }
        assert_eq!(gr.bytes, len_after as u64, "logical length");
        let n = if whole { 3 } else { 2 };
        let v = all(&s, "g");
        assert_eq!(frame_nos(&v), (1..=n).collect::<Vec<_>>());
        v.iter()
            .for_each(|f| check_frame("g", f, len_of(f.frame_no) + 20));
        assert_eq!(s.head("g").unwrap().frame_no, n);
        assert_eq!(
            s.append_blocking(req("g", n + 1, 7)).unwrap(),
            AppendOutcome::Stored
        );
        assert_eq!(frame_nos(&all(&s, "g")), (1..=n + 1).collect::<Vec<_>>());
        s.shutdown();
        drop(s);
        let (s, report) = open(opts(dir.path(), 1 << 20, direct));
        assert!(report.is_clean(), "cut {cut}: {report:?}");
        let v = all(&s, "g");
        assert_eq!(frame_nos(&v), (1..=n + 1).collect::<Vec<_>>());
        check_frame("g", &v[n as usize], 7);
    }
}

both_modes!(torn_segment_header_is_removed_only_when_newest);
fn torn_segment_header_is_removed_only_when_newest(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 1 << 20, direct));
    for f in 1..=3 {
        s.append_blocking(req("g", f, 10)).unwrap();
    }
    s.shutdown();
    drop(s);
    let torn = seg_path(dir.path(), "g", 4);
    fs::write(&torn, b"TDMKSP").unwrap();
    let (s, report) = open(opts(dir.path(), 1 << 20, direct));
    let gr = report.group("g").unwrap();
    assert_eq!(gr.torn_tails.len(), 1);
    assert!(gr.problems.is_empty());
    assert!(!torn.exists());
    assert_eq!(
        s.append_blocking(req("g", 4, 10)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(frame_nos(&all(&s, "g")), [1, 2, 3, 4]);
}

both_modes!(corrupt_middle_record_of_newest_segment_is_quarantined_and_reported);
fn corrupt_middle_record_of_newest_segment_is_quarantined_and_reported(direct: bool) {
    for header in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (p, offs, _) = single_segment(dir.path(), 5, direct);
        let mut bytes = fs::read(&p).unwrap();
        let at = offs[2] as usize + if header { 9 } else { RECORD_HEADER_LEN + 3 };
        bytes[at] ^= 0x40;
        fs::write(&p, &bytes).unwrap();
        let (s, report) = open(opts(dir.path(), 1 << 20, direct));
        let gr = report.group("g").unwrap();
        assert!(gr.torn_tails.is_empty());
        assert_eq!(gr.problems.len(), 1, "{:?}", gr.problems);
        let pr = &gr.problems[0];
        assert_eq!(pr.kind, ProblemKind::BadRecord);
        assert_eq!((pr.file.as_path(), pr.offset), (p.as_path(), offs[2]));
        let q = PathBuf::from(format!("{}.damaged-at-{}", p.display(), offs[2]));
        assert!(
            pr.detail.contains(&q.display().to_string()),
            "{}",
            pr.detail
        );
        assert_eq!(
            fs::read(&q).unwrap(),
            bytes[offs[2] as usize..],
            "nothing deleted"
        );
        let v = all(&s, "g");
        assert_eq!(frame_nos(&v), [1, 2], "valid earlier records kept");
        v.iter()
            .for_each(|f| check_frame("g", f, len_of(f.frame_no) + 20));
        assert_eq!(s.head("g").unwrap().frame_no, 2);
        assert_eq!(
            s.append_blocking(req("g", 3, 9)).unwrap(),
            AppendOutcome::Stored
        );
        s.shutdown();
        drop(s);
        let (_s, report) = open(opts(dir.path(), 1 << 20, direct));
        let gr = report.group("g").unwrap();
        assert_eq!(gr.problems.len(), 1, "only the quarantine file is listed");
        assert_eq!(gr.problems[0].kind, ProblemKind::Quarantined);
        assert_eq!(gr.frames, 3);
    }
}

both_modes!(corrupt_record_in_older_segment_keeps_later_records);
fn corrupt_record_in_older_segment_keeps_later_records(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4096, direct));
    for f in 1..=40 {
        s.append_blocking(req("g", f, 300)).unwrap();
    }
    s.shutdown();
    drop(s);
    let segs = seg_files(dir.path(), "g");
    assert!(segs.len() >= 3);
    let p = seg_path(dir.path(), "g", segs[0]);
    let rec = (RECORD_HEADER_LEN + 300) as u64;
    let bad_off = SEGMENT_HEADER_LEN as u64 + rec; // frame 2
    let mut bytes = fs::read(&p).unwrap();
    let before = bytes.clone();
    bytes[bad_off as usize + 100] ^= 1;
    fs::write(&p, &bytes).unwrap();

    let (s, report) = open(opts(dir.path(), 4096, direct));
    let gr = report.group("g").unwrap();
    let kinds: Vec<_> = gr.problems.iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        [ProblemKind::BadRecord, ProblemKind::ChainGap],
        "{:?}",
        gr.problems
    );
    assert_eq!(
        (gr.problems[0].file.as_path(), gr.problems[0].offset),
        (p.as_path(), bad_off)
    );
    assert!(
        gr.problems[0].detail.contains("frame 2"),
        "{}",
        gr.problems[0].detail
    );
    assert!(
        gr.problems[1].detail.contains("frame 3 names prev 2"),
        "{}",
        gr.problems[1].detail
    );
    assert_eq!(
        fs::read(&p).unwrap().len(),
        before.len(),
        "older segment left unchanged"
    );
    let mut want: Vec<u64> = (1..=40).collect();
    want.retain(|f| *f != 2);
    assert_eq!(frame_nos(&all(&s, "g")), want);
    assert_eq!(s.head("g").unwrap().frame_no, 40);
    assert_eq!(
        s.append_blocking(req("g", 41, 1)).unwrap(),
        AppendOutcome::Stored
    );
}

both_modes!(corruption_found_on_read_names_file_and_offset);
fn corruption_found_on_read_names_file_and_offset(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 1 << 20, direct));
    for f in 1..=3 {
        s.append_blocking(req("g", f, 50)).unwrap();
    }
    let p = seg_path(dir.path(), "g", 1);
    let mut bytes = fs::read(&p).unwrap();
    let off = SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 50;
    bytes[off + RECORD_HEADER_LEN + 10] ^= 0xff;
    fs::write(&p, &bytes).unwrap();
    assert_eq!(s.read_after("g", 0, usize::MAX, 1).unwrap().len(), 1);
    let e = s.read_after("g", 0, usize::MAX, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let m = e.to_string();
    assert!(
        m.contains(&p.display().to_string()) && m.contains(&format!("offset {off}")),
        "{m}"
    );
}

both_modes!(head_survives_full_trim_and_reopen);
fn head_survives_full_trim_and_reopen(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4096, direct));
    for f in 1..=30 {
        s.append_blocking(req("g", f, 200)).unwrap();
    }
    s.trim_through("g", 30).unwrap();
    assert!(all(&s, "g").is_empty());
    assert_eq!(
        seg_files(dir.path(), "g").len(),
        1,
        "only the active segment is kept"
    );
    assert_eq!(
        s.head("g"),
        Some(SpoolHead {
            frame_no: 30,
            last_seq: 300
        })
    );
    s.shutdown();
    drop(s);

    let (s, report) = open(opts(dir.path(), 4096, direct));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        s.head("g"),
        Some(SpoolHead {
            frame_no: 30,
            last_seq: 300
        })
    );
    assert!(all(&s, "g").is_empty());
    assert_eq!(s.stats("g").unwrap().trimmed_through, 30);
    s.shutdown();
    drop(s);

    // Even with every segment gone, the state file keeps the head.
    for f in seg_files(dir.path(), "g") {
        fs::remove_file(seg_path(dir.path(), "g", f)).unwrap();
    }
    let (s, report) = open(opts(dir.path(), 4096, direct));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        s.head("g"),
        Some(SpoolHead {
            frame_no: 30,
            last_seq: 300
        })
    );
    assert_eq!(
        s.append_blocking(req("g", 30, 5)).unwrap(),
        AppendOutcome::Duplicate
    );
    assert_eq!(
        s.append_blocking(req("g", 31, 5)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(frame_nos(&all(&s, "g")), [31]);
}

both_modes!(lost_acknowledged_frames_are_reported);
fn lost_acknowledged_frames_are_reported(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 1 << 20, direct));
    for f in 1..=10 {
        s.append_blocking(req("g", f, 20)).unwrap();
    }
    s.trim_through("g", 4).unwrap();
    s.shutdown();
    drop(s);
    fs::remove_file(seg_path(dir.path(), "g", 1)).unwrap();
    let (s, report) = open(opts(dir.path(), 1 << 20, direct));
    let gr = report.group("g").unwrap();
    assert_eq!(gr.problems.len(), 1);
    assert_eq!(gr.problems[0].kind, ProblemKind::LostFrames);
    assert!(
        gr.problems[0].detail.contains("frames 5..=10"),
        "{}",
        gr.problems[0].detail
    );
    assert_eq!(s.head("g").unwrap().frame_no, 10);
}

both_modes!(unknown_entries_and_bad_files_are_reported_not_deleted);
fn unknown_entries_and_bad_files_are_reported_not_deleted(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4096, direct));
    for f in 1..=20 {
        s.append_blocking(req("g", f, 300)).unwrap();
    }
    s.shutdown();
    drop(s);
    fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    fs::create_dir(dir.path().join("Bad_Group")).unwrap();
    fs::write(dir.path().join("g").join("junk"), b"x").unwrap();
    let segs = seg_files(dir.path(), "g");
    let first = seg_path(dir.path(), "g", segs[0]);
    let mut b = fs::read(&first).unwrap();
    b[3] ^= 1; // segment magic
    fs::write(&first, &b).unwrap();
    fs::write(dir.path().join("g").join("state"), b"garbage").unwrap();

    let (s, report) = open(opts(dir.path(), 4096, direct));
    assert_eq!(report.problems.len(), 2);
    assert!(dir.path().join("notes.txt").exists() && dir.path().join("Bad_Group").exists());
    let gr = report.group("g").unwrap();
    let kinds: Vec<_> = gr.problems.iter().map(|p| p.kind).collect();
    for k in [
        ProblemKind::UnknownEntry,
        ProblemKind::BadStateFile,
        ProblemKind::BadSegment,
    ] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    assert!(dir.path().join("g").join("junk").exists());
    assert!(PathBuf::from(format!("{}.damaged", first.display())).exists());
    assert!(dir.path().join("g").join("state.damaged").exists());
    assert_eq!(all(&s, "g").first().unwrap().frame_no, segs[1]);
    assert_eq!(s.head("g").unwrap().frame_no, 20);
}

#[test]
fn newer_format_version_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let gdir = dir.path().join("g");
    fs::create_dir(&gdir).unwrap();
    let mut h = record::SegmentHeader {
        version: record::FormatVersion::V1,
        group: "g".into(),
        first_frame_no: 1,
    }
    .encode();
    h[8] = 9;
    let crc = crc32c::crc32c(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    fs::write(gdir.join(segment_file_name(1)), h).unwrap();
    let e = Spool::open(opts(dir.path(), 4096, true)).unwrap_err();
    assert!(
        matches!(e, SpoolError::UnsupportedVersion { version: 9, .. }),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Config);
}

/// A valid three-record segment, for mutation.
fn valid_segment_bytes() -> Vec<u8> {
    let mut v = record::SegmentHeader {
        version: record::FormatVersion::V1,
        group: "g".into(),
        first_frame_no: 1,
    }
    .encode()
    .to_vec();
    for f in 1..=3u64 {
        let p = payload("g", f, 30);
        v.extend(record::RecordHeader::new(f, f - 1, f * 10, &p).encode());
        v.extend(p);
    }
    v
}

fn recover_bytes(bytes: &[u8], also_older: bool, direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let gdir = dir.path().join("g");
    fs::create_dir(&gdir).unwrap();
    if also_older {
        // The same bytes as an older segment too, so non-newest rules run.
        fs::write(gdir.join(segment_file_name(1)), bytes).unwrap();
        fs::write(gdir.join(segment_file_name(1000)), bytes).unwrap();
    } else {
        fs::write(gdir.join(segment_file_name(1)), bytes).unwrap();
    }
    if let Ok((s, _report)) = Spool::open(opts(dir.path(), 4096, direct)) {
        let v = s.read_after("g", 0, usize::MAX, usize::MAX);
        if let Ok(v) = v {
            let head = s.head("g").map_or(0, |h| h.frame_no);
            assert!(v.iter().all(|f| f.frame_no <= head));
            let _ = s.append_blocking(AppendRequest {
                group: "g".into(),
                frame_no: head + 1,
                prev_frame_no: head,
                last_seq: 0,
                bytes: Arc::new(vec![1]),
            });
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_segment_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                           older in any::<bool>(), direct in any::<bool>()) {
        recover_bytes(&bytes, older, direct);
    }

    #[test]
    fn mutated_segments_never_panic(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..6),
                                    cut in 0usize..400, older in any::<bool>(),
                                    direct in any::<bool>(), pad in any::<bool>()) {
        let mut bytes = valid_segment_bytes();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        bytes.truncate(cut.max(SEGMENT_HEADER_LEN));
        if pad {
            bytes.resize(4096, 0);
        }
        recover_bytes(&bytes, older, direct);
    }
}

both_modes!(large_frames_and_oversized_segments_round_trip);
fn large_frames_and_oversized_segments_round_trip(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let size = |f: u64| match f % 3 {
        0 => 100_000,
        1 => 10,
        _ => 300_000, // larger than a segment: gets one of its own
    };
    let (s, _) = open(opts(dir.path(), 256 << 10, direct));
    for f in 1..=12 {
        s.append_blocking(req("big", f, size(f))).unwrap();
    }
    let check = |s: &Spool| {
        let v = all(s, "big");
        assert_eq!(frame_nos(&v), (1..=12).collect::<Vec<_>>());
        v.iter()
            .for_each(|f| check_frame("big", f, size(f.frame_no)));
    };
    check(&s);
    s.shutdown();
    drop(s);
    let (s, report) = open(opts(dir.path(), 256 << 10, direct));
    assert!(report.is_clean(), "{report:?}");
    check(&s);
}

both_modes!(an_interrupted_trim_is_finished_by_the_next_one);
fn an_interrupted_trim_is_finished_by_the_next_one(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4096, direct));
    for f in 1..=40 {
        s.append_blocking(req("g", f, 300)).unwrap();
    }
    s.shutdown();
    drop(s);
    let before = seg_files(dir.path(), "g");
    // Crash after the state file was written, before segments were deleted.
    state::write_state(
        &dir.path().join("g"),
        &state::GroupState {
            trimmed_through: 30,
            head_frame_no: 40,
            head_last_seq: 400,
        },
    )
    .unwrap();
    let (s, report) = open(opts(dir.path(), 4096, direct));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(frame_nos(&all(&s, "g")), (31..=40).collect::<Vec<_>>());
    assert_eq!(
        seg_files(dir.path(), "g"),
        before,
        "recovery deletes nothing"
    );
    s.trim_through("g", 30).unwrap();
    let after = seg_files(dir.path(), "g");
    assert!(after.len() < before.len() && after[0] <= 31, "{after:?}");
    assert_eq!(frame_nos(&all(&s, "g")), (31..=40).collect::<Vec<_>>());
    assert_eq!(s.stats("g").unwrap().segments, after.len());
}

#[test]
fn handle_is_send_sync_and_errors_are_classified() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Spool>();
    let e = SpoolError::QueueFull { depth: 1 };
    assert!(e.kind().is_retryable());
    assert_eq!(SpoolError::Shutdown.kind(), ErrorKind::Shutdown);
    let c = SpoolError::Corrupt {
        file: "/s/g/1.seg".into(),
        offset: 7,
        what: "x".into(),
    };
    assert_eq!(c.kind(), ErrorKind::Corrupt);
    assert!(c.to_string().contains("/s/g/1.seg") && c.to_string().contains("offset 7"));
}

both_modes!(rotation_inside_one_group_commit_keeps_every_record_indexed);
fn rotation_inside_one_group_commit_keeps_every_record_indexed(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 4096, direct);
    o.max_batch_bytes = 64 << 10;
    let (s, _) = open(o.clone());
    // Queue everything before waiting, so batches hold many records and rotate
    // in the middle.
    let rxs: Vec<_> = (1..=300).map(|f| s.append(req("r", f, 500))).collect();
    for rx in rxs {
        assert_eq!(rx.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
    }
    let check = |s: &Spool| {
        let v = all(s, "r");
        assert_eq!(frame_nos(&v), (1..=300).collect::<Vec<_>>());
        v.iter().for_each(|f| check_frame("r", f, 500));
    };
    check(&s);
    let st = s.stats("r").unwrap();
    let segs = seg_files(dir.path(), "r");
    assert_eq!((st.frames, st.segments), (300, segs.len()));
    check_disk_bytes(dir.path(), "r", st.bytes, direct);
    s.shutdown();
    drop(s);
    let (s, report) = open(o);
    assert!(report.is_clean(), "{report:?}");
    check(&s);
}

both_modes!(a_failed_sync_undoes_the_batch_and_the_group_recovers);
fn a_failed_sync_undoes_the_batch_and_the_group_recovers(direct: bool) {
    // The fault plan is process-wide: a group name per mode.
    let g = if direct { "fault-a-d" } else { "fault-a-b" };
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 4096, direct);
    let (s, _) = open(o.clone());
    for f in 1..=3 {
        s.append_blocking(req(g, f, 500)).unwrap();
    }
    let segs_before = seg_files(dir.path(), g);
    let bytes_before = s.total_bytes();
    // The batch of 4..=12 rotates (old segment synced, new one created) and its
    // second sync fails: the new segment must go, the old one shrink back.
    writer::fault::fail_sync(g, 1);
    s.shutdown();
    drop(s);
    let (s, _) = open(o.clone());
    let rxs: Vec<_> = (4..=12).map(|f| s.append(req(g, f, 500))).collect();
    let results: Vec<_> = rxs
        .into_iter()
        .map(|rx| rx.blocking_recv().unwrap())
        .collect();
    let io_failed = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|r| r.kind() == ErrorKind::Io)
        .inspect(|r| assert!(r.to_string().contains("injected fault"), "{r}"))
        .count();
    assert!(io_failed > 0, "{results:?}");
    // Appends that reached the writer after the failed batch do not chain to
    // the head it fell back to: a chain break, which the sender answers by
    // resending from the head.
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            r.kind() == ErrorKind::Io || matches!(r, SpoolError::ChainBreak { .. }),
            "{r}"
        );
    }
    // Whatever was not acknowledged is gone from the index and the disk.
    let stored = results.iter().filter(|r| r.is_ok()).count() as u64;
    let head = s.head(g).unwrap().frame_no;
    assert_eq!(head, 3 + stored);
    assert_eq!(frame_nos(&all(&s, g)), (1..=head).collect::<Vec<_>>());
    if stored == 0 {
        assert_eq!(seg_files(dir.path(), g), segs_before);
        assert_eq!(s.total_bytes(), bytes_before);
    }
    // The sender resends; the group continues.
    for f in head + 1..=12 {
        assert_eq!(
            s.append_blocking(req(g, f, 500)).unwrap(),
            AppendOutcome::Stored
        );
    }
    s.shutdown();
    drop(s);
    let (s, report) = open(o);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(frame_nos(&all(&s, g)), (1..=12).collect::<Vec<_>>());
    all(&s, g).iter().for_each(|f| check_frame(g, f, 500));
}
