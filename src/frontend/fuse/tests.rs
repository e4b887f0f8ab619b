//! The FUSE file through the kernel: each test mounts a directory in a temp dir
//! over a real backing file and uses it with ordinary system calls.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::fcntl::{FallocateFlags, fallocate};

use super::testutil::{Fixture, TestDisk, backing_image, pattern, require_fuse};
use super::*;
use crate::capture::backing::BackingDisk;

const MIB: u64 = 1 << 20;

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn read_backing(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0; len];
    f.read_exact(&mut v).unwrap();
    v
}

fn is_mounted(dir: &Path) -> bool {
    let shown = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*shown))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `BlockIo` that refuses writes (for the read-only file).
struct ReadOnly(BackingDisk);

impl BlockIo for ReadOnly {
    fn size(&self) -> u64 {
        BlockIo::size(&self.0)
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), crate::frontend::IoError> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, o: u64, d: Vec<u8>, _: bool) -> Result<(), crate::frontend::IoError> {
        Err(crate::frontend::IoError::new(
            crate::frontend::Op::Write,
            o,
            d.len() as u64,
            crate::frontend::IoErrorKind::ReadOnly,
        ))
    }
    fn flush(&self) -> Result<(), crate::frontend::IoError> {
        Ok(())
    }
    fn trim(&self, o: u64, l: u64, _: bool) -> Result<(), crate::frontend::IoError> {
        Err(crate::frontend::IoError::new(
            crate::frontend::Op::Trim,
            o,
            l,
            crate::frontend::IoErrorKind::ReadOnly,
        ))
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        _: bool,
        _: bool,
    ) -> Result<(), crate::frontend::IoError> {
        Err(crate::frontend::IoError::new(
            crate::frontend::Op::WriteZeroes,
            o,
            l,
            crate::frontend::IoErrorKind::ReadOnly,
        ))
    }
}

#[test]
fn files_have_the_disks_size_mode_owner_and_stable_inodes() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = backing_image(dir.path(), "a.img", 3 * MIB + 512);
    let (_, b) = backing_image(dir.path(), "b.img", MIB);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let files = vec![
        FuseFile {
            name: "data disk".into(),
            disk: Arc::new(a),
        },
        FuseFile {
            name: "ro".into(),
            disk: Arc::new(ReadOnly(b)),
        },
    ];
    let opts = FuseOptions {
        file_mode: 0o640,
        ..FuseOptions::default()
    };
    let m = mount(&mnt, files, &opts).unwrap();
    assert_eq!(m.mountpoint(), mnt.canonicalize().unwrap());
    assert!(m.file_path("nope").is_none());

    let root = std::fs::metadata(m.mountpoint()).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.mode() & 0o7777, 0o755);

    let a = std::fs::metadata(m.file_path("data disk").unwrap()).unwrap();
    assert!(a.is_file());
    assert_eq!(a.len(), 3 * MIB + 512);
    assert_eq!(a.mode(), libc::S_IFREG | 0o640);
    assert_eq!(a.uid(), nix::unistd::geteuid().as_raw());
    assert_eq!(a.gid(), nix::unistd::getegid().as_raw());
    assert!(a.mtime() > 0);
    let ro = std::fs::metadata(m.file_path("ro").unwrap()).unwrap();
    assert_eq!(
        ro.mode() & 0o7777,
        0o440,
        "a read-only disk loses the write bits"
    );
    assert_ne!(a.ino(), ro.ino());
    let again = std::fs::metadata(m.file_path("data disk").unwrap()).unwrap();
    assert_eq!(again.ino(), a.ino(), "inode numbers are stable");

    let mut names: Vec<String> = std::fs::read_dir(m.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data disk", "ro"]);
    assert_eq!(
        errno_of(&std::fs::metadata(m.mountpoint().join("missing")).unwrap_err()),
        libc::ENOENT
    );

    let st = nix::sys::statvfs::statvfs(m.mountpoint()).unwrap();
    assert_eq!(st.block_size(), 4096);
    assert_eq!(st.blocks(), (3 * MIB + 512).div_ceil(4096) + MIB / 4096);
    assert_eq!(st.files(), 3);
    assert_eq!(st.name_max(), 255);

    // The read-only disk opens for reading only.
    let e = rw(&m.file_path("data disk").unwrap());
    drop(e);
    let err = OpenOptions::new()
        .write(true)
        .open(m.file_path("ro").unwrap())
        .unwrap_err();
    assert_eq!(errno_of(&err), libc::EROFS);
    let mut buf = vec![1u8; 100];
    File::open(m.file_path("ro").unwrap())
        .unwrap()
        .read_exact_at(&mut buf, 4096)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    assert_eq!(m.unmount().unwrap(), Unmounted::Clean);
    assert!(!is_mounted(&mnt.canonicalize().unwrap()));
}

