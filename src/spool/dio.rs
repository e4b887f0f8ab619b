//! Direct I/O (`O_DIRECT`) support: block-aligned buffers, aligned reads, the
//! direct-mode write stage, and the probe that decides whether a spool directory
//! takes `O_DIRECT` at all.
//!
//! Direct I/O needs file offsets, lengths and memory addresses aligned to the
//! device's logical block size. The spool aligns all three to [`BLOCK`] (4096),
//! which covers 512- and 4096-byte devices; the probe at open checks that the
//! filesystem accepts exactly that, and the spool falls back to buffered I/O when
//! it does not (docs/SPOOL.md, "Direct I/O").

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

pub use crate::util::aligned::{AlignedBuf, BLOCK, ceil, ceil_usize, floor};

const BLOCK_U64: u64 = BLOCK as u64;

/// Name of the scratch file the probe writes in the spool directory (removed at
/// once; a leftover from a crash is removed by the next probe and ignored by
/// recovery).
pub const PROBE_FILE: &str = "DIRECT_IO_PROBE";

/// Open options with `O_DIRECT` added when `direct`.
pub fn open_options(direct: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

/// Read from the block-aligned offset `off` into `buf` (aligned, a whole number
/// of blocks) until at least `need` bytes are in or the file ends. Returns the
/// bytes read (at least `need`, at most `buf.len()`); a file that ends before
/// `need` bytes is `UnexpectedEof`. Works on direct and buffered descriptors.
pub fn read_aligned(file: &File, off: u64, buf: &mut [u8], need: usize) -> io::Result<usize> {
    debug_assert!(
        off.is_multiple_of(BLOCK_U64) && buf.len().is_multiple_of(BLOCK) && need <= buf.len()
    );
    let mut got = 0;
    while got < need {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                // A direct read is short only at the end of the file; the next
                // offset would not even be aligned.
                if !got.is_multiple_of(BLOCK) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got < need {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("file ends {got} bytes after offset {off}, {need} needed"),
        ));
    }
    Ok(got)
}

/// Read exactly `len` bytes at any offset `off` through an aligned bounce buffer
/// (for small reads such as a segment header).
pub fn read_exact_at(file: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let start = floor(off);
    let skip = (off - start) as usize;
    let mut buf = AlignedBuf::new(skip + len);
    let rd = ceil_usize(skip + len);
    read_aligned(file, start, &mut buf.bytes_mut()[..rd], skip + len)?;
    Ok(buf.bytes()[skip..skip + len].to_vec())
}

/// Check that `dir`'s filesystem takes direct I/O as the spool does it: create a
/// scratch file with `O_DIRECT`, write one aligned block, read it back with
/// `O_DIRECT`, remove the file. `Err` says why direct I/O cannot be used.
pub fn probe(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    if fault::refused(dir) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "O_DIRECT refused (test fault)",
        ));
    }
    let path = dir.join(PROBE_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let res = probe_file(&path);
    let _ = fs::remove_file(&path);
    res
}

fn probe_file(path: &Path) -> io::Result<()> {
    let f = open_options(true)
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut out = AlignedBuf::new(BLOCK);
    for (i, b) in out.bytes_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f.write_all_at(out.bytes(), 0)?;
    let mut back = AlignedBuf::new(BLOCK);
    read_aligned(&f, 0, back.bytes_mut(), BLOCK)?;
    if back.bytes() != out.bytes() {
        return Err(io::Error::other(
            "a block written with O_DIRECT read back different",
        ));
    }
    Ok(())
}

/// Capacity of the write stage: appends are copied into it and written out in
/// chunks of this size (and at the end of each group commit).
pub const STAGE_BYTES: usize = 1 << 20;

/// The direct-mode write buffer of the writer thread, bound to one segment at a
/// time. It holds the segment's bytes from the block-aligned offset `base` on:
/// first the part of the last block that is already in the file (`written`
/// bytes), then bytes not yet written. A flush writes `[0, ceil(fill))` with
/// zero padding in one `pwrite` at `base`, then keeps only the last partial
/// block, moved to the front. Its capacity is fixed ([`STAGE_BYTES`]): a large
/// frame is written in several chunks, so memory stays bounded whatever the
/// frame and batch sizes.
pub struct Stage {
    buf: AlignedBuf,
    base: u64,
    fill: usize,
    written: usize,
}

impl Stage {
    /// An empty stage.
    pub fn new() -> Self {
        Stage {
            buf: AlignedBuf::new(STAGE_BYTES),
            base: 0,
            fill: 0,
            written: 0,
        }
    }

    /// Bind to a segment whose logical length is `len` and whose last partial
    /// block (`[floor(len), len)`) holds `tail`.
    pub fn load(&mut self, len: u64, tail: &[u8]) {
        debug_assert_eq!(tail.len() as u64, len - floor(len));
        self.base = floor(len);
        self.buf.bytes_mut()[..tail.len()].copy_from_slice(tail);
        self.fill = tail.len();
        self.written = tail.len();
    }

