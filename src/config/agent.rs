//! `agent.toml`: the agent's own table, its groups, their disks and the
//! frontends that serve them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, FRAME_KIB_MAX, MIB_MAX, MS_MAX, TlsSection, V, WINDOW_FRAMES_MAX,
    check_unique_paths, d1i32, d1u32, d20, d32, d32u32, d64, d1024, d2000, d4096, d60000, d300000,
    dtrue, load_file, resolve,
};

/// `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The `[agent]` table.
    pub agent: AgentSection,
    /// The `[tls]` table.
    pub tls: TlsSection,
    /// The `[[group]]` tables: groups protected by this agent.
    #[serde(rename = "group")]
    pub groups: Vec<AgentGroup>,
}

/// The `[agent]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Instance name; its certificate carries `<name>.agent.tidemark`.
    pub name: String,
    /// Relay address, `host:port`.
    pub relay: String,
    /// TLS server name the relay's certificate must carry.
    pub relay_name: String,
    /// Directory for the capture journal, bitmaps and counters.
    pub state_dir: PathBuf,
    /// Optional HTTP listener for `/metrics` and `/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_listen: Option<SocketAddr>,
    /// Memory for captured data before spilling, MiB (shared by the groups).
    #[serde(default = "d64")]
    pub capture_budget_mib: u64,
    /// Local disk for captured data once memory is full, MiB (shared by the
    /// groups; 0: no spill, a full memory budget goes straight to bitmap mode).
    #[serde(default = "d1024")]
    pub spill_budget_mib: u64,
    /// Directory of the spill files (default: `<state_dir>/spill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_dir: Option<PathBuf>,
    /// After the relay has been unreachable this long, captured writes not yet
    /// sent are dropped to the dirty bitmap, ms (0: never).
    #[serde(default = "d300000")]
    pub bitmap_after_ms: u64,
    /// Longest the relay may stay silent, and the connection take no byte,
    /// while sent frames wait for the relay's ack, before the connection
    /// counts as lost and is opened again, ms (its host or process is gone or
    /// hung; TCP alone would take about 15 minutes). At least 3000: a relay
    /// waiting on a slow disk sends a sign of life every second.
    #[serde(default = "d60000")]
    pub relay_silence_ms: u64,
    /// What a full capture budget does to writes: "degrade" (spill, then keep
    /// dirty regions only; writes never wait) or "block" (writes wait for the
    /// relay).
    #[serde(default)]
    pub capture_policy: crate::capture::journal::Policy,
    /// Period of the dirty-log rollover (bitmap snapshot, activity-log trim), ms.
    #[serde(default = "d2000")]
    pub dirty_flush_ms: u64,
    /// Nice value of the replication threads (seal, batch, bridge, drain),
    /// 0..=19: the frontends serving the workload get the CPU first, and
    /// capture degrades rather than the workload slowing down (0: same
    /// priority as the workload). Only ever lowers: a thread whose nice value
    /// is already higher (an agent started under `nice`) keeps it.
    #[serde(default = "d10")]
    pub pipeline_nice: u64,
    /// `tidemark agent tag`: a program run before the file systems are
    /// frozen (arguments: the tag name, then the mount points); a non-zero
    /// exit refuses the tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_pre_hook: Option<PathBuf>,
    /// `tidemark agent tag`: a program run at the end whenever the pre-hook
    /// ran (same arguments; `TIDEMARK_TAG_RESULT` says ok or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_post_hook: Option<PathBuf>,
}

impl AgentSection {
    /// `capture_budget_mib` in bytes.
    pub fn capture_budget_bytes(&self) -> u64 {
        self.capture_budget_mib << 20
    }
    /// `spill_budget_mib` in bytes.
    pub fn spill_budget_bytes(&self) -> u64 {
        self.spill_budget_mib << 20
    }
    /// The spill directory.
    pub fn spill_dir(&self) -> PathBuf {
        self.spill_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("spill"))
    }
}

