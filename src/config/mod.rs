//! Role configuration files: `relay.toml`, `target.toml`, `agent.toml`.
//!
//! Each file is parsed strictly (`deny_unknown_fields`, typed values), then
//! validated (names, sizes, unique ids) and its relative paths are resolved
//! against the directory holding the file, so a role can be started from any
//! working directory. Every error is one line naming the file and the field.
//!
//! Durations are in milliseconds, sizes in the unit the field's name carries
//! (`_kib`, `_mib`, `_gib`). The relay's file has no place for a data key: the
//! relay never holds one.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};
use crate::transport::tls::TlsFiles;

mod agent;
pub use agent::*;

/// Longest role, instance or group name, in bytes.
pub const NAME_MAX: usize = 32;

/// Upper bound for any `_mib` size, so byte counts never overflow (1 TiB).
const MIB_MAX: u64 = 1 << 20;
/// Upper bound for `spool_max_gib` (16 TiB).
const GIB_MAX: u64 = 1 << 14;
/// Upper bound for `frame_max_kib` (64 MiB): a frame is buffered whole in memory.
const FRAME_KIB_MAX: u64 = 64 * 1024;
/// Upper bound for `window_frames`.
const WINDOW_FRAMES_MAX: u32 = 65_536;
/// Upper bound for any millisecond duration (one hour).
const MS_MAX: u64 = 3_600_000;

/// A configuration file could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}:{line}: {field}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending item (0 if unknown).
        line: usize,
        /// Dotted field name, e.g. `agent.heartbeat_ms` or `group.disk.id`.
        field: String,
        /// What was wrong, in toml/serde's words.
        msg: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{path}: {field}: {msg}")]
    Invalid {
        /// The file (empty when validating an in-memory config).
        path: PathBuf,
        /// Dotted field name with indices, e.g. `group[1].disk[0].id`.
        field: String,
        /// What was wrong.
        msg: String,
    },
    /// A configuration could not be serialized to TOML.
    #[error("cannot serialize config: {0}")]
    Serialize(#[from] toml::ser::Error),
}

impl Classify for ConfigError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Config
    }
}

/// The `[tls]` table common to all roles: the project CA and this role's
/// certificate and private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate that signed every peer.
    pub ca: PathBuf,
    /// This role's certificate.
    pub cert: PathBuf,
    /// This role's private key (should be mode 0600).
    pub key: PathBuf,
}

impl TlsSection {
    /// The files for [`crate::transport::tls`].
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// I/O engine the target applies frames with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// io_uring on a dedicated thread.
    Uring,
    /// Plain `pwrite` + `fdatasync`, for kernels without io_uring.
    Sync,
}

/// target.toml's `direct_io`: `true`, `false` or `"auto"`.
pub use crate::image::DirectIo;

