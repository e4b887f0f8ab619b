//! A real file system as the oracle: ext4 on the agent's FUSE frontend (through
//! a loop device), relay and target as separate processes, retention on. Three
//! rounds each write a seeded tree (new small and large files, and rewrites,
//! in-place overwrites, appends, renames and deletions of earlier rounds'
//! files), fsync every file and directory, record a manifest (path → BLAKE3 of
//! every file then in the tree), and take `tidemark agent tag round-N --freeze`;
//! after each tag more files are written without fsync. Then, for every tag,
//! the image `target recover` gives at it must pass `e2fsck` after journal
//! replay, hold exactly that round's manifest (every file, right BLAKE3, no
//! file deleted before the tag) and none of the files written after the tag.
//! The live source is clean, the tags are listed as `app` points at their
//! seqs, and the replica ends equal to the source.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use common::tools::{LoopDev, Mounted, fsck_clean, require_root, require_tool, run, run_ok};
use common::{Cluster, wait_until};
use tidemark::config::{AgentConfig, FuseFrontend};
use tidemark::util::datagen;
use tidemark::util::prng::Prng;
use tidemark::util::statusfile::STATUS_FILE;

const MIB: u64 = 1 << 20;
/// The bound of every wait.
const LIMIT: Duration = Duration::from_secs(120);
const ROUNDS: u64 = 3;

/// Path (relative to the tree's root, `/`-separated) → BLAKE3 of the content.
type Manifest = BTreeMap<String, blake3::Hash>;

/// `tidemark agent tag --config <agent.toml> <args>`, bounded; the tag's seq.
/// Thaws a mount point on drop (a failing test must not leave it frozen).
struct ThawGuard(PathBuf);

impl Drop for ThawGuard {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).output();
    }
}

fn fsync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync of directory {}: {e}", dir.display()));
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every regular file under `root` (recursively) with the BLAKE3 of its content.
fn hash_tree(root: &Path) -> Manifest {
    fn walk(dir: &Path, prefix: &str, out: &mut Manifest) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading directory {}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().into_string().unwrap();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let ty = e.file_type().unwrap();
            if ty.is_dir() {
                walk(&e.path(), &rel, out);
            } else {
                assert!(ty.is_file(), "{} is not a regular file", e.path().display());
                let data = fs::read(e.path())
                    .unwrap_or_else(|err| panic!("reading {}: {err}", e.path().display()));
                out.insert(rel, blake3::hash(&data));
            }
        }
    }
    let mut out = Manifest::new();
    walk(root, "", &mut out);
    out
}

/// The differences between what a tree should hold and what it holds, one
/// line each (at most 20 of each kind); empty when equal.
fn diff(want: &Manifest, got: &Manifest) -> Vec<String> {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, h)| got.get(*k).is_some_and(|g| g != *h))
        .map(|(k, _)| k)
        .collect();
    let mut out = Vec::new();
    for (what, list) in [
        ("missing", &missing),
        ("wrong BLAKE3", &wrong),
        (
            "not in the manifest (deleted, renamed or never written before the tag)",
            &extra,
        ),
    ] {
        if !list.is_empty() {
            out.push(format!(
                "{} file(s) {what}: {:?}{}",
                list.len(),
                &list[..list.len().min(20)],
                if list.len() > 20 { " …" } else { "" }
            ));
        }
    }
    out
}

/// The workload: a tree under `root` and the content every file of it should
/// have (the model the manifests are made from).
struct Tree {
    root: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
    dirty_dirs: BTreeSet<PathBuf>,
}

impl Tree {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Mark `rel`'s directory and its ancestors up to the root for an fsync.
    fn touch_dir(&mut self, rel: &str) {
        let mut p = self.path(rel);
        while p.pop() && p.starts_with(&self.root) {
            self.dirty_dirs.insert(p.clone());
        }
    }

