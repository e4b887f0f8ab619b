//! The session protocol spoken on every hop (agent → relay, relay → target).
//!
//! Three layers, as in mini-redis and Crucible: [`decode`] turns bytes into one
//! [`Message`] and tells "incomplete" apart from "invalid"; the connection layer
//! ([`read_message`] / [`write_message`]) only buffers over the TLS stream; the
//! roles decide what each message means.
//!
//! Wire form of one message: `u32` little-endian body length, then the body:
//! one type byte followed by the type's fields (little-endian integers, strings
//! as `u16` length + UTF-8 bytes). The length is checked against
//! [`MAX_MESSAGE_LEN`] before anything is allocated.

use std::io;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Classify, ErrorKind};

/// Version of this protocol; a peer with another version is refused in the hello.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest body accepted: a maximal frame (64 MiB plaintext stored raw) plus headers.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024 + 4096;

/// Longest string field (names, error messages).
pub const MAX_STRING_LEN: usize = 4096;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_FRAME: u8 = 3;
const T_ACK: u8 = 4;
const T_ERROR: u8 = 5;
const T_THROTTLE: u8 = 6;
const T_RESYNC: u8 = 7;
const T_RESYNC_UNREACHABLE: u8 = 8;

/// Largest resync message body (a sealed digest reply of a maximal chunk, with
/// room to spare); larger ones are refused before they are copied.
pub const MAX_RESYNC_LEN: usize = 1 << 20;

/// Which role opened the connection (the relay accepts both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// An agent pushing frames of one group.
    Agent,
    /// A target pulling frames of one group.
    Target,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message of a client: who it is and which group the session is for.
    /// A target also says how far it has durably applied, so the relay forwards
    /// from the next frame.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u16,
        /// Role claimed (checked against the certificate).
        role: PeerRole,
        /// Name claimed (checked against the certificate).
        name: String,
        /// Consistency group of this session.
        group: String,
        /// Target only: last frame durably applied (0 = none).
        applied_frame_no: u64,
        /// Target only: last seq durably applied.
        applied_last_seq: u64,
    },
    /// The relay's answer to a hello: the session is open. For an agent, `head_*`
    /// is the last frame the relay holds durably for the group (0 = none), so the
    /// agent resumes after it.
    Welcome {
        /// [`PROTOCOL_VERSION`] of the relay.
        version: u16,
        /// Last durable frame number of the group at the relay.
        head_frame_no: u64,
        /// Last seq of that frame.
        head_last_seq: u64,
    },
    /// One sealed frame, opaque to the relay except for its header.
    Frame(Vec<u8>),
    /// Cumulative acknowledgement: every frame up to `frame_no` is durable at the
    /// sender of the ack (spooled at the relay, applied at the target).
    Ack {
        /// Highest frame number covered.
        frame_no: u64,
        /// Last seq of that frame.
        last_seq: u64,
    },
    /// A refusal: of the session (`frame_no` 0) or of one frame.
    Error {
        /// Classification of the problem.
        kind: WireErrorKind,
        /// The frame concerned, 0 when the whole session is refused.
        frame_no: u64,
        /// Human-readable reason, one line.
        message: String,
    },
    /// The relay asks the agent to pause sending for a while.
    Throttle {
        /// Advised pause.
        retry_after_ms: u32,
    },
    /// A sealed resync message (digest request or reply, see
    /// `resync::msg`), carried between the agent and the target of a group.
    /// The relay reads only its clear header and never stores it.
    Resync(Vec<u8>),
    /// The relay could not hand the resync request `request_id` to the
    /// group's target (not connected, or too slow to take it).
    ResyncUnreachable {
        /// The request concerned.
        request_id: u64,
        /// Why, one line.
        message: String,
    },
}

/// Error classes carried on the wire (a subset of [`ErrorKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireErrorKind {
    /// Malformed input.
    Corrupt = 1,
    /// Not authorized.
    Auth = 2,
    /// Protocol violation.
    Peer = 3,
    /// Temporary failure at the sender; retry later.
    Io = 4,
}

impl WireErrorKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => WireErrorKind::Corrupt,
            2 => WireErrorKind::Auth,
            3 => WireErrorKind::Peer,
            4 => WireErrorKind::Io,
            _ => return None,
        })
    }

    /// Map a local error kind to the wire.
    pub fn from_kind(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Corrupt | ErrorKind::Config => WireErrorKind::Corrupt,
            ErrorKind::Auth => WireErrorKind::Auth,
            ErrorKind::Peer => WireErrorKind::Peer,
            ErrorKind::Io | ErrorKind::Throttled | ErrorKind::Shutdown => WireErrorKind::Io,
        }
    }

    /// The local classification of a refusal received from a peer.
    pub fn kind(self) -> ErrorKind {
        match self {
            WireErrorKind::Corrupt => ErrorKind::Corrupt,
            WireErrorKind::Auth => ErrorKind::Auth,
            WireErrorKind::Peer => ErrorKind::Peer,
            WireErrorKind::Io => ErrorKind::Io,
        }
    }
}

