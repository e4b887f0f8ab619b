//! NBD wire constants and the transmission phase without sockets: the request
//! header parser, the simple-reply encoder, and the validation that turns a
//! request into a [`Command`] or a [`Refusal`].
//!
//! Everything here is a pure function of bytes and limits, so it is tested
//! byte for byte and by property tests; the server only pumps bytes through it.
//! Numbers are big-endian on the wire, as the protocol says.

use std::fmt;

// ---------------------------------------------------------------------------
// Handshake constants.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second half of the greeting, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the session.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe one export.
pub const OPT_INFO: u32 = 6;
/// Option: describe one export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (refused here).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts (refused here).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts (refused here).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (refused here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of information about an export.
pub const REP_INFO: u32 = 3;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Error reply: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Error reply: known but forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Error reply: known but malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Error reply: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Error reply: TLS must be started first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Error reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Error reply: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Error reply: the client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Error reply: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information type: size and transmission flags (always sent).
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission constants.

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium (never set here).
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` (structured replies only; never set).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush and FUA are visible across all connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is advertised (never set here).
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` (never set here).
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Magic of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Size of a request header (compact headers; extended headers are refused).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload of `length` bytes follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (needs a metadata context; refused here).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (experimental; unknown here).
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without punching a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment (structured replies only).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent only (block status only).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes unless fast (not advertised).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: payload length in an extended header (not negotiated).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Limits.

/// Minimum block size advertised and enforced: offsets and lengths are
/// multiples of it (a request may end exactly at an unaligned export end).
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size advertised (the page size: no read-modify-write in the
/// page cache below it).
pub const PREFERRED_BLOCK: u32 = 4096;
/// Default largest READ/WRITE payload: 32 MiB, the size the NBD spec tells
/// portable clients never to exceed.
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;
/// Upper bound for a configured request limit.
pub const MAX_REQUEST_LIMIT: u32 = 128 << 20;
/// Largest WRITE payload that is read and discarded to keep the stream in sync
/// when the write is refused; a larger one drops the connection.
pub const WRITE_DISCARD_MAX: u32 = 256 << 20;

/// Map a Linux errno (from [`crate::frontend::IoError::errno`]) onto the NBD
/// error values; anything without an NBD counterpart is `NBD_EIO`. `EDQUOT`
/// and `EFBIG` become `NBD_ENOSPC` as the spec asks.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// Name of an NBD error value, for logs.
pub fn error_name(error: u32) -> &'static str {
    match error {
        0 => "ok",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}

/// Name of a command type, for logs.
pub fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        CMD_RESIZE => "resize",
        _ => "unknown",
    }
}

/// The transmission flags of an export: flush, FUA, trim and write zeroes, and
/// multi-conn (see the module docs of [`super`] for why that is true); only
/// the read flags when the export is read-only.
pub fn transmission_flags(read_only: bool) -> u16 {
    let base = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if read_only {
        base | TFLAG_READ_ONLY
    } else {
        base | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    }
}

// ---------------------------------------------------------------------------
// Requests.

/// A request header as it came off the wire (magic already checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// Opaque cookie (the spec's "handle"), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire: `len` for a
    /// WRITE, nothing otherwise (whether or not the request is valid).
    pub fn payload_len(&self) -> u32 {
        if self.typ == CMD_WRITE { self.len } else { 0 }
    }

    /// Encode (for tests and clients).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.typ.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }
}

/// A request header that cannot be parsed: the stream is out of sync and the
/// connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x} (expected {REQUEST_MAGIC:#010x})")]
pub struct BadMagic(pub u32);

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parse a request header from the start of `buf`. `Ok(None)` means
/// incomplete (fewer than 28 bytes); a wrong magic is an error.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHeader>, BadMagic> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = be32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    Ok(Some(RequestHeader {
        flags: be16(buf, 4),
        typ: be16(buf, 6),
        cookie: be64(buf, 8),
        offset: be64(buf, 16),
        len: be32(buf, 24),
    }))
}

/// Append a simple reply header (`error` 0 for success).
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// What an export allows, for [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Largest READ/WRITE length.
    pub max_request: u32,
    /// Writes, trims and write-zeroes are refused with `NBD_EPERM`.
    pub read_only: bool,
}

/// A valid request, ready for the backing disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the `len` payload bytes that follow.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// False with `NBD_CMD_FLAG_NO_HOLE`: the range stays allocated.
        may_unmap: bool,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch hint: answered with success without touching the disk (the
    /// backing disk's page cache is the only cache; not advertised).
    Cache,
    /// End of the session, after in-flight requests.
    Disconnect,
}

