//! ublk's user-space ABI (`include/uapi/linux/ublk_cmd.h`) as plain data: the
//! ioctl-encoded command opcodes, the structs exchanged with the driver with
//! their exact byte layouts, and the decoding of an I/O descriptor into a
//! request checked against the device. Nothing here touches a device; every
//! layout has a golden test.
//!
//! The structs are native-endian, as the kernel reads and writes them.

use thiserror::Error;

use crate::frontend::{IoError, Op, check_range};

// ---------------------------------------------------------------------------
// Opcodes

#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc {
    pub const DIR_SHIFT: u32 = 30;
    pub const SIZE_BITS: u32 = 14;
    pub const WRITE: u32 = 1;
    pub const READ: u32 = 2;
}

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc {
    pub const DIR_SHIFT: u32 = 29;
    pub const SIZE_BITS: u32 = 13;
    pub const WRITE: u32 = 4;
    pub const READ: u32 = 2;
}

/// `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << ioc::SIZE_BITS));
    (dir << ioc::DIR_SHIFT) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(ioc::READ | ioc::WRITE, nr, size)
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(ioc::READ, nr, size)
}

/// `UBLK_U_CMD_GET_DEV_INFO`: copy the device's `ublksrv_ctrl_dev_info` out.
pub(crate) const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL_CMD_LEN);
/// `UBLK_U_CMD_ADD_DEV`: create `/dev/ublkcN` from a `ublksrv_ctrl_dev_info`.
pub(crate) const CMD_ADD_DEV: u32 = iowr(0x04, CTRL_CMD_LEN);
/// `UBLK_U_CMD_DEL_DEV`: remove the device (waits until its number is free).
pub(crate) const CMD_DEL_DEV: u32 = iowr(0x05, CTRL_CMD_LEN);
/// `UBLK_U_CMD_START_DEV`: add `/dev/ublkbN` once every queue has fetched.
pub(crate) const CMD_START_DEV: u32 = iowr(0x06, CTRL_CMD_LEN);
/// `UBLK_U_CMD_STOP_DEV`: remove `/dev/ublkbN`, then abort the fetches.
pub(crate) const CMD_STOP_DEV: u32 = iowr(0x07, CTRL_CMD_LEN);
/// `UBLK_U_CMD_SET_PARAMS`: set `ublk_params` before the device starts.
pub(crate) const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL_CMD_LEN);
/// `UBLK_U_IO_FETCH_REQ`: hand a tag (and its buffer) to the driver.
pub(crate) const IO_FETCH_REQ: u32 = iowr(0x20, IO_CMD_LEN);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`: answer a tag's request and fetch again.
pub(crate) const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO_CMD_LEN);

/// The name of a control opcode, for errors and logs.
pub(crate) fn cmd_name(op: u32) -> &'static str {
    match op {
        CMD_GET_DEV_INFO => "GET_DEV_INFO",
        CMD_ADD_DEV => "ADD_DEV",
        CMD_DEL_DEV => "DEL_DEV",
        CMD_START_DEV => "START_DEV",
        CMD_STOP_DEV => "STOP_DEV",
        CMD_SET_PARAMS => "SET_PARAMS",
        IO_FETCH_REQ => "FETCH_REQ",
        IO_COMMIT_AND_FETCH_REQ => "COMMIT_AND_FETCH_REQ",
        _ => "unknown command",
    }
}

// ---------------------------------------------------------------------------
// Constants

/// `UBLK_IO_RES_OK`: a fetch completed with a request to serve.
pub(crate) const IO_RES_OK: i32 = 0;
/// `UBLK_IO_RES_ABORT`: the device is going away; the tag is not fetched again.
pub(crate) const IO_RES_ABORT: i32 = -libc::ENODEV;

/// `UBLK_MAX_QUEUE_DEPTH`.
pub(crate) const MAX_QUEUE_DEPTH: u16 = 4096;
/// `UBLK_MAX_NR_QUEUES`.
pub(crate) const MAX_NR_QUEUES: u16 = 4096;
/// Largest I/O buffer of one request (`1 << UBLK_IO_BUF_BITS`, 32 MiB).
pub(crate) const MAX_IO_BUF_BYTES: u32 = 1 << 25;
/// Largest device number (`UBLK_MAX_UBLKS`, the minor space).
pub(crate) const MAX_DEV_ID: u32 = (1 << 20) - 1;
/// `dev_id` asking the driver to choose the device number.
pub(crate) const DEV_ID_ANY: u32 = u32::MAX;
/// `queue_id` of a control command that is not about one queue.
pub(crate) const QUEUE_ID_NONE: u16 = u16::MAX;

/// `UBLK_F_CMD_IOCTL_ENCODE`: commands use the `UBLK_U_*` opcodes.
pub(crate) const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

/// `UBLK_S_DEV_LIVE`.
pub(crate) const S_DEV_LIVE: u16 = 1;

/// `UBLK_IO_OP_*`.
pub(crate) const OP_READ: u8 = 0;
pub(crate) const OP_WRITE: u8 = 1;
pub(crate) const OP_FLUSH: u8 = 2;
pub(crate) const OP_DISCARD: u8 = 3;
pub(crate) const OP_WRITE_ZEROES: u8 = 5;

/// `UBLK_IO_F_FUA` (a bit of `op_flags`).
pub(crate) const IO_F_FUA: u32 = 1 << 13;
/// `UBLK_IO_F_NOUNMAP`: a write-zeroes that must not deallocate.
pub(crate) const IO_F_NOUNMAP: u32 = 1 << 15;

/// `UBLK_ATTR_READ_ONLY`.
pub(crate) const ATTR_READ_ONLY: u32 = 1 << 0;
/// `UBLK_ATTR_VOLATILE_CACHE`: the device has a cache that FLUSH empties.
pub(crate) const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// `UBLK_ATTR_FUA`: the device honours forced unit access.
pub(crate) const ATTR_FUA: u32 = 1 << 3;

/// `UBLK_PARAM_TYPE_BASIC`.
pub(crate) const PARAM_TYPE_BASIC: u32 = 1 << 0;
/// `UBLK_PARAM_TYPE_DISCARD`.
pub(crate) const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// Bytes of a sector, the unit of every ublk position and length.
pub(crate) const SECTOR: u64 = 512;

/// Largest discard advertised, in sectors (1 GiB: a hole punch or a capture
/// record, cheap at any size).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest write-zeroes advertised, in sectors (256 MiB: without unmap it
/// writes zeros, so one request stays well inside the block layer's timeout).
pub(crate) const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 19;

// ---------------------------------------------------------------------------
// Structs

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// `sizeof(struct ublksrv_ctrl_cmd)`.
pub(crate) const CTRL_CMD_LEN: usize = 32;

/// `struct ublksrv_ctrl_cmd`: the payload of a control command's SQE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CtrlCmd {
    /// Device the command is for (`DEV_ID_ANY` for ADD_DEV to let the driver choose).
    pub dev_id: u32,
    /// Queue, or `QUEUE_ID_NONE`.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// Address of the command's buffer (in or out), 0 if none.
    pub addr: u64,
    /// Inline argument (`data[0]`): the server's pid for START_DEV.
    pub data0: u64,
}

impl CtrlCmd {
    /// A command for device `dev_id` without a buffer.
    pub fn new(dev_id: u32) -> Self {
        CtrlCmd {
            dev_id,
            queue_id: QUEUE_ID_NONE,
            ..CtrlCmd::default()
        }
    }

    /// The 32 bytes the driver reads (`dev_path_len`, `pad`, `reserved` zero).
    pub fn encode(&self) -> [u8; CTRL_CMD_LEN] {
        let mut b = [0u8; CTRL_CMD_LEN];
        put_u32(&mut b, 0, self.dev_id);
        put_u16(&mut b, 4, self.queue_id);
        put_u16(&mut b, 6, self.len);
        put_u64(&mut b, 8, self.addr);
        put_u64(&mut b, 16, self.data0);
        b
    }
}

/// `sizeof(struct ublksrv_ctrl_dev_info)`.
pub(crate) const DEV_INFO_LEN: usize = 64;

/// `struct ublksrv_ctrl_dev_info`: what ADD_DEV asks for and the driver grants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DevInfo {
    /// Hardware queues (the driver caps it at the number of CPUs).
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*` (set by the driver).
    pub state: u16,
    /// Largest request buffer (the driver rounds it down to a page).
    pub max_io_buf_bytes: u32,
    /// Device number N of `/dev/ublkcN` and `/dev/ublkbN`.
    pub dev_id: u32,
    /// Pid of the serving process (set by START_DEV).
    pub ublksrv_pid: i32,
    /// `UBLK_F_*` asked for; on return, granted.
    pub flags: u64,
    /// Owner uid (set by the driver).
    pub owner_uid: u32,
    /// Owner gid (set by the driver).
    pub owner_gid: u32,
}