// In target.toml: `false`, `true`, or the string "auto" (a bool from older
// configs keeps its meaning).
impl Serialize for DirectIo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DirectIo::Off => s.serialize_bool(false),
            DirectIo::On => s.serialize_bool(true),
            DirectIo::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for DirectIo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DirectIo;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"true, false or "auto""#)
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<DirectIo, E> {
                Ok(if v { DirectIo::On } else { DirectIo::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DirectIo, E> {
                match v {
                    "auto" => Ok(DirectIo::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------- relay.toml

/// `relay.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The `[relay]` table.
    pub relay: RelaySection,
    /// The `[tls]` table.
    pub tls: TlsSection,
}

/// The `[relay]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Instance name; its certificate carries `<name>.relay.tidemark`.
    pub name: String,
    /// Address agents and targets connect to.
    pub listen: SocketAddr,
    /// Directory of the durable spool.
    pub spool_dir: PathBuf,
    /// Optional HTTP listener for `/metrics` and `/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_listen: Option<SocketAddr>,
    /// Size of one spool segment file, MiB.
    #[serde(default = "d64")]
    pub spool_segment_mib: u64,
    /// Spool size above which the relay stops reading from agents, GiB.
    #[serde(default = "d64")]
    pub spool_max_gib: u64,
    /// Write the spool with O_DIRECT (when the file system allows it): less CPU
    /// per byte, no page cache, but on some virtual disks less throughput than
    /// buffered writes. See docs/SPOOL.md.
    #[serde(default)]
    pub spool_direct_io: bool,
    /// Trimmed spool segment files each group keeps for reuse (0..=64; 0
    /// deletes them): writing over an old file is cheaper than growing a new
    /// one. Each takes up to `spool_segment_mib` of disk beyond
    /// `spool_max_gib`. See docs/SPOOL.md, "Recycled segment files".
    #[serde(default = "d_recycle")]
    pub spool_recycle_segments: usize,
}

fn d_recycle() -> usize {
    crate::spool::DEFAULT_RECYCLE_SEGMENTS
}

impl RelaySection {
    /// `spool_segment_mib` in bytes.
    pub fn spool_segment_bytes(&self) -> u64 {
        self.spool_segment_mib << 20
    }
    /// `spool_max_gib` in bytes.
    pub fn spool_max_bytes(&self) -> u64 {
        self.spool_max_gib << 30
    }
}

// --------------------------------------------------------------- target.toml

/// `target.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// The `[target]` table.
    pub target: TargetSection,
    /// The `[tls]` table.
    pub tls: TlsSection,
    /// The `[[group]]` tables: groups replicated to this target.
    #[serde(rename = "group")]
    pub groups: Vec<TargetGroup>,
}

/// The `[target]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// Instance name; its certificate carries `<name>.target.tidemark`.
    pub name: String,
    /// Relay address, `host:port`.
    pub relay: String,
    /// TLS server name the relay's certificate must carry.
    pub relay_name: String,
    /// Directory for journals, watermarks and the catalog.
    pub state_dir: PathBuf,
    /// Optional HTTP listener for `/metrics` and `/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_listen: Option<SocketAddr>,
    /// I/O engine for applying frames.
    pub engine: Engine,
    /// Maximum bytes applied per durability batch, MiB.
    #[serde(default = "d32")]
    pub apply_batch_mib: u64,
    /// Write block-aligned data to the raw replicas (and flat VMDK extents)
    /// with O_DIRECT: `true`, `false`, or `"auto"` (the default: on for block
    /// devices and files without holes, off for sparse files, where ext4 runs
    /// direct writes that allocate one at a time). See docs/IMAGE.md.
    #[serde(default)]
    pub direct_io: DirectIo,
    /// Longest the relay may send nothing (no frame, no byte of one, no sign
    /// of life) while the target waits for it, before the connection counts
    /// as lost and is opened again, ms: its process is hung (TCP keepalive
    /// answers for a stopped process). At least 3000: the relay sends a sign
    /// of life every second. Time the target spends not reading (its apply
    /// queue full, a disk full) does not count.
    #[serde(default = "d60000")]
    pub relay_silence_ms: u64,
}

impl TargetSection {
    /// `apply_batch_mib` in bytes.
    pub fn apply_batch_bytes(&self) -> u64 {
        self.apply_batch_mib << 20
    }
}

/// A `[[group]]` table of `target.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroup {
    /// Group name; the agent's certificate must carry `<name>.group.tidemark`.
    pub name: String,
    /// The group's data key (64 hex characters).
    pub key_file: PathBuf,
    /// Epoch of the data key, part of every nonce.
    #[serde(default = "d1u32")]
    pub key_epoch: u32,
    /// The `[[group.disk]]` tables: replica images.
    #[serde(rename = "disk")]
    pub disks: Vec<TargetDisk>,
    /// The `[group.retention]` table: which recovery points to keep.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// A `[group.retention]` table of `target.toml` (docs/CONSISTENCY.md,
/// "Retention"). With `enabled = false` (the default) only the newest point
/// is recoverable; before-images are then kept only while M data is applied
/// and while a reader (recover, expose) uses a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep before-images of overwritten blocks, so older points stay
    /// recoverable.
    #[serde(default)]
    pub enabled: bool,
    /// At most one crash-consistent point per this many milliseconds of
    /// source time.
    #[serde(default = "d1000")]
    pub granularity_ms: u64,
    /// Keep every point for this many seconds.
    #[serde(default = "d3600")]
    pub window_s: u64,
    /// Then one per hour for this many hours.
    #[serde(default = "d24")]
    pub hourly_h: u64,
    /// Then one per day for this many days.
    #[serde(default)]
    pub daily_days: u32,
    /// Cap on the retention journal, MiB (0: none); the oldest points go first.
    #[serde(default)]
    pub max_mib: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            enabled: false,
            granularity_ms: 1000,
            window_s: 3600,
            hourly_h: 24,
            daily_days: 0,
            max_mib: 0,
        }
    }
}

impl RetentionConfig {
    /// The policy these settings describe.
    pub fn policy(&self) -> crate::target::retention::policy::Policy {
        crate::target::retention::policy::Policy {
            enabled: self.enabled,
            granularity_us: self.granularity_ms.saturating_mul(1000),
            window_us: self.window_s.saturating_mul(1_000_000),
            hourly_us: self.hourly_h.saturating_mul(3_600_000_000),
            daily_days: self.daily_days,
            max_bytes: self.max_mib.saturating_mul(1 << 20),
        }
    }
}

fn d60000() -> u64 {
    60_000
}
fn d1000() -> u64 {
    1000
}
fn d3600() -> u64 {
    3600
}
fn d24() -> u64 {
    24
}

