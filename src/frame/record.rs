//! Records: the 32-byte record headers at the start of a frame's payload, and
//! the rules a frame's record set must satisfy.
//!
//! Two families share the header layout. *Change* records ([`RecordKind`]:
//! Write, Zero, DiskSize, since v1) change a disk; *marker* records (Tag and
//! Note, since v2) say something about the stream and change no disk. On the
//! wire both are a [`WireRecord`] whose [`WireKind`] is the `kind` byte.

use bytemuck::{Pod, Zeroable};

use super::marker::{self, NOTE_TEXT_MAX, NoteReason, TAG_FLAGS_KNOWN, TAG_NAME_MAX};
use super::{FormatVersion, FrameKind, RECORD_HEADER_LEN};

/// What a change record does to its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// `len` bytes of data at `offset`; the data follows in the payload.
    Write = 1,
    /// The range `offset..offset+len` reads as zeros (discard / write-zeroes).
    Zero = 2,
    /// Announces the disk's size in bytes, carried in `offset`; `len` is 0.
    DiskSize = 3,
}

impl RecordKind {
    /// The kind for a wire value, if it is a change record kind.
    pub fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::DiskSize),
            _ => None,
        }
    }
}

/// Every record kind a frame may carry: the `kind` byte of a record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WireKind {
    /// Change record: data at an offset (v1).
    Write = 1,
    /// Change record: a range reads as zeros (v1).
    Zero = 2,
    /// Change record: the disk's size (v1).
    DiskSize = 3,
    /// Marker (v2): the end of this W frame is a named recovery point.
    /// `offset` = tag flags, `len` = name length, `disk` = 0, data = the name.
    Tag = 4,
    /// Marker (v2): why the M data that follows is not consistent.
    /// `offset` = reason code, `len` = text length, `disk` = the disk concerned,
    /// data = the text.
    Note = 5,
}

impl WireKind {
    /// The kind for a wire value, if known to this build.
    pub fn from_u8(v: u8) -> Option<WireKind> {
        match v {
            1 => Some(WireKind::Write),
            2 => Some(WireKind::Zero),
            3 => Some(WireKind::DiskSize),
            4 => Some(WireKind::Tag),
            5 => Some(WireKind::Note),
            _ => None,
        }
    }

    /// The first frame format version that has this kind.
    pub fn min_version(self) -> FormatVersion {
        match self {
            WireKind::Write | WireKind::Zero | WireKind::DiskSize => FormatVersion::V1,
            WireKind::Tag | WireKind::Note => FormatVersion::V2,
        }
    }

    /// The change kind, for Write, Zero and DiskSize.
    pub fn change(self) -> Option<RecordKind> {
        RecordKind::from_u8(self as u8)
    }

    /// True for the kinds whose `len` bytes follow in the data area.
    pub fn carries_data(self) -> bool {
        matches!(self, WireKind::Write | WireKind::Tag | WireKind::Note)
    }
}

impl From<RecordKind> for WireKind {
    fn from(k: RecordKind) -> WireKind {
        match k {
            RecordKind::Write => WireKind::Write,
            RecordKind::Zero => WireKind::Zero,
            RecordKind::DiskSize => WireKind::DiskSize,
        }
    }
}

/// One change record's header (Write, Zero or DiskSize).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordHeader {
    /// The write's sequence number in its group.
    pub seq: u64,
    /// Byte offset on the disk (for `DiskSize`: the disk's size).
    pub offset: u64,
    /// Capture time, µs since the Unix epoch.
    pub time_us: u64,
    /// Write: data bytes (> 0). Zero: range length (> 0). DiskSize: 0.
    pub len: u32,
    /// Disk id within the group.
    pub disk: u16,
    /// What the record does.
    pub kind: RecordKind,
}

