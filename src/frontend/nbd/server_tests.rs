//! In-process server tests over loopback TCP and Unix sockets with a
//! hand-written client: normal I/O, every malformed case, budgets, the
//! connection cap, shutdown, disk errors and TLS.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::proto::*;
use super::testutil::*;
use super::{NbdConfig, NbdError, NbdExport, NbdListen, NbdServer, TlsMode};

const MIB: u64 = 1 << 20;

fn cfg() -> NbdConfig {
    NbdConfig::new(Vec::new())
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn io_round_trip_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", 4 * MIB, 0x11);
    let srv = TestServer::start(cfg(), vec![export("d", &p)]);
    let mut c = Client::tcp(srv.tcp());
    let (size, flags) = c.connect_export("d");
    assert_eq!(size, 4 * MIB);
    assert_eq!(
        flags,
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
    );
    let data = random_bytes(1, 256 << 10);
    assert_eq!(c.write(MIB, &data), 0);
    assert_eq!(c.call(CMD_WRITE, CMD_FLAG_FUA, 0, 4096, &[0x22; 4096]).0, 0);
    assert_eq!(c.read(MIB, 256 << 10), (0, data.clone()));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    assert_eq!(c.call(CMD_TRIM, 0, 2 * MIB, 8192, &[]).0, 0);
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 3 * MIB, 4096, &[])
            .0,
        0
    );
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 3 * MIB + 4096, 4096, &[])
            .0,
        0
    );
    assert_eq!(c.call(CMD_CACHE, 0, 0, 4096, &[]).0, 0);
    assert_eq!(c.read(2 * MIB, 8192), (0, vec![0; 8192]));
    // The last sector is reachable, one past it is not.
    assert_eq!(c.write(4 * MIB - 512, &[0x33; 512]), 0);
    c.disconnect();
    let f = file_bytes(&p);
    assert_eq!(&f[MIB as usize..MIB as usize + data.len()], &data[..]);
    assert!(f[..4096].iter().all(|&b| b == 0x22));
    assert!(f[4096..8192].iter().all(|&b| b == 0x11));
    assert!(
        f[3 * MIB as usize..3 * MIB as usize + 8192]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(f[4 * MIB as usize - 512..].iter().all(|&b| b == 0x33));
    let s = srv.stop();
    assert_eq!(s.connections_total, 1);
    assert_eq!(s.connections_open, 0);
    assert_eq!(s.requests, 11);
    assert_eq!(s.bytes_written, (256 << 10) + 4096 + 512);
    assert_eq!(s.bytes_read, (256 << 10) + 8192);
    assert_eq!(s.errors, 0);
}

