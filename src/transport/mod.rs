//! Transport: mutual TLS on every hop ([`tls`]), the session protocol on top of
//! it ([`wire`]), the reader and writer tasks of a connection ([`conn`]), and the
//! client side of opening a session ([`client`]).

pub mod client;
pub mod conn;
pub mod tls;
pub mod wire;
