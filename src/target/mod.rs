//! The target (master target): orders, opens and applies frames to replicas.
//!
//! Per group (docs/TARGET.md has the whole picture):
//!
//! ```text
//!  relay ──TLS──▶ reader task ──(charged, ≤4)──▶ session task: Gate
//!                  (budget: 64 frames / 64 MiB)        │ ready frames, in chain order
//!                                                      ▼
//!                             open pool (2 std threads, own Opener each)
//!                                                      │ (index, opened) any order
//!                                                      ▼
//!                         apply thread: Reorder → validate → write_batch per disk
//!                          → group commit: flush images, store watermark
//!                                                      │ watch: durable mark / stall
//!  relay ◀──── Ack (cumulative) ◀─── session task ◀────┘
//! ```
//!
//! [`run`] is the role's entry point; [`check_apply_log`] the shared checker of
//! the apply-order proof; [`TargetStatus`] the status file's schema.

pub mod apply;
pub mod applylog;
pub mod budget;
pub mod catalog;
pub mod digests;
pub mod gate;
pub mod open;
pub mod recover;
pub mod redo;
pub mod retention;
pub mod session;
pub mod status;
pub mod watermark;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nix::fcntl::Flock;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{ConfigError, TargetConfig, TargetGroup};
use crate::error::{Classify, ErrorKind};
use crate::frame::{DataKey, FrameError, GroupName, Opener};
use crate::image::{Engine, ImageError};
use crate::transport::client::{ConnectError, RelayEndpoint};
use crate::transport::tls::{self, TlsError};
use crate::util::lockfile::{self, LockError};
use crate::util::shutdown::{self, Shutdown};
use crate::util::statusfile::{STATUS_FILE, STATUS_INTERVAL, write_json};
use crate::util::time::now_us;

pub use apply::ApplyError;
pub use applylog::{APPLY_LOG, ApplyLogSummary, check_apply_log};
pub use status::{GapStatus, GroupStatus, TargetStatus, WatermarkStatus};

use apply::{ApplySetup, DiskSpec, Progress};
use budget::Budget;
use session::GroupSession;
use status::SharedStatus;
use watermark::{Watermark, WatermarkError};

/// Name of the lock file in the state directory (one target per state dir).
pub const LOCK_FILE: &str = lockfile::LOCK_FILE;
/// Name of a group's watermark file in its state directory.
pub const WATERMARK_FILE: &str = "watermark";

/// Why the target could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The configuration is invalid.
    #[error("target config: {0}")]
    Config(#[from] ConfigError),
    /// A configured disk id does not fit the frame format's 16-bit disk field.
    #[error(
        "target config: group {group}: disk id {id} is above 65535, the largest disk id a frame can carry"
    )]
    DiskId {
        /// Group.
        group: String,
        /// The id.
        id: u32,
    },
    /// A group name is not a valid frame group name.
    #[error("target config: group {group}: {source}")]
    GroupName {
        /// Group.
        group: String,
        /// Why.
        source: Box<FrameError>,
    },
    /// Creating or using the state directory failed.
    #[error("state directory: {path}: {source}")]
    StateIo {
        /// File or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the state directory.
    #[error("state directory {} is locked by another target process", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// A group's watermark cannot be read.
    #[error("group {group}: {source}")]
    Watermark {
        /// Group.
        group: String,
        /// Why.
        source: Box<WatermarkError>,
    },
    /// A group's data key cannot be loaded.
    #[error("group {group}: {source}")]
    Key {
        /// Group.
        group: String,
        /// Why.
        source: Box<FrameError>,
    },
    /// TLS client configuration failed.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// An existing replica cannot be opened at start.
    #[error("group {group}: cannot open replica: {source}")]
    Replica {
        /// Group.
        group: String,
        /// Why.
        source: Box<ImageError>,
    },
    /// The session with the relay cannot be opened and retrying will not help
    /// (authentication refused, bad TLS configuration).
    #[error("group {group}: {source}")]
    Session {
        /// Group.
        group: String,
        /// Why.
        source: Box<ConnectError>,
    },
    /// The relay ended the session with an authorization error.
    #[error("group {group}: the relay refused the session ({kind}): {message}")]
    RelayRefused {
        /// Group.
        group: String,
        /// Its classification.
        kind: ErrorKind,
        /// Its reason.
        message: String,
    },
    /// The redo journal cannot be opened or read.
    #[error("group {group}: redo journal: {source}")]
    Redo {
        /// Group.
        group: String,
        /// Why.
        source: Box<crate::spool::SpoolError>,
    },
    /// The retention journal cannot be opened.
    #[error("group {group}: {source}")]
    Retention {
        /// Group.
        group: String,
        /// Why.
        source: Box<retention::RetentionError>,
    },
    /// A frame of the redo journal could not be applied again at start.
    #[error("group {group}: replaying the redo journal: {source}")]
    Replay {
        /// Group.
        group: String,
        /// Why.
        source: Box<ApplyError>,
    },
    /// The configuration has no such group.
    #[error("target config: no group named {group:?}")]
    UnknownGroup {
        /// The name asked for.
        group: String,
    },
    /// A thread could not be started.
    #[error("cannot start the {what}: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A task of the target ended abnormally (a bug).
    #[error("group {group}: {what} ended abnormally")]
    TaskFailed {
        /// Group.
        group: String,
        /// Which task.
        what: &'static str,
    },
}

