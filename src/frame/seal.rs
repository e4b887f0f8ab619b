//! Sealing (agent) and opening (target) of frames: zstd + AES-256-GCM.
//!
//! AES-256-GCM is *ring*'s, the same implementation rustls runs for TLS (on
//! CPUs with AES-NI and VAES/VPCLMULQDQ it is about three times faster than the
//! portable `aes-gcm` crate, which the tests keep as an independent second
//! implementation to cross-check every golden frame). Opening decrypts in place
//! in the received buffer and never shifts the plaintext.

use std::io::Cursor;
use std::ops::Range;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use super::header::nonce;
use super::record::{RecordBounds, RecordIssue, check_records};
use super::{
    Codec, DataKey, FormatVersion, FrameError, FrameHeader, FrameKind, GroupName, HEADER_LEN,
    MAX_PLAIN_LEN, RECORD_HEADER_LEN, RecordHeader, RecordRef, TAG_LEN,
};

/// What the caller decides about a frame; everything else in the header is derived
/// from the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    /// Consistency group.
    pub group: GroupName,
    /// Key epoch; must equal the sealer's.
    pub key_epoch: u32,
    /// This frame's number (>= 1, above every number this sealer used before).
    pub frame_no: u64,
    /// Predecessor's number (0: start of chain).
    pub prev_frame_no: u64,
    /// Last seq of the predecessor.
    pub prev_last_seq: u64,
    /// W or M.
    pub kind: FrameKind,
    /// An idle heartbeat (W, no records).
    pub heartbeat: bool,
    /// Time stamp of an empty frame (its `time_first_us` and `time_last_us`);
    /// ignored when there are records (their times are used).
    pub time_us: u64,
}

/// A sealed frame ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFrame {
    /// The header, as encoded in `bytes[..128]`.
    pub header: FrameHeader,
    /// The whole wire frame: header, stored payload, tag.
    pub bytes: Vec<u8>,
}

fn aes(key: &DataKey) -> Result<LessSafeKey, FrameError> {
    // The key length is fixed by the type; ring refuses only other lengths.
    UnboundKey::new(&AES_256_GCM, key.as_bytes())
        .map(LessSafeKey::new)
        .map_err(|_| FrameError::InvalidKey {
            detail: "AES-256-GCM refused the 32-byte key".into(),
        })
}

/// Seals frames for one group's data key. Keeps a zstd context and a plaintext
/// scratch buffer across calls; meant to live on one worker thread.
pub struct Sealer {
    cipher: LessSafeKey,
    key_epoch: u32,
    zstd: zstd::bulk::Compressor<'static>,
    plain: Vec<u8>,
    /// Highest frame number sealed so far: a second seal with the same or a lower
    /// number would reuse a nonce, so it is refused.
    last_frame_no: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_epoch", &self.key_epoch)
            .field("last_frame_no", &self.last_frame_no)
            .finish_non_exhaustive()
    }
}

/// zstd's accepted compression levels (negative levels are the fast modes; 0 means
/// zstd's default level).
pub fn zstd_level_range() -> std::ops::RangeInclusive<i32> {
    zstd::zstd_safe::min_c_level()..=zstd::zstd_safe::max_c_level()
}

