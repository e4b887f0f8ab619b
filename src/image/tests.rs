//! Tests of the image backends: a differential property test of both engines
//! against sequential `pwrite`, and the open/create/grow/zero/range contracts.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;
use crate::error::{Classify, ErrorKind};
use crate::util::prng::Prng;

fn spec(path: &Path, engine: Engine, create_size: Option<u64>) -> ImageSpec {
    ImageSpec {
        path: path.to_path_buf(),
        format: ImageFormat::Raw,
        engine,
        create_size,
        direct_io: crate::image::DirectIo::Off,
    }
}

/// Engine configurations under test: (engine, ring depth, zero mode, direct I/O).
const CONFIGS: [(Engine, u32, ZeroMode, bool); 7] = [
    (Engine::Uring, URING_ENTRIES, ZeroMode::PunchHole, false),
    (Engine::Uring, URING_ENTRIES, ZeroMode::WriteZeros, false),
    (Engine::Uring, 4, ZeroMode::PunchHole, false),
    (Engine::Sync, 0, ZeroMode::PunchHole, false),
    (Engine::Sync, 0, ZeroMode::WriteZeros, false),
    (Engine::Uring, URING_ENTRIES, ZeroMode::PunchHole, true),
    (Engine::Sync, 0, ZeroMode::WriteZeros, true),
];

fn open_config(path: &Path, engine: Engine, depth: u32, zero: ZeroMode, direct: bool) -> RawImage {
    let eng: Box<dyn IoEngine> = match engine {
        Engine::Uring => Box::new(UringEngine::new(depth).expect("io_uring setup")),
        Engine::Sync => Box::new(SyncEngine::new()),
    };
    let mut s = spec(path, engine, None);
    s.direct_io = if direct { DirectIo::On } else { DirectIo::Off };
    let mut img = RawImage::open_with(&s, eng).expect("open image");
    assert_eq!(
        img.direct_io(),
        direct,
        "direct I/O must be available in the test directory"
    );
    img.set_zero_mode(zero);
    img
}

