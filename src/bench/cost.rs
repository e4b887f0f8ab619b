//! The efficiency bound of `tidemark bench`: the single-threaded cost per byte of
//! every mandatory stage of the pipeline, measured in the bench's own run on the
//! same generated data.
//!
//! The stages, each timed alone on the calling thread:
//!
//! | stage | what is timed | expressed per |
//! |---|---|---|
//! | compress | zstd at the configured level, checksum off, one call per `frame_bytes` unit | plaintext byte |
//! | decompress | zstd decompression of the units that compressed (raw units cost 0) | plaintext byte |
//! | AES-256-GCM | in-place encryption with a detached tag, and decryption, of each stored unit, with *ring* (the AEAD both the frame sealer and rustls's `TLS13_AES_256_GCM_SHA384` run) | stored (AES input) byte |
//! | write + fdatasync | buffered sequential `write_all` of the plaintext, one `fdatasync` at the end | plaintext byte |
//!
//! AES runs [`AES_PASSES`] times over the stored bytes in the real pipeline
//! (frame seal and open, TLS encryption and decryption on each of two hops), so
//!
//! ```text
//! total ns per plaintext byte = compress + decompress
//!                             + AES_PASSES × aes × stored/plain
//!                             + write_fsync
//! bound (bytes/s)             = cores × 1e9 / total
//! efficiency                  = applied bytes/s end to end ÷ bound
//! ```
//!
//! Each stage is run `rounds` times and its median is kept. What the bound leaves
//! out on purpose is listed in `docs/BENCH.md`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::frame::{HEADER_LEN, MAX_PLAIN_LEN, zstd_level_range};
use crate::util::datagen;
use crate::util::prng::Prng;
use crate::util::procstat;

/// How many times AES-256-GCM runs over the stored bytes of a frame on its way
/// from agent to target: frame seal (agent) and open (target), plus TLS
/// encryption and decryption on the agent→relay and relay→target hops.
pub const AES_PASSES: u32 = 6;

/// Largest accepted `sample_bytes` (the measurement holds about twice the sample
/// in memory).
pub const MAX_SAMPLE_BYTES: usize = 1 << 30;

/// Largest accepted `rounds`.
pub const MAX_ROUNDS: usize = 100;

/// What to measure and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostOptions {
    /// Share of each 4 KiB block that is repetitive, 0..=100 (see
    /// [`crate::util::datagen`]); the workload's setting.
    pub compressibility: u8,
    /// zstd level, as configured for the group (negative levels allowed).
    pub zstd_level: i32,
    /// Bytes per synthetic write: data is generated in pieces of this size, as the
    /// workload generates it.
    pub write_size: usize,
    /// Plaintext per compression unit (like a frame), at most
    /// [`crate::frame::MAX_PLAIN_LEN`].
    pub frame_bytes: usize,
    /// Total data put through each stage per round, at most [`MAX_SAMPLE_BYTES`].
    pub sample_bytes: usize,
    /// Directory for the write + fdatasync test file: put it on the filesystem
    /// that holds the target image, or the write cost measures the wrong disk.
    pub dir: PathBuf,
    /// Seed of the data generator.
    pub seed: u64,
    /// Times each stage is run; the median is reported (1..=[`MAX_ROUNDS`]).
    pub rounds: usize,
}

impl CostOptions {
    /// Defaults matching the bench's standard workload: 50 % compressible data in
    /// 64 KiB writes, zstd level 1, 4 MiB frames, 64 MiB per stage, 3 rounds; the
    /// write test goes to `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> CostOptions {
        CostOptions {
            compressibility: 50,
            zstd_level: 1,
            write_size: 64 << 10,
            frame_bytes: 4 << 20,
            sample_bytes: 64 << 20,
            dir: dir.into(),
            seed: 1,
            rounds: 3,
        }
    }
}

