//! Unit tests of the sans-I/O core: golden bytes, every refusal path, and
//! property tests over arbitrary input.

use std::sync::Arc;

use proptest::prelude::*;

use super::TlsMode;
use super::handshake::*;
use super::proto::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn exports() -> Arc<[ExportInfo]> {
    vec![
        ExportInfo {
            name: "disk".into(),
            description: "first disk".into(),
            size: 1 << 20,
            read_only: false,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: 8192,
            read_only: true,
        },
    ]
    .into()
}

fn hs(tls: TlsMode) -> Handshake {
    let mut h = Handshake::new(exports(), tls, DEFAULT_MAX_REQUEST);
    assert_eq!(h.take_output().len(), 18);
    h
}

/// A handshake past the client flags (fixed newstyle + no zeroes).
fn started(tls: TlsMode) -> Handshake {
    let mut h = hs(tls);
    assert_eq!(h.feed(&[0, 0, 0, 3]).unwrap(), Status::NeedMore);
    assert!(h.take_output().is_empty());
    h
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Split option replies into (option, type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 20, "truncated reply {b:?}");
        assert_eq!(&b[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        v.push((o, t, b[20..20 + n].to_vec()));
        b = &b[20 + n..];
    }
    v
}

fn types(b: &[u8]) -> Vec<u32> {
    replies(b).into_iter().map(|r| r.1).collect()
}

// ---------------------------------------------------------------------------
// Golden bytes.

#[test]
fn greeting_is_golden() {
    let mut h = Handshake::new(exports(), TlsMode::Off, DEFAULT_MAX_REQUEST);
    assert_eq!(
        h.take_output(),
        hex("4e42444d41474943 49484156454f5054 0003") // NBDMAGIC IHAVEOPT FIXED|NO_ZEROES
    );
}

#[test]
fn opt_go_exchange_is_golden_byte_for_byte() {
    let mut h = hs(TlsMode::Off);
    let client = hex("00000003                         \
         49484156454f5054 00000007 0000000e \
         00000004 6469736b 0002 0001 0003"); // flags; IHAVEOPT GO len 14: name "disk", 2 requests: NAME, BLOCK_SIZE
    // A READ request arriving in the same segment as the GO.
    let req = hex("25609513 0000 0000 0102030405060708 0000000000001000 00000200");
    let mut input = client.clone();
    input.extend_from_slice(&req);
    let st = h.feed(&input).unwrap();
    assert_eq!(
        st,
        Status::Ready(Negotiated {
            export: 0,
            flags: 0x016d,
            via: OPT_GO
        })
    );
    let expected = hex(
        "0003e889045565a9 00000007 00000003 0000000c  0000 0000000000100000 016d \
         0003e889045565a9 00000007 00000003 00000006  0001 6469736b \
         0003e889045565a9 00000007 00000003 0000000e  0003 00000200 00001000 02000000 \
         0003e889045565a9 00000007 00000001 00000000",
    ); // INFO_EXPORT size 1 MiB flags; INFO_NAME "disk"; INFO_BLOCK_SIZE 512/4096/32M; ACK
    assert_eq!(h.take_output(), expected);
    assert_eq!(h.take_leftover(), req);
    // Nothing more is accepted.
    assert_eq!(h.feed(&[0]).unwrap_err(), HandshakeError::Finished);
}

#[test]
fn byte_by_byte_feeding_matches_one_shot() {
    let mut input = vec![0, 0, 0, 3];
    input.extend(opt(OPT_LIST, &[]));
    input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    input.extend(opt(OPT_INFO, &info_data("ro", &[INFO_DESCRIPTION])));
    input.extend(opt(OPT_GO, &info_data("", &[])));
    let mut a = hs(TlsMode::Off);
    let st = a.feed(&input).unwrap();
    let out_a = a.take_output();
    let mut b = hs(TlsMode::Off);
    let mut out_b = Vec::new();
    let mut last = Status::NeedMore;
    for (i, byte) in input.iter().enumerate() {
        last = b.feed(std::slice::from_ref(byte)).unwrap();
        out_b.extend(b.take_output());
        if i + 1 < input.len() {
            assert_eq!(last, Status::NeedMore, "at byte {i}");
            assert!(b.buffered() <= OPTION_HEADER_LEN + MAX_OPTION_DATA as usize);
        }
    }
    assert_eq!(st, last);
    assert_eq!(out_a, out_b);
    assert!(matches!(st, Status::Ready(n) if n.export == 0));
}

#[test]
fn request_and_reply_are_golden() {
    let read = hex("25609513 0001 0000 1122334455667788 0000000000002000 00001000");
    let h = parse_request(&read).unwrap().unwrap();
    assert_eq!(
        h,
        RequestHeader {
            flags: CMD_FLAG_FUA,
            typ: CMD_READ,
            cookie: 0x1122334455667788,
            offset: 0x2000,
            len: 0x1000
        }
    );
    let mut enc = Vec::new();
    h.encode(&mut enc);
    assert_eq!(enc, read);
    let write = hex("25609513 0000 0001 0000000000000001 0000000000000200 00000200");
    let w = parse_request(&write).unwrap().unwrap();
    assert_eq!(
        (w.typ, w.payload_len(), h.payload_len()),
        (CMD_WRITE, 512, 0)
    );
    let mut r = Vec::new();
    encode_simple_reply(&mut r, 0, 0x1122334455667788);
    assert_eq!(r, hex("67446698 00000000 1122334455667788"));
    r.clear();
    encode_simple_reply(&mut r, NBD_ENOSPC, 1);
    assert_eq!(r, hex("67446698 0000001c 0000000000000001"));
}

#[test]
fn request_parser_incomplete_and_bad_magic() {
    let read = hex("25609513 0000 0000 0000000000000001 0000000000000000 00000200");
    for n in 0..REQUEST_HEADER_LEN {
        assert_eq!(parse_request(&read[..n]), Ok(None), "{n} bytes");
    }
    // A wrong magic is detected from its first 4 bytes on.
    assert_eq!(
        parse_request(&hex("12560953 00")),
        Err(BadMagic(0x12560953))
    );
    let mut bad = read.clone();
    bad[0] = 0x67;
    assert!(parse_request(&bad).is_err());
}

// ---------------------------------------------------------------------------
// Handshake paths.

#[test]
fn client_flags_are_checked() {
    let mut h = hs(TlsMode::Off);
    assert_eq!(
        h.feed(&[0, 0, 0, 2]).unwrap_err(),
        HandshakeError::NotFixedNewstyle(2)
    );
    let mut h = hs(TlsMode::Off);
    assert_eq!(
        h.feed(&[0, 0, 0, 0]).unwrap_err(),
        HandshakeError::NotFixedNewstyle(0)
    );
    let mut h = hs(TlsMode::Off);
    assert_eq!(
        h.feed(&[0, 0, 0, 5]).unwrap_err(),
        HandshakeError::UnknownClientFlags(5)
    );
    // After an error the machine refuses input.
    assert_eq!(h.feed(&[0]).unwrap_err(), HandshakeError::Finished);
}

#[test]
fn export_name_honours_no_zeroes_and_default_export() {
    for (flags, zeros) in [(3u8, 0usize), (1, 124)] {
        let mut h = hs(TlsMode::Off);
        let mut input = vec![0, 0, 0, flags];
        input.extend(opt(OPT_EXPORT_NAME, b""));
        let st = h.feed(&input).unwrap();
        assert_eq!(
            st,
            Status::Ready(Negotiated {
                export: 0,
                flags: transmission_flags(false),
                via: OPT_EXPORT_NAME
            })
        );
        let out = h.take_output();
        let mut expected = (1u64 << 20).to_be_bytes().to_vec();
        expected.extend_from_slice(&0x016du16.to_be_bytes());
        expected.extend(std::iter::repeat_n(0u8, zeros));
        assert_eq!(out, expected);
    }
    let mut h = started(TlsMode::Off);
    let st = h.feed(&opt(OPT_EXPORT_NAME, b"ro")).unwrap();
    assert!(matches!(st, Status::Ready(n) if n.export == 1
        && n.flags == TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN));
    let mut h = started(TlsMode::Off);
    assert_eq!(
        h.feed(&opt(OPT_EXPORT_NAME, b"nope")).unwrap_err(),
        HandshakeError::UnknownExport("nope".into())
    );
}

#[test]
fn abort_list_and_unsupported_options() {
    let mut h = started(TlsMode::Off);
    assert_eq!(h.feed(&opt(OPT_LIST, &[])).unwrap(), Status::NeedMore);
    let r = replies(&h.take_output());
    assert_eq!(r.len(), 3);
    let mut server0 = 4u32.to_be_bytes().to_vec();
    server0.extend_from_slice(b"diskfirst disk");
    assert_eq!(r[0], (OPT_LIST, REP_SERVER, server0));
    let mut server1 = 2u32.to_be_bytes().to_vec();
    server1.extend_from_slice(b"ro");
    assert_eq!(r[1], (OPT_LIST, REP_SERVER, server1));
    assert_eq!(r[2], (OPT_LIST, REP_ACK, vec![]));

    h.feed(&opt(OPT_LIST, b"x")).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_INVALID]);

    for o in [
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        4,
        12,
        0xdead_beef,
    ] {
        assert_eq!(h.feed(&opt(o, b"abc")).unwrap(), Status::NeedMore);
        let r = replies(&h.take_output());
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].1), (o, REP_ERR_UNSUP), "option {o}");
        assert!(!r[0].2.is_empty(), "error replies carry a message");
    }
    // Every error reply was recorded for the log, once.
    let refused = h.take_refusals();
    assert_eq!(refused.len(), 8);
    assert_eq!(refused[0].reply, REP_ERR_INVALID);
    assert_eq!(refused[1].option, OPT_STRUCTURED_REPLY);
    assert!(h.take_refusals().is_empty());
    // ABORT ignores data and ends the session.
    assert_eq!(h.feed(&opt(OPT_ABORT, b"junk")).unwrap(), Status::Aborted);
    assert_eq!(
        replies(&h.take_output()),
        vec![(OPT_ABORT, REP_ACK, vec![])]
    );
    assert_eq!(h.feed(&[0]).unwrap_err(), HandshakeError::Finished);
}

