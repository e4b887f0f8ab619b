//! Test helpers: a site from `tidemark init` in a tempdir, a fake relay that
//! speaks the real protocol over real mutual TLS, and a chain builder that
//! seals real frames and keeps a model of what each replica must contain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::gate::ChainPos;
use super::{TargetError, TargetStatus, run};
use crate::config::{RelayConfig, TargetConfig, TargetDisk};
use crate::frame::{DataKey, FrameKind, FrameMeta, GroupName, RecordRef, SealedFrame, Sealer};
use crate::pki::{InitOptions, init};
use crate::transport::tls::{self, Role};
use crate::transport::wire::{self, Message, PROTOCOL_VERSION, PeerRole, WireErrorKind};
use crate::util::shutdown::{self, Trigger};
use crate::util::statusfile::STATUS_FILE;
use crate::util::time::now_us;

/// Longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// A `tidemark init` directory with a fake relay and a target config
/// pointing at it.
pub struct Site {
    /// The init directory (certificates, keys, configs, replicas, state).
    pub dir: tempfile::TempDir,
    /// The target's config, edited to reach the fake relay.
    pub cfg: TargetConfig,
    /// The fake relay.
    pub relay: FakeRelay,
}

impl Site {
    /// Init with `groups`, bind a fake relay on loopback.
    pub async fn new(groups: &[&str]) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let mut o = InitOptions::new(dir.path());
        o.groups = groups.iter().map(|g| g.to_string()).collect();
        init(&o).unwrap();
        let relay_cfg = RelayConfig::load(&dir.path().join("relay.toml")).unwrap();
        let mut cfg = TargetConfig::load(&dir.path().join("target.toml")).unwrap();
        let relay = FakeRelay::bind(&relay_cfg).await;
        cfg.target.relay = relay.addr.clone();
        cfg.target.relay_name = "localhost".into();
        Site { dir, cfg, relay }
    }

    /// The data key of `group`.
    pub fn key(&self, group: &str) -> DataKey {
        DataKey::load(self.dir.path().join("keys").join(format!("{group}.key"))).unwrap()
    }

    /// A chain builder for `group` with its real key.
    pub fn chain(&self, group: &str) -> Chain {
        Chain::new(group, &self.key(group))
    }

    /// Add a disk with `id` to `group` (replica under `replicas/`).
    pub fn add_disk(&mut self, group: &str, id: u32) -> PathBuf {
        let path = self
            .dir
            .path()
            .join("replicas")
            .join(format!("{group}-disk{id}.img"));
        let g = self
            .cfg
            .groups
            .iter_mut()
            .find(|g| g.name == group)
            .unwrap();
        g.disks.push(TargetDisk {
            id,
            path: path.clone(),
            format: Default::default(),
        });
        path
    }

    /// The replica path of `disk` in `group`.
    pub fn replica(&self, group: &str, disk: u32) -> PathBuf {
        let g = self.cfg.groups.iter().find(|g| g.name == group).unwrap();
        g.disks.iter().find(|d| d.id == disk).unwrap().path.clone()
    }

    /// A group's state directory.
    pub fn group_dir(&self, group: &str) -> PathBuf {
        self.cfg.target.state_dir.join(group)
    }

    /// The status file path.
    pub fn status_path(&self) -> PathBuf {
        self.cfg.target.state_dir.join(STATUS_FILE)
    }

    /// Start the target on this site's config.
    pub fn start(&self) -> Running {
        Running::start(self.cfg.clone())
    }
}

/// A running target.
pub struct Running {
    trigger: Trigger,
    handle: JoinHandle<Result<(), TargetError>>,
}

impl Running {
    /// Start `run(cfg)` in a task.
    pub fn start(cfg: TargetConfig) -> Running {
        let (trigger, sd) = shutdown::channel();
        let handle = tokio::spawn(run(cfg, sd));
        Running { trigger, handle }
    }

    /// Fire shutdown and wait for `run` to return.
    pub async fn stop(self) -> Result<(), TargetError> {
        self.trigger.fire();
        self.finish().await
    }

    /// Wait for `run` to return on its own.
    pub async fn finish(self) -> Result<(), TargetError> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("target did not stop in time")
            .expect("target task panicked")
    }
}

/// A relay stand-in: accepts target sessions over mutual TLS and lets the test
/// drive them message by message.
pub struct FakeRelay {
    /// `127.0.0.1:port`.
    pub addr: String,
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

/// What a target said in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    /// Instance name.
    pub name: String,
    /// Group.
    pub group: String,
    /// Durable position it resumes from.
    pub applied: ChainPos,
}

/// One accepted session, hello read (not yet answered).
pub struct RelayConn {
    s: TlsStream<TcpStream>,
    /// The target's hello.
    pub hello: HelloInfo,
    /// Acks received so far, in order.
    pub acks: Vec<ChainPos>,
}

