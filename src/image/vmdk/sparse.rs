//! monolithicSparse: one file holding the header, the embedded descriptor, the
//! redundant and primary grain directories with their preallocated grain
//! tables, then grains appended as they are first written.
//!
//! Crash ordering of `write_batch`: grain data first (in place for allocated
//! grains, appended at the end of the file for new ones), then `fdatasync` if
//! the batch allocated any grain, then the grain-table entries of the new
//! grains (primary and redundant). Metadata therefore never points to
//! unwritten data; a crash between the two only leaks the appended space.
//!
//! Grain tables are read on demand into a bounded LRU cache
//! ([`GT_CACHE_BYTES`]); only the two grain directories are held whole.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::cache::GtCache;
use super::descriptor::{self, Descriptor, ExtentKind, NO_PARENT};
use super::header::{self, GD_AT_END, SparseHeader};
use super::{Directory, NEW_GRAIN_SECTORS, NEW_GTES_PER_GT, SECTOR, VmdkError, vmdk_err};
use crate::image::{
    DirectReads, Engine, Image, ImageError, ImageSpec, IoEngine, WriteOp, ZeroMode,
    check_read_batch, check_read_range, check_write_ranges, create_image_file, new_engine,
};

/// Memory for cached grain tables per image: 4 MiB, 2048 tables of 512
/// entries, which map 64 GiB of a 64 KiB-grain disk. A 1 TiB disk needs 32768
/// tables (64 MiB per directory): they are read on demand, not held.
pub const GT_CACHE_BYTES: usize = 4 << 20;

/// Sectors reserved for the embedded descriptor of a new image (as qemu).
const NEW_DESCRIPTOR_SECTORS: u64 = 20;

/// Where a grain of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    /// At this sector of the file.
    At(u64),
    /// Not allocated (or a zeroed-grain entry): reads as zeros.
    Unallocated,
    /// Its grain table does not exist (directory entry 0): reads as zeros.
    NoTable,
}

/// A metadata structure, named in overlap errors.
#[derive(Debug, Clone, Copy)]
enum Region {
    Header,
    Descriptor,
    Directory(Directory),
    Table(Directory, u64),
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Region::Header => f.write_str("the header"),
            Region::Descriptor => f.write_str("the descriptor"),
            Region::Directory(d) => write!(f, "the {d}"),
            Region::Table(Directory::Primary, i) => write!(f, "grain table {i}"),
            Region::Table(Directory::Redundant, i) => write!(f, "redundant grain table {i}"),
        }
    }
}

/// The file ops of one batch, built before anything is written.
#[derive(Default)]
struct Plan<'a> {
    ops: Vec<WriteOp<'a>>,
    /// Per file op: the batch op it comes from and its first virtual byte.
    origin: Vec<(usize, u64)>,
    /// Grains allocated by this batch: (grain, sector, batch op).
    new_grains: Vec<(u64, u64, usize)>,
    by_grain: HashMap<u64, u64>,
}

impl<'a> Plan<'a> {
    /// Append a file op, merging it into the previous one when both come from
    /// the same batch op and are contiguous in the file and the virtual disk.
    fn push(&mut self, index: usize, op: WriteOp<'a>, vstart: u64, file_op: WriteOp<'a>) {
        if let (Some(last), Some(&(li, lv))) = (self.ops.last_mut(), self.origin.last())
            && li == index
            && last.offset() + last.len() == file_op.offset()
            && lv + last.len() == vstart
        {
            match (last, file_op, op) {
                (
                    WriteOp::Write { data, .. },
                    WriteOp::Write { data: more, .. },
                    WriteOp::Write { data: src, offset },
                ) => {
                    let from = (lv - offset) as usize;
                    let src: &'a [u8] = src;
                    *data = &src[from..from + data.len() + more.len()];
                    return;
                }
                (
                    WriteOp::Zero { len, .. },
                    WriteOp::Zero { len: more, .. },
                    WriteOp::Zero { .. },
                ) => {
                    *len += more;
                    return;
                }
                _ => {}
            }
        }
        self.ops.push(file_op);
        self.origin.push((index, vstart));
    }
}

