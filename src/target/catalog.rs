//! The catalog: an embedded SQLite database (`<state_dir>/catalog.db`) of the
//! recovery points, the ranges where a replica is not consistent, and retention
//! events, per group. It is an index: the retention journal and the watermark
//! are the truth, and the catalog can be rebuilt from them (a corrupt catalog
//! is set aside and rebuilt; docs/CONSISTENCY.md, "Catalog").
//!
//! The target's flusher threads write it (after the batch that made a change
//! is durable); `tidemark target points` and `recover` read it, from other
//! processes: the database runs in WAL mode with a busy timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::retention::CatalogOp;
use super::retention::journal::{Loc, PointKind, PointRec};
use crate::error::{Classify, ErrorKind};

/// File name of the catalog in the target's state directory.
pub const CATALOG_FILE: &str = "catalog.db";
/// How long a writer or reader waits for a lock held by another connection.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// Errors of the catalog.
#[derive(Debug, Error)]
pub enum CatalogError {
    /// SQLite refused an operation (locked, full, I/O).
    #[error("catalog {}: {source}", path.display())]
    Sql {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file is not a usable catalog (not SQLite, damaged, newer schema).
    #[error("catalog {}: {why}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl Classify for CatalogError {
    fn kind(&self) -> ErrorKind {
        match self {
            CatalogError::Sql { source, .. } => match source.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    ErrorKind::Throttled
                }
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                    ErrorKind::Corrupt
                }
                _ => ErrorKind::Io,
            },
            CatalogError::Corrupt { .. } => ErrorKind::Corrupt,
        }
    }
}

/// A recovery point as listed by the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRow {
    /// Group.
    pub group: String,
    /// Last frame applied at the point.
    pub frame_no: u64,
    /// Last seq applied at the point: the point's identity for users.
    pub seq: u64,
    /// Source capture time of that seq, µs since the Unix epoch.
    pub time_us: u64,
    /// crash, app or tag.
    pub kind: PointKind,
    /// Tag name, for tag points.
    pub tag: Option<String>,
    /// The epoch it begins in the retention journal (before-images kept from
    /// it), if any.
    pub epoch: Option<u64>,
    /// Where its point record is in the journal.
    pub loc: Option<Loc>,
}

/// A range of seqs over which a replica was (or is) not consistent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRow {
    /// Group.
    pub group: String,
    /// The last consistent point before it: seq.
    pub after_seq: u64,
    /// Its source time, µs.
    pub after_time_us: u64,
    /// The first consistent point after it (None while it lasts).
    pub end_seq: Option<u64>,
    /// Its source time, µs.
    pub end_time_us: Option<u64>,
    /// Why (initial copy, resync after an unclean stop, ...).
    pub reason: String,
}

/// An open catalog.
#[derive(Debug)]
pub struct Catalog {
    path: PathBuf,
    conn: Connection,
}

