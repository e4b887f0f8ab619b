//! The apply log: a plain-text trace of the order in which a group's frames
//! were applied, kept so that tests and tools can prove the target never
//! applied a frame out of chain order (see docs/TARGET.md, "Apply log").
//!
//! One line per event, appended with a single `write` each (no fsync: the
//! lines are in the page cache when `write` returns, which survives the
//! process being killed; after a power loss the log may be short, never
//! reordered):
//!
//! ```text
//! start <frame_no> <last_seq>
//! apply <frame_no> <prev_frame_no> <prev_last_seq> <first_seq> <last_seq> <W|M|H|R>
//! ```
//!
//! `start` is written each time the group's apply thread starts, with the
//! durable watermark it resumes from; `apply` before the first byte of a frame
//! is written to the replica (`W` write-ordered, `M` not write-ordered, `H`
//! heartbeat, `R` an M frame marked REBASE: it may name a predecessor behind
//! the line before it, after frames the relay lost). The log is rotated (renamed to `apply.log.1`, replacing an older
//! one) at start once it exceeds [`ROTATE_BYTES`], so it cannot grow without
//! bound; a rotated file starts with its own `start` line and checks on its own.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::gate::{ChainPos, Link};
use crate::frame::{FrameHeader, FrameKind};

/// File name of the apply log in a group's state directory.
pub const APPLY_LOG: &str = "apply.log";
/// Size above which the log is rotated when the apply thread starts.
pub const ROTATE_BYTES: u64 = 64 << 20;

/// Appends lines to a group's apply log.
#[derive(Debug)]
pub struct ApplyLog {
    path: PathBuf,
    file: File,
    /// Length of the file: a line that fails half-written is cut off again.
    len: u64,
}