/// A record header of any kind, decoded from (or to be encoded to) its 32
/// wire bytes. The meaning of `offset`, `len` and `disk` depends on `kind`
/// (see [`WireKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireRecord {
    /// Sequence number in the group.
    pub seq: u64,
    /// Disk offset; DiskSize: the size; Tag: the flags; Note: the reason code.
    pub offset: u64,
    /// Capture time, µs since the Unix epoch.
    pub time_us: u64,
    /// Write: data bytes; Zero: range length; DiskSize: 0; Tag: name bytes;
    /// Note: text bytes.
    pub len: u32,
    /// Disk id (Tag: 0).
    pub disk: u16,
    /// The kind byte.
    pub kind: WireKind,
}

/// A record header exactly as on the wire (integers hold little-endian values).
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct RawRecordHeader {
    /// Sequence number.
    pub seq: u64,
    /// Disk offset, disk size, tag flags or note reason code.
    pub offset: u64,
    /// Capture time.
    pub time_us: u64,
    /// Length.
    pub len: u32,
    /// Disk id.
    pub disk: u16,
    /// Record kind.
    pub kind: u8,
    /// Zero.
    pub reserved: u8,
}

const _: () = assert!(std::mem::size_of::<RawRecordHeader>() == RECORD_HEADER_LEN);

/// A rule broken by one record (turned into a frame error by the caller, which
/// knows the group and frame number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordIssue {
    pub index: usize,
    pub field: &'static str,
    pub detail: String,
}

fn issue(index: usize, field: &'static str, detail: impl Into<String>) -> RecordIssue {
    RecordIssue {
        index,
        field,
        detail: detail.into(),
    }
}

impl WireRecord {
    /// The first frame format version that can carry this record: its kind's,
    /// or a Note reason code's when that is newer.
    pub fn min_version(&self) -> FormatVersion {
        let kind = self.kind.min_version();
        match self.kind {
            WireKind::Note => {
                NoteReason::from_u64(self.offset).map_or(kind, |r| r.min_version().max(kind))
            }
            _ => kind,
        }
    }

    /// The 32 wire bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        bytemuck::cast(RawRecordHeader {
            seq: self.seq.to_le(),
            offset: self.offset.to_le(),
            time_us: self.time_us.to_le(),
            len: self.len.to_le(),
            disk: self.disk.to_le(),
            kind: self.kind as u8,
            reserved: 0,
        })
    }

    /// Decode 32 wire bytes, rejecting unknown kinds and a non-zero reserved
    /// byte. Rules between records, and which kinds a frame's version and kind
    /// allow, are checked by [`check_records`].
    pub(crate) fn decode(
        index: usize,
        bytes: &[u8; RECORD_HEADER_LEN],
    ) -> Result<WireRecord, RecordIssue> {
        let raw: RawRecordHeader = bytemuck::pod_read_unaligned(bytes);
        let kind = WireKind::from_u8(raw.kind)
            .ok_or_else(|| issue(index, "kind", format!("unknown record kind {}", raw.kind)))?;
        if raw.reserved != 0 {
            return Err(issue(
                index,
                "reserved",
                format!("{} must be zero", raw.reserved),
            ));
        }
        Ok(WireRecord {
            seq: u64::from_le(raw.seq),
            offset: u64::from_le(raw.offset),
            time_us: u64::from_le(raw.time_us),
            len: u32::from_le(raw.len),
            disk: u16::from_le(raw.disk),
            kind,
        })
    }

    /// Bytes of data this record carries in the payload (`len` for Write, Tag
    /// and Note, else 0).
    pub fn data_len(&self) -> u32 {
        if self.kind.carries_data() {
            self.len
        } else {
            0
        }
    }

    /// The change record, for Write, Zero and DiskSize.
    pub fn as_change(&self) -> Option<RecordHeader> {
        Some(RecordHeader {
            seq: self.seq,
            offset: self.offset,
            time_us: self.time_us,
            len: self.len,
            disk: self.disk,
            kind: self.kind.change()?,
        })
    }
}

impl From<RecordHeader> for WireRecord {
    fn from(r: RecordHeader) -> WireRecord {
        WireRecord {
            seq: r.seq,
            offset: r.offset,
            time_us: r.time_us,
            len: r.len,
            disk: r.disk,
            kind: r.kind.into(),
        }
    }
}