impl DevInfo {
    /// The 64 bytes of the struct.
    pub fn encode(&self) -> [u8; DEV_INFO_LEN] {
        let mut b = [0u8; DEV_INFO_LEN];
        put_u16(&mut b, 0, self.nr_hw_queues);
        put_u16(&mut b, 2, self.queue_depth);
        put_u16(&mut b, 4, self.state);
        put_u32(&mut b, 8, self.max_io_buf_bytes);
        put_u32(&mut b, 12, self.dev_id);
        put_u32(&mut b, 16, self.ublksrv_pid as u32);
        put_u64(&mut b, 24, self.flags);
        // 32: ublksrv_flags (server-private, unused); 40/44: owner, set by the driver.
        put_u32(&mut b, 40, self.owner_uid);
        put_u32(&mut b, 44, self.owner_gid);
        b
    }

    /// Parse the struct from the first 64 bytes of `b` (`None` when shorter).
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < DEV_INFO_LEN {
            return None;
        }
        Some(DevInfo {
            nr_hw_queues: get_u16(b, 0),
            queue_depth: get_u16(b, 2),
            state: get_u16(b, 4),
            max_io_buf_bytes: get_u32(b, 8),
            dev_id: get_u32(b, 12),
            ublksrv_pid: get_u32(b, 16) as i32,
            flags: get_u64(b, 24),
            owner_uid: get_u32(b, 40),
            owner_gid: get_u32(b, 44),
        })
    }
}

