//! Transport: mutual TLS on every hop ([`tls`]), the session protocol on top of
//! it ([`wire`]), the reader and writer tasks of a connection ([`conn`]), the
//! client side of opening a session ([`client`]), and the socket options every
//! session connection gets ([`tcp`]).

pub mod client;
pub mod conn;
pub mod tcp;
pub mod tls;
pub mod wire;