impl RecordHeader {
    /// The 32 wire bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        WireRecord::from(*self).encode()
    }

    /// Bytes of data this record carries in the payload (`len` for Write, else 0).
    pub fn data_len(&self) -> u32 {
        match self.kind {
            RecordKind::Write => self.len,
            RecordKind::Zero | RecordKind::DiskSize => 0,
        }
    }
}

/// A record to seal: its header and the bytes it carries in the data area
/// (`data.len() == len` for Write, Tag and Note; empty for other kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The record header.
    pub header: WireRecord,
    /// The written bytes (Write), the tag name (Tag) or the note text (Note).
    pub data: &'a [u8],
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl<'a> RecordRef<'a> {
    fn change(header: RecordHeader, data: &'a [u8]) -> Self {
        RecordRef {
            header: header.into(),
            data,
        }
    }

    /// A Write record of `data` at `offset` (`len` is taken from `data`, saturating;
    /// the sealer refuses data longer than a frame can carry).
    pub fn write(seq: u64, disk: u16, offset: u64, time_us: u64, data: &'a [u8]) -> Self {
        Self::change(
            RecordHeader {
                seq,
                offset,
                time_us,
                len: len32(data.len()),
                disk,
                kind: RecordKind::Write,
            },
            data,
        )
    }

    /// A Zero record: `offset..offset+len` reads as zeros.
    pub fn zero(seq: u64, disk: u16, offset: u64, len: u32, time_us: u64) -> Self {
        Self::change(
            RecordHeader {
                seq,
                offset,
                time_us,
                len,
                disk,
                kind: RecordKind::Zero,
            },
            &[],
        )
    }

    /// A DiskSize record announcing that `disk` is `size` bytes.
    pub fn disk_size(seq: u64, disk: u16, size: u64, time_us: u64) -> Self {
        Self::change(
            RecordHeader {
                seq,
                offset: size,
                time_us,
                len: 0,
                disk,
                kind: RecordKind::DiskSize,
            },
            &[],
        )
    }

    /// A Tag record (v2) named `name` with `flags` (see
    /// [`TAG_APP_CONSISTENT`](super::TAG_APP_CONSISTENT)). It must be the last
    /// record of a W frame; the sealer checks the name and flags.
    pub fn tag(seq: u64, time_us: u64, flags: u64, name: &'a str) -> Self {
        RecordRef {
            header: WireRecord {
                seq,
                offset: flags,
                time_us,
                len: len32(name.len()),
                disk: 0,
                kind: WireKind::Tag,
            },
            data: name.as_bytes(),
        }
    }

    /// A Note record (v2) about `disk`: `reason` and a text of at most
    /// [`NOTE_TEXT_MAX`] bytes. Allowed in M frames only.
    pub fn note(seq: u64, disk: u16, time_us: u64, reason: NoteReason, text: &'a str) -> Self {
        RecordRef {
            header: WireRecord {
                seq,
                offset: reason as u64,
                time_us,
                len: len32(text.len()),
                disk,
                kind: WireKind::Note,
            },
            data: text.as_bytes(),
        }
    }
}

/// The frame-level bounds a record set must fit (from the header, or, when sealing,
/// from the records themselves).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordBounds {
    pub prev_last_seq: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub time_first_us: u64,
    pub time_last_us: u64,
    /// Sum of the Write, Tag and Note lens the payload must hold.
    pub data_len: u64,
    /// The frame's format version (which record kinds it may carry).
    pub version: FormatVersion,
    /// W or M (Tags only in W frames, Notes only in M frames).
    pub frame_kind: FrameKind,
}

