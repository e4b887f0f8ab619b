//! Power loss at the relay: its spool lives on a file system that forgets
//! whatever was not synced when the power goes (tests/common/forgetful.rs), so
//! a relay that acknowledged a frame before it was durable would lose it. The
//! agent trims its journal on that acknowledgement, so such a frame could not
//! be sent again: the chain at the target would have a gap and the replica
//! would never equal the source.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::time::Duration;

use common::Cluster;
use common::forgetful::Forgetful;
use tidemark::config::RelayConfig;

const MIB: u64 = 1 << 20;

fn sync_dir(p: &std::path::Path) {
    fs::File::open(p).unwrap().sync_all().unwrap();
}

/// The harness itself: synced data survives a cut, unsynced data does not all
/// survive, names survive once their directory is synced, and nothing changes
/// while the power is off.
#[test]
fn forgetful_file_system_keeps_what_was_synced() {
    let fs = Forgetful::mount(7, Duration::ZERO);
    fs::create_dir(fs.path("d")).unwrap();
    sync_dir(&fs.root);
    let synced: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8).collect();
    let mut f = fs::File::create(fs.path("d/synced")).unwrap();
    f.write_all(&synced).unwrap();
    f.sync_data().unwrap();
    // Written after the sync: some of it may survive, not all of it.
    f.write_all(&[0xEE; 64 * 4096]).unwrap();
    drop(f);
    let mut g = fs::File::create(fs.path("d/unsynced")).unwrap();
    g.write_all(&[0xAB; 64 * 4096]).unwrap();
    drop(g);
    fs::write(fs.path("d/a.tmp"), b"renamed").unwrap();
    fs::File::open(fs.path("d/a.tmp"))
        .unwrap()
        .sync_all()
        .unwrap();
    sync_dir(&fs.path("d"));
    // After the directory's sync: a rename and a new file it does not cover.
    fs::rename(fs.path("d/a.tmp"), fs.path("d/a")).unwrap();
    fs::write(fs.path("d/late-name"), b"x").unwrap();
    fs::File::open(fs.path("d/late-name"))
        .unwrap()
        .sync_all()
        .unwrap();

    let before = fs.stats();
    let st = fs.power_off();
    // Off: nothing changes, nothing syncs.
    assert!(fs::write(fs.path("d/late"), b"x").is_err());
    fs.power_on();
    assert_eq!(st.cuts, before.cuts + 1);
    assert!(
        st.pages_lost > 0 || st.bytes_cut > 0,
        "a cut lost nothing of 128 unsynced pages: {st:?}"
    );
    assert_eq!(
        st.names_lost, 3,
        "the rename (two names) and the new file: {st:?}"
    );

    let mut got = Vec::new();
    fs::File::open(fs.path("d/synced"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got.len() >= synced.len(), "{} bytes left", got.len());
    assert_eq!(&got[..synced.len()], &synced[..], "synced bytes changed");
    assert!(
        got[synced.len()..].iter().all(|&b| b == 0xEE || b == 0),
        "bytes after the synced ones are the new ones or zeros"
    );
    let lost = fs::read(fs.path("d/unsynced")).unwrap();
    assert!(lost.len() <= 64 * 4096);
    assert!(lost.iter().all(|&b| b == 0xAB || b == 0));
    assert_ne!(
        lost,
        vec![0xAB; 64 * 4096],
        "an unsynced file came through whole"
    );
    // The rename was not synced: the old name is back, with its synced bytes;
    // the new file's name is gone although its data was synced.
    assert!(!fs.path("d/a").exists());
    assert_eq!(fs::read(fs.path("d/a.tmp")).unwrap(), b"renamed");
    assert!(!fs.path("d/late-name").exists());
    // After the cut everything is synced: a second cut changes nothing.
    let again = fs.power_off();
    fs.power_on();
    assert_eq!(again.pages_lost, st.pages_lost);
    assert_eq!(again.bytes_cut, st.bytes_cut);
    assert_eq!(again.names_lost, st.names_lost);
    assert_eq!(fs::read(fs.path("d/unsynced")).unwrap(), lost);
}

