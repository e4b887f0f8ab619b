//! Error classification shared by every module.
//!
//! Each module has its own `thiserror` enum; all of them implement [`Classify`]
//! so that callers (reconnect loops, the relay's wire replies, the CLI) can decide
//! whether to retry, refuse, or stop without matching on another module's variants.

use std::fmt;

/// What kind of failure an error is, which decides what the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Local I/O failed (disk, socket). Usually retried after a back-off.
    Io,
    /// Input bytes are malformed, truncated or fail an integrity check. Never retried
    /// with the same bytes; the input is refused and nothing is applied from it.
    Corrupt,
    /// Authentication or authorization failed (certificate, wrong key, wrong group).
    /// Reported, never retried automatically.
    Auth,
    /// The peer misbehaved or went away (protocol violation, closed connection).
    /// The connection is dropped and re-established with back-off.
    Peer,
    /// A configuration file or option is invalid. Fatal at start-up.
    Config,
    /// The peer asked us to slow down. Retried after the advised delay.
    Throttled,
    /// The process is shutting down. Not an error to report.
    Shutdown,
}

impl ErrorKind {
    /// True when retrying the same operation later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Io | ErrorKind::Peer | ErrorKind::Throttled)
    }

    /// Stable short name used in logs, metrics and wire error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Auth => "auth",
            ErrorKind::Peer => "peer",
            ErrorKind::Config => "config",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implemented by every module error so callers can classify it.
pub trait Classify {
    /// The kind of this error.
    fn kind(&self) -> ErrorKind;
}

impl Classify for std::io::Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Io
    }
}