impl FakeRelay {
    async fn bind(cfg: &RelayConfig) -> FakeRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = TlsAcceptor::from(tls::server_config(&cfg.tls.files()).unwrap());
        FakeRelay {
            addr,
            listener,
            acceptor,
        }
    }

    /// Accept the next session and read its hello; checks the peer is a
    /// target allowed to read the group, as the relay does.
    pub async fn accept(&self) -> RelayConn {
        tokio::time::timeout(WAIT, async {
            let (tcp, _) = self.listener.accept().await.unwrap();
            let mut s = self.acceptor.accept(tcp).await.unwrap();
            let peer = tls::peer_cert_server(s.get_ref().1).unwrap();
            peer.check_role(Role::Target).unwrap();
            let hello = match wire::read_message(&mut s).await.unwrap() {
                Message::Hello {
                    version,
                    role,
                    name,
                    group,
                    applied_frame_no,
                    applied_last_seq,
                } => {
                    assert_eq!(version, PROTOCOL_VERSION);
                    assert_eq!(role, PeerRole::Target);
                    peer.check_group(&group).unwrap();
                    HelloInfo {
                        name,
                        group,
                        applied: ChainPos {
                            frame_no: applied_frame_no,
                            last_seq: applied_last_seq,
                        },
                    }
                }
                other => panic!("expected a hello, got {other:?}"),
            };
            RelayConn {
                s,
                hello,
                acks: Vec::new(),
            }
        })
        .await
        .expect("no target connected in time")
    }
}

impl RelayConn {
    /// Answer the hello.
    pub async fn welcome(&mut self, head: ChainPos) {
        self.write(&Message::Welcome {
            version: PROTOCOL_VERSION,
            head_frame_no: head.frame_no,
            head_last_seq: head.last_seq,
        })
        .await;
    }

    /// Refuse the hello.
    pub async fn refuse(&mut self, kind: WireErrorKind, message: &str) {
        self.write(&Message::Error {
            kind,
            frame_no: 0,
            message: message.into(),
        })
        .await;
    }

    /// Send one message.
    pub async fn write(&mut self, m: &Message) {
        wire::write_message(&mut self.s, m).await.unwrap();
    }

    /// Send frame bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.write(&Message::Frame(bytes.to_vec())).await;
    }

    /// Send frame bytes; false if the connection is gone.
    pub async fn send_lossy(&mut self, bytes: &[u8]) -> bool {
        wire::write_message(&mut self.s, &Message::Frame(bytes.to_vec()))
            .await
            .is_ok()
    }

    /// Send every frame of `frames`.
    pub async fn send_all(&mut self, frames: &[SealedFrame]) {
        for f in frames {
            self.send(&f.bytes).await;
        }
    }

    /// The next message, `None` once the target closed the connection.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = tokio::time::timeout(WAIT, wire::read_message(&mut self.s))
            .await
            .expect("no message from the target in time");
        match m {
            Ok(Message::Ack { frame_no, last_seq }) => {
                self.acks.push(ChainPos { frame_no, last_seq });
                Some(Message::Ack { frame_no, last_seq })
            }
            Ok(m) => Some(m),
            Err(_) => None,
        }
    }

    /// Read until an ack covers `frame_no`; an error message fails the test.
    pub async fn wait_ack(&mut self, frame_no: u64) -> ChainPos {
        loop {
            match self.recv().await {
                Some(Message::Ack {
                    frame_no: f,
                    last_seq,
                }) if f >= frame_no => {
                    return ChainPos {
                        frame_no: f,
                        last_seq,
                    };
                }
                Some(Message::Ack { .. }) => {}
                Some(other) => panic!("waiting for ack {frame_no}, got {other:?}"),
                None => panic!("connection closed while waiting for ack {frame_no}"),
            }
        }
    }

    /// Read until an error message (acks are recorded).
    pub async fn wait_error(&mut self) -> (WireErrorKind, u64, String) {
        loop {
            match self.recv().await {
                Some(Message::Error {
                    kind,
                    frame_no,
                    message,
                }) => return (kind, frame_no, message),
                Some(Message::Ack { .. }) => {}
                Some(other) => panic!("waiting for an error, got {other:?}"),
                None => panic!("connection closed while waiting for an error"),
            }
        }
    }

    /// Read until the target closes the connection (acks recorded, errors
    /// returned).
    pub async fn wait_closed(&mut self) -> Vec<Message> {
        let mut other = Vec::new();
        while let Some(m) = self.recv().await {
            if !matches!(m, Message::Ack { .. }) {
                other.push(m);
            }
        }
        other
    }
}

