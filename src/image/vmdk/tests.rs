//! Tests of the VMDK backends with real files: random ops against a plain
//! `Vec` model on both engines, reopen, and the outside referees (qemu-img
//! check / compare / convert, libvmdk's vmdkinfo). A missing referee fails the
//! test with the package to install; nothing is skipped.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::error::{Classify, ErrorKind};
use crate::image::{
    Engine, Image, ImageError, ImageFormat, ImageSpec, IoEngine, SyncEngine, UringEngine, WriteOp,
    open_image,
};
use crate::util::prng::Prng;

mod corrupt;

const MIB: u64 = 1 << 20;

/// Fail (never skip) when a referee is missing, naming its package.
pub(super) fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: the VMDK tests need it as a referee (apt-get install {package}; scripts/test.sh installs it)"
    );
}

/// Run a tool; return (exit code, stdout + stderr).
pub(super) fn run(tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    require_tool("qemu-img", "qemu-utils");
    run("qemu-img", args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` passes.
pub(super) fn assert_qemu_check(img: &Path) {
    let (code, out) = qemu_img(&["check", "-f", "vmdk", s(img)]);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
    assert!(out.contains("No errors were found"), "{out}");
}

/// `qemu-img compare` of the model (written as raw) against the VMDK: identical
/// content, and the same virtual size (`-s` would also compare allocation).
fn assert_qemu_equal(dir: &Path, model: &[u8], img: &Path) {
    let (code, info) = qemu_img(&["info", "--output=json", "-f", "vmdk", s(img)]);
    assert_eq!(code, 0, "{info}");
    let want = format!("\"virtual-size\": {},", model.len());
    assert!(info.contains(&want), "{want} not in {info}");
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let (code, out) = qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(img)]);
    assert_eq!(
        code,
        0,
        "qemu-img compare model vs {}: {out}",
        img.display()
    );
    std::fs::remove_file(&raw).unwrap();
}

pub(super) fn spec(
    path: &Path,
    format: ImageFormat,
    engine: Engine,
    create: Option<u64>,
) -> ImageSpec {
    ImageSpec {
        path: path.to_path_buf(),
        format,
        engine,
        create_size: create,
        direct_io: crate::image::DirectIo::Off,
    }
}

/// One owned op: offset, length, and the data (`None`: a zero op).
type Owned = (u64, u64, Option<Vec<u8>>);

/// A batch of random ops over `size` bytes. Offsets cluster in a few hot
/// areas so that grains are overwritten and ops overlap.
fn random_batch(rng: &mut Prng, size: u64) -> Vec<Owned> {
    let hot = [0, size / 3, size - size.min(300 << 10)];
    (0..1 + rng.below(24))
        .map(|_| {
            let len = match rng.below(4) {
                0 => 1 + rng.below(512),
                1 => 4096,
                2 => 1 + rng.below(200 << 10),
                _ => 64 << 10,
            }
            .min(size);
            let base = if rng.below(2) == 0 {
                hot[rng.below(3) as usize] + rng.below(256 << 10)
            } else {
                rng.below(size)
            };
            let mut offset = base.min(size - len);
            if rng.below(3) == 0 {
                offset -= offset % 4096;
            }
            if rng.below(5) == 0 {
                (offset, len, None)
            } else {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                (offset, len, Some(data))
            }
        })
        .collect()
}

fn ops_of(batch: &[Owned]) -> Vec<WriteOp<'_>> {
    batch
        .iter()
        .map(|(offset, len, data)| match data {
            Some(data) => WriteOp::Write {
                offset: *offset,
                data,
            },
            None => WriteOp::Zero {
                offset: *offset,
                len: *len,
            },
        })
        .collect()
}

fn apply_model(model: &mut [u8], batch: &[Owned]) {
    for (offset, len, data) in batch {
        let r = *offset as usize..(*offset + *len) as usize;
        match data {
            Some(d) => model[r].copy_from_slice(d),
            None => model[r].fill(0),
        }
    }
}

/// Random batches through `img`, checked against the model as they go.
fn exercise(img: &mut dyn Image, model: &mut [u8], seed: u64, batches: usize) {
    let size = img.size();
    let mut rng = Prng::new(seed);
    for b in 0..batches {
        let batch = random_batch(&mut rng, size);
        apply_model(model, &batch);
        img.write_batch(&ops_of(&batch)).unwrap();
        if b % 5 == 4 {
            img.flush().unwrap();
            assert!(
                read_all(img) == *model,
                "batch {b}: image differs from the model"
            );
        }
    }
    img.flush().unwrap();
}

fn read_all(img: &mut dyn Image) -> Vec<u8> {
    let mut got = vec![0u8; img.size() as usize];
    img.read_at(0, &mut got).unwrap();
    got
}

/// Every nonzero byte of the model lies in a listed data range.
fn assert_ranges_cover(img: &mut dyn Image, model: &[u8]) {
    let ranges = img.data_ranges(0, img.size()).unwrap();
    let mut covered = vec![false; model.len()];
    let mut prev_end = 0;
    for &(o, l) in &ranges {
        assert!(
            l > 0 && o >= prev_end,
            "sorted, disjoint, non-empty: {ranges:?}"
        );
        prev_end = o + l;
        covered[o as usize..(o + l) as usize].fill(true);
    }
    let missed = model.iter().zip(&covered).position(|(&b, &c)| b != 0 && !c);
    assert_eq!(missed, None, "nonzero byte outside the data ranges");
}

fn engines() -> Vec<(&'static str, Engine, Box<dyn IoEngine>)> {
    vec![
        (
            "io_uring",
            Engine::Uring,
            Box::new(UringEngine::new(256).unwrap()),
        ),
        (
            "io_uring depth 4",
            Engine::Uring,
            Box::new(UringEngine::new(4).unwrap()),
        ),
        ("sync", Engine::Sync, Box::new(SyncEngine::new())),
    ]
}

/// 72 MiB and 3 sectors: three grain tables, the last partial, and a last
/// grain shorter than a grain.
const ODD_SIZE: u64 = 72 * MIB + 3 * 512;

#[test]
fn sparse_random_ops_match_the_model_on_every_engine() {
    for (name, engine, eng) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vmdk");
        let mut img = VmdkSparseImage::open_with(&path, Some(ODD_SIZE), eng).unwrap();
        assert_eq!(img.size(), ODD_SIZE);
        let mut model = vec![0u8; ODD_SIZE as usize];
        exercise(&mut img, &mut model, 7, 40);
        assert_ranges_cover(&mut img, &model);
        drop(img);
        let mut img = open_image(&spec(&path, ImageFormat::VmdkSparse, engine, None)).unwrap();
        assert!(
            read_all(img.as_mut()) == model,
            "{name}: reopened image differs"
        );
        // Keep writing after a reopen: grains allocated before are found again.
        exercise(img.as_mut(), &mut model, 8, 15);
        drop(img);
        assert_qemu_check(&path);
        assert_qemu_equal(dir.path(), &model, &path);
    }
}

#[test]
fn flat_random_ops_match_the_model_on_every_engine() {
    for (name, engine, _) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vmdk");
        let mut img =
            open_image(&spec(&path, ImageFormat::VmdkFlat, engine, Some(ODD_SIZE))).unwrap();
        assert!(dir.path().join("disk-flat.vmdk").is_file());
        let mut model = vec![0u8; ODD_SIZE as usize];
        exercise(img.as_mut(), &mut model, 9, 25);
        assert_ranges_cover(img.as_mut(), &model);
        drop(img);
        let mut img = open_image(&spec(&path, ImageFormat::VmdkFlat, engine, None)).unwrap();
        assert!(
            read_all(img.as_mut()) == model,
            "{name}: reopened image differs"
        );
        drop(img);
        assert_qemu_check(&path);
        assert_qemu_equal(dir.path(), &model, &path);
        let (code, info) = qemu_img(&["info", "--output=json", s(&path)]);
        assert_eq!(code, 0, "{info}");
        assert!(
            info.contains("\"create-type\": \"monolithicFlat\""),
            "{info}"
        );
    }
}

#[test]
fn new_sparse_image_passes_qemu_and_vmdkinfo_and_keeps_its_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.vmdk");
    let mut img = open_image(&spec(
        &path,
        ImageFormat::VmdkSparse,
        Engine::Sync,
        Some(64 * MIB),
    ))
    .unwrap();
    let data = vec![0x5au8; 100_000];
    img.write_batch(&[WriteOp::Write {
        offset: 12_345,
        data: &data,
    }])
    .unwrap();
    img.flush().unwrap();
    drop(img);
    let img = VmdkSparseImage::open_with(&path, None, Box::new(SyncEngine::new())).unwrap();
    let uuid = img
        .disk_uuid()
        .expect("a created image has ddb.uuid")
        .to_string();
    let d = img.descriptor();
    assert_eq!(d.create_type, "monolithicSparse");
    assert_eq!(d.ddb("ddb.virtualHWVersion"), Some("4"));
    assert_eq!(d.ddb("ddb.geometry.heads"), Some("255"));
    let desc_before = std::fs::read(&path).unwrap()[512..512 * 21].to_vec();
    drop(img);
    // Reopen and write again: the descriptor (uuid, CID) is never rewritten.
    let mut img = VmdkSparseImage::open_with(&path, Some(1), Box::new(SyncEngine::new())).unwrap();
    img.write_batch(&[WriteOp::Write {
        offset: 50 * MIB,
        data: &data,
    }])
    .unwrap();
    img.flush().unwrap();
    assert_eq!(img.disk_uuid(), Some(uuid.as_str()));
    drop(img);
    assert_eq!(
        std::fs::read(&path).unwrap()[512..512 * 21],
        desc_before[..]
    );

    assert_qemu_check(&path);
    let (code, info) = qemu_img(&["info", "--output=json", s(&path)]);
    assert_eq!(code, 0, "{info}");
    assert!(
        info.contains("\"create-type\": \"monolithicSparse\""),
        "{info}"
    );
    assert!(info.contains("\"cluster-size\": 65536"), "{info}");
    let (code, map) = qemu_img(&["map", "--output=json", "-f", "vmdk", s(&path)]);
    assert_eq!(code, 0, "{map}");
    assert!(map.contains("\"data\": true"), "{map}");

    require_tool("vmdkinfo", "libvmdk-utils");
    let (code, out) = run("vmdkinfo", &[s(&path)]);
    assert_eq!(code, 0, "vmdkinfo: {out}");
    assert!(
        out.contains("Monolithic sparse") || out.contains("monolithicSparse"),
        "{out}"
    );
    assert!(out.contains("67108864") || out.contains("64 MiB"), "{out}");
}

#[test]
fn grow_zero_and_range_contracts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.vmdk");
    let mut img =
        VmdkSparseImage::open_with(&path, Some(8 * MIB), Box::new(SyncEngine::new())).unwrap();
    let len0 = std::fs::metadata(&path).unwrap().len();
    // Zero on unallocated grains allocates nothing.
    img.write_batch(&[WriteOp::Zero {
        offset: 0,
        len: 8 * MIB,
    }])
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len0);
    assert_eq!(img.data_ranges(0, 8 * MIB).unwrap(), vec![]);
    // A write allocates one grain at the end; zeroing part of it reads zeros.
    img.write_batch(&[WriteOp::Write {
        offset: 70_000,
        data: &[7u8; 1000],
    }])
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len0 + 65_536);
    img.write_batch(&[WriteOp::Zero {
        offset: 70_100,
        len: 100,
    }])
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len0 + 65_536);
    let mut buf = vec![1u8; 1200];
    img.read_at(69_900, &mut buf).unwrap();
    assert!(buf[..100].iter().all(|&b| b == 0));
    assert!(buf[100..200].iter().all(|&b| b == 7));
    assert!(buf[200..300].iter().all(|&b| b == 0));
    assert!(buf[300..1100].iter().all(|&b| b == 7));
    assert!(buf[1100..].iter().all(|&b| b == 0));
    assert_eq!(img.data_ranges(0, 8 * MIB).unwrap(), vec![(65_536, 65_536)]);
    assert_eq!(img.data_ranges(70_000, 10).unwrap(), vec![(70_000, 10)]);
    assert_eq!(img.data_ranges(0, 65_536).unwrap(), vec![]);

    // grow_to: a no-op at or below the capacity, FixedCapacity above it.
    img.grow_to(8 * MIB).unwrap();
    let err = img.grow_to(9 * MIB).unwrap_err();
    assert!(
        matches!(err, ImageError::FixedCapacity { size, requested, .. } if size == 8 * MIB && requested == 9 * MIB)
    );
    assert_eq!(err.kind(), ErrorKind::Config);

    // An op past the end fails the whole batch with nothing written.
    let before = std::fs::read(&path).unwrap();
    let err = img
        .write_batch(&[
            WriteOp::Write {
                offset: 0,
                data: &[1u8; 10],
            },
            WriteOp::Write {
                offset: 8 * MIB - 5,
                data: &[1u8; 10],
            },
        ])
        .unwrap_err();
    assert!(
        matches!(err, ImageError::OutOfRange { index: 1, .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(matches!(
        img.read_at(8 * MIB - 1, &mut [0u8; 2]),
        Err(ImageError::ReadOutOfRange { .. })
    ));
    assert!(matches!(
        img.data_ranges(8 * MIB, 1),
        Err(ImageError::ReadOutOfRange { .. })
    ));

    // Sizes that cannot be created.
    for (size, want) in [(0, "zero"), (1000, "multiple of 512"), (3 << 40, "2 TiB")] {
        let p = dir.path().join(format!("bad{size}.vmdk"));
        let err =
            VmdkSparseImage::open_with(&p, Some(size), Box::new(SyncEngine::new())).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!p.exists());
    }
}

#[test]
fn space_leaked_by_a_crash_is_never_reused() {
    // A crash after the grain data but before its table entry leaves an
    // unreferenced grain at the end of the file. Reopening must append after it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leak.vmdk");
    let img =
        VmdkSparseImage::open_with(&path, Some(4 * MIB), Box::new(SyncEngine::new())).unwrap();
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let end = f.metadata().unwrap().len();
    f.write_all_at(&[0xeeu8; 70_000], end).unwrap();
    drop(f);
    let mut img = VmdkSparseImage::open_with(&path, None, Box::new(SyncEngine::new())).unwrap();
    assert_eq!(
        read_all(&mut img),
        vec![0u8; 4 * MIB as usize],
        "a leaked grain is not data"
    );
    img.write_batch(&[WriteOp::Write {
        offset: 3 * MIB,
        data: &[1u8; 512],
    }])
    .unwrap();
    img.flush().unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes[end as usize..end as usize + 70_000]
            .iter()
            .all(|&b| b == 0xee)
    );
    let mut model = vec![0u8; 4 * MIB as usize];
    model[3 * MIB as usize..3 * MIB as usize + 512].fill(1);
    assert_qemu_check(&path);
    assert_qemu_equal(dir.path(), &model, &path);
}

/// Create a reference image with qemu-img and put known data in it with qemu-io.
fn qemu_reference(dir: &Path, name: &str, opts: &str, writes: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let (code, out) = qemu_img(&["create", "-q", "-f", "vmdk", "-o", opts, s(&path), "40M"]);
    assert_eq!(code, 0, "qemu-img create: {out}");
    require_tool("qemu-io", "qemu-utils");
    for w in writes {
        let (code, out) = run("qemu-io", &["-f", "vmdk", "-c", w, s(&path)]);
        assert_eq!(code, 0, "qemu-io {w}: {out}");
    }
    path
}

#[test]
fn qemu_created_images_open_and_keep_working() {
    let writes = [
        "write -P 0xab 1M 64k",
        "write -P 0xcd 33M 4k",
        "write -z 5M 128k",
    ];
    for (name, opts, format) in [
        (
            "sparse.vmdk",
            "subformat=monolithicSparse",
            ImageFormat::VmdkSparse,
        ),
        (
            "zeroed.vmdk",
            "subformat=monolithicSparse,zeroed_grain=on",
            ImageFormat::VmdkSparse,
        ),
        (
            "flat.vmdk",
            "subformat=monolithicFlat",
            ImageFormat::VmdkFlat,
        ),
    ] {
        for engine in [Engine::Uring, Engine::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let path = qemu_reference(dir.path(), name, opts, &writes);
            let mut model = vec![0u8; 40 * MIB as usize];
            model[MIB as usize..(MIB + 65_536) as usize].fill(0xab);
            model[33 * MIB as usize..(33 * MIB + 4096) as usize].fill(0xcd);
            let mut img = open_image(&spec(&path, format, engine, None)).unwrap();
            assert_eq!(img.size(), 40 * MIB);
            assert!(
                read_all(img.as_mut()) == model,
                "{name}: qemu's data read back"
            );
            // Writes over qemu's grains, its zeroed grains and fresh ones.
            let data = vec![0x11u8; 200_000];
            let ops = [
                WriteOp::Write {
                    offset: MIB + 1000,
                    data: &data[..5000],
                },
                WriteOp::Write {
                    offset: 5 * MIB + 4096,
                    data: &data,
                },
                WriteOp::Zero {
                    offset: 33 * MIB + 100,
                    len: 100,
                },
                WriteOp::Write {
                    offset: 40 * MIB - 3000,
                    data: &data[..3000],
                },
            ];
            img.write_batch(&ops).unwrap();
            img.flush().unwrap();
            model[(MIB + 1000) as usize..(MIB + 6000) as usize].fill(0x11);
            model[(5 * MIB + 4096) as usize..(5 * MIB + 4096 + 200_000) as usize].fill(0x11);
            model[(33 * MIB + 100) as usize..(33 * MIB + 200) as usize].fill(0);
            model[(40 * MIB - 3000) as usize..].fill(0x11);
            exercise(img.as_mut(), &mut model, 11, 10);
            drop(img);
            assert_qemu_check(&path);
            assert_qemu_equal(dir.path(), &model, &path);
        }
    }
}

#[test]
fn stream_export_is_accepted_by_qemu_and_converts_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vmdk");
    let mut img = VmdkSparseImage::open_with(
        &src,
        Some(ODD_SIZE),
        Box::new(UringEngine::new(64).unwrap()),
    )
    .unwrap();
    let mut model = vec![0u8; ODD_SIZE as usize];
    exercise(&mut img, &mut model, 21, 20);
    // An allocated grain of zeros (not written to the stream), a short last grain.
    img.write_batch(&[
        WriteOp::Write {
            offset: 40 * MIB,
            data: &[0u8; 65_536],
        },
        WriteOp::Write {
            offset: ODD_SIZE - 700,
            data: &[9u8; 700],
        },
    ])
    .unwrap();
    model[(ODD_SIZE - 700) as usize..].fill(9);
    let out = dir.path().join("export.vmdk");
    let mut calls = Vec::new();
    let mut progress = |done: u64, total: u64| calls.push((done, total));
    let stats = export_image_stream_optimized(&mut img, &out, Some(&mut progress)).unwrap();
    assert!(
        stats.grains_written > 0 && stats.zero_grains_skipped >= 1,
        "{stats:?}"
    );
    assert_eq!(stats.file_bytes, std::fs::metadata(&out).unwrap().len());
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress never goes back"
    );
    assert_eq!(calls.last(), Some(&(ODD_SIZE, ODD_SIZE)));
    // Exporting again to the same path refuses to overwrite it.
    let err = export_image_stream_optimized(&mut img, &out, None).unwrap_err();
    assert!(matches!(err, ImageError::Export { .. }), "{err}");
    drop(img);

    assert_qemu_check(&out);
    let (code, info) = qemu_img(&["info", "--output=json", s(&out)]);
    assert_eq!(code, 0, "{info}");
    assert!(
        info.contains("\"create-type\": \"streamOptimized\""),
        "{info}"
    );
    assert!(info.contains("\"compressed\": true"), "{info}");
    assert_qemu_equal(dir.path(), &model, &out);
    let back = dir.path().join("back.raw");
    let (code, text) = qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(&out), s(&back)]);
    assert_eq!(code, 0, "{text}");
    assert!(
        std::fs::read(&back).unwrap() == model,
        "converted back to raw identically"
    );
    require_tool("vmdkinfo", "libvmdk-utils");
    let (code, text) = run("vmdkinfo", &[s(&out)]);
    assert_eq!(code, 0, "vmdkinfo on the stream: {text}");
    // The export opened as a writable sparse image is refused with a reason.
    let err = VmdkSparseImage::open_with(&out, None, Box::new(SyncEngine::new())).unwrap_err();
    assert!(err.to_string().contains("streamOptimized"), "{err}");
}

#[test]
fn stream_export_of_a_raw_image_reads_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 256 * MIB;
    let mut img = open_image(&spec(&raw, ImageFormat::Raw, Engine::Sync, Some(size))).unwrap();
    img.write_batch(&[
        WriteOp::Write {
            offset: 3 * MIB,
            data: &[1u8; 4096],
        },
        WriteOp::Write {
            offset: 200 * MIB + 77,
            data: &[2u8; 100_000],
        },
    ])
    .unwrap();
    img.flush().unwrap();
    let mut reads = 0u64;
    let out = dir.path().join("raw-export.vmdk");
    let stats = {
        let mut read = |offset: u64, buf: &mut [u8]| {
            reads += buf.len() as u64;
            img.read_at(offset, buf)
        };
        let ranges = vec![(3 * MIB, 4096), (200 * MIB, 2 * MIB)];
        export_stream_optimized(&out, size, &mut read, Some(&ranges), None).unwrap()
    };
    assert!(reads <= 3 * MIB, "holes are not read ({reads} bytes read)");
    assert_eq!(stats.grains_written, 1 + 2);
    assert_qemu_check(&out);
    let (code, text) = qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&out)]);
    assert_eq!(code, 0, "{text}");
    // An all-zero source gives a valid empty stream.
    let empty = dir.path().join("empty.vmdk");
    let mut zeros = |_: u64, buf: &mut [u8]| {
        buf.fill(0);
        Ok(())
    };
    let stats = export_stream_optimized(&empty, MIB, &mut zeros, None, None).unwrap();
    assert_eq!((stats.grains_written, stats.tables_written), (0, 0));
    assert_qemu_check(&empty);
}

/// Peak resident memory of this process, from /proc/self/status.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn one_tib_sparse_image_stays_small_in_file_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vmdk");
    let size = 1u64 << 40;
    let mut img =
        VmdkSparseImage::open_with(&path, Some(size), Box::new(UringEngine::new(256).unwrap()))
            .unwrap();
    let overhead = img.header().overhead * 512;
    assert!(
        overhead < 130 * MIB,
        "tables take {overhead} bytes of holes"
    );
    let mut rng = Prng::new(3);
    let data = vec![0x42u8; 4096];
    let mut offsets = Vec::new();
    // 3000 writes scattered over the whole disk: more grain tables than the cache holds.
    for _ in 0..60 {
        let batch: Vec<u64> = (0..50).map(|_| rng.below(size / 4096) * 4096).collect();
        let ops: Vec<WriteOp<'_>> = batch
            .iter()
            .map(|&offset| WriteOp::Write {
                offset,
                data: &data,
            })
            .collect();
        img.write_batch(&ops).unwrap();
        img.flush().unwrap();
        offsets.extend(batch);
    }
    assert!(img.cached_grain_tables() * 512 * 4 <= GT_CACHE_BYTES);
    assert!(
        img.metadata_memory_bytes() < 8 * MIB as usize,
        "{} bytes",
        img.metadata_memory_bytes()
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        meta.len() <= overhead + 3000 * 65_536,
        "file length {}",
        meta.len()
    );
    assert!(
        meta.blocks() * 512 < 64 * MIB,
        "allocated {} bytes",
        meta.blocks() * 512
    );
    drop(img);
    let mut img = VmdkSparseImage::open_with(&path, None, Box::new(SyncEngine::new())).unwrap();
    let mut buf = vec![0u8; 4096];
    for &o in offsets.iter().step_by(7) {
        img.read_at(o, &mut buf).unwrap();
        assert_eq!(buf, data);
    }
    img.read_at(size - 4096, &mut buf).unwrap();
    let ranges = img.data_ranges(0, size).unwrap();
    let listed: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(listed <= 3000 * 65_536 && !ranges.is_empty());
    drop(img);
    // Under nextest each test is its own process: its peak RSS is this test's.
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        assert!(
            peak_rss_bytes() < 256 * MIB,
            "peak RSS {} bytes",
            peak_rss_bytes()
        );
    }
    assert_qemu_check(&path);
}

/// Mount `img` with libvmdk's vmdkmount (FUSE) and return the bytes it reads.
fn read_through_vmdkmount(dir: &Path, img: &Path) -> Vec<u8> {
    require_tool("vmdkmount", "libvmdk-utils");
    let mnt = dir.join(format!(
        "mnt-{}",
        img.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new("vmdkmount")
        .args([s(img), s(&mnt)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start vmdkmount");
    let disk = mnt.join("vmdk1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !disk.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let bytes = std::fs::read(&disk);
    let _ = run("umount", &[s(&mnt)]);
    // vmdkmount may stay in the foreground until unmounted: reap it (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    bytes.unwrap_or_else(|e| panic!("vmdkmount of {}: {e}", img.display()))
}

#[test]
fn libvmdk_reads_the_same_bytes_as_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.vmdk");
    let size = 40 * MIB + 512;
    let mut img =
        VmdkSparseImage::open_with(&path, Some(size), Box::new(SyncEngine::new())).unwrap();
    let mut model = vec![0u8; size as usize];
    exercise(&mut img, &mut model, 31, 15);
    let stream = dir.path().join("stream.vmdk");
    export_image_stream_optimized(&mut img, &stream, None).unwrap();
    drop(img);
    assert!(
        read_through_vmdkmount(dir.path(), &path) == model,
        "libvmdk reads our sparse image as the model"
    );
    assert!(
        read_through_vmdkmount(dir.path(), &stream) == model,
        "libvmdk reads our stream as the model"
    );
}

/// Batches like the target's (frames of 256 writes of 16 KiB, some zero
/// ranges up to 2 MiB), with another thread flushing through a second handle
/// all the while, as the target's flusher does.
#[test]
fn target_like_batches_with_a_concurrent_flush_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vmdk");
    let size = 96 * MIB;
    let mut img =
        VmdkSparseImage::open_with(&path, Some(size), Box::new(UringEngine::new(256).unwrap()))
            .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Prng::new(3);
    let h = img.sync_handle().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let t = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            h.sync_data().unwrap();
        }
    });
    for b in 0..30 {
        let mut batch: Vec<Owned> = Vec::new();
        for _ in 0..256 {
            let off = rng.below(size / 16384) * 16384;
            if rng.below(40) == 0 {
                let len = (rng.below(32) + 1) * 65536;
                batch.push((off, len.min(size - off), None));
            } else if rng.below(8) == 0 {
                batch.push((off, 65536.min(size - off), None));
            } else {
                let mut d = vec![0u8; 16384];
                rng.fill(&mut d);
                batch.push((off, 16384, Some(d)));
            }
        }
        apply_model(&mut model, &batch);
        img.write_batch(&ops_of(&batch)).unwrap();
        let got = read_all(&mut img);
        if got != model {
            let i = got.iter().zip(&model).position(|(a, b)| a != b).unwrap();
            panic!("batch {b}: first difference at {i} (grain {})", i / 65536);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
}

/// `read_batch` on sparse images (allocated grains in write order, so
/// neighbours in the disk are often apart in the file; unallocated grains and
/// missing tables read as zeros; a short last grain) and flat ones returns what
/// `read_at` returns, on every engine; past the end is refused.
#[test]
fn read_batch_matches_read_at_on_sparse_and_flat_images() {
    use crate::image::tests::assert_read_batch_matches_read_at;
    for (name, engine, eng) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vmdk");
        let mut img = VmdkSparseImage::open_with(&path, Some(ODD_SIZE), eng).unwrap();
        let mut model = vec![0u8; ODD_SIZE as usize];
        exercise(&mut img, &mut model, 21, 12);
        assert!(!img.data_ranges(0, ODD_SIZE).unwrap().is_empty(), "{name}");
        assert_read_batch_matches_read_at(&mut img, 5, 12);
        // The grain-table cache cold: tables are loaded while mapping a batch.
        drop(img);
        let mut img = open_image(&spec(&path, ImageFormat::VmdkSparse, engine, None)).unwrap();
        assert_read_batch_matches_read_at(img.as_mut(), 6, 4);

        let fpath = dir.path().join("flat.vmdk");
        let mut img =
            open_image(&spec(&fpath, ImageFormat::VmdkFlat, engine, Some(ODD_SIZE))).unwrap();
        let mut model = vec![0u8; ODD_SIZE as usize];
        exercise(img.as_mut(), &mut model, 22, 6);
        assert_read_batch_matches_read_at(img.as_mut(), 7, 8);
    }
}