/// Truncates: undone or kept as a whole by a cut until the file is synced, and
/// bytes past a synced truncate never come back.
#[test]
fn forgetful_file_system_truncates_are_durable_only_once_synced() {
    const P: usize = 4096;
    let fs = Forgetful::mount(11, Duration::ZERO);
    let path = fs.path("t");
    let (mut undone, mut kept) = (0, 0);
    for round in 0..24 {
        let old = vec![0xA0 + (round % 16) as u8; 16 * P];
        let mut f = fs::File::create(&path).unwrap();
        sync_dir(&fs.root);
        f.write_all(&old).unwrap();
        f.sync_all().unwrap();
        // Cut to 4 pages, then write pages 4 and 5 anew; nothing synced.
        f.set_len(4 * P as u64).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(4 * P as u64)).unwrap();
        f.write_all(&[0xBB; 2 * P]).unwrap();
        drop(f);
        let st = fs.power_off();
        fs.power_on();
        let got = fs::read(&path).unwrap();
        assert_eq!(&got[..4 * P], &old[..4 * P], "round {round}: synced prefix");
        if got.len() >= 16 * P {
            // The truncate was undone: the old content past page 6 is back.
            undone += 1;
            assert_eq!(&got[6 * P..16 * P], &old[6 * P..], "round {round}");
            assert!(got[4 * P..6 * P].iter().all(|&b| b == 0xBB || b == old[0]));
        } else {
            kept += 1;
            assert!(got.len() <= 6 * P, "round {round}: {} bytes", got.len());
            assert!(
                got[4 * P..].iter().all(|&b| b == 0xBB || b == 0),
                "round {round}"
            );
        }
        assert_eq!(st.truncates_undone + st.truncates_kept, round + 1);
    }
    assert!(undone > 0 && kept > 0, "undone {undone}, kept {kept}");

    // Synced truncate, then an extension with zeros, synced: no old byte returns.
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&[0xCC; 8 * P]).unwrap();
    f.sync_all().unwrap();
    f.set_len(0).unwrap();
    f.set_len(8 * P as u64).unwrap();
    f.sync_data().unwrap();
    drop(f);
    fs.power_off();
    fs.power_on();
    assert_eq!(fs::read(&path).unwrap(), vec![0; 8 * P]);
}

/// Start the three roles (the victim's files on `power`, placed by `place`),
/// run a workload of `bytes` at 32 MB/s, cut the victim's power three times
/// while it runs (power off, kill, power on, restart), and check that the
/// replica ends equal to the source.
fn three_cuts(
    victim: &str,
    power: &Forgetful,
    bytes: &str,
    seed: &str,
    place: impl FnOnce(&mut Cluster),
) -> Cluster {
    let mut c = Cluster::new(128 * MIB);
    c.prefill(9, 16 * MIB);
    place(&mut c);
    c.start_relay();
    c.start_target();
    c.start_agent(&[
        "--workload-bytes",
        bytes,
        "--workload-seed",
        seed,
        "--workload-rate-mb-s",
        "32",
    ]);
    for pause in [1200u64, 900, 1500] {
        std::thread::sleep(Duration::from_millis(pause));
        let st = power.power_off();
        match victim {
            "relay" => c.relay.as_mut().unwrap().kill9(),
            "target" => c.target.as_mut().unwrap().kill9(),
            _ => unreachable!(),
        }
        power.power_on();
        eprintln!("power cut at the {victim}: {st:?}");
        match victim {
            "relay" => c.start_relay(),
            _ => c.start_target(),
        }
    }
    let last = c.wait_workload_done(Duration::from_secs(240));
    c.wait_applied(last, Duration::from_secs(240));
    c.stop_all();
    c.assert_replica_equals_source();
    eprintln!("after the cuts: {:?}", power.stats());
    c
}

/// The relay loses power three times in the middle of a run (its spool's file
/// system cut back to what was synced, with a random part of the rest, then
/// the relay killed); it restarts on what survived. Every write the agent made
/// still reaches the replica, in order.
#[test]
fn e2e_relay_power_cut_three_times_mid_run_loses_no_acknowledged_frame() {
    // Syncs take 15 ms, as on a slow disk, so appends are often written and
    // not yet durable when the power goes.
    let power = Forgetful::mount(0x5eed, Duration::from_millis(15));
    // ~5 s of writes, so the cuts land mid-run.
    let c = three_cuts("relay", &power, "160M", "31", |c| {
        let path = c.path("relay.toml");
        let mut cfg = RelayConfig::load(&path).unwrap();
        cfg.relay.spool_dir = power.path("spool");
        fs::write(&path, cfg.to_toml_string().unwrap()).unwrap();
    });
    let a = c.agent_status().unwrap();
    // (The agent may sleep through a short-lived relay in its reconnect
    // backoff, so not every cut costs it a reconnect.)
    assert!(
        a.groups[0].reconnects >= 1,
        "the agent reconnected after the cuts: {:?}",
        a.groups[0]
    );
}

