//! The running agent's control socket: `<state_dir>/control.sock` (mode 0600),
//! a tiny line-delimited JSON request/response protocol for local tools
//! (`tidemark agent tag`).
//!
//! One request per line, one response line per request, any number of
//! requests per connection:
//!
//! ```text
//! → {"tag":{"group":"g1","name":"before-upgrade","flags":1,"valid_until_us":1733470000000000}}
//! ← {"seq":1234}
//! ← {"error":"group g1 is in bitmap mode since … (reason: …): a tag now could not be a consistent point","kind":"throttled"}
//! ```
//!
//! A request line is at most [`MAX_LINE`] bytes (newline included); the server
//! reads into a fixed buffer of that size, so a longer line is refused before
//! anything is allocated for it (an error response, then the connection is
//! closed). Malformed JSON or an unknown request gets an error response and the
//! connection stays usable. At most [`MAX_CONNECTIONS`] connections are served
//! at once; an idle connection is closed after [`IDLE_TIMEOUT`].

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::status::GroupInfo;
use crate::capture::journal::CaptureJournal;
use crate::error::{Classify, ErrorKind};
use crate::util::time::now_us;

/// The socket's file name in the agent's state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request or response line, newline included.
pub const MAX_LINE: usize = 4096;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// An idle connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Record a tag in a group's stream.
    Tag(TagRequest),
    /// Resync a disk (`tidemark resync`).
    Resync(ResyncRequest),
    /// Compare a disk with its replica (`tidemark verify`).
    Verify(VerifyRequest),
}

/// `resync`: mark a whole disk for resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncRequest {
    /// The group.
    pub group: String,
    /// The disk id.
    pub disk: u16,
    /// Send every block without comparing digests.
    #[serde(default)]
    pub full: bool,
}

/// `verify`: compare a disk (or a byte range of it) with its replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The group.
    pub group: String,
    /// The disk id.
    pub disk: u16,
    /// Byte range `[start, end)`; the whole disk when absent.
    #[serde(default)]
    pub range: Option<(u64, u64)>,
    /// Mark the differing ranges for resync.
    #[serde(default)]
    pub repair: bool,
}

/// `tag`: record a tag now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRequest {
    /// The group.
    pub group: String,
    /// The tag's name (tag naming rules, see `docs/FORMAT.md`).
    pub name: String,
    /// Tag flags: bit 0 = application-consistent.
    #[serde(default)]
    pub flags: u64,
    /// Refuse the request if it is handled after this time (µs since the
    /// Unix epoch; 0: no limit). The CLI sets it before its own deadline, so a
    /// tag is never recorded after the file systems were thawed.
    #[serde(default)]
    pub valid_until_us: u64,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Response {
    /// Done: the seq of what was recorded.
    Seq {
        /// The seq.
        seq: u64,
    },
    /// A resync was started: bytes marked.
    Resync {
        /// Bytes marked for resync.
        marked_bytes: u64,
    },
    /// What a verify found.
    Verify {
        /// The report.
        verify: super::verify::VerifyReport,
    },
    /// Refused.
    Error {
        /// Why, one line.
        error: String,
        /// The error's class (`ErrorKind::as_str`).
        kind: String,
    },
}

impl Response {
    /// An error response for `e`.
    pub fn error(e: &(impl std::fmt::Display + Classify)) -> Response {
        Response::Error {
            error: e.to_string(),
            kind: e.kind().as_str().to_string(),
        }
    }
}

/// What the control socket can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be set up.
    #[error("control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("control socket {path}: exists and is not a socket; not replacing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// No agent listens there.
    #[error("cannot reach the agent at {path} (is it running with this config?): {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange failed or timed out.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line that breaks the protocol.
    #[error("control protocol: {0}")]
    Protocol(String),
    /// The named group is not one of the agent's.
    #[error("group {group:?} is not protected by this agent (its groups: {known:?})")]
    UnknownGroup {
        /// The group asked for.
        group: String,
        /// The agent's groups.
        known: Vec<String>,
    },
    /// The request arrived after its `valid_until_us`.
    #[error("request expired {late_ms} ms before it was handled; nothing recorded")]
    Expired {
        /// How late.
        late_ms: u64,
    },
}