/// Every refusal: the reply carries the right error, the connection goes on,
/// and the disk is unchanged.
#[test]
fn refusals_keep_the_session_and_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0x5a);
    let mut c0 = cfg();
    c0.max_request_bytes = 64 << 10;
    c0.max_inflight_bytes = 64 << 10;
    let srv = TestServer::start(c0, vec![export("d", &p)]);
    let before = file_bytes(&p);
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("");
    let cases: Vec<(&str, u16, u16, u64, u32, usize, u32)> = vec![
        // (what, type, flags, offset, len, payload bytes sent, expected error)
        ("write beyond end", CMD_WRITE, 0, MIB, 512, 512, NBD_ENOSPC),
        (
            "write straddling end",
            CMD_WRITE,
            0,
            MIB - 512,
            1024,
            1024,
            NBD_ENOSPC,
        ),
        (
            "zeroes beyond end",
            CMD_WRITE_ZEROES,
            0,
            MIB,
            512,
            0,
            NBD_ENOSPC,
        ),
        ("read beyond end", CMD_READ, 0, MIB, 512, 0, NBD_EINVAL),
        (
            "trim beyond end",
            CMD_TRIM,
            0,
            MIB - 512,
            4096,
            0,
            NBD_EINVAL,
        ),
        (
            "unaligned write offset",
            CMD_WRITE,
            0,
            100,
            512,
            512,
            NBD_EINVAL,
        ),
        (
            "unaligned write length",
            CMD_WRITE,
            0,
            0,
            1000,
            1000,
            NBD_EINVAL,
        ),
        ("unaligned read", CMD_READ, 0, 0, 100, 0, NBD_EINVAL),
        ("zero-length write", CMD_WRITE, 0, 0, 0, 0, NBD_EINVAL),
        ("zero-length read", CMD_READ, 0, 0, 0, 0, NBD_EINVAL),
        ("zero-length trim", CMD_TRIM, 0, 0, 0, 0, NBD_EINVAL),
        (
            "zero-length zeroes",
            CMD_WRITE_ZEROES,
            0,
            0,
            0,
            0,
            NBD_EINVAL,
        ),
        (
            "write over the limit",
            CMD_WRITE,
            0,
            0,
            128 << 10,
            128 << 10,
            NBD_EINVAL,
        ),
        (
            "read over the limit",
            CMD_READ,
            0,
            0,
            128 << 10,
            0,
            NBD_EINVAL,
        ),
        ("flush with offset", CMD_FLUSH, 0, 512, 0, 0, NBD_EINVAL),
        ("flush with length", CMD_FLUSH, 0, 0, 512, 0, NBD_EINVAL),
        ("unknown command", 0x77, 0, 0, 512, 0, NBD_EINVAL),
        ("resize", CMD_RESIZE, 0, 0, 0, 0, NBD_EINVAL),
        ("block status", CMD_BLOCK_STATUS, 0, 0, 4096, 0, NBD_EINVAL),
        (
            "fast zero",
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO,
            0,
            4096,
            0,
            NBD_EINVAL,
        ),
        (
            "no-hole on write",
            CMD_WRITE,
            CMD_FLAG_NO_HOLE,
            0,
            512,
            512,
            NBD_EINVAL,
        ),
        ("unknown flag", CMD_WRITE, 1 << 12, 0, 512, 512, NBD_EINVAL),
    ];
    for (i, (what, typ, flags, offset, len, payload, error)) in cases.iter().enumerate() {
        let cookie = 1000 + i as u64;
        c.send_request(*typ, *flags, cookie, *offset, *len);
        c.s.write_all(&vec![0xee; *payload]).unwrap();
        let (e, got_cookie, _) = c.reply(0).unwrap();
        assert_eq!((e, got_cookie), (*error, cookie), "{what}");
    }
    // The stream is still in sync: a normal write and read work.
    assert_eq!(c.write(0, &[7; 512]), 0);
    assert_eq!(c.read(0, 512), (0, vec![7; 512]));
    c.disconnect();
    let after = file_bytes(&p);
    assert_eq!(
        &after[512..],
        &before[512..],
        "refused requests changed the disk"
    );
    let s = srv.stop();
    assert_eq!(s.errors, cases.len() as u64);
    assert_eq!(s.protocol_errors, 0);
}

#[test]
fn protocol_violations_drop_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0x5a);
    let before = file_bytes(&p);
    let srv = TestServer::start(cfg(), vec![export("d", &p)]);

    // A bystander connection opened first keeps working throughout.
    let mut bystander = Client::tcp(srv.tcp());
    bystander.connect_export("d");

    // Bad request magic.
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.s.write_all(&[0x12, 0x56, 0x09, 0x53]).unwrap();
    c.s.write_all(&[0; 24]).unwrap();
    assert!(c.at_eof(), "bad magic drops the connection");

    // Disconnect in the middle of a write payload: nothing is applied.
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.send_request(CMD_WRITE, 0, 1, 0, 8192);
    c.s.write_all(&[0xab; 4096]).unwrap();
    drop(c);
    // ... also for a payload large enough to be read directly.
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.send_request(CMD_WRITE, 0, 2, 0, 512 << 10);
    c.s.write_all(&vec![0xab; 300 << 10]).unwrap();
    drop(c);
    // ... and in the middle of a header.
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);

    // A write payload too large even to discard.
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.send_request(CMD_WRITE, 0, 3, 0, WRITE_DISCARD_MAX + 512);
    let (e, cookie, _) = c.reply(0).unwrap_or((0, 0, vec![]));
    assert!(e == 0 && cookie == 0, "no reply for an undiscardable write");
    assert!(c.at_eof(), "undiscardable write drops the connection");

    srv.wait_stats("five protocol errors", |s| s.protocol_errors == 5);
    assert_eq!(file_bytes(&p), before, "a partial write reached the disk");

    // The bystander and new connections are still served.
    assert_eq!(bystander.write(4096, &[1; 4096]), 0);
    assert_eq!(bystander.read(4096, 4096), (0, vec![1; 4096]));
    bystander.disconnect();
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    assert_eq!(c.read(0, 512), (0, vec![0x5a; 512]));
    c.disconnect();
    let s = srv.stop();
    assert_eq!(s.protocol_errors, 5);
    assert_eq!(s.connections_total, 7);
}