/// The target loses power three times in the middle of a run (the initial
/// copy, then the workload): its replica, redo journal, watermark and catalog
/// all live on the forgetful file system. After each restart it must find a
/// consistent state on its own (redo replay from what survived) and go on; the
/// relay still holds every frame the target had not acknowledged, so in the
/// end the replica equals the source.
#[test]
fn e2e_target_power_cut_three_times_mid_run_converges() {
    let power = Forgetful::mount(0xc0ffee, Duration::from_millis(15));
    three_cuts("target", &power, "96M", "32", |c| {
        c.replica = power.path("replica.img");
        c.configure_target(|cfg| cfg.target.state_dir = power.path("target-state"));
    });
}

/// The protected machine loses power: its source disk keeps only what was
/// synced (plus a random part of the rest), and so do the agent's dirty log and
/// state. Writes the relay and the target already hold may be gone from the
/// source; the restarted agent must resync every region where that can be, so
/// the replica ends equal to what the source disk kept, not to what was sent.
/// A sequential workload without flushes leaves extents idle long enough to
/// leave the activity log, were it not for the rule that an extent stays until
/// a sync of the backing disk covers its writes.
#[test]
fn e2e_agent_power_cut_replica_follows_what_the_source_disk_kept() {
    let power = Forgetful::mount(0xa9e47, Duration::from_millis(5));
    let mut c = agent_on(&power);
    // 8 MB/s over 64 MiB, one 4 MiB extent every half second: the first ones
    // are idle for more than two rollovers (2 s each) when the power goes.
    c.start_agent(&[
        "--workload-bytes",
        "56M",
        "--workload-pattern",
        "sequential",
        "--workload-seed",
        "41",
        "--workload-rate-mb-s",
        "8",
    ]);
    std::thread::sleep(Duration::from_millis(6500));
    let st = cut_agent(&mut c, &power);
    assert!(st.pages_lost > 0, "the cut lost no unsynced page: {st:?}");
    // Restart without a workload: the unclean start resyncs what the dirty
    // log cannot vouch for.
    c.start_agent(&[]);
    c.wait_caught_up(Duration::from_secs(120));
    c.assert_unclean_start_resynced("cut");
    c.stop_all();
    c.assert_replica_equals_source();
}

/// The protected machine loses power again and again, at random instants,
/// under sequential and random workloads (each restart runs the next one, so
/// some cuts land in the resync of the previous cut): the replica still ends
/// equal to what the source disk kept.
#[test]
fn e2e_agent_power_cut_at_random_instants_replica_follows_the_source() {
    let power = Forgetful::mount(0x5ca1ab1e, Duration::from_millis(5));
    let mut c = agent_on(&power);
    let mut rng = tidemark::util::prng::Prng::new(0xa11ce);
    // Agent power cuts: `TIDEMARK_AGENT_CUTS`, default 4.
    let cuts = common::env_count("TIDEMARK_AGENT_CUTS", 4) as u64;
    for i in 0..cuts {
        let pattern = if i % 2 == 0 { "sequential" } else { "random" };
        let seed = (100 + i).to_string();
        c.start_agent(&[
            "--workload-bytes",
            "48M",
            "--workload-pattern",
            pattern,
            "--workload-seed",
            &seed,
            "--workload-rate-mb-s",
            "12",
        ]);
        std::thread::sleep(Duration::from_millis(1500 + rng.below(3000)));
        let st = cut_agent(&mut c, &power);
        eprintln!("cut {} of {cuts} ({pattern}): {st:?}", i + 1);
    }
    c.start_agent(&[]);
    c.wait_caught_up(Duration::from_secs(240));
    c.stop_all();
    c.assert_replica_equals_source();
}

/// A cluster whose source disk (64 MiB, empty, synced) and agent state live
/// on `power`; relay and target started.
fn agent_on(power: &Forgetful) -> Cluster {
    let mut c = Cluster::new(64 * MIB);
    c.source = power.path("source.img");
    let f = fs::File::create(&c.source).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    sync_dir(&power.root);
    c.start_relay();
    c.configure_agent(|cfg| cfg.agent.state_dir = power.path("agent-state"));
    c.start_target();
    c
}

/// Cut the power of the agent's machine: power off, kill the agent, power on.
fn cut_agent(c: &mut Cluster, power: &Forgetful) -> common::forgetful::CutStats {
    let st = power.power_off();
    c.agent.as_mut().unwrap().kill9();
    power.power_on();
    eprintln!("power cut at the agent: {st:?}");
    st
}
