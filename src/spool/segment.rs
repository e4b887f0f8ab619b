//! Segment files: names, a bounded-memory scanner for recovery, and verified reads.
//!
//! A segment is read through a fixed 1 MiB window, so scanning a file never
//! allocates by a length found in the file; payload CRCs are computed chunk by chunk.

use std::fs::File;
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::SpoolError;
use super::dio::{self, AlignedBuf};
use super::record::{RECORD_HEADER_LEN, RECORD_MAGIC, RecordHeader};

/// Suffix of segment file names.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of a trimmed segment file kept for reuse (docs/SPOOL.md, "Recycled
/// segment files"): `<old first frame, 20 digits>.free`.
pub const FREE_SUFFIX: &str = ".free";
/// Digits in a segment file name (enough for any u64, so names sort numerically).
pub const SEGMENT_NAME_DIGITS: usize = 20;
const WINDOW: usize = 1 << 20;

/// File name of the segment whose first frame is `first_frame_no`.
pub fn segment_file_name(first_frame_no: u64) -> String {
    format!("{first_frame_no:020}{SEGMENT_SUFFIX}")
}

/// The first frame number encoded in a segment file name, if `name` is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    parse_numbered(name, SEGMENT_SUFFIX)
}

/// File name of a trimmed segment file, whose first frame was `first_frame_no`,
/// waiting in the free list.
pub fn free_file_name(first_frame_no: u64) -> String {
    format!("{first_frame_no:020}{FREE_SUFFIX}")
}

/// True when `name` is a free segment file's name.
pub fn is_free_file_name(name: &str) -> bool {
    parse_numbered(name, FREE_SUFFIX).is_some()
}

