//! The fixed-newstyle handshake as a state machine without sockets.
//!
//! [`Handshake::new`] queues the greeting; the server feeds every byte it reads
//! to [`Handshake::feed`], writes out [`Handshake::take_output`] after each
//! call, and acts on the returned [`Status`]: read more, upgrade to TLS, enter
//! transmission, or close. The machine buffers at most one option (its header
//! and up to [`MAX_OPTION_DATA`] bytes of data) plus the bytes of the current
//! call; larger option data is answered with `NBD_REP_ERR_TOO_BIG` and skipped
//! as it arrives, without buffering, up to [`MAX_OPTION_SKIP`] bytes, beyond
//! which the connection is dropped.
//!
//! What is answered how:
//!
//! | option | answer |
//! |---|---|
//! | `EXPORT_NAME` | size, flags, zeros unless `NO_ZEROES`; unknown export (or TLS required and not started): disconnect |
//! | `ABORT` | `ACK`, then close |
//! | `LIST` | one `SERVER` per export, `ACK`; data given: `ERR_INVALID` |
//! | `STARTTLS` | `ACK` then TLS when TLS is configured; `ERR_UNSUP` when not; `ERR_INVALID` when already on or data given |
//! | `INFO`, `GO` | `INFO_EXPORT`, `INFO_NAME` and `INFO_DESCRIPTION` when asked, `INFO_BLOCK_SIZE` always, `ACK`; unknown export: `ERR_UNKNOWN` |
//! | anything else | `ERR_UNSUP` (structured replies, metadata contexts, extended headers…) |
//!
//! With [`TlsMode::Required`], every option but `STARTTLS` and `ABORT` gets
//! `ERR_TLS_REQD` until TLS is up, and `EXPORT_NAME` disconnects.

use std::sync::Arc;

use super::TlsMode;
use super::proto::*;

/// Largest option data buffered and parsed. Every option this server
/// understands fits in a few KiB (a name is at most 4096 bytes).
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Largest option data skipped after an `ERR_TOO_BIG` reply; beyond it the
/// client is dropped.
pub const MAX_OPTION_SKIP: u32 = 1 << 20;
/// Options accepted in one handshake before the client is dropped.
pub const MAX_OPTIONS: u32 = 256;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Size of an option header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;

const TLS_REQD_MSG: &[u8] = b"TLS is required: send NBD_OPT_STARTTLS first";

/// What the handshake knows about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients ask for.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
}

/// The result of a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export.
    pub export: usize,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// The option that ended the handshake (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`).
    pub via: u32,
}

/// What the server must do after [`Handshake::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Write the output, then read and feed more bytes.
    NeedMore,
    /// Write the output (the `ACK`), then run the TLS handshake as server and
    /// call [`Handshake::tls_started`]; further bytes come over TLS.
    StartTls,
    /// Write the output, then enter the transmission phase;
    /// [`Handshake::take_leftover`] holds bytes already read beyond the handshake.
    Ready(Negotiated),
    /// The client aborted: write the output (the `ACK`) and close.
    Aborted,
}

