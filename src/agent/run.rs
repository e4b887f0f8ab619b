//! The agent process: for each group, the capture journal and source disks, the
//! frame pipeline, the bridge that hands sealed frames to the session in chain
//! order, the writer thread (initial copy, then the synthetic workload when
//! asked), and the session with the relay. Also the orderly stop: stop writing,
//! close the journal, drain every frame to the relay, persist the exact next
//! seq and frame number.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AO};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::control::{self, ControlSocket};
use super::frontends::{DiskRef, Frontends};
use super::outbox::{OutFrame, Outbox};
use super::pipeline::{Pipeline, PipelineConfig, PipelineError, Reorder, SealOutput};
use super::session::{Session, SessionEnd, SessionError, agent_hello, connect_with_retry};
use super::state::{AgentState, StartPoint};
use super::status::{AgentStatus, DiskStatus, GroupInfo, lock};
use super::workload::{self, WorkloadReport, WorkloadSpec};
use crate::capture::dirtylog::DirtyLogError;
use crate::capture::drain::{CaptureWorkers, Checkpoint, DrainControl};
use crate::capture::journal::{CaptureConfig, CaptureError, CaptureJournal};
use crate::capture::modes::Mode;
use crate::capture::protected::{ProtectedDisk, ProtectedError};
use crate::config::{AgentConfig, AgentGroup, ResyncMode};
use crate::error::{Classify, ErrorKind};
use crate::frame::{DataKey, FrameError, GroupName, NoteReason};
use crate::resync::{BlockSize, DigestClient};
use crate::target::gate::ChainPos;
use crate::transport::client::{Hello, RelayEndpoint};
use crate::transport::tls::{self, TlsError};
use crate::util::lockfile::{self, LockError};
use crate::util::shutdown::{self, Shutdown};
use crate::util::statusfile::{self, STATUS_FILE, STATUS_INTERVAL};

/// How long an orderly stop waits for the relay to acknowledge what is queued.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Seal threads per group.
pub const SEAL_WORKERS: usize = 2;

/// Options of an agent run beyond its config file.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Run this synthetic workload on the disks of the first group (spread
    /// over all of them).
    pub workload: Option<WorkloadSpec>,
    /// Stop by itself once the workload is done and acknowledged by the relay.
    pub exit_after_workload: bool,
    /// Append the workload's log here (`seq disk offset len index` per write,
    /// `seq tag name` per tag; see [`workload`]).
    pub workload_log: Option<PathBuf>,
}

/// Why the agent could not run, or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// TLS files unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// State directory locked or unusable.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A group's persisted state could not be read or written.
    #[error("group {group}: agent state in {dir}: {source}")]
    State {
        /// Group.
        group: String,
        /// State directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A data key or group name is unusable.
    #[error("group {group}: {source}")]
    Frame {
        /// Group.
        group: String,
        /// Cause.
        source: Box<FrameError>,
    },
    /// A source disk could not be opened.
    #[error("group {group}: {source}")]
    Source {
        /// Group.
        group: String,
        /// Cause.
        source: ProtectedError,
    },
    /// Capture could not be set up.
    #[error("group {group}: {source}")]
    Capture {
        /// Group.
        group: String,
        /// Cause.
        source: CaptureError,
    },
    /// The pipeline could not start.
    #[error("group {group}: {source}")]
    Pipeline {
        /// Group.
        group: String,
        /// Cause.
        source: Box<PipelineError>,
    },
    /// The session failed for good.
    #[error(transparent)]
    Session(Box<SessionError>),
    /// A frontend could not start.
    #[error(transparent)]
    Frontend(#[from] super::frontends::FrontendError),
    /// A thread or task failed.
    #[error("group {group}: {what}")]
    Internal {
        /// Group.
        group: String,
        /// What failed.
        what: String,
    },
}

impl Classify for AgentError {
    fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Tls(e) => e.kind(),
            AgentError::Lock(e) => e.kind(),
            AgentError::State { .. } => ErrorKind::Io,
            AgentError::Frame { source, .. } => source.kind(),
            AgentError::Source { source, .. } => source.kind(),
            AgentError::Capture { source, .. } => source.kind(),
            AgentError::Pipeline { .. } => ErrorKind::Config,
            AgentError::Session(e) => e.kind(),
            AgentError::Frontend(e) => e.kind(),
            AgentError::Internal { .. } => ErrorKind::Io,
        }
    }
}