    /// Create or truncate `rel` with `data`, fsync'd.
    fn write_new(&mut self, rel: &str, data: Vec<u8>) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut f = File::create(&p).unwrap();
        for chunk in data.chunks(MIB as usize) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
        self.touch_dir(rel);
        self.files.insert(rel.to_string(), data);
    }

    /// Overwrite `data.len()` bytes at `off` (≤ the file's length) in place,
    /// fsync'd; the file grows if the write goes past its end.
    fn overwrite(&mut self, rel: &str, off: usize, data: &[u8]) {
        let f = File::options().write(true).open(self.path(rel)).unwrap();
        f.write_all_at(data, off as u64).unwrap();
        f.sync_all().unwrap();
        let content = self.files.get_mut(rel).unwrap();
        assert!(off <= content.len());
        let end = off + data.len();
        if end > content.len() {
            content.resize(end, 0);
        }
        content[off..end].copy_from_slice(data);
    }

    fn append(&mut self, rel: &str, data: &[u8]) {
        let mut f = File::options().append(true).open(self.path(rel)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        self.files.get_mut(rel).unwrap().extend_from_slice(data);
    }

    fn remove(&mut self, rel: &str) {
        fs::remove_file(self.path(rel)).unwrap();
        self.touch_dir(rel);
        self.files.remove(rel);
    }

    fn rename(&mut self, from: &str, to: &str) {
        assert!(!self.files.contains_key(to));
        fs::create_dir_all(self.path(to).parent().unwrap()).unwrap();
        fs::rename(self.path(from), self.path(to)).unwrap();
        self.touch_dir(from);
        self.touch_dir(to);
        let data = self.files.remove(from).unwrap();
        self.files.insert(to.to_string(), data);
    }

    /// Remove directory `rel` with everything in it.
    fn remove_dir(&mut self, rel: &str) {
        fs::remove_dir_all(self.path(rel)).unwrap();
        self.touch_dir(rel);
        let prefix = format!("{rel}/");
        self.files.retain(|k, _| !k.starts_with(&prefix));
    }

    /// fsync every directory changed since the last call, deepest first.
    fn sync_dirs(&mut self) {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirty_dirs).into_iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            // A directory removed after it was marked has nothing to sync.
            if d.exists() {
                fsync_dir(&d);
            }
        }
    }

    /// The manifest of the tree as the model says it is.
    fn manifest(&self) -> Manifest {
        self.files
            .iter()
            .map(|(k, v)| (k.clone(), blake3::hash(v)))
            .collect()
    }

    /// One round: changes to earlier rounds' files, new small files (some in
    /// a new subdirectory per directory), two large files; all fsync'd.
    fn round(&mut self, r: u64) {
        let mut rng = Prng::new(0x0AC1_E000 + r);
        let data = |rng: &mut Prng, len: usize| datagen::generate(len, 50, rng);
        if r > 1 {
            // A whole subdirectory of the previous round goes.
            self.remove_dir(&format!("d{:02}/s{}", (r * 7) % 24, r - 1));
            // The previous round's first large file is rewritten in place
            // (same size): the older images need its before-images.
            let big = format!("big-r{}-0", r - 1);
            let len = self.files[&big].len();
            let new = data(&mut rng, len);
            self.overwrite(&big, 0, &new);
            let existing: Vec<String> = self.files.keys().cloned().collect();
            for (i, rel) in existing.iter().enumerate() {
                let len = self.files[rel].len();
                match rng.below(100) {
                    0..10 => self.remove(rel),
                    10..18 => {
                        let n = rng.below(24 * 1024) as usize;
                        self.write_new(rel, data(&mut rng, n));
                    }
                    18..24 => {
                        let off = rng.below(len as u64 + 1) as usize;
                        let n = 1 + rng.below(if len > MIB as usize { 256 * 1024 } else { 8192 })
                            as usize;
                        let d = data(&mut rng, n);
                        self.overwrite(rel, off, &d);
                    }
                    24..28 => {
                        let n = 1 + rng.below(6000) as usize;
                        let d = data(&mut rng, n);
                        self.append(rel, &d);
                    }
                    28..31 => {
                        let to = format!("d{:02}/mv-r{r}-{i:04}", rng.below(24));
                        self.rename(rel, &to);
                    }
                    _ => {}
                }
            }
        }
        let small = 200 + rng.below(60) + 40 * r;
        for i in 0..small {
            let dir = format!("d{:02}", i % 24);
            let rel = if i % 5 == 0 {
                format!("{dir}/s{r}/r{r}-{i:04}")
            } else {
                format!("{dir}/r{r}-{i:04}")
            };
            // Mostly 1–16 KiB; some empty, sub-block and odd sizes, some larger.
            let len = match rng.below(20) {
                0 => 0,
                1 => 1 + rng.below(4095) as usize,
                2 => 4096 * (1 + rng.below(16)) as usize + 1,
                3 => 16 * 1024 + rng.below(112 * 1024) as usize,
                _ => 1024 + rng.below(15 * 1024) as usize,
            };
            self.write_new(&rel, data(&mut rng, len));
        }
        for k in 0..2 {
            let len = (2 + rng.below(4)) as usize * MIB as usize + rng.below(65536) as usize;
            self.write_new(&format!("big-r{r}-{k}"), data(&mut rng, len));
        }
        self.sync_dirs();
    }
}