/// Measured per-byte cost of each stage and the resulting bound.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StageCosts {
    /// zstd compression, ns per plaintext byte.
    pub compress_ns_per_byte: f64,
    /// zstd decompression, ns per plaintext byte (units stored raw cost nothing).
    pub decompress_ns_per_byte: f64,
    /// One AES-256-GCM pass, ns per byte of AES input (the stored, i.e. compressed
    /// or raw, bytes): the mean of encryption and decryption.
    pub aes_gcm_ns_per_byte: f64,
    /// AES passes counted in the total ([`AES_PASSES`]).
    pub aes_passes: u32,
    /// Buffered sequential write plus one fdatasync, ns per plaintext byte.
    pub write_fsync_ns_per_byte: f64,
    /// Plaintext bytes ÷ stored bytes (a unit that does not compress is stored raw
    /// and counts at its plaintext size).
    pub compression_ratio: f64,
    /// Sum of all stages, ns per plaintext byte.
    pub total_ns_per_plain_byte: f64,
    /// Usable CPUs ([`procstat::cores`]).
    pub cores: usize,
    /// `cores ÷ total`: plaintext bytes per second the hardware allows.
    pub bound_bytes_per_sec: f64,
}

impl StageCosts {
    /// End-to-end applied throughput (plaintext bytes per second) as a share of
    /// the bound.
    pub fn efficiency(&self, applied_bytes_per_sec: f64) -> f64 {
        applied_bytes_per_sec / self.bound_bytes_per_sec
    }

    /// The mean of two measurements of the same data (the bench measures before
    /// and after the pipeline run, so a disk that was slower or faster for a
    /// while weighs on both sides alike), with the total and bound recomputed.
    pub fn mean(&self, other: &StageCosts) -> StageCosts {
        let m = |a: f64, b: f64| (a + b) / 2.0;
        let compress = m(self.compress_ns_per_byte, other.compress_ns_per_byte);
        let decompress = m(self.decompress_ns_per_byte, other.decompress_ns_per_byte);
        let aes = m(self.aes_gcm_ns_per_byte, other.aes_gcm_ns_per_byte);
        let write_fsync = m(self.write_fsync_ns_per_byte, other.write_fsync_ns_per_byte);
        let ratio = m(self.compression_ratio, other.compression_ratio);
        let total = compress + decompress + f64::from(AES_PASSES) * aes / ratio + write_fsync;
        StageCosts {
            compress_ns_per_byte: compress,
            decompress_ns_per_byte: decompress,
            aes_gcm_ns_per_byte: aes,
            aes_passes: AES_PASSES,
            write_fsync_ns_per_byte: write_fsync,
            compression_ratio: ratio,
            total_ns_per_plain_byte: total,
            cores: self.cores,
            bound_bytes_per_sec: self.cores as f64 * 1e9 / total,
        }
    }
}

