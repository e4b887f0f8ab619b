//! The persisted watermark: how far a group's replica is durably applied.
//!
//! File layout (version 1): two 64-byte slots. A write goes to the slot the
//! previous write did not use, then `fdatasync`; a torn write can only damage
//! the slot being written, so the other slot still holds the previous watermark.
//! Reading takes the valid slot with the highest generation.
//!
//! Slot (little-endian): magic `b"TMWM"` (4), version u16, flags u16,
//! generation u64, frame_no u64, last_seq u64, time_us u64 (source capture time
//! of the last applied record), reserved 20 bytes = 0, crc32c u32 over bytes
//! 0..60.
//!
//! Slot version 2 carries in `flags` bit 0 whether the replica is consistent at
//! this position (the last frame applied is not M data); the other bits are
//! zero. Version 1 (flags zero) does not say, and is still read: the target
//! then falls back to its apply log. Every store writes version 2, except the
//! zero watermark of a new file (version 1: frame 0 is consistent by rule).
//! The flag must be durable with the position it describes: a power cut that
//! keeps the watermark but takes the (never synced) apply log's tail would
//! otherwise leave the target unable to say whether its replica is consistent.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::gate::ChainPos;
use crate::error::{Classify, ErrorKind};

const SLOT: usize = 64;
const MAGIC: [u8; 4] = *b"TMWM";

/// Errors of the watermark file.
#[derive(Debug, Error)]
pub enum WatermarkError {
    /// I/O on the file failed.
    #[error("watermark {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Both slots are unreadable: the file is not a watermark or is corrupt.
    #[error("watermark {path}: no valid slot ({why})")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What failed in the slots.
        why: String,
    },
}

impl Classify for WatermarkError {
    fn kind(&self) -> ErrorKind {
        match self {
            WatermarkError::Io { .. } => ErrorKind::Io,
            WatermarkError::Corrupt { .. } => ErrorKind::Corrupt,
        }
    }
}

/// A durable watermark value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// Position in the chain.
    pub pos: ChainPos,
    /// Capture time of the last applied record, µs.
    pub time_us: u64,
    /// Whether the replica is consistent at `pos` (its last frame is not M
    /// data); `None` when the slot predates the flag (version 1).
    pub consistent: Option<bool>,
}

/// `flags` bit of a version-2 slot: the replica is consistent at the position.
const FLAG_CONSISTENT: u16 = 1;