/// A `[[group.disk]]` table of `target.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetDisk {
    /// Disk id, unique within the group, equal to the agent's id for the source.
    pub id: u32,
    /// Replica image: raw file or block device, or a VMDK descriptor.
    pub path: PathBuf,
    /// Layout of the replica: `raw` (a file or block device), `vmdk`
    /// (monolithicSparse: grains allocated on first write) or `vmdk-flat`
    /// (monolithicFlat: descriptor + flat extent `<name>-flat.vmdk`). A missing
    /// replica is created in this format at the source disk's size.
    #[serde(default, skip_serializing_if = "ReplicaFormat::is_raw")]
    pub format: ReplicaFormat,
}

/// The layout of a replica image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaFormat {
    /// Virtual offset = file offset: a regular file or a block device.
    #[default]
    Raw,
    /// VMDK monolithicSparse.
    Vmdk,
    /// VMDK monolithicFlat.
    VmdkFlat,
}

impl ReplicaFormat {
    /// True for [`ReplicaFormat::Raw`].
    pub fn is_raw(&self) -> bool {
        *self == ReplicaFormat::Raw
    }

    /// The image backend's format.
    pub fn image_format(self) -> crate::image::ImageFormat {
        match self {
            ReplicaFormat::Raw => crate::image::ImageFormat::Raw,
            ReplicaFormat::Vmdk => crate::image::ImageFormat::VmdkSparse,
            ReplicaFormat::VmdkFlat => crate::image::ImageFormat::VmdkFlat,
        }
    }
}

fn d1u32() -> u32 {
    1
}
fn d1i32() -> i32 {
    1
}
fn d20() -> u64 {
    20
}
fn d32() -> u64 {
    32
}
fn d32u32() -> u32 {
    32
}
fn d64() -> u64 {
    64
}
fn d2000() -> u64 {
    2000
}
fn d1024() -> u64 {
    1024
}
fn d300000() -> u64 {
    300_000
}
fn d4096() -> u64 {
    4096
}
fn dtrue() -> bool {
    true
}

// ------------------------------------------------------------------ loading

impl RelayConfig {
    /// Reads, parses, validates `path` and resolves its relative paths.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut cfg, base) = load_file::<Self>(path)?;
        cfg.validate_at(path)?;
        cfg.resolve_paths(&base);
        Ok(cfg)
    }

    /// Checks every value; `path` only labels the errors.
    pub fn validate_at(&self, path: &Path) -> Result<(), ConfigError> {
        let v = V(path);
        let r = &self.relay;
        v.name("relay.name", &r.name)?;
        v.range("relay.spool_segment_mib", r.spool_segment_mib, 1, 4096)?;
        v.range("relay.spool_max_gib", r.spool_max_gib, 1, GIB_MAX)?;
        v.range(
            "relay.spool_recycle_segments",
            r.spool_recycle_segments as u64,
            0,
            crate::spool::MAX_RECYCLE_SEGMENTS as u64,
        )?;
        v.path("relay.spool_dir", &r.spool_dir)?;
        v.tls(&self.tls)
    }

    /// Joins every relative path onto `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.relay.spool_dir);
        self.tls.resolve(base);
    }

    /// The file's text, as `tidemark init` writes it.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }
}

impl TargetConfig {
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
        let t = &self.target;
        v.name("target.name", &t.name)?;
        v.addr("target.relay", &t.relay)?;
        v.server_name("target.relay_name", &t.relay_name)?;
        v.path("target.state_dir", &t.state_dir)?;
        v.range("target.apply_batch_mib", t.apply_batch_mib, 1, 1024)?;
        v.range("target.relay_silence_ms", t.relay_silence_ms, 3000, MS_MAX)?;
        v.tls(&self.tls)?;
        v.nonempty("group", self.groups.len())?;
        let mut names = HashSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            v.group_common(gi, &g.name, &mut names, &g.key_file, g.key_epoch)?;
            v.nonempty(&format!("group[{gi}].disk"), g.disks.len())?;
            let r = &g.retention;
            v.range(
                &format!("group[{gi}].retention.granularity_ms"),
                r.granularity_ms,
                1,
                86_400_000,
            )?;
            v.range(
                &format!("group[{gi}].retention.window_s"),
                r.window_s,
                0,
                366 * 86_400,
            )?;
            v.range(
                &format!("group[{gi}].retention.hourly_h"),
                r.hourly_h,
                0,
                366 * 24,
            )?;
            v.range(
                &format!("group[{gi}].retention.daily_days"),
                u64::from(r.daily_days),
                0,
                3660,
            )?;
            v.range(
                &format!("group[{gi}].retention.max_mib"),
                r.max_mib,
                0,
                1 << 30,
            )?;
            let mut ids = HashSet::new();
            for (di, d) in g.disks.iter().enumerate() {
                v.disk(gi, di, &g.name, d.id, &mut ids, &d.path)?;
            }
        }
        Ok(())
    }

    /// Joins every relative path onto `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.target.state_dir);
        self.tls.resolve(base);
        for g in &mut self.groups {
            resolve(base, &mut g.key_file);
            for d in &mut g.disks {
                resolve(base, &mut d.path);
            }
        }
    }

    /// The file's text, as `tidemark init` writes it.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }
}

