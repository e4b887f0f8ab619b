//! The relay (process server): spools sealed frames durably, forwards them to the target.

pub mod spool;
