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
use super::marker::{NoteReason, NoteRecord, Record, TagRecord};
use super::record::{RecordBounds, RecordIssue, check_marker_data, check_records};
use super::{
    Codec, DataKey, FormatVersion, FrameError, FrameHeader, FrameKind, GroupName, HEADER_LEN,
    MAX_PLAIN_LEN, RECORD_HEADER_LEN, RecordHeader, RecordRef, TAG_LEN, WireKind, WireRecord,
};
use crate::util::aligned::BLOCK;

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
    /// The first frame of a new stretch of the chain after frames the relay
    /// lost (M only; makes the frame version 3).
    pub rebase: bool,
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
    /// input that would break a format rule, so every sealed frame opens. The
    /// frame has the lowest version that can carry it: 3 for a REBASE frame or
    /// a `chain-gap` Note, 2 for a Tag or another Note, 1 otherwise (so a
    /// target that reads only older versions keeps working until the newer
    /// features are used).
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
        let version = records
            .iter()
            .map(|r| r.header.min_version())
            .chain(meta.rebase.then_some(FormatVersion::V3))
            .max()
            .unwrap_or(FormatVersion::V1);
        let bounds = RecordBounds {
            prev_last_seq: meta.prev_last_seq,
            first_seq,
            last_seq,
            time_first_us,
            time_last_us,
            data_len,
            version,
            frame_kind: meta.kind,
        };
        let refuse =
            |RecordIssue {
                 index,
                 field,
                 detail,
             }| { invalid(format!("record {index}: invalid `{field}`: {detail}")) };
        check_records(records.iter().map(|r| r.header), &bounds).map_err(refuse)?;
        for (i, r) in records.iter().enumerate() {
            check_marker_data(i, &r.header, r.data).map_err(refuse)?;
        }

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
            version,
            kind: meta.kind,
            heartbeat: meta.heartbeat,
            rebase: meta.rebase,
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

/// A marker record of an opened frame: where it is among the records, its
/// header fields, and where its text is in the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    /// Index among all the frame's records.
    pos: usize,
    seq: u64,
    time_us: u64,
    what: MarkerWhat,
    /// The name or text, relative to the data area.
    text: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkerWhat {
    Tag { flags: u64 },
    Note { disk: u16, reason: NoteReason },
}

/// An opened, verified frame: its header, its change records, its marker
/// records (v2), and the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFrame {
    /// The frame header.
    pub header: FrameHeader,
    /// The change records (Write, Zero, DiskSize) in seq order. Marker
    /// records (v2 Tag and Note) are not in it: see [`OpenedFrame::tag`],
    /// [`OpenedFrame::notes`] and [`OpenedFrame::all`].
    pub records: Vec<RecordHeader>,
    /// Marker records in seq order.
    markers: Vec<Marker>,
    /// The buffer the data lives in (the decrypted frame for a raw frame,
    /// the decompressed payload for a zstd frame, after a pad that puts the
    /// data area on a block boundary).
    buf: Vec<u8>,
    /// Where in `buf` the data area is.
    data: Range<usize>,
}

