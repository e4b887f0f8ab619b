//! Transport: mutual TLS on every hop and the session protocol on top of it.

pub mod wire;