fn sql(path: &Path) -> impl FnOnce(rusqlite::Error) -> CatalogError + '_ {
    move |source| CatalogError::Sql {
        path: path.to_path_buf(),
        source,
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS points(
    grp TEXT NOT NULL,
    frame_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tag TEXT,
    epoch INTEGER,
    seg INTEGER,
    pos INTEGER,
    PRIMARY KEY (grp, frame_no)
);
CREATE INDEX IF NOT EXISTS points_by_seq ON points(grp, seq);
CREATE TABLE IF NOT EXISTS ranges(
    grp TEXT NOT NULL,
    after_seq INTEGER NOT NULL,
    after_time_us INTEGER NOT NULL,
    end_seq INTEGER,
    end_time_us INTEGER,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events(
    grp TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    what TEXT NOT NULL
);
";

impl Catalog {
    /// Open (creating) the catalog in `state_dir` for writing. A file that is
    /// not a usable catalog is renamed to `catalog.db.damaged-<time>` and a new
    /// one is created (the caller re-adds what the journals know).
    pub fn open(state_dir: &Path) -> Result<(Catalog, Option<String>), CatalogError> {
        let path = state_dir.join(CATALOG_FILE);
        match Self::open_rw(&path) {
            Ok(c) => {
                // The file's name (and its WAL's) durable in the directory: a
                // catalog just created must not vanish at a power cut.
                if let Err(e) = crate::util::durable::fsync_dir(state_dir) {
                    tracing::warn!("fsync of {}: {e}", state_dir.display());
                }
                Ok((c, None))
            }
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                let aside =
                    path.with_extension(format!("db.damaged-{}", crate::util::time::now_us()));
                let why = format!("{e}; set aside as {}", aside.display());
                tracing::error!("{why}; starting a new catalog");
                std::fs::rename(&path, &aside).map_err(|err| CatalogError::Corrupt {
                    path: path.clone(),
                    why: format!("{e}, and it cannot be set aside: {err}"),
                })?;
                for ext in ["db-wal", "db-shm"] {
                    let _ = std::fs::remove_file(path.with_extension(ext));
                }
                Ok((Self::open_rw(&path)?, Some(why)))
            }
            Err(e) => Err(e),
        }
    }

    fn open_rw(path: &Path) -> Result<Catalog, CatalogError> {
        let conn = Connection::open(path).map_err(sql(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(path))?;
        let c = Catalog {
            path: path.to_path_buf(),
            conn,
        };
        c.check_and_create()?;
        Ok(c)
    }

    /// Open an existing catalog read-only (for `points`, `recover`).
    pub fn open_read_only(state_dir: &Path) -> Result<Catalog, CatalogError> {
        let path = state_dir.join(CATALOG_FILE);
        if !path.exists() {
            return Err(CatalogError::Corrupt {
                path,
                why: "no catalog here (has the target ever run with this state directory?)".into(),
            });
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(&path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(&path))?;
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| corrupt_or_sql(&path, e))?;
        if v > SCHEMA_VERSION {
            return Err(CatalogError::Corrupt {
                path,
                why: format!("schema version {v} is newer than this build ({SCHEMA_VERSION})"),
            });
        }
        Ok(Catalog { path, conn })
    }

    fn check_and_create(&self) -> Result<(), CatalogError> {
        let p = &self.path;
        let integrity: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt_or_sql(p, e))?;
        if integrity != "ok" {
            return Err(CatalogError::Corrupt {
                path: p.clone(),
                why: format!("integrity check: {integrity}"),
            });
        }
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| corrupt_or_sql(p, e))?;
        if v > SCHEMA_VERSION {
            return Err(CatalogError::Corrupt {
                path: p.clone(),
                why: format!("schema version {v} is newer than this build ({SCHEMA_VERSION})"),
            });
        }
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(sql(p))?;
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql(p))?;
        self.conn
            .execute_batch(SCHEMA)
            .map_err(|e| corrupt_or_sql(p, e))?;
        self.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql(p))?;
        Ok(())
    }

    /// Apply `ops` of `group` in one transaction.
    pub fn apply(&mut self, group: &str, ops: &[CatalogOp]) -> Result<(), CatalogError> {
        let p = self.path.clone();
        let tx = self.conn.transaction().map_err(sql(&p))?;
        for op in ops {
            match op {
                CatalogOp::AddPoint { point, loc } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO points(grp, frame_no, seq, time_us, kind, tag, epoch, seg, pos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        params![
                            group,
                            point.frame_no as i64,
                            point.last_seq as i64,
                            point.time_us as i64,
                            point.kind.as_str(),
                            point.tag,
                            loc.map(|_| point.epoch as i64),
                            loc.map(|l| l.seg as i64),
                            loc.map(|l| l.pos as i64),
                        ],
                    )
                    .map_err(sql(&p))?;
                    if loc.is_none() {
                        // A point without before-images supersedes every older
                        // one without them: only the newest is recoverable.
                        tx.execute(
                            "DELETE FROM points WHERE grp = ?1 AND frame_no < ?2 AND epoch IS NULL",
                            params![group, point.frame_no as i64],
                        )
                        .map_err(sql(&p))?;
                    }
                }
                CatalogOp::DropPoint { frame_no } => {
                    tx.execute(
                        "DELETE FROM points WHERE grp = ?1 AND frame_no = ?2",
                        params![group, *frame_no as i64],
                    )
                    .map_err(sql(&p))?;
                }
                CatalogOp::OpenRange { after, reason } => {
                    tx.execute(
                        "INSERT INTO ranges(grp, after_seq, after_time_us, reason) VALUES (?1, ?2, ?3, ?4)",
                        params![group, after.last_seq as i64, after.time_us as i64, reason],
                    )
                    .map_err(sql(&p))?;
                }
                CatalogOp::CloseRange { at } => {
                    tx.execute(
                        "UPDATE ranges SET end_seq = ?2, end_time_us = ?3 WHERE grp = ?1 AND end_seq IS NULL",
                        params![group, at.last_seq as i64, at.time_us as i64],
                    )
                    .map_err(sql(&p))?;
                }
                CatalogOp::Event { what } => {
                    tx.execute(
                        "INSERT INTO events(grp, time_us, what) VALUES (?1, ?2, ?3)",
                        params![group, crate::util::time::now_us() as i64, what],
                    )
                    .map_err(sql(&p))?;
                }
            }
        }
        tx.commit().map_err(sql(&p))
    }

    /// Make the catalog's points with before-images agree with the journal's
    /// (after a crash, or after the catalog was rebuilt): add the missing
    /// ones, drop the ones the journal no longer has.
    pub fn reconcile(
        &mut self,
        group: &str,
        journal: &[(Loc, PointRec)],
    ) -> Result<(), CatalogError> {
        let have = self.points(group)?;
        let mut ops = Vec::new();
        for row in have.iter().filter(|r| r.epoch.is_some()) {
            if !journal.iter().any(|(_, p)| p.frame_no == row.frame_no) {
                ops.push(CatalogOp::DropPoint {
                    frame_no: row.frame_no,
                });
            }
        }
        for (loc, p) in journal {
            if !have
                .iter()
                .any(|r| r.frame_no == p.frame_no && r.epoch == Some(p.epoch))
            {
                ops.push(CatalogOp::AddPoint {
                    point: p.clone(),
                    loc: Some(*loc),
                });
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.apply(group, &ops)
    }

    /// The points of `group`, oldest first.
    pub fn points(&self, group: &str) -> Result<Vec<PointRow>, CatalogError> {
        let p = &self.path;
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT frame_no, seq, time_us, kind, tag, epoch, seg, pos FROM points WHERE grp = ?1 ORDER BY frame_no",
            )
            .map_err(sql(p))?;
        let rows = st
            .query_map(params![group], |r| {
                let kind: String = r.get(3)?;
                let epoch: Option<i64> = r.get(5)?;
                let seg: Option<i64> = r.get(6)?;
                let pos: Option<i64> = r.get(7)?;
                Ok(PointRow {
                    group: group.to_string(),
                    frame_no: r.get::<_, i64>(0)? as u64,
                    seq: r.get::<_, i64>(1)? as u64,
                    time_us: r.get::<_, i64>(2)? as u64,
                    kind: match kind.as_str() {
                        "app" => PointKind::App,
                        "tag" => PointKind::Tag,
                        _ => PointKind::Crash,
                    },
                    tag: r.get(4)?,
                    epoch: epoch.map(|e| e as u64),
                    loc: seg.zip(pos).map(|(s, p)| Loc {
                        seg: s as u64,
                        pos: p as u64,
                    }),
                })
            })
            .map_err(sql(p))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql(p))
    }

    /// The inconsistent ranges of `group`, oldest first.
    pub fn ranges(&self, group: &str) -> Result<Vec<RangeRow>, CatalogError> {
        let p = &self.path;
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT after_seq, after_time_us, end_seq, end_time_us, reason FROM ranges WHERE grp = ?1 ORDER BY rowid",
            )
            .map_err(sql(p))?;
        let rows = st
            .query_map(params![group], |r| {
                Ok(RangeRow {
                    group: group.to_string(),
                    after_seq: r.get::<_, i64>(0)? as u64,
                    after_time_us: r.get::<_, i64>(1)? as u64,
                    end_seq: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    end_time_us: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    reason: r.get(4)?,
                })
            })
            .map_err(sql(p))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql(p))
    }

    /// The events of `group` (newest last), at most `limit`.
    pub fn events(&self, group: &str, limit: usize) -> Result<Vec<(u64, String)>, CatalogError> {
        let p = &self.path;
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT time_us, what FROM (SELECT rowid, time_us, what FROM events WHERE grp = ?1 ORDER BY rowid DESC LIMIT ?2) ORDER BY rowid",
            )
            .map_err(sql(p))?;
        let rows = st
            .query_map(params![group, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })
            .map_err(sql(p))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql(p))
    }

    /// The point of `group` at exactly `frame_no`, if listed.
    pub fn point_at_frame(
        &self,
        group: &str,
        frame_no: u64,
    ) -> Result<Option<PointRow>, CatalogError> {
        Ok(self
            .points(group)?
            .into_iter()
            .find(|r| r.frame_no == frame_no))
    }

    /// True when the database has any row for `group` (it ever applied).
    pub fn knows(&self, group: &str) -> Result<bool, CatalogError> {
        let p = &self.path;
        self.conn
            .query_row(
                "SELECT 1 FROM points WHERE grp = ?1 LIMIT 1",
                params![group],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(sql(p))
    }
}