impl Classify for TargetError {
    fn kind(&self) -> ErrorKind {
        match self {
            TargetError::Config(_)
            | TargetError::DiskId { .. }
            | TargetError::GroupName { .. }
            | TargetError::UnknownGroup { .. }
            | TargetError::Locked { .. } => ErrorKind::Config,
            TargetError::StateIo { .. }
            | TargetError::Spawn { .. }
            | TargetError::TaskFailed { .. } => ErrorKind::Io,
            TargetError::Watermark { source, .. } => source.kind(),
            TargetError::Key { source, .. } => source.kind(),
            TargetError::Tls(e) => e.kind(),
            TargetError::Replica { source, .. } => source.kind(),
            TargetError::Session { source, .. } => source.kind(),
            TargetError::RelayRefused { kind, .. } => *kind,
            TargetError::Redo { source, .. } => redo::redo_kind(source),
            TargetError::Replay { source, .. } => source.kind(),
            TargetError::Retention { source, .. } => source.kind(),
        }
    }
}

/// A started group: its session (not yet running), status, budget, threads.
struct GroupRuntime {
    session: GroupSession,
    threads: Vec<JoinHandle<()>>,
}

/// Run the target role until `shutdown` fires (then stop cleanly: everything
/// already handed to the apply threads is applied, flushed and recorded in the
/// watermark, and a final status is written) or a fatal error (configuration,
/// state directory locked, authentication refused by the relay), returned as
/// a one-line error after the other groups were stopped the same clean way.
pub async fn run(cfg: TargetConfig, shutdown: Shutdown) -> Result<(), TargetError> {
    cfg.validate_at(Path::new("target config"))?;
    let state_dir = cfg.target.state_dir.clone();
    let (lock, prepared) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare(&cfg))
            .await
            .map_err(|_| TargetError::TaskFailed {
                group: "*".into(),
                what: "start-up",
            })??
    };
    let client = tls::client_config(&cfg.tls.files())?;
    let endpoint = RelayEndpoint {
        addr: cfg.target.relay.clone(),
        server_name: cfg.target.relay_name.clone(),
        tls: client,
    };
    let (stop, stop_rx) = shutdown::channel();
    let stop = Arc::new(stop);

    // Start every group's threads; only then any session.
    let mut groups: Vec<GroupRuntime> = Vec::new();
    let mut failed = None;
    for p in prepared {
        match start_group(&cfg, p, &endpoint, stop_rx.clone()).await {
            Ok(g) => groups.push(g),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        // Dropping the sessions closes the pipelines; the threads then end.
        let threads: Vec<JoinHandle<()>> = groups.into_iter().flat_map(|g| g.threads).collect();
        join_threads(threads).await;
        drop(lock);
        return Err(e);
    }

    let statuses: Vec<(SharedStatus, Arc<Budget>)> = groups
        .iter()
        .map(|g| (g.session.status.clone(), Arc::clone(&g.session.budget)))
        .collect();
    let status_path = state_dir.join(STATUS_FILE);
    let (writer_stop, writer_rx) = shutdown::channel();
    let writer = tokio::spawn(status_writer(
        status_path.clone(),
        cfg.target.name.clone(),
        statuses.clone(),
        writer_rx,
    ));
    let forward = {
        let stop = Arc::clone(&stop);
        let mut ext = shutdown.clone();
        tokio::spawn(async move {
            ext.wait().await;
            stop.fire();
        })
    };

    let mut threads = Vec::new();
    let mut set = JoinSet::new();
    for g in groups {
        threads.extend(g.threads);
        let name = g.session.group.to_string();
        set.spawn(async move { (name, session::run_group(g.session).await) });
    }
    let mut first_err: Option<TargetError> = None;
    while let Some(res) = set.join_next().await {
        let err = match res {
            Ok((_, Ok(()))) => None,
            Ok((_, Err(e))) => Some(e),
            Err(_) => Some(TargetError::TaskFailed {
                group: "?".into(),
                what: "session task",
            }),
        };
        if let Some(e) = err {
            tracing::error!("{e}; stopping the target");
            stop.fire();
            first_err.get_or_insert(e);
        }
    }
    forward.abort();
    join_threads(threads).await;
    writer_stop.fire();
    let _ = writer.await;
    let snap = snapshot(&cfg.target.name, &statuses);
    let _ = tokio::task::spawn_blocking(move || write_json(&status_path, &snap)).await;
    drop(lock);
    match first_err {
        Some(e) => Err(e),
        None => {
            tracing::info!("target stopped");
            Ok(())
        }
    }
}