impl Classify for ControlError {
    fn kind(&self) -> ErrorKind {
        match self {
            ControlError::Bind { .. } | ControlError::Io { .. } => ErrorKind::Io,
            ControlError::NotASocket { .. } => ErrorKind::Config,
            ControlError::Connect { .. } => ErrorKind::Peer,
            ControlError::Protocol(_) | ControlError::UnknownGroup { .. } => ErrorKind::Corrupt,
            ControlError::Expired { .. } => ErrorKind::Throttled,
        }
    }
}

/// Parse one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    serde_json::from_slice(line).map_err(|e| {
        ControlError::Protocol(format!(
            "malformed request ({e}); expected e.g. {{\"tag\":{{\"group\":\"g1\",\"name\":\"n\"}}}}"
        ))
    })
}

/// One line of JSON, newline-terminated.
fn to_line<T: Serialize>(v: &T) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_else(|e| {
        format!("{{\"error\":\"cannot encode: {e}\",\"kind\":\"io\"}}").into_bytes()
    });
    b.push(b'\n');
    b
}

/// Handles one parsed request (called on a blocking thread).
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// The listening socket; the file is removed when this is dropped (orderly
/// stop) and the accept loop ends.
pub struct ControlSocket {
    path: PathBuf,
    ino: u64,
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    /// Listen on `<state_dir>/control.sock` with mode 0600, replacing a stale
    /// socket (a crashed agent's; the caller holds the state directory's lock,
    /// so no other agent uses it), and serve requests with `handler`.
    pub fn start(state_dir: &Path, handler: Handler) -> Result<ControlSocket, ControlError> {
        let path = state_dir.join(SOCKET_NAME);
        let bind_err = |source| ControlError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path });
            }
            _ => {}
        }
        // Bind under a temporary name, restrict it, then move it into place:
        // the socket is never reachable at its real path with wider modes.
        // (No longer than the final name for usual pids: socket paths are
        // limited to 107 bytes.)
        let tmp = state_dir.join(format!(".ctl.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                bind_err(e)
            })?;
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::symlink_metadata(&path).map_err(bind_err)?,
        );
        let task = tokio::spawn(accept_loop(listener, handler));
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(ControlSocket { path, ino, task })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        // Remove it only if it is still ours.
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn accept_loop(listener: UnixListener, handler: Handler) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let mut s = stream;
            let busy = Response::Error {
                error: format!("too many control connections (at most {MAX_CONNECTIONS})"),
                kind: ErrorKind::Throttled.as_str().into(),
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(1), s.write_all(&to_line(&busy))).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, handler).await {
                tracing::debug!("control connection ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_connection(mut s: UnixStream, handler: Handler) -> std::io::Result<()> {
    let mut buf = [0u8; MAX_LINE];
    let mut filled = 0usize;
    loop {
        // Serve every complete line in the buffer.
        while let Some(nl) = buf[..filled].iter().position(|&b| b == b'\n') {
            let resp = match parse_request(&buf[..nl]) {
                Ok(req) => {
                    let h = handler.clone();
                    tokio::task::spawn_blocking(move || h(req))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            error: format!("request handler failed: {e}"),
                            kind: ErrorKind::Io.as_str().into(),
                        })
                }
                Err(e) => Response::error(&e),
            };
            s.write_all(&to_line(&resp)).await?;
            buf.copy_within(nl + 1..filled, 0);
            filled -= nl + 1;
        }
        if filled == MAX_LINE {
            let e = ControlError::Protocol(format!(
                "request longer than {MAX_LINE} bytes; closing the connection"
            ));
            s.write_all(&to_line(&Response::error(&e))).await?;
            s.shutdown().await?;
            // Discard (bounded) what the client still sends, so closing does
            // not reset the connection before it has read the error.
            let until = tokio::time::Instant::now() + Duration::from_secs(1);
            let mut discarded = 0usize;
            while discarded < (1 << 20) {
                match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => discarded += n,
                    _ => break,
                }
            }
            return Ok(());
        }
        let n = match tokio::time::timeout(IDLE_TIMEOUT, s.read(&mut buf[filled..])).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        filled += n;
    }
}