#[test]
fn info_unknown_and_malformed_then_go() {
    let mut h = started(TlsMode::Off);
    h.feed(&opt(OPT_INFO, &info_data("nope", &[]))).unwrap();
    let r = replies(&h.take_output());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("nope"));

    // Name length beyond the option length.
    let mut d = info_data("disk", &[]);
    d[3] = 200;
    // Trailing byte after the request list.
    let mut trailing = info_data("disk", &[INFO_NAME]);
    trailing.push(0);
    // Request count larger than the list.
    let mut count = info_data("disk", &[INFO_NAME]);
    count[4 + 4 + 1] = 2;
    for bad in [d, trailing, count, vec![0, 0, 0, 0, 0], vec![]] {
        h.feed(&opt(OPT_GO, &bad)).unwrap();
        assert_eq!(types(&h.take_output()), vec![REP_ERR_INVALID], "{bad:?}");
    }
    // Name longer than 4096 bytes.
    let long = "x".repeat(MAX_STRING + 1);
    h.feed(&opt(OPT_GO, &info_data(&long, &[]))).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_INVALID]);

    // INFO with a description on an export that has one, repeated request.
    h.feed(&opt(OPT_INFO, &info_data("disk", &[INFO_DESCRIPTION, 77])))
        .unwrap();
    let r = replies(&h.take_output());
    assert_eq!(types_of(&r), vec![REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    assert_eq!(&r[1].2[..2], &INFO_DESCRIPTION.to_be_bytes());
    assert_eq!(&r[1].2[2..], b"first disk");

    // GO on the read-only export: the flags say so.
    let st = h.feed(&opt(OPT_GO, &info_data("ro", &[]))).unwrap();
    assert!(matches!(st, Status::Ready(n) if n.export == 1 && n.flags & TFLAG_READ_ONLY != 0));
    let r = replies(&h.take_output());
    assert_eq!(types_of(&r), vec![REP_INFO, REP_INFO, REP_ACK]);
    assert_eq!(&r[0].2[2..10], &8192u64.to_be_bytes());
}

fn types_of(r: &[(u32, u32, Vec<u8>)]) -> Vec<u32> {
    r.iter().map(|x| x.1).collect()
}

#[test]
fn oversized_options_are_skipped_or_dropped() {
    let mut h = started(TlsMode::Off);
    // Just over the buffer cap: TOO_BIG and skipped as it streams in.
    let big = vec![7u8; MAX_OPTION_DATA as usize + 1];
    let msg = opt(OPT_INFO, &big);
    for chunk in msg.chunks(4000) {
        assert_eq!(h.feed(chunk).unwrap(), Status::NeedMore);
        assert!(h.buffered() <= OPTION_HEADER_LEN + MAX_OPTION_DATA as usize);
    }
    assert_eq!(types(&h.take_output()), vec![REP_ERR_TOO_BIG]);
    let st = h.feed(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert!(matches!(st, Status::Ready(_)));

    // Beyond the skip cap: dropped as soon as the header arrives.
    let mut h = started(TlsMode::Off);
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&OPT_LIST.to_be_bytes());
    hdr.extend_from_slice(&(MAX_OPTION_SKIP + 1).to_be_bytes());
    assert!(matches!(
        h.feed(&hdr),
        Err(HandshakeError::OptionTooLarge {
            option: OPT_LIST,
            ..
        })
    ));
    // EXPORT_NAME cannot be answered with an error: dropped.
    let mut h = started(TlsMode::Off);
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    hdr.extend_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
    assert!(h.feed(&hdr).is_err());
}

#[test]
fn bad_option_magic_and_too_many_options() {
    let mut h = started(TlsMode::Off);
    let mut o = opt(OPT_LIST, &[]);
    o[0] = 0;
    assert!(matches!(h.feed(&o), Err(HandshakeError::BadOptionMagic(_))));
    let mut h = started(TlsMode::Off);
    let one = opt(OPT_STRUCTURED_REPLY, &[]);
    for _ in 0..MAX_OPTIONS {
        assert_eq!(h.feed(&one).unwrap(), Status::NeedMore);
    }
    assert_eq!(h.feed(&one).unwrap_err(), HandshakeError::TooManyOptions);
}

#[test]
fn starttls_paths() {
    // Off: unsupported, haggling goes on.
    let mut h = started(TlsMode::Off);
    h.feed(&opt(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_UNSUP]);

    // Optional: data is invalid; ACK then the upgrade.
    let mut h = started(TlsMode::Optional);
    h.feed(&opt(OPT_STARTTLS, b"x")).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_INVALID]);
    assert_eq!(h.feed(&opt(OPT_STARTTLS, &[])).unwrap(), Status::StartTls);
    assert_eq!(types(&h.take_output()), vec![REP_ACK]);
    assert_eq!(h.feed(&[1]).unwrap_err(), HandshakeError::Finished);
    let mut h = started(TlsMode::Optional);
    h.feed(&opt(OPT_STARTTLS, &[])).unwrap();
    h.take_output();
    h.tls_started();
    assert!(h.tls_active());
    h.feed(&opt(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_INVALID]);
    assert!(matches!(
        h.feed(&opt(OPT_GO, &info_data("", &[]))).unwrap(),
        Status::Ready(_)
    ));

    // Optional: plaintext sessions are served too.
    let mut h = started(TlsMode::Optional);
    assert!(matches!(
        h.feed(&opt(OPT_EXPORT_NAME, b"disk")).unwrap(),
        Status::Ready(_)
    ));

    // Bytes behind STARTTLS in the same segment: injection, dropped.
    let mut h = started(TlsMode::Optional);
    let mut o = opt(OPT_STARTTLS, &[]);
    o.extend(opt(OPT_LIST, &[]));
    assert_eq!(
        h.feed(&o).unwrap_err(),
        HandshakeError::BytesAfterStartTls(16)
    );
}