/// Errors of the wire layer.
#[derive(Debug, Error)]
pub enum WireError {
    /// Socket failure.
    #[error("connection i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection between messages.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// The announced length is outside the protocol's limits.
    #[error("message length {len} is out of range (1..={max})")]
    BadLength {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The body does not parse.
    #[error("malformed {what} message: {why}")]
    Malformed {
        /// Message type (or "unknown").
        what: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl Classify for WireError {
    fn kind(&self) -> ErrorKind {
        match self {
            WireError::Io(_) | WireError::Closed | WireError::Truncated { .. } => ErrorKind::Peer,
            WireError::BadLength { .. } | WireError::Malformed { .. } => ErrorKind::Corrupt,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(MAX_STRING_LEN);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&b[..n]);
}

/// Append the wire form of `msg` (length prefix included) to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    match msg {
        Message::Hello {
            version,
            role,
            name,
            group,
            applied_frame_no,
            applied_last_seq,
        } => {
            out.push(T_HELLO);
            out.extend_from_slice(&version.to_le_bytes());
            out.push(match role {
                PeerRole::Agent => 1,
                PeerRole::Target => 2,
            });
            put_str(out, name);
            put_str(out, group);
            out.extend_from_slice(&applied_frame_no.to_le_bytes());
            out.extend_from_slice(&applied_last_seq.to_le_bytes());
        }
        Message::Welcome {
            version,
            head_frame_no,
            head_last_seq,
        } => {
            out.push(T_WELCOME);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&head_frame_no.to_le_bytes());
            out.extend_from_slice(&head_last_seq.to_le_bytes());
        }
        Message::Frame(bytes) => {
            out.push(T_FRAME);
            out.extend_from_slice(bytes);
        }
        Message::Ack { frame_no, last_seq } => {
            out.push(T_ACK);
            out.extend_from_slice(&frame_no.to_le_bytes());
            out.extend_from_slice(&last_seq.to_le_bytes());
        }
        Message::Error {
            kind,
            frame_no,
            message,
        } => {
            out.push(T_ERROR);
            out.push(*kind as u8);
            out.extend_from_slice(&frame_no.to_le_bytes());
            put_str(out, message);
        }
        Message::Throttle { retry_after_ms } => {
            out.push(T_THROTTLE);
            out.extend_from_slice(&retry_after_ms.to_le_bytes());
        }
        Message::Resync(bytes) => {
            out.push(T_RESYNC);
            out.extend_from_slice(bytes);
        }
        Message::ResyncUnreachable {
            request_id,
            message,
        } => {
            out.push(T_RESYNC_UNREACHABLE);
            out.extend_from_slice(&request_id.to_le_bytes());
            put_str(out, message);
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// A cursor over a message body that refuses to read past its end.
struct Body<'a> {
    what: &'static str,
    b: &'a [u8],
}

impl<'a> Body<'a> {
    fn err(&self, why: impl Into<String>) -> WireError {
        WireError::Malformed {
            what: self.what,
            why: why.into(),
        }
    }
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(self.err(format!("truncated at field {field}")));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self, field: &str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2, field)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self, field: &str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4, field)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self, field: &str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8, field)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn string(&mut self, field: &str) -> Result<String, WireError> {
        let n = self.u16(field)? as usize;
        if n > MAX_STRING_LEN {
            return Err(self.err(format!(
                "field {field} is {n} bytes, limit {MAX_STRING_LEN}"
            )));
        }
        let raw = self.take(n, field)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err(format!("field {field} is not UTF-8")))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.b.len())))
        }
    }
}

