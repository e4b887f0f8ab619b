//! Spill: append-only change-log files that hold captured writes' bytes when the
//! memory budget is full, in capture order.
//!
//! Each record is a 40-byte header followed by the data:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TMSP` |
//! | 4 | 4 | CRC32C of the data |
//! | 8 | 8 | seq |
//! | 16 | 8 | disk offset |
//! | 24 | 8 | capture time, µs |
//! | 32 | 4 | data length |
//! | 36 | 2 | disk id |
//! | 38 | 1 | version (1) |
//! | 39 | 1 | zero |
//!
//! Reading a record back checks every header field against the journal's own
//! entry and the data's checksum, so a corrupted or mismatched record is an
//! error, never wrong bytes in a frame. The files live in page cache and are
//! never fsync'd: after a crash they are discarded, since the persisted dirty
//! log covers every region they held. A segment is deleted once every entry in
//! it is acknowledged by the relay.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::image::sync::{pread_exact, pwrite_all};

/// Bytes of a record header.
pub const RECORD_HEADER: usize = 40;
/// A segment file is closed for appends past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const MAGIC: &[u8; 4] = b"TMSP";
const VERSION: u8 = 1;

/// Where a spilled entry's record is.
#[derive(Debug, Clone)]
pub struct SpillPos {
    file: Arc<File>,
    segment: u64,
    offset: u64,
}

impl SpillPos {
    /// Segment number.
    pub fn segment(&self) -> u64 {
        self.segment
    }
}

/// What a record says about its entry (checked when read back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpillMeta {
    /// Seq.
    pub seq: u64,
    /// Disk id.
    pub disk: u16,
    /// Disk offset.
    pub offset: u64,
    /// Capture time.
    pub time_us: u64,
    /// Data length.
    pub len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    live: u64,
}

/// The spill files of one group.
pub struct Spill {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    active: Option<u64>,
    next_id: u64,
    bytes: u64,
    records: u64,
}

impl Spill {
    /// Use `dir` for spill segments, deleting what an earlier run left there.
    pub fn open(dir: &Path) -> io::Result<Spill> {
        fs::create_dir_all(dir)?;
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".spill") {
                fs::remove_file(e.path())?;
            }
        }
        Ok(Spill {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            active: None,
            next_id: 1,
            bytes: 0,
            records: 0,
        })
    }

    /// Bytes in live segments (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records not yet released.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes a record of `len` data bytes takes.
    pub fn record_bytes(len: usize) -> u64 {
        (RECORD_HEADER + len) as u64
    }

    /// Append one record; returns where it is.
    pub fn append(&mut self, meta: SpillMeta, data: &[u8]) -> io::Result<SpillPos> {
        let id = match self.active {
            Some(id) if self.segments[&id].len < SEGMENT_BYTES => id,
            _ => self.new_segment()?,
        };
        let seg = self.segments.get_mut(&id).expect("active segment exists");
        let mut buf = Vec::with_capacity(RECORD_HEADER + data.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        buf.extend_from_slice(&meta.seq.to_le_bytes());
        buf.extend_from_slice(&meta.offset.to_le_bytes());
        buf.extend_from_slice(&meta.time_us.to_le_bytes());
        buf.extend_from_slice(&meta.len.to_le_bytes());
        buf.extend_from_slice(&meta.disk.to_le_bytes());
        buf.push(VERSION);
        buf.push(0);
        buf.extend_from_slice(data);
        let at = seg.len;
        pwrite_all(&seg.file, &buf, at)?;
        seg.len += buf.len() as u64;
        seg.live += 1;
        self.bytes += buf.len() as u64;
        self.records += 1;
        Ok(SpillPos {
            file: seg.file.clone(),
            segment: id,
            offset: at,
        })
    }

    fn new_segment(&mut self) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let path = self.dir.join(format!("{id:012}.spill"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                path,
                len: 0,
                live: 0,
            },
        );
        let old = self.active.replace(id);
        if let Some(old) = old {
            self.maybe_delete(old);
        }
        Ok(id)
    }

    /// The entry at `pos` (of `len` data bytes) is acknowledged: its record is no
    /// longer needed; a segment with no live record left is deleted.
    pub fn release(&mut self, pos: &SpillPos, len: u32) {
        if let Some(seg) = self.segments.get_mut(&pos.segment) {
            seg.live = seg.live.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(Self::record_bytes(len as usize));
            self.records = self.records.saturating_sub(1);
            self.maybe_delete(pos.segment);
        }
    }

    fn maybe_delete(&mut self, id: u64) {
        let Some(seg) = self.segments.get(&id) else {
            return;
        };
        if seg.live > 0 {
            return;
        }
        if self.active == Some(id) {
            // An empty active segment is reused from its start.
            if let Some(s) = self.segments.get_mut(&id)
                && s.len > 0
            {
                s.len = 0;
                let _ = s.file.set_len(0);
            }
            return;
        }
        if let Some(seg) = self.segments.remove(&id)
            && let Err(e) = fs::remove_file(&seg.path)
        {
            tracing::warn!(path = %seg.path.display(), "cannot delete spill segment: {e}");
        }
    }
}