#[test]
fn tls_required_refuses_everything_before_starttls() {
    let mut h = started(TlsMode::Required);
    for o in [OPT_LIST, OPT_STRUCTURED_REPLY, 0x99] {
        h.feed(&opt(o, &[])).unwrap();
        assert_eq!(
            types(&h.take_output()),
            vec![REP_ERR_TLS_REQD],
            "option {o}"
        );
    }
    h.feed(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_TLS_REQD]);
    h.feed(&opt(OPT_INFO, &info_data("nope", &[]))).unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_TLS_REQD]);
    // Oversized options too.
    h.feed(&opt(OPT_LIST, &vec![0; MAX_OPTION_DATA as usize + 1]))
        .unwrap();
    assert_eq!(types(&h.take_output()), vec![REP_ERR_TLS_REQD]);
    let mut e = started(TlsMode::Required);
    assert_eq!(
        e.feed(&opt(OPT_EXPORT_NAME, b"disk")).unwrap_err(),
        HandshakeError::TlsRequired
    );
    let mut a = started(TlsMode::Required);
    assert_eq!(a.feed(&opt(OPT_ABORT, &[])).unwrap(), Status::Aborted);

    assert_eq!(h.feed(&opt(OPT_STARTTLS, &[])).unwrap(), Status::StartTls);
    assert_eq!(types(&h.take_output()), vec![REP_ACK]);
    h.tls_started();
    h.feed(&opt(OPT_LIST, &[])).unwrap();
    assert_eq!(
        types(&h.take_output()),
        vec![REP_SERVER, REP_SERVER, REP_ACK]
    );
    assert!(matches!(
        h.feed(&opt(OPT_EXPORT_NAME, b"disk")).unwrap(),
        Status::Ready(_)
    ));
}

