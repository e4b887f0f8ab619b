//! Data keys: the 256-bit AES-GCM keys that seal a group's frames.
//!
//! A data key lives only on the agent and the target, never on the relay. On disk
//! it is a file of 64 hex characters (an optional trailing newline is allowed).

use std::fmt;
use std::path::Path;

use super::FrameError;

/// A 256-bit AES-GCM data key. `Debug` never shows the key material, and the bytes
/// are overwritten with zeros when the key is dropped.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// Key length in bytes.
    pub const LEN: usize = 32;

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random key from the OS random source.
    pub fn generate() -> Result<DataKey, FrameError> {
        let mut k = DataKey([0u8; 32]);
        getrandom::fill(&mut k.0).map_err(|e| FrameError::Random {
            detail: e.to_string(),
        })?;
        Ok(k)
    }

    /// Parse exactly 64 hex digits (either case), nothing else.
    pub fn from_hex(s: &str) -> Result<DataKey, FrameError> {
        parse_hex(s).map_err(|detail| FrameError::InvalidKey { detail })
    }

    /// The key as 64 lowercase hex digits (the key file format, without newline).
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for &b in &self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    /// Load a key file: 64 hex digits, optionally followed by one `\n` (or `\r\n`).
    /// Errors name the path and never include key material.
    pub fn load(path: impl AsRef<Path>) -> Result<DataKey, FrameError> {
        let path = path.as_ref();
        let invalid = |detail: String| FrameError::KeyFileInvalid {
            path: path.to_path_buf(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|source| FrameError::KeyFileRead {
            path: path.to_path_buf(),
            source,
        })?;
        // A key file is 64 to 66 bytes; refuse to read anything much larger.
        if meta.len() > 66 {
            return Err(invalid(format!(
                "{} bytes, expected 64 hex characters and an optional newline",
                meta.len()
            )));
        }
        let mut bytes = std::fs::read(path).map_err(|source| FrameError::KeyFileRead {
            path: path.to_path_buf(),
            source,
        })?;
        let text = {
            let t: &[u8] = &bytes;
            let t = t.strip_suffix(b"\n").unwrap_or(t);
            t.strip_suffix(b"\r").unwrap_or(t)
        };
        let result = match std::str::from_utf8(text) {
            Ok(s) => parse_hex(s).map_err(invalid),
            Err(_) => Err(invalid("not ASCII hex text".to_string())),
        };
        bytes.fill(0);
        std::hint::black_box(&bytes);
        result
    }
}

fn parse_hex(s: &str) -> Result<DataKey, String> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err(format!(
            "expected 64 hex characters, found {} bytes",
            b.len()
        ));
    }
    let mut key = DataKey([0u8; 32]);
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi =
            hex_val(pair[0]).ok_or_else(|| format!("non-hex character at position {}", 2 * i))?;
        let lo = hex_val(pair[1])
            .ok_or_else(|| format!("non-hex character at position {}", 2 * i + 1))?;
        key.0[i] = (hi << 4) | lo;
    }
    Ok(key)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        // Best effort without unsafe: black_box keeps the compiler from treating
        // the zeroing as a dead store.
        self.0.fill(0);
        std::hint::black_box(&mut self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorKind};

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn hex_round_trip_and_case() {
        let k = DataKey::from_hex(HEX).unwrap();
        assert_eq!(k.as_bytes()[31], 0x1f);
        assert_eq!(k.to_hex(), HEX);
        let up = DataKey::from_hex(&HEX.to_uppercase()).unwrap();
        assert_eq!(up.as_bytes(), k.as_bytes());
    }

    #[test]
    fn hex_rejections() {
        for bad in [
            "",
            &HEX[..63],
            &format!("{HEX}0"),
            &HEX.replace('f', "g"),
            &format!(" {}", &HEX[1..]),
        ] {
            let e = DataKey::from_hex(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        }
        let e = DataKey::from_hex(&format!("{}é", &HEX[..62])).unwrap_err();
        assert!(e.to_string().contains("position 62"), "{e}");
        let e = DataKey::from_hex(&HEX[..10]).unwrap_err();
        assert!(e.to_string().contains("found 10 bytes"), "{e}");
    }

    #[test]
    fn debug_is_redacted() {
        let k = DataKey::from_hex(HEX).unwrap();
        let d = format!("{k:?}");
        assert_eq!(d, "DataKey(<redacted>)");
    }

    #[test]
    fn generate_differs() {
        let a = DataKey::generate().unwrap();
        let b = DataKey::generate().unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn load_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("plain", HEX.to_string()),
            ("nl", format!("{HEX}\n")),
            ("crlf", format!("{HEX}\r\n")),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            assert_eq!(DataKey::load(&p).unwrap().to_hex(), HEX, "{name}");
        }
        for (name, content) in [
            ("two-nl", format!("{HEX}\n\n")),
            ("short", HEX[..62].to_string()),
            ("space", format!("{HEX} ")),
            ("long", format!("{HEX}{HEX}")),
            ("binary", "\u{ff}".repeat(10)),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            let e = DataKey::load(&p).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{name}");
            assert!(e.to_string().contains(p.to_str().unwrap()), "{e}");
            assert!(!e.to_string().contains(&HEX[..16]), "{e}");
        }
        let missing = dir.path().join("missing");
        let e = DataKey::load(&missing).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