/// Why the cost measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// An option is out of range.
    #[error("invalid bench cost option `{field}`: {detail}")]
    InvalidOption {
        /// The option.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// zstd could not set up a context.
    #[error("zstd {what}: {source}")]
    Zstd {
        /// What was being done.
        what: &'static str,
        /// zstd's error.
        #[source]
        source: io::Error,
    },
    /// The write + fdatasync test file could not be created, written, synced or
    /// removed.
    #[error("cannot {op} the write test file {} (in --dir {}): {source}", path.display(), dir.display())]
    WriteTest {
        /// The directory asked for.
        dir: PathBuf,
        /// The test file.
        path: PathBuf,
        /// The operation that failed.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A stage did not reproduce its input (a bug, not an environment problem).
    #[error("bench cost self-check failed in the {stage} stage: {detail}")]
    SelfCheck {
        /// The stage.
        stage: &'static str,
        /// What did not match.
        detail: String,
    },
}

/// Measure every stage on data generated from `opts` and compute the bound.
pub fn measure(opts: &CostOptions) -> Result<StageCosts, CostError> {
    validate(opts)?;
    // Fail before the expensive part if the directory is unusable.
    TestFile::create(&opts.dir)?.remove()?;

    let plain = generate(opts);
    let mut stages = Stages::new(opts, &plain)?;
    let mut rounds = Vec::with_capacity(opts.rounds);
    for round in 0..opts.rounds {
        rounds.push(stages.round(round as u64)?);
    }

    let plain_len = plain.len() as f64;
    let stored_len = stages.stored_len() as f64;
    let per_plain = |d: Duration| d.as_nanos() as f64 / plain_len;
    let per_stored = |d: Duration| {
        if stored_len > 0.0 {
            d.as_nanos() as f64 / stored_len
        } else {
            0.0
        }
    };
    let compress = median(rounds.iter().map(|r| per_plain(r.compress)));
    let decompress = median(rounds.iter().map(|r| per_plain(r.decompress)));
    let aes = median(
        rounds
            .iter()
            .map(|r| (per_stored(r.encrypt) + per_stored(r.decrypt)) / 2.0),
    );
    let write_fsync = median(rounds.iter().map(|r| per_plain(r.write_fsync)));
    let stored_share = stored_len / plain_len;
    let total = compress + decompress + f64::from(AES_PASSES) * aes * stored_share + write_fsync;
    if !(total.is_finite() && total > 0.0) {
        return Err(CostError::SelfCheck {
            stage: "total",
            detail: format!("total cost {total} ns per byte is not a positive number"),
        });
    }
    let cores = procstat::cores();
    Ok(StageCosts {
        compress_ns_per_byte: compress,
        decompress_ns_per_byte: decompress,
        aes_gcm_ns_per_byte: aes,
        aes_passes: AES_PASSES,
        write_fsync_ns_per_byte: write_fsync,
        compression_ratio: plain_len / stored_len,
        total_ns_per_plain_byte: total,
        cores,
        bound_bytes_per_sec: cores as f64 * 1e9 / total,
    })
}

fn validate(opts: &CostOptions) -> Result<(), CostError> {
    let bad = |field, detail: String| Err(CostError::InvalidOption { field, detail });
    if opts.compressibility > 100 {
        return bad(
            "compressibility",
            format!("{} is above 100", opts.compressibility),
        );
    }
    let levels = zstd_level_range();
    if !levels.contains(&opts.zstd_level) {
        return bad(
            "zstd_level",
            format!(
                "{} is outside zstd's {}..={}",
                opts.zstd_level,
                levels.start(),
                levels.end()
            ),
        );
    }
    if opts.write_size == 0 {
        return bad("write_size", "must be at least 1 byte".to_string());
    }
    if opts.frame_bytes == 0 || opts.frame_bytes > MAX_PLAIN_LEN as usize {
        return bad(
            "frame_bytes",
            format!("{} is outside 1..={MAX_PLAIN_LEN}", opts.frame_bytes),
        );
    }
    if opts.sample_bytes == 0 || opts.sample_bytes > MAX_SAMPLE_BYTES {
        return bad(
            "sample_bytes",
            format!("{} is outside 1..={MAX_SAMPLE_BYTES}", opts.sample_bytes),
        );
    }
    if opts.rounds == 0 || opts.rounds > MAX_ROUNDS {
        return bad(
            "rounds",
            format!("{} is outside 1..={MAX_ROUNDS}", opts.rounds),
        );
    }
    Ok(())
}

/// The sample: fresh data generated one `write_size` piece at a time from one
/// seeded generator, as the workload generates its writes.
fn generate(opts: &CostOptions) -> Vec<u8> {
    let mut plain = vec![0u8; opts.sample_bytes];
    let mut rng = Prng::new(opts.seed);
    for piece in plain.chunks_mut(opts.write_size) {
        datagen::fill(piece, opts.compressibility, &mut rng);
    }
    plain
}

/// Durations of one round of every stage.
#[derive(Debug, Clone, Copy)]
struct Round {
    compress: Duration,
    decompress: Duration,
    encrypt: Duration,
    decrypt: Duration,
    write_fsync: Duration,
}

/// Contexts and buffers reused across rounds, allocated and touched before any
/// timing so that page faults of fresh buffers are not charged to a stage.
struct Stages<'a> {
    plain: &'a [u8],
    frame_bytes: usize,
    dir: &'a Path,
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
    cipher: LessSafeKey,
    /// One buffer per unit: the compressed bytes, or a copy of the plaintext when
    /// the unit is stored raw.
    stored: Vec<Vec<u8>>,
    raw: Vec<bool>,
    tags: Vec<Tag>,
    scratch: Vec<u8>,
}