impl TlsSection {
    fn resolve(&mut self, base: &Path) {
        resolve(base, &mut self.ca);
        resolve(base, &mut self.cert);
        resolve(base, &mut self.key);
    }
}

/// Checks a role, instance or group name: `[a-z0-9-]`, 1..=32 bytes, no
/// leading or trailing `-`. Such a name is always a valid DNS label, which the
/// certificate identity scheme relies on.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(format!("{name:?} must be 1 to {NAME_MAX} bytes long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{name:?} contains {c:?}; only a-z, 0-9 and '-' are allowed"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must not begin or end with '-'"));
    }
    Ok(())
}

/// Reads and parses `path`; returns the config and the absolute directory
/// holding the file (the base for relative paths).
fn load_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg = toml::from_str::<T>(&text).map_err(|e| parse_error(path, &text, &e))?;
    let abs = std::path::absolute(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    Ok((cfg, base))
}

/// Turns toml's multi-line error into one line naming the field: the table
/// header above the error and the key on the error's line (or the field named
/// in a "missing field"/"unknown field" message).
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim().replace('\n', " ");
    let mut start = e.span().map(|s| s.start.min(text.len())).unwrap_or(0);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let before = &text[..start];
    let line = if e.span().is_some() {
        before.matches('\n').count() + 1
    } else {
        0
    };
    // Current table: the last header line at or before the error.
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let upto = &text[..line_end];
    let table = upto
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let this_line = text[line_start..line_end].trim();
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| msg.strip_prefix(p).and_then(|r| r.split('`').next()))
        .map(str::to_string);
    let key = named.or_else(|| {
        if this_line.starts_with('[') {
            None
        } else {
            this_line
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
        }
    });
    // An unknown table is reported at its own header: the header is the field.
    let header_is_key = this_line.starts_with('[')
        && key
            .as_deref()
            .is_some_and(|k| table.rsplit('.').next() == Some(k));
    let field = match (table.is_empty() || header_is_key, key) {
        (_, Some(_)) if header_is_key => table,
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (false, None) => table,
        (true, None) => "(file)".to_string(),
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        field,
        msg,
    }
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn check_unique_paths<'a>(
    path: &Path,
    disks: impl Iterator<Item = (usize, usize, &'a PathBuf)>,
) -> Result<(), ConfigError> {
    let mut seen: HashSet<&PathBuf> = HashSet::new();
    for (gi, di, p) in disks {
        if !seen.insert(p) {
            return Err(V(path).err(
                format!("group[{gi}].disk[{di}].path"),
                format!("{} is used by another disk", p.display()),
            ));
        }
    }
    Ok(())
}

/// Validation helpers labelling errors with the file.
struct V<'a>(&'a Path);

