//! `tidemark bench` through the built binary: the README's first command, cut
//! short (a 64 MiB image, 2 s of workload, no bound), must verify the replica,
//! report where the source disk was, and leave nothing in memory behind.

use std::path::Path;
use std::process::Command;

use tidemark::bench::run::{free_bytes, is_tmpfs};

fn tidemark() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tidemark"))
}

fn short_bench(scratch: &Path) -> Command {
    let mut c = tidemark();
    c.args([
        "bench",
        "--seconds",
        "2",
        "--image-size",
        "64M",
        "--skip-bound",
        "--json",
        "--dir",
    ])
    .arg(scratch);
    c
}

/// Run a bench that must succeed; its JSON report.
fn run_ok(c: &mut Command) -> serde_json::Value {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verified"], true, "{r}");
    r
}

#[test]
fn e2e_bench_verifies_the_replica_with_the_source_in_memory_or_where_asked() {
    let d = tempfile::tempdir().unwrap();

    // Default placement: /dev/shm when it is tmpfs (a 64 MiB image fits).
    let scratch = d.path().join("scratch");
    let r = run_ok(&mut short_bench(&scratch));
    assert!(r["applied_mb_s"].as_f64().unwrap() > 0.0, "{r}");
    // The workload's writer thread is part of the agent process.
    let workload = r["workload_cpu_s_per_gb"].as_f64().unwrap();
    assert!(workload > 0.0, "{r}");
    assert!(
        workload <= r["cpu_s_per_gb"]["agent"].as_f64().unwrap(),
        "{r}"
    );
    let source = Path::new(r["source_path"].as_str().unwrap()).to_path_buf();
    let in_memory = r["source_in_memory"].as_bool().unwrap();
    let shm = Path::new("/dev/shm");
    // With plenty of room (1 GiB) in a tmpfs /dev/shm the 64 MiB image must go
    // there; a small /dev/shm (a container's 64 MiB) may send it to the scratch
    // directory. Either way the report and the path agree.
    let roomy = is_tmpfs(shm) && free_bytes(shm) >= 1 << 30;
    if roomy {
        assert!(in_memory, "{r}");
    }
    if in_memory {
        assert!(source.starts_with(shm), "{r}");
    } else {
        assert!(source.starts_with(&scratch), "{r}");
    }
    // Nothing left behind: neither the scratch directory nor the image.
    assert!(!source.exists(), "{} left behind", source.display());
    assert!(!source.parent().unwrap().exists());
    assert!(!scratch.exists());

    // An explicit directory, kept afterwards with --keep.
    let src = d.path().join("src");
    let scratch = d.path().join("scratch2");
    let r = run_ok(
        short_bench(&scratch)
            .arg("--source-dir")
            .arg(&src)
            .arg("--keep"),
    );
    assert_eq!(
        r["source_path"].as_str().unwrap(),
        src.join("source.img").to_str().unwrap()
    );
    // (An explicit directory on tmpfs is removed even with --keep.)
    assert_eq!(src.join("source.img").exists(), !is_tmpfs(d.path()));

    // A source directory that exists is refused, naming it, before any role starts.
    let out = short_bench(&d.path().join("scratch3"))
        .arg("--source-dir")
        .arg(&src)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--source-dir") && err.contains("exists"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
