//! Tests of the retention journal format, the writer and scanner, and of
//! before-images read back through the overlay.

use proptest::prelude::*;

use super::journal::{
    self, BLOCK, JournalError, Loc, PointKind, PointRec, RecordHead, Scanner, Writer,
    decode_header, encode_image_header, encode_point, encode_segment_header,
};
use super::pins::Granted;
use super::reader::Overlay;

fn point(epoch: u64, frame_no: u64, tag: Option<&str>) -> PointRec {
    PointRec {
        epoch,
        frame_no,
        last_seq: frame_no * 10,
        time_us: 1_700_000_000_000_000 + frame_no,
        kind: if tag.is_some() {
            PointKind::App
        } else {
            PointKind::Crash
        },
        tag: tag.map(str::to_string),
    }
}

#[test]
fn golden_segment_header() {
    let h = encode_segment_header(1, "g1");
    let mut want = [0u8; 64];
    want[..8].copy_from_slice(b"TMRJSEG1");
    want[8] = 1;
    want[16] = 1;
    want[24] = b'g';
    want[25] = b'1';
    let crc = crc32c::crc32c(&want[..60]);
    want[60..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(h, want);
    journal::check_segment_header(&h, 1, "g1", std::path::Path::new("x")).unwrap();
    assert!(journal::check_segment_header(&h, 2, "g1", std::path::Path::new("x")).is_err());
    assert!(journal::check_segment_header(&h, 1, "g2", std::path::Path::new("x")).is_err());
}

#[test]
fn golden_point_and_image_records() {
    let p = point(3, 7, Some("db"));
    let rec = encode_point(&p);
    assert_eq!(rec.len(), 48 + 8 + 2);
    assert_eq!(&rec[..4], b"TMRR");
    assert_eq!(rec[4], 1, "kind point");
    assert_eq!(rec[5], 1, "version");
    assert_eq!(u16::from_le_bytes([rec[6], rec[7]]), 1, "app");
    assert_eq!(u64::from_le_bytes(rec[8..16].try_into().unwrap()), 3);
    assert_eq!(u64::from_le_bytes(rec[16..24].try_into().unwrap()), 7);
    assert_eq!(u64::from_le_bytes(rec[24..32].try_into().unwrap()), 70);
    assert_eq!(&rec[32..36], &[0; 4]);
    assert_eq!(u32::from_le_bytes(rec[40..44].try_into().unwrap()), 10);
    assert_eq!(&rec[56..], b"db");
    let (head, len) = decode_header(&rec[..48]).unwrap();
    assert_eq!(len, 10);
    let RecordHead::Point(hp) = head else {
        panic!()
    };
    let crc = u32::from_le_bytes(rec[36..40].try_into().unwrap());
    assert_eq!(journal::finish_point(hp, &rec[48..], crc).unwrap(), p);

    let data = vec![0xa5u8; 8192];
    let h = encode_image_header(4, 2, 4096 * 3, 8192, Some(&data));
    assert_eq!(h[4], 2);
    let (head, len) = decode_header(&h).unwrap();
    assert_eq!(len, 8192);
    assert_eq!(
        head,
        RecordHead::Image {
            epoch: 4,
            disk: 2,
            offset: 12288,
            len: 8192,
            zero: false,
            data_crc: crc32c::crc32c(&data),
        }
    );
    let z = encode_image_header(4, 2, 0, 4096, None);
    assert_eq!(z[4], 3);
    assert!(matches!(
        decode_header(&z).unwrap(),
        (RecordHead::Image { zero: true, .. }, 0)
    ));
}

#[test]
fn bad_headers_are_refused_with_a_reason() {
    let good = encode_image_header(1, 0, 4096, 4096, None);
    let cases: Vec<(usize, u8, &str)> = vec![
        (0, b'X', "magic"),
        (4, 9, "kind"),
        (5, 2, "version"),
        (44, 0, "checksum"),
    ];
    for (i, v, what) in cases {
        let mut h = good;
        h[i] = v;
        let e = decode_header(&h).unwrap_err();
        assert!(e.contains(what) || e.contains("checksum"), "{what}: {e}");
    }
    // A misaligned image (with a valid checksum) is refused for its content.
    let h = encode_image_header(1, 0, 100, 4096, None);
    assert!(decode_header(&h).unwrap_err().contains("multiple"));
    assert!(decode_header(&good[..40]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = decode_header(&bytes);
        let _ = journal::check_segment_header(&bytes, 1, "g1", std::path::Path::new("x"));
    }

    #[test]
    fn mutated_records_never_panic_and_never_decode_to_something_else(
        at in 0usize..48, bit in 0u8..8
    ) {
        let good = encode_image_header(5, 1, 8192, 4096, Some(&[7u8; 4096]));
        let mut h = good;
        h[at] ^= 1 << bit;
        // A flipped bit is caught by the header checksum.
        prop_assert!(decode_header(&h).is_err());
    }
}

#[test]
fn writer_and_scanner_round_trip_across_segments_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("retention");
    let (mut w, opened) = Writer::open(&dir, "g1").unwrap();
    assert!(opened.points.is_empty());
    let l1 = w.append_point(&point(1, 5, None)).unwrap();
    let img = vec![3u8; 4096];
    w.append_image(1, 0, 0, &img).unwrap();
    w.append_image(1, 0, 4096, &[0u8; 4096]).unwrap();
    w.sync().unwrap();
    drop(w);
    let (mut w, opened) = Writer::open(&dir, "g1").unwrap();
    assert_eq!(opened.points, vec![(l1, point(1, 5, None))]);
    assert!(opened.torn.is_none());
    w.append_point(&point(2, 9, Some("t"))).unwrap();
    let mut sc = Scanner::new(&dir, "g1", l1);
    let mut kinds = Vec::new();
    while let Some(r) = sc.next_record().unwrap() {
        kinds.push(match r.head {
            RecordHead::Point(p) => format!("p{}", p.epoch),
            RecordHead::Image { zero, .. } => (if zero { "z" } else { "i" }).to_string(),
        });
    }
    assert_eq!(kinds, ["p1", "i", "z", "p2"]);
}

#[test]
fn a_torn_tail_is_cut_at_open_and_reads_as_the_end_meanwhile() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("retention");
    let (mut w, _) = Writer::open(&dir, "g1").unwrap();
    let l1 = w.append_point(&point(1, 5, None)).unwrap();
    w.append_image(1, 0, 0, &vec![9u8; 8192]).unwrap();
    w.sync().unwrap();
    let end = w.end();
    drop(w);
    // Half a record at the end (a crash mid-append).
    let seg = dir.join(journal::segment_name(1));
    let partial = encode_image_header(1, 0, 8192, 4096, Some(&[1u8; 4096]));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&partial).unwrap();
        f.write_all(&[1u8; 100]).unwrap();
    }
    // A reader sees the end before it.
    let mut sc = Scanner::new(&dir, "g1", l1);
    let mut n = 0;
    while sc.next_record().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 2);
    let (w, opened) = Writer::open(&dir, "g1").unwrap();
    let (_, at, cut) = opened.torn.expect("torn tail reported");
    assert_eq!((at, cut), (end.pos, 48 + 100));
    assert_eq!(w.end(), end);
}

