//! Transport: mutual TLS on every hop ([`tls`]), the session protocol on top of
//! it ([`wire`]), and the client side of opening a session ([`client`]).

pub mod client;
pub mod tls;
pub mod wire;
