//! 4 KiB random writes applied through a raw image and through a
//! monolithicSparse VMDK on the same workload: batches of 64 writes, each
//! batch followed by a flush (fdatasync), on io_uring.
//!
//! - `first-touch`: every write lands in a grain (64 KiB) never written
//!   before, so the VMDK allocates a grain, syncs the data, then writes both
//!   grain-table entries; the raw file fills a hole.
//! - `overwrite`: writes land in a 256 MiB region written in full beforehand,
//!   so both overwrite in place (the VMDK after a grain-table lookup).
//!
//! `cargo bench --bench vmdk_apply`; the product's bar is VMDK ≥ 0.6× raw.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidemark::image::{Engine, Image, ImageFormat, ImageSpec, WriteOp, open_image};
use tidemark::util::prng::Prng;

const WRITE: usize = 4096;
const BATCH: usize = 64;
const GRAIN: u64 = 64 << 10;
/// Virtual size of the first-touch images: 2^24 grains, never exhausted.
const BIG: u64 = 1 << 40;
/// Region written in full before the overwrite runs.
const HOT: u64 = 256 << 20;

fn open(dir: &std::path::Path, name: &str, format: ImageFormat, size: u64) -> Box<dyn Image> {
    open_image(&ImageSpec {
        path: dir.join(name),
        format,
        engine: Engine::Uring,
        create_size: Some(size),
        direct_io: tidemark::image::DirectIo::Off,
    })
    .expect("open image")
}

fn apply(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut data = vec![0u8; WRITE * BATCH];
    Prng::new(1).fill(&mut data);
    let formats = [
        ("raw", ImageFormat::Raw),
        ("vmdk-sparse", ImageFormat::VmdkSparse),
    ];

    let mut group = c.benchmark_group("apply-4KiB");
    group.throughput(Throughput::Bytes((WRITE * BATCH) as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));

    for (name, format) in formats {
        let mut image = open(dir.path(), &format!("first-{name}"), format, BIG);
        let grains = BIG / GRAIN;
        let mut n: u64 = 0;
        let mut rng = Prng::new(2);
        group.bench_function(format!("{name}/first-touch"), |b| {
            b.iter(|| {
                let ops: Vec<WriteOp<'_>> = data
                    .chunks_exact(WRITE)
                    .map(|chunk| {
                        // An odd multiplier permutes the grains: no grain twice.
                        let grain = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % grains;
                        n += 1;
                        let within = rng.below(GRAIN / WRITE as u64) * WRITE as u64;
                        WriteOp::Write {
                            offset: grain * GRAIN + within,
                            data: chunk,
                        }
                    })
                    .collect();
                image.write_batch(black_box(&ops)).expect("write batch");
                image.flush().expect("flush");
            })
        });
    }

    for (name, format) in formats {
        let mut image = open(dir.path(), &format!("over-{name}"), format, HOT);
        let fill = vec![7u8; 4 << 20];
        for chunk in 0..HOT / fill.len() as u64 {
            let ops = [WriteOp::Write {
                offset: chunk * fill.len() as u64,
                data: &fill,
            }];
            image.write_batch(&ops).expect("prefill");
        }
        image.flush().expect("prefill flush");
        let mut rng = Prng::new(3);
        group.bench_function(format!("{name}/overwrite"), |b| {
            b.iter(|| {
                let ops: Vec<WriteOp<'_>> = data
                    .chunks_exact(WRITE)
                    .map(|chunk| WriteOp::Write {
                        offset: rng.below(HOT / WRITE as u64) * WRITE as u64,
                        data: chunk,
                    })
                    .collect();
                image.write_batch(black_box(&ops)).expect("write batch");
                image.flush().expect("flush");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