#[test]
fn a_tail_record_whose_data_never_reached_the_disk_is_cut_at_open() {
    // A power cut during an unsynced append: the record's header and full
    // length are on disk, its data is zeros. It is not a before-image.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("retention");
    let (mut w, _) = Writer::open(&dir, "g1").unwrap();
    w.append_point(&point(1, 5, None)).unwrap();
    w.append_image(1, 0, 0, &vec![9u8; 8192]).unwrap();
    w.sync().unwrap();
    let end = w.end();
    drop(w);
    let seg = dir.join(journal::segment_name(1));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&encode_image_header(1, 0, 8192, 4096, Some(&[1u8; 4096])))
            .unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
    }
    let (w, opened) = Writer::open(&dir, "g1").unwrap();
    let (_, at, cut) = opened.torn.expect("the record is cut as a torn tail");
    assert_eq!((at, cut), (end.pos, 48 + 4096));
    assert_eq!(w.end(), end);
    assert!(opened.problems.is_empty(), "{:?}", opened.problems);
}

#[test]
fn corruption_in_an_older_segment_drops_the_points_before_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("retention");
    {
        let (mut w, _) = Writer::open(&dir, "g1").unwrap();
        w.append_point(&point(1, 1, None)).unwrap();
        w.append_image(1, 0, 0, &vec![1u8; 4096]).unwrap();
        w.reset_for_test_rotation().unwrap();
        w.append_point(&point(2, 2, None)).unwrap();
        w.sync().unwrap();
    }
    // Damage the first segment's image record header.
    let seg1 = dir.join(journal::segment_name(1));
    let mut b = std::fs::read(&seg1).unwrap();
    let first_rec = 64 + 48 + 8;
    b[first_rec + 2] ^= 0xff;
    std::fs::write(&seg1, b).unwrap();
    let (_, opened) = Writer::open(&dir, "g1").unwrap();
    assert_eq!(opened.problems.len(), 1, "{:?}", opened.problems);
    assert!(
        opened.problems[0].contains("offset"),
        "{:?}",
        opened.problems
    );
    assert_eq!(
        opened
            .points
            .iter()
            .map(|(_, p)| p.epoch)
            .collect::<Vec<_>>(),
        vec![2]
    );
}

