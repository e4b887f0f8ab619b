//! Comparing digests: [`diff`] turns the source's and the replica's digest
//! lists of one window into the runs of blocks that differ (online verify
//! reports them; the checksum resync compares block by block as it reads,
//! in `capture::protected`).
//!
//! A resync's progress is not kept here: the pending regions of the agent's
//! dirty log are its record (docs/RESYNC.md, "Restartable").

use std::ops::Range;

use thiserror::Error;

use super::digest::BlockDigest;
use crate::error::{Classify, ErrorKind};

/// Why two digest lists cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiffError {
    /// The lists cover different numbers of blocks.
    #[error("cannot compare {source_len} source digests with {target_len} target digests")]
    LengthMismatch {
        /// Source digests.
        source_len: usize,
        /// Target digests.
        target_len: usize,
    },
    /// `first_block` + the length overflows a u64.
    #[error("blocks from {first_block} (+{len}) overflow a 64-bit block number")]
    Overflow {
        /// First block.
        first_block: u64,
        /// Digests.
        len: usize,
    },
}

impl Classify for DiffError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Corrupt
    }
}

/// The blocks whose digests differ (by [`BlockDigest::same_data`]: Absent =
/// Zero), as sorted, disjoint, merged runs of absolute block numbers; digest
/// `i` of both lists is block `first_block + i`.
pub fn diff(
    first_block: u64,
    source: &[BlockDigest],
    target: &[BlockDigest],
) -> Result<Vec<Range<u64>>, DiffError> {
    if source.len() != target.len() {
        return Err(DiffError::LengthMismatch {
            source_len: source.len(),
            target_len: target.len(),
        });
    }
    if first_block.checked_add(source.len() as u64).is_none() {
        return Err(DiffError::Overflow {
            first_block,
            len: source.len(),
        });
    }
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, (s, t)) in source.iter().zip(target).enumerate() {
        if s.same_data(t) {
            continue;
        }
        let b = first_block + i as u64;
        match out.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => out.push(b..b + 1),
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