// ---------------------------------------------------------------------------
// Validation.

const LIM: Limits = Limits {
    size: 1 << 20,
    max_request: 64 << 10,
    read_only: false,
};

fn req(typ: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
    RequestHeader {
        flags,
        typ,
        cookie: 9,
        offset,
        len,
    }
}

fn refused(h: RequestHeader, lim: &Limits) -> (Refusal, u32) {
    let r = validate(&h, lim).unwrap_err();
    (r.reason, r.error)
}

#[test]
fn valid_requests_become_commands() {
    assert_eq!(
        validate(&req(CMD_READ, 0, 4096, 4096), &LIM),
        Ok(Command::Read {
            offset: 4096,
            len: 4096
        })
    );
    assert_eq!(
        validate(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 512), &LIM),
        Ok(Command::Write {
            offset: 0,
            len: 512,
            fua: true
        })
    );
    assert_eq!(
        validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &LIM),
        Ok(Command::WriteZeroes {
            offset: 0,
            len: 1 << 20,
            may_unmap: false,
            fua: false
        })
    );
    assert_eq!(
        validate(&req(CMD_WRITE_ZEROES, 0, 0, 512), &LIM),
        Ok(Command::WriteZeroes {
            offset: 0,
            len: 512,
            may_unmap: true,
            fua: false
        })
    );
    // Trim and write-zeroes carry no payload: not bound by max_request.
    assert!(validate(&req(CMD_TRIM, CMD_FLAG_FUA, 0, 1 << 20), &LIM).is_ok());
    assert_eq!(
        validate(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &LIM),
        Ok(Command::Flush)
    );
    assert_eq!(
        validate(&req(CMD_CACHE, 0, 0, 4096), &LIM),
        Ok(Command::Cache)
    );
    // Disconnect is never refused, whatever its fields.
    assert_eq!(
        validate(&req(CMD_DISC, 0xffff, 7, 9), &LIM),
        Ok(Command::Disconnect)
    );
    // A request may end at an unaligned export end.
    let odd = Limits {
        size: 4096 + 100,
        ..LIM
    };
    assert!(validate(&req(CMD_READ, 0, 4096, 100), &odd).is_ok());
    assert_eq!(
        refused(req(CMD_READ, 0, 4096, 200), &odd).0,
        Refusal::Unaligned
    );
}