/// The overlay rebuilds a point from the replica and the before-images, also
/// when the replica changes after the overlay was made.
#[test]
fn the_overlay_replaces_changed_blocks_with_their_first_before_image() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("retention");
    let (mut w, _) = Writer::open(&dir, "g1").unwrap();
    // Replica at point 1: blocks 0..4 = 1, 2, 3, 4.
    let mut replica: Vec<u8> = (0..4u8).flat_map(|v| vec![v + 1; BLOCK as usize]).collect();
    let at_p1 = replica.clone();
    let l1 = w.append_point(&point(1, 10, None)).unwrap();
    // Epoch 1 overwrites block 1 (image 2).
    w.append_image(1, 0, BLOCK, &replica[BLOCK as usize..2 * BLOCK as usize])
        .unwrap();
    replica[BLOCK as usize..2 * BLOCK as usize].fill(20);
    // Point 2, epoch 2 overwrites blocks 1 and 2 (images 20, 3).
    w.append_point(&point(2, 20, None)).unwrap();
    w.append_image(2, 0, BLOCK, &replica[BLOCK as usize..3 * BLOCK as usize])
        .unwrap();
    replica[BLOCK as usize..3 * BLOCK as usize].fill(30);
    w.sync().unwrap();
    let g = Granted {
        epoch: 1,
        seg: l1.seg,
        pos: l1.pos,
        frame_no: 10,
        last_seq: 100,
        time_us: 0,
    };
    let mut o = Overlay::new(&dir, "g1", &g).unwrap();
    let mut buf = replica.clone();
    o.apply(0, 0, &mut buf).unwrap();
    assert_eq!(buf, at_p1, "point 1 rebuilt");
    // Later: epoch 3 zeroes block 3 after the overlay was made.
    w.append_point(&point(3, 30, None)).unwrap();
    w.append_image(3, 0, 3 * BLOCK, &replica[3 * BLOCK as usize..])
        .unwrap();
    replica[3 * BLOCK as usize..].fill(0);
    w.sync().unwrap();
    let mut buf = replica.clone();
    o.apply(0, 0, &mut buf).unwrap();
    assert_eq!(buf, at_p1, "point 1 rebuilt after more changes");
    // A part of a block.
    let mut part = replica[BLOCK as usize + 100..BLOCK as usize + 200].to_vec();
    o.apply(0, BLOCK + 100, &mut part).unwrap();
    assert_eq!(part, at_p1[BLOCK as usize + 100..BLOCK as usize + 200]);
    assert_eq!(o.changed_ranges(0), vec![(BLOCK, 3 * BLOCK)]);
    // Another disk is untouched.
    let mut other = vec![5u8; 4096];
    o.apply(1, 0, &mut other).unwrap();
    assert_eq!(other, vec![5u8; 4096]);
}

