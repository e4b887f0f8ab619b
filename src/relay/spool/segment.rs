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
use super::record::{RECORD_HEADER_LEN, RECORD_MAGIC, RecordHeader};

/// Suffix of segment file names.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Digits in a segment file name (enough for any u64, so names sort numerically).
pub const SEGMENT_NAME_DIGITS: usize = 20;
const WINDOW: usize = 1 << 20;

/// File name of the segment whose first frame is `first_frame_no`.
pub fn segment_file_name(first_frame_no: u64) -> String {
    format!("{first_frame_no:020}{SEGMENT_SUFFIX}")
}

/// The first frame number encoded in a segment file name, if `name` is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A read-only window over `[0, end)` of a file.
struct Window<'a> {
    file: &'a File,
    end: u64,
    base: u64,
    buf: Vec<u8>,
}

impl<'a> Window<'a> {
    fn new(file: &'a File, end: u64) -> Self {
        Window {
            file,
            end,
            base: 0,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self, off: u64) -> io::Result<()> {
        let n = (self.end.saturating_sub(off)).min(WINDOW as u64) as usize;
        self.buf.resize(n, 0);
        self.file.read_exact_at(&mut self.buf, off)?;
        self.base = off;
        Ok(())
    }

    /// Exactly `n` bytes at `off` (`n <= WINDOW`, `off + n <= end`).
    fn get(&mut self, off: u64, n: usize) -> io::Result<&[u8]> {
        debug_assert!(n <= WINDOW && off + n as u64 <= self.end);
        let covered = off >= self.base && off + n as u64 <= self.base + self.buf.len() as u64;
        if !covered {
            self.fill(off)?;
        }
        let s = (off - self.base) as usize;
        Ok(&self.buf[s..s + n])
    }

    /// The bytes from `off` to the end of the window (refilled at `off` when fewer
    /// than a record header remain in it and more exist in the file).
    fn from(&mut self, off: u64) -> io::Result<&[u8]> {
        let in_window = off >= self.base && off <= self.base + self.buf.len() as u64;
        let avail = if in_window {
            self.base + self.buf.len() as u64 - off
        } else {
            0
        };
        if !in_window || (avail < RECORD_HEADER_LEN as u64 && off + avail < self.end) {
            self.fill(off)?;
        }
        let s = (off - self.base) as usize;
        Ok(&self.buf[s..])
    }
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
}

/// Walk the records of `file` in `[start, end)`, calling `visit` for each valid
/// record and each stretch of bad bytes. After bad bytes the scan resumes at the
/// next valid record: right after the bad record when its header was intact, or
/// else at the next offset with a valid record. `visit` may stop the scan early.
pub fn scan(
    file: &File,
    start: u64,
    end: u64,
    mut visit: impl FnMut(ScanEvent) -> ControlFlow<()>,
) -> io::Result<()> {
    let mut w = Window::new(file, end);
    let mut off = start;
    while off < end {
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

/// Read and verify the record at `offset` of `file` (at `path`), which the index
/// says holds frame `frame_no` with `len` payload bytes. Every mismatch is a
/// `Corrupt` error naming the file and offset.
pub fn read_record(
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
    let mut hb = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut hb, offset).map_err(io_or_short)?;
    let h = RecordHeader::decode(&hb).map_err(|e| corrupt(e.to_string()))?;
    if h.frame_no != frame_no || h.payload_len != len {
        return Err(corrupt(format!(
            "index expects frame {frame_no} with {len} payload bytes, file has frame {} with {}",
            h.frame_no, h.payload_len
        )));
    }
    let mut payload = vec![0u8; h.payload_len as usize];
    file.read_exact_at(&mut payload, offset + RECORD_HEADER_LEN as u64)
        .map_err(io_or_short)?;
    if !h.payload_ok(&payload) {
        return Err(corrupt(format!("frame {frame_no} record crc mismatch")));
    }
    Ok((h, payload))
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
        scan(&f, 0, bytes.len() as u64, |ev| {
            out.push(match ev {
                ScanEvent::Record { offset, header } => {
                    format!("rec {} @{offset}", header.frame_no)
                }
                ScanEvent::Bad {
                    offset, resume_at, ..
                } => format!("bad @{offset} -> {resume_at:?}"),
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
    fn read_record_verifies() {
        let mut f = tempfile::tempfile().unwrap();
        let bytes = rec(5, b"payload");
        f.write_all(&bytes).unwrap();
        let p = Path::new("x.seg");
        let (h, data) = read_record(&f, p, 0, 5, 7).unwrap();
        assert_eq!((h.frame_no, data.as_slice()), (5, &b"payload"[..]));
        let e = read_record(&f, p, 0, 6, 7).unwrap_err();
        assert!(
            e.to_string().contains("x.seg") && e.to_string().contains("offset 0"),
            "{e}"
        );
        let mut bad = bytes.clone();
        bad[45] ^= 1;
        f.write_all_at(&bad, 0).unwrap();
        assert!(matches!(
            read_record(&f, p, 0, 5, 7),
            Err(SpoolError::Corrupt { .. })
        ));
        f.set_len(44).unwrap();
        assert!(matches!(
            read_record(&f, p, 0, 5, 7),
            Err(SpoolError::Corrupt { .. })
        ));
    }
}
