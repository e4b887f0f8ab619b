//! Seal and open throughput of a 4 MiB frame of 64 KiB Write records with 50 %
//! compressible data (`util::datagen::fill`), zstd level 1.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidemark::frame::{DataKey, FrameKind, FrameMeta, GroupName, Opener, RecordRef, Sealer};
use tidemark::util::{datagen, prng::Prng};

const FRAME: usize = 4 << 20;
const RECORD: usize = 64 << 10;

fn bench_frame(c: &mut Criterion) {
    let mut data = vec![0u8; FRAME];
    datagen::fill(&mut data, 50, &mut Prng::new(1));
    let records: Vec<RecordRef<'_>> = data
        .chunks(RECORD)
        .enumerate()
        .map(|(i, d)| RecordRef::write(i as u64 + 1, 0, (i * RECORD) as u64, 1_000 + i as u64, d))
        .collect();
    let key = DataKey::from_bytes([7; 32]);
    let group: GroupName = "bench".parse().unwrap();
    let mut meta = FrameMeta {
        group,
        key_epoch: 1,
        frame_no: 1,
        prev_frame_no: 0,
        prev_last_seq: 0,
        kind: FrameKind::Write,
        heartbeat: false,
        rebase: false,
        time_us: 0,
    };
    let mut sealer = Sealer::new(&key, 1, 1).unwrap();
    let sealed = sealer.seal(&meta, &records).unwrap();
    eprintln!(
        "frame: {} bytes plain, {} stored ({:?})",
        sealed.header.plain_len, sealed.header.stored_len, sealed.header.codec
    );

    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(FRAME as u64));
    g.sample_size(20);
    g.bench_function("seal_4MiB_zstd1", |b| {
        b.iter(|| {
            // Each seal needs a fresh frame number (the sealer refuses repeats).
            meta.frame_no += 1;
            meta.prev_frame_no = meta.frame_no - 1;
            black_box(sealer.seal(&meta, black_box(&records)).unwrap())
        })
    });
    let mut opener = Opener::new(group, vec![(1, key.clone())]).unwrap();
    // The target owns each received frame and opens it in place; the copy that
    // hands the benchmark a fresh buffer per iteration is timed too (a memcpy
    // of ~2 MB, small against the AEAD and zstd).
    g.bench_function("open_4MiB_zstd1", |b| {
        b.iter(|| black_box(opener.open_owned(black_box(sealed.bytes.clone())).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_frame);
criterion_main!(benches);
