//! Dropping one group's spooled frames while the relay is stopped: the
//! operator's re-seed of a target that lost its own state (docs/RESYNC.md,
//! "A target that lost its state").
//!
//! The frames such a target needs were trimmed when its earlier self
//! acknowledged them, so no relay can supply them. Emptying the group's spool
//! makes the relay's head fall behind what it acknowledged to the agent, which
//! the agent treats as any chain gap: it compares every disk with the replica
//! by checksum and continues with a REBASE frame, which a target at any tip
//! accepts. What the dropped frames held is on the source disks, so nothing is
//! lost; only the differences travel.

use std::fs;
use std::path::{Path, PathBuf};

use super::state::{self, read_state};
use super::{SpoolError, check_group, io_err, lock_dir};

/// What [`reset_group`] dropped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupReset {
    /// The group's directory (now gone).
    pub dir: PathBuf,
    /// Files removed (segments and the state file).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The head frame the group's state file named, if it could be read.
    pub head_frame_no: Option<u64>,
    /// Frames up to this one had been trimmed (acknowledged by a target).
    pub trimmed_through: Option<u64>,
}

/// Remove every spooled frame and the state of `group` in the spool directory
/// `dir`. Refused while a relay holds the spool (its lock file), and for a
/// group the spool does not hold. Blocking.
pub fn reset_group(dir: &Path, group: &str) -> Result<GroupReset, SpoolError> {
    check_group(group)?;
    let gdir = dir.join(group);
    let unknown = || SpoolError::UnknownGroup {
        group: group.to_string(),
        dir: dir.to_path_buf(),
    };
    if !dir.is_dir() {
        return Err(unknown());
    }
    let _lock = lock_dir(dir)?;
    // A plain directory only: a symlink in its place is not what a relay
    // wrote, and removing it would remove nothing of the spool.
    match fs::symlink_metadata(&gdir) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => {
            return Err(io_err("reset", &gdir)(std::io::Error::other(
                "not a plain directory (a symlink or a file); left alone",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(unknown()),
        Err(e) => return Err(io_err("stat", &gdir)(e)),
    }
    let st = read_state(&gdir).ok().flatten();
    let mut files = 0;
    let mut bytes = 0;
    for e in fs::read_dir(&gdir).map_err(io_err("list", &gdir))? {
        let e = e.map_err(io_err("list", &gdir))?;
        files += 1;
        bytes += e.metadata().map_or(0, |m| m.len());
    }
    // Rename first, so the group is gone in one step (a name no group can
    // have: a relay reports it as an unknown entry and leaves it alone), then
    // delete. A leftover of an earlier reset goes first.
    let trash = dir.join(format!(".reset-{group}"));
    if trash.exists() {
        fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
    }
    fs::rename(&gdir, &trash).map_err(io_err("rename", &gdir))?;
    state::fsync_dir(dir)?;
    fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
    state::fsync_dir(dir)?;
    tracing::warn!(group, dir = %gdir.display(), files, bytes, "group's spool removed (re-seed): the agent will compare every disk");
    Ok(GroupReset {
        dir: gdir,
        files,
        bytes,
        head_frame_no: st.as_ref().map(|s| s.head_frame_no),
        trimmed_through: st.as_ref().map(|s| s.trimmed_through),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::tests::req;
    use crate::spool::{Spool, SpoolOptions};

    #[test]
    fn a_group_is_reset_only_while_no_relay_holds_the_spool() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(SpoolOptions::new(d.path())).unwrap();
        for n in 1..=3u64 {
            spool.append_blocking(req("g1", n, 100)).unwrap();
            spool.append_blocking(req("g2", n, 100)).unwrap();
        }
        spool.trim_through("g1", 2).unwrap();
        let e = reset_group(d.path(), "g1").unwrap_err();
        assert!(matches!(e, SpoolError::Locked { .. }), "{e}");
        spool.shutdown();
        drop(spool);
        let e = reset_group(d.path(), "nope").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = reset_group(d.path(), "../g1").unwrap_err();
        assert!(matches!(e, SpoolError::InvalidGroup { .. }), "{e}");
        // A symlink in a group's place is left alone.
        std::os::unix::fs::symlink(d.path().join("g2"), d.path().join("g3")).unwrap();
        let e = reset_group(d.path(), "g3").unwrap_err();
        assert!(e.to_string().contains("not a plain directory"), "{e}");
        std::fs::remove_file(d.path().join("g3")).unwrap();
        let r = reset_group(d.path(), "g1").unwrap();
        assert_eq!((r.head_frame_no, r.trimmed_through), (Some(3), Some(2)));
        assert!(r.files >= 2 && r.bytes > 0, "{r:?}");
        // The relay starts again with g1 empty and g2 untouched.
        let (spool, _) = Spool::open(SpoolOptions::new(d.path())).unwrap();
        assert_eq!(spool.head("g1"), None);
        assert_eq!(spool.head("g2").map(|h| h.frame_no), Some(3));
    }
}