/// One record to seal (owned).
#[derive(Debug, Clone)]
pub enum Rec {
    /// Write `data` at `off`.
    Write(u16, u64, Vec<u8>),
    /// Zero `len` bytes at `off`.
    Zero(u16, u64, u32),
    /// Disk size announcement.
    Size(u16, u64),
    /// A Note with this reason (M frames only).
    Note(u16, crate::frame::NoteReason),
}

/// Builds a chain of sealed frames and models the replicas they produce.
pub struct Chain {
    /// The group.
    pub group: GroupName,
    sealer: Sealer,
    /// Last frame built.
    pub tip: ChainPos,
    /// Number of the next frame.
    pub next_frame: u64,
    /// Expected content of each disk after every frame built so far.
    pub model: BTreeMap<u16, Vec<u8>>,
}

impl Chain {
    /// A chain of `group` sealed with `key` (epoch 1).
    pub fn new(group: &str, key: &DataKey) -> Chain {
        Chain {
            group: group.parse().unwrap(),
            sealer: Sealer::new(key, 1, 1).unwrap(),
            tip: ChainPos::default(),
            next_frame: 1,
            model: BTreeMap::new(),
        }
    }

    /// Leave `n` frame numbers unused before the next frame (numbers need not
    /// be consecutive).
    pub fn skip_numbers(&mut self, n: u64) {
        self.next_frame += n;
    }

    /// The next frame of `kind` with `recs`; the model follows it.
    pub fn frame(&mut self, kind: FrameKind, recs: &[Rec]) -> SealedFrame {
        self.build(kind, recs, false, true)
    }

    /// A W frame.
    pub fn w(&mut self, recs: &[Rec]) -> SealedFrame {
        self.frame(FrameKind::Write, recs)
    }

    /// A heartbeat.
    pub fn heartbeat(&mut self) -> SealedFrame {
        self.build(FrameKind::Write, &[], true, true)
    }

    /// The next frame, but the model does not follow it (a frame that must be
    /// refused: the replica must not change).
    pub fn w_unmodelled(&mut self, recs: &[Rec]) -> SealedFrame {
        self.build(FrameKind::Write, recs, false, false)
    }

    fn build(
        &mut self,
        kind: FrameKind,
        recs: &[Rec],
        heartbeat: bool,
        model: bool,
    ) -> SealedFrame {
        let t = now_us();
        let mut seq = self.tip.last_seq;
        let refs: Vec<RecordRef<'_>> = recs
            .iter()
            .map(|r| {
                seq += 1;
                match r {
                    Rec::Write(d, off, data) => RecordRef::write(seq, *d, *off, t, data),
                    Rec::Zero(d, off, len) => RecordRef::zero(seq, *d, *off, *len, t),
                    Rec::Size(d, size) => RecordRef::disk_size(seq, *d, *size, t),
                    Rec::Note(d, reason) => RecordRef::note(seq, *d, t, *reason, "test note"),
                }
            })
            .collect();
        let meta = FrameMeta {
            group: self.group,
            key_epoch: 1,
            frame_no: self.next_frame,
            prev_frame_no: self.tip.frame_no,
            prev_last_seq: self.tip.last_seq,
            kind,
            heartbeat,
            rebase: false,
            time_us: t,
        };
        let sealed = self.sealer.seal(&meta, &refs).unwrap();
        self.next_frame += 1;
        self.tip = ChainPos {
            frame_no: sealed.header.frame_no,
            last_seq: sealed.header.last_seq,
        };
        if model {
            for r in recs {
                match r {
                    Rec::Size(d, size) => {
                        let m = self.model.entry(*d).or_default();
                        if (m.len() as u64) < *size {
                            m.resize(*size as usize, 0);
                        }
                    }
                    Rec::Write(d, off, data) => {
                        let m = self.model.entry(*d).or_default();
                        m[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                    }
                    Rec::Zero(d, off, len) => {
                        let m = self.model.entry(*d).or_default();
                        m[*off as usize..*off as usize + *len as usize].fill(0);
                    }
                    Rec::Note(..) => {}
                }
            }
        }
        sealed
    }
}

/// `n` pseudo-random bytes (50 % compressible) from `seed`.
pub fn data(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = crate::util::prng::Prng::new(seed);
    let mut v = vec![0u8; n];
    crate::util::datagen::fill(&mut v, 50, &mut rng);
    v
}

/// Assert that the file at `path` equals `want` byte for byte.
pub fn assert_replica(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), want.len(), "{}: size", path.display());
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i}", path.display());
    }
}

/// Poll the status file until `pred` holds (or fail after [`WAIT`]).
pub async fn wait_status(path: &Path, pred: impl Fn(&TargetStatus) -> bool) -> TargetStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(s) = serde_json::from_slice::<TargetStatus>(&bytes)
            && pred(&s)
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status {} never matched; last: {}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