impl Sealer {
    /// A sealer for `key` at `key_epoch` (>= 1) compressing at `zstd_level`.
    pub fn new(key: &DataKey, key_epoch: u32, zstd_level: i32) -> Result<Sealer, FrameError> {
        if key_epoch == 0 {
            return Err(FrameError::ZeroEpoch);
        }
        let range = zstd_level_range();
        if !range.contains(&zstd_level) {
            return Err(FrameError::ZstdLevel {
                level: zstd_level,
                min: *range.start(),
                max: *range.end(),
            });
        }
        let mut zstd = zstd::bulk::Compressor::new(zstd_level).map_err(FrameError::Zstd)?;
        // The AEAD tag already protects the payload: no zstd checksum.
        zstd.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))
            .map_err(FrameError::Zstd)?;
        Ok(Sealer {
            cipher: aes(key)?,
            key_epoch,
            zstd,
            plain: Vec::new(),
            last_frame_no: 0,
        })
    }

    /// The key epoch this sealer stamps on its frames.
    pub fn key_epoch(&self) -> u32 {
        self.key_epoch
    }

    /// Build, compress and encrypt one frame from `records` (in seq order). Refuses
    /// input that would break a format rule, so every sealed frame opens.
    pub fn seal(
        &mut self,
        meta: &FrameMeta,
        records: &[RecordRef<'_>],
    ) -> Result<SealedFrame, FrameError> {
        let invalid = |detail: String| FrameError::InvalidInput {
            group: meta.group,
            frame_no: meta.frame_no,
            detail,
        };
        if meta.key_epoch != self.key_epoch {
            return Err(invalid(format!(
                "key_epoch {} differs from the sealer's key epoch {}",
                meta.key_epoch, self.key_epoch
            )));
        }
        if meta.frame_no == 0 {
            return Err(invalid("frame_no must be >= 1".to_string()));
        }
        if meta.prev_frame_no >= meta.frame_no {
            return Err(invalid(format!(
                "prev_frame_no {} must be < frame_no {}",
                meta.prev_frame_no, meta.frame_no
            )));
        }
        if meta.frame_no <= self.last_frame_no {
            return Err(invalid(format!(
                "frame number not above {}, the last one this sealer used (a repeat would reuse \
                 an AES-GCM nonce)",
                self.last_frame_no
            )));
        }
        if meta.heartbeat && (meta.kind != FrameKind::Write || !records.is_empty()) {
            return Err(invalid(format!(
                "a heartbeat must be a W frame without records (got {:?} with {} records)",
                meta.kind,
                records.len()
            )));
        }

        // Lengths first, so nothing is allocated for an oversized frame.
        let mut data_len: u64 = 0;
        for (i, r) in records.iter().enumerate() {
            let expect = r.header.data_len() as usize;
            if r.data.len() != expect {
                return Err(invalid(format!(
                    "record {i} ({:?}, len {}) comes with {} data bytes, expected {expect}",
                    r.header.kind,
                    r.header.len,
                    r.data.len()
                )));
            }
            data_len += r.data.len() as u64;
        }
        let plain_len = (records.len() as u64)
            .saturating_mul(RECORD_HEADER_LEN as u64)
            .saturating_add(data_len);
        if plain_len > u64::from(MAX_PLAIN_LEN) {
            return Err(invalid(format!(
                "{} records with {data_len} data bytes make a {plain_len}-byte payload, above \
                 the maximum {MAX_PLAIN_LEN}",
                records.len()
            )));
        }
        let plain_len = plain_len as u32;

        let (first_seq, last_seq, time_first_us, time_last_us) = match records {
            [] => (
                meta.prev_last_seq,
                meta.prev_last_seq,
                meta.time_us,
                meta.time_us,
            ),
            [first, .., last] | [first @ last] => (
                first.header.seq,
                last.header.seq,
                first.header.time_us,
                last.header.time_us,
            ),
        };
        let bounds = RecordBounds {
            prev_last_seq: meta.prev_last_seq,
            first_seq,
            last_seq,
            time_first_us,
            time_last_us,
            data_len,
        };
        check_records(records.iter().map(|r| r.header), &bounds).map_err(
            |RecordIssue {
                 index,
                 field,
                 detail,
             }| { invalid(format!("record {index}: invalid `{field}`: {detail}")) },
        )?;

        // Plaintext, built once.
        self.plain.clear();
        self.plain.reserve(plain_len as usize);
        for r in records {
            self.plain.extend_from_slice(&r.header.encode());
        }
        for r in records {
            self.plain.extend_from_slice(r.data);
        }
        debug_assert_eq!(self.plain.len(), plain_len as usize);

        // Compress straight into the output after the header space.
        let bound = zstd::zstd_safe::compress_bound(self.plain.len()).max(self.plain.len());
        let mut out = Vec::with_capacity(HEADER_LEN + bound + TAG_LEN);
        out.resize(HEADER_LEN, 0);
        let mut codec = Codec::Raw;
        if plain_len > 0 {
            let mut cur = Cursor::new(&mut out);
            cur.set_position(HEADER_LEN as u64);
            match self.zstd.compress_to_buffer(&self.plain, &mut cur) {
                Ok(n) if n < (plain_len - plain_len / 64) as usize => codec = Codec::Zstd,
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    group = %meta.group,
                    frame_no = meta.frame_no,
                    error = %e,
                    "zstd compression failed; storing the frame raw"
                ),
            }
        }
        if codec == Codec::Raw {
            out.truncate(HEADER_LEN);
            out.extend_from_slice(&self.plain);
        }
        let stored_len = (out.len() - HEADER_LEN) as u32;

        let header = FrameHeader {
            version: FormatVersion::LATEST,
            kind: meta.kind,
            heartbeat: meta.heartbeat,
            codec,
            key_epoch: self.key_epoch,
            group: meta.group,
            frame_no: meta.frame_no,
            prev_frame_no: meta.prev_frame_no,
            first_seq,
            last_seq,
            prev_last_seq: meta.prev_last_seq,
            time_first_us,
            time_last_us,
            record_count: records.len() as u32,
            plain_len,
            stored_len,
        };
        header
            .validate()
            .map_err(|e| invalid(format!("header would be invalid: {e}")))?;
        out[..HEADER_LEN].copy_from_slice(&header.encode());

        // Encrypt in place, header as associated data.
        let (aad, body) = out.split_at_mut(HEADER_LEN);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(header.nonce()),
                Aad::from(&*aad),
                body,
            )
            .map_err(|_| invalid("AES-GCM refused the payload length".to_string()))?;
        out.extend_from_slice(tag.as_ref());
        self.last_frame_no = meta.frame_no;
        Ok(SealedFrame { header, bytes: out })
    }
}

