//! Marker entries of the capture journal: tags (a named point in a
//! write-ordered mode) and notes (why the M entries that follow are not
//! consistent). Both go into frames as the v2 Tag and Note records.

use std::sync::{Arc, MutexGuard};

use super::{CaptureError, CaptureJournal, Change, Held, Inner, Ordering, Slot};
use crate::frame::{NOTE_TEXT_MAX, NoteReason, TAG_APP_CONSISTENT, check_tag_name};
use crate::util::time::now_us;

/// `s` cut to at most `max` bytes at a character boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl CaptureJournal {
    /// Record a tag named `name` with `flags` (bit 0: application-consistent)
    /// and return its seq. The tag takes the group's next seq under the
    /// journal lock, so it lies exactly between the writes recorded before and
    /// after it; the batcher ends a frame right after it. Refused unless the
    /// group is in a write-ordered mode (data or spill): in bitmap or drain
    /// mode the replica at that seq would not equal the source. Never waits
    /// for budget.
    pub fn record_tag(&self, name: &str, flags: u64) -> Result<u64, CaptureError> {
        let invalid = |detail: String| CaptureError::InvalidTag {
            name: name.to_string(),
            detail,
        };
        check_tag_name(name).map_err(|d| invalid(d.to_string()))?;
        if flags & !TAG_APP_CONSISTENT != 0 {
            return Err(invalid(format!(
                "flags {flags:#x}: only bit 0 (application-consistent) is defined"
            )));
        }
        let mut g = self.lock();
        if g.closed {
            return Err(CaptureError::Closed);
        }
        if !g.mode.mode.write_ordered() {
            return Err(CaptureError::NotConsistent {
                group: self.cfg.group.clone(),
                mode: g.mode.mode.as_str(),
                since_us: g.mode.since_us,
                reason: g.mode.reason.clone(),
            });
        }
        let seq = g.assign_seq(&self.reserver)?;
        g.push(Slot {
            seq,
            disk: 0,
            offset: 0,
            time_us: now_us(),
            ordering: Ordering::W,
            held: Held::Change(Change::Tag {
                name: Arc::from(name),
                flags,
            }),
        });
        g.tags += 1;
        self.pushed(g);
        tracing::info!(
            group = %self.cfg.group,
            seq,
            tag = name,
            app_consistent = flags & TAG_APP_CONSISTENT != 0,
            "tag recorded"
        );
        Ok(seq)
    }

    /// Record a Note (M) for each disk whose pending regions start being
    /// copied now (`only`: just that disk), with the disk's cause and the
    /// transition's reason `why`. With no disk pending, one note for the first
    /// disk, so every entry into drain mode is explained in the stream.
    pub(super) fn push_notes(&self, g: &mut MutexGuard<'_, Inner>, why: &str, only: Option<u16>) {
        let mut notes: Vec<(u16, u64, bool, NoteReason, String)> = g
            .disks
            .iter()
            .filter(|d| only.is_none_or(|id| id == d.id) && !d.pending.is_empty())
            .map(|d| {
                let (reason, cause) = d
                    .cause
                    .clone()
                    .unwrap_or((NoteReason::BitmapCatchUp, String::new()));
                let text = if cause.is_empty() || why.contains(&cause) {
                    why.to_string()
                } else {
                    format!("{why} (cause: {cause})")
                };
                (d.id, d.size, d.growth.is_some(), reason, text)
            })
            .collect();
        if notes.is_empty()
            && only.is_none()
            && let Some(first) = g.disks.iter().map(|d| d.id).min()
        {
            notes.push((first, 0, false, NoteReason::BitmapCatchUp, why.to_string()));
        }
        for (disk, size, grown, reason, text) in notes {
            let seq = match g.assign_seq(&self.reserver) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(group = %self.cfg.group, disk, "note not recorded: {e}");
                    return;
                }
            };
            let text = truncate_utf8(&text, NOTE_TEXT_MAX);
            tracing::info!(group = %self.cfg.group, disk, seq, reason = %reason, "note: {text}");
            let marker = |seq, change| Slot {
                seq,
                disk,
                offset: 0,
                time_us: now_us(),
                ordering: Ordering::M,
                held: Held::Change(change),
            };
            g.push(marker(
                seq,
                Change::Note {
                    reason,
                    text: Arc::from(text),
                },
            ));
            if grown {
                if reason != NoteReason::DiskGrown {
                    let Ok(seq) = g.assign_seq(&self.reserver) else {
                        tracing::warn!(group = %self.cfg.group, disk, "disk-grown note not recorded");
                        return;
                    };
                    g.push(marker(
                        seq,
                        Change::Note {
                            reason: NoteReason::DiskGrown,
                            text: Arc::from("the disk grew: its new size follows"),
                        },
                    ));
                }
                // The disk's new size right behind its note. A DiskSize
                // carries no payload and a batch never ends on such a slot,
                // so it always joins its note's frame: that is what lets the
                // target grow an existing replica (a DiskSize above the
                // replica's size without this note in its frame is a replica
                // too small, refused).
                let Ok(seq) = g.assign_seq(&self.reserver) else {
                    tracing::warn!(group = %self.cfg.group, disk, "the grown disk's size not recorded");
                    return;
                };
                g.push(marker(seq, Change::DiskSize(size)));
                if let Ok(d) = g.disk(disk) {
                    d.growth = d.growth.map(|(from, _)| (from, Some(seq)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("abc", 5), "abc");
        assert_eq!(truncate_utf8("abc", 2), "ab");
        assert_eq!(truncate_utf8("aü", 2), "a");
        assert_eq!(truncate_utf8(&"é".repeat(300), 512).len(), 512);
    }
}
