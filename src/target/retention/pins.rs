//! Pins: how a reader (`recover`, `expose`, `promote`, possibly another
//! process) tells the target's apply thread which recovery point it is using,
//! through files in the group's state directory (docs/CONSISTENCY.md, "Pins").
//!
//! A reader writes `pins/<id>.pin` (JSON, atomically). The target's apply
//! thread looks at the directory between frames and when idle; for a new pin
//! it makes sure the before-images the reader needs are kept (starting an
//! epoch at the current point for `latest`), and answers in `pins/<id>.ack`.
//! While the pin file exists, the target never trims the epochs it names. The
//! reader removes both files when done; pins of processes that no longer exist
//! are removed by the target.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::journal::Loc;
use crate::util::time::now_us;

/// Directory of a group's pins, inside its state directory.
pub const PINS_DIR: &str = "pins";
/// Largest pin or ack file read (they are a few hundred bytes).
const MAX_PIN_FILE: u64 = 64 * 1024;

/// What a reader wants kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Want {
    /// The newest consistent point (the target starts an epoch there if
    /// needed, and answers which point it is).
    Latest,
    /// The point beginning this epoch, and every epoch after it.
    Epoch {
        /// The epoch.
        epoch: u64,
    },
    /// The replica as it is now at this frame, resolved by a reader while no
    /// target was running: a target that starts keeps before-images from its
    /// first write on (its start position must be this frame).
    At {
        /// Frame the replica is at.
        frame_no: u64,
        /// Its last seq.
        last_seq: u64,
    },
}

/// A pin file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinFile {
    /// The reader's process id (a pin of a dead process is removed).
    pub pid: u32,
    /// What it wants kept.
    pub want: Want,
    /// Stop applying this group for good (failover): `recover --promote`.
    #[serde(default)]
    pub promote: bool,
    /// When it was made, µs.
    pub created_us: u64,
}

/// The point a pin was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    /// The epoch the point begins (its before-images are kept).
    pub epoch: u64,
    /// Where its point record is.
    pub seg: u64,
    /// Offset of its point record.
    pub pos: u64,
    /// Frame at the point.
    pub frame_no: u64,
    /// Seq at the point.
    pub last_seq: u64,
    /// Source time at the point, µs.
    pub time_us: u64,
}

impl Granted {
    /// The point record's location.
    pub fn loc(&self) -> Loc {
        Loc {
            seg: self.seg,
            pos: self.pos,
        }
    }
}

/// The target's answer to a pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckFile {
    /// The point granted, or `None` with `error`.
    pub granted: Option<Granted>,
    /// Why the pin cannot be honoured.
    pub error: Option<String>,
    /// The group stopped applying (a promote pin).
    #[serde(default)]
    pub stopped: bool,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if meta.len() > MAX_PIN_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {} bytes, more than a pin file can be",
                path.display(),
                meta.len()
            ),
        ));
    }
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// A reader's pin; removed (with its ack) when dropped.
#[derive(Debug)]
pub struct Pin {
    pin: PathBuf,
    ack: PathBuf,
}

impl Pin {
    /// Write a pin in `group_dir` for `want`.
    pub fn create(group_dir: &Path, want: Want, promote: bool) -> io::Result<Pin> {
        let dir = group_dir.join(PINS_DIR);
        fs::create_dir_all(&dir)?;
        let id = format!("{}-{}", std::process::id(), now_us());
        let pin = dir.join(format!("{id}.pin"));
        let ack = dir.join(format!("{id}.ack"));
        let f = PinFile {
            pid: std::process::id(),
            want,
            promote,
            created_us: now_us(),
        };
        let bytes = serde_json::to_vec(&f).map_err(io::Error::other)?;
        write_atomic(&pin, &bytes)?;
        Ok(Pin { pin, ack })
    }

