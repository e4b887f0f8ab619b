//! The agent's frontends: the NBD servers and FUSE mounts its config asks for,
//! each serving protected disks through their [`ProtectedDisk`] write path.
//!
//! Disks that list the same NBD addresses share one server (one export each);
//! disks with the same FUSE mountpoint share one mount (one file each). The
//! frontends start after every disk is open (their dirty logs read, their
//! sizes announced) and stop before any group stops, so no write arrives after
//! a journal is closed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::status::{FrontendStatus, GroupInfo, lock};
use crate::capture::protected::ProtectedDisk;
use crate::config::{AgentConfig, FuseFrontend, NbdAddr, NbdFrontend, NbdTls};
use crate::error::{Classify, ErrorKind};
use crate::frontend::BlockIo;
use crate::frontend::fuse::{self, FuseError, FuseFile, FuseMount, FuseOptions, FuseStats};
use crate::frontend::nbd::{
    NbdConfig, NbdError, NbdExport, NbdListen, NbdServer, NbdStats, TlsMode,
};
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
}

impl Classify for FrontendError {
    fn kind(&self) -> ErrorKind {
        match self {
            FrontendError::Nbd { source, .. } => source.kind(),
            FrontendError::Tls(e) => e.kind(),
            FrontendError::Fuse(e) => e.kind(),
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
}

impl Frontends {
    /// Start every frontend `cfg` asks for over `disks`.
    pub async fn start(cfg: &AgentConfig, disks: &[DiskRef]) -> Result<Frontends, FrontendError> {
        let find = |group: &str, id: u32| {
            disks
                .iter()
                .find(|d| d.group == group && u32::from(d.id) == id)
        };
        // Group disks by listener and by mountpoint.
        let mut servers: BTreeMap<Vec<String>, Members<'_, NbdFrontend>> = BTreeMap::new();
        let mut mounts: BTreeMap<PathBuf, Members<'_, FuseFrontend>> = BTreeMap::new();
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
                if d.nbd.is_none() && d.fuse.is_none() {
                    tracing::warn!(group = %g.name, disk = d.id, "no frontend configured: only writes made through tidemark are captured");
                }
            }
        }
        let mut out = Frontends {
            nbd_stop: None,
            nbd_tasks: Vec::new(),
            mounts: Vec::new(),
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
        Ok(out)
    }

    /// Stop every frontend: NBD servers finish their in-flight requests and close
    /// their connections; FUSE mounts are unmounted (lazily when a loop device
    /// still holds them).
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
    }
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
}

impl Probe {
    pub fn counters(&self) -> serde_json::Value {
        match self {
            Probe::Nbd(s) => serde_json::to_value(s.snapshot()).unwrap_or_default(),
            Probe::Fuse(s) => serde_json::to_value(s.snapshot()).unwrap_or_default(),
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