#[test]
fn unaligned_writes_and_reads_round_trip_through_the_backing_file() {
    let size = 8 * MIB;
    let (fx, _disk) = Fixture::new("disk", size, &FuseOptions::default(), |d| d);
    let f = rw(&fx.file);
    // Odd offsets and lengths, including writes larger than one FUSE request
    // (the kernel splits them at max_write) and ones ending exactly at the end.
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (1, 7),
        (4095, 2),
        (12_345, 4097),
        (MIB - 3, 65_537),
        (2 * MIB + 1, 3 * MIB as usize + 5),
        (size - 777, 777),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        f.write_all_at(&data, off).unwrap();
        let mut back = vec![0; len];
        f.read_exact_at(&mut back, off).unwrap();
        assert!(back == data, "read back of {len} bytes at {off} differs");
        assert!(
            read_backing(&fx.backing, off, len) == data,
            "backing file differs for {len} bytes at {off}"
        );
    }
    // The whole file equals the backing file.
    let served = std::fs::read(&fx.file).unwrap();
    let backing = std::fs::read(&fx.backing).unwrap();
    assert_eq!(served.len() as u64, size);
    assert!(
        served == backing,
        "served file differs from the backing file"
    );
    let s = fx.mount().stats().snapshot();
    assert!(s.writes >= cases.len() as u64 && s.bytes_written >= 3 * MIB);
    assert!(s.reads > 0 && s.bytes_read >= size);
    assert_eq!(s.errors, 0);
    assert!(s.serving);
}

#[test]
fn writes_past_the_end_are_enospc_and_reads_past_it_are_short() {
    let size = MIB;
    let (fx, _disk) = Fixture::new("disk", size, &FuseOptions::default(), |d| d);
    let f = rw(&fx.file);
    let before = std::fs::read(&fx.backing).unwrap();
    for (off, len) in [(size - 100, 200), (size, 1), (size + 4096, 4096)] {
        let err = f.write_at(&vec![0xab; len], off).unwrap_err();
        assert_eq!(errno_of(&err), libc::ENOSPC, "write of {len} at {off}");
    }
    assert!(
        std::fs::read(&fx.backing).unwrap() == before,
        "a refused write changed the backing file"
    );
    assert_eq!(std::fs::metadata(&fx.file).unwrap().len(), size);
    f.write_all_at(&[7; 100], size - 100).unwrap();

    let mut buf = vec![0u8; 4096];
    assert_eq!(f.read_at(&mut buf, size - 10).unwrap(), 10);
    assert_eq!(&buf[..10], &[7; 10]);
    assert_eq!(f.read_at(&mut buf, size).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, size + MIB).unwrap(), 0);
    assert!(fx.mount().stats().snapshot().errors >= 3);
}

