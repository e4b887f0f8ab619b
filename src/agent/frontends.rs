//! The agent's frontends: the NBD servers, FUSE mounts and ublk devices its
//! config asks for, each serving protected disks through their
//! [`ProtectedDisk`] write path.
//!
//! Disks that list the same NBD addresses share one server (one export each);
//! disks with the same FUSE mountpoint share one mount (one file each); each
//! disk with a ublk table has a device of its own (builds with the cargo
//! feature `ublk`; without it such a config is refused at start). The
//! frontends start after every disk is open (their dirty logs read, their
//! sizes announced) and stop before any group stops, so no write arrives after
//! a journal is closed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::status::{FrontendStatus, GroupInfo, lock};
use crate::capture::protected::ProtectedDisk;
#[cfg(feature = "ublk")]
use crate::config::UblkFrontend;
use crate::config::{AgentConfig, FuseFrontend, NbdAddr, NbdFrontend, NbdTls};
use crate::error::{Classify, ErrorKind};
use crate::frontend::BlockIo;
use crate::frontend::fuse::{self, FuseError, FuseFile, FuseMount, FuseOptions, FuseStats};
use crate::frontend::nbd::{
    NbdConfig, NbdError, NbdExport, NbdListen, NbdServer, NbdStats, TlsMode,
};
#[cfg(feature = "ublk")]
use crate::frontend::ublk::{UblkDevice, UblkError, UblkOptions, UblkStats};
use crate::transport::tls::{self, TlsError};
use crate::util::shutdown::{self, Shutdown, Trigger};

/// Why a frontend could not start.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// An NBD server could not start.
    #[error("NBD server on {listen}: {source}")]
    Nbd {
        /// Its listen addresses.
        listen: String,
        /// Cause.
        source: NbdError,
    },
    /// The NBD TLS configuration could not be built.
    #[error("NBD TLS: {0}")]
    Tls(#[from] TlsError),
    /// A FUSE mount failed.
    #[error(transparent)]
    Fuse(#[from] FuseError),
    /// A disk asks for a ublk device, and this build has no ublk frontend.
    #[error(
        "group {group} disk {disk} has a [group.disk.ublk] table, but this build has no \
         ublk support (cargo feature `ublk`)"
    )]
    UblkUnsupported {
        /// Group.
        group: String,
        /// Disk id.
        disk: u32,
    },
    /// A ublk device could not start.
    #[cfg(feature = "ublk")]
    #[error("{source} (group {group} disk {disk})")]
    Ublk {
        /// Group.
        group: String,
        /// Disk id.
        disk: u16,
        /// Cause.
        source: UblkError,
    },
}

impl Classify for FrontendError {
    fn kind(&self) -> ErrorKind {
        match self {
            FrontendError::Nbd { source, .. } => source.kind(),
            FrontendError::Tls(e) => e.kind(),
            FrontendError::Fuse(e) => e.kind(),
            FrontendError::UblkUnsupported { .. } => ErrorKind::Config,
            #[cfg(feature = "ublk")]
            FrontendError::Ublk { source, .. } => source.kind(),
        }
    }
}

/// One disk as the frontends see it.
pub(crate) struct DiskRef {
    pub group: String,
    pub id: u16,
    pub disk: Arc<ProtectedDisk>,
    pub info: Arc<GroupInfo>,
}

/// A frontend's settings and the disks it serves, under their names.
type Members<'a, T> = (T, Vec<(String, &'a DiskRef)>);

/// The running frontends.
pub(crate) struct Frontends {
    nbd_stop: Option<Trigger>,
    nbd_tasks: Vec<tokio::task::JoinHandle<()>>,
    mounts: Vec<FuseMount>,
    #[cfg(feature = "ublk")]
    ublk: Vec<UblkDevice>,
}

