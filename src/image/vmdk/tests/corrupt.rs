//! Corrupt and hostile VMDKs: each gives a clean, classified error that names
//! the file, the structure and where; never a panic, never a write.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::super::*;
use super::{ImageFormat, spec};
use crate::error::{Classify, ErrorKind};
use crate::image::{Engine, Image, ImageError, SyncEngine, WriteOp, open_image};

// Layout of the 4 MiB image `fresh` makes: one grain table per directory.
const RGD: u64 = 21 * 512;
const RGT: u64 = 22 * 512;
const GD: u64 = 26 * 512;
const GT: u64 = 27 * 512;

/// A new 4 MiB sparse image with grains 0 and 2 written.
fn fresh(dir: &Path) -> PathBuf {
    let path = dir.join("c.vmdk");
    let mut img =
        VmdkSparseImage::open_with(&path, Some(4 << 20), Box::new(SyncEngine::new())).unwrap();
    assert_eq!(img.header().gd_offset * 512, GD);
    img.write_batch(&[
        WriteOp::Write {
            offset: 0,
            data: &[1u8; 4096],
        },
        WriteOp::Write {
            offset: 2 * 65_536,
            data: &[2u8; 4096],
        },
    ])
    .unwrap();
    img.flush().unwrap();
    path
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open(path: &Path) -> Result<VmdkSparseImage, ImageError> {
    VmdkSparseImage::open_with(path, None, Box::new(SyncEngine::new()))
}

/// The error is a corrupt-VMDK error about `path` whose message has `words`.
fn assert_corrupt(err: &ImageError, path: &Path, words: &[&str]) {
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Vmdk { .. }), "{msg}");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{msg}");
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    for w in words {
        assert!(msg.contains(w), "{w:?} not in: {msg}");
    }
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(10 * 512)
        .unwrap();
    assert_corrupt(
        &open(&path).unwrap_err(),
        &path,
        &["file truncated", "overHead", "10 sectors"],
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert_corrupt(&open(&path).unwrap_err(), &path, &["100 bytes, too short"]);
}

#[test]
fn grain_directory_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    patch(&path, GD, &0x0010_0000u32.to_le_bytes());
    assert_corrupt(
        &open(&path).unwrap_err(),
        &path,
        &[
            "grain directory entry 0 points at sector 1048576",
            "outside the file",
        ],
    );
    // The header's own directory offset past the end.
    let path = {
        let d = tempfile::tempdir().unwrap();
        let p = fresh(d.path());
        let moved = dir.path().join("gd.vmdk");
        std::fs::copy(&p, &moved).unwrap();
        moved
    };
    patch(&path, 56, &1_000_000u64.to_le_bytes());
    assert_corrupt(
        &open(&path).unwrap_err(),
        &path,
        &["file truncated", "the grain directory"],
    );
}

#[test]
fn grain_table_entry_past_the_end_fails_reads_and_writes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    patch(&path, GT + 5 * 4, &0x00f0_0000u32.to_le_bytes());
    // Tables are read on demand: the open succeeds, the first use fails.
    let mut img = open(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = img.read_at(5 * 65_536, &mut [0u8; 10]).unwrap_err();
    assert_corrupt(
        &err,
        &path,
        &["grain table 0 entry 5 points at sector 15728640 beyond the end of the file"],
    );
    let err = img
        .write_batch(&[WriteOp::Write {
            offset: 9 * 65_536,
            data: &[3u8; 100],
        }])
        .unwrap_err();
    assert_corrupt(&err, &path, &["grain table 0 entry 5"]);
    assert!(std::fs::read(&path).unwrap() == before, "nothing written");
    drop(img);
    // An entry pointing into the metadata (the redundant grain table).
    patch(&path, GT + 5 * 4, &((RGT / 512) as u32).to_le_bytes());
    let err = open(&path).unwrap().data_ranges(0, 4 << 20).unwrap_err();
    assert_corrupt(
        &err,
        &path,
        &["grain table 0 entry 5 points at sector 22", "metadata"],
    );
}

#[test]
fn bad_magic_header_fields_and_newlines() {
    let cases: &[(u64, &[u8], &[&str])] = &[
        (
            0,
            b"XXXX",
            &["magic number (byte 0)", "not a sparse VMDK extent"],
        ),
        (20, &[100], &["grainSize (byte 20) is 100"]),
        (4, &[9], &["version (byte 4) is 9"]),
        (73, b"\r\n", &["newline-detection", "text-mode"]),
    ];
    for (at, bytes, words) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = fresh(dir.path());
        patch(&path, *at, bytes);
        assert_corrupt(&open(&path).unwrap_err(), &path, words);
    }
}