#[test]
fn fallocate_punches_zeroes_and_never_grows() {
    let size = 4 * MIB;
    let (fx, _disk) = Fixture::new("disk", size, &FuseOptions::default(), |d| d);
    let f = rw(&fx.file);
    let data = pattern(9, 2 * MIB as usize);
    f.write_all_at(&data, 0).unwrap();
    let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;

    fallocate(&f, FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep, 8192, 65536).unwrap();
    fallocate(&f, FallocateFlags::FALLOC_FL_ZERO_RANGE, 100_001, 5000).unwrap();
    let mut back = vec![0; 2 * MIB as usize];
    f.read_exact_at(&mut back, 0).unwrap();
    let mut expect = data.clone();
    expect[8192..8192 + 65536].fill(0);
    expect[100_001..105_001].fill(0);
    assert!(
        back == expect,
        "punched / zeroed ranges do not read as zeros"
    );
    assert!(read_backing(&fx.backing, 0, 2 * MIB as usize) == expect);

    // Plain allocation inside the file: nothing to do, data kept.
    fallocate(&f, FallocateFlags::empty(), 0, MIB as i64).unwrap();
    f.read_exact_at(&mut back[..4096], 0).unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    // KEEP_SIZE past the end: the file does not grow; punching past the end
    // acts on the part inside.
    fallocate(&f, keep, size as i64 - 4096, 2 * MIB as i64).unwrap();
    f.write_all_at(&[5; 4096], size - 4096).unwrap();
    fallocate(
        &f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep,
        size as i64 - 4096,
        MIB as i64,
    )
    .unwrap();
    f.read_exact_at(&mut back[..4096], size - 4096).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    // Anything growing the file is refused.
    for mode in [
        FallocateFlags::empty(),
        FallocateFlags::FALLOC_FL_ZERO_RANGE,
    ] {
        let e = fallocate(&f, mode, size as i64 - 10, 20).unwrap_err();
        assert_eq!(e as i32, libc::ENOSPC, "{mode:?}");
    }
    assert_eq!(std::fs::metadata(&fx.file).unwrap().len(), size);
    let s = fx.mount().stats().snapshot();
    assert_eq!((s.trims, s.zeroes), (2, 1));
}

#[test]
fn size_mode_owner_and_namespace_changes_are_refused() {
    let size = MIB;
    let (fx, _disk) = Fixture::new("disk", size, &FuseOptions::default(), |d| d);
    let mnt = fx.mount().mountpoint().to_path_buf();
    let f = rw(&fx.file);
    f.write_all_at(&[1; 10], 0).unwrap();

    assert_eq!(errno_of(&f.set_len(size / 2).unwrap_err()), libc::EPERM);
    assert_eq!(errno_of(&f.set_len(size * 2).unwrap_err()), libc::EPERM);
    f.set_len(size).unwrap();
    // O_TRUNC on open would truncate: refused, the data stays.
    let e = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&fx.file)
        .unwrap_err();
    assert_eq!(errno_of(&e), libc::EPERM);
    let mut b = [0u8; 10];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, [1; 10]);

    let refused = [
        File::create(mnt.join("new")).map(drop),
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(mnt.join("new2"))
            .map(drop),
        std::fs::create_dir(mnt.join("d")),
        std::fs::remove_file(&fx.file),
        std::fs::rename(&fx.file, mnt.join("renamed")),
        std::os::unix::fs::symlink("disk", mnt.join("link")),
        std::fs::hard_link(&fx.file, mnt.join("hard")),
        std::fs::set_permissions(&fx.file, std::fs::Permissions::from_mode(0o644)),
        std::os::unix::fs::chown(&fx.file, Some(12345), None),
    ];
    for (i, r) in refused.into_iter().enumerate() {
        let e = r.expect_err(&format!("case {i} succeeded"));
        assert_eq!(errno_of(&e), libc::EPERM, "case {i}: {e}");
    }
    // Setting what already is, and setting times, works.
    std::fs::set_permissions(&fx.file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    f.set_modified(t).unwrap();
    assert_eq!(std::fs::metadata(&fx.file).unwrap().mtime(), 1_700_000_000);
    let names: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn fsync_and_close_after_writing_flush_and_o_dsync_writes_are_fua() {
    let (fx, disk) = Fixture::new("disk", MIB, &FuseOptions::default(), TestDisk::new);
    let flushes = || disk.flushes.load(Ordering::SeqCst);

    let f = rw(&fx.file);
    f.write_all_at(&[1; 4096], 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(flushes(), 1, "fsync flushes the disk");
    f.sync_data().unwrap();
    assert_eq!(flushes(), 2, "fdatasync flushes the disk");
    drop(f);
    assert_eq!(
        flushes(),
        2,
        "close with nothing written since the fsync: no flush"
    );

    let f = rw(&fx.file);
    f.write_all_at(&[2; 4096], 4096).unwrap();
    drop(f);
    assert_eq!(flushes(), 3, "close after writing flushes");
    drop(File::open(&fx.file).unwrap());
    assert_eq!(flushes(), 3, "open and close for reading: no flush");

    assert_eq!(disk.fua_writes.load(Ordering::SeqCst), 0);
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&fx.file)
        .unwrap();
    f.write_all_at(&[3; 512], 8192).unwrap();
    assert_eq!(
        disk.fua_writes.load(Ordering::SeqCst),
        1,
        "O_DSYNC write is FUA"
    );
    assert!(fx.mount().stats().snapshot().flushes >= 3);
}

#[test]
fn eio_and_panics_of_the_disk_reach_the_caller_and_serving_goes_on() {
    let bad = MIB..MIB + 4096;
    let (fx, _disk) = Fixture::new("disk", 4 * MIB, &FuseOptions::default(), |d| TestDisk {
        eio: Some(bad.clone()),
        panic: Some(3 * MIB..3 * MIB + 1),
        ..TestDisk::new(d)
    });
    let f = rw(&fx.file);
    let mut buf = vec![0u8; 8192];
    for round in 0..3 {
        let e = f.read_at(&mut buf, MIB - 4096).unwrap_err();
        assert_eq!(errno_of(&e), libc::EIO, "round {round}: read");
        let e = f.write_at(&[9; 100], MIB + 4000).unwrap_err();
        assert_eq!(errno_of(&e), libc::EIO, "round {round}: write");
        let e = f.write_at(&[9; 100], 3 * MIB - 50).unwrap_err();
        assert_eq!(errno_of(&e), libc::EIO, "round {round}: panicking disk");
        // Elsewhere, requests are served.
        f.write_all_at(&[round as u8 + 1; 8192], 0).unwrap();
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == round as u8 + 1));
    }
    let e = fallocate(
        &f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        MIB as i64,
        4096,
    )
    .unwrap_err();
    assert_eq!(e as i32, libc::EIO);
    let s = fx.mount().stats().snapshot();
    assert_eq!(s.errors, 10);
    assert!(s.serving);
}