/// What `prepare` made ready for one group.
struct Prepared {
    name: String,
    group: GroupName,
    key: DataKey,
    key_epoch: u32,
    disks: Vec<DiskSpec>,
    watermark: Watermark,
    log_path: PathBuf,
    redo: redo::Redo,
    policy: retention::policy::Policy,
}

/// How long a starting target waits for its state directory's lock.
#[cfg(not(test))]
pub const STATE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Shorter in unit tests: a refusal after the wait is what they check, not its
/// length (the e2e tests run the real binary, with 10 s).
#[cfg(test)]
pub const STATE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Blocking start-up: state directory and its lock, per-group directories,
/// watermarks, keys and redo journals.
fn prepare(cfg: &TargetConfig) -> Result<(Flock<File>, Vec<Prepared>), TargetError> {
    let dir = &cfg.target.state_dir;
    // An offline `recover` holds the lock while it replays the redo journal
    // (seconds at most): a target started meanwhile waits for it rather than
    // exiting. Another running target still holds it after the wait.
    let lock = lockfile::lock_dir_waiting(dir, STATE_LOCK_WAIT).map_err(|e| match e {
        LockError::Io { path, source } => TargetError::StateIo { path, source },
        LockError::Locked { dir } => TargetError::Locked { dir },
    })?;
    let mut out = Vec::new();
    for g in &cfg.groups {
        out.push(prepare_group(cfg, g)?);
    }
    Ok((lock, out))
}

