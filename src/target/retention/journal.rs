//! The retention journal's on-disk format (version 1): segment files of
//! records, written by the target's apply thread and read by `recover`,
//! `expose` and `promote` (possibly in other processes, while the target keeps
//! appending). docs/CONSISTENCY.md has the byte tables; the golden tests below
//! pin them.
//!
//! A group's journal is a directory of segments `<n>.rj` (n = 16 hex digits,
//! increasing). Each starts with a 64-byte header; records follow back to back:
//!
//! * **Point** — epoch *e* begins at this recovery point (frame, seq, time,
//!   kind, tag name); the images that follow, up to the next Point, belong to
//!   epoch *e*.
//! * **Image** — the content of a 4 KiB-aligned range of a disk as it was at the
//!   start of its epoch, saved before the range was first overwritten in the
//!   epoch.
//! * **Zero image** — the same for a range that read as zeros (no payload).
//!
//! Every record header carries its own CRC32C, so a reader checks it before it
//! trusts any length, and a CRC32C of its data, checked when the data is used.
//! A record that is incomplete at the end of the newest segment is a torn tail
//! (an append that did not finish): the writer cuts it at open, a concurrent
//! reader treats it as the current end.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::error::{Classify, ErrorKind};

/// Magic at offset 0 of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TMRJSEG1";
/// Magic at offset 0 of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"TMRR";
/// Segment header size.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Record header size.
pub const RECORD_HEADER_LEN: usize = 48;
/// Granularity of before-images: every image starts and (but at the end of a
/// disk) ends on a multiple of this.
pub const BLOCK: u64 = 4096;
/// Largest payload of one record (image data, or a point's tag name).
pub const MAX_RECORD_DATA: u32 = 1 << 20;
/// Longest tag name in a point record.
pub const MAX_TAG_LEN: usize = 255;
/// Rotate to a new segment once the active one passes this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Versions of the journal format; each variant's doc is the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FormatVersion {
    /// First version: 64-byte segment header, 48-byte record header with a
    /// header CRC and a data CRC; record kinds Point, Image, ZeroImage.
    V1 = 1,
}

const KIND_POINT: u8 = 1;
const KIND_IMAGE: u8 = 2;
const KIND_ZERO: u8 = 3;

/// What a recovery point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// A crash-consistent point (a W frame boundary).
    Crash,
    /// An application-consistent tag (file systems frozen, hooks ran).
    App,
    /// A user's bookmark tag (crash-consistent).
    Tag,
}

impl PointKind {
    fn code(self) -> u8 {
        match self {
            PointKind::Crash => 0,
            PointKind::App => 1,
            PointKind::Tag => 2,
        }
    }

    fn from_code(c: u8) -> Option<PointKind> {
        match c {
            0 => Some(PointKind::Crash),
            1 => Some(PointKind::App),
            2 => Some(PointKind::Tag),
            _ => None,
        }
    }

    /// Lower-case name, as in the catalog and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
            PointKind::Tag => "tag",
        }
    }
}

/// A recovery point that begins an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRec {
    /// The epoch it begins.
    pub epoch: u64,
    /// Last frame applied at the point.
    pub frame_no: u64,
    /// Last seq applied at the point.
    pub last_seq: u64,
    /// Source capture time of that seq, µs.
    pub time_us: u64,
    /// What kind of point.
    pub kind: PointKind,
    /// The tag's name, for tag points.
    pub tag: Option<String>,
}

/// One record's header, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordHead {
    /// A point (its tag name, if any, is in the data).
    Point(PointRec),
    /// A before-image of `len` bytes at `offset` of `disk`, saved in `epoch`;
    /// `zero` when the range read as zeros (no data stored).
    Image {
        /// Epoch.
        epoch: u64,
        /// Disk id.
        disk: u16,
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u32,
        /// The range read as zeros.
        zero: bool,
        /// CRC32C of the stored data.
        data_crc: u32,
    },
}

/// Where a record lives: segment number and byte offset of its header.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Loc {
    /// Segment number.
    pub seg: u64,
    /// Offset of the record header in the segment.
    pub pos: u64,
}