impl<'a> Stages<'a> {
    fn new(opts: &'a CostOptions, plain: &'a [u8]) -> Result<Stages<'a>, CostError> {
        let mut compressor =
            zstd::bulk::Compressor::new(opts.zstd_level).map_err(|source| CostError::Zstd {
                what: "compressor",
                source,
            })?;
        // As the sealer: the AEAD tag protects the payload, so no zstd checksum.
        compressor
            .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))
            .map_err(|source| CostError::Zstd {
                what: "compressor parameters",
                source,
            })?;
        let decompressor = zstd::bulk::Decompressor::new().map_err(|source| CostError::Zstd {
            what: "decompressor",
            source,
        })?;
        // Any fixed key will do: the cost does not depend on the key.
        let mut key = [0u8; 32];
        Prng::new(opts.seed ^ 0x0061_6573_5f6b_6579).fill(&mut key);
        let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).map_err(|_| {
            CostError::SelfCheck {
                stage: "AES-GCM",
                detail: "ring refused a 32-byte AES-256 key".into(),
            }
        })?);

        let units = plain.chunks(opts.frame_bytes);
        let n = units.len();
        let stored = units
            .map(|u| {
                // Room for zstd's worst case (as the sealer gives it), touched now.
                let cap = zstd::zstd_safe::compress_bound(u.len()).max(u.len());
                let mut v = Vec::with_capacity(cap);
                v.resize(cap, 1u8);
                v.clear();
                v
            })
            .collect();
        let mut scratch = Vec::with_capacity(opts.frame_bytes);
        scratch.resize(opts.frame_bytes, 1u8);
        scratch.clear();
        Ok(Stages {
            plain,
            frame_bytes: opts.frame_bytes,
            dir: &opts.dir,
            compressor,
            decompressor,
            cipher,
            stored,
            raw: vec![false; n],
            tags: Vec::with_capacity(n),
            scratch,
        })
    }

    /// Total stored bytes after the last compression.
    fn stored_len(&self) -> usize {
        self.stored.iter().map(Vec::len).sum()
    }

    fn round(&mut self, round: u64) -> Result<Round, CostError> {
        let compress = self.compress();
        let (encrypt, decrypt) = self.aes(round)?;
        let decompress = self.decompress()?;
        let write_fsync = self.write_fsync()?;
        Ok(Round {
            compress,
            decompress,
            encrypt,
            decrypt,
            write_fsync,
        })
    }

    /// zstd over each unit. A unit is stored raw, as the sealer stores it, when
    /// compression fails or saves less than 1/64 of it; its plaintext is copied
    /// into place after the clock stops (copies are not part of the bound).
    fn compress(&mut self) -> Duration {
        let start = Instant::now();
        for ((unit, out), raw) in self
            .plain
            .chunks(self.frame_bytes)
            .zip(&mut self.stored)
            .zip(&mut self.raw)
        {
            *raw = !matches!(
                self.compressor.compress_to_buffer(unit, out),
                Ok(n) if n < unit.len() - unit.len() / 64
            );
        }
        let elapsed = start.elapsed();
        for ((unit, out), raw) in self
            .plain
            .chunks(self.frame_bytes)
            .zip(&mut self.stored)
            .zip(&self.raw)
        {
            if *raw {
                out.clear();
                out.extend_from_slice(unit);
            }
        }
        elapsed
    }

    /// AES-256-GCM over each stored unit in place, with a frame-header-sized
    /// associated data: encryption of all units, then decryption of all units,
    /// which restores the stored bytes and checks every tag.
    fn aes(&mut self, round: u64) -> Result<(Duration, Duration), CostError> {
        let aad = [0u8; HEADER_LEN];
        let nonce = |i: usize| {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&round.to_le_bytes());
            n[8..].copy_from_slice(&(i as u32).to_le_bytes());
            Nonce::assume_unique_for_key(n)
        };
        let refused = |what: &str| CostError::SelfCheck {
            stage: "AES-GCM",
            detail: format!("{what} refused a buffer"),
        };
        self.tags.clear();
        let start = Instant::now();
        for (i, buf) in self.stored.iter_mut().enumerate() {
            let tag = self
                .cipher
                .seal_in_place_separate_tag(nonce(i), Aad::from(&aad[..]), &mut buf[..])
                .map_err(|_| refused("encryption"))?;
            self.tags.push(tag);
        }
        let encrypt = start.elapsed();
        let start = Instant::now();
        for (i, (buf, tag)) in self.stored.iter_mut().zip(&self.tags).enumerate() {
            self.cipher
                .open_in_place_separate_tag(nonce(i), Aad::from(&aad[..]), *tag, &mut buf[..], 0..)
                .map_err(|_| refused("decryption"))?;
        }
        let decrypt = start.elapsed();
        Ok((encrypt, decrypt))
    }

    /// zstd decompression of every unit that was compressed; each result is
    /// compared with the original after the clock stops.
    fn decompress(&mut self) -> Result<Duration, CostError> {
        let mut total = Duration::ZERO;
        for ((unit, stored), raw) in self
            .plain
            .chunks(self.frame_bytes)
            .zip(&self.stored)
            .zip(&self.raw)
        {
            if *raw {
                continue;
            }
            let start = Instant::now();
            let n = self
                .decompressor
                .decompress_to_buffer(stored, &mut self.scratch);
            total += start.elapsed();
            let mismatch = |detail: String| CostError::SelfCheck {
                stage: "decompress",
                detail,
            };
            let n = n.map_err(|e| mismatch(e.to_string()))?;
            if n != unit.len() || self.scratch != unit {
                return Err(mismatch(format!(
                    "a {}-byte unit came back as {n} different bytes",
                    unit.len()
                )));
            }
        }
        Ok(total)
    }

    /// Buffered sequential write of the whole plaintext in `frame_bytes` chunks to
    /// a fresh file, then one fdatasync; the file is removed afterwards (not timed).
    fn write_fsync(&mut self) -> Result<Duration, CostError> {
        let mut test = TestFile::create(self.dir)?;
        let start = Instant::now();
        for chunk in self.plain.chunks(self.frame_bytes) {
            test.file
                .write_all(chunk)
                .map_err(|e| test.error("write", e))?;
        }
        test.file
            .sync_data()
            .map_err(|e| test.error("fdatasync", e))?;
        let elapsed = start.elapsed();
        test.remove()?;
        Ok(elapsed)
    }
}