#[test]
fn writes_are_served_in_parallel() {
    let opts = FuseOptions {
        threads: 4,
        ..FuseOptions::default()
    };
    let (fx, disk) = Fixture::new("disk", 16 * MIB, &opts, |d| TestDisk {
        write_delay: Duration::from_millis(50),
        ..TestDisk::new(d)
    });
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let path = fx.file.clone();
            s.spawn(move || {
                let f = rw(&path);
                for i in 0..5u64 {
                    f.write_all_at(&pattern(t * 10 + i, 4096), (t * 5 + i) * 65536)
                        .unwrap();
                }
            });
        }
    });
    let took = start.elapsed();
    let max = disk.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max >= 2,
        "writes never overlapped (max in flight {max}, {took:?} for 20)"
    );
    for t in 0..4u64 {
        for i in 0..5u64 {
            let off = (t * 5 + i) * 65536;
            assert!(read_backing(&fx.backing, off, 4096) == pattern(t * 10 + i, 4096));
        }
    }
}

#[test]
fn unmount_is_clean_when_idle_and_lazy_while_a_file_is_open() {
    let (mut fx, _disk) = Fixture::new("disk", MIB, &FuseOptions::default(), |d| d);
    let mnt = fx.mount().mountpoint().to_path_buf();
    let stats = fx.mount().stats();
    let f = rw(&fx.file);
    f.write_all_at(b"before", 0).unwrap();

    let m = fx.mount.take().unwrap();
    assert_eq!(m.unmount().unwrap(), Unmounted::Lazy);
    assert!(
        !is_mounted(&mnt),
        "still in the mount table after a lazy unmount"
    );
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    // The open file is still served.
    f.write_all_at(b"after", 100).unwrap();
    let mut b = [0u8; 5];
    f.read_exact_at(&mut b, 100).unwrap();
    assert_eq!(&b, b"after");
    assert!(stats.snapshot().serving);
    drop(f);
    wait_until(
        "the session to end after the last close",
        Duration::from_secs(10),
        || !stats.snapshot().serving,
    );
    assert_eq!(&read_backing(&fx.backing, 100, 5), b"after");

    // Idle: a plain unmount, the threads stopped when it returns.
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = backing_image(dir.path(), "x.img", MIB);
    let mnt = dir.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let files = vec![FuseFile {
        name: "x".into(),
        disk: Arc::new(d),
    }];
    let m = mount(&mnt, files, &FuseOptions::default()).unwrap();
    let stats = m.stats();
    std::fs::read(m.file_path("x").unwrap()).unwrap();
    assert_eq!(m.unmount().unwrap(), Unmounted::Clean);
    assert!(!stats.snapshot().serving);
    assert!(!is_mounted(&mnt.canonicalize().unwrap()));

    // Drop unmounts too.
    let files = vec![FuseFile {
        name: "y".into(),
        disk: Arc::new(BackingDisk::open(&dir.path().join("x.img")).unwrap()),
    }];
    let m = mount(&mnt, files, &FuseOptions::default()).unwrap();
    let stats = m.stats();
    drop(m);
    assert!(!stats.snapshot().serving);
    assert!(!is_mounted(&mnt.canonicalize().unwrap()));
}

