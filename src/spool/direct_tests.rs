//! Spool tests of direct I/O: padding, torn direct writes, rewritten tail blocks
//! under concurrent reads, mode switches, the fallback, a random-operations
//! property test, and the CPU measurement (ignored).

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::record::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::tests::{
    all, check_disk_bytes, check_frame, file_len, frame_nos, len_of, open, opts, payload, req,
    seg_files, seg_path, single_segment,
};
use super::*;
use crate::util::prng::Prng;

/// Bytes from `from` to the end of the file are all zero.
fn zeros_from(p: &Path, from: u64) -> bool {
    fs::read(p).unwrap()[from as usize..]
        .iter()
        .all(|&b| b == 0)
}

#[test]
fn padding_is_part_of_the_format_in_newest_and_older_segments() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), 4096, true);
    let rec = (RECORD_HEADER_LEN + 300) as u64;
    let hdr = SEGMENT_HEADER_LEN as u64;
    let (s, _) = open(o.clone());
    for f in 1..=20 {
        s.append_blocking(req("g", f, 300)).unwrap();
    }
    s.shutdown();
    drop(s);
    // 11 records fit in a 4096-byte segment: frames 1..=11, then 12..=20.
    assert_eq!(seg_files(dir.path(), "g"), [1, 12]);
    let (old, new) = (seg_path(dir.path(), "g", 1), seg_path(dir.path(), "g", 12));
    let (old_len, new_len) = (hdr + 11 * rec, hdr + 9 * rec);
    for (p, logical) in [(&old, old_len), (&new, new_len)] {
        assert_eq!(file_len(p), 4096, "{}", p.display());
        assert!(zeros_from(p, logical), "zero padding after the last record");
    }

    let (s, report) = open(o.clone());
    assert!(report.is_clean(), "{report:?}");
    let gr = report.group("g").unwrap();
    assert_eq!(
        (gr.frames, gr.segments, gr.bytes),
        (20, 2, old_len + new_len)
    );
    assert_eq!(s.stats("g").unwrap().bytes, old_len + new_len);
    assert_eq!(file_len(&old), 4096, "padding is not cut");
    assert_eq!(file_len(&new), 4096, "padding is not cut");
    // The writer continues at the logical end of the newest segment.
    for f in 21..=25 {
        s.append_blocking(req("g", f, 300)).unwrap();
    }
    assert_eq!(seg_files(dir.path(), "g"), [1, 12, 23]);
    let v = all(&s, "g");
    assert_eq!(frame_nos(&v), (1..=25).collect::<Vec<_>>());
    v.iter().for_each(|f| check_frame("g", f, 300));
    let lens = [old_len, hdr + 11 * rec, hdr + 3 * rec];
    assert_eq!(s.stats("g").unwrap().bytes, lens.iter().sum::<u64>());
    s.shutdown();
    drop(s);

    let (s, report) = open(o);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.group("g").unwrap().bytes, lens.iter().sum::<u64>());
    let v = all(&s, "g");
    assert_eq!(frame_nos(&v), (1..=25).collect::<Vec<_>>());
    v.iter().for_each(|f| check_frame("g", f, 300));
}

#[test]
fn a_spool_moves_between_direct_and_buffered_io() {
    let dir = tempfile::tempdir().unwrap();
    let size = |f: u64| (f as usize * 911) % 6000;
    let logical = |n: u64| {
        u64::from(n > 0) * SEGMENT_HEADER_LEN as u64
            + (1..=n)
                .map(|f| (RECORD_HEADER_LEN + size(f)) as u64)
                .sum::<u64>()
    };
    let mut head = 0;
    for (round, direct) in [true, false, true, false, true].into_iter().enumerate() {
        let (s, report) = open(opts(dir.path(), 1 << 20, direct));
        assert!(report.is_clean(), "round {round}: {report:?}");
        assert_eq!(s.stats("g").map_or(0, |st| st.bytes), logical(head));
        for f in head + 1..=head + 7 {
            s.append_blocking(req("g", f, size(f))).unwrap();
        }
        head += 7;
        let v = all(&s, "g");
        assert_eq!(frame_nos(&v), (1..=head).collect::<Vec<_>>());
        v.iter().for_each(|f| check_frame("g", f, size(f.frame_no)));
        assert_eq!(s.stats("g").unwrap().bytes, logical(head));
        s.shutdown();
    }
}