#[test]
fn handshake_options_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk_file(dir.path(), "a.img", MIB, 1);
    let b = disk_file(dir.path(), "b.img", 2 * MIB, 2);
    let srv = TestServer::start(cfg(), vec![export("a", &a), export("b", &b)]);
    let mut c = Client::tcp(srv.tcp());
    c.greet();
    c.send_option(OPT_LIST, &[]);
    let r = c.option_replies();
    assert_eq!(r.len(), 3);
    assert_eq!(&r[0].1[4..5], b"a");
    assert_eq!(&r[1].1[4..], b"btest disk b");
    for o in [
        OPT_STRUCTURED_REPLY,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        4242,
    ] {
        c.send_option(o, &[]);
        assert_eq!(c.option_replies()[0].0, REP_ERR_UNSUP, "option {o}");
    }
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_replies()[0].0, REP_ERR_UNSUP, "no TLS configured");
    // Oversized option: TOO_BIG, skipped, then haggling goes on.
    c.send_option(OPT_INFO, &vec![0; 100 << 10]);
    assert_eq!(c.option_replies()[0].0, REP_ERR_TOO_BIG);
    assert_eq!(c.go("nope").0, REP_ERR_UNKNOWN);
    let (typ, size, _) = c.go("b");
    assert_eq!((typ, size), (REP_ACK, 2 * MIB));
    assert_eq!(c.read(0, 512), (0, vec![2; 512]));
    c.disconnect();

    // Default export and EXPORT_NAME.
    let mut c = Client::tcp(srv.tcp());
    c.greet();
    c.send_option(OPT_EXPORT_NAME, b"");
    let mut r = [0u8; 10];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), MIB);
    assert_eq!(c.read(0, 512), (0, vec![1; 512]));
    c.disconnect();

    // A client without fixed newstyle is refused; ABORT is acknowledged.
    let mut c = Client::tcp(srv.tcp());
    let mut g = [0u8; 18];
    c.s.read_exact(&mut g).unwrap();
    c.s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(c.at_eof());
    let mut c = Client::tcp(srv.tcp());
    c.greet();
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_replies()[0].0, REP_ACK);
    assert!(c.at_eof());
    let s = srv.stop();
    assert_eq!(s.handshake_failures, 1);
}

#[test]
fn unix_socket_stale_file_live_socket_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 3);
    let sock = dir.path().join("nbd.sock");
    // A stale socket file (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut c0 = cfg();
    c0.listen = vec![
        NbdListen::Unix(sock.clone()),
        NbdListen::Tcp("127.0.0.1:0".parse().unwrap()),
    ];
    let srv = TestServer::start(c0.clone(), vec![export("d", &p)]);
    assert_eq!(srv.addrs[0], NbdListen::Unix(sock.clone()));
    assert_eq!(
        srv.addrs[0].uri("d"),
        format!("nbd+unix:///d?socket={}", sock.display())
    );
    // A second server on the live socket is refused.
    let e = srv
        .rt
        .block_on(NbdServer::bind(c0.clone(), vec![export("d", &p)]))
        .unwrap_err();
    assert!(matches!(e, NbdError::SocketInUse { .. }), "{e}");
    let mut c = Client::unix(&sock);
    c.connect_export("d");
    assert_eq!(c.write(0, &[9; 4096]), 0);
    assert_eq!(c.read(0, 4096), (0, vec![9; 4096]));
    c.disconnect();
    srv.stop();
    assert!(!sock.exists(), "socket file removed at shutdown");

    // A regular file at the path is never replaced.
    std::fs::write(&sock, b"precious").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(NbdServer::bind(c0, vec![export("d", &p)]))
        .unwrap_err();
    assert!(matches!(e, NbdError::NotASocket { .. }), "{e}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}

#[test]
fn bind_rejects_bad_configurations() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tcp = vec![NbdListen::Tcp("127.0.0.1:0".parse().unwrap())];
    let bad: Vec<(NbdConfig, Vec<NbdExport>)> = vec![
        (NbdConfig::new(vec![]), vec![export("d", &p)]),
        (NbdConfig::new(tcp.clone()), vec![]),
        (
            NbdConfig::new(tcp.clone()),
            vec![export("d", &p), export("d", &p)],
        ),
        (
            NbdConfig {
                max_request_bytes: 1000,
                ..NbdConfig::new(tcp.clone())
            },
            vec![export("d", &p)],
        ),
        (
            NbdConfig {
                max_request_bytes: MAX_REQUEST_LIMIT + 512,
                ..NbdConfig::new(tcp.clone())
            },
            vec![export("d", &p)],
        ),
        (
            NbdConfig {
                max_inflight_bytes: 1 << 20,
                ..NbdConfig::new(tcp.clone())
            },
            vec![export("d", &p)],
        ),
        (
            NbdConfig {
                tls: TlsMode::Required,
                ..NbdConfig::new(tcp.clone())
            },
            vec![export("d", &p)],
        ),
        (
            NbdConfig {
                max_connections: 0,
                ..NbdConfig::new(tcp.clone())
            },
            vec![export("d", &p)],
        ),
        (
            NbdConfig::new(tcp.clone()),
            vec![export(&"n".repeat(4097), &p)],
        ),
    ];
    for (c, e) in bad {
        let what = format!("{c:?}");
        let err = rt.block_on(NbdServer::bind(c, e)).unwrap_err();
        assert!(matches!(err, NbdError::Config(_)), "{what}: {err}");
    }
}