/// The write test file: created fresh (never an existing file), removed by
/// [`TestFile::remove`] or, on an early return, when dropped.
struct TestFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    removed: bool,
}

impl TestFile {
    fn create(dir: &Path) -> Result<TestFile, CostError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            ".tidemark-bench-cost-{}-{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| CostError::WriteTest {
                dir: dir.to_path_buf(),
                path: path.clone(),
                op: "create",
                source,
            })?;
        Ok(TestFile {
            dir: dir.to_path_buf(),
            path,
            file,
            removed: false,
        })
    }

    fn error(&self, op: &'static str, source: io::Error) -> CostError {
        CostError::WriteTest {
            dir: self.dir.clone(),
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn remove(mut self) -> Result<(), CostError> {
        self.removed = true;
        std::fs::remove_file(&self.path).map_err(|e| self.error("remove", e))
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Median of a non-empty set of finite values (mean of the middle two for an even
/// count); 0 for an empty one.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small and quick: 8 MiB in 1 MiB units, one round.
    fn small(dir: &Path, compressibility: u8) -> CostOptions {
        CostOptions {
            compressibility,
            frame_bytes: 1 << 20,
            sample_bytes: 8 << 20,
            rounds: 1,
            ..CostOptions::new(dir)
        }
    }

    fn positive(x: f64) -> bool {
        x.is_finite() && x > 0.0
    }

    fn no_test_files_left(dir: &Path) {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn costs_and_bound_are_positive_and_finite() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CostOptions {
            rounds: 3,
            ..small(dir.path(), 50)
        };
        let c = measure(&opts).unwrap();
        for (name, x) in [
            ("compress", c.compress_ns_per_byte),
            ("decompress", c.decompress_ns_per_byte),
            ("aes", c.aes_gcm_ns_per_byte),
            ("write", c.write_fsync_ns_per_byte),
            ("ratio", c.compression_ratio),
            ("total", c.total_ns_per_plain_byte),
            ("bound", c.bound_bytes_per_sec),
        ] {
            assert!(positive(x), "{name} = {x} in {c:?}");
        }
        assert_eq!(c.aes_passes, AES_PASSES);
        assert_eq!(c.cores, procstat::cores());
        // The bound is exactly the documented formula.
        let total = c.compress_ns_per_byte
            + c.decompress_ns_per_byte
            + f64::from(c.aes_passes) * c.aes_gcm_ns_per_byte / c.compression_ratio
            + c.write_fsync_ns_per_byte;
        assert!((total - c.total_ns_per_plain_byte).abs() <= 1e-9 * total);
        let bound = c.cores as f64 * 1e9 / c.total_ns_per_plain_byte;
        assert!((bound - c.bound_bytes_per_sec).abs() <= 1e-9 * bound);
        assert!((c.efficiency(c.bound_bytes_per_sec / 2.0) - 0.5).abs() < 1e-12);
        no_test_files_left(dir.path());
        // Round-trips through JSON for the bench report.
        // (serde_json may round the last bit of a float, hence the tolerance.)
        let json = serde_json::to_string(&c).unwrap();
        let back: StageCosts = serde_json::from_str(&json).unwrap();
        assert_eq!((back.aes_passes, back.cores), (c.aes_passes, c.cores));
        for (a, b) in [
            (back.total_ns_per_plain_byte, c.total_ns_per_plain_byte),
            (back.bound_bytes_per_sec, c.bound_bytes_per_sec),
            (back.compression_ratio, c.compression_ratio),
        ] {
            assert!((a - b).abs() <= 1e-12 * b, "{a} vs {b}");
        }
    }

    #[test]
    fn more_compressible_data_gives_a_higher_ratio() {
        let dir = tempfile::tempdir().unwrap();
        let ratio = |p| measure(&small(dir.path(), p)).unwrap();
        let (none, half, full) = (ratio(0), ratio(50), ratio(100));
        assert!(
            full.compression_ratio > half.compression_ratio,
            "{full:?} {half:?}"
        );
        assert!(
            half.compression_ratio > none.compression_ratio,
            "{half:?} {none:?}"
        );
        assert!((1.8..2.2).contains(&half.compression_ratio), "{half:?}");
        // Incompressible units are stored raw: ratio exactly 1, nothing to
        // decompress, AES over the plaintext.
        assert_eq!(none.compression_ratio, 1.0);
        assert_eq!(none.decompress_ns_per_byte, 0.0);
        assert!(positive(none.aes_gcm_ns_per_byte));
        assert!(positive(full.aes_gcm_ns_per_byte));
    }

    #[test]
    fn levels_are_accepted_including_negative_ones() {
        let dir = tempfile::tempdir().unwrap();
        for level in [-7, -1, 0, 3, 9] {
            let opts = CostOptions {
                zstd_level: level,
                sample_bytes: 2 << 20,
                ..small(dir.path(), 50)
            };
            let c = measure(&opts).unwrap_or_else(|e| panic!("level {level}: {e}"));
            assert!(positive(c.bound_bytes_per_sec), "level {level}: {c:?}");
            assert!(c.compression_ratio > 1.0, "level {level}: {c:?}");
        }
    }

    #[test]
    fn uneven_sizes_are_handled() {
        // Writes that straddle units, and a short last unit.
        let dir = tempfile::tempdir().unwrap();
        let opts = CostOptions {
            write_size: 3 * 4096 + 100,
            frame_bytes: 300_000,
            sample_bytes: 1_000_001,
            ..small(dir.path(), 50)
        };
        let c = measure(&opts).unwrap();
        assert!(positive(c.bound_bytes_per_sec), "{c:?}");
        no_test_files_left(dir.path());
    }

    #[test]
    fn an_unusable_dir_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let err = measure(&small(&missing, 50)).unwrap_err();
        assert!(
            matches!(&err, CostError::WriteTest { op: "create", .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = measure(&small(&file, 50)).unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = small(dir.path(), 50);
        let cases: [(&str, CostOptions); 8] = [
            (
                "compressibility",
                CostOptions {
                    compressibility: 101,
                    ..base.clone()
                },
            ),
            (
                "zstd_level",
                CostOptions {
                    zstd_level: 23,
                    ..base.clone()
                },
            ),
            (
                "zstd_level",
                CostOptions {
                    zstd_level: i32::MIN,
                    ..base.clone()
                },
            ),
            (
                "write_size",
                CostOptions {
                    write_size: 0,
                    ..base.clone()
                },
            ),
            (
                "frame_bytes",
                CostOptions {
                    frame_bytes: 0,
                    ..base.clone()
                },
            ),
            (
                "frame_bytes",
                CostOptions {
                    frame_bytes: (64 << 20) + 1,
                    ..base.clone()
                },
            ),
            (
                "sample_bytes",
                CostOptions {
                    sample_bytes: 0,
                    ..base.clone()
                },
            ),
            (
                "rounds",
                CostOptions {
                    rounds: 0,
                    ..base.clone()
                },
            ),
        ];
        for (field, opts) in cases {
            let err = measure(&opts).unwrap_err();
            assert!(
                matches!(&err, CostError::InvalidOption { field: f, .. } if *f == field),
                "{field}: {err:?}"
            );
        }
        no_test_files_left(dir.path());
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median([7.0].into_iter()), 7.0);
        assert_eq!(median(std::iter::empty()), 0.0);
    }

    /// Not a check: prints one measurement with the bench's default options, for
    /// eyeballing. `TIDEMARK_COST_DIR` picks the directory (default: the system
    /// temporary directory).
    /// `cargo nextest run bench::cost::tests::print_default_measurement --run-ignored only --no-capture`
    #[test]
    #[ignore = "prints a measurement; takes a few seconds and asserts nothing about time"]
    fn print_default_measurement() {
        let dir =
            std::env::var_os("TIDEMARK_COST_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let start = Instant::now();
        let c = measure(&CostOptions::new(dir)).unwrap();
        println!("{}", serde_json::to_string_pretty(&c).unwrap());
        println!(
            "bound {:.0} MiB/s; measured in {:.2} s",
            c.bound_bytes_per_sec / f64::from(1 << 20),
            start.elapsed().as_secs_f64()
        );
    }
}