/// Parse one message body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    let Some((&ty, rest)) = body.split_first() else {
        return Err(WireError::BadLength {
            len: 0,
            max: MAX_MESSAGE_LEN,
        });
    };
    let what = match ty {
        T_HELLO => "hello",
        T_WELCOME => "welcome",
        T_FRAME => "frame",
        T_ACK => "ack",
        T_ERROR => "error",
        T_THROTTLE => "throttle",
        T_RESYNC => "resync",
        T_RESYNC_UNREACHABLE => "resync-unreachable",
        other => {
            return Err(WireError::Malformed {
                what: "unknown",
                why: format!("message type {other}"),
            });
        }
    };
    let mut b = Body { what, b: rest };
    let msg = match ty {
        T_HELLO => {
            let version = b.u16("version")?;
            let role = match b.u8("role")? {
                1 => PeerRole::Agent,
                2 => PeerRole::Target,
                r => return Err(b.err(format!("role {r}"))),
            };
            let name = b.string("name")?;
            let group = b.string("group")?;
            let applied_frame_no = b.u64("applied_frame_no")?;
            let applied_last_seq = b.u64("applied_last_seq")?;
            Message::Hello {
                version,
                role,
                name,
                group,
                applied_frame_no,
                applied_last_seq,
            }
        }
        T_WELCOME => Message::Welcome {
            version: b.u16("version")?,
            head_frame_no: b.u64("head_frame_no")?,
            head_last_seq: b.u64("head_last_seq")?,
        },
        T_FRAME => {
            let bytes = b.b.to_vec();
            b.b = &[];
            Message::Frame(bytes)
        }
        T_ACK => Message::Ack {
            frame_no: b.u64("frame_no")?,
            last_seq: b.u64("last_seq")?,
        },
        T_ERROR => {
            let k = b.u8("kind")?;
            let kind = WireErrorKind::from_u8(k).ok_or_else(|| b.err(format!("error kind {k}")))?;
            Message::Error {
                kind,
                frame_no: b.u64("frame_no")?,
                message: b.string("message")?,
            }
        }
        T_THROTTLE => Message::Throttle {
            retry_after_ms: b.u32("retry_after_ms")?,
        },
        T_RESYNC => {
            if b.b.len() > MAX_RESYNC_LEN {
                return Err(b.err(format!("{} bytes, limit {MAX_RESYNC_LEN}", b.b.len())));
            }
            let bytes = b.b.to_vec();
            b.b = &[];
            Message::Resync(bytes)
        }
        _ => Message::ResyncUnreachable {
            request_id: b.u64("request_id")?,
            message: b.string("message")?,
        },
    };
    b.end()?;
    Ok(msg)
}

/// Sans-I/O decode from a buffer: `Ok(None)` when more bytes are needed
/// (incomplete), `Ok(Some((msg, consumed)))` for one message, `Err` when invalid.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_MESSAGE_LEN {
        return Err(WireError::BadLength {
            len,
            max: MAX_MESSAGE_LEN,
        });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = decode_body(&buf[4..4 + len])?;
    Ok(Some((msg, 4 + len)))
}

/// Read one message from an async stream. `Err(Closed)` on a clean end of stream
/// between messages.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, WireError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Err(WireError::Closed)
            } else {
                Err(WireError::Truncated { got, want: 4 })
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len_buf) as usize;
    if len == 0 || len > MAX_MESSAGE_LEN {
        return Err(WireError::BadLength {
            len,
            max: MAX_MESSAGE_LEN,
        });
    }
    // The type byte first: a frame's bytes (the bulk of the traffic) are then
    // read straight into the buffer that is handed over, with no shift or copy.
    let mut ty = [0u8; 1];
    if r.read(&mut ty).await? == 0 {
        return Err(WireError::Truncated { got: 0, want: len });
    }
    let frame = ty[0] == T_FRAME;
    if frame {
        // Read into spare capacity: no zeroing pass over a multi-MiB buffer that
        // is overwritten anyway (`take` keeps the read inside this message).
        let want = len - 1;
        let mut body = Vec::with_capacity(want);
        while body.len() < want {
            let n = (&mut *r)
                .take((want - body.len()) as u64)
                .read_buf(&mut body)
                .await?;
            if n == 0 {
                return Err(WireError::Truncated {
                    got: body.len() + 1,
                    want: len,
                });
            }
        }
        return Ok(Message::Frame(body));
    }
    let (mut body, mut got) = {
        let mut b = vec![0u8; len];
        b[0] = ty[0];
        (b, 1)
    };
    while got < body.len() {
        let n = r.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(WireError::Truncated { got, want: len });
        }
        got += n;
    }
    decode_body(&body)
}

/// Write one message and flush it.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), WireError> {
    write_unflushed(w, msg).await?;
    w.flush().await?;
    Ok(())
}

/// Write one message without flushing (the connection layer flushes when its
/// queue runs dry, so a burst of acks costs one TLS record flush).
pub async fn write_unflushed<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), WireError> {
    match msg {
        Message::Frame(bytes) => write_frame_unflushed(w, bytes).await,
        other => {
            let mut buf = Vec::with_capacity(64);
            encode(other, &mut buf);
            w.write_all(&buf).await?;
            Ok(())
        }
    }
}

