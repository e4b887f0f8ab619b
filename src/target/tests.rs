//! In-process tests of the target role: real frames, real mutual TLS, a fake
//! relay that speaks the real protocol, real replica files.

use super::testutil::{Chain, Rec, Site, WAIT, assert_replica, data, wait_status};
use super::watermark::Watermark;
use super::{APPLY_LOG, TargetError, TargetStatus, WATERMARK_FILE, check_apply_log};
use crate::error::{Classify, ErrorKind};
use crate::frame::{DataKey, FrameKind, SealedFrame};
use crate::target::gate::ChainPos;
use crate::transport::wire::WireErrorKind;
use crate::util::prng::Prng;
use crate::util::statusfile::STATUS_FILE;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn pos(f: &SealedFrame) -> ChainPos {
    ChainPos {
        frame_no: f.header.frame_no,
        last_seq: f.header.last_seq,
    }
}

fn read_status(site: &Site) -> TargetStatus {
    let bytes = std::fs::read(site.cfg.target.state_dir.join(STATUS_FILE)).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn watermark_of(site: &Site, group: &str) -> ChainPos {
    Watermark::open(&site.group_dir(group).join(WATERMARK_FILE))
        .unwrap()
        .get()
        .pos
}

/// Random writes and zero ranges over `disks` (each of `size` bytes).
fn random_records(rng: &mut Prng, seed: u64, disks: &[u16], size: u64, n: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let disk = disks[rng.below(disks.len() as u64) as usize];
            let len = 512 * (1 + rng.below(128)); // 512 B .. 64 KiB
            let off = 512 * rng.below((size - len) / 512);
            if rng.below(5) == 0 {
                Rec::Zero(disk, off, len as u32)
            } else {
                Rec::Write(disk, off, data(seed * 1000 + i as u64, len as usize))
            }
        })
        .collect()
}

fn write_and_zero_bytes(frames: &[Vec<Rec>]) -> (u64, u64) {
    let mut w = 0;
    let mut z = 0;
    for r in frames.iter().flatten() {
        match r {
            Rec::Write(_, _, d) => w += d.len() as u64,
            Rec::Zero(_, _, l) => z += u64::from(*l),
            Rec::Size(..) | Rec::Note(..) => {}
        }
    }
    (w, z)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_frames_builds_the_replicas_byte_for_byte() {
    let mut site = Site::new(&["g1"]).await;
    let d1 = site.add_disk("g1", 1);
    let d0 = site.replica("g1", 0);
    let mut c = site.chain("g1");
    let mut rng = Prng::new(1);
    let mut recs: Vec<Vec<Rec>> = vec![vec![Rec::Size(0, 4 * MIB), Rec::Size(1, MIB)]];
    for i in 0..30 {
        recs.push(random_records(
            &mut rng,
            i,
            &[0, 1],
            MIB,
            1 + (i as usize % 7),
        ));
    }
    let mut frames: Vec<SealedFrame> = recs.iter().map(|r| c.w(r)).collect();
    // A write to the far end of disk 0, numbering gaps, a heartbeat.
    let tail = vec![Rec::Write(0, 4 * MIB - 4096, data(99, 4096))];
    c.skip_numbers(5);
    frames.push(c.w(&tail));
    recs.push(tail);
    frames.push(c.heartbeat());
    let w_records: u64 = recs.iter().map(|r| r.len() as u64).sum();

    let t = site.start();
    let mut conn = site.relay.accept().await;
    assert_eq!(conn.hello.applied, ChainPos::default());
    assert_eq!(
        (conn.hello.name.as_str(), conn.hello.group.as_str()),
        ("target", "g1")
    );
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&frames).await;
    assert_eq!(conn.wait_ack(c.tip.frame_no).await, c.tip);
    assert!(conn.acks.windows(2).all(|w| w[0].frame_no < w[1].frame_no));

    // An M frame leaves the replica inconsistent until the next W frame.
    let m_recs = vec![Rec::Write(1, 0, data(7, 8192))];
    let m = c.frame(FrameKind::Merge, &m_recs);
    conn.send(&m.bytes).await;
    conn.wait_ack(m.header.frame_no).await;
    let st = wait_status(&site.status_path(), |s| {
        s.groups[0].watermark.frame_no == m.header.frame_no
    })
    .await;
    assert!(!st.groups[0].consistent);
    let w_last = c.w(&[Rec::Zero(1, 0, 4096)]);
    conn.send(&w_last.bytes).await;
    conn.wait_ack(w_last.header.frame_no).await;
    recs.push(m_recs);
    recs.push(vec![Rec::Zero(1, 0, 4096)]);
    t.stop().await.unwrap();

    assert_replica(&d0, &c.model[&0]);
    assert_replica(&d1, &c.model[&1]);
    assert_eq!(watermark_of(&site, "g1"), c.tip);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(
        (log.starts, log.applies, log.merges, log.heartbeats),
        (1, frames.len() as u64 + 2, 1, 1)
    );
    assert_eq!(log.last, c.tip);

    let st = read_status(&site);
    assert_eq!((st.role.as_str(), st.name.as_str()), ("target", "target"));
    let g = &st.groups[0];
    assert_eq!(
        (g.watermark.frame_no, g.watermark.last_seq),
        (c.tip.frame_no, c.tip.last_seq)
    );
    assert_eq!(g.frames_applied, frames.len() as u64 + 2);
    let (w, z) = write_and_zero_bytes(&recs);
    assert_eq!((g.bytes_applied, g.zero_bytes), (w, z));
    assert_eq!(g.records_applied, w_records + 2);
    // Lag is kept for W records only (not the M frame's, not heartbeats).
    assert_eq!(g.lag_us.count, w_records + 1);
    assert!(g.consistent);
    assert_eq!(
        (g.duplicates, g.refused, g.chain_violations, g.held),
        (0, 0, 0, 0)
    );
    assert!(g.stalled.is_none() && g.gap.is_none() && !g.connected);
    assert!(g.apply_batches >= 1 && g.apply_batches <= g.frames_applied);
    assert_eq!((g.in_flight_frames, g.in_flight_bytes), (0, 0));
}