impl ApplyLog {
    /// Open `path` for appending (creating it; rotating it first if it is
    /// larger than [`ROTATE_BYTES`]).
    pub fn open(path: &Path) -> std::io::Result<ApplyLog> {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
            let mut old = path.as_os_str().to_owned();
            old.push(".1");
            std::fs::rename(path, PathBuf::from(old))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(ApplyLog {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record a start from the durable watermark `pos`.
    pub fn start(&mut self, pos: ChainPos) -> std::io::Result<()> {
        self.line(&format!("start {} {}\n", pos.frame_no, pos.last_seq))
    }

    /// Record that frame `h` is about to be applied.
    pub fn apply(&mut self, h: &FrameHeader) -> std::io::Result<()> {
        self.line(&format!(
            "apply {} {} {} {} {} {}\n",
            h.frame_no,
            h.prev_frame_no,
            h.prev_last_seq,
            h.first_seq,
            h.last_seq,
            kind_letter(h)
        ))
    }

    fn line(&mut self, s: &str) -> std::io::Result<()> {
        // One write call per line: a concurrent reader or a kill never sees
        // half a line from the page cache. A line that fails half-written (a
        // full disk) is cut off, so a retry does not leave a torn line.
        match self.file.write_all(s.as_bytes()) {
            Ok(()) => {
                self.len += s.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }
}

/// The letter an `apply` line uses for a frame's kind.
pub fn kind_letter(h: &FrameHeader) -> char {
    if h.rebase {
        'R'
    } else if h.heartbeat {
        'H'
    } else if h.kind == FrameKind::Merge {
        'M'
    } else {
        'W'
    }
}

/// The kind letter of the last `apply` line for `frame_no` in the last 64 KiB
/// of the log, if any (used at start to tell whether the replica was left at a
/// consistent point).
pub fn last_kind_of(path: &Path, frame_no: u64) -> Option<char> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(64 << 10);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines().rev().find_map(|l| match parse_line(l) {
        Ok(Line::Apply { frame, kind, .. }) if frame.frame_no == frame_no => Some(kind),
        _ => None,
    })
}

/// What [`check_apply_log`] found in a log that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyLogSummary {
    /// Number of `start` lines.
    pub starts: u64,
    /// Number of `apply` lines.
    pub applies: u64,
    /// Number of `apply` lines of `M` frames.
    pub merges: u64,
    /// Number of `apply` lines of heartbeats.
    pub heartbeats: u64,
    /// The position of the last line (the last applied frame, or the last start).
    pub last: ChainPos,
}

#[derive(Debug, PartialEq, Eq)]
enum Line {
    Start(ChainPos),
    Apply {
        frame: ChainPos,
        prev: ChainPos,
        first_seq: u64,
        kind: char,
    },
}

fn parse_line(line: &str) -> Result<Line, String> {
    let mut it = line.split(' ');
    let word = it.next().unwrap_or("");
    let nums: Vec<&str> = it.collect();
    let num = |i: usize, what: &str| -> Result<u64, String> {
        let s = nums.get(i).ok_or_else(|| format!("missing {what}"))?;
        s.parse::<u64>()
            .map_err(|_| format!("{what} {s:?} is not a number"))
    };
    match word {
        "start" => {
            if nums.len() != 2 {
                return Err(format!("start line has {} fields, expected 2", nums.len()));
            }
            Ok(Line::Start(ChainPos {
                frame_no: num(0, "frame_no")?,
                last_seq: num(1, "last_seq")?,
            }))
        }
        "apply" => {
            if nums.len() != 6 {
                return Err(format!("apply line has {} fields, expected 6", nums.len()));
            }
            let kind = match nums[5] {
                "W" => 'W',
                "M" => 'M',
                "H" => 'H',
                "R" => 'R',
                k => return Err(format!("kind {k:?} is not W, M, H or R")),
            };
            let frame = ChainPos {
                frame_no: num(0, "frame_no")?,
                last_seq: num(4, "last_seq")?,
            };
            let prev = ChainPos {
                frame_no: num(1, "prev_frame_no")?,
                last_seq: num(2, "prev_last_seq")?,
            };
            let first_seq = num(3, "first_seq")?;
            if frame.frame_no <= prev.frame_no {
                return Err(format!(
                    "frame {} names predecessor {} that is not below it",
                    frame.frame_no, prev.frame_no
                ));
            }
            if frame.last_seq < prev.last_seq || first_seq > frame.last_seq {
                return Err(format!(
                    "frame {}: seqs out of order (prev_last_seq {}, first_seq {}, last_seq {})",
                    frame.frame_no, prev.last_seq, first_seq, frame.last_seq
                ));
            }
            Ok(Line::Apply {
                frame,
                prev,
                first_seq,
                kind,
            })
        }
        other => Err(format!("unknown line type {other:?}")),
    }
}

/// Check that an apply log proves chain order: every `apply` line names as its
/// predecessor (frame number and last seq) exactly the frame of the line before
/// it (the previous `apply`, or the `start` it follows), and no `start` resumes
/// from beyond the last frame applied before it (the watermark never passes what
/// was applied). Every line must parse; the file must end with a newline. The
/// error names the line number and what is wrong.
pub fn check_apply_log(path: &Path) -> Result<ApplyLogSummary, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8", path.display()))?;
    check_text(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn check_text(text: &str) -> Result<ApplyLogSummary, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("last line is incomplete (no newline)".into());
    }
    let mut sum = ApplyLogSummary::default();
    let mut before: Option<ChainPos> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        match parse_line(line).map_err(|e| format!("line {n}: {e}: {line:?}"))? {
            Line::Start(pos) => {
                if let Some(b) = before
                    && pos.frame_no > b.frame_no
                {
                    return Err(format!(
                        "line {n}: start from frame {} but the last frame applied before it is {}",
                        pos.frame_no, b.frame_no
                    ));
                }
                sum.starts += 1;
                before = Some(pos);
            }
            Line::Apply {
                frame, prev, kind, ..
            } => {
                let Some(b) = before else {
                    return Err(format!("line {n}: apply before any start line"));
                };
                // A REBASE frame may continue from a frame behind the line
                // before it (the relay lost frames); it still moves forward.
                let link = Link {
                    frame_no: frame.frame_no,
                    prev_frame_no: prev.frame_no,
                    prev_last_seq: prev.last_seq,
                    last_seq: frame.last_seq,
                    rebase: kind == 'R',
                };
                if !link.follows(b) {
                    return Err(format!(
                        "line {n}: frame {} names predecessor frame {} (last seq {}), \
                         but the line before is frame {} (last seq {})",
                        frame.frame_no, prev.frame_no, prev.last_seq, b.frame_no, b.last_seq
                    ));
                }
                sum.applies += 1;
                match kind {
                    'M' | 'R' => sum.merges += 1,
                    'H' => sum.heartbeats += 1,
                    _ => {}
                }
                before = Some(frame);
            }
        }
    }
    sum.last = before.unwrap_or_default();
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
start 0 0
apply 1 0 0 1 3 W
apply 2 1 3 4 4 M
apply 5 2 4 4 4 H
start 2 4
apply 5 2 4 4 4 H
apply 9 5 4 7 9 W
apply 20 5 4 10 12 R
apply 21 20 12 13 13 W
";

    #[test]
    fn a_good_log_passes_with_counts() {
        let s = check_text(GOOD).unwrap();
        assert_eq!(s.starts, 2);
        assert_eq!(s.applies, 7);
        assert_eq!(s.merges, 2);
        assert_eq!(s.heartbeats, 2);
        assert_eq!(
            s.last,
            ChainPos {
                frame_no: 21,
                last_seq: 13
            }
        );
        assert_eq!(check_text("").unwrap(), ApplyLogSummary::default());
    }

    #[test]
    fn broken_logs_are_refused_naming_the_line() {
        let cases: &[(&str, &str)] = &[
            // Frame 2 applied twice in a row: the second names 1, the line before is 2.
            (
                "start 0 0\napply 1 0 0 1 1 W\napply 2 1 1 2 2 W\napply 2 1 1 2 2 W\n",
                "line 4: frame 2 names predecessor frame 1",
            ),
            // Out of order: 3 before 2.
            (
                "start 0 0\napply 1 0 0 1 1 W\napply 3 2 2 3 3 W\n",
                "line 3",
            ),
            // Right frame number, wrong seq.
            (
                "start 0 0\napply 1 0 0 1 5 W\napply 2 1 4 6 6 W\n",
                "(last seq 4)",
            ),
            // Restart ahead of what was applied.
            (
                "start 0 0\napply 1 0 0 1 1 W\nstart 7 7\n",
                "line 3: start from frame 7",
            ),
            ("apply 1 0 0 1 1 W\n", "apply before any start"),
            ("start 0 0\napply 1 0 0 1 1 X\n", "kind \"X\""),
            ("start 0 0\napply 1 0 0 1 W\n", "5 fields"),
            ("start 0 x\n", "not a number"),
            ("start 0 0\nbogus\n", "unknown line type"),
            ("start 0 0\napply 1 0 0 1 1 W", "incomplete"),
            ("start 0 0\napply 1 1 0 1 1 W\n", "not below it"),
            // A REBASE line that does not move forward.
            (
                "start 0 0\napply 5 0 0 1 9 W\napply 6 2 3 4 9 R\n",
                "line 3: frame 6 names predecessor frame 2",
            ),
        ];
        for (text, want) in cases {
            let e = check_text(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn writer_output_passes_the_checker_and_rotation_keeps_it_checkable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(APPLY_LOG);
        let key = crate::frame::DataKey::from_bytes([1; 32]);
        let mut sealer = crate::frame::Sealer::new(&key, 1, 1).unwrap();
        let group = "g1".parse().unwrap();
        let mut log = ApplyLog::open(&p).unwrap();
        log.start(ChainPos::default()).unwrap();
        let mut prev = ChainPos::default();
        for f in 1..=3u64 {
            let data = [f as u8; 8];
            let recs = [crate::frame::RecordRef::write(
                prev.last_seq + 1,
                0,
                0,
                10 * f,
                &data,
            )];
            let meta = crate::frame::FrameMeta {
                group,
                key_epoch: 1,
                frame_no: f * 10,
                prev_frame_no: prev.frame_no,
                prev_last_seq: prev.last_seq,
                kind: if f == 2 {
                    FrameKind::Merge
                } else {
                    FrameKind::Write
                },
                heartbeat: false,
                rebase: false,
                time_us: 0,
            };
            let sealed = sealer.seal(&meta, &recs).unwrap();
            log.apply(&sealed.header).unwrap();
            prev = ChainPos {
                frame_no: sealed.header.frame_no,
                last_seq: sealed.header.last_seq,
            };
        }
        drop(log);
        let s = check_apply_log(&p).unwrap();
        assert_eq!((s.starts, s.applies, s.merges), (1, 3, 1));
        assert_eq!(s.last, prev);
        assert_eq!(last_kind_of(&p, 20), Some('M'));
        assert_eq!(last_kind_of(&p, 30), Some('W'));
        assert_eq!(last_kind_of(&p, 99), None);

        // Corrupt it: the checker names the line.
        let text = std::fs::read_to_string(&p).unwrap();
        let swapped: Vec<&str> = text.lines().collect();
        let bad = format!("{}\n{}\n{}\n", swapped[0], swapped[2], swapped[1]);
        std::fs::write(&p, bad).unwrap();
        assert!(check_apply_log(&p).unwrap_err().contains("line 2"));

        // Rotation: an oversized log is moved aside and a fresh one begins.
        let f = OpenOptions::new().append(true).open(&p).unwrap();
        f.set_len(ROTATE_BYTES + 1).unwrap();
        let mut log = ApplyLog::open(&p).unwrap();
        log.start(prev).unwrap();
        drop(log);
        assert_eq!(check_apply_log(&p).unwrap().starts, 1);
        assert!(d.path().join("apply.log.1").exists());
    }
}
