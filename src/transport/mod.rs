//! Transport: mutual TLS on every hop ([`tls`]) and the session protocol on top
//! of it ([`wire`]).

pub mod tls;
pub mod wire;