/// A handshake that cannot continue: the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    #[error("client flags {0:#x} lack FIXED_NEWSTYLE (only fixed newstyle is served)")]
    NotFixedNewstyle(u32),
    /// The client set flags this server does not know.
    #[error("client flags {0:#x} include unknown bits")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// Option data too large to skip.
    #[error("option {option} carries {len} bytes of data (limit {MAX_OPTION_SKIP})")]
    OptionTooLarge {
        /// The option.
        option: u32,
        /// Its data length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist.
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` before TLS while TLS is required.
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required")]
    TlsRequired,
    /// Bytes arrived after `NBD_OPT_STARTTLS` before the TLS handshake.
    #[error("{0} bytes sent after NBD_OPT_STARTTLS before its reply (plaintext injection?)")]
    BytesAfterStartTls(usize),
    /// More than [`MAX_OPTIONS`] options.
    #[error("more than {MAX_OPTIONS} options in one handshake")]
    TooManyOptions,
    /// `feed` called after the handshake ended or while TLS is pending.
    #[error("handshake input after the handshake ended or while TLS was pending")]
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Skip { remaining: u32 },
    AwaitTls,
    Done,
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    exports: Arc<[ExportInfo]>,
    tls: TlsMode,
    max_block: u32,
    state: State,
    /// Unparsed input.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    tls_active: bool,
    no_zeroes: bool,
    options: u32,
    refused: Vec<OptionRefusal>,
}

/// An option answered with an error reply, for the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRefusal {
    /// The option.
    pub option: u32,
    /// The error reply type (`NBD_REP_ERR_*`).
    pub reply: u32,
    /// The message sent with it.
    pub message: String,
}

impl Handshake {
    /// A new handshake with the greeting queued. `max_block` is the largest
    /// READ/WRITE length, advertised as the maximum block size. With
    /// [`TlsMode::Off`] `STARTTLS` is unsupported.
    pub fn new(exports: Arc<[ExportInfo]>, tls: TlsMode, max_block: u32) -> Self {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            exports,
            tls,
            max_block,
            state: State::ClientFlags,
            inbuf: Vec::new(),
            out,
            tls_active: false,
            no_zeroes: false,
            options: 0,
            refused: Vec::new(),
        }
    }

    /// The bytes to send, taken out.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The options refused since the last call, taken out (at most one per
    /// option processed).
    pub fn take_refusals(&mut self) -> Vec<OptionRefusal> {
        std::mem::take(&mut self.refused)
    }

    /// Bytes read past the end of the handshake (after [`Status::Ready`]):
    /// the start of the transmission phase.
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.inbuf)
    }

    /// Bytes of input held (at most one option header plus
    /// [`MAX_OPTION_DATA`] between calls).
    pub fn buffered(&self) -> usize {
        self.inbuf.len()
    }

    /// True once TLS is up on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after [`Status::StartTls`] succeeded; options go on.
    pub fn tls_started(&mut self) {
        if self.state == State::AwaitTls {
            self.tls_active = true;
            self.state = State::Options;
        }
    }

    /// Feed bytes read from the client and run the machine as far as they go.
    pub fn feed(&mut self, data: &[u8]) -> Result<Status, HandshakeError> {
        match self.state {
            State::AwaitTls | State::Done => return Err(HandshakeError::Finished),
            _ => {}
        }
        self.inbuf.extend_from_slice(data);
        let mut pos = 0;
        let res = self.run(&mut pos);
        self.inbuf.drain(..pos);
        if res.is_err() {
            self.state = State::Done;
        }
        res
    }

    fn run(&mut self, pos: &mut usize) -> Result<Status, HandshakeError> {
        loop {
            let avail = self.inbuf.len() - *pos;
            match self.state {
                State::ClientFlags => {
                    if avail < 4 {
                        return Ok(Status::NeedMore);
                    }
                    let b = &self.inbuf[*pos..*pos + 4];
                    let flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                    *pos += 4;
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                        return Err(HandshakeError::NotFixedNewstyle(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Skip { remaining } => {
                    let n = avail.min(remaining as usize);
                    *pos += n;
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = State::Skip { remaining };
                        return Ok(Status::NeedMore);
                    }
                    self.state = State::Options;
                }
                State::Options => {
                    if avail < OPTION_HEADER_LEN {
                        return Ok(Status::NeedMore);
                    }
                    let h = &self.inbuf[*pos..*pos + OPTION_HEADER_LEN];
                    let mut m = [0u8; 8];
                    m.copy_from_slice(&h[..8]);
                    let magic = u64::from_be_bytes(m);
                    if magic != IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                    let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
                    if len > MAX_OPTION_DATA {
                        // Checked before waiting for (and buffering) the data.
                        if option == OPT_EXPORT_NAME || len > MAX_OPTION_SKIP {
                            return Err(HandshakeError::OptionTooLarge { option, len });
                        }
                        self.count_option()?;
                        *pos += OPTION_HEADER_LEN;
                        if self.tls_missing() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
                            self.reply(option, REP_ERR_TLS_REQD, TLS_REQD_MSG);
                        } else {
                            let msg =
                                format!("option data of {len} bytes exceeds {MAX_OPTION_DATA}");
                            self.reply(option, REP_ERR_TOO_BIG, msg.as_bytes());
                        }
                        self.state = State::Skip { remaining: len };
                        continue;
                    }
                    let total = OPTION_HEADER_LEN + len as usize;
                    if avail < total {
                        return Ok(Status::NeedMore);
                    }
                    self.count_option()?;
                    let start = *pos + OPTION_HEADER_LEN;
                    *pos += total;
                    // The data is copied out so the reply encoders can borrow
                    // `self` mutably; it is at most MAX_OPTION_DATA bytes.
                    let data = self.inbuf[start..start + len as usize].to_vec();
                    match self.option(option, &data)? {
                        Status::NeedMore => {}
                        Status::StartTls => {
                            let extra = self.inbuf.len() - *pos;
                            if extra > 0 {
                                return Err(HandshakeError::BytesAfterStartTls(extra));
                            }
                            self.state = State::AwaitTls;
                            return Ok(Status::StartTls);
                        }
                        done @ (Status::Ready(_) | Status::Aborted) => {
                            self.state = State::Done;
                            return Ok(done);
                        }
                    }
                }
                State::AwaitTls | State::Done => return Err(HandshakeError::Finished),
            }
        }
    }

    fn tls_missing(&self) -> bool {
        self.tls == TlsMode::Required && !self.tls_active
    }

    fn count_option(&mut self) -> Result<(), HandshakeError> {
        self.options += 1;
        if self.options > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions);
        }
        Ok(())
    }

    /// Handle one complete option; `NeedMore` means "go on haggling".
    fn option(&mut self, option: u32, data: &[u8]) -> Result<Status, HandshakeError> {
        if self.tls_missing() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            self.reply(option, REP_ERR_TLS_REQD, TLS_REQD_MSG);
            return Ok(Status::NeedMore);
        }
        match option {
            OPT_EXPORT_NAME => {
                let Some(i) = self.find(data) else {
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]).into_owned(),
                    ));
                };
                let e = &self.exports[i];
                let flags = transmission_flags(e.read_only);
                self.out.extend_from_slice(&e.size.to_be_bytes());
                self.out.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                Ok(Status::Ready(Negotiated {
                    export: i,
                    flags,
                    via: OPT_EXPORT_NAME,
                }))
            }
            OPT_ABORT => {
                // The spec: ignore any data rather than refusing.
                self.reply(option, REP_ACK, &[]);
                Ok(Status::Aborted)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST carries no data");
                    return Ok(Status::NeedMore);
                }
                let exports = Arc::clone(&self.exports);
                for e in exports.iter() {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    self.reply(option, REP_SERVER, &d);
                }
                self.reply(option, REP_ACK, &[]);
                Ok(Status::NeedMore)
            }
            OPT_STARTTLS => {
                if self.tls == TlsMode::Off {
                    self.reply(
                        option,
                        REP_ERR_UNSUP,
                        b"TLS is not configured on this server",
                    );
                } else if self.tls_active {
                    self.reply(option, REP_ERR_INVALID, b"TLS is already active");
                } else if !data.is_empty() {
                    self.reply(option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS carries no data");
                } else {
                    self.reply(option, REP_ACK, &[]);
                    return Ok(Status::StartTls);
                }
                Ok(Status::NeedMore)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STRUCTURED_REPLY => {
                self.reply(
                    option,
                    REP_ERR_UNSUP,
                    b"structured replies are not supported",
                );
                Ok(Status::NeedMore)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.reply(
                    option,
                    REP_ERR_UNSUP,
                    b"metadata contexts are not supported",
                );
                Ok(Status::NeedMore)
            }
            OPT_EXTENDED_HEADERS => {
                self.reply(option, REP_ERR_UNSUP, b"extended headers are not supported");
                Ok(Status::NeedMore)
            }
            _ => {
                self.reply(option, REP_ERR_UNSUP, b"unknown option");
                Ok(Status::NeedMore)
            }
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Status, HandshakeError> {
        // u32 name length, name, u16 count, count × u16; nothing after.
        let Some(parsed) = parse_info_request(data) else {
            self.reply(
                option,
                REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/NBD_OPT_GO data (name or request list length)",
            );
            return Ok(Status::NeedMore);
        };
        let (name, requests) = parsed;
        if name.len() > MAX_STRING {
            self.reply(
                option,
                REP_ERR_INVALID,
                b"export name longer than 4096 bytes",
            );
            return Ok(Status::NeedMore);
        }
        let Some(i) = self.find(name) else {
            let msg = format!("unknown export {:?}", String::from_utf8_lossy(name));
            self.reply(option, REP_ERR_UNKNOWN, msg.as_bytes());
            return Ok(Status::NeedMore);
        };
        let wants = |t: u16| {
            requests
                .chunks_exact(2)
                .any(|c| u16::from_be_bytes([c[0], c[1]]) == t)
        };
        let (want_name, want_desc) = (wants(INFO_NAME), wants(INFO_DESCRIPTION));
        let exports = Arc::clone(&self.exports);
        let e = &exports[i];
        let flags = transmission_flags(e.read_only);

        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &d);
        if want_name {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        if want_desc && !e.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        // Always sent (the spec allows unrequested block sizes): clients that
        // did not ask still get EINVAL for unaligned requests, never corruption.
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        d.extend_from_slice(&self.max_block.to_be_bytes());
        self.reply(option, REP_INFO, &d);
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            Ok(Status::Ready(Negotiated {
                export: i,
                flags,
                via: OPT_GO,
            }))
        } else {
            Ok(Status::NeedMore)
        }
    }

    /// The export named `name`; the empty name is the first (default) export.
    fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    fn reply(&mut self, option: u32, typ: u32, data: &[u8]) {
        if typ & REP_FLAG_ERROR != 0 {
            self.refused.push(OptionRefusal {
                option,
                reply: typ,
                message: String::from_utf8_lossy(data).into_owned(),
            });
        }
        encode_option_reply(&mut self.out, option, typ, data);
    }
}

/// Name of an option, for logs.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Append one option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, typ: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Split `NBD_OPT_INFO`/`NBD_OPT_GO` data into the name and the raw list of
/// information requests; `None` when the lengths do not add up exactly.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], &[u8])> {
    if data.len() < 6 {
        return None;
    }
    let name_len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    // The spec: name length MUST be no larger than the option length - 6.
    if name_len > data.len() - 6 {
        return None;
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list))
}