#[test]
fn connection_cap_refuses_extra_clients() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0);
    let mut c0 = cfg();
    c0.max_connections = 1;
    let srv = TestServer::start(c0, vec![export("d", &p)]);
    let mut a = Client::tcp(srv.tcp());
    a.connect_export("d");
    let mut b = Client::tcp(srv.tcp());
    assert!(b.at_eof(), "second connection closed at once");
    srv.wait_stats("one refused", |s| s.connections_refused == 1);
    a.disconnect();
    srv.wait_stats("first closed", |s| s.connections_open == 0);
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.disconnect();
    let s = srv.stop();
    assert_eq!((s.connections_total, s.connections_refused), (3, 1));
}

/// With a budget of 2 requests, a client pipelining 200 requests without
/// reading replies is throttled, not refused, and every reply arrives.
#[test]
fn pipelined_requests_under_a_small_budget() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", 4 * MIB, 0);
    let mut c0 = cfg();
    c0.max_inflight_requests = 2;
    c0.max_inflight_bytes = 32 << 20;
    let srv = TestServer::start(c0, vec![export("d", &p)]);
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    let n = 200u64;
    let mut out = Vec::new();
    for i in 0..n {
        let mut v = Vec::new();
        RequestHeader {
            flags: 0,
            typ: CMD_WRITE,
            cookie: i,
            offset: i * 4096,
            len: 4096,
        }
        .encode(&mut v);
        out.extend(v);
        out.extend(std::iter::repeat_n(i as u8, 4096));
    }
    // Written from another thread: the server stops reading while the budget
    // is full, so one thread writing everything first could block on a full
    // socket buffer while nobody reads the replies.
    let mut w = c.tcp_clone();
    let writer = std::thread::spawn(move || w.write_all(&out).unwrap());
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (e, cookie, _) = c.reply(0).unwrap();
        assert_eq!(e, 0);
        assert!(!seen[cookie as usize], "cookie {cookie} replied twice");
        seen[cookie as usize] = true;
    }
    writer.join().unwrap();
    // Pipelined reads come back with their own data, whatever the order.
    for i in 0..n {
        c.send_request(CMD_READ, 0, i, i * 4096, 4096);
    }
    for _ in 0..n {
        let (e, cookie, d) = c.reply(4096).unwrap();
        assert_eq!(e, 0);
        assert!(d.iter().all(|&b| b == cookie as u8), "cookie {cookie}");
    }
    c.disconnect();
    srv.stop();
}