#[test]
fn a_trimmed_segment_is_reported_to_a_reader() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("retention");
    let (mut w, _) = Writer::open(&dir, "g1").unwrap();
    let l1 = w.append_point(&point(1, 1, None)).unwrap();
    w.reset().unwrap();
    let mut sc = Scanner::new(&dir, "g1", l1);
    assert!(matches!(
        sc.next_record(),
        Err(JournalError::Trimmed { seg: 1 })
    ));
    let _ = Loc::default();
}

/// Before-images as a map: (epoch, disk, block) -> the block's bytes (the
/// last block of a disk may be short), from every image record of the
/// journal in `dir`. Panics if a block has two images in one epoch.
fn images_by_block(dir: &std::path::Path) -> std::collections::BTreeMap<(u64, u16, u64), Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let first = journal::list_segments(dir).unwrap()[0];
    let mut sc = Scanner::new(dir, "g1", Loc { seg: first, pos: 0 });
    while let Some(r) = sc.next_record().unwrap() {
        let RecordHead::Image {
            epoch,
            disk,
            offset,
            len,
            zero,
            data_crc,
        } = r.head
        else {
            continue;
        };
        let mut data = vec![0u8; len as usize];
        if !zero {
            journal::read_image(dir, r.loc.seg, r.data_pos, data_crc, &mut data).unwrap();
        }
        for (i, block) in data.chunks(BLOCK as usize).enumerate() {
            let key = (epoch, disk, offset / BLOCK + i as u64);
            assert!(
                out.insert(key, block.to_vec()).is_none(),
                "block {key:?} preserved twice in one epoch"
            );
        }
    }
    out
}

/// The per-run path `Retention::preserve` had before it batched its reads
/// and appends: ranges in frame order, one `read_at` and one `append_image`
/// per run of unpreserved blocks (at most one record long).
fn preserve_per_run(
    w: &mut Writer,
    bm: &mut crate::capture::bitmap::RegionBitmap,
    epoch: u64,
    disk: u16,
    img: &mut dyn crate::image::Image,
    ranges: &[(u64, u64)],
) {
    let size = img.size();
    let blocks = size.div_ceil(BLOCK);
    let max_blocks = u64::from(journal::MAX_RECORD_DATA) / BLOCK;
    for &(off, len) in ranges {
        if len == 0 {
            continue;
        }
        let b1 = off.saturating_add(len).div_ceil(BLOCK).min(blocks);
        let mut b = off / BLOCK;
        while b < b1 {
            if bm.get(b) {
                b += 1;
                continue;
            }
            let mut e = b + 1;
            while e < b1 && e - b < max_blocks && !bm.get(e) {
                e += 1;
            }
            let (start, end) = (b * BLOCK, (e * BLOCK).min(size));
            let mut buf = vec![0u8; (end - start) as usize];
            img.read_at(start, &mut buf).unwrap();
            w.append_image(epoch, disk, start, &buf).unwrap();
            bm.set_range(b, e);
            b = e;
        }
    }
}

/// One frame of the test: ranges (offset, len) and what is written there
/// (`None`: zeros).
type Frame = Vec<(u64, u64, Option<Vec<u8>>)>;

/// Frames of many scattered 4 KiB writes, with unaligned small writes, long
/// ranges (several records), zero ranges, writes of zeros, overlaps inside a
/// frame, and the disk's short last block.
fn scattered_frames(rng: &mut crate::util::prng::Prng, size: u64, frames: usize) -> Vec<Frame> {
    (0..frames)
        .map(|_| {
            let mut f: Frame = (0..200 + rng.below(400))
                .map(|_| {
                    let len = match rng.below(40) {
                        0..4 => 1 + rng.below(3000),
                        4 => 4096 * (1 + rng.below(400)),
                        _ => 4096,
                    }
                    .min(size);
                    let mut off = rng.below(size - len + 1);
                    if rng.below(4) != 0 {
                        off -= off % 4096;
                    }
                    let data = match rng.below(8) {
                        0 => None,
                        1 => Some(vec![0u8; len as usize]),
                        _ => {
                            let mut d = vec![0u8; len as usize];
                            rng.fill(&mut d);
                            Some(d)
                        }
                    };
                    (off, len, data)
                })
                .collect();
            // Overlaps inside the frame, and the end of the disk.
            let (o, l, _) = f[0].clone();
            f.push((o, l, None));
            f.push((size - 10, 10, Some(vec![7u8; 10])));
            f
        })
        .collect()
}