/// A file of `size` bytes of seeded random data.
fn random_file(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    Prng::new(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
}

/// The reference: apply ops one after another with plain pwrite.
fn reference_apply(file: &File, ops: &[WriteOp<'_>]) {
    for op in ops {
        match *op {
            WriteOp::Write { offset, data } => file.write_all_at(data, offset).unwrap(),
            WriteOp::Zero { offset, len } => {
                file.write_all_at(&vec![0u8; len as usize], offset).unwrap()
            }
        }
    }
}

/// An op description for the property test: (is_zero, offset, len, seed).
type OpDesc = (bool, u64, u64, u64);

/// An op's data: on the heap (any address), or in block-aligned memory, so
/// direct runs mix writes taken in place with writes copied to the bounce
/// buffer.
enum OpData {
    Heap(Vec<u8>),
    Aligned(crate::util::aligned::AlignedBuf, usize),
}

impl OpData {
    fn bytes(&self) -> &[u8] {
        match self {
            OpData::Heap(v) => v,
            OpData::Aligned(b, n) => &b.bytes()[..*n],
        }
    }
}

fn materialize(descs: &[OpDesc], size: u64) -> Vec<(bool, u64, OpData, u64)> {
    descs
        .iter()
        .map(|&(is_zero, offset, len, seed)| {
            let mut offset = offset % size;
            let mut len = len.min(size - offset);
            // A third of the ops block-aligned, so direct I/O runs mix with
            // page-cache runs (and overlap them).
            if seed % 3 == 0 && len >= 4096 {
                offset -= offset % 4096;
                len -= len % 4096;
            }
            let mut data = OpData::Heap(Vec::new());
            if !is_zero {
                let mut v = vec![0u8; len as usize];
                Prng::new(seed).fill(&mut v);
                data = if seed % 2 == 0 {
                    let mut b = crate::util::aligned::AlignedBuf::new(v.len());
                    b.bytes_mut()[..v.len()].copy_from_slice(&v);
                    OpData::Aligned(b, v.len())
                } else {
                    OpData::Heap(v)
                };
            }
            (is_zero, offset, data, len)
        })
        .collect()
}

fn as_ops(owned: &[(bool, u64, OpData, u64)]) -> Vec<WriteOp<'_>> {
    owned
        .iter()
        .map(|(is_zero, offset, data, len)| {
            if *is_zero {
                WriteOp::Zero {
                    offset: *offset,
                    len: *len,
                }
            } else {
                WriteOp::Write {
                    offset: *offset,
                    data: data.bytes(),
                }
            }
        })
        .collect()
}

fn differential(batches: &[Vec<OpDesc>], size: u64) {
    let dir = tempfile::tempdir().unwrap();
    let ref_path = dir.path().join("reference.img");
    random_file(&ref_path, size as usize, 99);
    let reference = OpenOptions::new().write(true).open(&ref_path).unwrap();
    let owned: Vec<_> = batches.iter().map(|b| materialize(b, size)).collect();
    for batch in &owned {
        reference_apply(&reference, &as_ops(batch));
    }
    let expected = std::fs::read(&ref_path).unwrap();
    for (i, &(engine, depth, zero, direct)) in CONFIGS.iter().enumerate() {
        let path = dir.path().join(format!("image{i}.img"));
        random_file(&path, size as usize, 99);
        let mut img = open_config(&path, engine, depth, zero, direct);
        for batch in &owned {
            img.write_batch(&as_ops(batch)).unwrap();
        }
        img.flush().unwrap();
        let mut got = vec![0u8; size as usize];
        img.read_at(0, &mut got).unwrap();
        assert!(
            got == expected,
            "{engine} (depth {depth}, {zero:?}, direct {direct}) differs from sequential pwrite"
        );
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }
}

fn op_desc() -> impl Strategy<Value = OpDesc> {
    // Offsets and lengths both small against the file so that ops overlap often,
    // and unaligned so partial blocks and pages are exercised.
    (
        any::<bool>(),
        0u64..96 * 1024,
        0u64..24 * 1024,
        any::<u64>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random batches of overlapping writes and zeros give the same file through
    /// every engine as through sequential pwrite.
    #[test]
    fn engines_equal_sequential_pwrite(
        batches in prop::collection::vec(prop::collection::vec(op_desc(), 0..48), 1..4)
    ) {
        differential(&batches, 96 * 1024);
    }
}

#[test]
fn many_overlapping_ops_through_a_tiny_ring() {
    // 2000 ops over 16 KiB on a ring of 4: constant throttling and overlap waits.
    let mut r = Prng::new(5);
    let batch: Vec<OpDesc> = (0..2000)
        .map(|_| {
            (
                r.below(4) == 0,
                r.below(16 * 1024),
                r.below(3000),
                r.next_u64(),
            )
        })
        .collect();
    differential(&[batch], 16 * 1024);
}

#[test]
fn large_zero_ops_are_written_in_chunks() {
    // Zeros larger than the shared zero buffer, unaligned, then overlapping writes.
    let size = 5 * ZERO_CHUNK as u64 + 777;
    let batch: Vec<OpDesc> = vec![
        (false, 100, 2 * ZERO_CHUNK as u64, 1),
        (true, 3, 3 * ZERO_CHUNK as u64 + 12345, 0),
        (false, ZERO_CHUNK as u64 + 5, 4096, 2),
        (true, 2 * ZERO_CHUNK as u64, 2 * ZERO_CHUNK as u64 + 700, 0),
        (false, 4 * ZERO_CHUNK as u64 - 9, 100, 3),
    ];
    differential(&[batch], size);
}

#[test]
fn punch_hole_reads_back_zeros_and_frees_blocks() {
    for engine in [Engine::Uring, Engine::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("punch.img");
        random_file(&path, 4 << 20, 7);
        let mut img = open_image(&spec(&path, engine, None)).unwrap();
        img.flush().unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        img.write_batch(&[WriteOp::Zero {
            offset: 1 << 20,
            len: 2 << 20,
        }])
        .unwrap();
        img.flush().unwrap();
        let mut buf = vec![0xAAu8; 2 << 20];
        img.read_at(1 << 20, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "{engine}: zeroed range reads back zeros"
        );
        let mut edge = [0u8; 1];
        img.read_at((1 << 20) - 1, &mut edge).unwrap();
        let mut orig = vec![0u8; 4 << 20];
        Prng::new(7).fill(&mut orig);
        assert_eq!(
            edge[0],
            orig[(1 << 20) - 1],
            "{engine}: byte before the hole kept"
        );
        let after = std::fs::metadata(&path).unwrap().blocks();
        // ext4, xfs, btrfs and tmpfs all punch; 2 MiB = 4096 sectors freed.
        assert!(
            after + 4000 <= before,
            "{engine}: blocks {before} -> {after}"
        );
    }
}

#[test]
fn out_of_range_op_fails_whole_batch_with_nothing_written() {
    for engine in [Engine::Uring, Engine::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("range.img");
        random_file(&path, 8192, 3);
        let original = std::fs::read(&path).unwrap();
        let mut img = open_image(&spec(&path, engine, None)).unwrap();
        let data = [0x55u8; 20];
        let cases: [(WriteOp<'_>, u64, u64); 3] = [
            (
                WriteOp::Write {
                    offset: 8182,
                    data: &data,
                },
                8182,
                20,
            ),
            (
                WriteOp::Zero {
                    offset: 9000,
                    len: 1,
                },
                9000,
                1,
            ),
            (
                WriteOp::Zero {
                    offset: u64::MAX,
                    len: 2,
                },
                u64::MAX,
                2,
            ),
        ];
        for (bad, off, len) in cases {
            let ops = [
                WriteOp::Write {
                    offset: 0,
                    data: &data,
                },
                bad,
            ];
            let err = img.write_batch(&ops).unwrap_err();
            match &err {
                ImageError::OutOfRange {
                    index,
                    offset,
                    len: l,
                    size,
                    ..
                } => assert_eq!((*index, *offset, *l, *size), (1, off, len, 8192)),
                other => panic!("expected OutOfRange, got {other}"),
            }
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            let msg = err.to_string();
            assert!(
                msg.contains(&off.to_string()) && msg.contains("8192"),
                "{msg}"
            );
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            original,
            "{engine}: file unchanged"
        );
        let mut buf = [0u8; 2];
        assert!(matches!(
            img.read_at(8191, &mut buf),
            Err(ImageError::ReadOutOfRange {
                offset: 8191,
                len: 2,
                size: 8192,
                ..
            })
        ));
        // An op ending exactly at the end is fine.
        img.write_batch(&[WriteOp::Write {
            offset: 8172,
            data: &data,
        }])
        .unwrap();
    }
}

#[test]
fn create_sparse_64_gib_takes_no_space() {
    for engine in [Engine::Uring, Engine::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.img");
        let size = 64u64 << 30;
        let mut img = open_image(&spec(&path, engine, Some(size))).unwrap();
        assert_eq!(img.size(), size);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() <= 64, "sparse: {} blocks", meta.blocks());
        // Writes near the end land; the file stays sparse.
        img.write_batch(&[WriteOp::Write {
            offset: size - 4096,
            data: &[1u8; 4096],
        }])
        .unwrap();
        img.flush().unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(size - 4096, &mut buf).unwrap();
        assert_eq!(buf, [1u8; 4096]);
        assert!(std::fs::metadata(&path).unwrap().blocks() <= 128);
    }
}

/// Block-aligned writes whose data sits at a block-aligned address go to the
/// direct descriptor in place, others through the bounce buffer; mixed in one
/// batch, overlapping, the result equals sequential `pwrite`.
#[test]
fn direct_writes_from_aligned_and_unaligned_memory_keep_batch_order() {
    use crate::util::aligned::{AlignedBuf, BLOCK};
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 20;
    let (ref_path, path) = (dir.path().join("ref.img"), dir.path().join("d.img"));
    random_file(&ref_path, size as usize, 5);
    random_file(&path, size as usize, 5);
    let mut aligned = AlignedBuf::new(8 * BLOCK);
    Prng::new(6).fill(aligned.bytes_mut());
    let mut unaligned = vec![0u8; 8 * BLOCK + 1];
    Prng::new(7).fill(&mut unaligned);
    let (a, u) = (aligned.bytes(), &unaligned[1..]);
    let b = BLOCK as u64;
    let ops = [
        WriteOp::Write {
            offset: 0,
            data: &a[..2 * BLOCK],
        },
        WriteOp::Write {
            offset: b,
            data: &u[..BLOCK],
        },
        WriteOp::Write {
            offset: 8 * b,
            data: &a[2 * BLOCK..6 * BLOCK],
        },
        WriteOp::Zero {
            offset: 9 * b,
            len: b,
        },
        WriteOp::Write {
            offset: 10 * b,
            data: &u[BLOCK..3 * BLOCK],
        },
        WriteOp::Write {
            offset: 3 * b + 100,
            data: &u[..300],
        },
        WriteOp::Write {
            offset: 11 * b,
            data: &a[6 * BLOCK..7 * BLOCK],
        },
    ];
    assert!(
        (a.as_ptr() as usize).is_multiple_of(BLOCK) && !(u.as_ptr() as usize).is_multiple_of(BLOCK)
    );
    reference_apply(
        &OpenOptions::new().write(true).open(&ref_path).unwrap(),
        &ops,
    );
    let mut img = open_config(&path, Engine::Uring, 8, ZeroMode::PunchHole, true);
    img.write_batch(&ops).unwrap();
    img.flush().unwrap();
    drop(img);
    assert!(std::fs::read(&path).unwrap() == std::fs::read(&ref_path).unwrap());
}

/// Zero ranges written with zeros (block devices; forced here on a file) go
/// through the direct descriptor when block-aligned, from the aligned zero
/// buffer, and direct I/O stays on; unaligned ones go through the page cache.
/// Under `DirectIo::Auto`, a file's direct I/O ends at the first zero range,
/// which punches a hole.
#[test]
fn zero_ranges_keep_direct_io_and_auto_drops_it_at_the_first_hole() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1usize << 20;
    let path = dir.path().join("z.img");
    random_file(&path, size, 8);
    let mut want = std::fs::read(&path).unwrap();
    let mut img = open_config(&path, Engine::Uring, 8, ZeroMode::WriteZeros, true);
    let zeros = [
        WriteOp::Zero {
            offset: 4096,
            len: 3 * 4096,
        },
        WriteOp::Zero {
            offset: 100_000,
            len: 50,
        },
    ];
    img.write_batch(&zeros).unwrap();
    img.flush().unwrap();
    assert!(img.direct_io(), "direct I/O stays on after zero writes");
    want[4096..4 * 4096].fill(0);
    want[100_000..100_050].fill(0);
    drop(img);
    assert!(std::fs::read(&path).unwrap() == want);

    let path = dir.path().join("auto.img");
    random_file(&path, size, 9);
    let mut s = spec(&path, Engine::Uring, None);
    s.direct_io = DirectIo::Auto;
    let mut img = RawImage::open(&s).unwrap();
    assert!(img.direct_io());
    let block = [7u8; 4096];
    img.write_batch(&[WriteOp::Write {
        offset: 8192,
        data: &block,
    }])
    .unwrap();
    assert!(img.direct_io(), "writes keep it");
    img.write_batch(&[WriteOp::Zero {
        offset: 65536,
        len: 65536,
    }])
    .unwrap();
    assert!(!img.direct_io(), "a punched hole ends it");
    img.flush().unwrap();
    let mut got = vec![1u8; 65536];
    img.read_at(65536, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    img.read_at(8192, &mut got[..4096]).unwrap();
    assert_eq!(&got[..4096], &block);
}

/// `DirectIo::Auto` takes `O_DIRECT` for a file without holes and leaves a
/// sparse one (or one with a hole anywhere) to the page cache; `On` and `Off`
/// are taken as said.
#[test]
fn direct_io_auto_is_on_for_a_file_without_holes_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.img");
    let direct = |mode: DirectIo| {
        let mut s = spec(&path, Engine::Sync, None);
        s.direct_io = mode;
        RawImage::open(&s).unwrap().direct_io()
    };
    let size = 8u64 << 20;
    File::create(&path).unwrap().set_len(size).unwrap();
    assert!(!direct(DirectIo::Auto), "a sparse file");
    assert!(direct(DirectIo::On));
    random_file(&path, size as usize, 3);
    assert!(direct(DirectIo::Auto), "every block written");
    assert!(!direct(DirectIo::Off));
    // A hole in the middle.
    let mut img = open_image(&spec(&path, Engine::Sync, None)).unwrap();
    img.write_batch(&[WriteOp::Zero {
        offset: 1 << 20,
        len: 1 << 20,
    }])
    .unwrap();
    img.flush().unwrap();
    drop(img);
    assert!(!direct(DirectIo::Auto), "a hole punched by a zero op");
}

#[test]
fn existing_image_opened_with_its_own_size_and_never_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("existing.img");
    random_file(&path, (1 << 20) + 7, 11);
    let original = std::fs::read(&path).unwrap();
    for engine in [Engine::Uring, Engine::Sync] {
        let img = open_image(&spec(&path, engine, Some(10 << 30))).unwrap();
        assert_eq!(img.size(), (1 << 20) + 7);
        assert_eq!(img.path(), path.as_path());
        assert_eq!(img.engine(), engine);
        let err = img.ensure_size(2 << 20).unwrap_err();
        assert!(
            matches!(err, ImageError::TooSmall { size, needed, .. } if size == (1 << 20) + 7 && needed == 2 << 20)
        );
        assert_eq!(err.kind(), ErrorKind::Config);
        img.ensure_size(1 << 20).unwrap();
        let small = open_image(&spec(&path, engine, Some(5))).unwrap();
        assert_eq!(small.size(), (1 << 20) + 7);
    }
    assert_eq!(std::fs::read(&path).unwrap(), original);
}