/// A `[[group]]` table of `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGroup {
    /// Group name; this agent's certificate must carry `<name>.group.tidemark`.
    pub name: String,
    /// The group's data key (64 hex characters).
    pub key_file: PathBuf,
    /// Epoch of the data key, part of every nonce.
    #[serde(default = "d1u32")]
    pub key_epoch: u32,
    /// zstd level, -7..=22 (negative levels are faster).
    #[serde(default = "d1i32")]
    pub zstd_level: i32,
    /// Largest frame payload before sealing, KiB.
    #[serde(default = "d4096")]
    pub frame_max_kib: u64,
    /// Longest time a frame stays open collecting writes, ms.
    #[serde(default = "d20")]
    pub frame_linger_ms: u64,
    /// Interval of idle heartbeat frames, ms.
    #[serde(default = "d2000")]
    pub heartbeat_ms: u64,
    /// Frames in flight to the relay.
    #[serde(default = "d32u32")]
    pub window_frames: u32,
    /// Bytes in flight to the relay, MiB (sealed frames awaiting the relay's
    /// ack; their data is also still in the capture journal, so more than the
    /// journal's budget would never be used).
    #[serde(default = "d32")]
    pub window_mib: u64,
    /// How dirty regions (initial copy, catch-up, resync) reach the replica:
    /// `checksum` sends only the blocks whose digest differs from the
    /// replica's (needs the target connected); `copy` sends every block (the
    /// relay spools it even while the target is away).
    #[serde(default)]
    pub resync: ResyncMode,
    /// Block size of checksum resync and verify, KiB: a power of two from 4
    /// to 1024 (docs/RESYNC.md explains the default of 64).
    #[serde(default = "d64u32")]
    pub resync_block_kib: u32,
    /// Cap on the bandwidth of copied dirty regions (initial copy, catch-up,
    /// resync), MiB/s; 0 = no cap. Writes captured meanwhile are not held up
    /// by it, so a resync leaves room on the link for them.
    #[serde(default)]
    pub resync_max_mib_s: u64,
    /// Run an online verify of every disk of the group this often, minutes
    /// (0 = never; the result is in `tidemark status`).
    #[serde(default)]
    pub verify_every_minutes: u64,
    /// A scheduled verify also marks what differs for resync.
    #[serde(default)]
    pub verify_repair: bool,
    /// The `[[group.disk]]` tables: source disks.
    #[serde(rename = "disk")]
    pub disks: Vec<AgentDisk>,
}

impl AgentGroup {
    /// `frame_max_kib` in bytes.
    pub fn frame_max_bytes(&self) -> u64 {
        self.frame_max_kib << 10
    }
    /// `window_mib` in bytes.
    pub fn window_bytes(&self) -> u64 {
        self.window_mib << 20
    }
    /// `frame_linger_ms` as a duration.
    pub fn frame_linger(&self) -> Duration {
        Duration::from_millis(self.frame_linger_ms)
    }
    /// `heartbeat_ms` as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

/// How dirty regions are copied to the replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncMode {
    /// Compare block digests with the target's and send only what differs.
    #[default]
    Checksum,
    /// Send every block, without asking the target.
    Copy,
}

/// A `[[group.disk]]` table of `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDisk {
    /// Disk id, unique within the group.
    pub id: u32,
    /// Source disk: raw image file or block device.
    pub path: PathBuf,
    /// Copy the whole disk to the replica when protection starts.
    #[serde(default = "dtrue")]
    pub initial_copy: bool,
    /// `[group.disk.nbd]`: serve the disk to workloads over NBD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdFrontend>,
    /// `[group.disk.fuse]`: serve the disk as a file in a FUSE mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<FuseFrontend>,
    /// `[group.disk.ublk]`: serve the disk as a block device, `/dev/ublkbN`
    /// (needs a build with the cargo feature `ublk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ublk: Option<UblkFrontend>,
}

/// TLS on an NBD listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    /// Plain NBD only.
    #[default]
    Off,
    /// `NBD_OPT_STARTTLS` offered; plain clients are served too.
    Optional,
    /// Every client must upgrade to TLS before choosing an export.
    Required,
}

/// A `[group.disk.nbd]` table: an NBD server for the disk. Disks with the same
/// `listen` list share one server (one export each) and must agree on its
/// other settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdFrontend {
    /// Where to listen: `host:port` for TCP, `unix:/path` for a Unix socket.
    pub listen: Vec<String>,
    /// Export name (default `<group>-<disk id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// TLS with the agent's certificate; clients need one from the project CA.
    #[serde(default)]
    pub tls: NbdTls,
    /// Largest request, KiB (reads and writes beyond it are refused).
    #[serde(default = "d32768")]
    pub max_request_kib: u64,
    /// Connections served at once.
    #[serde(default = "d16u32")]
    pub max_connections: u32,
}