/// `Retention::preserve` (runs read with one `read_batch`, records appended
/// with vectored writes) leaves the same before-images as the per-run path,
/// block for block and epoch for epoch, and every point rebuilds exactly
/// through the overlay; also when an append fails (disk full) and is retried,
/// and for a frame larger than one read batch and one journal segment.
#[test]
fn batched_preserve_keeps_the_same_images_as_the_per_run_path() {
    use super::policy::Policy;
    use super::{PRESERVE_BATCH_BYTES, Position, Retention};
    use crate::capture::bitmap::RegionBitmap;
    use crate::image::{Engine, ImageFormat, ImageSpec, WriteOp, open_image};
    use crate::util::prng::Prng;

    // Larger than one read batch, with a short last block.
    let size = PRESERVE_BATCH_BYTES as u64 + (6 << 20) + 1536;
    for format in [ImageFormat::Raw, ImageFormat::VmdkSparse] {
        let d = tempfile::tempdir().unwrap();
        let mut img = open_image(&ImageSpec {
            path: d.path().join("replica"),
            format,
            engine: Engine::Uring,
            create_size: Some(size),
            direct_io: crate::image::DirectIo::Off,
        })
        .unwrap();
        let mut rng = Prng::new(11);
        // Data in the first half (the rest reads as zeros: zero images).
        let mut model = vec![0u8; size as usize];
        rng.fill(&mut model[..(size / 2) as usize]);
        img.write_batch(&[WriteOp::Write {
            offset: 0,
            data: &model[..(size / 2) as usize],
        }])
        .unwrap();
        let policy = Policy {
            enabled: true,
            ..Policy::default()
        };
        let group_dir = d.path().join("state");
        let mut ret = Retention::open(&group_dir, "g1", policy, false).unwrap();
        let old_dir = d.path().join("per-run");
        let (mut old, _) = Writer::open(&old_dir, "g1").unwrap();
        let mut old_bm = RegionBitmap::new(size.div_ceil(BLOCK));

        let mut frames = scattered_frames(&mut rng, size, 7);
        // The last frame zeroes the whole disk: more than a read batch, more
        // than a journal segment.
        frames.push(vec![(0, size, None)]);
        let mut at_points: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut epoch = 0;
        for (i, frame) in frames.iter().enumerate() {
            let frame_no = 10 + i as u64;
            if i % 3 == 0 {
                // A new point (and epoch) before this frame.
                let pos = Position {
                    frame_no: frame_no - 1,
                    last_seq: frame_no * 10,
                    time_us: frame_no,
                    consistent: true,
                    tag: Some((format!("t{i}"), false)),
                };
                ret.boundary(&pos, false).unwrap();
                epoch = ret.epochs().last().unwrap().1.epoch;
                assert_eq!(ret.epochs().last().unwrap().1.frame_no, frame_no - 1);
                old_bm = RegionBitmap::new(size.div_ceil(BLOCK));
                at_points.push((epoch, model.clone()));
            }
            let ranges: Vec<(u64, u64)> = frame.iter().map(|(o, l, _)| (*o, *l)).collect();
            preserve_per_run(&mut old, &mut old_bm, epoch, 0, img.as_mut(), &ranges);
            if i == 1 {
                // The disk fills up in the middle of the frame's append: the
                // torn append is cut, nothing is marked, and the retry
                // appends every image once.
                let end = ret.writer.end().pos;
                ret.writer.fail_writes_past(Some(end + 100_000));
                let e = ret
                    .preserve(frame_no, 0, img.as_mut(), &ranges)
                    .unwrap_err();
                assert!(e.is_no_space(), "{e}");
                assert_eq!(ret.writer.end().pos, end, "the torn append is cut");
                ret.writer.fail_writes_past(None);
            }
            ret.preserve(frame_no, 0, img.as_mut(), &ranges).unwrap();
            // Preserving the same frame again adds nothing.
            let end = ret.writer.end();
            ret.preserve(frame_no, 0, img.as_mut(), &ranges).unwrap();
            assert_eq!(ret.writer.end(), end);
            ret.sync().unwrap();
            let ops: Vec<WriteOp<'_>> = frame
                .iter()
                .map(|(o, l, data)| match data {
                    Some(d) => WriteOp::Write {
                        offset: *o,
                        data: d,
                    },
                    None => WriteOp::Zero {
                        offset: *o,
                        len: *l,
                    },
                })
                .collect();
            img.write_batch(&ops).unwrap();
            for (o, l, data) in frame {
                let r = *o as usize..(*o + *l) as usize;
                match data {
                    Some(d) => model[r].copy_from_slice(d),
                    None => model[r].fill(0),
                }
            }
        }
        old.sync().unwrap();
        let new_images = images_by_block(&group_dir.join(super::RETENTION_DIR));
        let old_images = images_by_block(&old_dir);
        assert_eq!(
            new_images.len(),
            old_images.len(),
            "{format:?}: blocks preserved"
        );
        assert!(
            new_images == old_images,
            "{format:?}: the same before-images"
        );
        assert!(
            journal::list_segments(&group_dir.join(super::RETENTION_DIR))
                .unwrap()
                .len()
                > 1,
            "the last frame spans journal segments"
        );

        // Every point rebuilds from the replica and the overlay.
        let mut replica = vec![0u8; size as usize];
        img.read_at(0, &mut replica).unwrap();
        assert!(replica == model);
        let points: Vec<(Loc, PointRec)> = ret.epochs().cloned().collect();
        for (e, want) in &at_points {
            let (loc, p) = points.iter().find(|(_, p)| p.epoch == *e).unwrap();
            let g = Granted {
                epoch: p.epoch,
                seg: loc.seg,
                pos: loc.pos,
                frame_no: p.frame_no,
                last_seq: p.last_seq,
                time_us: p.time_us,
            };
            let mut o = Overlay::new(&group_dir.join(super::RETENTION_DIR), "g1", &g).unwrap();
            let mut buf = replica.clone();
            o.apply(0, 0, &mut buf).unwrap();
            assert!(buf == *want, "{format:?}: point of epoch {e} rebuilt");
        }
    }
}