/// `sizeof(struct ublksrv_io_desc)`.
pub(crate) const IO_DESC_LEN: usize = 24;

/// `struct ublksrv_io_desc`: one request, written by the driver into the
/// queue's shared array at the tag's index before the tag's fetch completes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IoDesc {
    /// Operation (bits 0-7) and `UBLK_IO_F_*` flags (bits 8-31).
    pub op_flags: u32,
    /// Length in sectors.
    pub nr_sectors: u32,
    /// Position in sectors.
    pub start_sector: u64,
    /// The buffer address the server gave for this tag.
    pub addr: u64,
}

impl IoDesc {
    /// Parse the 24 bytes of a descriptor.
    pub fn decode(b: &[u8; IO_DESC_LEN]) -> Self {
        IoDesc {
            op_flags: get_u32(b, 0),
            nr_sectors: get_u32(b, 4),
            start_sector: get_u64(b, 8),
            addr: get_u64(b, 16),
        }
    }

    /// The 24 bytes (what the driver would write; for tests).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; IO_DESC_LEN] {
        let mut b = [0u8; IO_DESC_LEN];
        put_u32(&mut b, 0, self.op_flags);
        put_u32(&mut b, 4, self.nr_sectors);
        put_u64(&mut b, 8, self.start_sector);
        put_u64(&mut b, 16, self.addr);
        b
    }

    /// `UBLK_IO_OP_*`.
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// True when `flag` (a `UBLK_IO_F_*` bit) is set.
    pub fn has(&self, flag: u32) -> bool {
        self.op_flags & flag != 0
    }
}

/// `sizeof(struct ublksrv_io_cmd)`.
pub(crate) const IO_CMD_LEN: usize = 16;

/// `struct ublksrv_io_cmd`: the payload of FETCH_REQ and COMMIT_AND_FETCH_REQ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IoCmd {
    /// Queue.
    pub q_id: u16,
    /// Tag.
    pub tag: u16,
    /// Result of the committed request: bytes, or a negative errno.
    pub result: i32,
    /// The tag's buffer for the next request.
    pub addr: u64,
}

impl IoCmd {
    /// The 16 bytes the driver reads.
    pub fn encode(&self) -> [u8; IO_CMD_LEN] {
        let mut b = [0u8; IO_CMD_LEN];
        put_u16(&mut b, 0, self.q_id);
        put_u16(&mut b, 2, self.tag);
        put_u32(&mut b, 4, self.result as u32);
        put_u64(&mut b, 8, self.addr);
        b
    }
}

/// `sizeof(struct ublk_params)` in the header this follows: header (8),
/// basic (32), discard (20), devt (16), zoned (32), dma (8), 4 bytes of
/// padding, segment (16), integrity (16). An older driver copies only the part
/// it knows; a newer one zeroes what it knows beyond it.
pub(crate) const PARAMS_LEN: usize = 152;
/// Offset of `struct ublk_param_basic` in `struct ublk_params`.
pub(crate) const PARAMS_BASIC_AT: usize = 8;
/// Offset of `struct ublk_param_discard`.
pub(crate) const PARAMS_DISCARD_AT: usize = 40;

