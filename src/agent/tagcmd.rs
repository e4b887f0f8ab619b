//! `tidemark agent tag`: make an application-consistent point and have the
//! running agent record a tag at it.
//!
//! In this (the CLI's) process, in order: run the pre-hook (if configured;
//! a non-zero exit refuses the tag), freeze each `--freeze` mount point with
//! the FIFREEZE ioctl ([`crate::util::fsfreeze`]), send the `tag` request over
//! the control socket, then **always** thaw every frozen mount point (also when
//! the request fails, times out, or SIGINT/SIGTERM/SIGHUP arrives: those are
//! caught for the whole command, so they end it only after the thaw), then the
//! post-hook (always, when the pre-hook ran). The frozen period is bounded by
//! `timeout`: past it the command thaws and fails, and the request carries a
//! deadline before that instant, so the agent never records the tag after the
//! thaw. Each hook is bounded by `timeout` too (killed past it).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::control::{self, ControlError, Request, Response, TagRequest};
use crate::error::{Classify, ErrorKind};
use crate::frame::{TAG_APP_CONSISTENT, check_tag_name};
use crate::util::fsfreeze::{self, Frozen};
use crate::util::time::now_us;

/// What to tag and how.
#[derive(Debug, Clone)]
pub struct TagOptions {
    /// The agent's control socket.
    pub socket: PathBuf,
    /// The group.
    pub group: String,
    /// The tag's name.
    pub name: String,
    /// Mount points to freeze around the tag.
    pub freeze: Vec<PathBuf>,
    /// Bound on the frozen period (and on each hook).
    pub timeout: Duration,
    /// Run before freezing; gets the name and mount points.
    pub pre_hook: Option<PathBuf>,
    /// Run at the end whenever the pre-hook ran.
    pub post_hook: Option<PathBuf>,
}

/// Why a tag was not made.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    /// The name breaks the tag naming rules.
    #[error("invalid tag name {name:?}: {detail}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// Signal handling or the runtime could not be set up.
    #[error("cannot set up: {0}")]
    Setup(std::io::Error),
    /// A hook could not run, failed or timed out.
    #[error("{phase}-hook {path}: {detail}")]
    Hook {
        /// "pre" or "post".
        phase: &'static str,
        /// The hook.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// A mount point could not be frozen.
    #[error("cannot freeze {path}: {source}")]
    Freeze {
        /// The mount point.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The control request failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The agent refused the tag.
    #[error("the agent refused the tag: {error}")]
    Refused {
        /// Its reason.
        error: String,
        /// Its error class.
        kind: String,
    },
    /// The frozen period ran past its bound.
    #[error("no answer from the agent within the {0:?} freeze timeout; thawed, no tag")]
    Timeout(Duration),
    /// A signal ended the command (after thawing).
    #[error("interrupted by {0}; thawed, no tag")]
    Interrupted(&'static str),
    /// Thawing failed: the file systems named may still be frozen.
    #[error(
        "THAW FAILED, still frozen: {list} (run `fsfreeze -u` on each){}",
        after.as_ref().map(|e| format!("; the tag itself: {e}")).unwrap_or_default()
    )]
    Thaw {
        /// Each mount point and its error, joined.
        list: String,
        /// What happened to the tag itself, if it failed too.
        after: Option<Box<TagError>>,
    },
}

impl Classify for TagError {
    fn kind(&self) -> ErrorKind {
        match self {
            TagError::InvalidName { .. } => ErrorKind::Config,
            TagError::Setup(_) | TagError::Freeze { .. } | TagError::Thaw { .. } => ErrorKind::Io,
            TagError::Hook { .. } => ErrorKind::Peer,
            TagError::Control(e) => e.kind(),
            TagError::Refused { kind, .. } if kind == "throttled" => ErrorKind::Throttled,
            TagError::Refused { .. } => ErrorKind::Corrupt,
            TagError::Timeout(_) => ErrorKind::Throttled,
            TagError::Interrupted(_) => ErrorKind::Shutdown,
        }
    }
}

/// Make the tag; returns its seq. Blocking: runs its own small runtime for
/// the signal handlers.
pub fn run(opts: &TagOptions) -> Result<u64, TagError> {
    check_tag_name(&opts.name).map_err(|detail| TagError::InvalidName {
        name: opts.name.clone(),
        detail,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TagError::Setup)?;
    let r = rt.block_on(run_async(opts));
    // A request thread still waiting on a dead agent must not hold up the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    r
}

/// Resolves to the name of the first SIGINT, SIGTERM or SIGHUP.
type Signals = watch::Receiver<Option<&'static str>>;

fn catch_signals() -> Result<Signals, TagError> {
    let (tx, rx) = watch::channel(None);
    let mut int = signal(SignalKind::interrupt()).map_err(TagError::Setup)?;
    let mut term = signal(SignalKind::terminate()).map_err(TagError::Setup)?;
    let mut hup = signal(SignalKind::hangup()).map_err(TagError::Setup)?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        };
        tx.send_replace(Some(name));
        // Later signals are caught too (and ignored): the thaw must finish.
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        }
    });
    Ok(rx)
}