/// Check a frame's records against each other and the frame bounds: kinds the
/// frame's version and kind allow; seqs strictly increasing from `first_seq` to
/// `last_seq` (and above `prev_last_seq`); times non-decreasing within the
/// frame's time range; per-kind fields and lengths; a Tag only as the last
/// record of a W frame; no offset overflow; data-carrying lens summing to
/// `data_len`. The marker data itself (names, texts) is checked by
/// [`check_marker_data`].
pub(crate) fn check_records(
    records: impl ExactSizeIterator<Item = WireRecord>,
    b: &RecordBounds,
) -> Result<(), RecordIssue> {
    let count = records.len();
    let mut prev_seq = b.prev_last_seq;
    let mut prev_time = b.time_first_us;
    let mut sum: u64 = 0;
    for (i, r) in records.enumerate() {
        let need = r.kind.min_version();
        if need > b.version {
            return Err(issue(
                i,
                "kind",
                format!(
                    "record kind {} requires frame version {} (this frame is version {})",
                    r.kind as u8, need as u16, b.version as u16
                ),
            ));
        }
        let need = r.min_version();
        if need > b.version {
            return Err(issue(
                i,
                "offset",
                format!(
                    "note reason {} requires frame version {} (this frame is version {})",
                    r.offset, need as u16, b.version as u16
                ),
            ));
        }
        if r.seq <= prev_seq {
            let what = if i == 0 {
                "prev_last_seq"
            } else {
                "the previous record's seq"
            };
            return Err(issue(
                i,
                "seq",
                format!("{} is not above {what} {prev_seq}", r.seq),
            ));
        }
        if i == 0 && r.seq != b.first_seq {
            return Err(issue(
                i,
                "seq",
                format!("{} differs from first_seq {}", r.seq, b.first_seq),
            ));
        }
        if i + 1 == count && r.seq != b.last_seq {
            return Err(issue(
                i,
                "seq",
                format!("{} differs from last_seq {}", r.seq, b.last_seq),
            ));
        }
        prev_seq = r.seq;
        if r.time_us < prev_time {
            return Err(issue(
                i,
                "time_us",
                format!(
                    "{} is before {prev_time} (frame start or previous record)",
                    r.time_us
                ),
            ));
        }
        if r.time_us > b.time_last_us {
            return Err(issue(
                i,
                "time_us",
                format!("{} is after time_last_us {}", r.time_us, b.time_last_us),
            ));
        }
        prev_time = r.time_us;
        match r.kind {
            WireKind::Write | WireKind::Zero if r.len == 0 => {
                return Err(issue(
                    i,
                    "len",
                    format!("{:?} record with length 0", r.kind),
                ));
            }
            WireKind::DiskSize if r.len != 0 => {
                return Err(issue(
                    i,
                    "len",
                    format!("{} but a DiskSize record has length 0", r.len),
                ));
            }
            WireKind::Tag => check_tag(i, count, &r, b.frame_kind)?,
            WireKind::Note => check_note(i, &r, b.frame_kind)?,
            _ => {}
        }
        if r.kind.change().is_some() && r.offset.checked_add(u64::from(r.len)).is_none() {
            return Err(issue(
                i,
                "offset",
                format!("{} + len {} overflows 64 bits", r.offset, r.len),
            ));
        }
        sum += u64::from(r.data_len());
    }
    if sum != b.data_len {
        return Err(issue(
            count.saturating_sub(1),
            "len",
            format!(
                "Write, Tag and Note lengths sum to {sum}, the payload holds {} data bytes",
                b.data_len
            ),
        ));
    }
    Ok(())
}

fn check_tag(i: usize, count: usize, r: &WireRecord, kind: FrameKind) -> Result<(), RecordIssue> {
    if kind != FrameKind::Write {
        return Err(issue(
            i,
            "kind",
            "a Tag record is allowed only in a W frame (this frame is M)",
        ));
    }
    if i + 1 != count {
        return Err(issue(
            i,
            "kind",
            format!(
                "a Tag record must be the last record of its frame ({} records follow it)",
                count - i - 1
            ),
        ));
    }
    if r.offset & !TAG_FLAGS_KNOWN != 0 {
        return Err(issue(
            i,
            "offset",
            format!(
                "tag flags {:#x}: only bit 0 (application-consistent) is defined",
                r.offset
            ),
        ));
    }
    if r.len == 0 || r.len as usize > TAG_NAME_MAX {
        return Err(issue(
            i,
            "len",
            format!("tag name of {} bytes, must be 1..={TAG_NAME_MAX}", r.len),
        ));
    }
    if r.disk != 0 {
        return Err(issue(
            i,
            "disk",
            format!("{} but a Tag record has disk 0", r.disk),
        ));
    }
    Ok(())
}