/// One group, ready to run.
struct Prepared {
    cfg: AgentGroup,
    name: GroupName,
    key: DataKey,
    state: Arc<AgentState>,
    start: StartPoint,
    journal: Arc<CaptureJournal>,
    disks: Vec<Arc<ProtectedDisk>>,
    info: Arc<GroupInfo>,
    dirty_flush: Duration,
    pipeline_nice: i32,
    /// Longest silence of the relay while frames wait for its ack.
    relay_silence: Duration,
    /// Sealed digest requests for the session (checksum resync).
    resync_out: Option<mpsc::Receiver<Vec<u8>>>,
}

/// What every group shares of the `[agent]` table.
struct CaptureSetup {
    state_dir: PathBuf,
    spill_dir: PathBuf,
    memory: usize,
    spill: u64,
    bitmap_after: Duration,
    policy: crate::capture::journal::Policy,
    dirty_flush: Duration,
    pipeline_nice: i32,
    relay_silence: Duration,
}

fn prepare(cfg: &AgentGroup, setup: &CaptureSetup) -> Result<Prepared, AgentError> {
    let group = cfg.name.clone();
    let state_dir = &setup.state_dir;
    let fe = |source| AgentError::Frame {
        group: group.clone(),
        source: Box::new(source),
    };
    let name = GroupName::new(&cfg.name).map_err(fe)?;
    let key = DataKey::load(&cfg.key_file).map_err(fe)?;
    let (state, start) =
        AgentState::open(state_dir, &cfg.name).map_err(|source| AgentError::State {
            group: group.clone(),
            dir: state_dir.to_path_buf(),
            source,
        })?;
    let state = Arc::new(state);
    if !start.was_clean {
        tracing::warn!(
            group = %group,
            seq_next = start.seq_next,
            "the previous run did not stop in order: seqs continue above everything it may have used; each disk's dirty log says what to copy again"
        );
    }
    let reserver_state = state.clone();
    let journal = CaptureJournal::new(
        CaptureConfig {
            group: cfg.name.clone(),
            memory_budget: setup.memory,
            spill_dir: Some(setup.spill_dir.join(&cfg.name)),
            spill_budget: setup.spill,
            bitmap_after: setup.bitmap_after,
            policy: setup.policy,
        },
        start.seq_next,
        Box::new(move |from| reserver_state.reserve_seqs(from)),
    )
    .map_err(|source| AgentError::Capture {
        group: group.clone(),
        source,
    })?;
    let journal = Arc::new(journal);
    let mut disks = Vec::new();
    let mut views = Vec::new();
    for d in &cfg.disks {
        // Config validation keeps ids within 16 bits.
        let id = u16::try_from(d.id).map_err(|_| AgentError::Internal {
            group: group.clone(),
            what: format!("disk id {} does not fit 16 bits", d.id),
        })?;
        let (disk, report) =
            ProtectedDisk::open(id, &d.path, journal.clone(), state_dir, d.initial_copy).map_err(
                |source| AgentError::Source {
                    group: group.clone(),
                    source,
                },
            )?;
        tracing::info!(group = %group, disk = id, path = %d.path.display(), pending_bytes = report.pending_bytes, "disk opened: {}", report.reason);
        views.push(DiskStatus {
            id,
            path: d.path.clone(),
            size: crate::frontend::BlockIo::size(&disk),
            frontends: Vec::new(),
            start_reason: report.reason,
            start_pending_bytes: report.pending_bytes,
            capture: Default::default(),
            activity_log: (0, 0),
            grown_to: None,
        });
        disks.push(Arc::new(disk));
    }
    // Announce every disk's size before any of its data, so the target can check
    // (or create) the replica.
    for d in &disks {
        journal
            .record_disk_size(d.id(), crate::frontend::BlockIo::size(&**d))
            .map_err(|source| AgentError::Capture {
                group: group.clone(),
                source,
            })?;
    }
    let (digests, resync_out) = match cfg.resync {
        ResyncMode::Checksum => {
            let bs = BlockSize::new(cfg.resync_block_kib.saturating_mul(1024)).map_err(|e| {
                AgentError::Internal {
                    group: group.clone(),
                    what: format!("resync_block_kib: {e}"),
                }
            })?;
            let (c, rx) = DigestClient::new(&cfg.name, &key, bs);
            (Some(Arc::new(c)), Some(rx))
        }
        ResyncMode::Copy => (None, None),
    };
    let info = Arc::new(GroupInfo::new(
        cfg.name.clone(),
        journal.clone(),
        views,
        disks.clone(),
        Arc::new(DrainControl::new(digests, cfg.resync_max_mib_s << 20)),
    ));
    Ok(Prepared {
        cfg: cfg.clone(),
        name,
        key,
        state,
        start,
        journal,
        disks,
        info,
        dirty_flush: setup.dirty_flush,
        pipeline_nice: setup.pipeline_nice,
        relay_silence: setup.relay_silence,
        resync_out,
    })
}