impl V<'_> {
    fn err(&self, field: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.0.to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn name(&self, field: &str, name: &str) -> Result<(), ConfigError> {
        validate_name(name).map_err(|m| self.err(field, m))
    }

    fn range(&self, field: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
        if v < lo || v > hi {
            return Err(self.err(field, format!("{v} is outside {lo}..={hi}")));
        }
        Ok(())
    }

    fn nonempty(&self, field: &str, n: usize) -> Result<(), ConfigError> {
        if n == 0 {
            return Err(self.err(field, "at least one table is required"));
        }
        Ok(())
    }

    fn path(&self, field: &str, p: &Path) -> Result<(), ConfigError> {
        if p.as_os_str().is_empty() {
            return Err(self.err(field, "path is empty"));
        }
        Ok(())
    }

    fn addr(&self, field: &str, a: &str) -> Result<(), ConfigError> {
        let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(self.err(field, format!("{a:?} is not host:port")));
        }
        Ok(())
    }

    fn server_name(&self, field: &str, n: &str) -> Result<(), ConfigError> {
        rustls::pki_types::ServerName::try_from(n)
            .map(|_| ())
            .map_err(|_| {
                self.err(
                    field,
                    format!("{n:?} is not a valid DNS name or IP address"),
                )
            })
    }

    fn tls(&self, t: &TlsSection) -> Result<(), ConfigError> {
        self.path("tls.ca", &t.ca)?;
        self.path("tls.cert", &t.cert)?;
        self.path("tls.key", &t.key)
    }

    fn group_common<'n>(
        &self,
        gi: usize,
        name: &'n str,
        names: &mut HashSet<&'n str>,
        key_file: &Path,
        key_epoch: u32,
    ) -> Result<(), ConfigError> {
        self.name(&format!("group[{gi}].name"), name)?;
        if !names.insert(name) {
            return Err(self.err(
                format!("group[{gi}].name"),
                format!("duplicate group name {name:?}"),
            ));
        }
        self.path(&format!("group[{gi}].key_file"), key_file)?;
        if key_epoch == 0 {
            return Err(self.err(format!("group[{gi}].key_epoch"), "must be at least 1"));
        }
        Ok(())
    }

    fn disk(
        &self,
        gi: usize,
        di: usize,
        group: &str,
        id: u32,
        ids: &mut HashSet<u32>,
        path: &Path,
    ) -> Result<(), ConfigError> {
        if id > u32::from(u16::MAX) {
            return Err(self.err(
                format!("group[{gi}].disk[{di}].id"),
                format!("{id} is above 65535 (the frame format carries disk ids in 16 bits)"),
            ));
        }
        if !ids.insert(id) {
            return Err(self.err(
                format!("group[{gi}].disk[{di}].id"),
                format!("duplicate disk id {id} in group {group}"),
            ));
        }
        self.path(&format!("group[{gi}].disk[{di}].path"), path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    const RELAY: &str = r#"
[relay]
name = "relay"
listen = "0.0.0.0:7400"
spool_dir = "spool"
status_listen = "127.0.0.1:7401"

[tls]
ca = "ca.pem"
cert = "relay.pem"
key = "relay.key"
"#;

    const TARGET: &str = r#"
[target]
name = "target"
relay = "127.0.0.1:7400"
relay_name = "relay"
state_dir = "target-state"
engine = "uring"

[tls]
ca = "ca.pem"
cert = "target.pem"
key = "target.key"

[[group]]
name = "g1"
key_file = "keys/g1.key"

[[group.disk]]
id = 0
path = "replicas/g1-disk0.img"

[[group.disk]]
id = 1
path = "/dev/sdz"
"#;

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
zstd_level = -3

[[group.disk]]
id = 0
path = "disks/g1-disk0.img"

[[group]]
name = "g2"
key_file = "keys/g2.key"
key_epoch = 4

[[group.disk]]
id = 0
path = "disks/g2-disk0.img"
initial_copy = false
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s}");
        s
    }

    #[test]
    fn relay_loads_with_defaults_and_resolved_paths() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "relay.toml", RELAY);
        let c = RelayConfig::load(&p).unwrap();
        assert_eq!(c.relay.spool_segment_mib, 64);
        assert_eq!(c.relay.spool_max_gib, 64);
        assert_eq!(c.relay.spool_max_bytes(), 64 << 30);
        assert_eq!(c.relay.spool_recycle_segments, 2);
        let text = RELAY.replace("[tls]", "spool_recycle_segments = 65\n[tls]");
        let s = err_of(RelayConfig::load(&write(d.path(), "r65.toml", &text)));
        assert!(s.contains("relay.spool_recycle_segments"), "{s}");
        assert_eq!(
            c.relay.status_listen,
            Some("127.0.0.1:7401".parse().unwrap())
        );
        let base = std::path::absolute(d.path()).unwrap();
        assert_eq!(c.relay.spool_dir, base.join("spool"));
        assert_eq!(c.tls.key, base.join("relay.key"));
        assert!(c.tls.ca.is_absolute());
    }

    #[test]
    fn target_and_agent_load() {
        let d = tempfile::tempdir().unwrap();
        let t = TargetConfig::load(&write(d.path(), "target.toml", TARGET)).unwrap();
        assert_eq!(t.target.engine, Engine::Uring);
        assert_eq!(t.target.apply_batch_mib, 32);
        assert_eq!(t.groups[0].key_epoch, 1);
        assert_eq!(t.groups[0].disks[1].path, PathBuf::from("/dev/sdz"));
        assert!(t.groups[0].disks[0].path.ends_with("replicas/g1-disk0.img"));
        assert!(t.groups[0].disks[0].path.is_absolute());

        let a = AgentConfig::load(&write(d.path(), "agent.toml", AGENT)).unwrap();
        assert_eq!(a.agent.capture_budget_mib, 64);
        assert_eq!(a.agent.status_listen, None);
        let g1 = &a.groups[0];
        assert_eq!(g1.zstd_level, -3);
        assert_eq!(g1.frame_max_kib, 4096);
        assert_eq!(g1.frame_max_bytes(), 4 << 20);
        assert_eq!(g1.frame_linger(), Duration::from_millis(20));
        assert_eq!(g1.heartbeat(), Duration::from_millis(2000));
        assert_eq!(g1.window_frames, 32);
        assert_eq!(g1.window_mib, 32);
        assert!(g1.disks[0].initial_copy);
        assert_eq!(a.groups[1].key_epoch, 4);
        assert!(!a.groups[1].disks[0].initial_copy);
    }

    #[test]
    fn direct_io_is_true_false_or_auto_and_auto_by_default() {
        let d = tempfile::tempdir().unwrap();
        let t = TargetConfig::load(&write(d.path(), "target.toml", TARGET)).unwrap();
        assert_eq!(t.target.direct_io, DirectIo::Auto);
        for (v, want) in [
            ("true", DirectIo::On),
            ("false", DirectIo::Off),
            ("\"auto\"", DirectIo::Auto),
        ] {
            let text = TARGET.replace(
                "engine = \"uring\"",
                &format!("engine = \"uring\"\ndirect_io = {v}"),
            );
            let t = TargetConfig::load(&write(d.path(), "t.toml", &text)).unwrap();
            assert_eq!(t.target.direct_io, want, "{v}");
            // It is written back as it was given.
            assert_eq!(t, toml::from_str(&t.to_toml_string().unwrap()).unwrap());
        }
        for v in ["\"yes\"", "1"] {
            let text = TARGET.replace(
                "engine = \"uring\"",
                &format!("engine = \"uring\"\ndirect_io = {v}"),
            );
            let s = err_of(TargetConfig::load(&write(d.path(), "t.toml", &text)));
            assert!(
                s.contains("direct_io") && s.contains(r#"true, false or "auto""#),
                "{s}"
            );
        }
    }

    #[test]
    fn round_trip_through_to_toml_string() {
        let d = tempfile::tempdir().unwrap();
        let a: AgentConfig = toml::from_str(AGENT).unwrap();
        let text = a.to_toml_string().unwrap();
        let back: AgentConfig = toml::from_str(&text).unwrap();
        assert_eq!(a, back);
        let t: TargetConfig = toml::from_str(TARGET).unwrap();
        assert_eq!(t, toml::from_str(&t.to_toml_string().unwrap()).unwrap());
        let r: RelayConfig = toml::from_str(RELAY).unwrap();
        let rt = r.to_toml_string().unwrap();
        assert_eq!(r, toml::from_str(&rt).unwrap());
        // And the written text loads through the full loader.
        RelayConfig::load(&write(d.path(), "r.toml", &rt)).unwrap();
    }

    #[test]
    fn relay_config_refuses_a_data_key() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{RELAY}\n[[group]]\nname = \"g1\"\nkey_file = \"keys/g1.key\"\n");
        let s = err_of(RelayConfig::load(&write(d.path(), "relay.toml", &text)));
        assert!(s.contains("relay.toml:13: group: unknown field"), "{s}");
        let text = RELAY.replace("[tls]", "key_file = \"keys/g1.key\"\n[tls]");
        let s = err_of(RelayConfig::load(&write(d.path(), "relay.toml", &text)));
        assert!(s.contains("relay.key_file"), "{s}");
    }

    #[test]
    fn missing_field_names_file_and_field() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "relay.toml",
            &RELAY.replace("listen = \"0.0.0.0:7400\"\n", ""),
        );
        let s = err_of(RelayConfig::load(&p));
        assert!(
            s.contains("relay.toml") && s.contains("relay.listen") && s.contains("missing"),
            "{s}"
        );

        let p = write(
            d.path(),
            "agent.toml",
            &AGENT.replace("path = \"disks/g2-disk0.img\"\n", ""),
        );
        let s = err_of(AgentConfig::load(&p));
        assert!(
            s.contains("agent.toml") && s.contains("group.disk.path"),
            "{s}"
        );
    }

    #[test]
    fn wrong_type_names_file_field_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "agent.toml",
            &AGENT.replace("zstd_level = -3", "zstd_level = \"fast\""),
        );
        let s = err_of(AgentConfig::load(&p));
        assert!(
            s.contains("agent.toml:16:") && s.contains("group.zstd_level"),
            "{s}"
        );

        let p = write(
            d.path(),
            "target.toml",
            &TARGET.replace("\"uring\"", "\"aio\""),
        );
        let s = err_of(TargetConfig::load(&p));
        assert!(
            s.contains("target.toml") && s.contains("target.engine"),
            "{s}"
        );

        let p = write(
            d.path(),
            "relay.toml",
            &RELAY.replace("\"0.0.0.0:7400\"", "\"nowhere\""),
        );
        let s = err_of(RelayConfig::load(&p));
        assert!(s.contains("relay.listen"), "{s}");

        let p = write(d.path(), "relay.toml", "[relay\nname=");
        let s = err_of(RelayConfig::load(&p));
        assert!(s.contains("relay.toml:1"), "{s}");
    }

    #[test]
    fn bad_group_name_is_refused() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["G1", "-g", "g-", "", "g_1", &"x".repeat(33)] {
            let text = AGENT.replace("name = \"g2\"", &format!("name = \"{bad}\""));
            let s = err_of(AgentConfig::load(&write(d.path(), "agent.toml", &text)));
            assert!(
                s.contains("agent.toml") && s.contains("group[1].name"),
                "{s}"
            );
        }
        let text = AGENT.replace("name = \"g2\"", "name = \"g1\"");
        let s = err_of(AgentConfig::load(&write(d.path(), "agent.toml", &text)));
        assert!(
            s.contains("group[1].name") && s.contains("duplicate"),
            "{s}"
        );
        let text = RELAY.replace("name = \"relay\"", "name = \"Relay\"");
        let s = err_of(RelayConfig::load(&write(d.path(), "relay.toml", &text)));
        assert!(s.contains("relay.name"), "{s}");
    }

    #[test]
    fn duplicate_disk_id_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = TARGET.replace("id = 1", "id = 0");
        let s = err_of(TargetConfig::load(&write(d.path(), "target.toml", &text)));
        assert!(
            s.contains("target.toml")
                && s.contains("group[0].disk[1].id")
                && s.contains("duplicate disk id 0"),
            "{s}"
        );
        // Same id in different groups is fine; the same path twice is not.
        let text = AGENT.replace("disks/g2-disk0.img", "disks/g1-disk0.img");
        let s = err_of(AgentConfig::load(&write(d.path(), "agent.toml", &text)));
        assert!(s.contains("group[1].disk[0].path"), "{s}");
    }

    #[test]
    fn sizes_and_levels_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("zstd_level = -3", "zstd_level = 23", "group[0].zstd_level"),
            (
                "zstd_level = -3",
                "frame_max_kib = 0",
                "group[0].frame_max_kib",
            ),
            (
                "zstd_level = -3",
                "window_frames = 0",
                "group[0].window_frames",
            ),
            (
                "zstd_level = -3",
                "heartbeat_ms = 0",
                "group[0].heartbeat_ms",
            ),
            ("key_epoch = 4", "key_epoch = 0", "group[1].key_epoch"),
            (
                "state_dir = \"agent-state\"",
                "state_dir = \"agent-state\"\ncapture_budget_mib = 0",
                "agent.capture_budget_mib",
            ),
            (
                "state_dir = \"agent-state\"",
                "state_dir = \"agent-state\"\nrelay_silence_ms = 500",
                "agent.relay_silence_ms",
            ),
            (
                "relay = \"relay.example.com:7400\"",
                "relay = \"relay.example.com\"",
                "agent.relay",
            ),
            (
                "relay_name = \"relay\"",
                "relay_name = \"bad name\"",
                "agent.relay_name",
            ),
        ];
        for (from, to, field) in cases {
            let text = AGENT.replacen(from, to, 1);
            let s = err_of(AgentConfig::load(&write(d.path(), "agent.toml", &text)));
            assert!(s.contains(field), "{field}: {s}");
        }
        let text = RELAY.replace("[tls]", "spool_segment_mib = 0\n[tls]");
        let s = err_of(RelayConfig::load(&write(d.path(), "relay.toml", &text)));
        assert!(s.contains("relay.spool_segment_mib"), "{s}");
        let text = TARGET.replace(
            "engine = \"uring\"",
            "engine = \"sync\"\napply_batch_mib = -1",
        );
        let s = err_of(TargetConfig::load(&write(d.path(), "target.toml", &text)));
        assert!(s.contains("target.apply_batch_mib"), "{s}");
        let text = TARGET.replace(
            "engine = \"uring\"",
            "engine = \"uring\"\nrelay_silence_ms = 2999",
        );
        let s = err_of(TargetConfig::load(&write(d.path(), "target.toml", &text)));
        assert!(s.contains("target.relay_silence_ms"), "{s}");
    }

    #[test]
    fn empty_group_or_disk_lists_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = "group = []\n".to_string() + &TARGET[..TARGET.find("[[group]]").unwrap()];
        let s = err_of(TargetConfig::load(&write(d.path(), "target.toml", &text)));
        assert!(s.contains("target.toml: group: at least one"), "{s}");
        let text = TARGET[..TARGET.find("[[group.disk]]").unwrap()].to_string() + "disk = []\n";
        let s = err_of(TargetConfig::load(&write(d.path(), "target.toml", &text)));
        assert!(s.contains("group[0].disk: at least one"), "{s}");
    }

    #[test]
    fn missing_file_is_a_config_error() {
        let s = err_of(RelayConfig::load(Path::new(
            "/nonexistent/tidemark/relay.toml",
        )));
        assert!(s.contains("/nonexistent/tidemark/relay.toml"), "{s}");
    }

    #[test]
    fn frontend_tables_load_and_bad_ones_are_named() {
        let d = tempfile::tempdir().unwrap();
        let fe = r#"
[group.disk.nbd]
listen = ["127.0.0.1:10809", "unix:sock/g1.sock"]
tls = "optional"

[group.disk.fuse]
mountpoint = "mnt"
"#;
        let text = AGENT.replace(
            "path = \"disks/g1-disk0.img\"\n",
            &format!("path = \"disks/g1-disk0.img\"\n{fe}"),
        );
        let a = AgentConfig::load(&write(d.path(), "agent.toml", &text)).unwrap();
        let disk = &a.groups[0].disks[0];
        let n = disk.nbd.as_ref().unwrap();
        assert_eq!(n.export_name("g1", 0), "g1-0");
        assert_eq!(n.tls, NbdTls::Optional);
        assert_eq!(n.max_request_kib, 32 * 1024);
        assert_eq!(n.addrs()[1], NbdAddr::Unix(d.path().join("sock/g1.sock")));
        let f = disk.fuse.as_ref().unwrap();
        assert_eq!(f.mountpoint, d.path().join("mnt"));
        assert_eq!(f.file_name("g1", 0), "g1-0");
        for (bad, field) in [
            ("listen = [\"localhost\"]", "nbd.listen[0]"),
            ("listen = []", "nbd.listen"),
            (
                "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
                "nbd.listen[1]",
            ),
            (
                "listen = [\"127.0.0.1:1\"]\nmax_request_kib = 1",
                "nbd.max_request_kib",
            ),
            ("listen = [\"127.0.0.1:1\"]\ntls = \"maybe\"", "tls"),
        ] {
            let t = AGENT.replace(
                "path = \"disks/g1-disk0.img\"\n",
                &format!("path = \"disks/g1-disk0.img\"\n[group.disk.nbd]\n{bad}\n"),
            );
            let e = err_of(AgentConfig::load(&write(d.path(), "agent.toml", &t)));
            assert!(e.contains(field) && e.contains("agent.toml"), "{bad}: {e}");
        }
        // Two disks exporting one name on one listener, and a shared listener
        // with different settings.
        let two = |a: &str, b: &str| {
            AGENT
                .replace(
                    "path = \"disks/g1-disk0.img\"\n",
                    &format!("path = \"disks/g1-disk0.img\"\n[group.disk.nbd]\n{a}\n"),
                )
                .replace(
                    "initial_copy = false\n",
                    &format!("initial_copy = false\n[group.disk.nbd]\n{b}\n"),
                )
        };
        let e = err_of(AgentConfig::load(&write(
            d.path(),
            "agent.toml",
            &two(
                "listen = [\"127.0.0.1:9\"]\nexport = \"x\"",
                "listen = [\"127.0.0.1:9\"]\nexport = \"x\"",
            ),
        )));
        assert!(e.contains("served twice"), "{e}");
        let e = err_of(AgentConfig::load(&write(
            d.path(),
            "agent.toml",
            &two(
                "listen = [\"127.0.0.1:9\"]",
                "listen = [\"127.0.0.1:9\"]\ntls = \"required\"",
            ),
        )));
        assert!(e.contains("shares its listener"), "{e}");
        let e = err_of(AgentConfig::load(&write(
            d.path(),
            "agent.toml",
            &two(
                "listen = [\"127.0.0.1:9\"]",
                "listen = [\"127.0.0.1:9\", \"127.0.0.1:10\"]",
            ),
        )));
        assert!(e.contains("another listen list"), "{e}");
    }

    #[test]
    fn names() {
        for ok in ["a", "g1", "agent-1", "0", &"x".repeat(32)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "A", "a.b", "a_b", "-a", "a-", "é", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
            let d = tempfile::tempdir().unwrap();
            let p = write(d.path(), "x.toml", &s);
            let _ = RelayConfig::load(&p);
            let _ = TargetConfig::load(&p);
            let _ = AgentConfig::load(&p);
        }

        #[test]
        fn mutated_agent_never_panics(pos in 0usize..AGENT.len(), b in proptest::prelude::any::<u8>()) {
            let mut bytes = AGENT.as_bytes().to_vec();
            bytes[pos] = b;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let d = tempfile::tempdir().unwrap();
            let _ = AgentConfig::load(&write(d.path(), "agent.toml", &text));
        }
    }
}