#[test]
fn every_refusal_has_its_error() {
    let end = 1u64 << 20;
    // Beyond the end: write and write-zeroes ENOSPC, read and trim EINVAL.
    for (typ, error) in [
        (CMD_WRITE, NBD_ENOSPC),
        (CMD_WRITE_ZEROES, NBD_ENOSPC),
        (CMD_READ, NBD_EINVAL),
        (CMD_TRIM, NBD_EINVAL),
        (CMD_CACHE, NBD_EINVAL),
    ] {
        assert_eq!(
            refused(req(typ, 0, end, 512), &LIM),
            (Refusal::BeyondEnd { size: end }, error),
            "{}",
            command_name(typ)
        );
        assert_eq!(
            refused(req(typ, 0, end - 512, 1024), &LIM).1,
            error,
            "straddling the end"
        );
        // Offset + length overflowing u64 is out of range, not a panic.
        assert_eq!(
            refused(req(typ, 0, u64::MAX - 511, 512), &LIM).0,
            Refusal::BeyondEnd { size: end }
        );
        // Zero length and misalignment.
        assert_eq!(
            refused(req(typ, 0, 0, 0), &LIM),
            (Refusal::ZeroLength, NBD_EINVAL)
        );
        assert_eq!(
            refused(req(typ, 0, 100, 512), &LIM),
            (Refusal::Unaligned, NBD_EINVAL)
        );
        assert_eq!(
            refused(req(typ, 0, 512, 100), &LIM),
            (Refusal::Unaligned, NBD_EINVAL)
        );
    }
    // Longer than the server's limit: READ and WRITE only.
    for typ in [CMD_READ, CMD_WRITE] {
        assert_eq!(
            refused(req(typ, 0, 0, (64 << 10) + 512), &LIM),
            (Refusal::TooLarge { max: 64 << 10 }, NBD_EINVAL)
        );
    }
    assert_eq!(
        refused(req(CMD_FLUSH, 0, 0, 512), &LIM),
        (Refusal::FlushArgs, NBD_EINVAL)
    );
    assert_eq!(
        refused(req(CMD_FLUSH, 0, 512, 0), &LIM).0,
        Refusal::FlushArgs
    );
    assert_eq!(
        refused(req(CMD_BLOCK_STATUS, 0, 0, 512), &LIM),
        (Refusal::NoMetaContext, NBD_EINVAL)
    );
    for typ in [CMD_RESIZE, 9, 0xffff] {
        assert_eq!(
            refused(req(typ, 0, 0, 512), &LIM),
            (Refusal::UnknownCommand, NBD_EINVAL)
        );
    }
    // Flags: NO_HOLE only on write-zeroes; FAST_ZERO, DF, REQ_ONE,
    // PAYLOAD_LEN and unknown bits were never negotiated.
    for (typ, flags) in [
        (CMD_WRITE, CMD_FLAG_NO_HOLE),
        (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
        (CMD_READ, CMD_FLAG_DF),
        (CMD_READ, CMD_FLAG_REQ_ONE),
        (CMD_WRITE, CMD_FLAG_PAYLOAD_LEN),
        (CMD_TRIM, 1 << 9),
        (CMD_FLUSH, CMD_FLAG_NO_HOLE),
    ] {
        assert_eq!(
            refused(req(typ, flags | CMD_FLAG_FUA, 0, 512), &LIM),
            (Refusal::BadFlags { flags }, NBD_EINVAL)
        );
    }
    // Read-only: write, trim and write-zeroes are EPERM; read is fine.
    let ro = Limits {
        read_only: true,
        ..LIM
    };
    for typ in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        assert_eq!(
            refused(req(typ, 0, 0, 512), &ro),
            (Refusal::ReadOnly, NBD_EPERM)
        );
    }
    assert!(validate(&req(CMD_READ, 0, 0, 512), &ro).is_ok());
    assert!(validate(&req(CMD_FLUSH, 0, 0, 0), &ro).is_ok());
    // Every refusal explains itself.
    assert!(Refusal::TooLarge { max: 5 }.to_string().contains('5'));
}