impl Frontends {
    /// Start every frontend `cfg` asks for over `disks`.
    pub async fn start(cfg: &AgentConfig, disks: &[DiskRef]) -> Result<Frontends, FrontendError> {
        check_ublk_built(cfg)?;
        let find = |group: &str, id: u32| {
            disks
                .iter()
                .find(|d| d.group == group && u32::from(d.id) == id)
        };
        // Group disks by listener and by mountpoint.
        let mut servers: BTreeMap<Vec<String>, Members<'_, NbdFrontend>> = BTreeMap::new();
        let mut mounts: BTreeMap<PathBuf, Members<'_, FuseFrontend>> = BTreeMap::new();
        #[cfg(feature = "ublk")]
        let mut ublk: Vec<(UblkFrontend, &DiskRef)> = Vec::new();
        for g in &cfg.groups {
            for d in &g.disks {
                let Some(r) = find(&g.name, d.id) else {
                    continue;
                };
                if let Some(n) = &d.nbd {
                    let e = servers
                        .entry(n.listen.clone())
                        .or_insert_with(|| (n.clone(), Vec::new()));
                    e.1.push((n.export_name(&g.name, d.id), r));
                }
                if let Some(f) = &d.fuse {
                    let e = mounts
                        .entry(f.mountpoint.clone())
                        .or_insert_with(|| (f.clone(), Vec::new()));
                    e.1.push((f.file_name(&g.name, d.id), r));
                }
                #[cfg(feature = "ublk")]
                if let Some(u) = &d.ublk {
                    ublk.push((u.clone(), r));
                }
                if d.nbd.is_none() && d.fuse.is_none() && d.ublk.is_none() {
                    tracing::warn!(group = %g.name, disk = d.id, "no frontend configured: only writes made through tidemark are captured");
                }
            }
        }
        let mut out = Frontends {
            nbd_stop: None,
            nbd_tasks: Vec::new(),
            mounts: Vec::new(),
            #[cfg(feature = "ublk")]
            ublk: Vec::new(),
        };
        let (stop, sd) = shutdown::channel();
        out.nbd_stop = Some(stop);
        let tls_files = cfg.tls.files();
        for (listen, (n, members)) in servers {
            let r = start_nbd(&n, &members, &tls_files, sd.clone()).await;
            match r {
                Ok(task) => out.nbd_tasks.push(task),
                Err(e) => {
                    out.stop().await;
                    return Err(match e {
                        FrontendError::Nbd { source, .. } => FrontendError::Nbd {
                            listen: listen.join(", "),
                            source,
                        },
                        other => other,
                    });
                }
            }
        }
        for (mountpoint, (f, members)) in mounts {
            let files: Vec<FuseFile> = members
                .iter()
                .map(|(name, r)| FuseFile {
                    name: name.clone(),
                    disk: r.disk.clone() as Arc<dyn BlockIo>,
                })
                .collect();
            let opts = FuseOptions {
                allow_other: f.allow_other,
                ..FuseOptions::default()
            };
            let mp = mountpoint.clone();
            let m = tokio::task::spawn_blocking(move || fuse::mount(&mp, files, &opts))
                .await
                .map_err(|e| {
                    FrontendError::Fuse(FuseError::Mount {
                        path: mountpoint.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })
                });
            let m = match m.and_then(|r| r.map_err(FrontendError::from)) {
                Ok(m) => m,
                Err(e) => {
                    out.stop().await;
                    return Err(e);
                }
            };
            for (name, r) in &members {
                let path = m
                    .file_path(name)
                    .unwrap_or_else(|| m.mountpoint().join(name));
                tracing::info!(group = %r.group, disk = r.id, file = %path.display(), "FUSE frontend serving");
                add_frontend(
                    r,
                    "fuse",
                    path.display().to_string(),
                    Probe::Fuse(m.stats()),
                );
            }
            out.mounts.push(m);
        }
        #[cfg(feature = "ublk")]
        for (u, r) in ublk {
            match start_ublk(&u, r).await {
                Ok(d) => out.ublk.push(d),
                Err(e) => {
                    out.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Stop every frontend: NBD servers finish their in-flight requests and close
    /// their connections; FUSE mounts are unmounted (lazily when a loop device
    /// still holds them); ublk devices answer their in-flight requests, are
    /// stopped and deleted.
    pub async fn stop(mut self) {
        if let Some(t) = self.nbd_stop.take() {
            t.fire();
        }
        for t in self.nbd_tasks.drain(..) {
            let _ = t.await;
        }
        for m in self.mounts.drain(..) {
            let mp = m.mountpoint().to_path_buf();
            match tokio::task::spawn_blocking(move || m.unmount()).await {
                Ok(Ok(how)) => {
                    tracing::info!(mountpoint = %mp.display(), ?how, "FUSE frontend unmounted")
                }
                Ok(Err(e)) => {
                    tracing::error!(mountpoint = %mp.display(), "FUSE unmount failed: {e}")
                }
                Err(e) => {
                    tracing::error!(mountpoint = %mp.display(), "FUSE unmount task failed: {e}")
                }
            }
        }
        #[cfg(feature = "ublk")]
        for d in self.ublk.drain(..) {
            let path = d.path();
            match tokio::task::spawn_blocking(move || d.stop()).await {
                Ok(Ok(())) => tracing::info!(device = %path.display(), "ublk frontend stopped"),
                Ok(Err(e)) => tracing::error!(device = %path.display(), "ublk stop failed: {e}"),
                Err(e) => tracing::error!(device = %path.display(), "ublk stop task failed: {e}"),
            }
        }
    }
}

/// Refuse a config that asks for ublk devices from a build without them.
fn check_ublk_built(cfg: &AgentConfig) -> Result<(), FrontendError> {
    if cfg!(feature = "ublk") {
        return Ok(());
    }
    for g in &cfg.groups {
        if let Some(d) = g.disks.iter().find(|d| d.ublk.is_some()) {
            return Err(FrontendError::UblkUnsupported {
                group: g.name.clone(),
                disk: d.id,
            });
        }
    }
    Ok(())
}

/// Start the ublk device of one disk (blocking, on the blocking pool).
#[cfg(feature = "ublk")]
async fn start_ublk(u: &UblkFrontend, r: &DiskRef) -> Result<UblkDevice, FrontendError> {
    let opts = UblkOptions {
        dev_id: u.dev_id,
        queues: u.queues,
        depth: u.depth,
        max_request_bytes: (u.max_request_kib << 10) as u32,
        logical_block: u.logical_block,
    };
    let disk = r.disk.clone() as Arc<dyn BlockIo>;
    let err = |source| FrontendError::Ublk {
        group: r.group.clone(),
        disk: r.id,
        source,
    };
    let d = tokio::task::spawn_blocking(move || UblkDevice::start(disk, &opts))
        .await
        .map_err(|e| {
            err(UblkError::Queue {
                dev: u.dev_id.unwrap_or(u32::MAX),
                queue: 0,
                reason: format!("start task failed: {e}"),
            })
        })?
        .map_err(err)?;
    let path = d.path();
    tracing::info!(group = %r.group, disk = r.id, device = %path.display(), "ublk frontend serving");
    add_frontend(
        r,
        "ublk",
        path.display().to_string(),
        Probe::Ublk(d.stats()),
    );
    Ok(d)
}

async fn start_nbd(
    n: &NbdFrontend,
    members: &[(String, &DiskRef)],
    tls_files: &tls::TlsFiles,
    sd: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, FrontendError> {
    let listen: Vec<NbdListen> = n
        .addrs()
        .into_iter()
        .map(|a| match a {
            NbdAddr::Tcp(s) => NbdListen::Tcp(s),
            NbdAddr::Unix(p) => NbdListen::Unix(p),
        })
        .collect();
    let mut cfg = NbdConfig::new(listen);
    cfg.max_request_bytes = (n.max_request_kib << 10) as u32;
    cfg.max_inflight_bytes = cfg.max_inflight_bytes.max(cfg.max_request_bytes as usize);
    cfg.max_connections = n.max_connections as usize;
    cfg.tls = match n.tls {
        NbdTls::Off => TlsMode::Off,
        NbdTls::Optional => TlsMode::Optional,
        NbdTls::Required => TlsMode::Required,
    };
    if cfg.tls != TlsMode::Off {
        cfg.tls_config = Some(tls::nbd_server_config(tls_files)?);
    }
    let exports = members
        .iter()
        .map(|(name, r)| NbdExport {
            name: name.clone(),
            description: format!("tidemark group {} disk {}", r.group, r.id),
            disk: r.disk.clone() as Arc<dyn BlockIo>,
        })
        .collect();
    let server = NbdServer::bind(cfg, exports)
        .await
        .map_err(|source| FrontendError::Nbd {
            listen: n.listen.join(", "),
            source,
        })?;
    let addrs = server.local_addrs();
    let stats = server.stats();
    for (name, r) in members {
        let uris: Vec<String> = addrs.iter().map(|a| a.uri(name)).collect();
        tracing::info!(group = %r.group, disk = r.id, uris = ?uris, "NBD frontend serving");
        add_frontend(r, "nbd", uris.join(" "), Probe::Nbd(stats.clone()));
    }
    Ok(tokio::spawn(async move {
        if let Err(e) = server.run(sd).await {
            tracing::error!("NBD server stopped: {e}");
        }
    }))
}

/// Where a frontend's counters come from.
pub(crate) enum Probe {
    Nbd(Arc<NbdStats>),
    Fuse(Arc<FuseStats>),
    #[cfg(feature = "ublk")]
    Ublk(Arc<UblkStats>),
}

impl Probe {
    pub fn counters(&self) -> serde_json::Value {
        match self {
            Probe::Nbd(s) => serde_json::to_value(s.snapshot()).unwrap_or_default(),
            Probe::Fuse(s) => serde_json::to_value(s.snapshot()).unwrap_or_default(),
            #[cfg(feature = "ublk")]
            Probe::Ublk(s) => serde_json::to_value(s.snapshot()).unwrap_or_default(),
        }
    }
}

fn add_frontend(r: &DiskRef, kind: &str, address: String, probe: Probe) {
    let mut disks = lock(&r.info.disks);
    if let Some(d) = disks.iter_mut().find(|d| d.id == r.id) {
        d.frontends.push(FrontendStatus {
            kind: kind.into(),
            address,
            counters: serde_json::Value::Null,
        });
    }
    drop(disks);
    lock(&r.info.probes).push((r.id, probe));
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::capture::journal::{CaptureJournal, Policy};

    const CFG: &str = r#"
[agent]
name = "agent"
relay = "127.0.0.1:7400"
relay_name = "relay"
state_dir = "state"

[tls]
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"

[[group]]
name = "g1"
key_file = "g1.key"

[[group.disk]]
id = 0
path = "d0.img"

[group.disk.ublk]
"#;

    fn config() -> AgentConfig {
        toml::from_str(CFG).unwrap()
    }

    #[test]
    fn a_ublk_table_needs_a_build_with_the_feature() {
        let cfg = config();
        let built = cfg!(feature = "ublk");
        match check_ublk_built(&cfg) {
            Ok(()) => assert!(built),
            Err(e) => {
                assert!(!built);
                assert_eq!(
                    e.to_string(),
                    "group g1 disk 0 has a [group.disk.ublk] table, but this build has no ublk \
                     support (cargo feature `ublk`)"
                );
                assert_eq!(e.kind(), ErrorKind::Config);
            }
        }
        let mut cfg = cfg;
        cfg.groups[0].disks[0].ublk = None;
        check_ublk_built(&cfg).unwrap();
    }

    /// Starting the agent's frontends with a ublk table on this machine: a
    /// build without the feature refuses the config; with it, a machine
    /// without `/dev/ublk-control` gets the one-line error naming it (and a
    /// machine with it gets a device, listed in the status, then stopped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starting_with_a_ublk_table_here() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d0.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let j = CaptureJournal::for_tests("g1", 16 << 20, Policy::Degrade);
        let (disk, _) =
            ProtectedDisk::open(0, &img, j.clone(), &dir.path().join("state"), false).unwrap();
        let disk = Arc::new(disk);
        let info = Arc::new(GroupInfo::new(
            "g1".into(),
            j,
            Vec::new(),
            vec![disk.clone()],
            Default::default(),
        ));
        let refs = vec![DiskRef {
            group: "g1".into(),
            id: 0,
            disk,
            info: info.clone(),
        }];
        let r = Frontends::start(&config(), &refs).await;
        let control = std::path::Path::new("/dev/ublk-control").exists();
        match r {
            Ok(f) => {
                assert!(cfg!(feature = "ublk") && control);
                assert_eq!(lock(&info.probes).len(), 1);
                f.stop().await;
            }
            Err(e) => {
                let s = e.to_string();
                assert!(!s.contains('\n'), "{s}");
                if cfg!(feature = "ublk") {
                    assert!(!control, "{s}");
                    assert_eq!(
                        s,
                        "ublk: /dev/ublk-control not found: needs Linux ≥ 6.0 with the \
                         ublk_drv module loaded (group g1 disk 0)"
                    );
                } else {
                    assert!(s.contains("cargo feature `ublk`"), "{s}");
                }
                assert_eq!(e.kind(), ErrorKind::Config);
            }
        }
    }
}