/// One group's start-up (the caller holds the state directory's lock).
fn prepare_group(cfg: &TargetConfig, g: &TargetGroup) -> Result<Prepared, TargetError> {
    let dir = &cfg.target.state_dir;
    let state_io = |path: &Path, source| TargetError::StateIo {
        path: path.to_path_buf(),
        source,
    };
    let group = GroupName::new(&g.name).map_err(|source| TargetError::GroupName {
        group: g.name.clone(),
        source: Box::new(source),
    })?;
    let mut disks = Vec::new();
    for d in &g.disks {
        let id = u16::try_from(d.id).map_err(|_| TargetError::DiskId {
            group: g.name.clone(),
            id: d.id,
        })?;
        disks.push(DiskSpec {
            id,
            path: d.path.clone(),
            format: d.format.image_format(),
        });
    }
    let gdir = dir.join(&g.name);
    crate::util::durable::create_dir_durable(&gdir).map_err(|e| state_io(&gdir, e))?;
    let watermark =
        Watermark::open(&gdir.join(WATERMARK_FILE)).map_err(|source| TargetError::Watermark {
            group: g.name.clone(),
            source: Box::new(source),
        })?;
    let key = DataKey::load(&g.key_file).map_err(|source| TargetError::Key {
        group: g.name.clone(),
        source: Box::new(source),
    })?;
    let (redo, _reset) =
        redo::Redo::open(&gdir, &g.name, watermark.get().pos.frame_no).map_err(|source| {
            TargetError::Redo {
                group: g.name.clone(),
                source: Box::new(source),
            }
        })?;
    Ok(Prepared {
        name: g.name.clone(),
        group,
        key,
        key_epoch: g.key_epoch,
        disks,
        watermark,
        log_path: gdir.join(APPLY_LOG),
        redo,
        policy: g.retention.policy(),
    })
}

/// What the apply thread of a prepared group needs, with the status and the
/// progress watch it publishes to. `stop` ends a pause (disk full).
fn apply_setup(
    cfg: &TargetConfig,
    p: Prepared,
    stop: Arc<AtomicBool>,
) -> Result<(ApplySetup, SharedStatus, watch::Receiver<Progress>), TargetError> {
    let mark = p.watermark.get();
    let status = SharedStatus::new(GroupStatus::new(
        &p.name,
        WatermarkStatus {
            frame_no: mark.pos.frame_no,
            last_seq: mark.pos.last_seq,
            time_us: mark.time_us,
        },
        mark.pos.frame_no == 0,
    ));
    let (progress_tx, progress_rx) = watch::channel(Progress {
        durable: mark,
        stall: None,
    });
    let opener = Opener::new(p.group, vec![(p.key_epoch, p.key.clone())]).map_err(|source| {
        TargetError::Key {
            group: p.name.clone(),
            source: Box::new(source),
        }
    })?;
    let engine = match cfg.target.engine {
        crate::config::Engine::Uring => Engine::Uring,
        crate::config::Engine::Sync => Engine::Sync,
    };
    let setup = ApplySetup {
        group: p.name,
        disks: p.disks,
        engine,
        batch_bytes: cfg.target.apply_batch_bytes(),
        direct_io: cfg.target.direct_io,
        watermark: p.watermark,
        log_path: p.log_path,
        status: status.clone(),
        progress: progress_tx,
        redo: p.redo,
        opener,
        stop,
        policy: p.policy,
        state_dir: cfg.target.state_dir.clone(),
    };
    Ok((setup, status, progress_rx))
}

/// Run one group's start-up without a relay and stop again: replay its redo
/// journal onto the replicas and answer the pins waiting for it (a `recover`
/// while no target runs). The caller holds the state directory's lock.
/// Blocking.
pub fn run_group_offline(cfg: &TargetConfig, group: &str) -> Result<(), TargetError> {
    let g =
        cfg.groups
            .iter()
            .find(|g| g.name == group)
            .ok_or_else(|| TargetError::UnknownGroup {
                group: group.to_string(),
            })?;
    let p = prepare_group(cfg, g)?;
    let (setup, _status, _progress) = apply_setup(cfg, p, Arc::new(AtomicBool::new(false)))?;
    // No frames will come: the thread replays, answers pins, and ends.
    let (_, rx) = crossbeam_channel::bounded::<apply::Opened>(1);
    let (thread, ready) = apply::spawn(setup, rx)?;
    let started = ready
        .blocking_recv()
        .unwrap_or(Err(TargetError::TaskFailed {
            group: group.to_string(),
            what: "apply thread",
        }));
    let _ = thread.join();
    started.map(|redo| redo.shutdown())
}