/// An opened, verified frame: its header, record headers, and the data of its Write
/// records concatenated in record order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFrame {
    /// The frame header.
    pub header: FrameHeader,
    /// Record headers in seq order.
    pub records: Vec<RecordHeader>,
    /// The buffer the write data lives in (the decrypted frame for a raw frame,
    /// the decompressed payload for a zstd frame).
    buf: Vec<u8>,
    /// Where in `buf` the write data is.
    data: Range<usize>,
}

impl OpenedFrame {
    /// Write data, concatenated in record order (each Write's `len` bytes in turn).
    pub fn data(&self) -> &[u8] {
        &self.buf[self.data.clone()]
    }

    /// Records with their data (empty for Zero and DiskSize).
    pub fn iter(&self) -> RecordIter<'_> {
        RecordIter {
            records: self.records.iter(),
            data: self.data(),
        }
    }
}

impl<'a> IntoIterator for &'a OpenedFrame {
    type Item = (RecordHeader, &'a [u8]);
    type IntoIter = RecordIter<'a>;
    fn into_iter(self) -> RecordIter<'a> {
        self.iter()
    }
}

/// Iterator over an opened frame's records and their data.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    records: std::slice::Iter<'a, RecordHeader>,
    data: &'a [u8],
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = (RecordHeader, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let r = *self.records.next()?;
        // Opening checked that the Write lengths sum to data.len().
        let n = (r.data_len() as usize).min(self.data.len());
        let (d, rest) = self.data.split_at(n);
        self.data = rest;
        Some((r, d))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

impl ExactSizeIterator for RecordIter<'_> {}

/// Opens frames of one group: checks the header, the group, the key epoch and the
/// tag, then decompresses and checks the records. Reuses a zstd context and a
/// ciphertext buffer across calls.
pub struct Opener {
    group: GroupName,
    keys: Vec<(u32, LessSafeKey)>,
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("group", &self.group)
            .field("epochs", &self.epochs())
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for `group` holding a data key per key epoch (epochs >= 1, each once).
    pub fn new(group: GroupName, keys: Vec<(u32, DataKey)>) -> Result<Opener, FrameError> {
        let mut o = Opener {
            group,
            keys: Vec::with_capacity(keys.len()),
            zstd: zstd::bulk::Decompressor::new().map_err(FrameError::Zstd)?,
        };
        for (epoch, key) in keys {
            o.add_key(epoch, &key)?;
        }
        Ok(o)
    }

    /// Add the key of a new epoch (after a key rotation).
    pub fn add_key(&mut self, epoch: u32, key: &DataKey) -> Result<(), FrameError> {
        if epoch == 0 {
            return Err(FrameError::ZeroEpoch);
        }
        if self.keys.iter().any(|(e, _)| *e == epoch) {
            return Err(FrameError::DuplicateEpoch { epoch });
        }
        self.keys.push((epoch, aes(key)?));
        Ok(())
    }

    /// The group this opener accepts.
    pub fn group(&self) -> GroupName {
        self.group
    }

    /// Key epochs this opener has keys for.
    pub fn epochs(&self) -> Vec<u32> {
        self.keys.iter().map(|(e, _)| *e).collect()
    }

    /// Verify and open one whole wire frame (copies it first; a caller that owns
    /// the bytes should use [`Opener::open_owned`]).
    pub fn open(&mut self, bytes: &[u8]) -> Result<OpenedFrame, FrameError> {
        self.open_owned(bytes.to_vec())
    }

    /// Verify and open one whole wire frame, decrypting it in place in `bytes`.
    /// Nothing of the frame is returned unless every check passed.
    pub fn open_owned(&mut self, mut bytes: Vec<u8>) -> Result<OpenedFrame, FrameError> {
        let h = FrameHeader::parse(&bytes)?;
        if h.group != self.group {
            return Err(FrameError::WrongGroup {
                frame_no: h.frame_no,
                expected: self.group,
                found: h.group,
            });
        }
        let Some((_, cipher)) = self.keys.iter().find(|(e, _)| *e == h.key_epoch) else {
            return Err(FrameError::UnknownEpoch {
                group: h.group,
                frame_no: h.frame_no,
                epoch: h.key_epoch,
                known: self.epochs(),
            });
        };
        // parse() checked bytes.len() == 128 + stored_len + 16; the checked splits
        // only keep a broken invariant from turning into a panic.
        let wire_len = bytes.len();
        let mismatch = || FrameError::LengthMismatch {
            frame_no: h.frame_no,
            stored_len: h.stored_len,
            expected: h.wire_len(),
            actual: wire_len,
        };
        let auth = || FrameError::AuthFailed {
            group: h.group,
            frame_no: h.frame_no,
            epoch: h.key_epoch,
        };
        let stored = h.stored_len as usize;
        {
            let (aad, rest) = bytes
                .split_at_mut_checked(HEADER_LEN)
                .ok_or_else(mismatch)?;
            if rest.len() != stored + TAG_LEN {
                return Err(mismatch());
            }
            let (body, tag) = rest.split_at_mut(stored);
            let tag = Tag::try_from(&*tag).map_err(|_| auth())?;
            cipher
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce(h.key_epoch, h.frame_no)),
                    Aad::from(&*aad),
                    tag,
                    body,
                    0..,
                )
                .map_err(|_| auth())?;
        }
        // Authenticated from here on.
        let plain = h.plain_len as usize; // <= MAX_PLAIN_LEN, checked by parse()
        let (buf, start) = match h.codec {
            Codec::Raw => {
                if stored != plain {
                    return Err(mismatch());
                }
                (bytes, HEADER_LEN)
            }
            Codec::Zstd => {
                // The output never grows past plain_len.
                let decompress = |detail: String| FrameError::Decompress {
                    group: h.group,
                    frame_no: h.frame_no,
                    plain_len: h.plain_len,
                    detail,
                };
                let mut out = Vec::with_capacity(plain);
                let n = self
                    .zstd
                    .decompress_to_buffer(&bytes[HEADER_LEN..HEADER_LEN + stored], &mut out)
                    .map_err(|e| decompress(e.to_string()))?;
                if n != plain || out.len() != plain {
                    return Err(decompress(format!("got {n} bytes")));
                }
                (out, 0)
            }
        };
        let payload = &buf[start..start + plain];
        let hdr_len = h.record_count as usize * RECORD_HEADER_LEN;
        let invalid = |RecordIssue {
                           index,
                           field,
                           detail,
                       }| FrameError::InvalidRecord {
            group: h.group,
            frame_no: h.frame_no,
            index,
            offset: index * RECORD_HEADER_LEN,
            field,
            detail,
        };
        let mut records = Vec::with_capacity(h.record_count as usize);
        let (chunks, _) = payload[..hdr_len].as_chunks::<RECORD_HEADER_LEN>();
        for (i, chunk) in chunks.iter().enumerate() {
            records.push(RecordHeader::decode(i, chunk).map_err(invalid)?);
        }
        let bounds = RecordBounds {
            prev_last_seq: h.prev_last_seq,
            first_seq: h.first_seq,
            last_seq: h.last_seq,
            time_first_us: h.time_first_us,
            time_last_us: h.time_last_us,
            data_len: u64::from(h.data_len()),
        };
        check_records(records.iter().copied(), &bounds).map_err(invalid)?;
        Ok(OpenedFrame {
            header: h,
            records,
            data: start + hdr_len..start + plain,
            buf,
        })
    }
}
