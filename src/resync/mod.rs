//! Checksum resync and online verify: digests, their messages and the
//! agent's client for them (the agent's drainer and verify, and the target's
//! digest service, use this core).
//!
//! The target digests fixed-size blocks of its replica ([`digest_range`]:
//! unallocated blocks cost nothing), sends them in [`DigestChunk`] messages
//! (sealed, through the relay, which learns nothing: the digests are keyed
//! hashes, see [`DigestKey`]); the agent digests the same blocks of its disk
//! ([`digest_block`]), finds the differing runs ([`diff`]) and sends only those
//! as M frames; the agent's dirty log keeps what is still to compare, so an
//! interrupted resync resumes. Online verify is the same compare without
//! sending data. Formats and the choice of the block size: docs/RESYNC.md.

pub mod client;
pub mod compare;
pub mod digest;
pub mod msg;
pub mod wire;

pub use client::{DigestClient, Digests, FetchError, PREFETCH_DEPTH, Prefetch, Ticket};
pub use compare::{DiffError, diff};
pub use digest::{
    BlockDigest, BlockSize, BlockSizeError, DEFAULT_BLOCK_BYTES, DigestError, DigestKey,
    digest_block, digest_range,
};
pub use msg::{DigestRequest, MsgBody, MsgCipher, MsgError, MsgHeader, MsgKind, Purpose};
pub use wire::{DigestChunk, MAX_CHUNK_BLOCKS, WireError};