/// Run the agent until `shutdown` fires (or, with `exit_after_workload`, until
/// the workload is done and durable at the relay).
pub async fn run(
    cfg: AgentConfig,
    opts: AgentOptions,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let tls = tls::client_config(&cfg.tls.files())?;
    let _lock = lockfile::lock_dir(&cfg.agent.state_dir)?;
    let endpoint = RelayEndpoint {
        addr: cfg.agent.relay.clone(),
        server_name: cfg.agent.relay_name.clone(),
        tls,
    };
    let n = cfg.groups.len().max(1) as u64;
    let setup = Arc::new(CaptureSetup {
        state_dir: cfg.agent.state_dir.clone(),
        spill_dir: cfg.agent.spill_dir(),
        memory: (cfg.agent.capture_budget_bytes() / n) as usize,
        spill: cfg.agent.spill_budget_bytes() / n,
        bitmap_after: Duration::from_millis(cfg.agent.bitmap_after_ms),
        policy: cfg.agent.capture_policy,
        dirty_flush: Duration::from_millis(cfg.agent.dirty_flush_ms),
        pipeline_nice: cfg.agent.pipeline_nice as i32,
        relay_silence: Duration::from_millis(cfg.agent.relay_silence_ms),
    });
    let mut prepared = Vec::new();
    for g in &cfg.groups {
        let setup = setup.clone();
        let g2 = g.clone();
        let p = tokio::task::spawn_blocking(move || prepare(&g2, &setup))
            .await
            .map_err(|e| AgentError::Internal {
                group: g.name.clone(),
                what: e.to_string(),
            })??;
        prepared.push(p);
    }
    let infos: Vec<Arc<GroupInfo>> = prepared.iter().map(|p| p.info.clone()).collect();
    // Local tools (`tidemark agent tag`) reach the journals from here on; the
    // socket is removed when `control` is dropped (orderly stop, or an error).
    // Without it the agent still protects its disks: only tags are unavailable.
    let handler = control::agent_handler(prepared.iter().map(|p| p.info.clone()).collect());
    let control = match ControlSocket::start(&cfg.agent.state_dir, handler) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!("{e}; `tidemark agent tag` cannot reach this agent");
            None
        }
    };
    let status_path = cfg.agent.state_dir.join(STATUS_FILE);
    let write_status = {
        let infos = infos.clone();
        let name = cfg.agent.name.clone();
        let path = status_path.clone();
        move || {
            let st = AgentStatus {
                role: "agent".into(),
                name: name.clone(),
                pid: std::process::id(),
                // Taken before the snapshot: everything acknowledged before
                // this time is in it.
                updated_us: crate::util::time::now_us(),
                groups: infos.iter().map(|i| i.snapshot()).collect(),
            };
            if let Err(e) = statusfile::write_json(&path, &st) {
                tracing::warn!(path = %path.display(), "cannot write status: {e}");
            }
        }
    };
    write_status();
    let (status_stop, mut status_sd) = shutdown::channel();
    let status_task = {
        let w = write_status.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_INTERVAL);
            loop {
                tokio::select! {
                    _ = status_sd.wait() => break,
                    _ = tick.tick() => {
                        let w = w.clone();
                        let _ = tokio::task::spawn_blocking(w).await;
                    }
                }
            }
        })
    };

    // Frontends: every disk is open and announced, so workloads may write now.
    let refs: Vec<DiskRef> = prepared
        .iter()
        .flat_map(|p| {
            p.disks.iter().map(|d| DiskRef {
                group: p.cfg.name.clone(),
                id: d.id(),
                disk: d.clone(),
                info: p.info.clone(),
            })
        })
        .collect();
    let frontends = match Frontends::start(&cfg, &refs).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("cannot start the frontends: {e}");
            let groups: Vec<_> = prepared
                .iter()
                .map(|p| (p.journal.clone(), p.disks.clone()))
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                for (j, d) in groups {
                    j.close();
                    close_disks(&j, &d);
                }
            })
            .await;
            status_stop.fire();
            let _ = status_task.await;
            return Err(AgentError::Frontend(e));
        }
    };
    drop(refs);

    // Stop order: the frontends first (no more writes), then the groups.
    // `self_stop` is the workload's own stop (`exit_after_workload`), `end`
    // covers groups that all ended by themselves.
    let (self_stop, mut self_sd) = shutdown::channel();
    let (end, mut end_sd) = shutdown::channel();
    let (groups_stop, groups_sd) = shutdown::channel();
    let stopper = {
        let mut outer = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = outer.wait() => {}
                _ = self_sd.wait() => {}
                _ = end_sd.wait() => {}
            }
            frontends.stop().await;
            groups_stop.fire();
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in prepared.into_iter().enumerate() {
        let workload = if i == 0 {
            opts.workload
                .clone()
                .map(|w| (w, opts.workload_log.clone()))
        } else {
            None
        };
        let endpoint = endpoint.clone();
        let agent_name = cfg.agent.name.clone();
        let sd = groups_sd.clone();
        tasks.spawn(async move {
            let name = p.cfg.name.clone();
            let r = run_group(p, endpoint, agent_name, workload, sd).await;
            (name, r)
        });
    }
    let mut first_err = None;
    let mut any_ok = false;
    let mut wait_workload = opts.exit_after_workload && opts.workload.is_some();
    loop {
        tokio::select! {
            r = tasks.join_next() => {
                let Some(r) = r else { break };
                match r {
                    Ok((_, Ok(()))) => any_ok = true,
                    Ok((group, Err(e))) => {
                        tracing::error!(group = %group, "group stopped: {e}");
                        first_err.get_or_insert(e);
                    }
                    Err(e) => {
                        first_err.get_or_insert(AgentError::Internal { group: "?".into(), what: e.to_string() });
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if wait_workload => {
                if let Some(info) = infos.first() {
                    let w = lock(&info.workload_progress).clone();
                    let acked = lock(&info.acked).last_seq;
                    if w.done && acked >= w.last_seq {
                        tracing::info!(last_seq = w.last_seq, "workload done and acknowledged by the relay; stopping");
                        self_stop.fire();
                        wait_workload = false;
                    }
                }
            }
        }
    }
    end.fire();
    let _ = stopper.await;
    drop(control);
    status_stop.fire();
    let _ = status_task.await;
    write_status();
    match first_err {
        Some(e) if !any_ok => Err(e),
        Some(e) => {
            tracing::error!("the agent stopped; at least one group had failed: {e}");
            Err(e)
        }
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_group(
    mut p: Prepared,
    endpoint: RelayEndpoint,
    agent_name: String,
    workload: Option<(WorkloadSpec, Option<PathBuf>)>,
    stop: Shutdown,
) -> Result<(), AgentError> {
    let group = p.cfg.name.clone();
    let info = p.info.clone();
    let internal = |what: String| AgentError::Internal {
        group: group.clone(),
        what,
    };

    // Capture runs from here on, whatever the relay does: the drainer copies
    // dirty regions, the keeper ticks the modes, the roller rolls the dirty
    // logs over.
    let sink = {
        let info = info.clone();
        Box::new(move |e: String| info.set_error(e))
    };
    let checkpoint = acked_checkpoint(info.clone(), p.state.clone());
    let workers = CaptureWorkers::start(
        p.journal.clone(),
        p.disks.clone(),
        info.drain.clone(),
        p.dirty_flush,
        p.pipeline_nice,
        sink,
        checkpoint,
    )
    .map_err(|e| internal(format!("cannot start capture workers: {e}")))?;

    // The writer thread: the synthetic workload, when asked for.
    let stop_writer = Arc::new(AtomicBool::new(false));
    if workload.is_some() {
        *lock(&info.workload) = Some(WorkloadReport::default());
    }
    let writer = {
        let disks = p.disks.clone();
        let journal = p.journal.clone();
        let info = info.clone();
        let stop = stop_writer.clone();
        let group = group.clone();
        std::thread::Builder::new()
            .name(format!("writer-{group}"))
            .spawn(move || writer_thread(&group, &disks, &journal, &info, workload, &stop))
            .map_err(|e| internal(format!("cannot start writer thread: {e}")))?
    };

    // Scheduled verifies, when configured.
    let verifier = if p.cfg.verify_every_minutes > 0 {
        Some(
            super::verify::schedule(
                info.clone(),
                Duration::from_secs(p.cfg.verify_every_minutes * 60),
                p.cfg.verify_repair,
                stop_writer.clone(),
            )
            .map_err(|e| internal(format!("cannot start the verify thread: {e}")))?,
        )
    } else {
        None
    };

    let mut stop_for_connect = stop.clone();
    let hello = agent_hello(&agent_name, &group);
    let first = connect_with_retry(&endpoint, &hello, &info, &mut stop_for_connect).await;
    let first = match first {
        Ok(Some(c)) => c,
        other => {
            // Shutdown before the relay was ever reached, or a fatal refusal:
            // nothing was sealed; what was captured stays in the dirty logs.
            stop_writer.store(true, AO::Relaxed);
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            if let Some(v) = verifier {
                let _ = tokio::task::spawn_blocking(move || v.join()).await;
            }
            let (journal, disks) = (p.journal.clone(), p.disks.clone());
            let _ = tokio::task::spawn_blocking(move || {
                workers.stop();
                journal.close();
                close_disks(&journal, &disks);
            })
            .await;
            return match other {
                Err(e) => Err(AgentError::Session(Box::new(e))),
                _ => {
                    tracing::warn!(group = %group, "stopped before the relay could be reached; the dirty logs keep what was captured for the next start");
                    Ok(())
                }
            };
        }
    };
    // One stretch of the chain per pass: normally the only one. When the
    // relay loses frames it had acknowledged while this agent runs, the
    // session ends with a chain break; the pipeline is stopped, every disk
    // becomes pending, and the next pass starts a new stretch from the
    // relay's head (a REBASE frame), without stopping capture.
    let mut conn = first;
    let mut acked_floor = p.start.acked_seq;
    let mut frame_floor = p.start.frame_next;
    let mut resync_out = p.resync_out.take();
    // Set once a chain break marked every disk pending: the next stretch
    // starts with a REBASE frame whatever the relay's head says.
    let mut rebased = false;
    let mut first_pass = true;
    let (stretch, early) = loop {
        let head = conn.1.head;
        let gap = acked_floor > head.last_seq;
        // Frames or seqs this agent never numbered (both come from blocks
        // reserved durably before use): its state is not the one that wrote
        // the group's chain, so neither is, for certain, its disks' content.
        // On the first pass every seq from the start's is this run's and none
        // was sent yet; later, only frame numbers tell (this run sent seqs).
        let first_seq = first_pass.then_some(p.start.seq_next);
        first_pass = false;
        let foreign = head.frame_no >= frame_floor || first_seq.is_some_and(|s| head.last_seq >= s);
        if foreign {
            let ours = match first_seq {
                Some(s) => format!("this run's first seq {s}, next frame {frame_floor}"),
                None => format!("next frame {frame_floor}"),
            };
            let found = format!(
                "the relay holds group {group} through seq {} (frame {}), beyond anything this agent numbered ({ours}): its state directory was lost or restored from an older copy, or another agent wrote this group",
                head.last_seq, head.frame_no
            );
            let why = format!("{found}; every disk is compared with the replica again");
            chain_gap(&p, &why, head.last_seq + 1).await?;
        } else if gap && !rebased {
            let found = format!(
                "the relay holds group {group} only through seq {} (frame {}) but had acknowledged through seq {acked_floor}",
                head.last_seq, head.frame_no
            );
            chain_gap(&p, &lost_frames(&found), 0).await?;
        }
        let rebase = gap || foreign || rebased;
        let frame_next = frame_floor.max(head.frame_no + 1);
        *lock(&info.acked) = head;
        let (mut stretch, session) = start_stretch(
            &p,
            (&endpoint, &hello),
            head,
            frame_next,
            rebase,
            resync_out.take(),
        )?;
        let mut task = tokio::spawn(session.run(conn));
        let mut stop_wait = stop.clone();
        let early = tokio::select! {
            _ = stop_wait.wait() => None,
            r = &mut task => Some(r),
        };
        if early.is_none() {
            stretch.task = Some(task);
        }
        match early {
            Some(Ok((Err(SessionError::ChainBreak { source, .. }), back))) if !stop.is_fired() => {
                resync_out = back;
                tracing::warn!(group = %group, "{source}");
                acked_floor = acked_floor.max(lock(&info.acked).last_seq);
                frame_floor = stretch.next_frame.load(AO::Relaxed);
                stretch.stop_pipeline().await;
                // At once, not after the reconnect: the entries of the broken
                // stretch are freed and capture degrades to dirty bits
                // instead of filling the journal while the relay is away.
                let found = format!(
                    "the relay holds group {group} only up to frame {} but had acknowledged through seq {acked_floor}",
                    source.head
                );
                chain_gap(&p, &lost_frames(&found), 0).await?;
                rebased = true;
                match connect_with_retry(&endpoint, &hello, &info, &mut stop_for_connect).await {
                    Ok(Some(c)) => {
                        conn = c;
                        continue;
                    }
                    Ok(None) => break (None, None),
                    Err(e) => break (None, Some(Ok((Err(e), None)))),
                }
            }
            early => break (Some(stretch), early),
        }
    };
    // Orderly stop: no more writes, stop copying, close the journal so the
    // batcher flushes the rest into frames, then let the session drain them to
    // the relay.
    stop_writer.store(true, AO::Relaxed);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    if let Some(v) = verifier {
        let _ = tokio::task::spawn_blocking(move || v.join()).await;
    }
    let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    p.journal.close();
    let (session_result, next_frame, seal_failed) = match stretch {
        Some(mut st) => {
            st.drain_trigger.fire();
            let r = match (early, st.task.take()) {
                (Some(r), _) => r,
                (None, Some(t)) => t.await,
                (None, None) => Ok((Ok(SessionEnd::DrainTimeout), None)),
            }
            .map_err(|e| internal(format!("session task failed: {e}")))?;
            st.stop_pipeline().await;
            (
                r.0,
                st.next_frame.load(AO::Relaxed),
                lock(&st.seal_failed).clone(),
            )
        }
        None => (
            match early {
                Some(Ok((r, _))) => r,
                _ => Ok(SessionEnd::DrainTimeout),
            },
            frame_floor,
            None,
        ),
    };
    {
        // How far the relay acknowledged, before the last snapshots rely on
        // it (a relay that comes back holding less is then found at start).
        let (st, acked) = (p.state.clone(), lock(&info.acked).last_seq);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || st.note_acked(acked)).await {
            tracing::error!(group = %group, "cannot record the acknowledged seq: {e}");
        }
        let (journal, disks) = (p.journal.clone(), p.disks.clone());
        let _ = tokio::task::spawn_blocking(move || close_disks(&journal, &disks)).await;
    }
    if let Some(why) = seal_failed {
        return Err(internal(format!("sealing failed: {why}")));
    }
    let end = session_result.map_err(|e| AgentError::Session(Box::new(e)))?;
    let js = p.journal.stats();
    if end == SessionEnd::Drained && js.entries == 0 {
        let next_seq = p.journal.next_seq();
        let nf = next_frame;
        let st = p.state.clone();
        tokio::task::spawn_blocking(move || st.close_clean(next_seq, nf))
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|source| AgentError::State {
                group: group.clone(),
                dir: PathBuf::new(),
                source,
            })?;
        tracing::info!(group = %group, next_seq, next_frame = nf, "stopped in order: every captured write is durable at the relay");
    } else {
        tracing::warn!(
            group = %group,
            unacknowledged_entries = js.entries,
            unacknowledged_frames = lock(&info.outbox).0,
            ?end,
            "stopped with writes the relay has not acknowledged; their regions are kept in the dirty logs for the next start"
        );
    }
    Ok(())
}

/// Before each dirty-log snapshot: record how far the relay has acknowledged
/// (read after the snapshot was taken, so it covers every trim the snapshot
/// reflects).
fn acked_checkpoint(info: Arc<GroupInfo>, state: Arc<AgentState>) -> Checkpoint {
    Box::new(move || {
        let acked = lock(&info.acked).last_seq;
        state.note_acked(acked).map_err(|source| DirtyLogError::Io {
            path: state.path().to_path_buf(),
            op: "record the acknowledged seq",
            source,
        })
    })
}

/// Why a chain gap is one: the relay lost frames it had acknowledged.
fn lost_frames(found: &str) -> String {
    format!(
        "{found}; the frames between are lost, so every disk is compared with the replica again"
    )
}

/// The relay's chain does not continue this agent's: it lost frames it had
/// acknowledged (the relay holds the group only up to a head below the seq it
/// had acknowledged), or it holds frames this agent never numbered. Redelivery
/// cannot close that. Every disk becomes pending in full (compared by
/// checksum, so only what differs travels), and its snapshot is persisted
/// before any frame of the new stretch goes out, so a crash cannot forget it;
/// the first frame is then marked REBASE (docs/RESYNC.md, "A gap in the
/// chain").
///
/// `seq_floor`: the first seq the new stretch may use (0: no floor).
///
/// Fails (and the group stops, to find the gap again at its next start) when
/// the seqs above `seq_floor` cannot be reserved or a disk's dirty log cannot
/// be persisted: no frame may go out before the full compare is durable.
async fn chain_gap(p: &Prepared, what: &str, seq_floor: u64) -> Result<(), AgentError> {
    let group = p.cfg.name.to_string();
    let why = format!("chain gap: {what}");
    tracing::warn!(group = %group, "{why}");
    let dropped = p
        .journal
        .rebase(NoteReason::ChainGap, &why, seq_floor)
        .map_err(|source| AgentError::Capture {
            group: group.clone(),
            source,
        })?;
    let disks = p.disks.clone();
    let persisted = tokio::task::spawn_blocking(move || {
        disks.iter().try_for_each(|d| {
            d.rollover(&|| Ok(()))
                .map_err(|source| ProtectedError::DirtyLog {
                    path: d.path().to_path_buf(),
                    source,
                })
        })
    })
    .await
    .map_err(|e| AgentError::Internal {
        group: group.clone(),
        what: format!("dirty-log task failed: {e}"),
    })?;
    persisted.map_err(|source| AgentError::Source {
        group: group.clone(),
        source,
    })?;
    tracing::info!(group = %group, dropped_entries = dropped, "every disk is pending; the next frame starts a new stretch of the chain");
    Ok(())
}

/// The session task of a stretch: its result and the resync channel back.
type SessionTask = tokio::task::JoinHandle<(
    Result<SessionEnd, SessionError>,
    Option<mpsc::Receiver<Vec<u8>>>,
)>;

/// One stretch of the group's chain: the seal pipeline, the bridge back into
/// chain order, and what the session needs to drain at the end.
struct Stretch {
    pipeline: Option<Pipeline>,
    bridge: Option<std::thread::JoinHandle<()>>,
    task: Option<SessionTask>,
    drain_trigger: shutdown::Trigger,
    next_frame: Arc<AtomicU64>,
    seal_failed: Arc<Mutex<Option<String>>>,
}

impl Stretch {
    /// Stop the batcher and seal threads and the bridge (frames still in them
    /// are dropped: the caller either drained the session first or marks
    /// every disk pending).
    async fn stop_pipeline(&mut self) {
        if let Some(pipeline) = self.pipeline.take() {
            let _ = tokio::task::spawn_blocking(move || pipeline.stop()).await;
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = tokio::task::spawn_blocking(move || bridge.join()).await;
        }
    }
}

/// Start a stretch chained after `head`, numbered from `frame_next` (its first
/// frame marked REBASE when `rebase`), and the session that sends it.
fn start_stretch(
    p: &Prepared,
    (endpoint, hello): (&RelayEndpoint, &Hello),
    head: ChainPos,
    frame_next: u64,
    rebase: bool,
    resync_out: Option<mpsc::Receiver<Vec<u8>>>,
) -> Result<(Stretch, Session), AgentError> {
    let group = &p.cfg.name;
    let (seal_tx, seal_rx) = crossbeam_channel::bounded::<SealOutput>(64);
    let reserve_state = p.state.clone();
    let pipeline = Pipeline::start(
        p.journal.clone(),
        &p.key,
        PipelineConfig {
            group: p.name,
            key_epoch: p.cfg.key_epoch,
            zstd_level: p.cfg.zstd_level,
            frame_max_bytes: p.cfg.frame_max_bytes() as usize,
            linger: p.cfg.frame_linger(),
            heartbeat: p.cfg.heartbeat(),
            workers: SEAL_WORKERS,
            max_jobs: SEAL_WORKERS * 2,
            nice: p.pipeline_nice,
            rebase,
        },
        head,
        frame_next,
        Box::new(move |f| reserve_state.reserve_frames(f)),
        seal_tx,
    )
    .map_err(|source| AgentError::Pipeline {
        group: group.clone(),
        source: Box::new(source),
    })?;
    let (frames_tx, frames_rx) = mpsc::channel::<OutFrame>(4);
    let next_frame = Arc::new(AtomicU64::new(frame_next));
    let seal_failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let bridge = {
        let nice = p.pipeline_nice;
        let returner = pipeline.permit_returner();
        let info = p.info.clone();
        let next_frame = next_frame.clone();
        let failed = seal_failed.clone();
        std::thread::Builder::new()
            .name(format!("bridge-{group}"))
            .spawn(move || {
                crate::util::priority::lower_this_thread(nice);
                bridge_thread(seal_rx, returner, frames_tx, &info, &next_frame, &failed)
            })
            .map_err(|e| AgentError::Internal {
                group: group.clone(),
                what: format!("cannot start bridge thread: {e}"),
            })?
    };
    let (drain_trigger, drain) = shutdown::channel();
    let session = Session {
        info: p.info.clone(),
        endpoint: endpoint.clone(),
        hello: hello.clone(),
        frames: frames_rx,
        outbox: Outbox::new(
            p.cfg.window_frames as usize,
            p.cfg.window_bytes() as usize,
            head,
        ),
        max_frames: p.cfg.window_frames as usize,
        max_bytes: p.cfg.window_bytes() as usize,
        drain,
        drain_timeout: DRAIN_TIMEOUT,
        silence_limit: p.relay_silence,
        resync_out,
    };
    Ok((
        Stretch {
            pipeline: Some(pipeline),
            bridge: Some(bridge),
            task: None,
            drain_trigger,
            next_frame,
            seal_failed,
        },
        session,
    ))
}

/// Persist each disk's remaining dirty regions as a clean snapshot (the journal
/// is closed: nothing writes any more).
fn close_disks(journal: &CaptureJournal, disks: &[Arc<ProtectedDisk>]) {
    for d in disks {
        d.shut();
        match d.close_clean() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                group = journal.group(),
                disk = d.id(),
                bytes = n,
                "regions left to copy at the next start"
            ),
            Err(e) => tracing::error!(
                group = journal.group(),
                disk = d.id(),
                "cannot persist the dirty log at stop (the next start resyncs from the activity log): {e}"
            ),
        }
    }
}