/// Read the data of the record at `pos`, checking it belongs to `meta`. Needs no
/// lock: the record stays until its entry is released.
pub fn read(pos: &SpillPos, meta: SpillMeta) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; RECORD_HEADER + meta.len as usize];
    pread_exact(&pos.file, &mut buf, pos.offset)?;
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "spill segment {} offset {}: {what}",
                pos.segment, pos.offset
            ),
        )
    };
    if &buf[0..4] != MAGIC || buf[38] != VERSION {
        return Err(bad("bad magic or version".into()));
    }
    let got = SpillMeta {
        seq: u64::from_le_bytes(buf[8..16].try_into().expect("8")),
        offset: u64::from_le_bytes(buf[16..24].try_into().expect("8")),
        time_us: u64::from_le_bytes(buf[24..32].try_into().expect("8")),
        len: u32::from_le_bytes(buf[32..36].try_into().expect("4")),
        disk: u16::from_le_bytes(buf[36..38].try_into().expect("2")),
    };
    if got != meta {
        return Err(bad(format!("record is {got:?}, expected {meta:?}")));
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4"));
    if crc32c::crc32c(&buf[RECORD_HEADER..]) != crc {
        return Err(bad(format!("data checksum mismatch (seq {})", meta.seq)));
    }
    buf.drain(..RECORD_HEADER);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn meta(seq: u64, len: u32) -> SpillMeta {
        SpillMeta {
            seq,
            disk: 3,
            offset: seq * 4096,
            time_us: 77,
            len,
        }
    }

    #[test]
    fn golden_record_header() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spill::open(d.path()).unwrap();
        let pos = s.append(meta(1, 3), b"abc").unwrap();
        let bytes = fs::read(d.path().join("000000000001.spill")).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(b"TMSP");
        want.extend_from_slice(&crc32c::crc32c(b"abc").to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&4096u64.to_le_bytes());
        want.extend_from_slice(&77u64.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(&3u16.to_le_bytes());
        want.extend_from_slice(&[1, 0]);
        want.extend_from_slice(b"abc");
        assert_eq!(bytes, want);
        assert_eq!(read(&pos, meta(1, 3)).unwrap(), b"abc");
    }

    #[test]
    fn round_trip_release_and_leftovers() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("000000000009.spill"), b"old").unwrap();
        let mut s = Spill::open(d.path()).unwrap();
        assert!(
            !d.path().join("000000000009.spill").exists(),
            "leftovers are deleted"
        );
        let a = s.append(meta(1, 4), &[1; 4]).unwrap();
        let b = s.append(meta(2, 5), &[2; 5]).unwrap();
        assert_eq!(s.records(), 2);
        assert_eq!(s.bytes(), 2 * RECORD_HEADER as u64 + 9);
        assert_eq!(read(&b, meta(2, 5)).unwrap(), vec![2; 5]);
        s.release(&a, 4);
        s.release(&b, 5);
        assert_eq!((s.records(), s.bytes()), (0, 0));
    }

    #[test]
    fn corruption_and_mismatch_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spill::open(d.path()).unwrap();
        let pos = s.append(meta(5, 8), &[9; 8]).unwrap();
        let e = read(&pos, meta(6, 8)).unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join("000000000001.spill"))
            .unwrap();
        f.write_all_at(&[0], RECORD_HEADER as u64 + 2).unwrap();
        let e = read(&pos, meta(5, 8)).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let short = read(&pos, meta(5, 800));
        assert!(short.is_err());
    }
}