impl OpenedFrame {
    /// The data area: the data of the Write records and, in a v2 frame, the
    /// Tag names and Note texts, concatenated in record order.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.data.clone()]
    }

    /// The change records with their data (the bytes for a Write, empty for
    /// Zero and DiskSize); marker records are skipped.
    pub fn iter(&self) -> RecordIter<'_> {
        RecordIter {
            records: self.records.iter(),
            markers: &self.markers,
            data: self.data(),
            pos: 0,
        }
    }

    /// Every record, change and marker, in seq order.
    pub fn all(&self) -> AllRecords<'_> {
        AllRecords {
            frame: self,
            pos: 0,
            change: 0,
            marker: 0,
            at: 0,
        }
    }

    /// The frame's Tag, if it has one (always its last record): the end of
    /// this frame is then a named recovery point.
    pub fn tag(&self) -> Option<TagRecord<'_>> {
        match self.markers.last().map(|m| self.marker(m)) {
            Some(Record::Tag(t)) => Some(t),
            _ => None,
        }
    }

    /// The frame's Notes, in seq order.
    pub fn notes(&self) -> impl Iterator<Item = NoteRecord<'_>> + '_ {
        self.markers.iter().filter_map(|m| match self.marker(m) {
            Record::Note(n) => Some(n),
            _ => None,
        })
    }

    fn marker(&self, m: &Marker) -> Record<'_> {
        // Opening checked the text is in the data area and valid UTF-8.
        let text = self
            .data()
            .get(m.text.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default();
        match m.what {
            MarkerWhat::Tag { flags } => Record::Tag(TagRecord {
                seq: m.seq,
                time_us: m.time_us,
                flags,
                name: text,
            }),
            MarkerWhat::Note { disk, reason } => Record::Note(NoteRecord {
                seq: m.seq,
                time_us: m.time_us,
                disk,
                reason,
                text,
            }),
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

/// Iterator over an opened frame's change records and their data.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    records: std::slice::Iter<'a, RecordHeader>,
    markers: &'a [Marker],
    data: &'a [u8],
    /// Index among all records of the next one.
    pos: usize,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = (RecordHeader, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        // Skip the text of markers before the next change record.
        while let Some((m, rest)) = self.markers.split_first()
            && m.pos == self.pos
        {
            let n = m.text.len().min(self.data.len());
            self.data = &self.data[n..];
            self.markers = rest;
            self.pos += 1;
        }
        let r = *self.records.next()?;
        // Opening checked that the data lengths sum to data.len().
        let n = (r.data_len() as usize).min(self.data.len());
        let (d, rest) = self.data.split_at(n);
        self.data = rest;
        self.pos += 1;
        Some((r, d))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

impl ExactSizeIterator for RecordIter<'_> {}

/// Iterator over every record of an opened frame, change and marker, in seq
/// order ([`OpenedFrame::all`]).
#[derive(Debug, Clone)]
pub struct AllRecords<'a> {
    frame: &'a OpenedFrame,
    pos: usize,
    change: usize,
    marker: usize,
    /// Offset in the data area of the next record's data.
    at: usize,
}

impl<'a> Iterator for AllRecords<'a> {
    type Item = Record<'a>;
    fn next(&mut self) -> Option<Record<'a>> {
        let f = self.frame;
        if let Some(m) = f.markers.get(self.marker)
            && m.pos == self.pos
        {
            self.marker += 1;
            self.pos += 1;
            self.at = m.text.end;
            return Some(f.marker(m));
        }
        let r = *f.records.get(self.change)?;
        self.change += 1;
        self.pos += 1;
        let end = self.at + r.data_len() as usize;
        let d = f.data().get(self.at..end).unwrap_or_default();
        self.at = end;
        Some(Record::Change(r, d))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.frame.records.len() + self.frame.markers.len() - self.pos;
        (n, Some(n))
    }
}

impl ExactSizeIterator for AllRecords<'_> {}

/// Decompress `src`, which must be exactly one zstd frame recording a content
/// size of `plain` bytes, into `out` from index `pad` on (`out` is empty with
/// room for `pad + plain` bytes; the pad is zeroed first). With the content size
/// checked first and the room there, zstd decodes the frame in one pass
/// straight into `out`, in one call.
fn decompress_one_frame(
    dctx: &mut zstd::zstd_safe::DCtx<'static>,
    src: &[u8],
    out: &mut Vec<u8>,
    pad: usize,
    plain: usize,
) -> Result<(), String> {
    use zstd::zstd_safe::{InBuffer, OutBuffer, ResetDirective, get_error_name};
    match zstd::zstd_safe::get_frame_content_size(src) {
        Ok(Some(n)) if n == plain as u64 => {}
        Ok(Some(n)) => return Err(format!("the zstd frame records {n} bytes")),
        Ok(None) => return Err("the zstd frame records no content size".into()),
        Err(e) => return Err(format!("no zstd frame header: {e}")),
    }
    match zstd::zstd_safe::find_frame_compressed_size(src) {
        Ok(n) if n == src.len() => {}
        Ok(n) => {
            return Err(format!(
                "{} bytes follow the zstd frame",
                src.len().saturating_sub(n)
            ));
        }
        Err(code) => return Err(get_error_name(code).to_string()),
    }
    if out.capacity() < pad.saturating_add(plain) || !out.is_empty() {
        return Err("no room for the payload".into());
    }
    out.resize(pad, 0);
    dctx.reset(ResetDirective::SessionOnly)
        .map_err(|code| get_error_name(code).to_string())?;
    let mut output = OutBuffer::around_pos(out, pad);
    let mut input = InBuffer::around(src);
    let left = dctx
        .decompress_stream(&mut output, &mut input)
        .map_err(|code| get_error_name(code).to_string())?;
    let got = output.pos() - pad;
    if left != 0 || input.pos() != src.len() || got != plain {
        return Err(format!("got {got} bytes"));
    }
    Ok(())
}

/// Opens frames of one group: checks the header, the group, the key epoch and the
/// tag, then decompresses and checks the records. Reuses a zstd context and a
/// ciphertext buffer across calls.
pub struct Opener {
    group: GroupName,
    keys: Vec<(u32, LessSafeKey)>,
    zstd: zstd::zstd_safe::DCtx<'static>,
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
            zstd: zstd::zstd_safe::DCtx::try_create().ok_or_else(|| {
                FrameError::Zstd(std::io::Error::other(
                    "zstd cannot create a decompression context",
                ))
            })?,
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
        let hdr_len = h.record_count as usize * RECORD_HEADER_LEN;
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
                // The data area (after the record headers) is placed on a
                // block boundary of the buffer, so a replica written with
                // O_DIRECT takes block-aligned writes without a copy.
                let mut out = Vec::with_capacity(plain + BLOCK);
                let misalign = (out.as_ptr() as usize).wrapping_add(hdr_len) % BLOCK;
                let pad = (BLOCK - misalign) % BLOCK;
                decompress_one_frame(
                    &mut self.zstd,
                    &bytes[HEADER_LEN..HEADER_LEN + stored],
                    &mut out,
                    pad,
                    plain,
                )
                .map_err(decompress)?;
                (out, pad)
            }
        };
        let payload = &buf[start..start + plain];
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
        let mut all = Vec::with_capacity(h.record_count as usize);
        let (chunks, _) = payload[..hdr_len].as_chunks::<RECORD_HEADER_LEN>();
        for (i, chunk) in chunks.iter().enumerate() {
            all.push(WireRecord::decode(i, chunk).map_err(invalid)?);
        }
        let bounds = RecordBounds {
            prev_last_seq: h.prev_last_seq,
            first_seq: h.first_seq,
            last_seq: h.last_seq,
            time_first_us: h.time_first_us,
            time_last_us: h.time_last_us,
            data_len: u64::from(h.data_len()),
            version: h.version,
            frame_kind: h.kind,
        };
        check_records(all.iter().copied(), &bounds).map_err(invalid)?;
        let data_area = &payload[hdr_len..];
        let mut records = Vec::with_capacity(all.len());
        let mut markers = Vec::new();
        let mut at = 0usize;
        for (i, r) in all.iter().enumerate() {
            let text = at..at + r.data_len() as usize;
            at = text.end;
            let what = match r.kind {
                WireKind::Tag => MarkerWhat::Tag { flags: r.offset },
                WireKind::Note => MarkerWhat::Note {
                    disk: r.disk,
                    // check_records refused unknown codes.
                    reason: NoteReason::from_u64(r.offset).ok_or_else(|| {
                        invalid(RecordIssue {
                            index: i,
                            field: "offset",
                            detail: format!("unknown note reason code {}", r.offset),
                        })
                    })?,
                },
                _ => {
                    records.extend(r.as_change());
                    continue;
                }
            };
            let bytes = data_area.get(text.clone()).ok_or_else(mismatch)?;
            check_marker_data(i, r, bytes).map_err(invalid)?;
            markers.push(Marker {
                pos: i,
                seq: r.seq,
                time_us: r.time_us,
                what,
                text,
            });
        }
        Ok(OpenedFrame {
            header: h,
            records,
            markers,
            data: start + hdr_len..start + plain,
            buf,
        })
    }
}
