//! Tests of `diff`, the plan's chunking and the progress file.

// One-range region lists (`&[0..20]`) are what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::resync::digest::BlockDigest::{Absent, Hash, Zero};

fn plan(regions: &[Range<u64>], chunk_blocks: u32) -> ResyncPlan {
    ResyncPlan::new(
        2,
        100 * 65536 + 10,
        BlockSize::DEFAULT,
        regions,
        chunk_blocks,
    )
    .unwrap()
}

#[test]
fn diff_merges_runs_and_treats_absent_as_zero() {
    let h = |b| Hash([b; 32]);
    let src = [Absent, Zero, h(1), h(2), h(3), Zero, h(5), Absent];
    let dst = [Zero, Absent, h(9), h(9), h(3), h(0), h(5), h(7)];
    assert_eq!(
        diff(100, &src, &dst).unwrap(),
        vec![102..104, 105..106, 107..108]
    );
    assert_eq!(diff(0, &src, &src).unwrap(), vec![]);
    assert_eq!(diff(0, &[], &[]).unwrap(), vec![]);
    assert_eq!(diff(5, &[h(1); 4], &[Zero; 4]).unwrap(), vec![5..9]);
}

#[test]
fn diff_refuses_mismatched_lengths_and_overflow() {
    assert_eq!(
        diff(0, &[Zero], &[]),
        Err(DiffError::LengthMismatch {
            source_len: 1,
            target_len: 0
        })
    );
    assert!(matches!(
        diff(u64::MAX, &[Zero, Zero], &[Zero, Zero]),
        Err(DiffError::Overflow { .. })
    ));
    assert_eq!(diff(u64::MAX, &[], &[]).unwrap(), vec![]);
}

#[test]
fn plan_normalizes_and_cuts_regions() {
    let p = plan(&[40..45, 0..3, 2..10, 10..12, 50..50, 60..61], 4);
    assert_eq!(p.regions(), &[0..12, 40..45, 60..61]);
    assert_eq!(p.block_count(), 18);
    let chunks: Vec<_> = (0..p.chunk_count())
        .map(|i| p.chunk(i).unwrap().blocks())
        .collect();
    assert_eq!(chunks, vec![0..4, 4..8, 8..12, 40..44, 44..45, 60..61]);
    assert_eq!(p.chunk(6), None);
    assert_eq!(p.chunk(u64::MAX), None);
    // The disk has 101 blocks (the last one short).
    plan(&[100..101], 1);
    assert!(matches!(
        ResyncPlan::new(0, 100 * 65536 + 10, BlockSize::DEFAULT, &[99..102], 8),
        Err(ProgressError::RegionOutsideDisk {
            disk_blocks: 101,
            ..
        })
    ));
    for bad in [0, MAX_CHUNK_BLOCKS + 1] {
        assert!(matches!(
            ResyncPlan::new(0, 1 << 20, BlockSize::DEFAULT, &[0..1], bad),
            Err(ProgressError::BadChunkBlocks { .. })
        ));
    }
    // 2^40 chunks would need a 128 GiB bitmap: refused, not allocated.
    let huge = ResyncPlan::new(0, u64::MAX, BlockSize::new(4096).unwrap(), &[0..1 << 40], 1);
    assert!(matches!(huge, Err(ProgressError::PlanTooLarge { chunks, .. }) if chunks == 1 << 40));
    let empty = plan(&[], 8);
    assert_eq!(empty.chunk_count(), 0);
    assert!(ResyncProgress::new(empty).is_done());
}

#[test]
fn next_chunk_mark_done_rewind() {
    let mut pr = ResyncProgress::new(plan(&[0..10], 3));
    let a = pr.next_chunk().unwrap();
    let b = pr.next_chunk().unwrap();
    assert_eq!((a.index, a.first_block, a.count), (0, 0, 3));
    assert_eq!((b.index, b.blocks()), (1, 3..6));
    assert!(pr.mark_done(1).unwrap());
    assert!(!pr.mark_done(1).unwrap());
    assert!(matches!(
        pr.mark_done(4),
        Err(ProgressError::NoSuchChunk {
            index: 4,
            chunks: 4
        })
    ));
    assert_eq!(pr.next_chunk().unwrap().index, 2);
    assert_eq!(pr.next_chunk().unwrap().blocks(), 9..10);
    assert_eq!(pr.next_chunk(), None);
    assert_eq!(pr.next_chunk(), None);
    // Chunk 0 was handed out but never finished: a rewind hands it out again.
    pr.rewind();
    let again: Vec<u64> = std::iter::from_fn(|| pr.next_chunk())
        .map(|c| c.index)
        .collect();
    assert_eq!(again, vec![0, 2, 3]);
    for i in [0, 2, 3] {
        pr.mark_done(i).unwrap();
    }
    assert!(pr.is_done());
    assert_eq!(pr.done_chunks(), 4);
    pr.rewind();
    assert_eq!(pr.next_chunk(), None);
}

#[test]
fn next_chunk_skips_whole_done_words() {
    let mut pr = ResyncProgress::new(plan(&[0..101], 1));
    for i in 0..100 {
        pr.mark_done(i).unwrap();
    }
    assert_eq!(pr.next_chunk().unwrap().index, 100);
    assert_eq!(pr.next_chunk(), None);
}

