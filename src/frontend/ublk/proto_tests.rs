//! Golden layouts of the ublk ABI (sizes and offsets per
//! `include/uapi/linux/ublk_cmd.h`) and the descriptor decoding.

use super::*;

#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
#[test]
fn opcodes_are_the_ioctl_encoded_values() {
    // _IOR('u', 2, 32), _IOWR('u', nr, 32), _IOWR('u', nr, 16).
    assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
    assert_eq!(CMD_ADD_DEV, 0xc020_7504);
    assert_eq!(CMD_DEL_DEV, 0xc020_7505);
    assert_eq!(CMD_START_DEV, 0xc020_7506);
    assert_eq!(CMD_STOP_DEV, 0xc020_7507);
    assert_eq!(CMD_SET_PARAMS, 0xc020_7508);
    assert_eq!(IO_FETCH_REQ, 0xc010_7520);
    assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    assert_eq!(cmd_name(CMD_START_DEV), "START_DEV");
    assert_eq!(cmd_name(0), "unknown command");
}

/// Little-endian bytes of `v` at `at` in `b`.
fn le(b: &[u8], at: usize, v: u64, width: usize) {
    assert_eq!(
        &b[at..at + width],
        &v.to_le_bytes()[..width],
        "field at offset {at} ({width} bytes)"
    );
}

#[cfg(target_endian = "little")]
#[test]
fn ctrl_cmd_layout() {
    let c = CtrlCmd {
        dev_id: 0x0102_0304,
        queue_id: 0xfffe,
        len: 0x40,
        addr: 0x1122_3344_5566_7788,
        data0: 0x99,
    };
    let b = c.encode();
    assert_eq!(b.len(), 32);
    #[rustfmt::skip]
    let golden: [u8; 32] = [
        0x04, 0x03, 0x02, 0x01,                         // dev_id
        0xfe, 0xff,                                     // queue_id
        0x40, 0x00,                                     // len
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // addr
        0x99, 0, 0, 0, 0, 0, 0, 0,                      // data[0]
        0, 0, 0, 0, 0, 0, 0, 0,                         // dev_path_len, pad, reserved
    ];
    assert_eq!(b, golden);
    let n = CtrlCmd::new(7);
    assert_eq!(n.queue_id, QUEUE_ID_NONE);
    assert_eq!((n.len, n.addr, n.data0), (0, 0, 0));
}

#[cfg(target_endian = "little")]
#[test]
fn dev_info_layout_and_round_trip() {
    let i = DevInfo {
        nr_hw_queues: 0x0102,
        queue_depth: 0x0304,
        state: 0x0506,
        max_io_buf_bytes: 0x0708_090a,
        dev_id: 0x0b0c_0d0e,
        ublksrv_pid: -2,
        flags: 0x1112_1314_1516_1718,
        owner_uid: 0x2122_2324,
        owner_gid: 0x3132_3334,
    };
    let b = i.encode();
    assert_eq!(b.len(), 64);
    le(&b, 0, 0x0102, 2);
    le(&b, 2, 0x0304, 2);
    le(&b, 4, 0x0506, 2);
    le(&b, 6, 0, 2); // pad0
    le(&b, 8, 0x0708_090a, 4);
    le(&b, 12, 0x0b0c_0d0e, 4);
    le(&b, 16, 0xffff_fffe, 4);
    le(&b, 20, 0, 4); // pad1
    le(&b, 24, 0x1112_1314_1516_1718, 8);
    le(&b, 32, 0, 8); // ublksrv_flags
    le(&b, 40, 0x2122_2324, 4);
    le(&b, 44, 0x3132_3334, 4);
    le(&b, 48, 0, 8); // reserved1
    le(&b, 56, 0, 8); // reserved2
    assert_eq!(DevInfo::decode(&b), Some(i));
    assert_eq!(DevInfo::decode(&b[..63]), None);
}