    /// Replace what the pin wants (a reader that resolved `latest` itself).
    pub fn set_want(&self, want: Want) -> io::Result<()> {
        let mut f: PinFile = read_json(&self.pin)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "pin file vanished"))?;
        f.want = want;
        let bytes = serde_json::to_vec(&f).map_err(io::Error::other)?;
        write_atomic(&self.pin, &bytes)
    }

    /// The target's answer, if there is one yet.
    pub fn ack(&self) -> io::Result<Option<AckFile>> {
        read_json(&self.ack)
    }

    /// Wait (polling) up to `limit` for the target's answer.
    pub fn wait_ack(&self, limit: Duration) -> io::Result<Option<AckFile>> {
        let until = Instant::now() + limit;
        loop {
            if let Some(a) = self.ack()? {
                return Ok(Some(a));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pin);
        let _ = fs::remove_file(&self.ack);
    }
}

/// The target's view of the pins of one group.
#[derive(Debug, Default)]
pub struct PinTable {
    dir: PathBuf,
    /// Active pins: id → the oldest epoch it needs (None until granted).
    active: HashMap<String, Option<u64>>,
    last_poll: Option<Instant>,
    /// Unreadable pins already answered, and when they were first seen.
    unreadable: HashMap<String, Instant>,
}

/// How long an unreadable pin stays after its error answer before it is
/// removed. A reader writes its pin whole (temporary file and rename), so an
/// unreadable one is torn by a power cut (its writer died with it) or was not
/// written by tidemark; either way nobody keeps it up to date.
pub const UNREADABLE_PIN_KEEP: Duration = Duration::from_secs(60);

/// A pin the target has not answered yet.
#[derive(Debug, Clone)]
pub struct NewPin {
    /// Its id (file stem).
    pub id: String,
    /// Its content.
    pub file: PinFile,
}

/// How often the apply thread looks at the pins directory.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

impl PinTable {
    /// The pins of the group whose state directory is `group_dir`.
    pub fn new(group_dir: &Path) -> PinTable {
        PinTable {
            dir: group_dir.join(PINS_DIR),
            active: HashMap::new(),
            last_poll: None,
            unreadable: HashMap::new(),
        }
    }

    /// True when the last poll is older than [`POLL_INTERVAL`].
    pub fn due(&self) -> bool {
        self.last_poll.is_none_or(|t| t.elapsed() >= POLL_INTERVAL)
    }

    /// Look at the directory: pins whose file is gone are released, pins of
    /// dead processes are removed, and new pins are returned (to be answered
    /// with [`PinTable::answer`]). A malformed pin is answered with an error.
    pub fn poll(&mut self) -> Vec<NewPin> {
        self.last_poll = Some(Instant::now());
        let mut seen = Vec::new();
        let mut unreadable_seen = Vec::new();
        let mut new = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            self.active.clear();
            return new;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pin")) else {
                continue;
            };
            let id = id.to_string();
            let path = e.path();
            let file: PinFile = match read_json(&path) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(err) => {
                    // Answered once; removed once it has had time to be read.
                    unreadable_seen.push(id.clone());
                    match self.unreadable.get(&id) {
                        None => {
                            tracing::warn!(pin = %path.display(), "unreadable pin (answered with an error, removed in {} s): {err}", UNREADABLE_PIN_KEEP.as_secs());
                            let _ = self.write_ack(
                                &id,
                                &AckFile {
                                    granted: None,
                                    error: Some(format!("unreadable pin: {err}")),
                                    stopped: false,
                                },
                            );
                            self.unreadable.insert(id, Instant::now());
                        }
                        Some(t) if t.elapsed() >= UNREADABLE_PIN_KEEP => {
                            let _ = fs::remove_file(&path);
                            let _ = fs::remove_file(self.dir.join(format!("{id}.ack")));
                            self.unreadable.remove(&id);
                        }
                        Some(_) => {}
                    }
                    continue;
                }
            };
            if !process_alive(file.pid) {
                tracing::info!(pin = %path.display(), pid = file.pid, "removing the pin of a process that has ended");
                let _ = fs::remove_file(&path);
                let _ = fs::remove_file(self.dir.join(format!("{id}.ack")));
                continue;
            }
            seen.push(id.clone());
            if !self.active.contains_key(&id) {
                self.active.insert(id.clone(), None);
                new.push(NewPin { id, file });
            } else if let Want::Epoch { epoch } = file.want {
                self.active.insert(id, Some(epoch));
            }
        }
        self.active.retain(|id, _| seen.contains(id));
        // Forget unreadable pins whose file is gone (removed here or by hand)
        // or readable again.
        self.unreadable.retain(|id, _| unreadable_seen.contains(id));
        new
    }

    /// Answer pin `id` (and remember the oldest epoch it needs).
    pub fn answer(&mut self, id: &str, ack: &AckFile) {
        let epoch = ack.granted.as_ref().map(|g| g.epoch);
        if let Some(slot) = self.active.get_mut(id) {
            *slot = epoch;
        }
        if let Err(e) = self.write_ack(id, ack) {
            tracing::warn!(pin = id, "cannot answer the pin: {e}");
        }
    }

    fn write_ack(&self, id: &str, ack: &AckFile) -> io::Result<()> {
        let bytes = serde_json::to_vec(ack).map_err(io::Error::other)?;
        write_atomic(&self.dir.join(format!("{id}.ack")), &bytes)
    }

    /// The oldest epoch any active pin needs.
    pub fn oldest_needed(&self) -> Option<u64> {
        self.active.values().flatten().copied().min()
    }

    /// True while any pin is active.
    pub fn any(&self) -> bool {
        !self.active.is_empty()
    }
}

