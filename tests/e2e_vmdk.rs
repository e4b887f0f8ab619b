//! VMDK replicas built by replication, judged by qemu-img and libvmdk: for
//! each kind (monolithicSparse, monolithicFlat) the replica passes `qemu-img
//! check` and compares equal to the source, `vmdkinfo` reads it, and recover
//! exports (monolithicSparse and streamOptimized) pass the same referees.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Cluster;
use common::tools::{require_tool, run_ok};
use tidemark::config::ReplicaFormat;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

fn qemu_check(path: &std::path::Path) {
    let qi = require_tool("qemu-img", "qemu-utils");
    let out = run_ok(
        Command::new(&qi).args(["check", "-f", "vmdk"]).arg(path),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No errors"), "{}: {text}", path.display());
}

fn qemu_compare(raw: &std::path::Path, vmdk: &std::path::Path) {
    let qi = require_tool("qemu-img", "qemu-utils");
    run_ok(
        Command::new(&qi)
            .args(["compare", "-f", "raw", "-F", "vmdk"])
            .arg(raw)
            .arg(vmdk),
        Duration::from_secs(60),
    );
}

fn vmdkinfo(path: &std::path::Path) {
    let vi = require_tool("vmdkinfo", "libvmdk-utils");
    run_ok(Command::new(&vi).arg(path), Duration::from_secs(60));
}

fn replicate(format: ReplicaFormat) -> Cluster {
    let mut c = Cluster::new(96 * MIB);
    c.prefill(3, 8 * MIB);
    c.start_relay();
    let replica = c.dir.path().join("replica.vmdk");
    c.replica = replica.clone();
    c.configure_target(|cfg| {
        cfg.groups[0].disks[0].path = replica;
        cfg.groups[0].disks[0].format = format;
    });
    c.start_target();
    c.start_agent(&[
        "--workload-bytes",
        "40M",
        "--workload-seed",
        "5",
        "--workload-write-size",
        "16K",
    ]);
    let last = c.wait_workload_done(LONG);
    c.wait_applied(last, LONG);
    c.wait_consistent(LONG);
    c
}

fn recover(c: &Cluster, format: &str, out: &std::path::Path) {
    let o = Command::new(common::exe())
        .args([
            "target", "recover", "--point", "latest", "--disk", "0", "--format", format, "--out",
        ])
        .arg(out)
        .arg("--config")
        .arg(c.path("target.toml"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "recover: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn e2e_monolithic_sparse_replica_passes_the_referees() {
    let mut c = replicate(ReplicaFormat::Vmdk);
    let sparse = c.dir.path().join("export.vmdk");
    let stream = c.dir.path().join("export-stream.vmdk");
    recover(&c, "vmdk", &sparse);
    recover(&c, "vmdk-stream", &stream);
    c.stop_all();
    qemu_check(&c.replica);
    qemu_compare(&c.source, &c.replica);
    vmdkinfo(&c.replica);
    for e in [&sparse, &stream] {
        qemu_check(e);
        qemu_compare(&c.source, e);
        vmdkinfo(e);
    }
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&stream),
        Duration::from_secs(30),
    );
    assert!(String::from_utf8_lossy(&info.stdout).contains("streamOptimized"));
}

#[test]
fn e2e_monolithic_flat_replica_passes_the_referees() {
    let mut c = replicate(ReplicaFormat::VmdkFlat);
    c.stop_all();
    qemu_check(&c.replica);
    qemu_compare(&c.source, &c.replica);
    vmdkinfo(&c.replica);
}