#[test]
fn bad_descriptors() {
    let cases: &[(&[u8], &[&str], ErrorKind)] = &[
        (b"garbage\n\0", &["descriptor at byte 512", "line 1"], ErrorKind::Corrupt),
        (
            b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 99 SPARSE \"c.vmdk\"\n\0",
            &["99 sectors but the capacity is 8192"],
            ErrorKind::Corrupt,
        ),
        (
            b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\0",
            &["0 extent lines"],
            ErrorKind::Corrupt,
        ),
        (
            b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\nRW 8192 SPARSE \"c.vmdk\"\n\0",
            &["unsupported", "vmfsSparse"],
            ErrorKind::Config,
        ),
        (
            b"version=1\nCID=1\nparentCID=12345678\nparentFileNameHint=\"base.vmdk\"\ncreateType=\"monolithicSparse\"\nRW 8192 SPARSE \"c.vmdk\"\n\0",
            &["child (delta) disk"],
            ErrorKind::Config,
        ),
    ];
    for (text, words, kind) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = fresh(dir.path());
        patch(&path, 512, text);
        let err = open(&path).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), *kind, "{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        for w in *words {
            assert!(msg.contains(w), "{w:?} not in: {msg}");
        }
    }
}

#[test]
fn inconsistent_or_overlapping_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    patch(&path, RGD, &0u32.to_le_bytes());
    assert_corrupt(
        &open(&path).unwrap_err(),
        &path,
        &["grain directory entry 0 is 27 but redundant grain directory entry 0 is 0"],
    );
    patch(&path, RGD, &22u32.to_le_bytes());
    patch(&path, GD, &24u32.to_le_bytes());
    assert_corrupt(
        &open(&path).unwrap_err(),
        &path,
        &["overlaps", "grain table 0"],
    );
}

#[test]
fn missing_grain_table_reads_zeros_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    patch(&path, RGD, &0u32.to_le_bytes());
    patch(&path, GD, &0u32.to_le_bytes());
    let mut img = open(&path).unwrap();
    let mut buf = [9u8; 100];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 100]);
    assert_eq!(img.data_ranges(0, 4 << 20).unwrap(), vec![]);
    let before = std::fs::read(&path).unwrap();
    img.write_batch(&[WriteOp::Zero {
        offset: 0,
        len: 4096,
    }])
    .unwrap();
    let err = img
        .write_batch(&[WriteOp::Write {
            offset: 100,
            data: &[1u8; 10],
        }])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains("grain directory entry 0 is empty"),
        "{err}"
    );
    assert!(std::fs::read(&path).unwrap() == before, "nothing written");
}

#[test]
fn hostile_flat_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.vmdk");
    drop(
        open_image(&spec(
            &path,
            ImageFormat::VmdkFlat,
            Engine::Sync,
            Some(1 << 20),
        ))
        .unwrap(),
    );
    let good = std::fs::read_to_string(&path).unwrap();
    let open_flat = |p: &Path| open_image(&spec(p, ImageFormat::VmdkFlat, Engine::Sync, None));
    let cases: [(String, &str); 4] = [
        (
            good.replace("\"f-flat.vmdk\"", "\"../f-flat.vmdk\""),
            "plain file name",
        ),
        (
            good.replace("\"f-flat.vmdk\"", "\"/etc/passwd\""),
            "plain file name",
        ),
        (
            good.replace("\"f-flat.vmdk\" 0", "\"f-flat.vmdk\""),
            "no offset",
        ),
        (
            good.replace("\"f-flat.vmdk\" 0", "\"f-flat.vmdk\" 1"),
            "flat extent",
        ),
    ];
    for (text, want) in cases {
        let p = dir.path().join("hostile.vmdk");
        std::fs::write(&p, &text).unwrap();
        let err = open_flat(&p).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    // The extent file truncated below what the descriptor says.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("f-flat.vmdk"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let err = open_flat(&path).unwrap_err();
    assert!(
        err.to_string()
            .contains("is 1000 bytes but the descriptor needs 1048576"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    // A sparse extent given as a flat descriptor, and a missing extent.
    let sparse = fresh(dir.path());
    let err = open_flat(&sparse).unwrap_err();
    assert!(
        err.to_string().contains("not a monolithicFlat descriptor"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("f-flat.vmdk")).unwrap();
    let err = open_flat(&path).unwrap_err();
    assert!(
        matches!(&err, ImageError::Open { path, .. } if path.ends_with("f-flat.vmdk")),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random bytes over the metadata of a valid image: opening, reading,
    /// listing and writing give errors or work, never panic, and never grow the
    /// file by more than the grains a write may allocate.
    #[test]
    fn random_metadata_damage_never_panics(
        edits in prop::collection::vec((0u64..32 * 512, any::<u8>()), 1..24)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = fresh(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        for (at, v) in edits {
            patch(&path, at, &[v]);
        }
        if let Ok(mut img) = open(&path) {
            let size = img.size();
            let mut buf = vec![0u8; size.min(4 << 20) as usize];
            let _ = img.read_at(0, &mut buf);
            let _ = img.data_ranges(0, size);
            let _ = img.write_batch(&[WriteOp::Write { offset: size / 2, data: &[5u8; 512] }]);
            let _ = img.grow_to(size + 1);
        }
        prop_assert!(std::fs::metadata(&path).unwrap().len() <= len.max(64 * 512) + 4096 * 512);
    }
}