fn signalled(s: &Signals) -> Option<&'static str> {
    *s.borrow()
}

async fn run_async(opts: &TagOptions) -> Result<u64, TagError> {
    let signals = catch_signals()?;
    let pre_ran = opts.pre_hook.is_some();
    let result = tag_with_hook(opts, &signals).await;
    if let (true, Some(post)) = (pre_ran, &opts.post_hook) {
        let seq = result.as_ref().ok().copied();
        if let Err(e) = run_hook("post", post, opts, seq, &signals, true).await {
            tracing::error!("{e}");
            if result.is_ok() {
                // The tag stands; report the hook's failure all the same.
                return Err(e);
            }
        }
    }
    result
}

async fn tag_with_hook(opts: &TagOptions, signals: &Signals) -> Result<u64, TagError> {
    if let Some(pre) = &opts.pre_hook {
        run_hook("pre", pre, opts, None, signals, false).await?;
    }
    if let Some(s) = signalled(signals) {
        return Err(TagError::Interrupted(s));
    }
    let flags = if opts.pre_hook.is_some() || !opts.freeze.is_empty() {
        TAG_APP_CONSISTENT
    } else {
        0
    };
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut frozen: Vec<Frozen> = Vec::new();
    let result = freeze_and_request(opts, flags, deadline, signals, &mut frozen).await;
    let thawed = thaw_all(frozen).await;
    if !opts.freeze.is_empty() {
        tracing::info!(
            frozen_ms = start.elapsed().as_millis() as u64,
            "file systems thawed"
        );
    }
    match (thawed, result) {
        (Ok(()), r) => r,
        (Err(list), r) => Err(TagError::Thaw {
            list,
            after: r.err().map(Box::new),
        }),
    }
}

async fn freeze_and_request(
    opts: &TagOptions,
    flags: u64,
    deadline: Instant,
    signals: &Signals,
    frozen: &mut Vec<Frozen>,
) -> Result<u64, TagError> {
    for m in &opts.freeze {
        let path = m.clone();
        let f = tokio::task::spawn_blocking(move || fsfreeze::freeze(&path))
            .await
            .map_err(|e| TagError::Setup(std::io::Error::other(e)))?
            .map_err(|source| TagError::Freeze {
                path: m.clone(),
                source,
            })?;
        tracing::info!(mountpoint = %m.display(), "frozen");
        frozen.push(f);
        if let Some(s) = signalled(signals) {
            return Err(TagError::Interrupted(s));
        }
        if Instant::now() >= deadline {
            return Err(TagError::Timeout(opts.timeout));
        }
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    // The agent must not record the tag later than this: keep a margin before
    // the thaw for the answer to come back.
    let margin = (remaining / 4).min(Duration::from_millis(500));
    let req = Request::Tag(TagRequest {
        group: opts.group.clone(),
        name: opts.name.clone(),
        flags,
        valid_until_us: now_us() + (remaining - margin).as_micros() as u64,
    });
    let socket = opts.socket.clone();
    let ask = tokio::task::spawn_blocking(move || control::request(&socket, &req, remaining));
    let mut sig = signals.clone();
    let answer = tokio::select! {
        r = ask => r.map_err(|e| TagError::Setup(std::io::Error::other(e)))?,
        _ = tokio::time::sleep_until(deadline.into()) => return Err(TagError::Timeout(opts.timeout)),
        _ = sig.wait_for(Option::is_some) => {
            return Err(TagError::Interrupted(signalled(signals).unwrap_or("a signal")));
        }
    };
    match answer {
        Ok(Response::Seq { seq }) => Ok(seq),
        Ok(Response::Error { error, kind }) => Err(TagError::Refused { error, kind }),
        Ok(other) => Err(TagError::Refused {
            error: format!("the agent answered a tag request with {other:?}"),
            kind: ErrorKind::Peer.as_str().into(),
        }),
        Err(ControlError::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(TagError::Timeout(opts.timeout))
        }
        Err(e) => Err(e.into()),
    }
}

/// Thaw in reverse order; every one is tried. Err lists the failures.
async fn thaw_all(frozen: Vec<Frozen>) -> Result<(), String> {
    let failed = tokio::task::spawn_blocking(move || {
        let mut failed = Vec::new();
        for f in frozen.into_iter().rev() {
            let path = f.path().to_path_buf();
            match f.thaw() {
                Ok(()) => tracing::info!(mountpoint = %path.display(), "thawed"),
                Err(e) => failed.push(format!("{} ({e})", path.display())),
            }
        }
        failed
    })
    .await
    .unwrap_or_else(|e| vec![format!("thaw thread failed: {e}")]);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join(", "))
    }
}