/// One NBD listen address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl NbdFrontend {
    /// The export name of disk `id` of `group`.
    pub fn export_name(&self, group: &str, id: u32) -> String {
        self.export
            .clone()
            .unwrap_or_else(|| format!("{group}-{id}"))
    }

    /// The listen addresses, parsed (validation guarantees they parse).
    pub fn addrs(&self) -> Vec<NbdAddr> {
        self.listen
            .iter()
            .filter_map(|l| parse_nbd_addr(l).ok())
            .collect()
    }
}

/// Parse `host:port` or `unix:/path`.
pub fn parse_nbd_addr(s: &str) -> Result<NbdAddr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(format!("{s:?}: empty socket path"));
        }
        return Ok(NbdAddr::Unix(PathBuf::from(p)));
    }
    s.parse::<SocketAddr>().map(NbdAddr::Tcp).map_err(|_| {
        format!("{s:?} is neither host:port (an IP address and a port) nor unix:/path")
    })
}

/// A `[group.disk.fuse]` table: the disk as a regular file in a FUSE mount.
/// Disks with the same mountpoint share one mount (one file each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseFrontend {
    /// An empty directory to mount on.
    pub mountpoint: PathBuf,
    /// File name in the mount (default `<group>-<disk id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Let other users than the agent's reach the mount (needs
    /// `user_allow_other` in /etc/fuse.conf unless running as root).
    #[serde(default)]
    pub allow_other: bool,
}

impl FuseFrontend {
    /// The file name of disk `id` of `group`.
    pub fn file_name(&self, group: &str, id: u32) -> String {
        self.file.clone().unwrap_or_else(|| format!("{group}-{id}"))
    }
}

/// A `[group.disk.ublk]` table: the disk as a ublk block device,
/// `/dev/ublkbN` (Linux ≥ 6.4 with `ublk_drv`, and a build with the cargo
/// feature `ublk`). One device per disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UblkFrontend {
    /// Device number N of `/dev/ublkbN` (default: the kernel picks a free one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_id: Option<u32>,
    /// Hardware queues, each served by a thread of its own (the kernel caps
    /// it at the number of CPUs).
    #[serde(default = "d1u16")]
    pub queues: u16,
    /// Requests in flight per queue.
    #[serde(default = "d64u16")]
    pub depth: u16,
    /// Largest request, KiB (a multiple of 4); each request slot has a buffer
    /// of this size.
    #[serde(default = "d512")]
    pub max_request_kib: u64,
    /// Logical block size in bytes, 512 or 4096.
    #[serde(default = "d4096u32")]
    pub logical_block: u32,
}

/// Largest `queues` of a `[group.disk.ublk]` table (threads per device).
pub const UBLK_QUEUES_MAX: u64 = 64;
/// Largest buffer memory of one ublk queue, MiB (`depth` × `max_request_kib`).
pub const UBLK_QUEUE_BUFFERS_MIB_MAX: u64 = 1024;

fn d64u32() -> u32 {
    64
}
fn d1u16() -> u16 {
    1
}
fn d64u16() -> u16 {
    64
}
fn d512() -> u64 {
    512
}
fn d4096u32() -> u32 {
    4096
}
fn d10() -> u64 {
    10
}
fn d32768() -> u64 {
    32 * 1024
}
fn d16u32() -> u32 {
    16
}