/// Frames that all overwrite block 0 (so any reordering shows in the image)
/// plus a write of their own.
fn overwriting_chain(c: &mut Chain, n: u64) -> Vec<SealedFrame> {
    let mut frames = vec![c.w(&[Rec::Size(0, MIB)])];
    for i in 1..n {
        c.skip_numbers(i % 3);
        frames.push(c.w(&[
            Rec::Write(0, 0, data(i, 4096)),
            Rec::Write(0, 4096 * (i + 1), data(i + 100, 4096)),
        ]));
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_replayed_frames_are_dropped_and_acked() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let frames = overwriting_chain(&mut c, 6);
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&frames[..3]).await;
    let p3 = pos(&frames[2]);
    assert_eq!(conn.wait_ack(p3.frame_no).await, p3);
    // Replays of applied frames: each is dropped and answered with the
    // durable watermark.
    for f in [&frames[1], &frames[0], &frames[2]] {
        conn.send(&f.bytes).await;
        assert_eq!(conn.wait_ack(p3.frame_no).await, p3);
    }
    // A forged frame reusing an applied frame's number (different content,
    // valid seal): a replay, never applied.
    let mut forger = site.chain("g1");
    forger.tip = pos(&frames[0]);
    forger.next_frame = frames[1].header.frame_no;
    let forged = forger.w_unmodelled(&[Rec::Write(0, 0, vec![0xEE; 65536])]);
    conn.send(&forged.bytes).await;
    assert_eq!(conn.wait_ack(p3.frame_no).await, p3);
    conn.send_all(&frames[3..]).await;
    conn.wait_ack(c.tip.frame_no).await;
    t.stop().await.unwrap();

    assert_replica(&site.replica("g1", 0), &c.model[&0]);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!((log.starts, log.applies), (1, 6));
    let g = &read_status(&site).groups[0];
    assert_eq!(g.duplicates, 4);
    assert_eq!(g.frames_applied, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_frames_are_held_then_applied_in_chain_order() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let frames = overwriting_chain(&mut c, 8);
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send(&frames[0].bytes).await;
    conn.wait_ack(frames[0].header.frame_no).await;
    // 3 and 5 arrive before 2: held, visible in the status as a gap.
    conn.send(&frames[2].bytes).await;
    conn.send(&frames[4].bytes).await;
    let st = wait_status(&site.status_path(), |s| {
        s.groups[0].held == 2 && s.groups[0].gap.is_some()
    })
    .await;
    let gap = st.groups[0].gap.unwrap();
    assert_eq!(gap.tip_frame_no, frames[0].header.frame_no);
    assert_eq!(gap.first_held, frames[2].header.frame_no);
    assert_eq!(st.groups[0].watermark.frame_no, frames[0].header.frame_no);
    for i in [3usize, 1, 7, 6, 5] {
        conn.send(&frames[i].bytes).await;
    }
    conn.wait_ack(c.tip.frame_no).await;
    wait_status(&site.status_path(), |s| {
        s.groups[0].held == 0 && s.groups[0].gap.is_none()
    })
    .await;
    t.stop().await.unwrap();

    assert_replica(&site.replica("g1", 0), &c.model[&0]);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(log.applies, 8);
    assert_eq!(log.last, c.tip);
}

/// Apply three good frames, then send `bad` (frame 4) and a good frame 5 after
/// it: the target must refuse frame 4 with an error naming group and frame,
/// apply neither, leave the replica untouched, stall, and close the session.
async fn refuse_after_three(
    site: Site,
    mut c: Chain,
    bad: Vec<u8>,
    expect: &str,
    kind: WireErrorKind,
) {
    let good: Vec<SealedFrame> = (0..3u64)
        .map(|i| {
            let mut r = vec![Rec::Write(0, i * 8192, data(i, 8192))];
            if i == 0 {
                r.insert(0, Rec::Size(0, 256 * KIB));
            }
            c.w(&r)
        })
        .collect();
    let replica = site.replica("g1", 0);
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&good).await;
    conn.wait_ack(c.tip.frame_no).await;
    let before = std::fs::read(&replica).unwrap();
    assert_replica(&replica, &c.model[&0]);

    let bad_no = c.tip.frame_no + 1;
    // The builder's chain moves on past the bad frame; frame 5 follows it.
    c.tip = ChainPos {
        frame_no: bad_no,
        last_seq: c.tip.last_seq + 1,
    };
    c.next_frame = bad_no + 1;
    let after = c.w_unmodelled(&[Rec::Write(0, 0, vec![0x55; 8192])]);
    conn.send(&bad).await;
    let _ = conn.send_lossy(&after.bytes).await;
    let (k, frame_no, msg) = conn.wait_error().await;
    assert_eq!(frame_no, bad_no, "{msg}");
    assert_eq!(k, kind, "{msg}");
    assert!(
        msg.contains("group g1") && msg.contains(&format!("frame {bad_no}")),
        "{msg}"
    );
    assert!(msg.contains(expect), "{msg}");
    // The target closes the session of a stalled group.
    let rest = conn.wait_closed().await;
    assert!(rest.is_empty(), "{rest:?}");
    // The process keeps running and reporting while the group is stalled:
    // the status file goes on being refreshed (an exited target writes it
    // once more at most).
    let mut last = wait_status(&site.status_path(), |s| s.groups[0].stalled.is_some())
        .await
        .updated_us;
    for _ in 0..2 {
        let l = last;
        last = wait_status(&site.status_path(), |s| s.updated_us > l)
            .await
            .updated_us;
    }
    let st = wait_status(&site.status_path(), |s| s.groups[0].stalled.is_some()).await;
    let g = &st.groups[0];
    assert!(
        g.stalled
            .as_ref()
            .unwrap()
            .contains(&format!("frame {bad_no}"))
    );
    assert_eq!(g.refused, 1);
    assert_eq!(g.watermark.frame_no, bad_no - 1);
    // Stalled is not fatal for the process.
    t.stop().await.unwrap();
    assert_eq!(std::fs::read(&replica).unwrap(), before);
    assert_eq!(watermark_of(&site, "g1").frame_no, bad_no - 1);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(log.applies, 3);
    assert!(read_status(&site).groups[0].stalled.is_some());
}

