//! Synthetic block data with a chosen compressibility.
//!
//! Compressibility `p` % means: in every 4 KiB block, the first `100 - p` % of the
//! bytes are random (incompressible) and the remaining `p` % repeat one byte value
//! that differs per block. zstd then stores roughly `100 - p` % of the input, so
//! `p = 50` gives a compression ratio close to 2. The same generator feeds the
//! bench workload and the bench's per-stage cost measurement, so both see the same
//! kind of data.

use super::prng::Prng;

/// Granularity at which the random/repetitive split is applied.
pub const BLOCK: usize = 4096;

/// Fill `buf` with data that compresses to about `100 - compressibility` % of its
/// size. `compressibility` is clamped to 0..=100.
pub fn fill(buf: &mut [u8], compressibility: u8, rng: &mut Prng) {
    let pct = compressibility.min(100) as usize;
    for block in buf.chunks_mut(BLOCK) {
        let random_len = block.len() * (100 - pct) / 100;
        let (random, repeated) = block.split_at_mut(random_len);
        rng.fill(random);
        let v = rng.next_u64() as u8;
        repeated.fill(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressibility_controls_the_random_share() {
        let mut rng = Prng::new(3);
        let mut buf = vec![0u8; 64 * 1024];
        fill(&mut buf, 50, &mut rng);
        let c = zstd::bulk::compress(&buf, 1).unwrap();
        let ratio = buf.len() as f64 / c.len() as f64;
        assert!((1.8..2.2).contains(&ratio), "ratio {ratio}");
        fill(&mut buf, 0, &mut rng);
        let c = zstd::bulk::compress(&buf, 1).unwrap();
        assert!(c.len() >= buf.len() - 64);
        fill(&mut buf, 100, &mut rng);
        let c = zstd::bulk::compress(&buf, 1).unwrap();
        assert!(c.len() < buf.len() / 50);
    }
}