#[test]
fn a_torn_direct_write_is_cut() {
    let master = tempfile::tempdir().unwrap();
    let (p, _, end) = single_segment(master.path(), 5, true);
    let orig = fs::read(&p).unwrap();
    assert_eq!(orig.len(), 4096);
    let mut garbage = vec![0u8; 3 * 4096];
    Prng::new(7).fill(&mut garbage);
    let r6 = {
        let pl = payload("g", 6, 100);
        let mut v = record::RecordHeader::new(6, 5, 60, &pl).encode().to_vec();
        v.extend(pl);
        v
    };
    let end = end as usize;
    // (name, file bytes, where the cut is expected, frames kept)
    let mut cases: Vec<(&str, Vec<u8>, usize, u64)> = Vec::new();
    let mut b = orig.clone();
    b[end..].copy_from_slice(&garbage[..4096 - end]);
    cases.push(("garbage in the padded last block", b, end, 5));
    let mut b = orig[..end].to_vec();
    b.extend_from_slice(&garbage[..3 * 4096 - end]);
    cases.push(("garbage over blocks past the old end", b, end, 5));
    let mut b = orig.clone();
    b[end..end + 90].copy_from_slice(&r6[..90]);
    cases.push(("a record cut short, zeros after it", b, end, 5));
    let mut b = orig.clone();
    b[end..end + r6.len()].copy_from_slice(&r6);
    b[end + r6.len()..].copy_from_slice(&garbage[..4096 - end - r6.len()]);
    cases.push(("a whole record, then garbage", b, end + r6.len(), 6));
    for (name, bytes, cut_at, n) in cases {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("g")).unwrap();
        let sp = seg_path(dir.path(), "g", 1);
        fs::write(&sp, &bytes).unwrap();
        let (s, report) = open(opts(dir.path(), 1 << 20, true));
        let gr = report.group("g").unwrap();
        assert!(gr.problems.is_empty(), "{name}: {:?}", gr.problems);
        assert_eq!(gr.torn_tails.len(), 1, "{name}");
        let t = &gr.torn_tails[0];
        assert_eq!(
            (t.offset, t.bytes_cut),
            (cut_at as u64, (bytes.len() - cut_at) as u64),
            "{name}"
        );
        assert_eq!(file_len(&sp), cut_at as u64, "{name}");
        let v = all(&s, "g");
        assert_eq!(frame_nos(&v), (1..=n).collect::<Vec<_>>(), "{name}");
        assert_eq!(
            s.append_blocking(req("g", n + 1, 33)).unwrap(),
            AppendOutcome::Stored
        );
        s.shutdown();
        drop(s);
        let (s, report) = open(opts(dir.path(), 1 << 20, true));
        assert!(report.is_clean(), "{name}: {report:?}");
        assert_eq!(frame_nos(&all(&s, "g")), (1..=n + 1).collect::<Vec<_>>());
        assert_eq!(file_len(&sp) % 4096, 0, "{name}: padded again");
    }
}

#[test]
fn records_across_blocks_and_in_a_rewritten_tail_block_read_back() {
    // Every append is its own batch, so the segment's last block is rewritten
    // each time while a reader keeps reading everything, including the record
    // in that block.
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4 << 20, true));
    let size = |f: u64| (f as usize * 1733) % 9000;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut rounds = 0u32;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || rounds == 0 {
                let v = all(&s, "t");
                for (i, f) in v.iter().enumerate() {
                    assert_eq!(f.frame_no, i as u64 + 1);
                    check_frame("t", f, size(f.frame_no));
                }
                rounds += 1;
            }
        });
        for f in 1..=300 {
            s.append_blocking(req("t", f, size(f))).unwrap();
            let last = s.read_after("t", f - 1, usize::MAX, 1).unwrap();
            assert_eq!(frame_nos(&last), [f]);
            check_frame("t", &last[0], size(f));
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let v = all(&s, "t");
    assert_eq!(frame_nos(&v), (1..=300).collect::<Vec<_>>());
    v.iter().for_each(|f| check_frame("t", f, size(f.frame_no)));
}

#[test]
fn falls_back_to_buffered_io_when_direct_io_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    dio::fault::refuse(dir.path());
    let o = opts(dir.path(), 4096, true);
    let (s, report) = Spool::open(o.clone()).unwrap();
    assert!(report.is_clean());
    assert!(!s.direct_io(), "the probe failed: buffered I/O");
    for f in 1..=30 {
        s.append_blocking(req("g", f, len_of(f))).unwrap();
    }
    let v = all(&s, "g");
    assert_eq!(frame_nos(&v), (1..=30).collect::<Vec<_>>());
    v.iter()
        .for_each(|f| check_frame("g", f, len_of(f.frame_no)));
    check_disk_bytes(dir.path(), "g", s.stats("g").unwrap().bytes, false);
    s.shutdown();
    drop(s);
    assert!(!dir.path().join(dio::PROBE_FILE).exists());
    let (s, report) = Spool::open(o).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(!s.direct_io());
    assert_eq!(all(&s, "g").len(), 30);

    // Turned off by option: no probe, buffered.
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(opts(dir.path(), 4096, false));
    assert!(!s.direct_io());
}

#[test]
fn a_leftover_probe_file_is_not_an_unknown_entry() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(dio::PROBE_FILE), b"crashed mid-probe").unwrap();
    for direct in [false, true] {
        let (s, report) = open(opts(dir.path(), 4096, direct));
        assert!(report.is_clean(), "{report:?}");
        drop(s);
    }
    assert!(!dir.path().join(dio::PROBE_FILE).exists());
}