/// `struct ublk_param_basic`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BasicParams {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size (9..=12).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size (>= logical).
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimum I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors (at most `max_io_buf_bytes / 512`).
    pub max_sectors: u32,
    /// Boundary requests must not cross, sectors (0: none).
    pub chunk_sectors: u32,
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DiscardParams {
    /// Discard alignment in bytes.
    pub discard_alignment: u32,
    /// Discard granularity in bytes (must not be 0).
    pub discard_granularity: u32,
    /// Largest discard, sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes, sectors.
    pub max_write_zeroes_sectors: u32,
    /// Segments of one discard (the driver supports exactly 1).
    pub max_discard_segments: u16,
}

/// The parameters SET_PARAMS gives the driver: basic and discard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Params {
    /// Sizes, limits, attributes.
    pub basic: BasicParams,
    /// Discard and write-zeroes limits.
    pub discard: DiscardParams,
}

impl Params {
    /// The `struct ublk_params` bytes: `len` = [`PARAMS_LEN`], `types` =
    /// basic | discard, the other parameter sets zero.
    pub fn encode(&self) -> [u8; PARAMS_LEN] {
        let mut b = [0u8; PARAMS_LEN];
        put_u32(&mut b, 0, PARAMS_LEN as u32);
        put_u32(&mut b, 4, PARAM_TYPE_BASIC | PARAM_TYPE_DISCARD);
        let a = PARAMS_BASIC_AT;
        let p = &self.basic;
        put_u32(&mut b, a, p.attrs);
        b[a + 4] = p.logical_bs_shift;
        b[a + 5] = p.physical_bs_shift;
        b[a + 6] = p.io_opt_shift;
        b[a + 7] = p.io_min_shift;
        put_u32(&mut b, a + 8, p.max_sectors);
        put_u32(&mut b, a + 12, p.chunk_sectors);
        put_u64(&mut b, a + 16, p.dev_sectors);
        put_u64(&mut b, a + 24, p.virt_boundary_mask);
        let a = PARAMS_DISCARD_AT;
        let d = &self.discard;
        put_u32(&mut b, a, d.discard_alignment);
        put_u32(&mut b, a + 4, d.discard_granularity);
        put_u32(&mut b, a + 8, d.max_discard_sectors);
        put_u32(&mut b, a + 12, d.max_write_zeroes_sectors);
        put_u16(&mut b, a + 16, d.max_discard_segments);
        b
    }

    /// The parameters of a disk of `size` bytes served with `logical_block`
    /// (512 or 4096) blocks and requests of at most `max_io_buf_bytes` (as
    /// granted by ADD_DEV). The device ends at the last whole logical block.
    /// A volatile cache with FUA is advertised so that the kernel sends FLUSH
    /// and FUA, which reach [`crate::frontend::BlockIo::flush`] and the `fua`
    /// arguments: the backing disk has a page cache, and a workload's flush
    /// must empty it.
    pub fn for_disk(size: u64, logical_block: u32, max_io_buf_bytes: u32, read_only: bool) -> Self {
        let lbs_shift = logical_block.trailing_zeros() as u8;
        let phys_shift = lbs_shift.max(12);
        let mut attrs = ATTR_VOLATILE_CACHE | ATTR_FUA;
        if read_only {
            attrs |= ATTR_READ_ONLY;
        }
        let usable = size / u64::from(logical_block) * u64::from(logical_block);
        Params {
            basic: BasicParams {
                attrs,
                logical_bs_shift: lbs_shift,
                physical_bs_shift: phys_shift,
                io_opt_shift: phys_shift,
                io_min_shift: phys_shift,
                max_sectors: max_io_buf_bytes / SECTOR as u32,
                chunk_sectors: 0,
                dev_sectors: usable / SECTOR,
                virt_boundary_mask: 0,
            },
            discard: DiscardParams {
                discard_alignment: 0,
                discard_granularity: logical_block,
                max_discard_sectors: MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
                max_discard_segments: 1,
            },
        }
    }
}

/// Size of the shared descriptor array of a queue of `depth` tags, as the
/// driver maps it: whole pages.
pub(crate) fn cmd_buf_len(depth: u16, page: usize) -> usize {
    (usize::from(depth) * IO_DESC_LEN).div_ceil(page) * page
}