/// A site for refusal tests: groups g1 and g2 exist (keys, certificates), the
/// target serves g1 only.
async fn g1_site() -> Site {
    let mut site = Site::new(&["g1", "g2"]).await;
    site.cfg.groups.retain(|g| g.name == "g1");
    site
}

fn frame4(key: &DataKey, group: &str) -> Vec<u8> {
    let mut c = Chain::new(group, key);
    // Continue g1's chain after three one-record frames.
    c.tip = ChainPos {
        frame_no: 3,
        last_seq: 4,
    };
    c.next_frame = 4;
    c.w_unmodelled(&[Rec::Write(0, 0, vec![0xAA; 8192])]).bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sealed_with_a_random_key_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    let bad = frame4(&DataKey::generate().unwrap(), "g1");
    refuse_after_three(site, c, bad, "authentication failed", WireErrorKind::Auth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sealed_with_another_groups_key_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    let bad = frame4(&site.key("g2"), "g1");
    refuse_after_three(site, c, bad, "authentication failed", WireErrorKind::Auth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_frame_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    let mut bad = frame4(&site.key("g1"), "g1");
    bad[128 + 40] ^= 0x01;
    refuse_after_three(site, c, bad, "authentication failed", WireErrorKind::Auth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_a_tampered_header_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    let mut bad = frame4(&site.key("g1"), "g1");
    // time_last_us + 1: still a well-formed header (>= time_first_us), but the
    // authenticated data changed.
    let t = u64::from_le_bytes(bad[96..104].try_into().unwrap()) + 1;
    bad[96..104].copy_from_slice(&t.to_le_bytes());
    refuse_after_three(site, c, bad, "authentication failed", WireErrorKind::Auth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    let mut bad = frame4(&site.key("g1"), "g1");
    bad.pop();
    refuse_after_three(
        site,
        c,
        bad,
        "does not match its header",
        WireErrorKind::Corrupt,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_another_group_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    let bad = frame4(&site.key("g2"), "g2");
    refuse_after_three(site, c, bad, "belongs to group g2", WireErrorKind::Auth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_forking_the_chain_is_refused() {
    let site = g1_site().await;
    let c = site.chain("g1");
    // Frame 4 claims frame 3 ended at another seq.
    let mut f = Chain::new("g1", &site.key("g1"));
    f.tip = ChainPos {
        frame_no: 3,
        last_seq: 3,
    };
    f.next_frame = 4;
    let bad = f.w_unmodelled(&[Rec::Write(0, 0, vec![1; 512])]).bytes;
    refuse_after_three(site, c, bad, "ordering gate", WireErrorKind::Corrupt).await;
}

/// Run one frame that must be refused by validation against a fresh target;
/// returns the error message.
async fn refuse_first_frame(site: &Site, c: &mut Chain, recs: &[Rec]) -> String {
    let f = c.w_unmodelled(recs);
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send(&f.bytes).await;
    let (_, frame_no, msg) = conn.wait_error().await;
    assert_eq!(frame_no, f.header.frame_no, "{msg}");
    assert!(
        msg.contains("group g1") && msg.contains(&format!("frame {frame_no}")),
        "{msg}"
    );
    conn.wait_closed().await;
    let st = wait_status(&site.status_path(), |s| s.groups[0].stalled.is_some()).await;
    assert_eq!(st.groups[0].refused, 1);
    t.stop().await.unwrap();
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(log.applies, 0);
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_smaller_than_the_source_disk_is_refused_and_untouched() {
    let site = Site::new(&["g1"]).await;
    let replica = site.replica("g1", 0);
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let before = vec![0xAB; 64 * 1024];
    std::fs::write(&replica, &before).unwrap();
    let mut c = site.chain("g1");
    let msg = refuse_first_frame(
        &site,
        &mut c,
        &[Rec::Size(0, MIB), Rec::Write(0, 0, data(1, 4096))],
    )
    .await;
    for want in [
        replica.to_str().unwrap(),
        "65536",
        "1048576",
        "disk 0",
        "smaller",
    ] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
    assert_eq!(std::fs::read(&replica).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_grows_only_with_a_disk_grown_note_in_the_frame_of_the_new_size() {
    let site = Site::new(&["g1"]).await;
    let replica = site.replica("g1", 0);
    let mut c = site.chain("g1");
    let first = c.w(&[Rec::Size(0, 64 * KIB), Rec::Write(0, 0, data(1, 4096))]);
    // The disk grew: its note and new size in one M frame, then data in the
    // new space, then a W frame.
    let grown = c.frame(
        FrameKind::Merge,
        &[
            Rec::Note(0, crate::frame::NoteReason::DiskGrown),
            Rec::Size(0, MIB),
            Rec::Write(0, 512 * KIB, data(2, 8192)),
        ],
    );
    let w = c.w(&[Rec::Write(0, MIB - 4096, data(3, 4096))]);
    // A larger size without the note: a replica too small, refused.
    let bad = c.w_unmodelled(&[Rec::Size(0, 2 * MIB), Rec::Write(0, 0, vec![9; 512])]);
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&[first, grown, w]).await;
    conn.wait_ack(c.tip.frame_no - 1).await;
    conn.send(&bad.bytes).await;
    let (_, frame_no, msg) = conn.wait_error().await;
    assert_eq!(frame_no, bad.header.frame_no, "{msg}");
    assert!(msg.contains("smaller") && msg.contains("2097152"), "{msg}");
    t.stop().await.unwrap();
    assert_replica(&replica, &c.model[&0]);
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmdk_replica_cannot_grow_and_refuses_the_grown_frame_untouched() {
    let mut site = Site::new(&["g1"]).await;
    site.cfg.groups[0].disks[0].format = crate::config::ReplicaFormat::Vmdk;
    let replica = site.replica("g1", 0);
    let mut c = site.chain("g1");
    let first = c.w(&[Rec::Size(0, MIB), Rec::Write(0, 0, data(1, 4096))]);
    let grown = c.frame(
        FrameKind::Merge,
        &[
            Rec::Note(0, crate::frame::NoteReason::DiskGrown),
            Rec::Size(0, 2 * MIB),
            Rec::Write(0, MIB + 4096, data(2, 4096)),
        ],
    );
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send(&first.bytes).await;
    conn.wait_ack(first.header.frame_no).await;
    let before = std::fs::read(&replica).unwrap();
    conn.send(&grown.bytes).await;
    let (_, frame_no, msg) = conn.wait_error().await;
    assert_eq!(frame_no, grown.header.frame_no, "{msg}");
    assert!(msg.contains("smaller") && msg.contains("2097152"), "{msg}");
    t.stop().await.unwrap();
    assert_eq!(std::fs::read(&replica).unwrap(), before, "no byte changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_out_of_range_is_refused_before_any_byte_of_its_frame() {
    let mut site = Site::new(&["g1"]).await;
    let replica1 = site.add_disk("g1", 1);
    let replica = site.replica("g1", 0);
    let mut c = site.chain("g1");
    let first = c.w(&[Rec::Size(0, 64 * KIB), Rec::Size(1, 64 * KIB)]);
    // Valid writes to both disks, then one crossing the end of disk 0.
    let bad = c.w_unmodelled(&[
        Rec::Write(1, 0, vec![0x77; 4096]),
        Rec::Write(0, 0, vec![0x77; 4096]),
        Rec::Write(0, 60 * KIB, vec![0x77; 8192]),
    ]);
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send(&first.bytes).await;
    conn.wait_ack(first.header.frame_no).await;
    conn.send(&bad.bytes).await;
    let (kind, frame_no, msg) = conn.wait_error().await;
    assert_eq!(
        (kind, frame_no),
        (WireErrorKind::Corrupt, bad.header.frame_no)
    );
    assert!(
        msg.contains("record 2") && msg.contains("outside replica"),
        "{msg}"
    );
    conn.wait_closed().await;
    t.stop().await.unwrap();
    assert_replica(&replica, &vec![0; 64 * KIB as usize]);
    assert_replica(&replica1, &vec![0; 64 * KIB as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_disk_is_refused_and_nothing_is_created() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let msg = refuse_first_frame(
        &site,
        &mut c,
        &[Rec::Size(0, 64 * KIB), Rec::Write(7, 0, vec![1; 512])],
    )
    .await;
    assert!(
        msg.contains("disk 7") && msg.contains("not configured"),
        "{msg}"
    );
    assert!(!site.replica("g1", 0).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_before_any_disk_size_is_refused() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let msg = refuse_first_frame(&site, &mut c, &[Rec::Write(0, 0, vec![1; 512])]).await;
    assert!(
        msg.contains("no replica is open") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(!site.replica("g1", 0).exists());
}

fn big_frames(c: &mut Chain, from: u64, n: u64) -> Vec<SealedFrame> {
    (from..from + n)
        .map(|i| {
            let mut r = vec![
                Rec::Write(0, 0, data(i, 4096)),
                Rec::Write(0, (i % 30) * 128 * KIB, data(i + 5000, 128 * KIB as usize)),
            ];
            if i == 0 {
                r.insert(0, Rec::Size(0, 4 * MIB));
            }
            c.w(&r)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_watermark() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let frames = big_frames(&mut c, 0, 60);

    // Run 1: ten frames, acked, clean stop.
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&frames[..10]).await;
    conn.wait_ack(frames[9].header.frame_no).await;
    t.stop().await.unwrap();
    assert!(conn.wait_closed().await.is_empty());

    // Run 2: resumes after frame 10; the relay also redelivers 8..10.
    let t = site.start();
    let mut conn = site.relay.accept().await;
    assert_eq!(conn.hello.applied, pos(&frames[9]));
    conn.welcome(pos(&frames[9])).await;
    conn.send_all(&frames[7..20]).await;
    conn.wait_ack(frames[19].header.frame_no).await;

    // Shut down with frames in flight: whatever was handed to the pipeline is
    // applied and recorded; the rest comes again on the next start.
    let sender = tokio::spawn(async move {
        for f in &frames[20..] {
            if !conn.send_lossy(&f.bytes).await {
                break;
            }
        }
        conn.wait_closed().await;
        frames
    });
    t.stop().await.unwrap();
    let frames = tokio::time::timeout(WAIT, sender).await.unwrap().unwrap();
    let durable = watermark_of(&site, "g1");
    assert!(durable.frame_no >= frames[19].header.frame_no);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(
        log.last, durable,
        "a clean stop leaves nothing applied beyond the watermark"
    );

    // Run 3: the relay redelivers from what the target says it applied.
    let t = site.start();
    let mut conn = site.relay.accept().await;
    assert_eq!(conn.hello.applied, durable);
    conn.welcome(durable).await;
    let next = frames
        .iter()
        .position(|f| f.header.frame_no == durable.frame_no)
        .unwrap()
        + 1;
    conn.send_all(&frames[next..]).await;
    conn.wait_ack(c.tip.frame_no).await;
    t.stop().await.unwrap();

    assert_replica(&site.replica("g1", 0), &c.model[&0]);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!((log.starts, log.applies), (3, 60));
    assert_eq!(log.last, c.tip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_never_reapplies_frames_still_in_the_pipeline() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let frames = big_frames(&mut c, 0, 80);
    // A slow disk: the apply thread waits, so frames pile up in the pipeline.
    let hold = super::apply::hold::hold(&site.group_dir("g1").join(APPLY_LOG));
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&frames[..50]).await;
    wait_status(&site.status_path(), |s| s.groups[0].in_flight_frames >= 40).await;
    // Drop the connection with those frames in flight.
    drop(conn);
    // The target reconnects from its durable watermark (nothing yet); the
    // relay redelivers everything after it, including the frames the pipeline
    // still holds: they must be recognised as duplicates.
    let mut conn = site.relay.accept().await;
    assert_eq!(conn.hello.applied, ChainPos::default());
    conn.welcome(ChainPos::default()).await;
    conn.send_all(&frames).await;
    drop(hold);
    conn.wait_ack(c.tip.frame_no).await;
    t.stop().await.unwrap();

    assert_replica(&site.replica("g1", 0), &c.model[&0]);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(
        (log.starts, log.applies),
        (1, 80),
        "every frame applied exactly once"
    );
    let g = &read_status(&site).groups[0];
    assert_eq!((g.chain_violations, g.refused), (0, 0));
    assert!(g.duplicates >= 40, "{}", g.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_group_does_not_stop_the_others() {
    let site = Site::new(&["g1", "g2"]).await;
    let mut c1 = site.chain("g1");
    let mut c2 = site.chain("g2");
    let f1 = c1.w(&[Rec::Size(0, 64 * KIB)]);
    let bad1 = c1.w_unmodelled(&[Rec::Write(0, 64 * KIB, vec![1; 512])]);
    let g2: Vec<SealedFrame> = (0..5u64)
        .map(|i| {
            let mut r = vec![Rec::Write(0, i * 4096, data(i, 4096))];
            if i == 0 {
                r.insert(0, Rec::Size(0, 64 * KIB));
            }
            c2.w(&r)
        })
        .collect();
    let t = site.start();
    let (a, b) = (site.relay.accept().await, site.relay.accept().await);
    let (mut s1, mut s2) = if a.hello.group == "g1" {
        (a, b)
    } else {
        (b, a)
    };
    s1.welcome(ChainPos::default()).await;
    s2.welcome(ChainPos::default()).await;
    s1.send(&f1.bytes).await;
    s1.send(&bad1.bytes).await;
    let (_, frame_no, _) = s1.wait_error().await;
    assert_eq!(frame_no, bad1.header.frame_no);
    s2.send_all(&g2).await;
    s2.wait_ack(c2.tip.frame_no).await;
    let st = wait_status(&site.status_path(), |s| {
        s.groups.iter().all(|g| g.watermark.frame_no > 0)
    })
    .await;
    assert!(st.groups[0].stalled.is_some() && st.groups[1].stalled.is_none());
    t.stop().await.unwrap();
    assert_replica(&site.replica("g1", 0), &c1.model[&0]);
    assert_replica(&site.replica("g2", 0), &c2.model[&0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_refusal_by_the_relay_is_fatal() {
    let site = Site::new(&["g1"]).await;
    let t = site.start();
    let mut conn = site.relay.accept().await;
    conn.refuse(
        WireErrorKind::Auth,
        "target is not allowed to read group g1",
    )
    .await;
    let e = t.finish().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    let s = e.to_string();
    assert!(s.contains("g1") && s.contains("not allowed"), "{s}");
    assert!(!s.contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_target_on_the_same_state_dir_is_refused() {
    let site = Site::new(&["g1"]).await;
    let t = site.start();
    // The first target has the lock once it connects.
    let mut conn = site.relay.accept().await;
    conn.welcome(ChainPos::default()).await;
    let second = super::testutil::Running::start(site.cfg.clone());
    let e = second.finish().await.unwrap_err();
    assert!(matches!(e, TargetError::Locked { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Config);
    t.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_relay_is_unreachable_is_clean() {
    let mut site = Site::new(&["g1"]).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    site.cfg.target.relay = format!("127.0.0.1:{port}");
    let t = site.start();
    let st = wait_status(&site.status_path(), |s| !s.groups.is_empty()).await;
    assert!(!st.groups[0].connected);
    t.stop().await.unwrap();
    let st = read_status(&site);
    assert_eq!(st.groups[0].watermark.frame_no, 0);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!((log.starts, log.applies), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_an_oversized_disk_id_is_refused() {
    let mut site = Site::new(&["g1"]).await;
    site.add_disk("g1", 70_000);
    let e = site.start().finish().await.unwrap_err();
    // The config validator refuses it before anything starts.
    assert!(matches!(e, TargetError::Config(_)), "{e}");
    assert!(e.to_string().contains("70000 is above 65535"), "{e}");
}

/// Append `sealed` frames to group g1's redo journal in `gdir` (a fresh one).
fn journal(gdir: &std::path::Path, sealed: Vec<Vec<u8>>) {
    let (redo, reset) = super::redo::Redo::open(gdir, "g1", 0).expect("open redo");
    assert!(reset.is_none());
    for b in sealed {
        redo.append_blocking(&std::sync::Arc::new(b))
            .expect("append");
    }
}

/// The last frame in group g1's redo journal in `gdir`.
fn redo_head(gdir: &std::path::Path) -> u64 {
    super::redo::Redo::open(gdir, "g1", 0)
        .expect("open redo")
        .0
        .head()
}

/// The frames of the redo journal after the watermark are applied at start,
/// without the relay: a crash left the replica partly written (here: garbage
/// where the frames write), the replay makes it equal the frames' result and
/// moves the watermark to the journal's last frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redo_journal_is_replayed_at_start_without_the_relay() {
    let mut site = Site::new(&["g1"]).await;
    let replica = site.replica("g1", 0);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    site.cfg.target.relay = format!("127.0.0.1:{port}");
    let mut c = site.chain("g1");
    let size = 4 * MIB;
    let mut rng = Prng::new(11);
    let mut frames = vec![c.w(&[Rec::Size(0, size)])];
    for i in 0..6 {
        let recs = random_records(&mut rng, 100 + i, &[0], size, 12);
        frames.push(c.w(&recs));
    }
    let (gdir, sealed) = (
        site.group_dir("g1"),
        frames.iter().map(|f| f.bytes.clone()).collect::<Vec<_>>(),
    );
    let head = tokio::task::spawn_blocking(move || {
        journal(&gdir, sealed);
        redo_head(&gdir)
    })
    .await
    .unwrap();
    assert_eq!(head, c.tip.frame_no);
    // A torn apply: the replica exists, with garbage in places the frames write.
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    std::fs::write(&replica, data(999, size as usize)).unwrap();
    let t = site.start();
    let st = wait_status(&site.status_path(), |s| {
        s.groups
            .first()
            .is_some_and(|g| g.watermark.frame_no == c.tip.frame_no)
    })
    .await;
    assert_eq!(st.groups[0].redo_replayed, frames.len() as u64);
    assert!(!st.groups[0].connected);
    t.stop().await.unwrap();
    // Bytes no frame wrote keep the garbage: only what the frames wrote is
    // compared, by building the expectation on top of the garbage.
    let mut want = data(999, size as usize);
    let model = &c.model[&0];
    // What the frames cover, from the records generated above (same seeds).
    let mut touched = vec![false; size as usize];
    let mut rng = Prng::new(11);
    for i in 0..6 {
        for r in random_records(&mut rng, 100 + i, &[0], size, 12) {
            match r {
                Rec::Write(_, off, d) => touched[off as usize..off as usize + d.len()].fill(true),
                Rec::Zero(_, off, len) => {
                    touched[off as usize..off as usize + len as usize].fill(true)
                }
                Rec::Size(..) | Rec::Note(..) => {}
            }
        }
    }
    for (i, t) in touched.iter().enumerate() {
        if *t {
            want[i] = model[i];
        }
    }
    assert_replica(&replica, &want);
    assert_eq!(watermark_of(&site, "g1"), c.tip);
    let log = check_apply_log(&site.group_dir("g1").join(APPLY_LOG)).unwrap();
    assert_eq!(log.applies, frames.len() as u64);
}

/// A frame of the redo journal that does not open (its tag altered after it
/// was journaled) stops the replay with an error naming the frame; the
/// watermark does not pass it and the journal keeps every frame (nothing is
/// trimmed past the watermark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redo_frame_that_does_not_open_stops_the_replay_naming_it() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let size = 4 * MIB;
    let mut rng = Prng::new(12);
    let mut frames = vec![c.w(&[Rec::Size(0, size)])];
    for i in 0..5 {
        let recs = random_records(&mut rng, 200 + i, &[0], size, 8);
        frames.push(c.w(&recs));
    }
    let bad = frames[3].header.frame_no;
    let mut sealed: Vec<Vec<u8>> = frames.iter().map(|f| f.bytes.clone()).collect();
    *sealed[3].last_mut().unwrap() ^= 1;
    let (gdir, cfg) = (site.group_dir("g1"), site.cfg.clone());
    let (err, head) = tokio::task::spawn_blocking(move || {
        journal(&gdir, sealed);
        let err = super::run_group_offline(&cfg, "g1").expect_err("a frame does not open");
        (err, redo_head(&gdir))
    })
    .await
    .unwrap();
    assert!(matches!(err, TargetError::Redo { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("frame {bad} does not open")),
        "{err}"
    );
    assert_eq!(head, c.tip.frame_no, "the journal keeps every frame");
    assert!(watermark_of(&site, "g1").frame_no < bad);
}

/// A journaled frame the apply refuses (a write to a disk the group does not
/// have) ends the replay with that error while the replay's reader is still
/// ahead of it, blocked on a full queue: the reader ends too, nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redo_frame_the_apply_refuses_ends_the_replay_and_its_reader() {
    let site = Site::new(&["g1"]).await;
    let mut c = site.chain("g1");
    let size = 4 * MIB;
    let mut rng = Prng::new(13);
    let mut frames = vec![c.w(&[Rec::Size(0, size)])];
    frames.push(c.w(&[Rec::Size(9, size), Rec::Write(9, 0, data(1, 4096))]));
    for i in 0..24 {
        let recs = random_records(&mut rng, 300 + i, &[0], size, 4);
        frames.push(c.w(&recs));
    }
    let sealed: Vec<Vec<u8>> = frames.iter().map(|f| f.bytes.clone()).collect();
    let (gdir, cfg) = (site.group_dir("g1"), site.cfg.clone());
    let err = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            journal(&gdir, sealed);
            super::run_group_offline(&cfg, "g1").expect_err("disk 9 is not in the group")
        }),
    )
    .await
    .expect("the replay ends")
    .unwrap();
    assert!(matches!(err, TargetError::Replay { .. }), "{err}");
    assert!(err.to_string().contains("disk 9"), "{err}");
}

/// A VMDK replica that is not a valid VMDK (here: garbage where its header
/// should be) stops the target at start with an error naming the file, and
/// the file is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_vmdk_replica_is_refused_at_start_and_left_alone() {
    let mut site = Site::new(&["g1"]).await;
    let replica = site.replica("g1", 0);
    site.cfg.groups[0].disks[0].format = crate::config::ReplicaFormat::Vmdk;
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let garbage = data(5, 1 << 20);
    std::fs::write(&replica, &garbage).unwrap();
    let e = site.start().finish().await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&replica.display().to_string()), "{msg}");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{msg}");
    assert_eq!(std::fs::read(&replica).unwrap(), garbage);
}
