//! Checksum resync and online verify: the pure core, not yet wired into the
//! agent, relay or target.
//!
//! The target digests fixed-size blocks of its replica ([`digest_range`]:
//! unallocated blocks cost nothing), sends them in [`DigestChunk`] messages
//! (sealed, through the relay, which learns nothing: the digests are keyed
//! hashes, see [`DigestKey`]); the agent digests the same blocks of its disk
//! ([`digest_block`]), finds the differing runs ([`diff`]) and sends only those
//! as M frames. [`ResyncProgress`] persists which chunks are done so an
//! interrupted resync resumes. Online verify is the same compare without
//! sending data. Formats and the choice of the block size: docs/RESYNC.md.

pub mod client;
pub mod compare;
pub mod digest;
pub mod msg;
pub mod wire;

pub use client::{DigestClient, Digests, FetchError, Prefetch, Ticket};
pub use compare::{Chunk, DiffError, ProgressError, ResyncPlan, ResyncProgress, diff};
pub use digest::{
    BlockDigest, BlockSize, BlockSizeError, DEFAULT_BLOCK_BYTES, DigestError, DigestKey,
    digest_block, digest_range,
};
pub use msg::{DigestRequest, MsgBody, MsgCipher, MsgError, MsgHeader, MsgKind, Purpose};
pub use wire::{DigestChunk, MAX_CHUNK_BLOCKS, WireError};