#[derive(Debug, Clone)]
enum Op {
    /// Queue this many appends at once (group commits), payload size seed.
    Append(u8, u16),
    /// Trim through head minus this.
    Trim(u8),
    /// Clean restart in direct (true) or buffered mode.
    Reopen(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..24, any::<u16>()).prop_map(|(n, z)| Op::Append(n, z)),
        1 => (0u8..40).prop_map(Op::Trim),
        1 => any::<bool>().prop_map(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_appends_trims_and_restarts_read_back_what_was_appended(
        ops in proptest::collection::vec(op(), 1..24),
        segment_bytes in 4096u64..24_000,
        direct in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(opts(dir.path(), segment_bytes, direct));
        let mut sizes: std::collections::BTreeMap<u64, usize> = Default::default();
        let (mut head, mut trimmed) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Append(n, z) => {
                    let rxs: Vec<_> = (head + 1..=head + u64::from(n))
                        .map(|f| {
                            let len = (usize::from(z) * f as usize) % 7000;
                            sizes.insert(f, len);
                            s.append(req("p", f, len))
                        })
                        .collect();
                    for rx in rxs {
                        prop_assert_eq!(rx.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
                    }
                    head += u64::from(n);
                }
                Op::Trim(back) => {
                    let t = head.saturating_sub(u64::from(back));
                    s.trim_through("p", t).unwrap();
                    trimmed = trimmed.max(t);
                }
                Op::Reopen(d) => {
                    s.shutdown();
                    drop(s);
                    let (s2, report) = open(opts(dir.path(), segment_bytes, d));
                    prop_assert!(report.is_clean(), "{:?}", report);
                    s = s2;
                }
            }
            let v = all(&s, "p");
            prop_assert_eq!(frame_nos(&v), (trimmed + 1..=head).collect::<Vec<_>>());
            for f in &v {
                check_frame("p", f, sizes[&f.frame_no]);
            }
            prop_assert_eq!(s.head("p").map_or(0, |h| h.frame_no), head);
        }
    }
}

/// Measurement, not a test: CPU time per appended byte in both modes, with
/// and without recycled segment files (1 GiB of 2 MiB frames, group commit,
/// trimmed as it goes). Run with
/// `cargo nextest run --run-ignored only measure_append_cpu --no-capture`
/// (`SPOOL_MEASURE_DIR` picks the directory; default the temp dir).
#[test]
#[ignore = "measurement; prints CPU time per byte"]
fn measure_append_cpu_per_byte() {
    use nix::sys::resource::{UsageWho, getrusage};
    const FRAME: usize = 2 << 20;
    const TOTAL: usize = 1 << 30;
    const IN_FLIGHT: usize = 16;
    let cpu = || {
        let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
        (t(u.user_time()), t(u.system_time()))
    };
    let frames: Vec<Arc<Vec<u8>>> = (0..4).map(|i| Arc::new(payload("m", i, FRAME))).collect();
    let base = std::env::var_os("SPOOL_MEASURE_DIR").map(PathBuf::from);
    for (direct, recycle) in [
        (false, 0),
        (false, DEFAULT_RECYCLE_SEGMENTS),
        (true, 0),
        (true, DEFAULT_RECYCLE_SEGMENTS),
        (false, 0),
        (false, DEFAULT_RECYCLE_SEGMENTS),
        (true, 0),
        (true, DEFAULT_RECYCLE_SEGMENTS),
    ] {
        let dir = match &base {
            Some(b) => tempfile::tempdir_in(b).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let mut o = SpoolOptions::new(dir.path());
        o.direct_io = direct;
        o.recycle_segments = recycle;
        let (s, _) = open(o);
        let n = (TOTAL / FRAME) as u64;
        let (u0, s0) = cpu();
        let t0 = std::time::Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        let mut acked = 0u64;
        for f in 1..=n {
            inflight.push_back(s.append(AppendRequest {
                group: "m".into(),
                frame_no: f,
                prev_frame_no: f - 1,
                last_seq: f,
                bytes: Arc::clone(&frames[f as usize % frames.len()]),
            }));
            while inflight.len() >= IN_FLIGHT {
                let rx = inflight.pop_front().unwrap();
                assert_eq!(rx.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
                acked += 1;
                if acked.is_multiple_of(32) {
                    s.trim_through("m", acked).unwrap();
                }
            }
        }
        for rx in inflight {
            assert_eq!(rx.blocking_recv().unwrap().unwrap(), AppendOutcome::Stored);
        }
        let wall = t0.elapsed().as_secs_f64();
        let (u1, s1) = cpu();
        let per = |secs: f64| secs * 1e9 / TOTAL as f64;
        println!(
            "{}, recycle {recycle}: {:.3} ns/byte CPU (user {:.3}, sys {:.3}); {:.2} s CPU, {:.2} s wall, {:.0} MiB/s",
            if direct { "direct  " } else { "buffered" },
            per(u1 - u0 + s1 - s0),
            per(u1 - u0),
            per(s1 - s0),
            u1 - u0 + s1 - s0,
            wall,
            TOTAL as f64 / wall / (1 << 20) as f64,
        );
        s.shutdown();
    }
}
