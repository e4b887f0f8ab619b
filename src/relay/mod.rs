//! The relay (process server): accepts agents and targets over mutual TLS,
//! spools sealed frames durably ([`crate::spool`]), and forwards them to the target.
//! It reads frame headers only; it never holds a data key.

mod hub;
mod server;
mod session;

pub use hub::GroupCountersView;
pub use server::{RelayError, RelayGroupStatus, RelayStatus, run};
pub use session::SessionError;