/// Write a frame message from borrowed bytes without flushing: the same wire
/// form as `Message::Frame`, without copying a multi-MiB frame.
pub async fn write_frame_unflushed<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> Result<(), WireError> {
    if bytes.len() + 1 > MAX_MESSAGE_LEN {
        return Err(WireError::BadLength {
            len: bytes.len() + 1,
            max: MAX_MESSAGE_LEN,
        });
    }
    let len = (bytes.len() + 1) as u32;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = T_FRAME;
    w.write_all(&head).await?;
    w.write_all(bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                version: 1,
                role: PeerRole::Agent,
                name: "agent-1".into(),
                group: "g1".into(),
                applied_frame_no: 0,
                applied_last_seq: 0,
            },
            Message::Hello {
                version: 1,
                role: PeerRole::Target,
                name: "t".into(),
                group: "g2".into(),
                applied_frame_no: 7,
                applied_last_seq: 99,
            },
            Message::Welcome {
                version: 1,
                head_frame_no: 5,
                head_last_seq: 77,
            },
            Message::Frame(vec![1, 2, 3]),
            Message::Ack {
                frame_no: 9,
                last_seq: 1000,
            },
            Message::Error {
                kind: WireErrorKind::Auth,
                frame_no: 0,
                message: "not yours".into(),
            },
            Message::Throttle {
                retry_after_ms: 250,
            },
            Message::Resync(vec![1, 2, 3]),
            Message::ResyncUnreachable {
                request_id: 77,
                message: "no target".into(),
            },
        ]
    }

    #[test]
    fn golden_resync_unreachable_bytes() {
        let mut buf = Vec::new();
        encode(
            &Message::ResyncUnreachable {
                request_id: 5,
                message: "x".into(),
            },
            &mut buf,
        );
        assert_eq!(
            buf,
            [
                12, 0, 0, 0, // body length
                8, // resync-unreachable
                5, 0, 0, 0, 0, 0, 0, 0, // request id
                1, 0, b'x', // message
            ]
        );
    }

    #[test]
    fn an_oversized_resync_message_is_refused() {
        let mut body = vec![T_RESYNC];
        body.resize(MAX_RESYNC_LEN + 2, 0);
        let e = decode_body(&body).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }

    #[test]
    fn round_trip_every_message() {
        for m in samples() {
            let mut buf = Vec::new();
            encode(&m, &mut buf);
            let (d, used) = decode(&buf).unwrap().unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(d, m);
            // Every strict prefix is incomplete, never an error.
            for cut in 0..buf.len() {
                assert!(
                    decode(&buf[..cut]).unwrap().is_none(),
                    "prefix {cut} of {m:?}"
                );
            }
        }
    }

    #[test]
    fn golden_hello_and_ack_bytes() {
        let mut buf = Vec::new();
        encode(
            &Message::Hello {
                version: 1,
                role: PeerRole::Agent,
                name: "a".into(),
                group: "g".into(),
                applied_frame_no: 2,
                applied_last_seq: 3,
            },
            &mut buf,
        );
        assert_eq!(
            buf,
            [
                26, 0, 0, 0, // body length
                1, // hello
                1, 0, // version
                1, // agent
                1, 0, b'a', 1, 0, b'g', // name, group
                2, 0, 0, 0, 0, 0, 0, 0, // applied frame
                3, 0, 0, 0, 0, 0, 0, 0, // applied seq
            ]
        );
        let mut buf = Vec::new();
        encode(
            &Message::Ack {
                frame_no: 0x0102,
                last_seq: 5,
            },
            &mut buf,
        );
        assert_eq!(
            buf,
            [
                17, 0, 0, 0, 4, 2, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn rejects_bad_lengths_types_and_trailing_bytes() {
        assert!(matches!(
            decode(&[0, 0, 0, 0]),
            Err(WireError::BadLength { .. })
        ));
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(WireError::BadLength { .. })
        ));
        assert!(matches!(
            decode(&[1, 0, 0, 0, 99]),
            Err(WireError::Malformed { .. })
        ));
        let mut buf = Vec::new();
        encode(&Message::Throttle { retry_after_ms: 1 }, &mut buf);
        buf.push(0);
        buf[0] += 1;
        let e = decode(&buf).unwrap_err().to_string();
        assert!(e.contains("trailing"), "{e}");
        // Role out of range.
        let mut buf = Vec::new();
        encode(&samples()[0], &mut buf);
        buf[7] = 9;
        assert!(decode(&buf).unwrap_err().to_string().contains("role 9"));
    }

    #[tokio::test]
    async fn async_read_write_and_truncation() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        for m in samples() {
            write_message(&mut a, &m).await.unwrap();
            assert_eq!(read_message(&mut b).await.unwrap(), m);
        }
        // Truncated mid-message.
        a.write_all(&[10, 0, 0, 0, 4, 1]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_message(&mut b).await,
            Err(WireError::Truncated { got: 2, want: 10 })
        ));
        // A frame truncated mid-body, and one that ends right after its type byte.
        for (bytes, got) in [(vec![10u8, 0, 0, 0, 3, 1, 2], 3), (vec![10, 0, 0, 0, 3], 1)] {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(&bytes).await.unwrap();
            drop(a);
            let e = read_message(&mut b).await.unwrap_err();
            assert!(
                matches!(e, WireError::Truncated { got: g, want: 10 } if g == got),
                "{e:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let _ = decode_body(&bytes);
        }
    }
}
