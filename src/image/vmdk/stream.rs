//! streamOptimized export: a VMDK written front to back, once, from a source
//! readable at virtual offsets. Layout: header (grain directory "at end"),
//! descriptor, then for each grain table its compressed grains (each a grain
//! marker: lba, size, zlib data, padded to a sector) followed by a grain-table
//! marker and the table; then a grain-directory marker and the directory, a
//! footer marker and the footer (the header with the directory's real
//! offset), and the end-of-stream marker. All-zero grains and holes are not
//! written; a grain table with no grain is not written either.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use flate2::{Compress, Compression, FlushCompress, Status};

use super::descriptor::{self, ExtentKind};
use super::header::{self, SparseHeader};
use super::sparse::{file_name, new_capacity};
use super::{NEW_GRAIN_SECTORS, NEW_GTES_PER_GT, SECTOR, VmdkError, vmdk_err};
use crate::image::sync_parent_dir;
use crate::image::{Image, ImageError};

/// The export's source: `read(offset, buf)` fills `buf` with the virtual
/// disk's bytes at `offset`.
pub type SourceRead<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), ImageError> + 'a;

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Grains compressed and written.
    pub grains_written: u64,
    /// Grains read but not written because they were all zeros.
    pub zero_grains_skipped: u64,
    /// Grain tables written.
    pub tables_written: u64,
    /// Size of the export file in bytes.
    pub file_bytes: u64,
}

/// Sequential writer that counts sectors.
struct Out {
    w: BufWriter<File>,
    /// Bytes written so far (always a whole number of sectors between items).
    pos: u64,
}

impl Out {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Zero-pad to the next sector boundary.
    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.pos % SECTOR) as usize;
        if rem != 0 {
            self.put(&[0u8; SECTOR as usize][..SECTOR as usize - rem])?;
        }
        Ok(())
    }

    fn sector(&self) -> u64 {
        self.pos / SECTOR
    }
}

/// State of one export between grains.
struct Stream {
    out: Out,
    header: SparseHeader,
    gd: Vec<u32>,
    gt: Vec<u32>,
    cur_gt: u64,
    gt_used: bool,
    stats: StreamStats,
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_le_bytes()).collect()
}

impl Stream {
    /// Sector number as a u32 table entry, or `Full` past 2^32 sectors.
    fn entry(&self) -> Result<u32, VmdkError> {
        u32::try_from(self.out.sector()).map_err(|_| VmdkError::Full {
            sector: self.out.sector(),
        })
    }

    /// Write the current grain table (if it maps any grain) with its marker.
    fn end_table(&mut self) -> Result<(), ExportError> {
        if !self.gt_used {
            return Ok(());
        }
        let sectors = self.header.gt_sectors();
        self.out
            .put(&header::metadata_marker(sectors, header::MARKER_GT))?;
        self.gd[self.cur_gt as usize] = self.entry()?;
        self.out.put(&u32s(&self.gt))?;
        self.out.pad()?;
        self.gt.fill(0);
        self.gt_used = false;
        self.stats.tables_written += 1;
        Ok(())
    }

    fn grain(
        &mut self,
        grain: u64,
        data: &[u8],
        z: &mut Compress,
        buf: &mut Vec<u8>,
    ) -> Result<(), ExportError> {
        let gt = grain / u64::from(self.header.gtes_per_gt);
        if gt != self.cur_gt {
            self.end_table()?;
            self.cur_gt = gt;
        }
        z.reset();
        buf.clear();
        let status = z
            .compress_vec(data, buf, FlushCompress::Finish)
            .map_err(|e| VmdkError::Compress {
                grain,
                why: e.to_string(),
            })?;
        if status != Status::StreamEnd {
            return Err(VmdkError::Compress {
                grain,
                why: format!("deflate did not finish in {} bytes", buf.capacity()),
            }
            .into());
        }
        let entry = self.entry()?;
        let lba = grain * self.header.grain_sectors;
        self.out.put(&header::grain_marker(lba, buf.len() as u32))?;
        self.out.put(buf)?;
        self.out.pad()?;
        let e = (grain % u64::from(self.header.gtes_per_gt)) as usize;
        self.gt[e] = entry;
        self.gt_used = true;
        self.stats.grains_written += 1;
        Ok(())
    }
}

/// An error inside the export, before the path is attached.
enum ExportError {
    Io(io::Error),
    Vmdk(VmdkError),
    Image(ImageError),
}

impl From<io::Error> for ExportError {
    fn from(e: io::Error) -> Self {
        ExportError::Io(e)
    }
}

impl From<VmdkError> for ExportError {
    fn from(e: VmdkError) -> Self {
        ExportError::Vmdk(e)
    }
}

