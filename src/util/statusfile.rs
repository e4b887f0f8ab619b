//! Status snapshots written as JSON files, replaced atomically, so that
//! `tidemark status`, scripts and the bench can read a role's state without a
//! connection to it (and never see a half-written file).

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// File name of a role's status snapshot inside its state (or spool) directory.
pub const STATUS_FILE: &str = "status.json";
/// How often every role rewrites its status snapshot. Short enough that a
/// script or test waiting for a state (the copy done, a watermark reached)
/// sees it within a tenth of a second; a rewrite is a few kilobytes to the
/// page cache (no fsync), so ten a second cost nothing measurable.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// The temporary file a status snapshot is written to before the rename.
pub const STATUS_TMP: &str = "status.json.tmp";

/// Write `value` as pretty JSON to `path` through a temporary file and a rename.
/// No fsync: a status file is a view, not a record; after a crash it may be stale
/// or missing, never torn.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_file_name(match path.file_name().and_then(|n| n.to_str()) {
        Some(STATUS_FILE) | None => STATUS_TMP.to_string(),
        Some(other) => format!("{other}.tmp"),
    });
    {
        let mut f = File::create(&tmp)?;
        let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        f.write_all(&bytes)?;
        f.write_all(b"\n")?;
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(STATUS_FILE);
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        write_json(&p, &serde_json::json!({"a": 2})).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
        assert!(!d.path().join(STATUS_TMP).exists());
    }
}
