//! Carrying frames between roles: mutual TLS on every hop.

pub mod tls;