#[test]
fn missing_image_without_create_size_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.img");
    let err = open_image(&spec(&path, Engine::Sync, None)).unwrap_err();
    assert!(
        matches!(&err, ImageError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    );
    assert_eq!(err.errno(), Some(libc::ENOENT));
    assert!(err.to_string().contains("absent.img"));
    assert!(!path.exists());
}

#[test]
fn not_a_file_or_block_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fifo");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = open_image(&spec(&path, Engine::Sync, None)).unwrap_err();
    assert!(
        matches!(err, ImageError::NotFileOrBlockDevice { .. }),
        "{err}"
    );
}

#[test]
fn grow_to_grows_sparsely_and_never_shrinks() {
    for engine in [Engine::Uring, Engine::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grow.img");
        let mut img = open_image(&spec(&path, engine, Some(4096))).unwrap();
        img.write_batch(&[WriteOp::Write {
            offset: 0,
            data: &[9u8; 4096],
        }])
        .unwrap();
        img.grow_to(1 << 30).unwrap();
        assert_eq!(img.size(), 1 << 30);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
        assert!(std::fs::metadata(&path).unwrap().blocks() <= 64);
        img.grow_to(100).unwrap();
        assert_eq!(img.size(), 1 << 30, "never shrinks");
        img.write_batch(&[WriteOp::Write {
            offset: (1 << 30) - 1,
            data: &[3],
        }])
        .unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 4096]);
        let mut last = [0u8; 2];
        img.read_at((1 << 30) - 2, &mut last).unwrap();
        assert_eq!(last, [0, 3]);
        drop(img);
        let reopened = open_image(&spec(&path, engine, None)).unwrap();
        assert_eq!(reopened.size(), 1 << 30);
    }
}

