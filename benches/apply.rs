//! Apply throughput of the image engines: batches of 64 random 64 KiB writes
//! (4 MiB) over a 256 MiB raw image, each batch followed by a flush (fdatasync),
//! io_uring against the plain pwrite engine.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidemark::image::{Engine, ImageFormat, ImageSpec, WriteOp, open_image};
use tidemark::util::prng::Prng;

const IMAGE_SIZE: u64 = 256 << 20;
const WRITE_SIZE: usize = 64 << 10;
const BATCH: usize = 64;

fn apply(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Prng::new(42);
    let mut data = vec![0u8; WRITE_SIZE * BATCH];
    rng.fill(&mut data);

    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Bytes((WRITE_SIZE * BATCH) as u64));
    group.sample_size(20);
    for engine in [Engine::Uring, Engine::Sync] {
        let spec = ImageSpec {
            path: dir.path().join(format!("{engine}.img")),
            format: ImageFormat::Raw,
            engine,
            create_size: Some(IMAGE_SIZE),
            direct_io: tidemark::image::DirectIo::Off,
        };
        let mut image = match open_image(&spec) {
            Ok(image) => image,
            Err(e) => {
                eprintln!("skipping {engine}: {e}");
                continue;
            }
        };
        // Allocate the whole image first, so both engines overwrite in place.
        for chunk in 0..IMAGE_SIZE / data.len() as u64 {
            let ops = [WriteOp::Write {
                offset: chunk * data.len() as u64,
                data: &data,
            }];
            image.write_batch(&ops).expect("prefill");
        }
        image.flush().expect("prefill flush");

        let slots = (IMAGE_SIZE - WRITE_SIZE as u64) / 4096;
        group.bench_function(format!("{engine}/64x64KiB+flush"), |b| {
            b.iter(|| {
                let ops: Vec<WriteOp<'_>> = data
                    .chunks_exact(WRITE_SIZE)
                    .map(|chunk| WriteOp::Write {
                        offset: rng.below(slots) * 4096,
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
