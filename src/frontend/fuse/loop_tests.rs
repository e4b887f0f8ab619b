//! A real file system on the FUSE file: a loop device on it (buffered, and with
//! `--direct-io=on`), ext4 made and filled through it, then `e2fsck` on the
//! backing file and a byte comparison of the backing file with what the FUSE
//! file serves.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::testutil::{Fixture, LoopDev, Mounted, pattern, require_tool, run, run_ok};
use super::{FuseOptions, Unmounted};

const MIB: u64 = 1 << 20;
const SMALL_FILES: usize = 3000;
const DIRS: usize = 30;
const LARGE_FILES: usize = 4;
const LARGE_SIZE: usize = 12 * MIB as usize;

fn small_len(i: usize) -> usize {
    // 0 to ~12 KiB, deterministic.
    (pattern(i as u64 ^ 0x5eed, 2)[0] as usize) * 48 + (i % 7)
}

fn small_path(root: &Path, i: usize) -> std::path::PathBuf {
    root.join(format!("d{:02}", i % DIRS))
        .join(format!("f{i:05}"))
}

/// Write the seeded tree: small files (every 100th fsync'd) and large ones
/// (each fsync'd).
fn write_tree(root: &Path) {
    for d in 0..DIRS {
        std::fs::create_dir(root.join(format!("d{d:02}"))).unwrap();
    }
    for i in 0..SMALL_FILES {
        let mut f = File::create(small_path(root, i)).unwrap();
        f.write_all(&pattern(i as u64, small_len(i))).unwrap();
        if i % 100 == 0 {
            f.sync_all().unwrap();
        }
    }
    for i in 0..LARGE_FILES {
        let mut f = File::create(root.join(format!("large{i}"))).unwrap();
        f.write_all(&pattern(1_000_000 + i as u64, LARGE_SIZE))
            .unwrap();
        f.sync_all().unwrap();
    }
}

fn verify_tree(root: &Path) {
    for i in 0..SMALL_FILES {
        let got = std::fs::read(small_path(root, i)).unwrap();
        assert!(
            got == pattern(i as u64, small_len(i)),
            "file {} differs",
            small_path(root, i).display()
        );
    }
    for i in 0..LARGE_FILES {
        let got = std::fs::read(root.join(format!("large{i}"))).unwrap();
        assert!(
            got == pattern(1_000_000 + i as u64, LARGE_SIZE),
            "large{i} differs"
        );
    }
}

/// Compare two files of equal size in bounded chunks.
fn assert_same_bytes(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "sizes differ");
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let at = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + at as u64
            );
        }
        off += n as u64;
    }
}

fn ext4_through_a_loop_device(direct_io: bool) {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    require_tool("losetup", "mount");
    let size = 320 * MIB;
    let (mut fx, _disk) = Fixture::new("disk", size, &FuseOptions::default(), |d| d);
    let stats = fx.mount().stats();
    let ext4_dir = fx.dir.path().join("ext4");
    std::fs::create_dir(&ext4_dir).unwrap();

    let lo = LoopDev::attach(&fx.file, direct_io);
    assert_eq!(
        lo.direct_io(),
        direct_io,
        "{}: loop direct I/O is not what was asked (the FUSE file must accept O_DIRECT)",
        lo.dev
    );
    run_ok(
        Command::new(&mkfs).args(["-q", "-F"]).arg(&lo.dev),
        Duration::from_secs(180),
    );
    assert!(
        stats.snapshot().trims > 0,
        "mkfs.ext4 discarded nothing: the loop device does not pass discards on as hole punches"
    );

    let fs = Mounted::mount(&lo.dev, &ext4_dir, None);
    write_tree(&ext4_dir);
    fs.unmount();
    let fs = Mounted::mount(&lo.dev, &ext4_dir, Some("ro"));
    verify_tree(&ext4_dir);
    fs.unmount();
    lo.detach();

    let s = stats.snapshot();
    assert!(
        s.bytes_written >= (LARGE_FILES * LARGE_SIZE) as u64,
        "{s:?}"
    );
    assert!(
        s.flushes > 0,
        "ext4's flushes never reached the disk: {s:?}"
    );
    assert_eq!(s.errors, 0, "{s:?}");

    assert_same_bytes(&fx.file, &fx.backing);
    let m = fx.mount.take().unwrap();
    assert_eq!(m.unmount().unwrap(), Unmounted::Clean);
    let out = run(
        Command::new(&e2fsck).arg("-fn").arg(&fx.backing),
        Duration::from_secs(180),
    );
    assert!(
        out.status.success(),
        "e2fsck -fn on the backing file: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ext4_on_a_buffered_loop_device_is_clean_and_the_backing_file_matches() {
    ext4_through_a_loop_device(false);
}

#[test]
fn ext4_on_a_direct_io_loop_device_is_clean_and_the_backing_file_matches() {
    ext4_through_a_loop_device(true);
}

#[test]
fn unmount_while_a_loop_device_holds_the_file_is_lazy_and_the_device_keeps_working() {
    use std::os::unix::fs::FileExt;
    let (mut fx, _disk) = Fixture::new("disk", 16 * MIB, &FuseOptions::default(), |d| d);
    let stats = fx.mount().stats();
    let lo = LoopDev::attach(&fx.file, true);
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .unwrap();
    let (a, b) = (pattern(1, MIB as usize), pattern(2, MIB as usize));
    dev.write_all_at(&a, 0).unwrap();
    dev.sync_all().unwrap();

    let m = fx.mount.take().unwrap();
    assert_eq!(m.unmount().unwrap(), Unmounted::Lazy);
    // The loop device still reaches the disk.
    dev.write_all_at(&b, 4 * MIB).unwrap();
    dev.sync_all().unwrap();
    drop(dev);
    assert!(stats.snapshot().serving);
    lo.detach();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.snapshot().serving {
        assert!(
            std::time::Instant::now() < deadline,
            "still served 10 s after the loop device was detached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let backing = std::fs::read(&fx.backing).unwrap();
    assert!(backing[..MIB as usize] == a[..], "first write missing");
    assert!(
        backing[4 * MIB as usize..5 * MIB as usize] == b[..],
        "write after the lazy unmount missing"
    );
}