#[cfg(target_endian = "little")]
#[test]
fn io_desc_and_io_cmd_layouts() {
    #[rustfmt::skip]
    let raw: [u8; 24] = [
        0x01, 0x20, 0x00, 0x00,                         // op_flags: WRITE | FUA
        0x08, 0x00, 0x00, 0x00,                         // nr_sectors
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // start_sector
        0x00, 0x10, 0x00, 0x00, 0x00, 0x7f, 0x00, 0x00, // addr
    ];
    let d = IoDesc::decode(&raw);
    assert_eq!(d.op(), OP_WRITE);
    assert!(d.has(IO_F_FUA) && !d.has(IO_F_NOUNMAP));
    assert_eq!((d.nr_sectors, d.start_sector), (8, 16));
    assert_eq!(d.addr, 0x7f00_0000_1000);
    assert_eq!(d.encode(), raw);

    let c = IoCmd {
        q_id: 3,
        tag: 0x0102,
        result: -libc::EIO,
        addr: 0x7f00_0000_2000,
    };
    #[rustfmt::skip]
    let golden: [u8; 16] = [
        0x03, 0x00,                                     // q_id
        0x02, 0x01,                                     // tag
        0xfb, 0xff, 0xff, 0xff,                         // result (-5)
        0x00, 0x20, 0x00, 0x00, 0x00, 0x7f, 0x00, 0x00, // addr
    ];
    assert_eq!(c.encode(), golden);
}

#[cfg(target_endian = "little")]
#[test]
fn params_layout() {
    let p = Params::for_disk(
        (1 << 30) + 4096 + 512, // the last partial 4 KiB block is not exposed
        4096,
        512 * 1024,
        true,
    );
    let b = p.encode();
    assert_eq!(b.len(), 152);
    // struct ublk_params header
    le(&b, 0, 152, 4); // len
    le(&b, 4, 0b11, 4); // types: BASIC | DISCARD
    // struct ublk_param_basic at 8
    le(&b, 8, 0b1101, 4); // READ_ONLY | VOLATILE_CACHE | FUA
    assert_eq!(b[12], 12); // logical_bs_shift
    assert_eq!(b[13], 12); // physical_bs_shift
    assert_eq!(b[14], 12); // io_opt_shift
    assert_eq!(b[15], 12); // io_min_shift
    le(&b, 16, 1024, 4); // max_sectors
    le(&b, 20, 0, 4); // chunk_sectors
    le(&b, 24, ((1 << 30) + 4096) / 512, 8); // dev_sectors
    le(&b, 32, 0, 8); // virt_boundary_mask
    // struct ublk_param_discard at 40
    le(&b, 40, 0, 4); // discard_alignment
    le(&b, 44, 4096, 4); // discard_granularity
    le(&b, 48, u64::from(MAX_DISCARD_SECTORS), 4);
    le(&b, 52, u64::from(MAX_WRITE_ZEROES_SECTORS), 4);
    le(&b, 56, 1, 2); // max_discard_segments
    le(&b, 58, 0, 2); // reserved0
    // devt (60), zoned (76), dma (108), pad, segment (120), integrity (136): zero.
    assert!(b[60..].iter().all(|&x| x == 0));

    let p = Params::for_disk(1 << 20, 512, 1 << 20, false);
    assert_eq!(p.basic.attrs, ATTR_VOLATILE_CACHE | ATTR_FUA);
    assert_eq!(p.basic.logical_bs_shift, 9);
    assert_eq!(p.basic.physical_bs_shift, 12);
    assert_eq!(p.basic.max_sectors, 2048);
    assert_eq!(p.discard.discard_granularity, 512);
    let lim = Limits::of(&p, 1 << 20);
    assert_eq!((lim.size, lim.logical_block), (1 << 20, 512));
}

#[test]
fn descriptor_array_offsets() {
    // 4096 tags × 24 bytes = 96 KiB per queue slot; a queue maps whole pages.
    assert_eq!(cmd_buf_len(MAX_QUEUE_DEPTH, 4096), 98_304);
    assert_eq!(cmd_buf_len(64, 4096), 4096);
    assert_eq!(cmd_buf_len(171, 4096), 8192);
    assert_eq!(cmd_buf_offset(0, 4096), 0);
    assert_eq!(cmd_buf_offset(3, 4096), 3 * 98_304);
    assert_eq!(cmd_buf_len(64, 65_536), 65_536);
    assert_eq!(cmd_buf_offset(1, 65_536), 131_072);
}

fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
    IoDesc {
        op_flags: u32::from(op) | flags,
        nr_sectors: sectors,
        start_sector: sector,
        addr: 0,
    }
}

const LIM: Limits = Limits {
    size: 1 << 20,
    logical_block: 4096,
    max_io_bytes: 64 * 1024,
};

#[test]
fn requests_decode_with_their_flags() {
    assert_eq!(
        decode(&desc(OP_READ, 0, 8, 16), &LIM).unwrap(),
        Request::Read {
            offset: 4096,
            len: 8192
        }
    );
    assert_eq!(
        decode(&desc(OP_WRITE, IO_F_FUA, 0, 8), &LIM).unwrap(),
        Request::Write {
            offset: 0,
            len: 4096,
            fua: true
        }
    );
    assert_eq!(
        decode(&desc(OP_FLUSH, 0, 0, 0), &LIM).unwrap(),
        Request::Flush
    );
    assert_eq!(
        decode(&desc(OP_DISCARD, 0, 2040, 8), &LIM).unwrap(),
        Request::Discard {
            offset: (1 << 20) - 4096,
            len: 4096,
            fua: false
        }
    );
    assert_eq!(
        decode(&desc(OP_WRITE_ZEROES, 0, 0, 2048), &LIM).unwrap(),
        Request::WriteZeroes {
            offset: 0,
            len: 1 << 20,
            may_unmap: true,
            fua: false
        }
    );
    assert_eq!(
        decode(&desc(OP_WRITE_ZEROES, IO_F_NOUNMAP | IO_F_FUA, 8, 8), &LIM).unwrap(),
        Request::WriteZeroes {
            offset: 4096,
            len: 4096,
            may_unmap: false,
            fua: true
        }
    );
}

#[test]
fn bad_requests_are_refused_with_their_errno() {
    let errno = |d: IoDesc| decode(&d, &LIM).unwrap_err().errno();
    // WRITE_SAME (4) and the zoned operations are not served.
    assert_eq!(errno(desc(4, 0, 0, 8)), libc::EOPNOTSUPP);
    assert_eq!(errno(desc(13, 0, 0, 8)), libc::EOPNOTSUPP);
    // Empty.
    assert_eq!(errno(desc(OP_READ, 0, 0, 0)), libc::EINVAL);
    // Beyond the end: reads EINVAL, writes ENOSPC (as IoError::errno).
    assert_eq!(errno(desc(OP_READ, 0, 2048, 8)), libc::EINVAL);
    assert_eq!(errno(desc(OP_WRITE, 0, 2044, 8)), libc::ENOSPC);
    assert_eq!(errno(desc(OP_WRITE_ZEROES, 0, 2048, 8)), libc::ENOSPC);
    assert_eq!(errno(desc(OP_DISCARD, 0, 2048, 8)), libc::EINVAL);
    // A start sector whose byte offset overflows.
    assert_eq!(errno(desc(OP_READ, 0, u64::MAX / 8, 8)), libc::EINVAL);
    // Not aligned to the 4 KiB logical block.
    assert_eq!(errno(desc(OP_READ, 0, 1, 8)), libc::EINVAL);
    assert_eq!(errno(desc(OP_WRITE, 0, 0, 1)), libc::EINVAL);
    // Larger than a tag's buffer.
    let e = decode(&desc(OP_WRITE, 0, 0, 136), &LIM).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("exceeds the limit of 65536"), "{e}");
    // Larger than the advertised write-zeroes limit.
    let big = Limits {
        size: 1 << 40,
        ..LIM
    };
    let d = desc(OP_WRITE_ZEROES, 0, 0, MAX_WRITE_ZEROES_SECTORS + 8);
    assert_eq!(decode(&d, &big).unwrap_err().errno(), libc::EINVAL);
    let d = desc(OP_DISCARD, 0, 0, MAX_WRITE_ZEROES_SECTORS + 8);
    assert!(decode(&d, &big).is_ok(), "discards may be larger");
}