/// Why a request is refused (it gets an error reply; the session goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Zero-length read, write, trim, write-zeroes or cache.
    ZeroLength,
    /// Offset or length not a multiple of [`MIN_BLOCK`].
    Unaligned,
    /// The range reaches past the end of the export.
    BeyondEnd {
        /// Export size.
        size: u64,
    },
    /// READ/WRITE longer than the server's limit.
    TooLarge {
        /// The limit.
        max: u32,
    },
    /// A write-type command on a read-only export.
    ReadOnly,
    /// FLUSH with a nonzero offset or length.
    FlushArgs,
    /// A command flag not valid for this command (or not negotiated).
    BadFlags {
        /// The offending flags.
        flags: u16,
    },
    /// BLOCK_STATUS without a negotiated metadata context.
    NoMetaContext,
    /// Unknown command type.
    UnknownCommand,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ZeroLength => f.write_str("zero-length request"),
            Refusal::Unaligned => write!(f, "offset or length not a multiple of {MIN_BLOCK}"),
            Refusal::BeyondEnd { size } => write!(f, "beyond the end of the export ({size} bytes)"),
            Refusal::TooLarge { max } => write!(f, "longer than the server's limit of {max} bytes"),
            Refusal::ReadOnly => f.write_str("the export is read-only"),
            Refusal::FlushArgs => f.write_str("flush with nonzero offset or length"),
            Refusal::BadFlags { flags } => {
                write!(f, "command flags {flags:#06x} not valid for this command")
            }
            Refusal::NoMetaContext => f.write_str("block status without a metadata context"),
            Refusal::UnknownCommand => f.write_str("unknown command"),
        }
    }
}

/// A refused request: the reason and the error value for the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub reason: Refusal,
    /// The NBD error value to send.
    pub error: u32,
}

fn refuse(reason: Refusal) -> Refused {
    let error = match reason {
        Refusal::ReadOnly => NBD_EPERM,
        _ => NBD_EINVAL,
    };
    Refused { reason, error }
}

/// The commands that address a range.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ranged {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Cache,
}

/// Check a request against the export's limits.
///
/// Order of checks: command type and flags, read-only, zero length, alignment,
/// size limit (READ/WRITE only: the other commands carry no payload), range.
/// A write or write-zeroes beyond the end is `NBD_ENOSPC`, every other range
/// error `NBD_EINVAL`, as the spec asks; a write-type command on a read-only
/// export is `NBD_EPERM`.
pub fn validate(h: &RequestHeader, lim: &Limits) -> Result<Command, Refused> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    // FUA is valid on every command (the spec: clients are known to set it
    // everywhere); NO_HOLE only on WRITE_ZEROES; nothing else was negotiated.
    let (kind, allowed) = match h.typ {
        CMD_READ => (Ranged::Read, CMD_FLAG_FUA),
        CMD_WRITE => (Ranged::Write, CMD_FLAG_FUA),
        CMD_TRIM => (Ranged::Trim, CMD_FLAG_FUA),
        CMD_WRITE_ZEROES => (Ranged::WriteZeroes, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE),
        CMD_CACHE => (Ranged::Cache, CMD_FLAG_FUA),
        // No reply to a disconnect: its flags and fields cannot be refused.
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => {
            return if h.flags & !CMD_FLAG_FUA != 0 {
                Err(refuse(Refusal::BadFlags {
                    flags: h.flags & !CMD_FLAG_FUA,
                }))
            } else if h.offset != 0 || h.len != 0 {
                Err(refuse(Refusal::FlushArgs))
            } else {
                Ok(Command::Flush)
            };
        }
        CMD_BLOCK_STATUS => return Err(refuse(Refusal::NoMetaContext)),
        _ => return Err(refuse(Refusal::UnknownCommand)),
    };
    if h.flags & !allowed != 0 {
        return Err(refuse(Refusal::BadFlags {
            flags: h.flags & !allowed,
        }));
    }
    let writes = matches!(kind, Ranged::Write | Ranged::Trim | Ranged::WriteZeroes);
    if writes && lim.read_only {
        return Err(refuse(Refusal::ReadOnly));
    }
    if h.len == 0 {
        return Err(refuse(Refusal::ZeroLength));
    }
    let end = h.offset.checked_add(u64::from(h.len));
    // A request may end exactly at the export's end even when the size is not
    // a multiple of the block size (otherwise the tail would be unreachable).
    let ends_at_size = end == Some(lim.size);
    let block = u64::from(MIN_BLOCK);
    if !h.offset.is_multiple_of(block) || (!u64::from(h.len).is_multiple_of(block) && !ends_at_size)
    {
        return Err(refuse(Refusal::Unaligned));
    }
    if matches!(kind, Ranged::Read | Ranged::Write) && h.len > lim.max_request {
        return Err(refuse(Refusal::TooLarge {
            max: lim.max_request,
        }));
    }
    if end.is_none_or(|e| e > lim.size) {
        let reason = Refusal::BeyondEnd { size: lim.size };
        let error = match kind {
            Ranged::Write | Ranged::WriteZeroes => NBD_ENOSPC,
            _ => NBD_EINVAL,
        };
        return Err(Refused { reason, error });
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match kind {
        Ranged::Read => Command::Read { offset, len },
        Ranged::Write => Command::Write { offset, len, fua },
        Ranged::Trim => Command::Trim { offset, len, fua },
        Ranged::WriteZeroes => Command::WriteZeroes {
            offset,
            len,
            may_unmap: h.flags & CMD_FLAG_NO_HOLE == 0,
            fua,
        },
        Ranged::Cache => Command::Cache,
    })
}

/// What to do with the payload of a refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// No payload follows.
    None,
    /// Read and discard this many bytes, then reply with the error.
    Discard(u32),
    /// The payload is too large to skip: drop the connection.
    Drop,
}

/// The payload policy for a refused request `h`.
pub fn refused_payload(h: &RequestHeader) -> Payload {
    match h.payload_len() {
        0 => Payload::None,
        n if n <= WRITE_DISCARD_MAX => Payload::Discard(n),
        _ => Payload::Drop,
    }
}