/// A monolithicSparse VMDK opened for applying writes.
pub struct VmdkSparseImage {
    path: PathBuf,
    file: File,
    engine: Box<dyn IoEngine>,
    zero_mode: ZeroMode,
    header: SparseHeader,
    descriptor: Descriptor,
    size: u64,
    grain_bytes: u64,
    gtes: u64,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    /// Metadata sector ranges, sorted, disjoint, adjacent ones merged.
    metadata: Vec<(u64, u64)>,
    /// Length of the file in sectors (rounded up), grown as grains are appended.
    file_sectors: u64,
    /// Sector the next new grain goes to.
    next_grain: u64,
    cache: GtCache,
    /// Grain reads bypass the page cache where aligned (`direct_reads`).
    direct_read: DirectReads,
}

impl std::fmt::Debug for VmdkSparseImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkSparseImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("grain_bytes", &self.grain_bytes)
            .field("file_sectors", &self.file_sectors)
            .field("cached_tables", &self.cache.len())
            .field("engine", &self.engine.kind())
            .finish()
    }
}

fn open_err(path: &Path, source: io::Error) -> ImageError {
    ImageError::Open {
        path: path.to_path_buf(),
        source,
    }
}

fn decode_u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Read `len` bytes at `offset` of `file` (the caller bounded `len` by the file length).
fn read_exact_at(path: &Path, file: &File, offset: u64, len: u64) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            offset,
            len,
            source,
        })?;
    Ok(buf)
}

impl VmdkSparseImage {
    /// Open `spec.path` as a monolithicSparse VMDK, creating one of
    /// `spec.create_size` bytes if it does not exist. `spec.direct_io` is
    /// ignored: sparse images write through the page cache.
    pub fn open(spec: &ImageSpec) -> Result<Self, ImageError> {
        let engine = new_engine(&spec.path, spec.engine)?;
        Self::open_with(&spec.path, spec.create_size, engine)
    }

