//! tidemark: continuous, crash-consistent block replication for Linux.
//!
//! The module tree follows the data path: a write is recorded by [`capture`],
//! batched, compressed and sealed into a [`frame`] by the [`agent`], carried over
//! mutual TLS by [`transport`] to the [`relay`], which keeps it durably in a
//! [`spool`] and forwards it to the [`target`], which keeps it in a redo spool of
//! its own and applies it in chain order to an [`image`]. [`bench`](mod@bench) runs all of it on one machine.
//! [`resync`] holds the core of checksum resync and verify (not yet wired in).
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod error;
pub mod util;

pub mod config;
pub mod pki;

pub mod capture;
pub mod frame;
pub mod frontend;
pub mod spool;
pub mod transport;

pub mod agent;
pub mod relay;
pub mod target;

pub mod image;
pub mod resync;

pub mod bench;