#[test]
fn flush_and_reopen_keep_the_data() {
    for engine in [Engine::Uring, Engine::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flush.img");
        let mut img = open_image(&spec(&path, engine, Some(1 << 20))).unwrap();
        img.flush().unwrap();
        let data = vec![0x5Au8; 65536];
        img.write_batch(&[
            WriteOp::Write {
                offset: 4096,
                data: &data,
            },
            WriteOp::Zero {
                offset: 8192,
                len: 100,
            },
            WriteOp::Write {
                offset: 0,
                data: &[],
            },
            WriteOp::Zero {
                offset: 1 << 20,
                len: 0,
            },
        ])
        .unwrap();
        img.flush().unwrap();
        img.flush().unwrap();
        drop(img);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[4096..8192].iter().all(|&b| b == 0x5A));
        assert!(bytes[8192..8292].iter().all(|&b| b == 0));
        assert!(bytes[8292..4096 + 65536].iter().all(|&b| b == 0x5A));
    }
}

#[test]
fn kernel_errors_name_the_op_and_leave_the_engine_usable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    random_file(&path, 1 << 20, 1);
    let read_only = File::open(&path).unwrap();
    let writable = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let data = vec![1u8; 4096];
    let ops: Vec<WriteOp<'_>> = (0..40)
        .map(|i| WriteOp::Write {
            offset: i * 8192,
            data: &data,
        })
        .collect();
    let engines: [Box<dyn IoEngine>; 2] = [
        Box::new(UringEngine::new(8).unwrap()),
        Box::new(SyncEngine::new()),
    ];
    for mut eng in engines {
        let mut zero = ZeroMode::PunchHole;
        let err = eng.write_batch(&read_only, &ops, &mut zero).unwrap_err();
        assert_eq!((err.index, err.offset, err.len), (0, 0, 4096));
        assert_eq!(err.source.raw_os_error(), Some(libc::EBADF));
        let img_err = ImageError::from_engine(&path, err);
        assert_eq!(img_err.errno(), Some(libc::EBADF));
        assert!(img_err.to_string().contains("ro.img"));
        // The ring was fully drained: the next batch works.
        eng.write_batch(&writable, &ops, &mut zero).unwrap();
        eng.sync_data(&writable).unwrap();
        let mut buf = vec![0u8; 4096];
        eng.read_at(&writable, 39 * 8192, &mut buf).unwrap();
        assert_eq!(buf, data);
        let mut past = [0u8; 8];
        let e = eng
            .read_at(&writable, (1 << 20) - 4, &mut past)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}