/// Send `req` to the agent listening at `path` and wait up to `timeout` for
/// its answer (blocking; for the CLI).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let timeout = timeout.max(Duration::from_millis(1));
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(&to_line(req)).map_err(io)?;
    let mut buf = [0u8; MAX_LINE];
    let mut filled = 0usize;
    loop {
        if let Some(nl) = buf[..filled].iter().position(|&b| b == b'\n') {
            return serde_json::from_slice(&buf[..nl]).map_err(|e| {
                ControlError::Protocol(format!("malformed response from the agent: {e}"))
            });
        }
        if filled == MAX_LINE {
            return Err(ControlError::Protocol(format!(
                "response longer than {MAX_LINE} bytes"
            )));
        }
        let n = s.read(&mut buf[filled..]).map_err(io)?;
        if n == 0 {
            return Err(ControlError::Protocol(
                "the agent closed the connection without answering".into(),
            ));
        }
        filled += n;
    }
}

/// The agent's handler: `tag` records a tag in the named group's journal;
/// `resync` and `verify` run on the group's disks.
pub(crate) fn agent_handler(groups: Vec<Arc<GroupInfo>>) -> Handler {
    let unknown = {
        let known: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        move |group: String| {
            Response::error(&ControlError::UnknownGroup {
                group,
                known: known.clone(),
            })
        }
    };
    let find = {
        let groups = groups.clone();
        move |name: &str| groups.iter().find(|g| g.name == name).cloned()
    };
    Arc::new(move |req| match req {
        Request::Tag(t) => match find(&t.group) {
            Some(g) => record_tag(&g.journal, t),
            None => unknown(t.group),
        },
        Request::Resync(r) => match find(&r.group) {
            Some(g) => match super::verify::start_resync(&g, r.disk, r.full) {
                Ok(marked_bytes) => Response::Resync { marked_bytes },
                Err(e) => Response::error(&e),
            },
            None => unknown(r.group),
        },
        Request::Verify(v) => match find(&v.group) {
            Some(g) => match super::verify::verify(&g, v.disk, v.range, v.repair) {
                Ok(verify) => Response::Verify { verify },
                Err(e) => Response::error(&e),
            },
            None => unknown(v.group),
        },
    })
}

/// A handler that serves only tags, for `groups`' journals (tests, tools).
pub fn journal_handler(groups: Vec<(String, Arc<CaptureJournal>)>) -> Handler {
    Arc::new(move |req| match req {
        Request::Tag(t) => {
            let Some((_, journal)) = groups.iter().find(|(n, _)| *n == t.group) else {
                return Response::error(&ControlError::UnknownGroup {
                    group: t.group,
                    known: groups.iter().map(|(n, _)| n.clone()).collect(),
                });
            };
            record_tag(journal, t)
        }
        Request::Resync(_) | Request::Verify(_) => Response::error(&ControlError::Protocol(
            "this control socket serves tags only".into(),
        )),
    })
}