/// Grain numbers to visit, ascending and unique, from byte ranges.
fn grains_of(ranges: &[(u64, u64)], capacity: u64, grain_bytes: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .filter_map(|&(o, l)| {
            let end = o.saturating_add(l).min(capacity);
            (o < end).then(|| (o / grain_bytes, (end - 1) / grain_bytes + 1))
        })
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Write a streamOptimized VMDK of `capacity` bytes (a nonzero multiple of
/// 512, at most 2 TiB) to `dest`, which must not exist. `read(offset, buf)`
/// fills `buf` with the source's bytes at virtual `offset`. `allocated`, if
/// given, lists the `(offset, len)` ranges that may hold data: everything else
/// is taken as zeros and never read. `progress(done, total)` is called as the
/// export moves through the virtual disk (bytes). Grains are deflate-compressed
/// (zlib framing, fast level), each written once; all-zero grains are skipped.
/// The file is fsynced with its directory entry before this returns; on error
/// the partial file is removed.
pub fn export_stream_optimized(
    dest: &Path,
    capacity: u64,
    read: &mut SourceRead<'_>,
    allocated: Option<&[(u64, u64)]>,
    mut progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<StreamStats, ImageError> {
    let sectors = new_capacity(capacity).map_err(|e| vmdk_err(dest, e))?;
    let desc = descriptor::new_descriptor(
        "streamOptimized",
        sectors,
        ExtentKind::Sparse,
        &file_name(dest),
        None,
    )
    .map_err(|e| vmdk_err(dest, VmdkError::Random(e)))?;
    let text = desc.render();
    let desc_sectors = (text.len() as u64).div_ceil(SECTOR);
    let header = SparseHeader {
        version: 3,
        flags: header::FLAG_NL_DETECT | header::FLAG_COMPRESSED | header::FLAG_MARKERS,
        capacity: sectors,
        grain_sectors: NEW_GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_sectors: desc_sectors,
        gtes_per_gt: NEW_GTES_PER_GT,
        rgd_offset: 0,
        gd_offset: header::GD_AT_END,
        overhead: 1 + desc_sectors,
        unclean_shutdown: false,
        compress: header::COMPRESS_DEFLATE,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| ImageError::Export {
            path: dest.to_path_buf(),
            offset: 0,
            source,
        })?;
    let mut stream = Stream {
        out: Out {
            w: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
        },
        gd: vec![0u32; header.gt_count() as usize],
        gt: vec![0u32; header.gtes_per_gt as usize],
        header,
        cur_gt: 0,
        gt_used: false,
        stats: StreamStats::default(),
    };
    let res = write_all(&mut stream, &text, capacity, read, allocated, &mut progress);
    let res = res.and_then(|()| {
        let file = stream.out.w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        sync_parent_dir(dest)?;
        Ok(())
    });
    match res {
        Ok(()) => {
            stream.stats.file_bytes = stream.out.pos;
            tracing::info!(path = %dest.display(), capacity, grains = stream.stats.grains_written, bytes = stream.out.pos, "exported streamOptimized VMDK");
            Ok(stream.stats)
        }
        Err(e) => {
            let _ = std::fs::remove_file(dest);
            Err(match e {
                ExportError::Io(source) => ImageError::Export {
                    path: dest.to_path_buf(),
                    offset: stream.out.pos,
                    source,
                },
                ExportError::Vmdk(v) => vmdk_err(dest, v),
                ExportError::Image(i) => i,
            })
        }
    }
}

fn write_all(
    s: &mut Stream,
    text: &str,
    capacity: u64,
    read: &mut SourceRead<'_>,
    allocated: Option<&[(u64, u64)]>,
    progress: &mut Option<&mut dyn FnMut(u64, u64)>,
) -> Result<(), ExportError> {
    let h = s.header;
    s.out.put(&h.encode())?;
    s.out.put(text.as_bytes())?;
    s.out.pad()?;
    let gb = h.grain_bytes();
    let all = [(0, capacity)];
    let spans = grains_of(allocated.unwrap_or(&all), capacity, gb);
    let mut data = vec![0u8; gb as usize];
    let mut z = Compress::new(Compression::fast(), true);
    let mut buf: Vec<u8> = Vec::with_capacity(2 * gb as usize + 1024);
    for (first, end) in spans {
        for grain in first..end {
            let at = grain * gb;
            let n = gb.min(capacity - at) as usize;
            // A short last grain is compressed whole, its tail zeros.
            data[n..].fill(0);
            read(at, &mut data[..n]).map_err(ExportError::Image)?;
            if data.iter().all(|&b| b == 0) {
                s.stats.zero_grains_skipped += 1;
            } else {
                s.grain(grain, &data, &mut z, &mut buf)?;
            }
            if let Some(p) = progress.as_mut() {
                p(at + n as u64, capacity);
            }
        }
    }
    s.end_table()?;
    let gd_sectors = h.gd_sectors();
    s.out
        .put(&header::metadata_marker(gd_sectors, header::MARKER_GD))?;
    let gd_at = s.out.sector();
    s.out.put(&u32s(&s.gd))?;
    s.out.pad()?;
    s.out
        .put(&header::metadata_marker(1, header::MARKER_FOOTER))?;
    let footer = SparseHeader {
        gd_offset: gd_at,
        ..h
    };
    s.out.put(&footer.encode())?;
    s.out.put(&header::metadata_marker(0, header::MARKER_EOS))?;
    if let Some(p) = progress.as_mut() {
        p(capacity, capacity);
    }
    Ok(())
}

/// Export `image` (e.g. a recovery point materialized as an image) as a
/// streamOptimized VMDK at `dest`, reading only its [`Image::data_ranges`].
pub fn export_image_stream_optimized(
    image: &mut dyn Image,
    dest: &Path,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<StreamStats, ImageError> {
    let size = image.size();
    let ranges = image.data_ranges(0, size)?;
    let mut read = |offset: u64, buf: &mut [u8]| image.read_at(offset, buf);
    export_stream_optimized(dest, size, &mut read, Some(&ranges), progress)
}