/// Start a group's apply thread and open pool, and build its session.
async fn start_group(
    cfg: &TargetConfig,
    p: Prepared,
    endpoint: &RelayEndpoint,
    shutdown: Shutdown,
) -> Result<GroupRuntime, TargetError> {
    let (group, name, key_epoch, key) = (p.group, p.name.clone(), p.key_epoch, p.key.clone());
    // Ends a pause (disk full) of the apply thread when the target stops.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        let mut sd = shutdown.clone();
        tokio::spawn(async move {
            sd.wait().await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let disks = p.disks.clone();
    let (setup, status, progress_rx) = apply_setup(cfg, p, stop)?;
    let (job_tx, job_rx) = crossbeam_channel::bounded(budget::BUDGET_FRAMES as usize);
    let (opened_tx, opened_rx) = crossbeam_channel::bounded(budget::BUDGET_FRAMES as usize);
    let (apply_thread, ready) = apply::spawn(setup, opened_rx)?;
    let mut threads = vec![apply_thread];
    let started = ready.await.unwrap_or(Err(TargetError::TaskFailed {
        group: name.clone(),
        what: "apply thread",
    }));
    let redo = match started {
        Ok(redo) => redo,
        Err(e) => {
            join_threads(threads).await;
            return Err(e);
        }
    };
    match open::spawn(
        group,
        &[(key_epoch, key.clone())],
        open::OPEN_THREADS,
        job_rx,
        opened_tx,
    ) {
        Ok(t) => threads.extend(t),
        Err(e) => {
            // The apply thread ends once every sender of its channel is gone.
            join_threads(threads).await;
            return Err(e);
        }
    }
    let digests = match digests::spawn(name.clone(), &key, disks, progress_rx.clone()) {
        Ok((service, thread)) => {
            threads.push(thread);
            service
        }
        Err(e) => {
            drop(job_tx);
            join_threads(threads).await;
            return Err(TargetError::TaskFailed {
                group: format!("{name} ({e})"),
                what: "digest thread",
            });
        }
    };
    Ok(GroupRuntime {
        session: GroupSession {
            group,
            name: cfg.target.name.clone(),
            endpoint: endpoint.clone(),
            status,
            budget: Budget::new(),
            jobs: Some(job_tx),
            redo,
            progress: progress_rx,
            shutdown,
            digests,
            relay_silence: std::time::Duration::from_millis(cfg.target.relay_silence_ms),
        },
        threads,
    })
}

async fn join_threads(threads: Vec<JoinHandle<()>>) {
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a target thread panicked");
            }
        }
    })
    .await;
}

fn snapshot(name: &str, groups: &[(SharedStatus, Arc<Budget>)]) -> TargetStatus {
    TargetStatus {
        role: "target".into(),
        name: name.to_string(),
        pid: std::process::id(),
        updated_us: now_us(),
        groups: groups
            .iter()
            .map(|(s, b)| {
                let mut g = s.snapshot();
                let (frames, bytes) = b.in_flight();
                g.in_flight_frames = frames;
                g.in_flight_bytes = bytes;
                g
            })
            .collect(),
    }
}

/// Write the status file every [`STATUS_INTERVAL`] until `stop` fires.
async fn status_writer(
    path: PathBuf,
    name: String,
    groups: Vec<(SharedStatus, Arc<Budget>)>,
    mut stop: Shutdown,
) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait() => return,
        }
        let snap = snapshot(&name, &groups);
        let p = path.clone();
        match tokio::task::spawn_blocking(move || write_json(&p, &snap)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), "cannot write the status file: {e}")
            }
            Err(_) => {}
        }
    }
}
