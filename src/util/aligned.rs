//! Block-aligned memory for direct I/O (`O_DIRECT`), without unsafe code.
//!
//! Direct I/O needs file offsets, lengths and buffer addresses aligned to the
//! device's logical block size; [`BLOCK`] (4096) covers 512- and 4096-byte
//! devices. Used by the relay's spool and by the raw image format.

/// Alignment of every direct read and write: offset, length and buffer address.
pub const BLOCK: usize = 4096;
const BLOCK_U64: u64 = BLOCK as u64;

/// One 4096-byte block with 4096-byte alignment, so a `Vec<Block>` is a
/// correctly aligned buffer for direct I/O.
#[repr(C, align(4096))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Block([u8; BLOCK]);

/// A zero-initialised heap buffer of whole, aligned blocks.
pub struct AlignedBuf {
    blocks: Vec<Block>,
}

impl AlignedBuf {
    /// A buffer of at least `bytes` bytes (rounded up to whole blocks, at least one).
    pub fn new(bytes: usize) -> Self {
        let n = ceil_usize(bytes).max(BLOCK) / BLOCK;
        AlignedBuf {
            blocks: vec![bytemuck::Zeroable::zeroed(); n],
        }
    }

    /// Capacity in bytes (a multiple of [`BLOCK`]).
    pub fn len(&self) -> usize {
        self.blocks.len() * BLOCK
    }

    /// True when the buffer has no blocks (never, after `new`).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Grow (never shrink) to at least `bytes` bytes, keeping the contents.
    pub fn reserve(&mut self, bytes: usize) {
        let n = ceil_usize(bytes) / BLOCK;
        if n > self.blocks.len() {
            self.blocks.resize(n, bytemuck::Zeroable::zeroed());
        }
    }

    /// Shrink to `bytes` (rounded up to whole blocks) if it is larger, releasing
    /// the memory.
    pub fn shrink_to(&mut self, bytes: usize) {
        let n = (ceil_usize(bytes) / BLOCK).max(1);
        if n < self.blocks.len() {
            self.blocks.truncate(n);
            self.blocks.shrink_to_fit();
        }
    }

    /// The whole buffer as bytes.
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.blocks)
    }

    /// The whole buffer as mutable bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.blocks)
    }
}

/// True when a read of `buf` at file `offset` may use `O_DIRECT`: offset,
/// length and buffer address all multiples of [`BLOCK`].
pub fn direct_ok(offset: u64, buf: &[u8]) -> bool {
    offset.is_multiple_of(BLOCK as u64)
        && buf.len().is_multiple_of(BLOCK)
        && (buf.as_ptr() as usize).is_multiple_of(BLOCK)
}

/// `x` rounded down to a block boundary.
pub fn floor(x: u64) -> u64 {
    x & !(BLOCK_U64 - 1)
}

/// `x` rounded up to a block boundary.
pub fn ceil(x: u64) -> u64 {
    x.div_ceil(BLOCK_U64) * BLOCK_U64
}

/// `x` rounded up to a block boundary.
pub fn ceil_usize(x: usize) -> usize {
    x.div_ceil(BLOCK) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_keep_contents_when_grown() {
        let mut b = AlignedBuf::new(1);
        assert_eq!(b.len(), BLOCK);
        assert_eq!(b.bytes().as_ptr() as usize % BLOCK, 0);
        b.bytes_mut()[10] = 7;
        b.reserve(3 * BLOCK + 1);
        assert_eq!(b.len(), 4 * BLOCK);
        assert_eq!(b.bytes().as_ptr() as usize % BLOCK, 0);
        assert_eq!(b.bytes()[10], 7);
        b.shrink_to(1);
        assert_eq!(b.len(), BLOCK);
        assert_eq!((floor(4097), ceil(4097), ceil_usize(0)), (4096, 8192, 0));
    }
}