    /// Bind to a segment of logical length `len`, reading its last partial block
    /// from `file` (aligned read of the whole block; a short read at the end of
    /// the file is fine as long as it reaches `len`).
    pub fn load_from(&mut self, file: &File, len: u64) -> io::Result<()> {
        let base = floor(len);
        let n = (len - base) as usize;
        if n > 0 {
            read_aligned(file, base, &mut self.buf.bytes_mut()[..BLOCK], n)?;
        }
        self.base = base;
        self.fill = n;
        self.written = n;
        Ok(())
    }

    /// The segment's logical end including staged bytes: where the next byte goes.
    pub fn end(&self) -> u64 {
        self.base + self.fill as u64
    }

    /// The logical length of what is in the file.
    pub fn written_end(&self) -> u64 {
        self.base + self.written as u64
    }

    /// The last partial block as it is in the file (valid after a flush).
    pub fn tail(&self) -> &[u8] {
        &self.buf.bytes()[..self.written]
    }

    /// Add `bytes` to the segment; full stages are written to `file` on the way.
    pub fn push(&mut self, file: &File, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let cap = self.buf.len();
            let n = bytes.len().min(cap - self.fill);
            self.buf.bytes_mut()[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == cap {
                self.flush(file)?;
            }
        }
        Ok(())
    }

    /// Write everything staged: `[base, base + ceil(fill))` in one aligned write,
    /// zero padded after the logical end. Keeps the last partial block.
    pub fn flush(&mut self, file: &File) -> io::Result<()> {
        if self.fill == self.written {
            return Ok(());
        }
        let padded = ceil_usize(self.fill);
        let buf = self.buf.bytes_mut();
        buf[self.fill..padded].fill(0);
        file.write_all_at(&buf[..padded], self.base)?;
        let keep_from = self.fill - self.fill % BLOCK;
        buf.copy_within(keep_from..self.fill, 0);
        self.base += keep_from as u64;
        self.fill -= keep_from;
        self.written = self.fill;
        Ok(())
    }
}

/// Test-only: make the probe fail for a directory, as on a filesystem without
/// `O_DIRECT`.
#[cfg(test)]
pub mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static REFUSED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Make the probe in `dir` fail.
    pub fn refuse(dir: &Path) {
        super::super::lock(&REFUSED).push(dir.to_path_buf());
    }

    pub(super) fn refused(dir: &Path) -> bool {
        super::super::lock(&REFUSED).iter().any(|d| d == dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct_file(dir: &Path) -> File {
        open_options(true)
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap()
    }

    #[test]
    fn rounding_and_alignment() {
        assert_eq!((floor(0), floor(4095), floor(4096)), (0, 0, 4096));
        assert_eq!(
            (ceil(0), ceil(1), ceil(4096), ceil(4097)),
            (0, 4096, 4096, 8192)
        );
        let b = AlignedBuf::new(5000);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.bytes().as_ptr() as usize % BLOCK, 0);
    }

    #[test]
    fn stage_writes_padded_blocks_and_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        probe(dir.path()).expect("O_DIRECT works in the test directory");
        assert!(!dir.path().join(PROBE_FILE).exists());
        let f = direct_file(dir.path());
        let mut st = Stage::new();
        st.load(0, &[]);
        let mut model = Vec::new();
        // Small pushes, a flush per push (each rewrites the tail block), then one
        // push larger than the stage.
        for i in 0..50u32 {
            let chunk: Vec<u8> = (0..(i * 97 % 1000 + 1)).map(|x| (x + i) as u8).collect();
            st.push(&f, &chunk).unwrap();
            model.extend_from_slice(&chunk);
            st.flush(&f).unwrap();
            assert_eq!(st.end(), model.len() as u64);
            assert_eq!(st.written_end(), model.len() as u64);
            let on_disk = fs::read(dir.path().join("f")).unwrap();
            assert_eq!(on_disk.len() as u64, ceil(model.len() as u64));
            assert_eq!(&on_disk[..model.len()], &model[..]);
            assert!(on_disk[model.len()..].iter().all(|&b| b == 0));
        }
        let big: Vec<u8> = (0..STAGE_BYTES * 2 + 123)
            .map(|x| (x % 253) as u8)
            .collect();
        st.push(&f, &big).unwrap();
        model.extend_from_slice(&big);
        assert!(st.written_end() > 0 && st.end() == model.len() as u64);
        st.flush(&f).unwrap();
        assert_eq!(st.tail(), &model[floor(model.len() as u64) as usize..]);

        // A fresh stage reloads the tail from the file and continues.
        let mut st2 = Stage::new();
        st2.load_from(&f, model.len() as u64).unwrap();
        assert_eq!(st2.tail(), st.tail());
        st2.push(&f, b"more").unwrap();
        st2.flush(&f).unwrap();
        model.extend_from_slice(b"more");
        let on_disk = fs::read(dir.path().join("f")).unwrap();
        assert_eq!(&on_disk[..model.len()], &model[..]);
        assert_eq!(
            read_exact_at(&f, 4090, 20).unwrap(),
            model[4090..4110].to_vec()
        );
        // A logical length beyond the end of the file cannot be loaded.
        let e = st2
            .load_from(&f, ceil(model.len() as u64) + 10)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