/// Run a hook with the tag name and mount points as arguments and in the
/// environment, bounded by the timeout; `post` hooks are not interrupted by
/// signals (they undo what the pre-hook did).
async fn run_hook(
    phase: &'static str,
    path: &Path,
    opts: &TagOptions,
    seq: Option<u64>,
    signals: &Signals,
    post: bool,
) -> Result<(), TagError> {
    let fail = |detail: String| TagError::Hook {
        phase,
        path: path.to_path_buf(),
        detail,
    };
    let mounts: Vec<String> = opts
        .freeze
        .iter()
        .map(|m| m.display().to_string())
        .collect();
    let mut cmd = Command::new(path);
    cmd.arg(&opts.name)
        .args(&opts.freeze)
        .env("TIDEMARK_TAG_PHASE", phase)
        .env("TIDEMARK_TAG_NAME", &opts.name)
        .env("TIDEMARK_TAG_GROUP", &opts.group)
        .env("TIDEMARK_TAG_MOUNTS", mounts.join("\n"))
        .stdin(Stdio::null())
        // Its own process group: a timeout kills whatever it started too,
        // and a terminal's Ctrl-C reaches only this command, which decides.
        .process_group(0);
    // The hook's output goes to stderr: stdout carries only the tag's seq.
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    if post {
        cmd.env(
            "TIDEMARK_TAG_RESULT",
            if seq.is_some() { "ok" } else { "failed" },
        );
        if let Some(s) = seq {
            cmd.env("TIDEMARK_TAG_SEQ", s.to_string());
        }
    }
    let mut child = cmd.spawn().map_err(|e| fail(format!("cannot run: {e}")))?;
    let deadline = Instant::now() + opts.timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(fail(format!("exited with {st}"))),
            Ok(None) => {}
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
        if Instant::now() >= deadline {
            kill(&mut child);
            return Err(fail(format!(
                "did not finish within {:?}; killed",
                opts.timeout
            )));
        }
        if !post && let Some(s) = signalled(signals) {
            kill(&mut child);
            return Err(TagError::Interrupted(s));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kill the hook and everything in its process group, and reap it.
fn kill(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::control::{ControlSocket, Handler};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    fn opts(dir: &Path) -> TagOptions {
        TagOptions {
            socket: dir.join("control.sock"),
            group: "g1".into(),
            name: "t1".into(),
            freeze: Vec::new(),
            timeout: Duration::from_secs(5),
            pre_hook: None,
            post_hook: None,
        }
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A fake agent recording what it was asked.
    fn agent(dir: &Path, seen: Arc<Mutex<Vec<TagRequest>>>) -> ControlSocket {
        let h: Handler = Arc::new(move |r| {
            let Request::Tag(t) = r else {
                return Response::Error {
                    error: "tags only".into(),
                    kind: "corrupt".into(),
                };
            };
            seen.lock().unwrap().push(t);
            Response::Seq { seq: 77 }
        });
        ControlSocket::start(dir, h).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_tag_hooks_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let _sock = agent(d.path(), seen.clone());
        let log = d.path().join("hook.log");
        let pre_ok = script(
            d.path(),
            "pre",
            &format!(
                "echo \"pre $TIDEMARK_TAG_PHASE $1 $TIDEMARK_TAG_GROUP\" >> {}",
                log.display()
            ),
        );
        let post = script(
            d.path(),
            "post",
            &format!(
                "echo \"post $TIDEMARK_TAG_RESULT ${{TIDEMARK_TAG_SEQ:-none}}\" >> {}",
                log.display()
            ),
        );
        let pre_fail = script(d.path(), "pre-fail", "echo no >&2; exit 3");
        let base = opts(d.path());
        let (seq, flags) = {
            let o = base.clone();
            let seq = tokio::task::spawn_blocking(move || run(&o))
                .await
                .unwrap()
                .unwrap();
            (seq, seen.lock().unwrap()[0].flags)
        };
        assert_eq!(
            (seq, flags),
            (77, 0),
            "no freeze, no hook: not app-consistent"
        );
        let mut o = base.clone();
        o.pre_hook = Some(pre_ok);
        o.post_hook = Some(post.clone());
        assert_eq!(
            tokio::task::spawn_blocking(move || run(&o))
                .await
                .unwrap()
                .unwrap(),
            77
        );
        assert_eq!(seen.lock().unwrap()[1].flags, TAG_APP_CONSISTENT);
        assert!(seen.lock().unwrap()[1].valid_until_us > now_us());
        // A failing pre-hook refuses the tag, and the post-hook still runs.
        let mut o = base.clone();
        o.pre_hook = Some(pre_fail);
        o.post_hook = Some(post);
        let e = tokio::task::spawn_blocking(move || run(&o))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string().contains("pre-hook") && e.to_string().contains("exit status: 3"),
            "{e}"
        );
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "no request after a failed pre-hook"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre pre t1 g1\npost ok 77\npost failed none\n"
        );
        // Bad names never reach the agent; a missing agent is named.
        let mut o = base.clone();
        o.name = "-bad".into();
        assert!(matches!(run(&o), Err(TagError::InvalidName { .. })));
        let mut o = base.clone();
        o.socket = d.path().join("nobody.sock");
        let e = tokio::task::spawn_blocking(move || run(&o))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("cannot reach the agent"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_hook_is_killed_at_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.pre_hook = Some(script(d.path(), "slow", "sleep 30"));
        o.timeout = Duration::from_millis(300);
        let t0 = Instant::now();
        let e = tokio::task::spawn_blocking(move || run(&o))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