fn corrupt_or_sql(path: &Path, e: rusqlite::Error) -> CatalogError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            CatalogError::Corrupt {
                path: path.to_path_buf(),
                why: e.to_string(),
            }
        }
        _ => CatalogError::Sql {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(frame_no: u64, epoch: u64) -> PointRec {
        PointRec {
            epoch,
            frame_no,
            last_seq: frame_no * 10,
            time_us: frame_no * 1000,
            kind: PointKind::Crash,
            tag: None,
        }
    }

    #[test]
    fn points_ranges_and_events_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let (mut c, why) = Catalog::open(d.path()).unwrap();
        assert!(why.is_none());
        let loc = Loc { seg: 1, pos: 64 };
        c.apply(
            "g1",
            &[
                CatalogOp::AddPoint {
                    point: pt(1, 1),
                    loc: Some(loc),
                },
                CatalogOp::AddPoint {
                    point: PointRec {
                        kind: PointKind::App,
                        tag: Some("nightly".into()),
                        ..pt(2, 2)
                    },
                    loc: Some(Loc { seg: 1, pos: 200 }),
                },
                CatalogOp::OpenRange {
                    after: pt(2, 2),
                    reason: "resync after an unclean stop".into(),
                },
                CatalogOp::Event {
                    what: "trimmed".into(),
                },
            ],
        )
        .unwrap();
        c.apply("g1", &[CatalogOp::CloseRange { at: pt(5, 0) }])
            .unwrap();
        let r = Catalog::open_read_only(d.path()).unwrap();
        let pts = r.points("g1").unwrap();
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].loc, Some(loc));
        assert_eq!(pts[1].tag.as_deref(), Some("nightly"));
        assert_eq!(pts[1].kind, PointKind::App);
        let rg = r.ranges("g1").unwrap();
        assert_eq!(rg.len(), 1);
        assert_eq!((rg[0].after_seq, rg[0].end_seq), (20, Some(50)));
        assert_eq!(r.events("g1", 10).unwrap().len(), 1);
        assert!(r.points("g2").unwrap().is_empty());
    }

    #[test]
    fn points_without_before_images_keep_only_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let (mut c, _) = Catalog::open(d.path()).unwrap();
        for f in 1..5 {
            c.apply(
                "g1",
                &[CatalogOp::AddPoint {
                    point: pt(f, 0),
                    loc: None,
                }],
            )
            .unwrap();
        }
        let pts = c.points("g1").unwrap();
        assert_eq!(pts.iter().map(|p| p.frame_no).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn reconcile_follows_the_journal() {
        let d = tempfile::tempdir().unwrap();
        let (mut c, _) = Catalog::open(d.path()).unwrap();
        let l = |p| Loc { seg: 1, pos: p };
        c.apply(
            "g1",
            &[CatalogOp::AddPoint {
                point: pt(1, 1),
                loc: Some(l(64)),
            }],
        )
        .unwrap();
        c.reconcile("g1", &[(l(100), pt(2, 2)), (l(200), pt(3, 3))])
            .unwrap();
        let f: Vec<u64> = c.points("g1").unwrap().iter().map(|p| p.frame_no).collect();
        assert_eq!(f, vec![2, 3]);
    }

    #[test]
    fn a_corrupt_catalog_is_set_aside_and_replaced() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(CATALOG_FILE), vec![0x5a; 8192]).unwrap();
        let (c, why) = Catalog::open(d.path()).unwrap();
        assert!(why.unwrap().contains("set aside"), "the reason is reported");
        assert!(c.points("g1").unwrap().is_empty());
        let aside = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("damaged"));
        assert!(aside);
    }

    #[test]
    fn a_locked_catalog_is_a_throttle_not_a_corruption() {
        let d = tempfile::tempdir().unwrap();
        let (mut c, _) = Catalog::open(d.path()).unwrap();
        let other = Connection::open(d.path().join(CATALOG_FILE)).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        c.conn.busy_timeout(Duration::from_millis(50)).unwrap();
        let e = c
            .apply(
                "g1",
                &[CatalogOp::AddPoint {
                    point: pt(1, 1),
                    loc: None,
                }],
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Throttled, "{e}");
        other.execute_batch("ROLLBACK").unwrap();
        c.apply(
            "g1",
            &[CatalogOp::AddPoint {
                point: pt(1, 1),
                loc: None,
            }],
        )
        .unwrap();
    }
}