#[test]
fn create_in_missing_directory_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("no/such/dir/x.img");
    let err = open_image(&spec(&path, Engine::Sync, Some(4096))).unwrap_err();
    assert!(
        matches!(err, ImageError::Create { size: 4096, .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Io);
}

#[test]
fn op_accessors_and_overlap() {
    let w = WriteOp::Write {
        offset: 10,
        data: &[0; 5],
    };
    let z = WriteOp::Zero { offset: 15, len: 3 };
    assert_eq!(
        (w.offset(), w.len(), w.end(), w.kind()),
        (10, 5, Some(15), OpKind::Write)
    );
    assert!(!w.overlaps(&z) && !z.overlaps(&w));
    assert!(w.overlaps(&WriteOp::Zero { offset: 14, len: 1 }));
    assert!(!w.overlaps(&WriteOp::Zero { offset: 12, len: 0 }));
    assert_eq!(
        WriteOp::Zero {
            offset: u64::MAX,
            len: 1
        }
        .end(),
        None
    );
    assert!(WriteOp::Zero { offset: 3, len: 0 }.is_empty());
}

#[test]
fn raw_data_ranges_follow_the_files_extents() {
    for engine in [Engine::Uring, Engine::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ranges.img");
        let size = 64u64 << 20;
        let mut img = open_image(&spec(&path, engine, Some(size))).unwrap();
        assert_eq!(
            img.data_ranges(0, size).unwrap(),
            vec![],
            "{engine}: all hole"
        );
        img.write_batch(&[
            WriteOp::Write {
                offset: 1 << 20,
                data: &[1u8; 4096],
            },
            WriteOp::Write {
                offset: (40 << 20) + 100,
                data: &[2u8; 10_000],
            },
        ])
        .unwrap();
        img.flush().unwrap();
        let ranges = img.data_ranges(0, size).unwrap();
        let covers = |o: u64, l: u64| ranges.iter().any(|&(s, n)| s <= o && o + l <= s + n);
        assert!(
            covers(1 << 20, 4096) && covers((40 << 20) + 100, 10_000),
            "{engine}: {ranges:?}"
        );
        let listed: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(
            listed <= 2 << 20,
            "{engine}: holes listed as data: {ranges:?}"
        );
        assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        // A query inside the data is clipped to the query.
        assert_eq!(
            img.data_ranges((1 << 20) + 10, 20).unwrap(),
            vec![((1 << 20) + 10, 20)]
        );
        assert_eq!(img.data_ranges(2 << 20, 1 << 20).unwrap(), vec![]);
        assert_eq!(img.data_ranges(5, 0).unwrap(), vec![]);
        assert!(matches!(
            img.data_ranges(size - 1, 2),
            Err(ImageError::ReadOutOfRange { .. })
        ));
    }
}

/// A random batch of `n` reads (offset, length) over an image of `size` bytes:
/// empty, short unaligned, whole blocks, runs of blocks and a few long ones;
/// some overlap (each read has its own buffer).
pub(crate) fn random_reads(rng: &mut Prng, size: u64, n: usize) -> Vec<(u64, usize)> {
    (0..n)
        .map(|_| {
            let len = match rng.below(6) {
                0 => 0,
                1 => 1 + rng.below(700),
                2 | 3 => 4096,
                4 => 4096 * (1 + rng.below(64)),
                _ => 1 + rng.below(3 << 20),
            }
            .min(size);
            let mut offset = rng.below(size - len + 1);
            if rng.below(2) == 0 {
                offset -= offset % 4096;
            }
            (offset, len as usize)
        })
        .collect()
}

/// `read_batch` of random batches (some larger than any ring) returns what
/// `read_at` returns read by read; a batch with a read past the end is refused
/// with nothing read, the error naming that read.
pub(crate) fn assert_read_batch_matches_read_at(img: &mut dyn Image, seed: u64, rounds: usize) {
    let size = img.size();
    let mut rng = Prng::new(seed);
    for round in 0..rounds {
        let n = 1 + rng.below(if round % 4 == 0 { 700 } else { 40 }) as usize;
        let shape = random_reads(&mut rng, size, n);
        let want: Vec<Vec<u8>> = shape
            .iter()
            .map(|&(o, l)| {
                let mut b = vec![0u8; l];
                img.read_at(o, &mut b).unwrap();
                b
            })
            .collect();
        let mut got: Vec<Vec<u8>> = shape.iter().map(|&(_, l)| vec![0xee; l]).collect();
        let mut reads: Vec<(u64, &mut [u8])> = shape
            .iter()
            .zip(got.iter_mut())
            .map(|(&(o, _), b)| (o, b.as_mut_slice()))
            .collect();
        img.read_batch(&mut reads).unwrap();
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            panic!(
                "{}: round {round}: read {i} of {n} at {} len {} differs from read_at",
                img.path().display(),
                shape[i].0,
                shape[i].1
            );
        }
    }
    // Past the end (and overflowing): refused, nothing read.
    for (bad_off, bad_len) in [(size - 100, 101usize), (size, 1), (u64::MAX - 1, 4)] {
        let mut a = vec![0xabu8; 4096];
        let mut b = vec![0xcdu8; bad_len];
        let mut c = vec![0xefu8; 100];
        let mut reads: Vec<(u64, &mut [u8])> =
            vec![(0, &mut a), (bad_off, &mut b), (size - 100, &mut c)];
        match img.read_batch(&mut reads) {
            Err(ImageError::ReadOutOfRange {
                offset,
                len,
                size: s,
                ..
            }) => {
                assert_eq!((offset, len, s), (bad_off, bad_len as u64, size));
            }
            other => panic!("expected ReadOutOfRange, got {other:?}"),
        }
        assert!(a.iter().all(|&x| x == 0xab), "nothing read");
        assert!(b.iter().all(|&x| x == 0xcd) && c.iter().all(|&x| x == 0xef));
    }
    // An empty batch is fine.
    img.read_batch(&mut []).unwrap();
}