#[test]
fn save_and_load_resume() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resync-2.progress");
    let p = plan(&[0..20, 30..90], 7);
    let mut pr = ResyncProgress::new(p.clone());
    let e = ResyncProgress::load(&path, p.clone()).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    for i in [0, 3, 4, 11] {
        pr.mark_done(i).unwrap();
    }
    pr.save(&path).unwrap();
    pr.mark_done(5).unwrap();
    pr.save(&path).unwrap();
    assert!(!dir.path().join("resync-2.progress.tmp").exists());
    let mut back = ResyncProgress::load(&path, p).unwrap();
    assert_eq!(back.done_chunks(), 5);
    let left: Vec<u64> = std::iter::from_fn(|| back.next_chunk())
        .map(|c| c.index)
        .collect();
    assert_eq!(left, vec![1, 2, 6, 7, 8, 9, 10]);
    assert!(back.is_chunk_done(11) && !back.is_chunk_done(12) && !back.is_chunk_done(99));
}

#[test]
fn a_file_for_another_plan_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let bs = BlockSize::DEFAULT;
    let size = 100 * 65536 + 10;
    let mut pr = ResyncProgress::new(plan(&[0..20, 30..90], 7));
    pr.mark_done(2).unwrap();
    pr.save(&path).unwrap();
    let others = [
        (
            ResyncPlan::new(3, size, bs, &[0..20, 30..90], 7),
            "disk is 2 in the file, 3 now",
        ),
        (
            ResyncPlan::new(2, size + 1, bs, &[0..20, 30..90], 7),
            "disk_size",
        ),
        (
            ResyncPlan::new(2, size, BlockSize::new(4096).unwrap(), &[0..20, 30..90], 7),
            "block_size is 65536 in the file, 4096 now",
        ),
        (
            ResyncPlan::new(2, size, bs, &[0..20, 30..90], 8),
            "chunk_blocks",
        ),
        (ResyncPlan::new(2, size, bs, &[0..20], 7), "region_count"),
        (
            ResyncPlan::new(2, size, bs, &[0..20, 31..91], 7),
            "regions is 30..90 (region 1)",
        ),
    ];
    for (other, want) in others {
        let e = ResyncProgress::load(&path, other.unwrap()).unwrap_err();
        assert!(matches!(e, ProgressError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }
}

#[test]
fn a_damaged_file_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p = plan(&[0..20, 30..90], 7);
    let mut pr = ResyncProgress::new(p.clone());
    pr.mark_done(2).unwrap();
    let good = pr.encode();
    // Every single-byte flip and every truncation is caught.
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x40;
        fs::write(&path, &b).unwrap();
        let e = ResyncProgress::load(&path, p.clone()).unwrap_err();
        assert!(matches!(e, ProgressError::Corrupt { .. }), "byte {i}: {e}");
    }
    for n in 0..good.len() {
        fs::write(&path, &good[..n]).unwrap();
        assert!(matches!(
            ResyncProgress::load(&path, p.clone()),
            Err(ProgressError::Corrupt { .. })
        ));
    }
    let mut long = good.clone();
    long.push(0);
    fs::write(&path, &long).unwrap();
    let e = ResyncProgress::load(&path, p.clone()).unwrap_err();
    assert!(e.to_string().contains("region_count at byte 24"), "{e}");
    // Intact CRC but inconsistent content.
    let reseal = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good[..good.len() - 4].to_vec();
        f(&mut b);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    };
    for (b, want) in [
        (reseal(&|b| b[40] = 9), "done_count at byte 40"),
        (reseal(&|b| *b.last_mut().unwrap() = 0x80), "done bitmap"),
        (reseal(&|b| b[4] = 2), "version at byte 4"),
        (reseal(&|b| b[0] = 0), "magic at byte 0"),
    ] {
        fs::write(&path, &b).unwrap();
        let e = ResyncProgress::load(&path, p.clone()).unwrap_err();
        assert!(e.to_string().contains(want), "{e} lacks {want:?}");
    }
    assert!(ResyncProgress::load(&path, p).is_err());
}

fn regions_strategy() -> impl Strategy<Value = (Vec<Range<u64>>, u32)> {
    (
        proptest::collection::vec((0u64..500, 0u64..80), 0..8),
        1u32..20,
    )
        .prop_map(|(rs, cb)| (rs.into_iter().map(|(s, l)| s..s + l).collect(), cb))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn marking_in_any_order_and_reloading_keeps_the_set(
        (regions, chunk_blocks) in regions_strategy(),
        picks in proptest::collection::vec(any::<u64>(), 0..60),
    ) {
        let bs = BlockSize::new(4096).unwrap();
        let p = ResyncPlan::new(1, 600 * 4096 - 1, bs, &regions, chunk_blocks).unwrap();
        // Chunks cover exactly the regions' blocks, in order, without overlap.
        let mut covered = Vec::new();
        for i in 0..p.chunk_count() {
            let c = p.chunk(i).unwrap();
            prop_assert!(c.count >= 1 && c.count <= chunk_blocks);
            covered.extend(c.blocks());
        }
        let mut want: Vec<u64> = regions.iter().flat_map(|r| r.clone()).collect();
        want.sort_unstable();
        want.dedup();
        prop_assert_eq!(covered, want);

        let mut pr = ResyncProgress::new(p.clone());
        let mut marked = BTreeSet::new();
        for x in picks {
            if p.chunk_count() == 0 {
                break;
            }
            let i = x % p.chunk_count();
            prop_assert_eq!(pr.mark_done(i).unwrap(), marked.insert(i));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        pr.save(&path).unwrap();
        let mut back = ResyncProgress::load(&path, p.clone()).unwrap();
        prop_assert_eq!(&back, &pr);
        let done: BTreeSet<u64> =
            (0..p.chunk_count()).filter(|&i| back.is_chunk_done(i)).collect();
        prop_assert_eq!(&done, &marked);
        let left: BTreeSet<u64> = std::iter::from_fn(|| back.next_chunk()).map(|c| c.index).collect();
        let all: BTreeSet<u64> = (0..p.chunk_count()).collect();
        prop_assert_eq!(left, all.difference(&marked).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(back.is_done(), marked.len() as u64 == p.chunk_count());
    }
}
