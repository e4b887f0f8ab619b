//! Marker records (frame format v2): Tag and Note. They change no disk; they
//! tell the target where an application-consistent point is (Tag) and why a
//! run of M data is not consistent (Note). This module holds their rules and
//! the typed views the target reads from an opened frame.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{FormatVersion, RecordHeader};

/// Longest tag name, bytes.
pub const TAG_NAME_MAX: usize = 128;
/// Longest note text, bytes.
pub const NOTE_TEXT_MAX: usize = 512;
/// Tag flag bit 0: application-consistent (file systems were frozen, or the
/// pre-hook ran and succeeded, when the tag was recorded).
pub const TAG_APP_CONSISTENT: u64 = 1;
/// Every tag flag bit this version defines.
pub const TAG_FLAGS_KNOWN: u64 = TAG_APP_CONSISTENT;

/// Check a tag name: 1 to [`TAG_NAME_MAX`] bytes of `[A-Za-z0-9._:@+-]`, not
/// starting with `-` (so it never reads as a command-line option). Returns
/// what is wrong.
pub fn check_tag_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > TAG_NAME_MAX {
        return Err("longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"._:@+-".contains(&c))
    {
        return Err("only A-Z, a-z, 0-9 and . _ : @ + - are allowed");
    }
    if name.starts_with('-') {
        return Err("must not start with '-'");
    }
    Ok(())
}

/// Why a Note was put into the stream: the reason code in its `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u64)]
pub enum NoteReason {
    /// 1: the initial copy of a disk (its first start).
    InitialCopy = 1,
    /// 2: resync of what the dirty log cannot vouch for after an unclean stop
    /// (or an unusable dirty log, or regions left dirty at an orderly stop).
    UncleanStop = 2,
    /// 3: catch-up after capture degraded to the dirty bitmap (budgets full,
    /// relay unreachable too long, a spill record unreadable).
    BitmapCatchUp = 3,
    /// 4: a write to the backing disk failed; its range is copied again.
    BackingWriteFailure = 4,
    /// 5: an operator asked for a resync.
    OperatorResync = 5,
    /// 6 (version 3): the relay lost frames it had acknowledged, so the chain
    /// has a gap redelivery cannot close; every disk is compared again.
    ChainGap = 6,
    /// 7 (version 4): the disk grew while the agent was stopped; the replica
    /// is grown first, the new space and what the old dirty log held are
    /// compared.
    DiskGrown = 7,
}

impl NoteReason {
    /// The reason for a wire code, if known.
    pub fn from_u64(v: u64) -> Option<NoteReason> {
        match v {
            1 => Some(NoteReason::InitialCopy),
            2 => Some(NoteReason::UncleanStop),
            3 => Some(NoteReason::BitmapCatchUp),
            4 => Some(NoteReason::BackingWriteFailure),
            5 => Some(NoteReason::OperatorResync),
            6 => Some(NoteReason::ChainGap),
            7 => Some(NoteReason::DiskGrown),
            _ => None,
        }
    }

    /// A short name, as in logs and the status.
    pub fn as_str(self) -> &'static str {
        match self {
            NoteReason::InitialCopy => "initial-copy",
            NoteReason::UncleanStop => "unclean-stop",
            NoteReason::BitmapCatchUp => "bitmap-catch-up",
            NoteReason::BackingWriteFailure => "backing-write-failure",
            NoteReason::OperatorResync => "operator-resync",
            NoteReason::ChainGap => "chain-gap",
            NoteReason::DiskGrown => "disk-grown",
        }
    }

    /// The first frame format version that has this reason code.
    pub fn min_version(self) -> FormatVersion {
        match self {
            NoteReason::ChainGap => FormatVersion::V3,
            NoteReason::DiskGrown => FormatVersion::V4,
            _ => FormatVersion::V2,
        }
    }
}

impl fmt::Display for NoteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Tag record of an opened frame: the end of its (W) frame is a recovery
/// point with this name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRecord<'a> {
    /// The tag's seq (the frame's `last_seq`).
    pub seq: u64,
    /// When the tag was recorded, µs since the Unix epoch.
    pub time_us: u64,
    /// Flag bits ([`TAG_APP_CONSISTENT`]).
    pub flags: u64,
    /// The name (checked against [`check_tag_name`]).
    pub name: &'a str,
}

impl TagRecord<'_> {
    /// True when the tag is application-consistent (flag bit 0).
    pub fn app_consistent(&self) -> bool {
        self.flags & TAG_APP_CONSISTENT != 0
    }
}

/// A Note record of an opened frame: why the M data from here on is not
/// consistent, for one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoteRecord<'a> {
    /// The note's seq.
    pub seq: u64,
    /// When the note was recorded, µs since the Unix epoch.
    pub time_us: u64,
    /// The disk the reason concerns.
    pub disk: u16,
    /// The reason code.
    pub reason: NoteReason,
    /// Free text (UTF-8, at most [`NOTE_TEXT_MAX`] bytes), e.g. the capture
    /// mode transition's reason.
    pub text: &'a str,
}

/// One record of an opened frame, any kind, as [`OpenedFrame::all`](super::OpenedFrame::all)
/// yields them in seq order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A change record and its data (Write: the bytes; Zero, DiskSize: empty).
    Change(RecordHeader, &'a [u8]),
    /// A Tag (v2).
    Tag(TagRecord<'a>),
    /// A Note (v2).
    Note(NoteRecord<'a>),
}

impl Record<'_> {
    /// The record's seq.
    pub fn seq(&self) -> u64 {
        match self {
            Record::Change(h, _) => h.seq,
            Record::Tag(t) => t.seq,
            Record::Note(n) => n.seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_names() {
        for ok in [
            "a",
            "pre-upgrade",
            "db@2024-01-01T10:00:00",
            "v1.2+build_7",
            "A:b",
            &"x".repeat(128),
        ] {
            check_tag_name(ok).unwrap();
        }
        for bad in [
            "",
            "-x",
            "a b",
            "a/b",
            "é",
            "a\n",
            "tag;rm",
            &"x".repeat(129),
        ] {
            assert!(check_tag_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn note_reasons_round_trip() {
        for v in 1..=7u64 {
            let r = NoteReason::from_u64(v).unwrap();
            assert_eq!(r as u64, v);
            assert!(!r.to_string().is_empty());
            let need = match v {
                6 => FormatVersion::V3,
                7 => FormatVersion::V4,
                _ => FormatVersion::V2,
            };
            assert_eq!(r.min_version(), need);
        }
        for v in [0u64, 8, u64::MAX] {
            assert!(NoteReason::from_u64(v).is_none());
        }
    }
}