fn encode_slot(generation: u64, m: &Mark) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[0..4].copy_from_slice(&MAGIC);
    let (version, flags) = match m.consistent {
        None => (1u16, 0u16),
        Some(c) => (2, if c { FLAG_CONSISTENT } else { 0 }),
    };
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..24].copy_from_slice(&m.pos.frame_no.to_le_bytes());
    b[24..32].copy_from_slice(&m.pos.last_seq.to_le_bytes());
    b[32..40].copy_from_slice(&m.time_us.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_slot(b: &[u8]) -> Result<(u64, Mark), String> {
    if b.len() != SLOT {
        return Err(format!("slot is {} bytes", b.len()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    if b[0..4] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(b[60..64].try_into().unwrap_or([0; 4]));
    if crc32c::crc32c(&b[..60]) != crc {
        return Err("checksum mismatch".into());
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    let flags = u16::from_le_bytes([b[6], b[7]]);
    let consistent = match version {
        1 if flags == 0 => None,
        1 => return Err(format!("version 1 slot with flags {flags:#x} (must be 0)")),
        2 if flags & !FLAG_CONSISTENT == 0 => Some(flags & FLAG_CONSISTENT != 0),
        2 => return Err(format!("unknown flags {flags:#x}")),
        v => return Err(format!("unsupported version {v}")),
    };
    if b[40..60].iter().any(|&x| x != 0) {
        return Err("reserved bytes not zero".into());
    }
    Ok((
        u64_at(8),
        Mark {
            pos: ChainPos {
                frame_no: u64_at(16),
                last_seq: u64_at(24),
            },
            time_us: u64_at(32),
            consistent,
        },
    ))
}

/// The watermark file of one group.
pub struct Watermark {
    path: PathBuf,
    file: File,
    generation: u64,
    current: Mark,
}

impl Watermark {
    /// Open (or create, at zero) the watermark file.
    pub fn open(path: &Path) -> Result<Self, WatermarkError> {
        let io = |source| WatermarkError::Io {
            path: path.to_path_buf(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if !existed || len == 0 {
            let mut w = Watermark {
                path: path.to_path_buf(),
                file,
                generation: 0,
                current: Mark::default(),
            };
            w.store(Mark::default())?;
            crate::util::durable::sync_parent_dir(path).map_err(io)?;
            return Ok(w);
        }
        let mut buf = vec![0u8; 2 * SLOT];
        let n = file.read_at(&mut buf, 0).map_err(io)?;
        buf.truncate(n);
        let slots: Vec<Result<(u64, Mark), String>> = (0..2)
            .map(|i| {
                buf.get(i * SLOT..(i + 1) * SLOT)
                    .ok_or_else(|| "missing".to_string())
                    .and_then(decode_slot)
            })
            .collect();
        let best = slots
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .max_by_key(|(g, _)| *g)
            .copied();
        match best {
            Some((generation, current)) => Ok(Watermark {
                path: path.to_path_buf(),
                file,
                generation,
                current,
            }),
            None => Err(WatermarkError::Corrupt {
                path: path.to_path_buf(),
                why: slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("slot {i}: {}", s.as_ref().err().map_or("ok", |e| e)))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The durable watermark.
    pub fn get(&self) -> Mark {
        self.current
    }

    /// Durably store a new watermark (write the other slot, fdatasync).
    pub fn store(&mut self, m: Mark) -> Result<(), WatermarkError> {
        let generation = self.generation + 1;
        let slot = generation % 2;
        let b = encode_slot(generation, &m);
        let io = |source| WatermarkError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all_at(&b, slot * SLOT as u64).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.generation = generation;
        self.current = m;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(f: u64) -> Mark {
        Mark {
            pos: ChainPos {
                frame_no: f,
                last_seq: f * 10,
            },
            time_us: f * 100,
            consistent: None,
        }
    }

    /// The slot `encode_slot(1, &mark(2))` must give, with `version` and
    /// `flags`, checksum included.
    fn golden(version: u8, flags: u8) -> [u8; SLOT] {
        let mut want = [0u8; SLOT];
        want[..8].copy_from_slice(&[b'T', b'M', b'W', b'M', version, 0, flags, 0]);
        want[8] = 1;
        want[16] = 2;
        want[24] = 20;
        want[32] = 200;
        let crc = crc32c::crc32c(&want[..60]);
        want[60..].copy_from_slice(&crc.to_le_bytes());
        want
    }

    #[test]
    fn golden_slot_bytes_v2_with_the_consistency_flag() {
        for (c, flag) in [(true, 1u8), (false, 0)] {
            let m = Mark {
                consistent: Some(c),
                ..mark(2)
            };
            let b = encode_slot(1, &m);
            assert_eq!(b, golden(2, flag));
            assert_eq!(decode_slot(&b).unwrap(), (1, m));
        }
        // Unknown flags, flags in a version-1 slot, a version 3: refused.
        for (version, flags) in [(2u8, 2u8), (1, 1), (3, 0)] {
            let b = golden(version, flags);
            assert!(decode_slot(&b).is_err(), "version {version} flags {flags}");
        }
    }

    #[test]
    fn golden_slot_bytes() {
        let b = encode_slot(1, &mark(2));
        assert_eq!(b, golden(1, 0));
        assert_eq!(decode_slot(&b).unwrap(), (1, mark(2)));
    }

    #[test]
    fn store_and_reopen_and_survive_a_torn_slot() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("wm");
        let mut w = Watermark::open(&p).unwrap();
        assert_eq!(w.get(), Mark::default());
        for f in 1..=5 {
            w.store(mark(f)).unwrap();
        }
        drop(w);
        assert_eq!(Watermark::open(&p).unwrap().get(), mark(5));
        // Tear the newest slot (generation 6 lives in slot 0): the previous one wins.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xAB; 10], 20).unwrap();
        assert_eq!(Watermark::open(&p).unwrap().get(), mark(4));
        // Both slots bad: a clear error.
        f.write_all_at(&[0xAB; 10], 84).unwrap();
        let e = Watermark::open(&p).err().unwrap().to_string();
        assert!(e.contains("no valid slot") && e.contains("checksum"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = decode_slot(&b);
        }
    }
}