fn check_note(i: usize, r: &WireRecord, kind: FrameKind) -> Result<(), RecordIssue> {
    if kind != FrameKind::Merge {
        return Err(issue(
            i,
            "kind",
            "a Note record is allowed only in an M frame (this frame is W)",
        ));
    }
    if NoteReason::from_u64(r.offset).is_none() {
        return Err(issue(
            i,
            "offset",
            format!("unknown note reason code {}", r.offset),
        ));
    }
    if r.len as usize > NOTE_TEXT_MAX {
        return Err(issue(
            i,
            "len",
            format!("note text of {} bytes, at most {NOTE_TEXT_MAX}", r.len),
        ));
    }
    Ok(())
}

/// Check the data a marker record carries: a Tag's name (the tag naming
/// rules), a Note's text (UTF-8). Other kinds have nothing to check.
pub(crate) fn check_marker_data(
    index: usize,
    r: &WireRecord,
    data: &[u8],
) -> Result<(), RecordIssue> {
    match r.kind {
        WireKind::Tag => {
            let name = std::str::from_utf8(data)
                .map_err(|e| issue(index, "data", format!("tag name is not UTF-8: {e}")))?;
            marker::check_tag_name(name)
                .map_err(|d| issue(index, "data", format!("tag name {name:?}: {d}")))
        }
        WireKind::Note => std::str::from_utf8(data)
            .map(|_| ())
            .map_err(|e| issue(index, "data", format!("note text is not UTF-8: {e}"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, t: u64, len: u32) -> WireRecord {
        WireRecord {
            seq,
            offset: 4096,
            time_us: t,
            len,
            disk: 1,
            kind: WireKind::Write,
        }
    }

    fn bounds(recs: &[WireRecord]) -> RecordBounds {
        RecordBounds {
            prev_last_seq: 10,
            first_seq: recs[0].seq,
            last_seq: recs[recs.len() - 1].seq,
            time_first_us: 100,
            time_last_us: 200,
            data_len: recs.iter().map(|r| u64::from(r.data_len())).sum(),
            version: FormatVersion::V2,
            frame_kind: FrameKind::Write,
        }
    }

    #[test]
    fn golden_record_bytes() {
        let r = RecordHeader {
            seq: 0x0102,
            offset: 0x1000,
            time_us: 7,
            len: 512,
            disk: 3,
            kind: RecordKind::Zero,
        };
        let hex: String = r.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0201000000000000001000000000000007000000000000000002000003000200"
        );
        let wire = WireRecord::decode(0, &r.encode()).unwrap();
        assert_eq!(wire.as_change(), Some(r));
        let tag = RecordRef::tag(9, 7, 1, "ab").header;
        let hex: String = tag.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0900000000000000010000000000000007000000000000000200000000000400"
        );
        assert_eq!(WireRecord::decode(0, &tag.encode()).unwrap(), tag);
        assert_eq!(tag.as_change(), None);
    }

    #[test]
    fn decode_rejects_unknown_kind_and_reserved() {
        let mut b = w(11, 100, 1).encode();
        for k in [0u8, 6, 255] {
            b[30] = k;
            assert_eq!(WireRecord::decode(5, &b).unwrap_err().field, "kind");
        }
        b[30] = 1;
        b[31] = 1;
        let e = WireRecord::decode(5, &b).unwrap_err();
        assert_eq!((e.index, e.field), (5, "reserved"));
    }

    #[test]
    fn record_rules() {
        let good = vec![w(11, 100, 8), w(13, 150, 8), w(14, 150, 4)];
        check_records(good.iter().copied(), &bounds(&good)).unwrap();

        type Edit = fn(&mut Vec<WireRecord>, &mut RecordBounds);
        let cases: &[(&str, usize, Edit)] = &[
            ("seq", 0, |r, b| {
                r[0].seq = 10;
                b.first_seq = 10
            }),
            ("seq", 1, |r, _| r[1].seq = 11),
            ("seq", 0, |_, b| b.first_seq = 12),
            ("seq", 2, |_, b| b.last_seq = 15),
            ("time_us", 0, |r, _| r[0].time_us = 99),
            ("time_us", 2, |r, _| r[2].time_us = 149),
            ("time_us", 2, |r, _| r[2].time_us = 201),
            ("len", 1, |r, b| {
                r[1].len = 0;
                b.data_len -= 8
            }),
            ("len", 1, |r, b| {
                r[1].kind = WireKind::Zero;
                r[1].len = 0;
                b.data_len -= 8
            }),
            ("len", 1, |r, b| {
                r[1].kind = WireKind::DiskSize;
                b.data_len -= 8
            }),
            ("offset", 1, |r, _| r[1].offset = u64::MAX - 7),
            ("len", 2, |_, b| b.data_len += 1),
        ];
        for (field, index, edit) in cases {
            let mut r = good.clone();
            let mut b = bounds(&good);
            edit(&mut r, &mut b);
            let e = check_records(r.iter().copied(), &b).unwrap_err();
            assert_eq!((e.field, e.index), (*field, *index), "{}", e.detail);
        }
        // Zero and DiskSize records carry no data.
        let mixed = vec![
            w(11, 100, 8),
            WireRecord {
                kind: WireKind::Zero,
                len: 1 << 20,
                ..w(12, 100, 0)
            },
            WireRecord {
                kind: WireKind::DiskSize,
                len: 0,
                offset: u64::MAX,
                ..w(13, 100, 0)
            },
        ];
        let b = bounds(&mixed);
        assert_eq!(b.data_len, 8);
        check_records(mixed.iter().copied(), &b).unwrap();
    }

    #[test]
    fn marker_rules() {
        let tag = |seq| RecordRef::tag(seq, 150, 1, "t1").header;
        let note = |seq| RecordRef::note(seq, 2, 150, NoteReason::BitmapCatchUp, "").header;
        let mut b = bounds(&[w(11, 100, 8), tag(12)]);
        check_records([w(11, 100, 8), tag(12)].into_iter(), &b).unwrap();
        b.version = FormatVersion::V1;
        let e = check_records([w(11, 100, 8), tag(12)].into_iter(), &b).unwrap_err();
        assert_eq!((e.field, e.index), ("kind", 1));
        assert!(e.detail.contains("record kind 4 requires frame version 2"));

        let mut m = bounds(&[note(11), w(12, 150, 8)]);
        m.frame_kind = FrameKind::Merge;
        check_records([note(11), w(12, 150, 8)].into_iter(), &m).unwrap();
        let e = check_records([w(11, 150, 8), tag(12)].into_iter(), &m).unwrap_err();
        assert_eq!((e.field, e.index), ("kind", 1));
        let e = check_records(
            [note(11), w(12, 150, 8)].into_iter(),
            &bounds(&[w(11, 1, 8)]),
        )
        .unwrap_err();
        assert_eq!((e.field, e.index), ("kind", 0));
        // Tag not last.
        let recs = [tag(11), w(12, 150, 8)];
        let e = check_records(recs.into_iter(), &bounds(&recs)).unwrap_err();
        assert!(e.detail.contains("last record"), "{}", e.detail);
        // Marker data.
        check_marker_data(0, &tag(1), b"t1").unwrap();
        assert_eq!(check_marker_data(3, &tag(1), b"-x").unwrap_err().index, 3);
        assert!(check_marker_data(0, &tag(1), &[0xff]).is_err());
        assert!(check_marker_data(0, &note(1), &[0xff]).is_err());
        check_marker_data(0, &note(1), "ok ✓".as_bytes()).unwrap();
        check_marker_data(0, &w(1, 1, 1), &[0xff]).unwrap();
    }
}