impl AgentConfig {
    /// Reads, parses, validates `path` and resolves its relative paths.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut cfg, base) = load_file::<Self>(path)?;
        cfg.validate_at(path)?;
        cfg.resolve_paths(&base);
        check_unique_paths(
            path,
            cfg.groups.iter().enumerate().flat_map(|(gi, g)| {
                g.disks
                    .iter()
                    .enumerate()
                    .map(move |(di, d)| (gi, di, &d.path))
            }),
        )?;
        Ok(cfg)
    }

    /// Checks every value; `path` only labels the errors.
    pub fn validate_at(&self, path: &Path) -> Result<(), ConfigError> {
        let v = V(path);
        let a = &self.agent;
        v.name("agent.name", &a.name)?;
        v.addr("agent.relay", &a.relay)?;
        v.server_name("agent.relay_name", &a.relay_name)?;
        v.path("agent.state_dir", &a.state_dir)?;
        v.range("agent.capture_budget_mib", a.capture_budget_mib, 1, MIB_MAX)?;
        v.range("agent.spill_budget_mib", a.spill_budget_mib, 0, MIB_MAX)?;
        v.range("agent.bitmap_after_ms", a.bitmap_after_ms, 0, 24 * MS_MAX)?;
        v.range("agent.dirty_flush_ms", a.dirty_flush_ms, 100, MS_MAX)?;
        v.range("agent.relay_silence_ms", a.relay_silence_ms, 3000, MS_MAX)?;
        v.range("agent.pipeline_nice", a.pipeline_nice, 0, 19)?;
        if let Some(d) = &a.spill_dir {
            v.path("agent.spill_dir", d)?;
        }
        for (field, hook) in [
            ("agent.tag_pre_hook", &a.tag_pre_hook),
            ("agent.tag_post_hook", &a.tag_post_hook),
        ] {
            if let Some(h) = hook {
                v.path(field, h)?;
            }
        }
        v.tls(&self.tls)?;
        v.nonempty("group", self.groups.len())?;
        let mut names = HashSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            v.group_common(gi, &g.name, &mut names, &g.key_file, g.key_epoch)?;
            v.range(
                &format!("group[{gi}].verify_every_minutes"),
                g.verify_every_minutes,
                0,
                366 * 24 * 60,
            )?;
            v.range(
                &format!("group[{gi}].resync_max_mib_s"),
                g.resync_max_mib_s,
                0,
                1 << 20,
            )?;
            if let Err(e) = crate::resync::BlockSize::new(g.resync_block_kib.saturating_mul(1024)) {
                return Err(v.err(format!("group[{gi}].resync_block_kib"), e.to_string()));
            }
            if !(-7..=22).contains(&g.zstd_level) {
                return Err(v.err(
                    format!("group[{gi}].zstd_level"),
                    format!("{} is outside -7..=22", g.zstd_level),
                ));
            }
            v.range(
                &format!("group[{gi}].frame_max_kib"),
                g.frame_max_kib,
                1,
                FRAME_KIB_MAX,
            )?;
            v.range(
                &format!("group[{gi}].frame_linger_ms"),
                g.frame_linger_ms,
                0,
                MS_MAX,
            )?;
            v.range(
                &format!("group[{gi}].heartbeat_ms"),
                g.heartbeat_ms,
                1,
                MS_MAX,
            )?;
            v.range(
                &format!("group[{gi}].window_frames"),
                u64::from(g.window_frames),
                1,
                u64::from(WINDOW_FRAMES_MAX),
            )?;
            v.range(&format!("group[{gi}].window_mib"), g.window_mib, 1, MIB_MAX)?;
            v.nonempty(&format!("group[{gi}].disk"), g.disks.len())?;
            let mut ids = HashSet::new();
            for (di, d) in g.disks.iter().enumerate() {
                v.disk(gi, di, &g.name, d.id, &mut ids, &d.path)?;
            }
        }
        self.validate_frontends(&v)
    }

    /// Frontend tables: addresses, names, limits, and agreement between disks
    /// that share a listener or a mount.
    fn validate_frontends(&self, v: &V<'_>) -> Result<(), ConfigError> {
        let mut servers: Vec<(Vec<NbdAddr>, &NbdFrontend, String)> = Vec::new();
        let mut exports: HashSet<(Vec<NbdAddr>, String)> = HashSet::new();
        let mut addrs_seen: Vec<(NbdAddr, Vec<NbdAddr>)> = Vec::new();
        let mut files: HashSet<(PathBuf, String)> = HashSet::new();
        let mut ublk_ids: HashSet<u32> = HashSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (di, d) in g.disks.iter().enumerate() {
                let at = format!("group[{gi}].disk[{di}]");
                if let Some(n) = &d.nbd {
                    v.nonempty(&format!("{at}.nbd.listen"), n.listen.len())?;
                    let mut addrs = Vec::new();
                    for (li, l) in n.listen.iter().enumerate() {
                        let a = parse_nbd_addr(l)
                            .map_err(|m| v.err(format!("{at}.nbd.listen[{li}]"), m))?;
                        if addrs.contains(&a) {
                            return Err(v.err(
                                format!("{at}.nbd.listen[{li}]"),
                                format!("{l:?} is listed twice"),
                            ));
                        }
                        addrs.push(a);
                    }
                    let name = n.export_name(&g.name, d.id);
                    if name.is_empty() || name.len() > 4096 || name.chars().any(char::is_control) {
                        return Err(v.err(
                            format!("{at}.nbd.export"),
                            format!("{name:?} must be 1 to 4096 bytes without control characters"),
                        ));
                    }
                    v.range(
                        &format!("{at}.nbd.max_request_kib"),
                        n.max_request_kib,
                        4,
                        64 * 1024,
                    )?;
                    v.range(
                        &format!("{at}.nbd.max_connections"),
                        u64::from(n.max_connections),
                        1,
                        4096,
                    )?;
                    // An address belongs to exactly one server (listen list).
                    for a in &addrs {
                        if let Some((_, other)) =
                            addrs_seen.iter().find(|(x, l)| x == a && *l != addrs)
                        {
                            return Err(v.err(format!("{at}.nbd.listen"), format!("{a:?} is also part of another listen list {other:?}: disks sharing a listener must list the same addresses")));
                        }
                        addrs_seen.push((a.clone(), addrs.clone()));
                    }
                    if let Some((_, first, where_)) = servers.iter().find(|(l, _, _)| *l == addrs) {
                        if first.tls != n.tls
                            || first.max_request_kib != n.max_request_kib
                            || first.max_connections != n.max_connections
                        {
                            return Err(v.err(format!("{at}.nbd"), format!("shares its listener with {where_} but not its tls, max_request_kib and max_connections")));
                        }
                    } else {
                        servers.push((addrs.clone(), n, at.clone()));
                    }
                    if !exports.insert((addrs, name.clone())) {
                        return Err(v.err(
                            format!("{at}.nbd.export"),
                            format!("export {name:?} is served twice on the same listener"),
                        ));
                    }
                }
                if let Some(f) = &d.fuse {
                    v.path(&format!("{at}.fuse.mountpoint"), &f.mountpoint)?;
                    let name = f.file_name(&g.name, d.id);
                    if name.is_empty()
                        || name == "."
                        || name == ".."
                        || name.contains('/')
                        || name.contains('\0')
                        || name.len() > 255
                    {
                        return Err(v.err(
                            format!("{at}.fuse.file"),
                            format!("{name:?} is not a valid file name"),
                        ));
                    }
                    if !files.insert((f.mountpoint.clone(), name.clone())) {
                        return Err(v.err(
                            format!("{at}.fuse.file"),
                            format!("{name:?} appears twice in mount {}", f.mountpoint.display()),
                        ));
                    }
                }
                if let Some(u) = &d.ublk {
                    validate_ublk(v, &at, u, &mut ublk_ids)?;
                }
            }
        }
        Ok(())
    }

    /// Joins every relative path onto `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.agent.state_dir);
        if let Some(d) = &mut self.agent.spill_dir {
            resolve(base, d);
        }
        for h in [&mut self.agent.tag_pre_hook, &mut self.agent.tag_post_hook]
            .into_iter()
            .flatten()
        {
            resolve(base, h);
        }
        self.tls.resolve(base);
        for g in &mut self.groups {
            resolve(base, &mut g.key_file);
            for d in &mut g.disks {
                resolve(base, &mut d.path);
                if let Some(f) = &mut d.fuse {
                    resolve(base, &mut f.mountpoint);
                }
                if let Some(n) = &mut d.nbd {
                    for l in &mut n.listen {
                        if let Some(p) = l.strip_prefix("unix:") {
                            let mut p = PathBuf::from(p);
                            resolve(base, &mut p);
                            *l = format!("unix:{}", p.display());
                        }
                    }
                }
            }
        }
    }

    /// The file's text, as `tidemark init` writes it.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }
}