fn parse_numbered(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A read-only window over `[0, end)` of a file. Reads are block aligned (offset,
/// length and buffer), so the same code works on a file opened with `O_DIRECT`.
struct Window<'a> {
    file: &'a File,
    end: u64,
    /// Records of lower frame numbers are not valid here (see [`scan`]).
    min_frame_no: u64,
    base: u64,
    buf: AlignedBuf,
    /// Valid bytes in `buf`, from file offset `base`.
    len: usize,
}

impl<'a> Window<'a> {
    fn new(file: &'a File, end: u64, min_frame_no: u64) -> Self {
        Window {
            file,
            end,
            min_frame_no,
            base: 0,
            // One block more than the window, so that the block-aligned read at or
            // below any offset still covers WINDOW bytes from that offset.
            buf: AlignedBuf::new(WINDOW + dio::BLOCK),
            len: 0,
        }
    }

    fn fill(&mut self, off: u64) -> io::Result<()> {
        let base = dio::floor(off);
        let want = (self.end.saturating_sub(base)).min(self.buf.len() as u64) as usize;
        let rd = dio::ceil_usize(want);
        self.len = 0;
        dio::read_aligned(self.file, base, &mut self.buf.bytes_mut()[..rd], want)?;
        self.base = base;
        self.len = want;
        Ok(())
    }

    /// Exactly `n` bytes at `off` (`n <= WINDOW`, `off + n <= end`).
    fn get(&mut self, off: u64, n: usize) -> io::Result<&[u8]> {
        debug_assert!(n <= WINDOW && off + n as u64 <= self.end);
        let covered = off >= self.base && off + n as u64 <= self.base + self.len as u64;
        if !covered {
            self.fill(off)?;
        }
        let s = (off - self.base) as usize;
        Ok(&self.buf.bytes()[s..s + n])
    }

    /// The bytes from `off` to the end of the window (refilled at `off` when fewer
    /// than a record header remain in it and more exist in the file).
    fn from(&mut self, off: u64) -> io::Result<&[u8]> {
        let in_window = off >= self.base && off <= self.base + self.len as u64;
        let avail = if in_window {
            self.base + self.len as u64 - off
        } else {
            0
        };
        if !in_window || (avail < RECORD_HEADER_LEN as u64 && off + avail < self.end) {
            self.fill(off)?;
        }
        let s = (off - self.base) as usize;
        Ok(&self.buf.bytes()[s..self.len])
    }
}

/// True when `[off, end)` is block padding: shorter than a block, ending at a
/// block-aligned end of file, all zero (docs/SPOOL.md, "Padding").
fn is_padding(w: &mut Window<'_>, off: u64) -> io::Result<bool> {
    let end = w.end;
    if off >= end || !end.is_multiple_of(dio::BLOCK as u64) || end - off >= dio::BLOCK as u64 {
        return Ok(false);
    }
    Ok(w.get(off, (end - off) as usize)?.iter().all(|&b| b == 0))
}

/// Result of checking for a record at one offset.
enum Check {
    /// A complete record with a valid header and payload CRC.
    Valid(RecordHeader),
    /// Not a valid record. `extent` is the record's end when the header was
    /// valid (so its length can be trusted), `None` otherwise.
    Bad { why: String, extent: Option<u64> },
}

fn check_at(w: &mut Window<'_>, off: u64) -> io::Result<Check> {
    let end = w.end;
    if off + RECORD_HEADER_LEN as u64 > end {
        return Ok(Check::Bad {
            why: format!(
                "truncated record header ({} of {RECORD_HEADER_LEN} bytes before end of file)",
                end - off
            ),
            extent: None,
        });
    }
    let h = match RecordHeader::decode(w.get(off, RECORD_HEADER_LEN)?) {
        Ok(h) => h,
        Err(e) => {
            return Ok(Check::Bad {
                why: e.to_string(),
                extent: None,
            });
        }
    };
    let rec_end = off + h.record_len();
    if rec_end > end {
        return Ok(Check::Bad {
            why: format!(
                "frame {} payload of {} bytes runs {} bytes past end of file",
                h.frame_no,
                h.payload_len,
                rec_end - end
            ),
            extent: None,
        });
    }
    let mut crc = h.header_crc;
    let mut p = off + RECORD_HEADER_LEN as u64;
    while p < rec_end {
        let n = ((rec_end - p) as usize).min(WINDOW);
        crc = crc32c::crc32c_append(crc, w.get(p, n)?);
        p += n as u64;
    }
    if crc != h.crc {
        return Ok(Check::Bad {
            why: format!(
                "frame {} record crc mismatch: stored {:#010x}, computed {crc:#010x}",
                h.frame_no, h.crc
            ),
            extent: Some(rec_end),
        });
    }
    if h.frame_no < w.min_frame_no {
        return Ok(Check::Bad {
            why: format!(
                "record of frame {} below the segment's first frame {} (bytes left from the file's \
                 earlier use as a segment)",
                h.frame_no, w.min_frame_no
            ),
            extent: Some(rec_end),
        });
    }
    Ok(Check::Valid(h))
}

/// The first offset in `(from, end)` where a valid record starts, if any.
fn resync(w: &mut Window<'_>, from: u64) -> io::Result<Option<u64>> {
    let end = w.end;
    let mut p = from;
    while p + RECORD_HEADER_LEN as u64 <= end {
        let found = {
            let s = w.from(p)?;
            s.windows(RECORD_MAGIC.len())
                .position(|x| x == RECORD_MAGIC)
        };
        match found {
            Some(i) => {
                let cand = p + i as u64;
                if let Check::Valid(_) = check_at(w, cand)? {
                    return Ok(Some(cand));
                }
                p = cand + 1;
            }
            None => {
                let len = w.from(p)?.len() as u64;
                if len < RECORD_MAGIC.len() as u64 {
                    break;
                }
                p += len - (RECORD_MAGIC.len() as u64 - 1);
            }
        }
    }
    Ok(None)
}

/// What the scanner found at one place in a segment.
#[derive(Debug)]
pub enum ScanEvent {
    /// A valid record (header and payload CRC checked) at `offset`.
    Record {
        /// Offset of the record header in the file.
        offset: u64,
        /// The decoded header.
        header: RecordHeader,
    },
    /// Bytes at `offset` are not a valid record. `resume_at` is where the next
    /// valid record starts, or `None` when none follows up to the end.
    Bad {
        /// Offset of the bad bytes.
        offset: u64,
        /// What failed.
        why: String,
        /// Offset of the next valid record, if any.
        resume_at: Option<u64>,
    },
    /// Zero padding from `offset` to the block-aligned end of the file (fewer
    /// than 4096 bytes): the segment's logical length is `offset`. Always the
    /// last event of a scan.
    Padding {
        /// Where the padding starts: the end of the last record.
        offset: u64,
    },
}

/// Walk the records of `file` in `[start, end)`, calling `visit` for each valid
/// record and each stretch of bad bytes. After bad bytes the scan resumes at the
/// next valid record: right after the bad record when its header was intact, or
/// else at the next offset with a valid record. A run of zeros shorter than a
/// block that ends at a block-aligned end of file is padding, not bad bytes.
/// A record of a frame below `min_frame_no` counts as bad bytes, and resyncs
/// skip it: in a recycled segment file such records are what is left of the
/// file's earlier use (0 accepts every frame number). `visit` may stop the scan
/// early.
pub fn scan(
    file: &File,
    start: u64,
    end: u64,
    min_frame_no: u64,
    mut visit: impl FnMut(ScanEvent) -> ControlFlow<()>,
) -> io::Result<()> {
    let mut w = Window::new(file, end, min_frame_no);
    let mut off = start;
    while off < end {
        if is_padding(&mut w, off)? {
            let _ = visit(ScanEvent::Padding { offset: off });
            return Ok(());
        }
        match check_at(&mut w, off)? {
            Check::Valid(header) => {
                if visit(ScanEvent::Record {
                    offset: off,
                    header,
                })
                .is_break()
                {
                    return Ok(());
                }
                off += header.record_len();
            }
            Check::Bad { why, extent } => {
                let resume_at = match extent {
                    Some(x) if x == end => None,
                    Some(x) => match check_at(&mut w, x)? {
                        Check::Valid(_) => Some(x),
                        Check::Bad { .. } => resync(&mut w, off + 1)?,
                    },
                    None => resync(&mut w, off + 1)?,
                };
                let ev = ScanEvent::Bad {
                    offset: off,
                    why,
                    resume_at,
                };
                if visit(ev).is_break() {
                    return Ok(());
                }
                match resume_at {
                    Some(r) => off = r,
                    None => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

/// Largest read the record reader makes at once (and the most memory its bounce
/// buffer takes), in direct mode.
const READ_CHUNK: usize = 1 << 20;

/// Reads and verifies records. In direct mode the segment file must be opened
/// with `O_DIRECT` and every read is block aligned: the aligned superset
/// `[floor(offset), ceil(end))` of the record is read in chunks of at most
/// 1 MiB into an aligned bounce buffer and the record is copied out. Buffered
/// reads are never mixed with the writer's direct writes (docs/SPOOL.md,
/// "Direct I/O").
pub struct RecordReader {
    direct: bool,
    bounce: Option<AlignedBuf>,
}

impl RecordReader {
    /// A reader for files opened with (`direct`) or without `O_DIRECT`.
    pub fn new(direct: bool) -> Self {
        RecordReader {
            direct,
            bounce: None,
        }
    }

    /// Read and verify the record at `offset` of `file` (at `path`), which the
    /// index says holds frame `frame_no` with `len` payload bytes. Every mismatch
    /// is a `Corrupt` error naming the file and offset.
    pub fn read(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        frame_no: u64,
        len: u32,
    ) -> Result<(RecordHeader, Vec<u8>), SpoolError> {
        let corrupt = |what: String| SpoolError::Corrupt {
            file: path.to_path_buf(),
            offset,
            what,
        };
        let io_or_short = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt("file ends inside the record".into())
            } else {
                SpoolError::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        };
        let check_header = |hb: &[u8]| -> Result<RecordHeader, SpoolError> {
            let h = RecordHeader::decode(hb).map_err(|e| corrupt(e.to_string()))?;
            if h.frame_no != frame_no || h.payload_len != len {
                return Err(corrupt(format!(
                    "index expects frame {frame_no} with {len} payload bytes, file has frame {} with {}",
                    h.frame_no, h.payload_len
                )));
            }
            Ok(h)
        };
        let hl = RECORD_HEADER_LEN as u64;
        let (h, payload) = if self.direct {
            let end = offset + hl + u64::from(len);
            let mut pos = dio::floor(offset);
            let span = (dio::ceil(end) - pos).min(READ_CHUNK as u64) as usize;
            let bounce = self.bounce.get_or_insert_with(|| AlignedBuf::new(span));
            // At least two blocks, so the first chunk always holds the header.
            bounce.reserve(span.max(2 * dio::BLOCK));
            let cap = bounce.len();
            let mut h = None;
            let mut payload = Vec::new();
            while pos < end {
                let want = (end - pos).min(cap as u64) as usize;
                let rd = dio::ceil_usize(want);
                dio::read_aligned(file, pos, &mut bounce.bytes_mut()[..rd], want)
                    .map_err(io_or_short)?;
                let chunk = &bounce.bytes()[..want];
                let from = match h {
                    Some(_) => 0,
                    None => {
                        let at = (offset - pos) as usize;
                        h = Some(check_header(&chunk[at..at + RECORD_HEADER_LEN])?);
                        payload.reserve_exact(len as usize);
                        at + RECORD_HEADER_LEN
                    }
                };
                payload.extend_from_slice(&chunk[from..]);
                pos += want as u64;
            }
            match h {
                Some(h) => (h, payload),
                None => return Err(corrupt("empty read".into())),
            }
        } else {
            let mut hb = [0u8; RECORD_HEADER_LEN];
            file.read_exact_at(&mut hb, offset).map_err(io_or_short)?;
            let h = check_header(&hb)?;
            let mut payload = vec![0u8; h.payload_len as usize];
            file.read_exact_at(&mut payload, offset + hl)
                .map_err(io_or_short)?;
            (h, payload)
        };
        if !h.payload_ok(&payload) {
            return Err(corrupt(format!("frame {frame_no} record crc mismatch")));
        }
        Ok((h, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn names() {
        assert_eq!(segment_file_name(1), "00000000000000000001.seg");
        assert_eq!(parse_segment_name("00000000000000000001.seg"), Some(1));
        assert_eq!(
            parse_segment_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "1.seg",
            "0000000000000000001x.seg",
            "00000000000000000001.seg.damaged",
            "99999999999999999999.seg",
            "state",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    fn rec(frame: u64, payload: &[u8]) -> Vec<u8> {
        let h = RecordHeader::new(frame, frame - 1, frame * 10, payload);
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn events(bytes: &[u8]) -> Vec<String> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        let mut out = Vec::new();
        scan(&f, 0, bytes.len() as u64, 0, |ev| {
            out.push(match ev {
                ScanEvent::Record { offset, header } => {
                    format!("rec {} @{offset}", header.frame_no)
                }
                ScanEvent::Bad {
                    offset, resume_at, ..
                } => format!("bad @{offset} -> {resume_at:?}"),
                ScanEvent::Padding { offset } => format!("pad @{offset}"),
            });
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    #[test]
    fn scan_skips_bad_payload_exactly_and_resyncs_after_bad_header() {
        let mut bytes = rec(1, b"one");
        let r2 = bytes.len();
        bytes.extend(rec(2, b"two-two"));
        let r3 = bytes.len();
        bytes.extend(rec(3, b"three"));
        assert_eq!(
            events(&bytes),
            ["rec 1 @0", &format!("rec 2 @{r2}"), &format!("rec 3 @{r3}")]
        );

        let mut payload_bad = bytes.clone();
        payload_bad[r2 + RECORD_HEADER_LEN + 1] ^= 0xff;
        assert_eq!(
            events(&payload_bad),
            [
                "rec 1 @0",
                &format!("bad @{r2} -> Some({r3})"),
                &format!("rec 3 @{r3}")
            ]
        );

        let mut header_bad = bytes.clone();
        header_bad[r2 + 5] ^= 0xff; // payload_len: header crc fails, length untrusted
        assert_eq!(
            events(&header_bad),
            [
                "rec 1 @0",
                &format!("bad @{r2} -> Some({r3})"),
                &format!("rec 3 @{r3}")
            ]
        );

        let torn = &bytes[..bytes.len() - 2];
        assert_eq!(
            events(torn),
            [
                "rec 1 @0",
                &format!("rec 2 @{r2}"),
                &format!("bad @{r3} -> None")
            ]
        );
        let zero_tail: Vec<u8> = bytes.iter().copied().chain([0u8; 100]).collect();
        assert_eq!(
            events(&zero_tail).last().unwrap(),
            &format!("bad @{} -> None", bytes.len())
        );
    }

    #[test]
    fn scan_handles_records_larger_than_the_window() {
        let big = vec![0x5au8; WINDOW * 2 + 17];
        let mut bytes = rec(1, &big);
        let r2 = bytes.len();
        bytes.extend(rec(2, b"x"));
        assert_eq!(
            events(&bytes),
            ["rec 1 @0".to_string(), format!("rec 2 @{r2}")]
        );
        bytes[WINDOW + 3] ^= 1;
        assert_eq!(
            events(&bytes),
            [format!("bad @0 -> Some({r2})"), format!("rec 2 @{r2}")]
        );
    }

    #[test]
    fn scan_treats_a_short_zero_run_at_an_aligned_end_as_padding() {
        let mut bytes = rec(1, b"one");
        bytes.extend(rec(2, b"two"));
        let logical = bytes.len();
        let mut padded = bytes.clone();
        padded.resize(4096, 0);
        assert_eq!(
            events(&padded),
            ["rec 1 @0", "rec 2 @43", &format!("pad @{logical}")]
        );
        // Not padding: end not aligned, run of a whole block or more, not zero.
        let mut unaligned = bytes.clone();
        unaligned.resize(4095, 0);
        assert_eq!(
            events(&unaligned).last().unwrap(),
            &format!("bad @{logical} -> None")
        );
        let mut long = bytes.clone();
        long.resize(8192, 0);
        assert_eq!(
            events(&long).last().unwrap(),
            &format!("bad @{logical} -> None")
        );
        let mut dirty = padded.clone();
        dirty[4000] = 1;
        assert_eq!(
            events(&dirty).last().unwrap(),
            &format!("bad @{logical} -> None")
        );
        // A partial record followed by zeros is a torn record, not padding.
        let mut torn = bytes.clone();
        torn.extend(&rec(3, &[7u8; 100])[..60]);
        torn.resize(4096, 0);
        assert_eq!(
            events(&torn).last().unwrap(),
            &format!("bad @{logical} -> None")
        );
        // Records ending exactly at the block boundary need no padding.
        let mut exact = rec(1, &vec![3u8; 4096 - 2 * RECORD_HEADER_LEN - 5]);
        exact.extend(rec(2, b"12345"));
        assert_eq!(exact.len(), 4096);
        assert_eq!(
            events(&exact),
            ["rec 1 @0", &format!("rec 2 @{}", 4096 - 45)]
        );
    }

    /// Write block-aligned `bytes` at 0 from an aligned buffer (direct descriptors
    /// need that).
    fn put(f: &File, bytes: &[u8]) {
        let mut ab = AlignedBuf::new(bytes.len());
        ab.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        f.write_all_at(&ab.bytes()[..bytes.len()], 0).unwrap();
    }

    fn check_reader(f: &File, direct: bool) {
        let p = Path::new("x.seg");
        let mut r = RecordReader::new(direct);
        let mut bytes = vec![0xeeu8; 4000];
        let small = rec(5, b"payload");
        bytes.extend_from_slice(&small); // spans the first block boundary
        let big_at = bytes.len() as u64;
        let big_payload: Vec<u8> = (0..READ_CHUNK * 2 + 77).map(|i| (i % 199) as u8).collect();
        bytes.extend(rec(6, &big_payload));
        let tail_at = bytes.len() as u64;
        bytes.extend(rec(7, b"in the last partial block"));
        let end = bytes.len();
        bytes.resize(dio::ceil_usize(end), 0);
        put(f, &bytes);

        let (h, data) = r.read(f, p, 4000, 5, 7).unwrap();
        assert_eq!((h.frame_no, data.as_slice()), (5, &b"payload"[..]));
        let (_, data) = r.read(f, p, big_at, 6, big_payload.len() as u32).unwrap();
        assert_eq!(data, big_payload);
        let (_, data) = r.read(f, p, tail_at, 7, 25).unwrap();
        assert_eq!(data, b"in the last partial block");

        let e = r.read(f, p, 4000, 6, 7).unwrap_err();
        assert!(
            e.to_string().contains("x.seg") && e.to_string().contains("offset 4000"),
            "{e}"
        );
        bytes[4000 + 45] ^= 1;
        put(f, &bytes[..8192]);
        assert!(matches!(
            r.read(f, p, 4000, 5, 7),
            Err(SpoolError::Corrupt { .. })
        ));
        f.set_len(4044).unwrap();
        let e = r.read(f, p, 4000, 5, 7).unwrap_err();
        assert!(e.to_string().contains("file ends inside"), "{e}");
    }

    #[test]
    fn record_reader_verifies_buffered_and_direct() {
        check_reader(&tempfile::tempfile().unwrap(), false);
        let dir = tempfile::tempdir().unwrap();
        let f = dio::open_options(true)
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("x.seg"))
            .unwrap();
        check_reader(&f, true);
    }
}