/// Files written after a tag, never fsync'd (the next round's freeze flushes
/// them): `unsynced/r<r>/`, which the image at tag `r` must not have.
fn write_unsynced(mnt: &Path, r: u64) {
    let dir = mnt.join(format!("unsynced/r{r}"));
    fs::create_dir_all(&dir).unwrap();
    let mut rng = Prng::new(0x05E4_D000 + r);
    for i in 0..40 {
        let len = 512 + rng.below(12 * 1024) as usize;
        fs::write(
            dir.join(format!("u{i:03}")),
            datagen::generate(len, 50, &mut rng),
        )
        .unwrap();
    }
    fs::write(
        dir.join("big"),
        datagen::generate(MIB as usize, 50, &mut rng),
    )
    .unwrap();
}

/// `e2fsck -fy` (journal replay and repairs; exit 0 or 1 accepted) then
/// `e2fsck -fn` (must exit 0) on `image`. Returns the first one's exit code.
fn fsck_replay_then_clean(image: &Path) -> i32 {
    let out = run(
        Command::new(require_tool("e2fsck", "e2fsprogs"))
            .arg("-fy")
            .arg(image),
        LIMIT,
    );
    let code = out.status.code().unwrap_or(-1);
    assert!(
        (0..=1).contains(&code),
        "e2fsck -fy {} exited {}:\n{}",
        image.display(),
        out.status,
        output_text(&out)
    );
    fsck_clean(image);
    code
}

/// Mount `image` read-only through a loop device (both undone on drop).
fn mount_ro(image: &Path, dir: &Path) -> (LoopDev, Mounted) {
    let dev = LoopDev::attach(image);
    fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new("mount").args(["-o", "ro", &dev.0]).arg(dir),
        Duration::from_secs(30),
    );
    (dev, Mounted(dir.to_path_buf()))
}

/// Wait until the agent's status file holds a snapshot taken after `mark`.
/// One task rewrites it every 100 ms (snapshot, write, wait): a file modified
/// after `mark` may hold a snapshot taken just before it, the next one cannot.
/// (Without this, `Cluster::wait_caught_up` right after the last writes can
/// return on a snapshot from before them, with an older seq.)
fn wait_agent_status_after(c: &Cluster, mark: SystemTime) {
    let cfg = AgentConfig::load(&c.path("agent.toml")).unwrap();
    let path = cfg.agent.state_dir.join(STATUS_FILE);
    let mtime = || fs::metadata(&path).and_then(|m| m.modified()).ok();
    let first = wait_until(
        LIMIT,
        "an agent status written after the last writes",
        || mtime().filter(|t| *t > mark),
    );
    wait_until(LIMIT, "the agent's next status", || {
        mtime().filter(|t| *t > first)
    });
}