    /// Open with a given engine (tests use small rings).
    pub(crate) fn open_with(
        path: &Path,
        create_size: Option<u64>,
        engine: Box<dyn IoEngine>,
    ) -> Result<Self, ImageError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match create_size {
                Some(size) => create(path, size)?,
                None => return Err(open_err(path, e)),
            },
            Err(e) => return Err(open_err(path, e)),
        };
        let meta = file.metadata().map_err(|e| open_err(path, e))?;
        if !meta.file_type().is_file() {
            return Err(ImageError::NotFileOrBlockDevice {
                path: path.to_path_buf(),
            });
        }
        let image = Self::load(path, file, meta.len(), engine)?;
        tracing::debug!(path = %path.display(), size = image.size, engine = %image.engine.kind(), "opened monolithicSparse VMDK");
        Ok(image)
    }

    /// Parse and validate everything but the grain tables (read on demand).
    fn load(
        path: &Path,
        file: File,
        len: u64,
        engine: Box<dyn IoEngine>,
    ) -> Result<Self, ImageError> {
        let bad = |e: VmdkError| vmdk_err(path, e);
        if len < SECTOR {
            return Err(bad(VmdkError::TooShort { len }));
        }
        let file_sectors = len.div_ceil(SECTOR);
        let h = SparseHeader::parse(&read_exact_at(path, &file, 0, SECTOR)?)
            .map_err(|e| bad(e.into()))?;
        let unsupported = |what: &str| {
            bad(VmdkError::Unsupported {
                what: what.to_string(),
            })
        };
        if h.compressed() || h.gd_offset == GD_AT_END {
            return Err(unsupported(
                "a streamOptimized (compressed) extent accepts each grain once; tidemark only exports that subformat",
            ));
        }
        if h.version == 3 {
            return Err(unsupported(
                "sparse extent version 3 (changed-block tracking) is read-only for qemu and not written by tidemark",
            ));
        }
        let truncated = |what: &str, needed: u64| {
            bad(VmdkError::Truncated {
                what: what.to_string(),
                needed,
                file_sectors,
            })
        };
        if h.overhead > file_sectors {
            return Err(truncated("the metadata area (overHead)", h.overhead));
        }
        // Descriptor: inside the file, bounded by the header check (<= 1 MiB).
        if h.descriptor_offset == 0 {
            return Err(bad(VmdkError::DescriptorContent {
                why: "the sparse extent has no embedded descriptor".into(),
            }));
        }
        let desc_end = h.descriptor_offset.saturating_add(h.descriptor_sectors);
        if desc_end > file_sectors {
            return Err(truncated("the embedded descriptor", desc_end));
        }
        let desc_at = h.descriptor_offset * SECTOR;
        let desc_bytes = read_exact_at(path, &file, desc_at, h.descriptor_sectors * SECTOR)?;
        let descriptor = Descriptor::parse(&desc_bytes).map_err(|source| {
            bad(VmdkError::Descriptor {
                offset: desc_at,
                source,
            })
        })?;
        check_descriptor(
            &descriptor,
            "monolithicSparse",
            ExtentKind::Sparse,
            h.capacity,
        )
        .map_err(bad)?;

        // Grain directories: inside the file, read whole (bounded by the header check).
        let gt_count = h.gt_count();
        let gd_sectors = h.gd_sectors();
        let gt_sectors = h.gt_sectors();
        let read_dir = |dir: Directory, at: u64| -> Result<Vec<u32>, ImageError> {
            let end = at.saturating_add(gd_sectors);
            if end > file_sectors {
                return Err(truncated(&format!("the {dir}"), end));
            }
            let bytes = read_exact_at(path, &file, at * SECTOR, gt_count * 4)?;
            let entries = decode_u32s(&bytes);
            for (i, &e) in entries.iter().enumerate() {
                let e = u64::from(e);
                if e != 0 && (e.saturating_add(gt_sectors) > file_sectors) {
                    return Err(bad(VmdkError::GrainTableOutOfFile {
                        dir,
                        index: i as u64,
                        sector: e,
                        gt_sectors,
                        file_sectors,
                    }));
                }
            }
            Ok(entries)
        };
        let gd = read_dir(Directory::Primary, h.gd_offset)?;
        let rgd = if h.has_rgd() {
            let rgd = read_dir(Directory::Redundant, h.rgd_offset)?;
            for (i, (&p, &r)) in gd.iter().zip(&rgd).enumerate() {
                if (p == 0) != (r == 0) {
                    return Err(bad(VmdkError::DirectoryMismatch {
                        index: i as u64,
                        primary: p,
                        redundant: r,
                    }));
                }
            }
            Some(rgd)
        } else {
            None
        };

        // No two metadata structures may overlap; grains may not land in any.
        let mut regions: Vec<(u64, u64, Region)> = Vec::with_capacity(4 + 2 * gd.len());
        regions.push((0, 1, Region::Header));
        regions.push((h.descriptor_offset, desc_end, Region::Descriptor));
        regions.push((
            h.gd_offset,
            h.gd_offset + gd_sectors,
            Region::Directory(Directory::Primary),
        ));
        if rgd.is_some() {
            regions.push((
                h.rgd_offset,
                h.rgd_offset + gd_sectors,
                Region::Directory(Directory::Redundant),
            ));
        }
        for (dir, entries) in [
            (Directory::Primary, Some(&gd)),
            (Directory::Redundant, rgd.as_ref()),
        ] {
            for (i, &e) in entries.into_iter().flatten().enumerate() {
                if e != 0 {
                    let e = u64::from(e);
                    regions.push((e, e + gt_sectors, Region::Table(dir, i as u64)));
                }
            }
        }
        regions.sort_unstable_by_key(|r| (r.0, r.1));
        for w in regions.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if b.0 < a.1 {
                return Err(bad(VmdkError::MetadataOverlap {
                    a: a.2.to_string(),
                    a_start: a.0,
                    a_end: a.1,
                    b: b.2.to_string(),
                    b_start: b.0,
                    b_end: b.1,
                }));
            }
        }
        let mut metadata: Vec<(u64, u64)> = Vec::new();
        for (s, e, _) in regions {
            match metadata.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => metadata.push((s, e)),
            }
        }
        let gs = h.grain_sectors;
        let next_grain = file_sectors.max(h.overhead).div_ceil(gs) * gs;
        let cache_tables = GT_CACHE_BYTES / (h.gtes_per_gt as usize * 4);
        Ok(VmdkSparseImage {
            path: path.to_path_buf(),
            file,
            engine,
            zero_mode: ZeroMode::PunchHole,
            size: h.capacity * SECTOR,
            grain_bytes: h.grain_bytes(),
            gtes: u64::from(h.gtes_per_gt),
            header: h,
            descriptor,
            gd,
            rgd,
            metadata,
            file_sectors,
            next_grain,
            cache: GtCache::new(cache_tables),
            direct_read: DirectReads::default(),
        })
    }

    /// The embedded descriptor as read at open.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The header as read at open.
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The disk's `ddb.uuid`: made at creation, never changed by tidemark
    /// (images made elsewhere may have none).
    pub fn disk_uuid(&self) -> Option<&str> {
        self.descriptor.ddb("ddb.uuid")
    }

    /// Grain tables currently cached (bounded by [`GT_CACHE_BYTES`]).
    pub fn cached_grain_tables(&self) -> usize {
        self.cache.len()
    }

    /// Bytes of metadata this image holds in memory: both grain directories,
    /// the metadata map and the grain-table cache at its bound. Independent of
    /// how much of the disk is written.
    pub fn metadata_memory_bytes(&self) -> usize {
        let dirs = (self.gd.len() + self.rgd.as_ref().map_or(0, Vec::len)) * 4;
        dirs + self.metadata.len() * 16 + self.cache.max * (self.gtes as usize * 4 + 48)
    }

    /// Read grain table `gt` (whose directory entry is nonzero), validate every
    /// entry that maps a grain of the disk, and cache it.
    fn load_table(&mut self, gt: u64) -> Result<(), ImageError> {
        let at = u64::from(self.gd[gt as usize]);
        let mut bytes = vec![0u8; self.gtes as usize * 4];
        self.engine
            .read_at(&self.file, at * SECTOR, &mut bytes)
            .map_err(|source| ImageError::Read {
                path: self.path.clone(),
                offset: at * SECTOR,
                len: bytes.len() as u64,
                source,
            })?;
        let table = decode_u32s(&bytes);
        let grains = self.header.grains();
        let gs = self.header.grain_sectors;
        let zero_grain = self.header.zero_grain();
        for (e, &v) in table.iter().enumerate() {
            let grain = gt * self.gtes + e as u64;
            if grain >= grains || v == 0 || (v == 1 && zero_grain) {
                continue;
            }
            let sector = u64::from(v);
            if sector + gs > self.file_sectors {
                return Err(vmdk_err(
                    &self.path,
                    VmdkError::GrainOutOfFile {
                        gt,
                        entry: e as u64,
                        sector,
                        file_sectors: self.file_sectors,
                        grain_sectors: gs,
                    },
                ));
            }
            let i = self.metadata.partition_point(|m| m.1 <= sector);
            if let Some(&(ms, me)) = self.metadata.get(i)
                && ms < sector + gs
            {
                return Err(vmdk_err(
                    &self.path,
                    VmdkError::GrainInMetadata {
                        gt,
                        entry: e as u64,
                        sector,
                        meta_start: ms,
                        meta_end: me,
                    },
                ));
            }
        }
        self.cache.insert(gt, table);
        Ok(())
    }

    /// Where grain `grain` lives.
    fn lookup(&mut self, grain: u64) -> Result<Grain, ImageError> {
        let gt = grain / self.gtes;
        let e = (grain % self.gtes) as usize;
        if self.gd[gt as usize] == 0 {
            return Ok(Grain::NoTable);
        }
        let v = match self.cache.get(gt, e) {
            Some(v) => v,
            None => {
                self.load_table(gt)?;
                self.cache.get(gt, e).unwrap_or(0)
            }
        };
        Ok(if v == 0 || (v == 1 && self.header.zero_grain()) {
            Grain::Unallocated
        } else {
            Grain::At(u64::from(v))
        })
    }

    fn check_ranges(&self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        check_write_ranges(&self.path, self.size, ops)
    }

    /// Map `ops` to file ops, allocating new grains (advancing `next_grain`).
    fn plan<'a>(&mut self, ops: &[WriteOp<'a>], plan: &mut Plan<'a>) -> Result<(), ImageError> {
        let gb = self.grain_bytes;
        for (index, op) in ops.iter().enumerate() {
            let (start, end) = (op.offset(), op.offset() + op.len());
            let mut off = start;
            while off < end {
                let grain = off / gb;
                let in_grain = off % gb;
                let n = (end - off).min(gb - in_grain);
                let at = match plan.by_grain.get(&grain) {
                    Some(&s) => Grain::At(s),
                    None => self.lookup(grain)?,
                };
                let file_at = |s: u64| s * SECTOR + in_grain;
                match (*op, at) {
                    (WriteOp::Write { data, .. }, Grain::At(_) | Grain::Unallocated) => {
                        let s = match at {
                            Grain::At(s) => s,
                            _ => {
                                let s = self.allocate()?;
                                plan.by_grain.insert(grain, s);
                                plan.new_grains.push((grain, s, index));
                                s
                            }
                        };
                        let d = &data[(off - start) as usize..(off - start + n) as usize];
                        plan.push(
                            index,
                            *op,
                            off,
                            WriteOp::Write {
                                offset: file_at(s),
                                data: d,
                            },
                        );
                    }
                    (WriteOp::Write { .. }, Grain::NoTable) => {
                        let gt = grain / self.gtes;
                        let span = self.gtes * gb;
                        return Err(vmdk_err(
                            &self.path,
                            VmdkError::GrainTableMissing {
                                gt,
                                start: gt * span,
                                end: ((gt + 1) * span).min(self.size),
                            },
                        ));
                    }
                    (WriteOp::Zero { .. }, Grain::At(s)) => {
                        plan.push(
                            index,
                            *op,
                            off,
                            WriteOp::Zero {
                                offset: file_at(s),
                                len: n,
                            },
                        );
                    }
                    // Zeroing a grain that reads as zeros changes nothing: never allocate for it.
                    (WriteOp::Zero { .. }, Grain::Unallocated | Grain::NoTable) => {}
                }
                off += n;
            }
        }
        Ok(())
    }

    /// Reserve the next grain at the end of the file.
    fn allocate(&mut self) -> Result<u64, ImageError> {
        let s = self.next_grain;
        let end = s + self.header.grain_sectors;
        if end > header::MAX_CAPACITY_SECTORS {
            return Err(vmdk_err(&self.path, VmdkError::Full { sector: s }));
        }
        self.next_grain = end;
        Ok(s)
    }

    fn op_error(&self, ops: &[WriteOp<'_>], index: usize, source: io::Error) -> ImageError {
        let op = &ops[index];
        ImageError::Op {
            path: self.path.clone(),
            index,
            kind: op.kind(),
            offset: op.offset(),
            len: op.len(),
            source,
        }
    }

    /// Write the grain-table entries of the batch's new grains (primary and
    /// redundant), runs of consecutive entries as one write each.
    fn write_entries(
        &mut self,
        ops: &[WriteOp<'_>],
        new_grains: &mut [(u64, u64, usize)],
    ) -> Result<(), ImageError> {
        new_grains.sort_unstable_by_key(|g| g.0);
        let values: Vec<u8> = new_grains
            .iter()
            .flat_map(|&(_, s, _)| (s as u32).to_le_bytes())
            .collect();
        let mut meta: Vec<WriteOp<'_>> = Vec::new();
        let mut origin: Vec<usize> = Vec::new();
        let mut k = 0;
        while k < new_grains.len() {
            let (first, _, index) = new_grains[k];
            let gt = first / self.gtes;
            let mut m = k + 1;
            while m < new_grains.len()
                && new_grains[m].0 == new_grains[m - 1].0 + 1
                && new_grains[m].0 / self.gtes == gt
            {
                m += 1;
            }
            let data = &values[k * 4..m * 4];
            let in_table = (first % self.gtes) * 4;
            let tables = [Some(&self.gd), self.rgd.as_ref()];
            for dir in tables.into_iter().flatten() {
                let offset = u64::from(dir[gt as usize]) * SECTOR + in_table;
                meta.push(WriteOp::Write { offset, data });
                origin.push(index);
            }
            k = m;
        }
        if let Err(e) = self
            .engine
            .write_batch(&self.file, &meta, &mut self.zero_mode)
        {
            // What reached the tables is unknown: reread them when next needed.
            for &(grain, _, _) in new_grains.iter() {
                self.cache.remove(grain / self.gtes);
            }
            return Err(self.op_error(ops, origin[e.index], e.source));
        }
        for &(grain, s, _) in new_grains.iter() {
            self.cache
                .set(grain / self.gtes, (grain % self.gtes) as usize, s as u32);
        }
        Ok(())
    }
}

/// Check that a descriptor describes a single read-write extent of the kind
/// and capacity expected, of a disk without a parent.
pub(super) fn check_descriptor(
    d: &Descriptor,
    create_type: &str,
    kind: ExtentKind,
    capacity: u64,
) -> Result<(), VmdkError> {
    let why = |why: String| Err(VmdkError::DescriptorContent { why });
    if d.create_type != create_type {
        return Err(VmdkError::Unsupported {
            what: format!(
                "createType \"{}\" (this backend opens \"{create_type}\")",
                d.create_type
            ),
        });
    }
    if d.parent_hint.is_some() || d.parent_cid != NO_PARENT {
        return Err(VmdkError::Unsupported {
            what: "a child (delta) disk: its content depends on a parent image".into(),
        });
    }
    let [e] = d.extents.as_slice() else {
        return why(format!(
            "{} extent lines; a {create_type} image has exactly one",
            d.extents.len()
        ));
    };
    if e.kind != kind || e.access != descriptor::Access::ReadWrite {
        return why(format!(
            "the extent line is {:?} {:?}, expected a read-write {:?} extent",
            e.access, e.kind, kind
        ));
    }
    if e.sectors != capacity {
        return why(format!(
            "the extent has {} sectors but the capacity is {capacity} sectors",
            e.sectors
        ));
    }
    Ok(())
}

/// The base name of `path`, as the descriptor's extent line names it.
pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Check a size for a new VMDK and return its capacity in sectors.
pub(super) fn new_capacity(size: u64) -> Result<u64, VmdkError> {
    let err = |why| Err(VmdkError::CreateSize { size, why });
    if size == 0 {
        return err("the size is zero");
    }
    if !size.is_multiple_of(SECTOR) {
        return err("the size is not a multiple of 512 bytes");
    }
    if size / SECTOR > header::MAX_CAPACITY_SECTORS {
        return err("more than 2 TiB, the limit of a sparse extent");
    }
    Ok(size / SECTOR)
}

/// The header of a new monolithicSparse image of `capacity` sectors: the
/// descriptor at sector 1 (20 sectors), the redundant directory and its tables,
/// then the primary directory and its tables, grains from the next grain boundary.
pub(super) fn new_sparse_header(capacity: u64) -> SparseHeader {
    let mut h = SparseHeader {
        version: 1,
        flags: header::FLAG_NL_DETECT | header::FLAG_RGD,
        capacity,
        grain_sectors: NEW_GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_sectors: NEW_DESCRIPTOR_SECTORS,
        gtes_per_gt: NEW_GTES_PER_GT,
        rgd_offset: 1 + NEW_DESCRIPTOR_SECTORS,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: false,
        compress: header::COMPRESS_NONE,
    };
    let tables = h.gd_sectors() + h.gt_count() * h.gt_sectors();
    h.gd_offset = h.rgd_offset + tables;
    h.overhead = (h.gd_offset + tables).div_ceil(NEW_GRAIN_SECTORS) * NEW_GRAIN_SECTORS;
    h
}

/// A directory whose tables follow it back to back.
fn directory_bytes(h: &SparseHeader, at: u64) -> Vec<u8> {
    let first = at + h.gd_sectors();
    (0..h.gt_count())
        .flat_map(|i| ((first + i * h.gt_sectors()) as u32).to_le_bytes())
        .collect()
}

/// Create a new monolithicSparse file at `path` (which must not exist): header,
/// descriptor, both directories; the grain tables are zeros (holes). Made
/// durable (file and directory entry) before it is opened; a failure removes it.
fn create(path: &Path, size: u64) -> Result<File, ImageError> {
    let capacity = new_capacity(size).map_err(|e| vmdk_err(path, e))?;
    let h = new_sparse_header(capacity);
    let desc = descriptor::new_descriptor(
        "monolithicSparse",
        capacity,
        ExtentKind::Sparse,
        &file_name(path),
        None,
    )
    .map_err(|e| vmdk_err(path, VmdkError::Random(e)))?;
    let text = desc.render();
    if text.len() as u64 > h.descriptor_sectors * SECTOR {
        return Err(vmdk_err(
            path,
            VmdkError::CreateSize {
                size,
                why: "the descriptor does not fit its 20 sectors (file name too long)",
            },
        ));
    }
    let file = create_image_file(path, size, |file| {
        file.set_len(h.overhead * SECTOR)?;
        file.write_all_at(&h.encode(), 0)?;
        file.write_all_at(text.as_bytes(), h.descriptor_offset * SECTOR)?;
        file.write_all_at(&directory_bytes(&h, h.rgd_offset), h.rgd_offset * SECTOR)?;
        file.write_all_at(&directory_bytes(&h, h.gd_offset), h.gd_offset * SECTOR)
    })?;
    tracing::info!(path = %path.display(), size, "created monolithicSparse VMDK");
    Ok(file)
}

impl Image for VmdkSparseImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<(), ImageError> {
        self.check_ranges(ops)?;
        let mut plan = Plan::default();
        let first_new = self.next_grain;
        if let Err(e) = self.plan(ops, &mut plan) {
            // Nothing was written: the reserved grains are free again.
            self.next_grain = first_new;
            return Err(e);
        }
        if !plan.new_grains.is_empty() {
            // The new grains lie past the old end of the file: extending it
            // makes their unwritten bytes holes that read as zeros.
            if let Err(source) = self.file.set_len(self.next_grain * SECTOR) {
                return Err(self.op_error(ops, plan.new_grains[0].2, source));
            }
            self.file_sectors = self.next_grain;
        }
        if let Err(e) = self
            .engine
            .write_batch(&self.file, &plan.ops, &mut self.zero_mode)
        {
            return Err(self.op_error(ops, plan.origin[e.index].0, e.source));
        }
        if plan.new_grains.is_empty() {
            return Ok(());
        }
        // The grains are durable before any table points at them.
        self.engine
            .sync_data(&self.file)
            .map_err(|source| ImageError::Flush {
                path: self.path.clone(),
                source,
            })?;
        let mut new_grains = std::mem::take(&mut plan.new_grains);
        self.write_entries(ops, &mut new_grains)
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.engine
            .sync_data(&self.file)
            .map_err(|source| ImageError::Flush {
                path: self.path.clone(),
                source,
            })
    }

    fn sync_handle(&self) -> Result<File, ImageError> {
        self.file.try_clone().map_err(|source| ImageError::Flush {
            path: self.path.clone(),
            source,
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        check_read_range(&self.path, self.size, offset, buf.len() as u64)?;
        let gb = self.grain_bytes;
        let end = offset + buf.len() as u64;
        // A run of grains contiguous in the file, read with one call.
        let mut run: Option<(u64, u64, u64)> = None; // (virtual start, file start, len)
        let mut off = offset;
        while off <= end {
            let (piece, n) = if off < end {
                let in_grain = off % gb;
                let n = (end - off).min(gb - in_grain);
                (Some((self.lookup(off / gb)?, in_grain)), n)
            } else {
                (None, 0)
            };
            let next_file = match piece {
                Some((Grain::At(s), in_grain)) => Some(s * SECTOR + in_grain),
                _ => None,
            };
            if let Some((vs, fs, len)) = run
                && next_file != Some(fs + len)
            {
                let b = &mut buf[(vs - offset) as usize..(vs - offset + len) as usize];
                self.engine
                    .read_at(&self.file, fs, b)
                    .map_err(|source| ImageError::Read {
                        path: self.path.clone(),
                        offset: vs,
                        len,
                        source,
                    })?;
                run = None;
            }
            if off == end {
                break;
            }
            match next_file {
                Some(f) => match &mut run {
                    Some((_, _, len)) => *len += n,
                    None => run = Some((off, f, n)),
                },
                None => buf[(off - offset) as usize..(off - offset + n) as usize].fill(0),
            }
            off += n;
        }
        Ok(())
    }

    /// Each read is mapped to its grains (runs contiguous in the file merged),
    /// unallocated pieces are zero-filled, and the file reads of every
    /// allocated piece of the batch go to the engine as one batch.
    fn read_batch(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), ImageError> {
        check_read_batch(&self.path, self.size, reads)?;
        // Where each piece of each read lives: (read, bytes into its buffer,
        // length, file offset or None for zeros), in buffer order per read.
        let gb = self.grain_bytes;
        let mut pieces: Vec<(usize, usize, usize, Option<u64>)> = Vec::new();
        for (i, (offset, buf)) in reads.iter().enumerate() {
            let end = *offset + buf.len() as u64;
            let mut off = *offset;
            while off < end {
                let in_grain = off % gb;
                let n = (end - off).min(gb - in_grain);
                let file = match self.lookup(off / gb)? {
                    Grain::At(s) => Some(s * SECTOR + in_grain),
                    Grain::Unallocated | Grain::NoTable => None,
                };
                let at = (off - *offset) as usize;
                match pieces.last_mut() {
                    // Contiguous with the previous piece of this read, in the
                    // file or as zeros: one piece.
                    Some((r, pat, plen, pfile))
                        if *r == i
                            && *pat + *plen == at
                            && match (*pfile, file) {
                                (Some(p), Some(f)) => p + *plen as u64 == f,
                                (None, None) => true,
                                _ => false,
                            } =>
                    {
                        *plen += n as usize;
                    }
                    _ => pieces.push((i, at, n as usize, file)),
                }
                off += n;
            }
        }
        // Cut the buffers into the pieces: zeros filled here, file reads batched.
        let mut file_reads: Vec<(u64, &mut [u8])> = Vec::new();
        // Per file read: the virtual offset it covers (for errors).
        let mut virt: Vec<u64> = Vec::new();
        let mut p = 0;
        for (i, (offset, buf)) in reads.iter_mut().enumerate() {
            let mut rest: &mut [u8] = buf;
            while let Some(&(r, at, len, file)) = pieces.get(p)
                && r == i
            {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                match file {
                    Some(f) => {
                        file_reads.push((f, piece));
                        virt.push(*offset + at as u64);
                    }
                    None => piece.fill(0),
                }
                p += 1;
            }
        }
        self.direct_read
            .read_batch(
                self.engine.as_mut(),
                &self.file,
                &self.path,
                &mut file_reads,
            )
            .map_err(|e| ImageError::Read {
                path: self.path.clone(),
                offset: virt[e.index],
                len: e.len,
                source: e.source,
            })
    }

    fn direct_reads(&mut self) -> bool {
        self.direct_read.enable(&self.path)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn engine(&self) -> Engine {
        self.engine.kind()
    }

    fn grow_to(&mut self, size: u64) -> Result<(), ImageError> {
        if size <= self.size {
            return Ok(());
        }
        Err(ImageError::FixedCapacity {
            path: self.path.clone(),
            format: "monolithicSparse VMDK",
            size: self.size,
            requested: size,
        })
    }

    /// The allocated grains in the range, merged into runs.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
        check_read_range(&self.path, self.size, offset, len)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let gb = self.grain_bytes;
        let gtes = self.gtes;
        let zero_grain = self.header.zero_grain();
        let end = offset + len;
        let (first, last) = (offset / gb / gtes, (end - 1) / gb / gtes);
        for gt in first..=last {
            if self.gd[gt as usize] == 0 {
                continue;
            }
            if self.cache.table(gt).is_none() {
                self.load_table(gt)?;
            }
            let Some(table) = self.cache.table(gt) else {
                continue;
            };
            for (e, &v) in table.iter().enumerate() {
                if v == 0 || (v == 1 && zero_grain) {
                    continue;
                }
                let grain = gt * gtes + e as u64;
                let s = (grain * gb).max(offset);
                let e = ((grain + 1) * gb).min(end);
                if s >= e {
                    continue;
                }
                match out.last_mut() {
                    Some(r) if r.0 + r.1 == s => r.1 += e - s,
                    _ => out.push((s, e - s)),
                }
            }
        }
        Ok(out)
    }
}