#[test]
fn raw_read_batch_matches_read_at_on_every_engine() {
    let size = 9 * 1024 * 1024 + 1234;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reads.img");
    random_file(&path, size, 17);
    for (engine, depth) in [
        (Engine::Uring, URING_ENTRIES),
        (Engine::Uring, 4),
        (Engine::Sync, 0),
    ] {
        let mut img = open_config(&path, engine, depth, ZeroMode::PunchHole, false);
        assert_read_batch_matches_read_at(&mut img, depth.into(), 12);
    }
}

#[test]
fn uring_read_batch_past_the_end_of_the_file_is_an_eof_error_naming_the_read() {
    // The engine without the image's range check: a read past the end of the
    // file fails as read_at does, with every other read reaped first.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.img");
    random_file(&path, 64 << 10, 4);
    let file = File::open(&path).unwrap();
    for mut eng in [
        Box::new(UringEngine::new(4).unwrap()) as Box<dyn IoEngine>,
        Box::new(SyncEngine::new()),
    ] {
        let mut bufs: Vec<Vec<u8>> = (0..10).map(|_| vec![0u8; 4096]).collect();
        let mut reads: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                (
                    if i == 6 { 62 << 10 } else { i as u64 * 4096 },
                    b.as_mut_slice(),
                )
            })
            .collect();
        let e = eng.read_batch(&file, &mut reads).unwrap_err();
        assert_eq!((e.index, e.offset, e.len), (6, 62 << 10, 4096));
        assert_eq!(e.source.kind(), io::ErrorKind::UnexpectedEof);
        // The engine stays usable.
        let mut one = [0u8; 10];
        eng.read_batch(&file, &mut [(5, &mut one[..])]).unwrap();
    }
}