#[test]
fn refused_payload_policy() {
    assert_eq!(
        refused_payload(&req(CMD_READ, 0, 0, 1 << 30)),
        Payload::None
    );
    assert_eq!(
        refused_payload(&req(CMD_WRITE, 0, 3, 100)),
        Payload::Discard(100)
    );
    assert_eq!(
        refused_payload(&req(CMD_WRITE, 0, 0, WRITE_DISCARD_MAX)),
        Payload::Discard(WRITE_DISCARD_MAX)
    );
    assert_eq!(
        refused_payload(&req(CMD_WRITE, 0, 0, WRITE_DISCARD_MAX + 1)),
        Payload::Drop
    );
}

#[test]
fn errno_mapping() {
    for (errno, nbd) in [
        (libc::EPERM, NBD_EPERM),
        (libc::EROFS, NBD_EPERM),
        (libc::EIO, NBD_EIO),
        (libc::ENOMEM, NBD_ENOMEM),
        (libc::EINVAL, NBD_EINVAL),
        (libc::ENOSPC, NBD_ENOSPC),
        (libc::EDQUOT, NBD_ENOSPC),
        (libc::EFBIG, NBD_ENOSPC),
        (libc::EOVERFLOW, NBD_EOVERFLOW),
        (libc::ENOTSUP, NBD_ENOTSUP),
        (libc::ESHUTDOWN, NBD_ESHUTDOWN),
        (libc::EBADF, NBD_EIO),
        (libc::ENXIO, NBD_EIO),
        (0, NBD_EIO),
        (-3, NBD_EIO),
    ] {
        assert_eq!(nbd_error(errno), nbd, "errno {errno}");
    }
    // The one BlockIo error path, end to end.
    let e = crate::frontend::IoError::new(
        crate::frontend::Op::Write,
        0,
        1,
        crate::frontend::IoErrorKind::ReadOnly,
    );
    assert_eq!(nbd_error(e.errno()), NBD_EPERM);
}

