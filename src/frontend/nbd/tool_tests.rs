//! Real NBD clients as child processes against the in-process server:
//! nbdinfo, qemu-io, qemu-img, nbdcopy and fio, over TCP and a Unix socket.
//! Each test fails (naming the tool) when a tool it needs is missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::testutil::*;
use super::{NbdConfig, NbdListen};

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

fn server(disk: &Path) -> TestServer {
    TestServer::start(NbdConfig::new(Vec::new()), vec![export("disk", disk)])
}

#[test]
fn nbdinfo_json_shows_size_and_flags() {
    let nbdinfo = tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", 64 * MIB, 0);
    let srv = server(&p);
    let o = run_ok(
        Command::new(&nbdinfo).arg("--json").arg(srv.uri("disk")),
        LIMIT,
    );
    let v: serde_json::Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo output is not JSON ({e}): {}", o.stdout));
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["TLS"], false);
    assert_eq!(v["structured"], false);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["description"], "test disk disk", "{e}");
    for (k, want) in [
        ("is_read_only", false),
        ("can_multi_conn", true),
        ("can_fua", true),
        ("can_flush", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", false),
        ("can_cache", false),
        ("can_df", false),
    ] {
        assert_eq!(e[k], want, "{k} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    // --list goes through NBD_OPT_LIST.
    let o = run_ok(
        Command::new(&nbdinfo)
            .arg("--list")
            .arg("--json")
            .arg(srv.uri("")),
        LIMIT,
    );
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "disk", "{}", o.stdout);
    let s = srv.stop();
    assert_eq!(s.handshake_failures, 0);
}

#[test]
fn qemu_io_writes_and_reads_back_over_tcp_and_unix() {
    let qemu_io = tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", 64 * MIB, 0);
    let sock = dir.path().join("nbd.sock");
    let mut cfg = NbdConfig::new(Vec::new());
    cfg.listen = vec![
        NbdListen::Tcp("127.0.0.1:0".parse().unwrap()),
        NbdListen::Unix(sock.clone()),
    ];
    let srv = TestServer::start(cfg, vec![export("disk", &p)]);
    run_ok(
        Command::new(&qemu_io).args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 4M",
            "-c",
            "write -f -P 0xcd 8M 64k",
            "-c",
            "write -z 12M 1M",
            "-c",
            "discard 20M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 1M 4M",
            "-c",
            "read -P 0xcd 8M 64k",
            "-c",
            "read -P 0 12M 1M",
            &srv.uri("disk"),
        ]),
        LIMIT,
    );
    // Over the Unix socket, the default export.
    let unix_uri = format!("nbd+unix:///?socket={}", sock.display());
    run_ok(
        Command::new(&qemu_io).args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 1M 4M",
            "-c",
            "write -P 0x11 30M 3M",
            "-c",
            "read -P 0x11 30M 3M",
            &unix_uri,
        ]),
        LIMIT,
    );
    // A read past the end fails cleanly (and the server goes on serving).
    let o = run(
        Command::new(&qemu_io).args(["-f", "raw", "-c", "read 64M 512", &srv.uri("disk")]),
        LIMIT,
    );
    assert!(
        !o.status.success() && (o.stdout + &o.stderr).contains("read failed"),
        "a read past the end did not fail"
    );
    let s = srv.stop();
    let f = std::fs::read(&p).unwrap();
    assert!(f[MIB as usize..5 * MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        f[30 * MIB as usize..33 * MIB as usize]
            .iter()
            .all(|&b| b == 0x11)
    );
    assert!(s.bytes_written >= 4 * MIB + 3 * MIB);
}

#[test]
fn qemu_img_convert_then_compare() {
    let qemu_img = tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, random_bytes(0x5eed, 64 * MIB as usize)).unwrap();
    let p = disk_file(dir.path(), "d.img", 64 * MIB, 0);
    let srv = server(&p);
    let uri = srv.uri("disk");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        LIMIT,
    );
    let o = run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(0), "qemu-img compare: {o:?}");
    srv.stop();
    assert!(std::fs::read(&p).unwrap() == std::fs::read(&src).unwrap());
}

#[test]
fn nbdcopy_into_the_export_and_back() {
    let nbdcopy = tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = random_bytes(42, 48 * MIB as usize);
    std::fs::write(&src, &data).unwrap();
    let p = disk_file(dir.path(), "d.img", 48 * MIB, 0xff);
    let srv = server(&p);
    // nbdcopy uses several connections when the server allows multi-conn.
    run_ok(Command::new(&nbdcopy).arg(&src).arg(srv.uri("disk")), LIMIT);
    let back = dir.path().join("back.img");
    run_ok(
        Command::new(&nbdcopy).arg(srv.uri("disk")).arg(&back),
        LIMIT,
    );
    let s = srv.stop();
    assert!(
        std::fs::read(&p).unwrap() == data,
        "export differs from the source"
    );
    assert!(std::fs::read(&back).unwrap() == data, "copy back differs");
    assert!(s.connections_total >= 2, "{s:?}");
}

#[test]
fn fio_random_writes_with_verify() {
    let fio = tool("fio");
    let dir = tempfile::tempdir().unwrap();
    let p = disk_file(dir.path(), "d.img", 64 * MIB, 0);
    let srv = server(&p);
    let o = run_ok(
        // In the temp dir: fio leaves verify state files in its working dir.
        Command::new(&fio).current_dir(dir.path()).args([
            "--name=nbd-verify",
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri("disk")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=64M",
            "--runtime=2",
            "--time_based",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        LIMIT,
    );
    let v: serde_json::Value = serde_json::from_str(&o.stdout[o.stdout.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio output is not JSON ({e}): {}", o.stdout));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(written > 0, "fio wrote nothing: {job}");
    assert!(verified > 0, "fio verified nothing: {job}");
    let s = srv.stop();
    assert_eq!(s.errors, 0);
    assert!(s.bytes_written >= written);
}