/// Record tag `t` in `journal`, unless the request expired.
fn record_tag(journal: &CaptureJournal, t: TagRequest) -> Response {
    let now = now_us();
    if t.valid_until_us != 0 && now > t.valid_until_us {
        let late_ms = (now - t.valid_until_us) / 1000;
        tracing::warn!(group = %t.group, tag = %t.name, late_ms, "tag request expired before it was handled; not recorded");
        return Response::error(&ControlError::Expired { late_ms });
    }
    match journal.record_tag(&t.name, t.flags) {
        Ok(seq) => Response::Seq { seq },
        Err(e) => {
            tracing::warn!(group = %t.group, tag = %t.name, "tag refused: {e}");
            Response::error(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn request_and_response_lines() {
        let r = parse_request(br#"{"tag":{"group":"g1","name":"n1","flags":1}}"#).unwrap();
        assert_eq!(
            r,
            Request::Tag(TagRequest {
                group: "g1".into(),
                name: "n1".into(),
                flags: 1,
                valid_until_us: 0
            })
        );
        assert_eq!(
            String::from_utf8(to_line(&r)).unwrap(),
            "{\"tag\":{\"group\":\"g1\",\"name\":\"n1\",\"flags\":1,\"valid_until_us\":0}}\n"
        );
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"tag\":{}}",
            b"{\"tag\":{\"group\":\"g\",\"name\":\"n\",\"x\":1}}",
            b"{\"resync\":{}}",
            b"\xff\xfe",
            b"[1,2]",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        }
        assert_eq!(
            serde_json::from_str::<Response>("{\"seq\":5}").unwrap(),
            Response::Seq { seq: 5 }
        );
        assert!(matches!(
            serde_json::from_str::<Response>("{\"error\":\"x\",\"kind\":\"io\"}").unwrap(),
            Response::Error { .. }
        ));
    }

    #[tokio::test]
    async fn serves_requests_refuses_garbage_and_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        // A stale socket from a crash is replaced.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET_NAME)).unwrap());
        let handler: Handler = Arc::new(|r| match r {
            Request::Tag(t) if t.name == "ok" => Response::Seq { seq: 42 },
            Request::Tag(t) => Response::Error {
                error: format!("no {}", t.name),
                kind: "corrupt".into(),
            },
            other => Response::Error {
                error: format!("not here: {other:?}"),
                kind: "corrupt".into(),
            },
        });
        let sock = ControlSocket::start(dir.path(), handler).unwrap();
        let path = sock.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let tag = |name: &str| {
                Request::Tag(TagRequest {
                    group: "g".into(),
                    name: name.into(),
                    flags: 0,
                    valid_until_us: 0,
                })
            };
            let t = Duration::from_secs(5);
            assert_eq!(
                request(&p, &tag("ok"), t).unwrap(),
                Response::Seq { seq: 42 }
            );
            assert!(matches!(
                request(&p, &tag("x"), t).unwrap(),
                Response::Error { error, .. } if error == "no x"
            ));
            // Garbage, then a good request on the same connection.
            let s = std::os::unix::net::UnixStream::connect(&p).unwrap();
            s.set_read_timeout(Some(t)).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            w.write_all(b"not json\n{\"tag\":{\"group\":\"g\",\"name\":\"ok\"}}\n")
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("malformed request"), "{line}");
            line.clear();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"seq\":42}\n");
            // A line longer than the limit: an error, then the connection closes.
            w.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("longer than 4096"), "{line}");
            line.clear();
            assert_eq!(r.read_line(&mut line).unwrap(), 0);
        })
        .await
        .unwrap();
        drop(sock);
        assert!(!path.exists(), "removed at stop");
        // Something else in the way is not replaced.
        std::fs::write(&path, b"keep").unwrap();
        let handler: Handler = Arc::new(|_| Response::Seq { seq: 0 });
        assert!(matches!(
            ControlSocket::start(dir.path(), handler),
            Err(ControlError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        let e = request(
            &path,
            &parse_request(b"{\"tag\":{\"group\":\"g\",\"name\":\"n\"}}").unwrap(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    }

    #[test]
    fn journal_handler_tags_refuses_unknown_groups_and_expired_requests() {
        let j = Arc::new(CaptureJournal::in_memory(
            1 << 20,
            5,
            Box::new(|f| Ok(f + 100)),
        ));
        let h = journal_handler(vec![("g1".into(), j.clone())]);
        let tag = |group: &str, name: &str, valid_until_us| {
            Request::Tag(TagRequest {
                group: group.into(),
                name: name.into(),
                flags: 1,
                valid_until_us,
            })
        };
        assert_eq!(h(tag("g1", "a", 0)), Response::Seq { seq: 5 });
        assert_eq!(
            h(tag("g1", "b", now_us() + 10_000_000)),
            Response::Seq { seq: 6 }
        );
        let Response::Error { error, kind } = h(tag("g2", "a", 0)) else {
            panic!("unknown group accepted")
        };
        assert!(error.contains("\"g2\"") && error.contains("g1"), "{error}");
        assert_eq!(kind, "corrupt");
        let Response::Error { error, .. } = h(tag("g1", "late", now_us() - 2_000_000)) else {
            panic!("expired request accepted")
        };
        assert!(error.contains("expired"), "{error}");
        let Response::Error { error, .. } = h(tag("g1", "-x", 0)) else {
            panic!("bad name accepted")
        };
        assert!(error.contains("invalid tag"), "{error}");
        assert_eq!(j.next_seq(), 7, "refusals take no seq");
    }
}