// ---------------------------------------------------------------------------
// Property tests.

/// A plausible option (known number or random) with random data, sometimes
/// with a lying length.
fn arb_option() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(OPT_EXPORT_NAME),
            Just(OPT_ABORT),
            Just(OPT_LIST),
            Just(OPT_STARTTLS),
            Just(OPT_INFO),
            Just(OPT_GO),
            Just(OPT_STRUCTURED_REPLY),
            any::<u32>(),
        ],
        proptest::collection::vec(any::<u8>(), 0..64),
        prop_oneof![3 => Just(None), 1 => any::<u32>().prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(o, data, lie, well_formed_info)| {
            let data = if well_formed_info && matches!(o, OPT_INFO | OPT_GO) {
                let name = if data.first().is_some_and(|b| b % 2 == 0) {
                    "disk"
                } else {
                    ""
                };
                info_data(name, &[INFO_NAME, INFO_BLOCK_SIZE])
            } else {
                data
            };
            let mut v = opt(o, &data);
            if let Some(len) = lie {
                v[12..16].copy_from_slice(&len.to_be_bytes());
            }
            v
        })
}

fn drive_arbitrary(tls: TlsMode, input: &[u8], cuts: &[usize]) {
    let mut h = Handshake::new(exports(), tls, DEFAULT_MAX_REQUEST);
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    for p in points {
        let chunk = &input[start..p];
        start = p;
        match h.feed(chunk) {
            Ok(Status::NeedMore) => {
                assert!(h.buffered() <= OPTION_HEADER_LEN + MAX_OPTION_DATA as usize);
            }
            Ok(Status::StartTls) => h.tls_started(),
            Ok(Status::Ready(n)) => {
                assert!(n.export < 2);
                let _ = h.take_leftover();
                return;
            }
            Ok(Status::Aborted) | Err(_) => return,
        }
        let out = h.take_output();
        // Output is a sequence of well-formed replies (or the greeting).
        assert!(out.len() < 1 << 20);
    }
}

proptest! {
    #[test]
    fn handshake_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        tls in prop_oneof![Just(TlsMode::Off), Just(TlsMode::Optional), Just(TlsMode::Required)],
    ) {
        drive_arbitrary(tls, &bytes, &cuts);
    }

    #[test]
    fn handshake_never_panics_on_plausible_options(
        flags in prop_oneof![Just(3u32), Just(1u32), any::<u32>()],
        options in proptest::collection::vec(arb_option(), 0..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        tls in prop_oneof![Just(TlsMode::Off), Just(TlsMode::Optional), Just(TlsMode::Required)],
    ) {
        let mut input = flags.to_be_bytes().to_vec();
        for o in options {
            input.extend(o);
        }
        drive_arbitrary(tls, &input, &cuts);
    }

    #[test]
    fn request_parser_and_validation_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        magic_ok in any::<bool>(),
        size in prop_oneof![Just(0u64), Just(1u64 << 30), any::<u64>()],
        max_request in 512u32..=MAX_REQUEST_LIMIT,
        read_only in any::<bool>(),
    ) {
        let mut b = bytes;
        if magic_ok && b.len() >= 4 {
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let lim = Limits { size, max_request, read_only };
        if let Ok(Some(h)) = parse_request(&b) {
            match validate(&h, &lim) {
                Ok(cmd) => {
                    // A valid command is inside the export and within limits.
                    if let Command::Read { offset, len } | Command::Write { offset, len, .. } = cmd {
                        prop_assert!(len <= max_request);
                        prop_assert!(offset + u64::from(len) <= size);
                    }
                }
                Err(r) => {
                    prop_assert!(r.error != 0);
                    // The payload to skip is bounded, or the connection drops.
                    match refused_payload(&h) {
                        Payload::Discard(n) => prop_assert!(n <= WRITE_DISCARD_MAX),
                        Payload::None | Payload::Drop => {}
                    }
                }
            }
        }
    }
}
