//! Change records: the 32-byte record headers at the start of a frame's payload,
//! and the rules a frame's record set must satisfy.

use bytemuck::{Pod, Zeroable};

use super::RECORD_HEADER_LEN;

/// What a record does to its disk.
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
    /// The kind for a wire value, if known.
    pub fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::DiskSize),
            _ => None,
        }
    }
}

/// One change record's header.
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

/// A record header exactly as on the wire (integers hold little-endian values).
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct RawRecordHeader {
    /// Sequence number.
    pub seq: u64,
    /// Disk offset, or disk size for DiskSize.
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

impl RecordHeader {
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

    /// Decode 32 wire bytes, rejecting unknown kinds and a non-zero reserved byte.
    /// Rules between records are checked by the frame opener.
    pub(crate) fn decode(
        index: usize,
        bytes: &[u8; RECORD_HEADER_LEN],
    ) -> Result<RecordHeader, RecordIssue> {
        let raw: RawRecordHeader = bytemuck::pod_read_unaligned(bytes);
        let kind = RecordKind::from_u8(raw.kind)
            .ok_or_else(|| issue(index, "kind", format!("unknown record kind {}", raw.kind)))?;
        if raw.reserved != 0 {
            return Err(issue(
                index,
                "reserved",
                format!("{} must be zero", raw.reserved),
            ));
        }
        Ok(RecordHeader {
            seq: u64::from_le(raw.seq),
            offset: u64::from_le(raw.offset),
            time_us: u64::from_le(raw.time_us),
            len: u32::from_le(raw.len),
            disk: u16::from_le(raw.disk),
            kind,
        })
    }

    /// Bytes of data this record carries in the payload (`len` for Write, else 0).
    pub fn data_len(&self) -> u32 {
        match self.kind {
            RecordKind::Write => self.len,
            RecordKind::Zero | RecordKind::DiskSize => 0,
        }
    }
}

/// A record to seal: its header and, for `Write`, its data (`data.len() == len`;
/// empty for other kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The record header.
    pub header: RecordHeader,
    /// The written bytes (Write only).
    pub data: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// A Write record of `data` at `offset` (`len` is taken from `data`, saturating;
    /// the sealer refuses data longer than a frame can carry).
    pub fn write(seq: u64, disk: u16, offset: u64, time_us: u64, data: &'a [u8]) -> Self {
        RecordRef {
            header: RecordHeader {
                seq,
                offset,
                time_us,
                len: u32::try_from(data.len()).unwrap_or(u32::MAX),
                disk,
                kind: RecordKind::Write,
            },
            data,
        }
    }

    /// A Zero record: `offset..offset+len` reads as zeros.
    pub fn zero(seq: u64, disk: u16, offset: u64, len: u32, time_us: u64) -> Self {
        RecordRef {
            header: RecordHeader {
                seq,
                offset,
                time_us,
                len,
                disk,
                kind: RecordKind::Zero,
            },
            data: &[],
        }
    }

    /// A DiskSize record announcing that `disk` is `size` bytes.
    pub fn disk_size(seq: u64, disk: u16, size: u64, time_us: u64) -> Self {
        RecordRef {
            header: RecordHeader {
                seq,
                offset: size,
                time_us,
                len: 0,
                disk,
                kind: RecordKind::DiskSize,
            },
            data: &[],
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
    /// Sum of Write lens the payload must hold.
    pub data_len: u64,
}

/// Check a frame's records against each other and the frame bounds: seqs strictly
/// increasing from `first_seq` to `last_seq` (and above `prev_last_seq`); times
/// non-decreasing within the frame's time range; per-kind lengths; no offset
/// overflow; Write lens summing to `data_len`.
pub(crate) fn check_records(
    records: impl ExactSizeIterator<Item = RecordHeader>,
    b: &RecordBounds,
) -> Result<(), RecordIssue> {
    let count = records.len();
    let mut prev_seq = b.prev_last_seq;
    let mut prev_time = b.time_first_us;
    let mut sum: u64 = 0;
    for (i, r) in records.enumerate() {
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
            RecordKind::Write | RecordKind::Zero if r.len == 0 => {
                return Err(issue(
                    i,
                    "len",
                    format!("{:?} record with length 0", r.kind),
                ));
            }
            RecordKind::DiskSize if r.len != 0 => {
                return Err(issue(
                    i,
                    "len",
                    format!("{} but a DiskSize record has length 0", r.len),
                ));
            }
            _ => {}
        }
        if r.offset.checked_add(u64::from(r.len)).is_none() {
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
                "Write lengths sum to {sum}, the payload holds {} data bytes",
                b.data_len
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, t: u64, len: u32) -> RecordHeader {
        RecordHeader {
            seq,
            offset: 4096,
            time_us: t,
            len,
            disk: 1,
            kind: RecordKind::Write,
        }
    }

    fn bounds(recs: &[RecordHeader]) -> RecordBounds {
        RecordBounds {
            prev_last_seq: 10,
            first_seq: recs[0].seq,
            last_seq: recs[recs.len() - 1].seq,
            time_first_us: 100,
            time_last_us: 200,
            data_len: recs.iter().map(|r| u64::from(r.data_len())).sum(),
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
        assert_eq!(RecordHeader::decode(0, &r.encode()).unwrap(), r);
    }

    #[test]
    fn decode_rejects_unknown_kind_and_reserved() {
        let mut b = w(11, 100, 1).encode();
        for k in [0u8, 4, 255] {
            b[30] = k;
            assert_eq!(RecordHeader::decode(5, &b).unwrap_err().field, "kind");
        }
        b[30] = 1;
        b[31] = 1;
        let e = RecordHeader::decode(5, &b).unwrap_err();
        assert_eq!((e.index, e.field), (5, "reserved"));
    }

    #[test]
    fn record_rules() {
        let good = vec![w(11, 100, 8), w(13, 150, 8), w(14, 150, 4)];
        check_records(good.iter().copied(), &bounds(&good)).unwrap();

        type Edit = fn(&mut Vec<RecordHeader>, &mut RecordBounds);
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
                r[1].kind = RecordKind::Zero;
                r[1].len = 0;
                b.data_len -= 8
            }),
            ("len", 1, |r, b| {
                r[1].kind = RecordKind::DiskSize;
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
            RecordHeader {
                kind: RecordKind::Zero,
                len: 1 << 20,
                ..w(12, 100, 0)
            },
            RecordHeader {
                kind: RecordKind::DiskSize,
                len: 0,
                offset: u64::MAX,
                ..w(13, 100, 0)
            },
        ];
        let b = bounds(&mixed);
        assert_eq!(b.data_len, 8);
        check_records(mixed.iter().copied(), &b).unwrap();
    }
}