/// Offset in `/dev/ublkcN` at which queue `q_id`'s descriptor array is mapped:
/// every queue has room for the largest depth (`UBLKSRV_CMD_BUF_OFFSET` is 0).
pub(crate) fn cmd_buf_offset(q_id: u16, page: usize) -> u64 {
    u64::from(q_id) * cmd_buf_len(MAX_QUEUE_DEPTH, page) as u64
}

// ---------------------------------------------------------------------------
// Requests

/// What the device looks like to the requests: its size and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Bytes reachable through the device (`dev_sectors * 512`).
    pub size: u64,
    /// Logical block size: every position and length is a multiple.
    pub logical_block: u32,
    /// Largest read or write, bytes (the size of each tag's buffer).
    pub max_io_bytes: u32,
}

impl Limits {
    /// The limits `params` advertise, with tag buffers of `max_io_bytes`.
    pub fn of(params: &Params, max_io_bytes: u32) -> Self {
        Limits {
            size: params.basic.dev_sectors * SECTOR,
            logical_block: 1 << params.basic.logical_bs_shift,
            max_io_bytes,
        }
    }
}

/// One decoded request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// Read `len` bytes at `offset` into the tag's buffer.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Write `len` bytes of the tag's buffer at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Forced unit access.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Forced unit access.
        fua: bool,
    },
    /// Write zeros over a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// False when the driver set `UBLK_IO_F_NOUNMAP`.
        may_unmap: bool,
        /// Forced unit access.
        fua: bool,
    },
}

/// Why a descriptor was refused before reaching the disk.
#[derive(Debug, Error)]
pub(crate) enum DecodeError {
    /// An operation this server does not serve (zoned ops, WRITE_SAME...).
    #[error("unsupported ublk operation {0}")]
    UnknownOp(u8),
    /// Position or length is not a multiple of the logical block.
    #[error("{op} at sector {sector} of {sectors} sectors is not aligned to {block} bytes")]
    Misaligned {
        /// Operation.
        op: Op,
        /// Start sector.
        sector: u64,
        /// Length in sectors.
        sectors: u32,
        /// Logical block size.
        block: u32,
    },
    /// Longer than the advertised limit for the operation.
    #[error("{op} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Operation.
        op: Op,
        /// Requested bytes.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Empty, or outside the device.
    #[error(transparent)]
    Range(#[from] IoError),
}

impl DecodeError {
    /// The errno answered to the driver.
    pub fn errno(&self) -> i32 {
        match self {
            DecodeError::UnknownOp(_) => libc::EOPNOTSUPP,
            DecodeError::Misaligned { .. } | DecodeError::TooLarge { .. } => libc::EINVAL,
            DecodeError::Range(e) => e.errno(),
        }
    }
}

/// Decode a descriptor into a request and check it against the device: known
/// operation, non-empty, aligned to the logical block, within the size limit
/// of its operation and inside the device.
pub(crate) fn decode(d: &IoDesc, lim: &Limits) -> Result<Request, DecodeError> {
    let op = match d.op() {
        OP_READ => Op::Read,
        OP_WRITE => Op::Write,
        OP_FLUSH => return Ok(Request::Flush),
        OP_DISCARD => Op::Trim,
        OP_WRITE_ZEROES => Op::WriteZeroes,
        other => return Err(DecodeError::UnknownOp(other)),
    };
    let offset = d.start_sector.saturating_mul(SECTOR);
    let len = u64::from(d.nr_sectors) * SECTOR;
    check_range(op, offset, len, lim.size)?;
    let block = u64::from(lim.logical_block);
    if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
        return Err(DecodeError::Misaligned {
            op,
            sector: d.start_sector,
            sectors: d.nr_sectors,
            block: lim.logical_block,
        });
    }
    let max = match op {
        Op::Read | Op::Write => u64::from(lim.max_io_bytes),
        Op::Trim => u64::from(MAX_DISCARD_SECTORS) * SECTOR,
        _ => u64::from(MAX_WRITE_ZEROES_SECTORS) * SECTOR,
    };
    if len > max {
        return Err(DecodeError::TooLarge { op, len, max });
    }
    let fua = d.has(IO_F_FUA);
    Ok(match op {
        // len <= max_io_bytes, a u32.
        Op::Read => Request::Read {
            offset,
            len: len as u32,
        },
        Op::Write => Request::Write {
            offset,
            len: len as u32,
            fua,
        },
        Op::Trim => Request::Discard { offset, len, fua },
        _ => Request::WriteZeroes {
            offset,
            len,
            may_unmap: !d.has(IO_F_NOUNMAP),
            fua,
        },
    })
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