/// After M data, the first W frame (a heartbeat when the drain ends with no
/// write after it) makes the replica consistent again as soon as the apply
/// thread is idle, not only when a next frame arrives; an M frame applied last
/// does not.
#[test]
fn idle_after_the_w_frame_that_follows_m_data_makes_a_point() {
    use super::policy::Policy;
    use super::{Position, Retention};
    let d = tempfile::tempdir().unwrap();
    let policy = Policy {
        enabled: true,
        ..Policy::default()
    };
    let mut ret = Retention::open(&d.path().join("state"), "g1", policy, false).unwrap();
    let pos = |frame_no: u64, consistent: bool| Position {
        frame_no,
        last_seq: frame_no * 10,
        time_us: frame_no * 1_000_000,
        consistent,
        tag: None,
    };
    let last = |ret: &Retention| ret.epochs().last().map(|(_, p)| p.frame_no);
    // W frames 1..=3, then M data (frames 4, 5) begins.
    ret.boundary(&pos(3, true), true).unwrap();
    assert_eq!(last(&ret), Some(3), "the point before the M range");
    ret.boundary(&pos(4, false), true).unwrap();
    // Idle after an M frame: still inconsistent, no point.
    ret.idle(&pos(5, false)).unwrap();
    assert_eq!(last(&ret), Some(3));
    // Frame 6 is W (a heartbeat): idle makes the point at its end.
    ret.boundary(&pos(5, false), false).unwrap();
    assert_eq!(last(&ret), Some(3), "not before frame 6 is applied");
    ret.idle(&pos(6, true)).unwrap();
    assert_eq!(last(&ret), Some(6));
    // The next frame's boundary at the same position adds nothing.
    ret.boundary(&pos(6, true), false).unwrap();
    assert_eq!(ret.epochs().filter(|(_, p)| p.frame_no == 6).count(), 1);
}