/// With [`Image::direct_reads`] on, a batch of aligned reads goes around the
/// page cache, and still returns what buffered writes just put there (the
/// kernel writes dirty pages of the range back before a direct read); a batch
/// with an unaligned read is read buffered. Raw and VMDK monolithicSparse,
/// both engines.
#[test]
fn direct_reads_return_what_buffered_writes_left_in_the_cache() {
    use crate::util::aligned::{AlignedBuf, BLOCK};
    const SIZE: u64 = 8 << 20;
    for format in [ImageFormat::Raw, ImageFormat::VmdkSparse] {
        for engine in [Engine::Sync, Engine::Uring] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img");
            let mut img = open_image(&ImageSpec {
                format,
                ..spec(&path, engine, Some(SIZE))
            })
            .unwrap();
            let mut model = vec![0u8; SIZE as usize];
            let mut rng = Prng::new(9);
            let mut data = vec![0u8; 300 * 1024];
            rng.fill(&mut data);
            // Unaligned and aligned writes, left unsynced in the page cache.
            for (off, len) in [(4096u64, 65536usize), (70_000, 5000), (3 << 20, 300 * 1024)] {
                img.write_batch(&[WriteOp::Write {
                    offset: off,
                    data: &data[..len],
                }])
                .unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data[..len]);
            }
            let direct = img.direct_reads();
            let what = format!("{format:?} {engine:?} (direct reads: {direct})");
            let mut buf = AlignedBuf::new(2 << 20);
            {
                let (a, b) = buf.bytes_mut().split_at_mut(1 << 20);
                let mut reads: Vec<(u64, &mut [u8])> = vec![(0, a), (3 << 20, b)];
                img.read_batch(&mut reads).unwrap();
            }
            assert!(
                buf.bytes()[..1 << 20] == model[..1 << 20],
                "{what}: first read"
            );
            assert!(
                buf.bytes()[1 << 20..2 << 20] == model[3 << 20..4 << 20],
                "{what}: second read"
            );
            // One unaligned read in the batch: all of it buffered, same bytes.
            let mut odd = vec![0u8; 999];
            {
                let (a, _) = buf.bytes_mut().split_at_mut(BLOCK);
                let mut reads: Vec<(u64, &mut [u8])> = vec![(0, a), (70_001, &mut odd)];
                img.read_batch(&mut reads).unwrap();
            }
            assert!(buf.bytes()[..BLOCK] == model[..BLOCK], "{what}");
            assert!(odd[..] == model[70_001..71_000], "{what}: unaligned read");
        }
    }
}
