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

/// The same bytes [`fill`] would write into a `len`-byte buffer, built by
/// appending: no zeroing pass over memory that is overwritten anyway (the
/// workload generates every write this way).
pub fn generate(len: usize, compressibility: u8, rng: &mut Prng) -> Vec<u8> {
    let pct = compressibility.min(100) as usize;
    let mut out = Vec::with_capacity(len);
    let mut left = len;
    while left > 0 {
        let block = left.min(BLOCK);
        let random_len = block * (100 - pct) / 100;
        // Generated in an L1-resident scratch block, then appended in one copy.
        let mut tmp = [0u8; BLOCK];
        rng.fill(&mut tmp[..random_len]);
        out.extend_from_slice(&tmp[..random_len]);
        let v = rng.next_u64() as u8;
        out.resize(out.len() + block - random_len, v);
        left -= block;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_equals_fill() {
        for (len, pct) in [
            (0, 50),
            (1, 0),
            (4095, 50),
            (4096, 33),
            (65536 + 77, 50),
            (9000, 100),
        ] {
            let mut a = Prng::new(42);
            let mut b = Prng::new(42);
            let mut want = vec![0u8; len];
            fill(&mut want, pct, &mut a);
            assert_eq!(generate(len, pct, &mut b), want, "len {len} pct {pct}");
            assert_eq!(a.next_u64(), b.next_u64(), "same generator state after");
        }
    }

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
