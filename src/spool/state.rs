//! The per-group state file: the trim point and the head at the time of the last
//! trim, so both survive the deletion of every segment and a restart.
//!
//! Written atomically: `state.tmp` is written and fsync'd, renamed over `state`,
//! then the group directory is fsync'd.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::SpoolError;
use super::record::{FormatError, FormatVersion};

/// Name of the state file inside a group directory.
pub const STATE_FILE: &str = "state";
/// Name of the temporary file a state update is written to before the rename.
pub const STATE_TMP: &str = "state.tmp";
/// Magic at offset 0 of the state file.
pub const STATE_MAGIC: [u8; 8] = *b"TDMKSPST";
/// Size of the state file in bytes.
pub const STATE_LEN: usize = 48;

/// What the state file records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupState {
    /// Frames with a number up to this one are trimmed (acknowledged by the target).
    pub trimmed_through: u64,
    /// Head frame number when the state was written.
    pub head_frame_no: u64,
    /// Last seq of that head frame.
    pub head_last_seq: u64,
}

impl GroupState {
    /// Encode to the v1 layout (docs/SPOOL.md, "State file").
    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0..8].copy_from_slice(&STATE_MAGIC);
        b[8..10].copy_from_slice(&(FormatVersion::CURRENT as u16).to_le_bytes());
        b[10..12].copy_from_slice(&(STATE_LEN as u16).to_le_bytes());
        b[16..24].copy_from_slice(&self.trimmed_through.to_le_bytes());
        b[24..32].copy_from_slice(&self.head_frame_no.to_le_bytes());
        b[32..40].copy_from_slice(&self.head_last_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check: exact length, magic, CRC, version, length field, reserved
    /// bytes zero, trim point not above the head.
    pub fn decode(b: &[u8]) -> Result<GroupState, FormatError> {
        const WHAT: &str = "state file";
        if b.len() != STATE_LEN {
            return Err(FormatError::Length {
                what: WHAT,
                need: STATE_LEN,
                got: b.len(),
            });
        }
        if b[0..8] != STATE_MAGIC {
            return Err(FormatError::BadMagic {
                what: WHAT,
                found: b[0..8].to_vec(),
            });
        }
        let stored = u32::from_le_bytes([b[44], b[45], b[46], b[47]]);
        let computed = crc32c::crc32c(&b[0..44]);
        if stored != computed {
            return Err(FormatError::Crc {
                what: WHAT,
                stored,
                computed,
            });
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if FormatVersion::from_u16(version).is_none() {
            return Err(FormatError::UnsupportedVersion {
                version,
                supported: FormatVersion::CURRENT as u16,
            });
        }
        let len = u16::from_le_bytes([b[10], b[11]]);
        if len as usize != STATE_LEN {
            return Err(FormatError::Field {
                field: "len",
                reason: format!("{len}, expected {STATE_LEN}"),
            });
        }
        if b[12..16].iter().chain(&b[40..44]).any(|&x| x != 0) {
            return Err(FormatError::Field {
                field: "reserved",
                reason: "not zero".into(),
            });
        }
        let u = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let st = GroupState {
            trimmed_through: u(16),
            head_frame_no: u(24),
            head_last_seq: u(32),
        };
        if st.trimmed_through > st.head_frame_no {
            return Err(FormatError::Field {
                field: "trimmed_through",
                reason: format!(
                    "{} above head_frame_no {}",
                    st.trimmed_through, st.head_frame_no
                ),
            });
        }
        Ok(st)
    }
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// fsync a directory, so that entries created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    crate::util::durable::fsync_dir(dir).map_err(|e| io_err("fsync directory", dir, e))
}

/// Atomically replace the state file of the group directory `gdir`.
pub fn write_state(gdir: &Path, st: &GroupState) -> Result<(), SpoolError> {
    let dst = gdir.join(STATE_FILE);
    crate::util::durable::replace_file(&dst, &gdir.join(STATE_TMP), &st.encode())
        .map_err(|e| io_err("replace the state file", &dst, e))
}

/// Why an existing state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It could not be opened or read.
    #[error("{0}")]
    Io(std::io::Error),
    /// Its bytes are not a valid state file.
    #[error("{0}")]
    Format(FormatError),
}

/// Read the state file of `gdir`: `Ok(None)` when there is none. At most
/// [`STATE_LEN`]` + 1` bytes are read, whatever the file's size.
pub fn read_state(gdir: &Path) -> Result<Option<GroupState>, StateError> {
    use std::io::Read;
    let path = gdir.join(STATE_FILE);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Io(e)),
    };
    let mut buf = Vec::with_capacity(STATE_LEN + 1);
    f.take(STATE_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(StateError::Io)?;
    GroupState::decode(&buf)
        .map(Some)
        .map_err(StateError::Format)
}

/// Path of the state file in `gdir`.
pub fn state_path(gdir: &Path) -> PathBuf {
    gdir.join(STATE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    const GOLDEN_STATE_CRC: u32 = 0xf529_0a9b;

    #[test]
    fn state_golden() {
        let st = GroupState {
            trimmed_through: 5,
            head_frame_no: 9,
            head_last_seq: 0x0100,
        };
        let b = st.encode();
        let mut expected = [0u8; STATE_LEN];
        expected[0..8].copy_from_slice(b"TDMKSPST");
        expected[8] = 1; // version
        expected[10] = 48; // len
        expected[16] = 5; // trimmed_through
        expected[24] = 9; // head_frame_no
        expected[33] = 1; // head_last_seq = 0x100
        expected[44..48].copy_from_slice(&GOLDEN_STATE_CRC.to_le_bytes());
        assert_eq!(b, expected);
        assert_eq!(GroupState::decode(&b).unwrap(), st);
    }

    #[test]
    fn state_file_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), None);
        let st = GroupState {
            trimmed_through: 3,
            head_frame_no: 4,
            head_last_seq: 40,
        };
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), Some(st));
        assert!(!dir.path().join(STATE_TMP).exists());
        let mut b = st.encode();
        b[20] ^= 1;
        fs::write(dir.path().join(STATE_FILE), b).unwrap();
        let why = read_state(dir.path()).unwrap_err().to_string();
        assert!(why.contains("crc"), "{why}");
        let bad = GroupState {
            trimmed_through: 5,
            head_frame_no: 4,
            head_last_seq: 0,
        };
        assert!(GroupState::decode(&bad.encode()).is_err());
    }

    proptest! {
        #[test]
        fn state_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = GroupState::decode(&bytes);
        }
    }
}