/// Errors of the retention journal. Each names the file and offset.
#[derive(Debug, Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("retention journal: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// File or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Bytes that are not a valid segment header or record.
    #[error("retention journal: {} at offset {offset}: {what}", path.display())]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Offset of the bad structure.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A segment was written by a newer format version.
    #[error("retention journal: {} is format version {version}, newer than this build reads (1)", path.display())]
    Version {
        /// Segment file.
        path: PathBuf,
        /// Its version.
        version: u16,
    },
    /// A record the caller asked for is gone (trimmed).
    #[error("retention journal: segment {seg} no longer exists (trimmed)")]
    Trimmed {
        /// The segment.
        seg: u64,
    },
}

impl Classify for JournalError {
    fn kind(&self) -> ErrorKind {
        match self {
            JournalError::Io { .. } => ErrorKind::Io,
            JournalError::Corrupt { .. } | JournalError::Version { .. } => ErrorKind::Corrupt,
            JournalError::Trimmed { .. } => ErrorKind::Config,
        }
    }
}

impl JournalError {
    /// True when the file system is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, JournalError::Io { source, .. } if crate::util::durable::io_no_space(source))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// File name of segment `n`.
pub fn segment_name(n: u64) -> String {
    format!("{n:016x}.rj")
}

/// Segment numbers present in `dir`, ascending (other files are ignored).
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("list", dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(".rj")
            && hex.len() == 16
            && let Ok(n) = u64::from_str_radix(hex, 16)
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Encode a segment header.
pub fn encode_segment_header(seg: u64, group: &str) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(&SEGMENT_MAGIC);
    b[8..10].copy_from_slice(&(FormatVersion::V1 as u16).to_le_bytes());
    b[16..24].copy_from_slice(&seg.to_le_bytes());
    let g = group.as_bytes();
    let n = g.len().min(32);
    b[24..24 + n].copy_from_slice(&g[..n]);
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Check a segment header: magic, version, CRC, segment number, group.
pub fn check_segment_header(
    b: &[u8],
    seg: u64,
    group: &str,
    path: &Path,
) -> Result<(), JournalError> {
    let bad = |what: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        what,
    };
    if b.len() < SEGMENT_HEADER_LEN {
        return Err(bad(format!("segment header is {} bytes, need 64", b.len())));
    }
    if b[0..8] != SEGMENT_MAGIC {
        return Err(bad("not a retention journal segment (bad magic)".into()));
    }
    let crc = u32::from_le_bytes(b[60..64].try_into().unwrap_or_default());
    if crc32c::crc32c(&b[..60]) != crc {
        return Err(bad("segment header checksum mismatch".into()));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != FormatVersion::V1 as u16 {
        return Err(JournalError::Version {
            path: path.to_path_buf(),
            version,
        });
    }
    let n = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
    if n != seg {
        return Err(bad(format!(
            "header says segment {n}, file name says {seg}"
        )));
    }
    let g = &b[24..56];
    let end = g.iter().position(|&c| c == 0).unwrap_or(32);
    if &g[..end] != group.as_bytes() {
        return Err(bad(format!(
            "segment of group {:?}, expected {group:?}",
            String::from_utf8_lossy(&g[..end])
        )));
    }
    Ok(())
}

/// Record header (48 bytes): magic, kind, version, `aux16` (disk id or point
/// kind), epoch, `a` (offset or frame), `b` (length or seq), 4 zero bytes,
/// data CRC, data length, header CRC over the first 44 bytes.
fn encode_header(
    kind: u8,
    aux16: u16,
    epoch: u64,
    a: u64,
    b: u64,
    data_crc: u32,
    len: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4] = kind;
    h[5] = FormatVersion::V1 as u8;
    h[6..8].copy_from_slice(&aux16.to_le_bytes());
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&a.to_le_bytes());
    h[24..32].copy_from_slice(&b.to_le_bytes());
    h[36..40].copy_from_slice(&data_crc.to_le_bytes());
    h[40..44].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&h[..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Encode a point record (header and data: the tag name).
pub fn encode_point(p: &PointRec) -> Vec<u8> {
    let name = p.tag.as_deref().unwrap_or("").as_bytes();
    let name = &name[..name.len().min(MAX_TAG_LEN)];
    // Point: aux = kind, a = frame_no, b = last_seq; the data is time_us
    // (8 bytes) then the tag name.
    let mut data = Vec::with_capacity(8 + name.len());
    data.extend_from_slice(&p.time_us.to_le_bytes());
    data.extend_from_slice(name);
    let h = encode_header(
        KIND_POINT,
        u16::from(p.kind.code()),
        p.epoch,
        p.frame_no,
        p.last_seq,
        crc32c::crc32c(&data),
        data.len() as u32,
    );
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    out
}

/// Encode an image record's header for `data` (or a zero image of `len`
/// bytes when `data` is `None`).
pub fn encode_image_header(
    epoch: u64,
    disk: u16,
    offset: u64,
    len: u32,
    data: Option<&[u8]>,
) -> [u8; RECORD_HEADER_LEN] {
    match data {
        Some(d) => encode_header(
            KIND_IMAGE,
            disk,
            epoch,
            offset,
            u64::from(len),
            crc32c::crc32c(d),
            d.len() as u32,
        ),
        None => encode_header(KIND_ZERO, disk, epoch, offset, u64::from(len), 0, 0),
    }
}

/// Decode and check a record header. Returns the head and the length of the
/// data that follows it.
pub fn decode_header(h: &[u8]) -> Result<(RecordHead, u32), String> {
    if h.len() < RECORD_HEADER_LEN {
        return Err(format!("record header is {} bytes, need 48", h.len()));
    }
    if h[0..4] != RECORD_MAGIC {
        return Err("bad record magic".into());
    }
    let crc = u32::from_le_bytes(h[44..48].try_into().unwrap_or_default());
    if crc32c::crc32c(&h[..44]) != crc {
        return Err("record header checksum mismatch".into());
    }
    if h[5] != FormatVersion::V1 as u8 {
        return Err(format!("record version {} unknown", h[5]));
    }
    let u64at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
    let aux = u16::from_le_bytes([h[6], h[7]]);
    let epoch = u64at(8);
    let a = u64at(16);
    let b = u64at(24);
    let data_crc = u32::from_le_bytes(h[36..40].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(h[40..44].try_into().unwrap_or_default());
    if h[32..36] != [0u8; 4] {
        return Err("reserved header bytes are not zero".into());
    }
    if len > MAX_RECORD_DATA {
        return Err(format!(
            "data length {len} above the limit {MAX_RECORD_DATA}"
        ));
    }
    match h[4] {
        KIND_POINT => {
            let kind = u8::try_from(aux)
                .ok()
                .and_then(PointKind::from_code)
                .ok_or_else(|| format!("unknown point kind {aux}"))?;
            if !(8..=8 + MAX_TAG_LEN as u32).contains(&len) {
                return Err(format!("point record data length {len} outside 8..=263"));
            }
            Ok((
                RecordHead::Point(PointRec {
                    epoch,
                    frame_no: a,
                    last_seq: b,
                    time_us: 0,
                    kind,
                    tag: None,
                }),
                len,
            ))
        }
        KIND_IMAGE | KIND_ZERO => {
            let zero = h[4] == KIND_ZERO;
            let ilen = u32::try_from(b).map_err(|_| format!("image length {b} too large"))?;
            if ilen == 0 || ilen > MAX_RECORD_DATA {
                return Err(format!("image length {ilen} outside 1..={MAX_RECORD_DATA}"));
            }
            if a % BLOCK != 0 {
                return Err(format!("image offset {a} is not a multiple of {BLOCK}"));
            }
            if a.checked_add(b).is_none() {
                return Err("image range overflows".into());
            }
            if zero && len != 0 {
                return Err(format!("zero image carries {len} bytes of data"));
            }
            if !zero && len != ilen {
                return Err(format!("image of {ilen} bytes carries {len} bytes of data"));
            }
            Ok((
                RecordHead::Image {
                    epoch,
                    disk: aux,
                    offset: a,
                    len: ilen,
                    zero,
                    data_crc,
                },
                len,
            ))
        }
        k => Err(format!("unknown record kind {k}")),
    }
}

/// Complete a point head with its data (time and tag name), checking the CRC.
pub fn finish_point(mut p: PointRec, data: &[u8], data_crc: u32) -> Result<PointRec, String> {
    if crc32c::crc32c(data) != data_crc {
        return Err("point record data checksum mismatch".into());
    }
    if data.len() < 8 {
        return Err("point record data too short".into());
    }
    p.time_us = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
    let name = &data[8..];
    if !name.is_empty() {
        p.tag = Some(
            std::str::from_utf8(name)
                .map_err(|_| "tag name is not UTF-8".to_string())?
                .to_string(),
        );
    }
    Ok(p)
}

/// Reads records of one group's journal in order, from a position on; usable
/// while the writer appends (an incomplete record at the end of the newest
/// segment is reported as the end, and reading can be resumed later).
#[derive(Debug)]
pub struct Scanner {
    dir: PathBuf,
    group: String,
    seg: u64,
    pos: u64,
    file: Option<(u64, File, u64)>,
    buf: Vec<u8>,
    buf_start: u64,
    /// Check every image record's data against its checksum too (not only
    /// that it is all there): see [`Scanner::verifying_data`].
    verify_data: bool,
}

/// One record met by a [`Scanner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// Where its header is.
    pub loc: Loc,
    /// Its header (points complete with time and tag).
    pub head: RecordHead,
    /// Offset of its data in the segment.
    pub data_pos: u64,
}

const SCAN_BUF: usize = 1 << 20;

impl Scanner {
    /// A scanner at `from` (a record header position; `pos` 0 means the first
    /// record of segment `from.seg`).
    pub fn new(dir: &Path, group: &str, from: Loc) -> Scanner {
        Scanner {
            dir: dir.to_path_buf(),
            group: group.to_string(),
            seg: from.seg,
            pos: from.pos.max(SEGMENT_HEADER_LEN as u64),
            file: None,
            buf: Vec::new(),
            buf_start: 0,
            verify_data: false,
        }
    }

    /// Also check each image record's data checksum. Opening the journal does
    /// this for the newest segment: after a power cut a record being appended
    /// can have its header on disk and its data not (the append was never
    /// synced, so the replica write it protects was never issued); such a
    /// record ends the valid tail like a bad header does, instead of being
    /// counted as a before-image and then failing a recover later.
    pub fn verifying_data(mut self) -> Scanner {
        self.verify_data = true;
        self
    }

    /// Where the next record would be read.
    pub fn position(&self) -> Loc {
        Loc {
            seg: self.seg,
            pos: self.pos,
        }
    }

    fn open_seg(&mut self) -> Result<bool, JournalError> {
        if self.file.as_ref().is_some_and(|f| f.0 == self.seg) {
            return Ok(true);
        }
        let path = self.dir.join(segment_name(self.seg));
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        let n = read_at_most(&f, 0, &mut h).map_err(io_err("read", &path))?;
        if n < SEGMENT_HEADER_LEN {
            // Being created right now: nothing to read yet.
            return Ok(false);
        }
        check_segment_header(&h, self.seg, &self.group, &path)?;
        self.file = Some((self.seg, f, 0));
        self.buf.clear();
        Ok(true)
    }

    /// Read `n` bytes at `pos` of the current segment through the buffer;
    /// `None` when the file ends before.
    fn read(&mut self, pos: u64, n: usize) -> Result<Option<&[u8]>, JournalError> {
        let in_buf =
            pos >= self.buf_start && pos + n as u64 <= self.buf_start + self.buf.len() as u64;
        if !in_buf {
            let Some((_, f, _)) = &self.file else {
                return Ok(None);
            };
            let want = n.max(SCAN_BUF);
            self.buf.resize(want, 0);
            let got = read_at_most(f, pos, &mut self.buf).map_err(|e| JournalError::Io {
                op: "read",
                path: self.dir.join(segment_name(self.seg)),
                source: e,
            })?;
            self.buf.truncate(got);
            self.buf_start = pos;
            if got < n {
                return Ok(None);
            }
        }
        let s = (pos - self.buf_start) as usize;
        Ok(Some(&self.buf[s..s + n]))
    }

    /// The next record's header, or `None` at the current end of the journal.
    /// Point records are returned complete (time, tag); image data is not read
    /// (use [`read_image`]). An invalid record is an error naming file and
    /// offset, except at the very end of the newest segment, where it is an
    /// append in progress (or a torn tail) and reads as the end.
    pub fn next_record(&mut self) -> Result<Option<Scanned>, JournalError> {
        loop {
            if !self.open_seg()? {
                // Missing (or still being created). If a later segment exists,
                // this one was trimmed (or the journal reset) under us.
                let later = list_segments(&self.dir)?.into_iter().any(|s| s > self.seg);
                return if later {
                    Err(JournalError::Trimmed { seg: self.seg })
                } else {
                    Ok(None)
                };
            }
            let pos = self.pos;
            let path = self.dir.join(segment_name(self.seg));
            let header = self.read(pos, RECORD_HEADER_LEN)?.map(|h| h.to_vec());
            let Some(h) = header else {
                // End of this segment: go on to the next one, if it exists.
                if self.next_segment_exists()? {
                    self.seg += 1;
                    self.pos = SEGMENT_HEADER_LEN as u64;
                    self.file = None;
                    continue;
                }
                return Ok(None);
            };
            let decoded = decode_header(&h);
            let (head, len) = match decoded {
                Ok(v) => v,
                Err(what) => {
                    // At the end of the newest segment: a record being
                    // appended (or a torn tail). Anywhere else: corruption.
                    if !self.next_segment_exists()? {
                        return Ok(None);
                    }
                    return Err(JournalError::Corrupt {
                        path,
                        offset: pos,
                        what,
                    });
                }
            };
            let data_pos = pos + RECORD_HEADER_LEN as u64;
            let head = match head {
                RecordHead::Point(p) => {
                    let data_crc = u32::from_le_bytes(h[36..40].try_into().unwrap_or_default());
                    let Some(data) = self.read(data_pos, len as usize)?.map(|d| d.to_vec()) else {
                        if self.next_segment_exists()? {
                            return Err(JournalError::Corrupt {
                                path,
                                offset: pos,
                                what: "point record cut short".into(),
                            });
                        }
                        return Ok(None);
                    };
                    match finish_point(p, &data, data_crc) {
                        Ok(p) => RecordHead::Point(p),
                        Err(what) => {
                            if self.next_segment_exists()? {
                                return Err(JournalError::Corrupt {
                                    path,
                                    offset: pos,
                                    what,
                                });
                            }
                            return Ok(None);
                        }
                    }
                }
                other => {
                    // The data must be complete before the record counts.
                    let end = data_pos + u64::from(len);
                    let flen = self.file_len()?;
                    if end > flen {
                        if self.next_segment_exists()? {
                            return Err(JournalError::Corrupt {
                                path,
                                offset: pos,
                                what: format!(
                                    "record data runs past the end of the file ({flen} bytes)"
                                ),
                            });
                        }
                        return Ok(None);
                    }
                    if self.verify_data && len > 0 {
                        let want = u32::from_le_bytes(h[36..40].try_into().unwrap_or_default());
                        let ok = self
                            .read(data_pos, len as usize)?
                            .is_some_and(|d| crc32c::crc32c(d) == want);
                        if !ok {
                            if self.next_segment_exists()? {
                                return Err(JournalError::Corrupt {
                                    path,
                                    offset: pos,
                                    what: "record data fails its checksum".into(),
                                });
                            }
                            return Ok(None);
                        }
                    }
                    other
                }
            };
            self.pos = data_pos + u64::from(len);
            return Ok(Some(Scanned {
                loc: Loc { seg: self.seg, pos },
                head,
                data_pos,
            }));
        }
    }

    fn file_len(&mut self) -> Result<u64, JournalError> {
        let Some((_, f, _)) = &self.file else {
            return Ok(0);
        };
        f.metadata()
            .map(|m| m.len())
            .map_err(io_err("stat", &self.dir.join(segment_name(self.seg))))
    }

    fn next_segment_exists(&self) -> Result<bool, JournalError> {
        Ok(self
            .dir
            .join(segment_name(self.seg + 1))
            .try_exists()
            .unwrap_or(false))
    }
}

/// Read as many bytes as the file has at `pos`, up to `buf.len()`.
fn read_at_most(f: &File, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], pos + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Read and check the data of an image record into `buf` (its length).
pub fn read_image(
    dir: &Path,
    seg: u64,
    data_pos: u64,
    data_crc: u32,
    buf: &mut [u8],
) -> Result<(), JournalError> {
    let path = dir.join(segment_name(seg));
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(JournalError::Trimmed { seg }),
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let got = read_at_most(&f, data_pos, buf).map_err(io_err("read", &path))?;
    if got < buf.len() || crc32c::crc32c(buf) != data_crc {
        return Err(JournalError::Corrupt {
            path,
            offset: data_pos,
            what: "before-image data is short or fails its checksum".into(),
        });
    }
    Ok(())
}

/// The writer's view of the journal at open.
#[derive(Debug, Default)]
pub struct Opened {
    /// Every point record, oldest first, with where it is.
    pub points: Vec<(Loc, PointRec)>,
    /// Bytes cut from a torn tail, with where.
    pub torn: Option<(PathBuf, u64, u64)>,
    /// Problems found (corrupt records before the tail): everything before the
    /// last one cannot vouch for older points.
    pub problems: Vec<String>,
    /// Where the valid part of the journal starts (after the last problem).
    pub valid_from: Loc,
}

/// Appends records to the newest segment; rotates; trims old segments.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    group: String,
    seg: u64,
    file: File,
    len: u64,
    /// Bytes of the segments before the active one.
    older_bytes: u64,
    dirty: bool,
    /// Tests: a write that would end past this offset of the active segment
    /// writes its first part, then fails with ENOSPC (a torn append on a full
    /// disk).
    #[cfg(test)]
    fail_past: Option<u64>,
}

impl Writer {
    /// Open the journal in `dir` for appending (creating it), scanning every
    /// record: the newest segment's torn tail is cut; a corrupt record in the
    /// middle is reported, and points before it are dropped from `points`.
    pub fn open(dir: &Path, group: &str) -> Result<(Writer, Opened), JournalError> {
        crate::util::durable::create_dir_durable(dir).map_err(io_err("create directory", dir))?;
        let segs = list_segments(dir)?;
        let mut opened = Opened::default();
        let mut tail_end: Option<(u64, u64)> = None;
        let mut valid_segs = Vec::new();
        let newest = segs.last().copied();
        for &seg in &segs {
            let path = dir.join(segment_name(seg));
            let mut sc = Scanner::new(dir, group, Loc { seg, pos: 0 });
            if Some(seg) == newest {
                // Where a power cut can leave a record whose data never
                // reached the disk (at most the last unsynced append).
                sc = sc.verifying_data();
            }
            // Scan this segment only.
            let mut last_end = SEGMENT_HEADER_LEN as u64;
            let res: Result<(), JournalError> = loop {
                match sc.next_record() {
                    Ok(Some(r)) if r.loc.seg == seg => {
                        if let RecordHead::Point(p) = &r.head {
                            opened.points.push((r.loc, p.clone()));
                        }
                        last_end = sc.position().pos;
                        if sc.position().seg != seg {
                            break Ok(());
                        }
                    }
                    Ok(_) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            match res {
                Ok(()) => {
                    valid_segs.push(seg);
                    tail_end = Some((seg, last_end));
                }
                Err(JournalError::Corrupt { offset, what, .. }) => {
                    let msg = format!(
                        "{} at offset {offset}: {what}; recovery points before it are dropped",
                        path.display()
                    );
                    opened.problems.push(msg);
                    opened.points.retain(|(l, _)| l.seg > seg);
                    opened.valid_from = Loc {
                        seg: seg + 1,
                        pos: 0,
                    };
                    valid_segs.push(seg);
                    tail_end = Some((seg, last_end));
                }
                Err(e) => return Err(e),
            }
        }
        // The newest segment: cut anything after its last valid record.
        let (seg, file, len) = match tail_end {
            Some((seg, end)) => {
                let path = dir.join(segment_name(seg));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                let flen = file.metadata().map_err(io_err("stat", &path))?.len();
                if flen > end {
                    file.set_len(end).map_err(io_err("truncate", &path))?;
                    file.sync_all().map_err(io_err("fsync", &path))?;
                    opened.torn = Some((path, end, flen - end));
                }
                (seg, file, end)
            }
            None => {
                let seg = 1;
                let file = create_segment(dir, seg, group)?;
                (seg, file, SEGMENT_HEADER_LEN as u64)
            }
        };
        let mut older_bytes = 0;
        for s in valid_segs.iter().filter(|&&s| s < seg) {
            let p = dir.join(segment_name(*s));
            older_bytes += fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        }
        Ok((
            Writer {
                dir: dir.to_path_buf(),
                group: group.to_string(),
                seg,
                file,
                len,
                older_bytes,
                dirty: false,
                #[cfg(test)]
                fail_past: None,
            },
            opened,
        ))
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the next record will go.
    pub fn end(&self) -> Loc {
        Loc {
            seg: self.seg,
            pos: self.len,
        }
    }

    /// Bytes of every segment.
    pub fn bytes(&self) -> u64 {
        self.older_bytes + self.len
    }

    /// The active segment's number.
    pub fn active_segment(&self) -> u64 {
        self.seg
    }

    fn rotate_if_full(&mut self) -> Result<(), JournalError> {
        if self.len < SEGMENT_BYTES {
            return Ok(());
        }
        self.rotate()
    }

    /// Start the next segment; the active one is made durable before records
    /// go elsewhere.
    fn rotate(&mut self) -> Result<(), JournalError> {
        self.sync()?;
        let seg = self.seg + 1;
        let file = create_segment(&self.dir, seg, &self.group)?;
        self.older_bytes += self.len;
        self.seg = seg;
        self.file = file;
        self.len = SEGMENT_HEADER_LEN as u64;
        Ok(())
    }

    /// Write `parts` back to back at the end of the active segment, with one
    /// `pwritev` (more only past [`IOV_MAX`] parts or after a short write). On
    /// failure the segment is cut back to its old end, so no partial record is
    /// left behind and the next append starts there again.
    fn write_parts(&mut self, parts: &[IoSlice<'_>]) -> Result<(), JournalError> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if let Err(e) = self.write_at_end(parts) {
            let _ = self.file.set_len(self.len);
            return Err(io_err("write", &self.dir.join(segment_name(self.seg)))(e));
        }
        self.len += total;
        self.dirty = true;
        Ok(())
    }

    fn write_at_end(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_past.is_some_and(|limit| {
            self.len + parts.iter().map(|p| p.len() as u64).sum::<u64>() > limit
        }) {
            if let Some(p) = parts.first() {
                self.file.write_all_at(p, self.len)?;
            }
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        pwritev_all(&self.file, parts, self.len)
    }

    /// Tests: make writes that would end past `limit` bytes of the active
    /// segment fail with ENOSPC after writing their first part (`None`: never).
    #[cfg(test)]
    pub(crate) fn fail_writes_past(&mut self, limit: Option<u64>) {
        self.fail_past = limit;
    }

    /// Append a point record.
    pub fn append_point(&mut self, p: &PointRec) -> Result<Loc, JournalError> {
        let rec = encode_point(p);
        self.rotate_if_full()?;
        let at = self.end();
        self.write_parts(&[IoSlice::new(&rec)])?;
        Ok(at)
    }

    /// Append a before-image of `data` at `offset` of `disk` for `epoch`; an
    /// all-zero range is stored as a zero image without data. Header and data
    /// go out in one `pwritev`.
    pub fn append_image(
        &mut self,
        epoch: u64,
        disk: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<Loc, JournalError> {
        self.append_image_records(epoch, disk, &[(offset, data)])
            .map(|(at, _)| at)
    }

    /// Append before-images of `epoch` on `disk`, each `(offset, data)` as
    /// [`Writer::append_image`] would, as many as go into the active segment
    /// before it rotates (each record that starts below [`SEGMENT_BYTES`], so
    /// segments are cut exactly where one append per record would cut them),
    /// with one vectored write. Returns how many were appended: a prefix of
    /// `images`, at least one unless `images` is empty; call again with the
    /// rest. Either every record of one call is appended or none is (a failed
    /// write is cut back).
    pub fn append_images(
        &mut self,
        epoch: u64,
        disk: u16,
        images: &[(u64, &[u8])],
    ) -> Result<usize, JournalError> {
        if images.is_empty() {
            return Ok(0);
        }
        self.append_image_records(epoch, disk, images)
            .map(|(_, n)| n)
    }

    /// [`Writer::append_images`] for a non-empty `images`; also returns where
    /// the first record went.
    fn append_image_records(
        &mut self,
        epoch: u64,
        disk: u16,
        images: &[(u64, &[u8])],
    ) -> Result<(Loc, usize), JournalError> {
        self.rotate_if_full()?;
        let at = self.end();
        let mut heads: Vec<([u8; RECORD_HEADER_LEN], bool)> = Vec::with_capacity(images.len());
        let mut end = self.len;
        for &(offset, data) in images {
            if end >= SEGMENT_BYTES && !heads.is_empty() {
                break;
            }
            let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let zero = crate::util::zero::is_zero(data);
            let h = encode_image_header(epoch, disk, offset, len, (!zero).then_some(data));
            heads.push((h, zero));
            end += RECORD_HEADER_LEN as u64 + if zero { 0 } else { data.len() as u64 };
        }
        let mut parts: Vec<IoSlice<'_>> = Vec::with_capacity(2 * heads.len());
        for ((h, zero), &(_, data)) in heads.iter().zip(images) {
            parts.push(IoSlice::new(h));
            if !zero {
                parts.push(IoSlice::new(data));
            }
        }
        self.write_parts(&parts)?;
        Ok((at, heads.len()))
    }

    /// True when records were appended since the last [`Writer::sync`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Make every appended record durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if !self.dirty {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(io_err("fdatasync", &self.dir.join(segment_name(self.seg))))?;
        self.dirty = false;
        Ok(())
    }

    /// Delete every segment before `seg` (never the active one). Returns the
    /// bytes freed.
    pub fn trim_before(&mut self, seg: u64) -> Result<u64, JournalError> {
        let mut freed = 0;
        for s in list_segments(&self.dir)? {
            if s >= seg || s >= self.seg {
                break;
            }
            let p = self.dir.join(segment_name(s));
            let n = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&p) {
                Ok(()) => freed += n,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &p)(e)),
            }
        }
        self.older_bytes = self.older_bytes.saturating_sub(freed);
        Ok(freed)
    }

    /// Start a new segment now (tests of segment boundaries).
    #[cfg(test)]
    pub fn reset_for_test_rotation(&mut self) -> Result<(), JournalError> {
        self.rotate()
    }

    /// Empty the journal: delete every segment and start a new one after the
    /// active one (numbers never go back, so readers never mistake an old
    /// position for a new one).
    pub fn reset(&mut self) -> Result<u64, JournalError> {
        self.sync()?;
        let next = self.seg + 1;
        let file = create_segment(&self.dir, next, &self.group)?;
        self.older_bytes += self.len;
        self.seg = next;
        self.file = file;
        self.len = SEGMENT_HEADER_LEN as u64;
        self.trim_before(next)
    }
}

/// Most buffers one `pwritev` takes on Linux (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// `pwritev` all of `parts` back to back at `offset`: short writes continue,
/// EINTR/EAGAIN retry, more than [`IOV_MAX`] parts take several calls.
fn pwritev_all(file: &File, parts: &[IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = parts.iter().filter(|p| !p.is_empty()).copied().collect();
    let mut rest: &mut [IoSlice<'_>] = &mut owned;
    while !rest.is_empty() {
        let off = i64::try_from(offset).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} does not fit in off_t"),
            )
        })?;
        let n = rest.len().min(IOV_MAX);
        match nix::sys::uio::pwritev(file, &rest[..n], off) {
            Ok(0) => {
                let left: usize = rest.iter().map(|p| p.len()).sum();
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("pwritev at offset {offset} wrote 0 of {left} bytes"),
                ));
            }
            Ok(n) => {
                offset += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Create segment `seg` with its header, durably (file and directory).
fn create_segment(dir: &Path, seg: u64, group: &str) -> Result<File, JournalError> {
    let path = dir.join(segment_name(seg));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    f.write_all(&encode_segment_header(seg, group))
        .map_err(io_err("write", &path))?;
    f.sync_all().map_err(io_err("fsync", &path))?;
    crate::util::durable::fsync_dir(dir).map_err(io_err("fsync directory", dir))?;
    f.seek(SeekFrom::End(0)).map_err(io_err("seek", &path))?;
    Ok(f)
}