#[test]
fn disk_errors_map_to_nbd_errors_and_read_only_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0);
    let mk = |errno: Option<i32>, ro: bool| {
        let mut d = FaultyDisk::new(&p);
        d.errno = errno;
        d.read_only = ro;
        Arc::new(d)
    };
    let exports = vec![
        NbdExport {
            name: "eio".into(),
            description: String::new(),
            disk: mk(Some(libc::EIO), false),
        },
        NbdExport {
            name: "enospc".into(),
            description: String::new(),
            disk: mk(Some(libc::ENOSPC), false),
        },
        NbdExport {
            name: "ebadf".into(),
            description: String::new(),
            disk: mk(Some(libc::EBADF), false),
        },
        NbdExport {
            name: "ro".into(),
            description: String::new(),
            disk: mk(None, true),
        },
    ];
    let srv = TestServer::start(cfg(), exports);
    for (name, expect) in [("eio", NBD_EIO), ("enospc", NBD_ENOSPC), ("ebadf", NBD_EIO)] {
        let mut c = Client::tcp(srv.tcp());
        c.connect_export(name);
        assert_eq!(c.write(0, &[1; 512]), expect, "{name} write");
        assert_eq!(c.read(0, 512).0, expect, "{name} read");
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, expect, "{name} flush");
        assert_eq!(c.call(CMD_TRIM, 0, 0, 512, &[]).0, expect, "{name} trim");
        // The session survives disk errors.
        assert_eq!(c.call(CMD_CACHE, 0, 0, 512, &[]).0, 0);
        c.disconnect();
    }
    let mut c = Client::tcp(srv.tcp());
    let (_, flags) = c.connect_export("ro");
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(c.write(0, &[1; 512]), NBD_EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 512, &[]).0, NBD_EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 512, &[]).0, NBD_EPERM);
    assert_eq!(c.read(0, 512), (0, vec![0; 512]));
    c.disconnect();
    srv.stop();
}

/// Shutdown finishes a request that is in flight, replies to it, then closes.
#[test]
fn shutdown_finishes_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0);
    let disk = Arc::new(FaultyDisk::new(&p));
    disk.stall.store(true, Ordering::SeqCst);
    let srv = TestServer::start(
        cfg(),
        vec![NbdExport {
            name: "d".into(),
            description: String::new(),
            disk: disk.clone(),
        }],
    );
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.send_request(CMD_WRITE, 0, 77, 0, 4096);
    c.s.write_all(&[0x42; 4096]).unwrap();
    srv.wait_stats("request received", |s| s.requests == 1);
    let releaser = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            disk.stall.store(false, Ordering::SeqCst);
        })
    };
    let s = srv.stop();
    releaser.join().unwrap();
    assert_eq!(c.reply(0).unwrap(), (0, 77, vec![]));
    assert!(c.at_eof());
    assert_eq!(s.bytes_written, 4096);
    assert!(file_bytes(&p)[..4096].iter().all(|&b| b == 0x42));
}

/// A FLUSH that takes long does not hold up the writes sent after it (they
/// run on the connection's ordered lane; the flush on its durable lane), and
/// its reply still comes.
#[test]
fn slow_flush_does_not_block_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", MIB, 0);
    let disk = Arc::new(FaultyDisk::new(&p));
    disk.stall_flush.store(true, Ordering::SeqCst);
    let srv = TestServer::start(
        cfg(),
        vec![NbdExport {
            name: "d".into(),
            description: String::new(),
            disk: disk.clone(),
        }],
    );
    let mut c = Client::tcp(srv.tcp());
    c.connect_export("d");
    c.send_request(CMD_FLUSH, 0, 1, 0, 0);
    for i in 0..8u64 {
        c.send_request(CMD_WRITE, 0, 100 + i, i * 4096, 4096);
        c.s.write_all(&[i as u8 + 1; 4096]).unwrap();
    }
    // All eight writes are answered while the flush is still stalled.
    for _ in 0..8 {
        let (e, cookie, _) = c.reply(0).unwrap();
        assert_eq!(e, 0);
        assert!(
            (100..108).contains(&cookie),
            "cookie {cookie} before the writes"
        );
    }
    disk.stall_flush.store(false, Ordering::SeqCst);
    assert_eq!(c.reply(0).unwrap(), (0, 1, vec![]));
    // FUA writes take the same lane as flushes and succeed.
    assert_eq!(c.call(CMD_WRITE, CMD_FLAG_FUA, 0, 512, &[9; 512]).0, 0);
    c.disconnect();
    srv.stop();
}
