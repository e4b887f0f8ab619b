//! How fast one core computes resync block digests, per block size, and how
//! much digest traffic each block size costs: the measurement behind the
//! 64 KiB default (docs/RESYNC.md, "Choosing the block size").
//!
//! Hashes `MIB` MiB (default 256) of half-compressible data (the bench's data
//! generator at 50 %) from memory with `tidemark::resync::digest_block`
//! (a zero check, then the BLAKE3 keyed hash) at 16 KiB, 64 KiB, 256 KiB and
//! 1 MiB blocks; best of `ROUNDS` (default 3) passes.
//!
//! ```text
//! cargo run --release --example digest_speed [MIB] [ROUNDS]
//! ```

use std::hint::black_box;
use std::time::Instant;

use tidemark::resync::{BlockDigest, DigestKey, digest_block};
use tidemark::util::datagen;
use tidemark::util::prng::Prng;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let data = datagen::generate(mib << 20, 50, &mut Prng::new(1));
    let key = DigestKey::from_bytes([0x5a; 32]);
    println!(
        "{mib} MiB of 50 % compressible data, one thread, best of {rounds}; \
         digest traffic = 33 bytes per block (kind byte + 32-byte hash)"
    );
    println!(
        "{:>10} {:>10} {:>16} {:>22}",
        "block", "GB/s", "digest KiB/GiB", "resent per diff block"
    );
    for kib in [16usize, 64, 256, 1024] {
        let bs = kib << 10;
        let mut best = f64::INFINITY;
        for _ in 0..rounds.max(1) {
            let t = Instant::now();
            let mut hashes = 0usize;
            for block in data.chunks(bs) {
                if let BlockDigest::Hash(h) = digest_block(&key, black_box(block)) {
                    hashes += usize::from(h[0] & 1);
                }
            }
            black_box(hashes);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gbps = data.len() as f64 / best / 1e9;
        let per_gib = (1usize << 30) / bs * 33;
        println!(
            "{:>7} KiB {gbps:>10.2} {:>16.1} {:>18} KiB",
            kib,
            per_gib as f64 / 1024.0,
            kib
        );
    }
}