/// A `[group.disk.ublk]` table: the limits of `ublk_drv` (device numbers,
/// queue depth, 32 MiB requests) and of this agent (threads, buffer memory).
fn validate_ublk(
    v: &V<'_>,
    at: &str,
    u: &UblkFrontend,
    ids: &mut HashSet<u32>,
) -> Result<(), ConfigError> {
    if let Some(id) = u.dev_id {
        v.range(
            &format!("{at}.ublk.dev_id"),
            u64::from(id),
            0,
            (1 << 20) - 1,
        )?;
        if !ids.insert(id) {
            return Err(v.err(
                format!("{at}.ublk.dev_id"),
                format!("/dev/ublkb{id} is asked for by another disk"),
            ));
        }
    }
    v.range(
        &format!("{at}.ublk.queues"),
        u64::from(u.queues),
        1,
        UBLK_QUEUES_MAX,
    )?;
    v.range(&format!("{at}.ublk.depth"), u64::from(u.depth), 1, 4096)?;
    v.range(
        &format!("{at}.ublk.max_request_kib"),
        u.max_request_kib,
        4,
        32 * 1024,
    )?;
    if !u.max_request_kib.is_multiple_of(4) {
        return Err(v.err(
            format!("{at}.ublk.max_request_kib"),
            format!("{} is not a multiple of 4", u.max_request_kib),
        ));
    }
    if u.logical_block != 512 && u.logical_block != 4096 {
        return Err(v.err(
            format!("{at}.ublk.logical_block"),
            format!("{} is neither 512 nor 4096", u.logical_block),
        ));
    }
    let kib = u64::from(u.depth) * u.max_request_kib;
    if kib > UBLK_QUEUE_BUFFERS_MIB_MAX << 10 {
        let mib = kib.div_ceil(1024);
        return Err(v.err(
            format!("{at}.ublk"),
            format!(
                "depth × max_request_kib is {mib} MiB of buffers per queue, above {UBLK_QUEUE_BUFFERS_MIB_MAX} MiB"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorKind};

    const AGENT: &str = r#"
[agent]
name = "agent"
relay = "relay.example.com:7400"
relay_name = "relay"
state_dir = "agent-state"

[tls]
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"

[[group]]
name = "g1"
key_file = "keys/g1.key"

[[group.disk]]
id = 0
path = "disks/d0.img"
UBLK0

[[group.disk]]
id = 1
path = "disks/d1.img"
UBLK1
"#;

    fn load(ublk0: &str, ublk1: &str) -> Result<AgentConfig, ConfigError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.toml");
        let text = AGENT.replace("UBLK0", ublk0).replace("UBLK1", ublk1);
        std::fs::write(&p, text).unwrap();
        AgentConfig::load(&p)
    }

    #[test]
    fn ublk_tables_load_with_defaults_and_round_trip() {
        let a = load(
            "[group.disk.ublk]",
            "[group.disk.ublk]\ndev_id = 9\nqueues = 2\ndepth = 128\nmax_request_kib = 1024\nlogical_block = 512",
        )
        .unwrap();
        let u0 = a.groups[0].disks[0].ublk.as_ref().unwrap();
        assert_eq!(
            *u0,
            UblkFrontend {
                dev_id: None,
                queues: 1,
                depth: 64,
                max_request_kib: 512,
                logical_block: 4096,
            }
        );
        let u1 = a.groups[0].disks[1].ublk.as_ref().unwrap();
        assert_eq!(
            (
                u1.dev_id,
                u1.queues,
                u1.depth,
                u1.max_request_kib,
                u1.logical_block
            ),
            (Some(9), 2, 128, 1024, 512)
        );
        let back: AgentConfig = toml::from_str(&a.to_toml_string().unwrap()).unwrap();
        assert_eq!(back, a);
        assert!(load("", "").unwrap().groups[0].disks[0].ublk.is_none());
    }

    #[test]
    fn bad_ublk_tables_are_named() {
        for (bad, field) in [
            ("dev_id = 1048576", "group[0].disk[0].ublk.dev_id"),
            ("queues = 0", "group[0].disk[0].ublk.queues"),
            ("queues = 65", "group[0].disk[0].ublk.queues"),
            ("depth = 0", "group[0].disk[0].ublk.depth"),
            ("depth = 4097", "group[0].disk[0].ublk.depth"),
            (
                "max_request_kib = 2",
                "group[0].disk[0].ublk.max_request_kib",
            ),
            (
                "max_request_kib = 65536",
                "group[0].disk[0].ublk.max_request_kib",
            ),
            (
                "max_request_kib = 6",
                "group[0].disk[0].ublk.max_request_kib",
            ),
            (
                "logical_block = 1024",
                "group[0].disk[0].ublk.logical_block",
            ),
            (
                "depth = 4096\nmax_request_kib = 512",
                "group[0].disk[0].ublk:",
            ),
            ("queue = 2", "queue"),
        ] {
            let e = load(&format!("[group.disk.ublk]\n{bad}"), "").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            let s = e.to_string();
            assert!(!s.contains('\n'), "{bad}: {s}");
            assert!(s.contains("agent.toml") && s.contains(field), "{bad}: {s}");
        }
        let e = load(
            "[group.disk.ublk]\ndev_id = 3",
            "[group.disk.ublk]\ndev_id = 3",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("group[0].disk[1].ublk.dev_id") && e.contains("/dev/ublkb3"),
            "{e}"
        );
    }
}