/// The synthetic workload, over the group's disks, when one is asked for.
/// Once it is done, its last seq is the journal's last one after every dirty
/// region was copied (so the replica equals the source once that seq is
/// applied).
fn writer_thread(
    group: &str,
    disks: &[Arc<ProtectedDisk>],
    journal: &CaptureJournal,
    info: &GroupInfo,
    workload: Option<(WorkloadSpec, Option<PathBuf>)>,
    stop: &AtomicBool,
) {
    let Some((spec, log)) = workload else { return };
    tracing::info!(
        group,
        disks = disks.len(),
        ?spec,
        log = ?log,
        "synthetic workload starting"
    );
    let r = workload::run(disks, &spec, log.as_deref(), stop, &info.workload_progress);
    let mut report = match r {
        Ok(r) => {
            tracing::info!(
                group,
                writes = r.writes,
                bytes = r.bytes,
                seconds = r.seconds,
                "synthetic workload done"
            );
            r
        }
        Err(e) => {
            tracing::error!(group, "synthetic workload failed: {e}");
            info.set_error(e.to_string());
            let mut r = lock(&info.workload_progress).clone();
            r.error = Some(e.to_string());
            r
        }
    };
    // Wait (bounded by stop) for every dirty region to be copied.
    while journal.mode() != Mode::Data && !stop.load(AO::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    report.last_seq = report.last_seq.max(journal.next_seq().saturating_sub(1));
    report.done = true;
    *lock(&info.workload_progress) = report;
}

/// Sealed frames back into chain order, onto the session's channel.
fn bridge_thread(
    seal_rx: crossbeam_channel::Receiver<SealOutput>,
    permits: crossbeam_channel::Sender<()>,
    frames: mpsc::Sender<OutFrame>,
    info: &GroupInfo,
    next_frame: &AtomicU64,
    failed: &Mutex<Option<String>>,
) {
    let mut reorder = Reorder::default();
    for out in seal_rx {
        reorder.push(out.index, out.result);
        while let Some(r) = reorder.pop() {
            let _ = permits.try_send(());
            let sf = match r {
                Ok(sf) => sf,
                Err(e) => {
                    tracing::error!(group = %info.name, "sealing a frame failed: {e}");
                    *lock(failed) = Some(e.to_string());
                    info.set_error(e.to_string());
                    return;
                }
            };
            let h = sf.header;
            info.frames_sealed.fetch_add(1, AO::Relaxed);
            if h.heartbeat {
                info.heartbeats.fetch_add(1, AO::Relaxed);
            }
            info.plain_bytes
                .fetch_add(u64::from(h.plain_len), AO::Relaxed);
            info.stored_bytes
                .fetch_add(sf.bytes.len() as u64, AO::Relaxed);
            next_frame.store(h.frame_no + 1, AO::Relaxed);
            let f = OutFrame {
                frame_no: h.frame_no,
                prev_frame_no: h.prev_frame_no,
                last_seq: h.last_seq,
                bytes: Arc::new(sf.bytes),
            };
            if frames.blocking_send(f).is_err() {
                return;
            }
        }
    }
}