#[test]
fn bad_names_options_and_mountpoints_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (img, d) = backing_image(dir.path(), "d.img", MIB);
    let disk: Arc<dyn BlockIo> = Arc::new(d);
    let file = |name: &str| FuseFile {
        name: name.into(),
        disk: disk.clone(),
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let opts = FuseOptions::default();

    let long = "x".repeat(256);
    for (name, why) in [
        ("", "empty"),
        (".", "reserved"),
        ("..", "reserved"),
        ("a/b", "'/'"),
        ("a\0b", "NUL"),
        (long.as_str(), "255"),
    ] {
        let e = mount(&mnt, vec![file(name)], &opts).unwrap_err();
        assert!(matches!(e, FuseError::InvalidName { .. }), "{name:?}: {e}");
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(e.kind(), ErrorKind::Config);
    }
    let e = mount(&mnt, vec![file("a"), file("a")], &opts).unwrap_err();
    assert!(
        e.to_string().contains("duplicate") && e.to_string().contains("\"a\""),
        "{e}"
    );

    for bad in [
        FuseOptions {
            file_mode: 0o4600,
            ..opts.clone()
        },
        FuseOptions {
            threads: 0,
            ..opts.clone()
        },
        FuseOptions {
            max_background: 0,
            ..opts.clone()
        },
    ] {
        let e = mount(&mnt, vec![file("a")], &bad).unwrap_err();
        assert!(matches!(e, FuseError::InvalidOptions(_)), "{e}");
    }

    let e = mount(&dir.path().join("missing"), vec![file("a")], &opts).unwrap_err();
    assert!(
        e.to_string().contains("does not exist") && e.to_string().contains("missing"),
        "{e}"
    );
    let e = mount(&img, vec![file("a")], &opts).unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
    let e = mount(dir.path(), vec![file("a")], &opts).unwrap_err();
    assert!(e.to_string().contains("is not empty"), "{e}");
    assert_eq!(e.kind(), ErrorKind::Config);

    let e = check_dev_fuse(&dir.path().join("no-fuse-device")).unwrap_err();
    assert!(matches!(e, FuseError::DevFuseMissing));
    assert!(e.to_string().contains("/dev/fuse does not exist"), "{e}");
    let e = check_privilege(&mnt, false, false, false).unwrap_err();
    assert!(e.to_string().contains("not running as root"), "{e}");
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert!(check_privilege(&mnt, true, true, false).is_ok());
    assert!(check_privilege(&mnt, false, false, true).is_ok());
    let e = mount_error(&mnt, false, std::io::Error::from_raw_os_error(libc::EPERM));
    assert!(matches!(e, FuseError::Privilege { .. }), "{e}");
    let e = mount_error(&mnt, true, std::io::Error::from_raw_os_error(libc::ENODEV));
    assert!(matches!(e, FuseError::Mount { .. }), "{e}");
    assert!(!e.to_string().contains('\n'));
}

#[test]
#[should_panic(expected = "prerequisite missing: `no-such-tool-for-tidemark` not found")]
fn a_missing_tool_fails_the_test_naming_it() {
    super::testutil::require_tool("no-such-tool-for-tidemark", "nothing");
}