/// True when a process with this id exists (signal 0).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_seen_answered_and_released() {
        let d = tempfile::tempdir().unwrap();
        let mut t = PinTable::new(d.path());
        assert!(t.poll().is_empty());
        let pin = Pin::create(d.path(), Want::Latest, false).unwrap();
        let new = t.poll();
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].file.want, Want::Latest);
        assert!(t.poll().is_empty(), "answered once");
        let g = Granted {
            epoch: 4,
            seg: 1,
            pos: 64,
            frame_no: 9,
            last_seq: 90,
            time_us: 1,
        };
        t.answer(
            &new[0].id,
            &AckFile {
                granted: Some(g.clone()),
                error: None,
                stopped: false,
            },
        );
        assert_eq!(t.oldest_needed(), Some(4));
        assert_eq!(
            pin.wait_ack(Duration::from_secs(1))
                .unwrap()
                .unwrap()
                .granted,
            Some(g)
        );
        drop(pin);
        t.poll();
        assert!(!t.any());
        assert_eq!(t.oldest_needed(), None);
    }

    #[test]
    fn pins_of_dead_processes_and_garbage_are_handled() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join(PINS_DIR);
        fs::create_dir_all(&dir).unwrap();
        let dead = PinFile {
            pid: i32::MAX as u32,
            want: Want::Latest,
            promote: false,
            created_us: 0,
        };
        fs::write(dir.join("x.pin"), serde_json::to_vec(&dead).unwrap()).unwrap();
        fs::write(dir.join("y.pin"), b"{not json").unwrap();
        let mut t = PinTable::new(d.path());
        assert!(t.poll().is_empty());
        assert!(
            !dir.join("x.pin").exists(),
            "a dead process's pin is removed"
        );
        let ack: AckFile = read_json(&dir.join("y.ack")).unwrap().unwrap();
        assert!(ack.error.unwrap().contains("unreadable pin"));
        // Answered once, not at every poll; removed after UNREADABLE_PIN_KEEP.
        fs::remove_file(dir.join("y.ack")).unwrap();
        assert!(t.poll().is_empty());
        assert!(!dir.join("y.ack").exists(), "answered only once");
        assert!(dir.join("y.pin").exists());
        // As if first seen UNREADABLE_PIN_KEEP ago.
        let long_ago = Instant::now().checked_sub(UNREADABLE_PIN_KEEP).unwrap();
        t.unreadable.insert("y".into(), long_ago);
        assert!(t.poll().is_empty());
        assert!(!dir.join("y.pin").exists(), "removed after the keep time");
        assert!(t.unreadable.is_empty());
    }
}