/// The catalog's points, from `target points --json`.
fn points(c: &Cluster) -> Vec<serde_json::Value> {
    let json = c.target_cmd(&["points", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["points"]
        .as_array()
        .expect("points --json has points")
        .clone()
}

#[test]
fn e2e_recovered_ext4_at_every_app_tag_holds_that_rounds_fsynced_files() {
    let t0 = Instant::now();
    require_root("FUSE, loop devices, mounts and FIFREEZE");
    assert!(
        Path::new("/dev/fuse").exists(),
        "prerequisite missing: /dev/fuse (FUSE)"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "prerequisite missing: /dev/loop-control (loop devices)"
    );
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("e2fsck", "e2fsprogs");
    require_tool("losetup", "mount");
    require_tool("mount", "mount");
    require_tool("fsfreeze", "util-linux");
    require_tool("cp", "coreutils");

    let mut c = Cluster::new(256 * MIB);
    c.start_relay();
    c.configure_target(|t| {
        t.groups[0].retention.enabled = true;
        t.groups[0].retention.granularity_ms = 200;
    });
    c.start_target();
    let fuse = c.dir.path().join("fuse");
    fs::create_dir_all(&fuse).unwrap();
    c.configure_agent(|a| {
        a.groups[0].disks[0].fuse = Some(FuseFrontend {
            mountpoint: fuse.clone(),
            file: Some("disk0".into()),
            allow_other: false,
        });
    });
    // A killed agent leaves its FUSE mount behind (a failing test kills it
    // when the cluster drops): unmounted lazily on drop. Its orderly stop
    // unmounts it, which makes this a no-op on success.
    let _fuse_mount = Mounted(fuse.clone());
    c.start_agent(&[]);
    let file = PathBuf::from(c.wait_frontend("fuse"));
    // A tag needs a write-ordered mode: the initial copy must be done.
    c.wait_caught_up(LIMIT);
    eprintln!("cluster up, initial copy done: {:?}", t0.elapsed());

    let dev = LoopDev::attach(&file);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]), LIMIT);
    let mnt = Mounted::mount(&dev.0, &c.dir.path().join("ext4"));
    let thaw = ThawGuard(mnt.0.clone());
    let m = mnt.0.to_str().unwrap().to_string();
    let mut tree = Tree {
        root: mnt.0.join("data"),
        files: BTreeMap::new(),
        dirty_dirs: BTreeSet::new(),
    };
    fs::create_dir_all(&tree.root).unwrap();
    fsync_dir(&mnt.0);

    let mut tags = Vec::new();
    for r in 1..=ROUNDS {
        tree.round(r);
        let manifest = tree.manifest();
        // The workload's own check: the tree holds what the model says.
        let on_disk = hash_tree(&tree.root);
        let d = diff(&manifest, &on_disk);
        assert!(
            d.is_empty(),
            "round {r}: the live tree is not the model: {d:#?}"
        );
        let name = format!("round-{r}");
        let seq = c.agent_tag_ok(&["--freeze", &m, "--timeout", "20", &name]);
        eprintln!(
            "{name}: {} files, {} MiB, tag seq {seq}: {:?}",
            manifest.len(),
            tree.files.values().map(|v| v.len()).sum::<usize>() >> 20,
            t0.elapsed()
        );
        if let Some((_, prev, _)) = tags.last() {
            assert!(seq > *prev, "tag seqs increase");
        }
        tags.push((name, seq, manifest));
        // Written after the tag and never fsync'd: must not be in its image.
        write_unsynced(&mnt.0, r);
    }
    drop(thaw);
    mnt.unmount();
    drop(dev);
    // Every write has been captured (the frontend completes a write only once
    // capture has it); `wait_caught_up` must not trust an older status.
    wait_agent_status_after(&c, SystemTime::now());
    let last = c.wait_caught_up(LIMIT);
    assert!(
        last > tags.last().unwrap().1,
        "the writes after the last tag (seq {}) were captured: caught up at seq {last}",
        tags.last().unwrap().1
    );
    // The live source, read through the frontend, is clean.
    fsck_clean(&file);
    eprintln!(
        "source unmounted, caught up at seq {last}, clean: {:?}",
        t0.elapsed()
    );

    // Every tag is an app point at its seq, with before-images kept.
    let pts = wait_until(LIMIT, "a recovery point for every tag", || {
        let pts = points(&c);
        tags.iter()
            .all(|(name, _, _)| pts.iter().any(|p| p["tag"].as_str() == Some(name)))
            .then_some(pts)
    });
    for (name, seq, _) in &tags {
        let p = pts
            .iter()
            .find(|p| p["tag"].as_str() == Some(name))
            .unwrap();
        assert_eq!(p["kind"].as_str(), Some("app"), "{name}: {p}");
        assert_eq!(p["seq"].as_u64(), Some(*seq), "{name}: {p}");
        assert!(!p["epoch"].is_null(), "{name} keeps before-images: {p}");
    }

    let out = c.dir.path().join("recovered");
    fs::create_dir_all(&out).unwrap();
    for (r, (name, seq, manifest)) in (1..).zip(&tags) {
        let img = out.join(format!("{name}.img"));
        c.target_cmd(&[
            "recover",
            "--point",
            name,
            "--disk",
            "0",
            "--out",
            img.to_str().unwrap(),
        ]);
        // fsck a copy: the recovered image stays as recovered for a post-mortem.
        let copy = out.join(format!("{name}.fsck.img"));
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&img)
                .arg(&copy),
            LIMIT,
        );
        let code = fsck_replay_then_clean(&copy);
        let (dev, mnt) = mount_ro(&copy, &out.join(format!("{name}.mnt")));
        let got = hash_tree(&mnt.0.join("data"));
        let d = diff(manifest, &got);
        assert!(
            d.is_empty(),
            "the image recovered at {name} (seq {seq}) does not hold its manifest ({} files):\n{}",
            manifest.len(),
            d.join("\n")
        );
        for later in r..=ROUNDS {
            let u = mnt.0.join(format!("unsynced/r{later}"));
            assert!(
                !u.exists(),
                "the image recovered at {name} has {}, written after the tag",
                u.display()
            );
        }
        eprintln!(
            "{name}: recovered, e2fsck -fy exit {code}, clean, {} files match: {:?}",
            manifest.len(),
            t0.elapsed()
        );
        mnt.unmount();
        drop(dev);
    }

    c.stop_all();
    c.assert_replica_equals_source();
    eprintln!("done: {:?}", t0.elapsed());
}
