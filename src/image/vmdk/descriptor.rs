//! The text descriptor of a VMDK: embedded in a monolithicSparse or
//! streamOptimized file (sector 1 on), or the whole `.vmdk` file of a
//! monolithicFlat image. Parsed as hostile input: bounded in size and line
//! count, strict about the fields tidemark relies on, tolerant of others.

use std::fmt::Write as _;

/// Largest descriptor accepted, in bytes (before any parsing or allocation).
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// Most extent lines accepted.
pub const MAX_EXTENTS: usize = 1024;
/// `parentCID` of a disk without a parent.
pub const NO_PARENT: u32 = 0xffff_ffff;

/// Access of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`.
    ReadWrite,
    /// `RDONLY`.
    ReadOnly,
    /// `NOACCESS`.
    NoAccess,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent line (the ones tidemark opens, and the rest by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentKind {
    /// `SPARSE`: a hosted sparse extent file.
    Sparse,
    /// `FLAT`: a flat extent at a sector offset in a file.
    Flat,
    /// Any other type (`ZERO`, `VMFS`, `VMFSSPARSE`, `SESPARSE`, ...), kept by name.
    Other(String),
}

impl ExtentKind {
    fn as_str(&self) -> &str {
        match self {
            ExtentKind::Sparse => "SPARSE",
            ExtentKind::Flat => "FLAT",
            ExtentKind::Other(s) => s,
        }
    }
}

/// One extent line: `RW 2097152 FLAT "disk-flat.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Access mode.
    pub access: Access,
    /// Size of the extent in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentKind,
    /// File name as written (relative to the descriptor's directory, usually).
    pub file: String,
    /// Sector offset in the file (flat extents); `None` when the line has none.
    pub offset: Option<u64>,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `version`.
    pub version: u32,
    /// `CID`: content id (hex).
    pub cid: u32,
    /// `parentCID` ([`NO_PARENT`] when absent or without a parent).
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `encoding`, if present.
    pub encoding: Option<String>,
    /// `parentFileNameHint`, if present (a child disk: tidemark refuses those).
    pub parent_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<Extent>,
    /// Other `key = value` lines outside the disk database, in order.
    pub extra: Vec<(String, String)>,
    /// `ddb.*` lines in order (key with its `ddb.` prefix, value unquoted).
    pub ddb: Vec<(String, String)>,
}

/// Why a descriptor was refused; line numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// Larger than [`MAX_DESCRIPTOR_BYTES`].
    #[error("descriptor is {len} bytes, more than the {MAX_DESCRIPTOR_BYTES} accepted")]
    TooLarge {
        /// Bytes found.
        len: usize,
    },
    /// Not UTF-8.
    #[error("descriptor is not UTF-8 text (invalid byte at offset {offset})")]
    NotText {
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// A line could not be parsed.
    #[error("descriptor line {line}: {why}")]
    Line {
        /// Line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A required key is absent.
    #[error("descriptor has no {key} line")]
    Missing {
        /// The key.
        key: &'static str,
    },
    /// More than [`MAX_EXTENTS`] extent lines.
    #[error("descriptor has more than {MAX_EXTENTS} extent lines")]
    TooManyExtents,
}

fn line_err(line: usize, why: impl Into<String>) -> DescriptorError {
    DescriptorError::Line {
        line,
        why: why.into(),
    }
}

/// Strip one pair of surrounding double quotes, if the value has them.
fn unquote(v: &str) -> &str {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

fn parse_extent(line: usize, access: Access, rest: &str) -> Result<Extent, DescriptorError> {
    let rest = rest.trim_start();
    let (sectors, rest) = rest
        .split_once(char::is_whitespace)
        .ok_or_else(|| line_err(line, "extent line ends after its size"))?;
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| line_err(line, format!("extent size {sectors:?} is not a number")))?;
    let rest = rest.trim_start();
    let (kind, rest) = rest
        .split_once(char::is_whitespace)
        .ok_or_else(|| line_err(line, "extent line has no file name"))?;
    let kind = match kind {
        "SPARSE" => ExtentKind::Sparse,
        "FLAT" => ExtentKind::Flat,
        other
            if !other.is_empty()
                && other.len() <= 16
                && other.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            ExtentKind::Other(other.to_string())
        }
        other => return Err(line_err(line, format!("bad extent type {other:?}"))),
    };
    let rest = rest.trim_start();
    let quoted = rest
        .strip_prefix('"')
        .ok_or_else(|| line_err(line, "extent file name is not quoted"))?;
    let (file, after) = quoted
        .split_once('"')
        .ok_or_else(|| line_err(line, "extent file name has no closing quote"))?;
    let after = after.trim();
    let offset = if after.is_empty() {
        None
    } else {
        Some(after.parse::<u64>().map_err(|_| {
            line_err(
                line,
                format!("extent offset {after:?} is not a number of sectors"),
            )
        })?)
    };
    Ok(Extent {
        access,
        sectors,
        kind,
        file: file.to_string(),
        offset,
    })
}

fn parse_hex_u32(line: usize, key: &str, v: &str) -> Result<u32, DescriptorError> {
    u32::from_str_radix(v, 16)
        .map_err(|_| line_err(line, format!("{key} {v:?} is not a 32-bit hex number")))
}

impl Descriptor {
    /// Parse descriptor bytes. An embedded descriptor is padded with zeros: the
    /// text ends at the first NUL byte.
    pub fn parse(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(DescriptorError::TooLarge { len: bytes.len() });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DescriptorError::NotText {
            offset: e.valid_up_to(),
        })?;
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut encoding = None;
        let mut parent_hint = None;
        let mut extents = Vec::new();
        let mut extra = Vec::new();
        let mut ddb = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let first = l.split(char::is_whitespace).next().unwrap_or("");
            let access = match first {
                "RW" => Some(Access::ReadWrite),
                "RDONLY" => Some(Access::ReadOnly),
                "NOACCESS" => Some(Access::NoAccess),
                _ => None,
            };
            if let Some(access) = access {
                if extents.len() == MAX_EXTENTS {
                    return Err(DescriptorError::TooManyExtents);
                }
                extents.push(parse_extent(line, access, &l[first.len()..])?);
                continue;
            }
            let (key, value) = l
                .split_once('=')
                .ok_or_else(|| line_err(line, "neither an extent line nor key = value"))?;
            let key = key.trim();
            let value = unquote(value.trim());
            if key.is_empty() || key.contains(char::is_whitespace) || key.contains('"') {
                return Err(line_err(line, format!("bad key {key:?}")));
            }
            let once = |taken: bool| {
                if taken {
                    Err(line_err(line, format!("{key} appears twice")))
                } else {
                    Ok(())
                }
            };
            match key {
                "version" => {
                    once(version.is_some())?;
                    version = Some(value.parse::<u32>().map_err(|_| {
                        line_err(line, format!("version {value:?} is not a number"))
                    })?);
                }
                "CID" => {
                    once(cid.is_some())?;
                    cid = Some(parse_hex_u32(line, key, value)?);
                }
                "parentCID" => {
                    once(parent_cid.is_some())?;
                    parent_cid = Some(parse_hex_u32(line, key, value)?);
                }
                "createType" => {
                    once(create_type.is_some())?;
                    create_type = Some(value.to_string());
                }
                "encoding" => {
                    once(encoding.is_some())?;
                    encoding = Some(value.to_string());
                }
                "parentFileNameHint" => {
                    once(parent_hint.is_some())?;
                    parent_hint = Some(value.to_string());
                }
                k if k.starts_with("ddb.") => ddb.push((k.to_string(), value.to_string())),
                k => extra.push((k.to_string(), value.to_string())),
            }
        }
        Ok(Descriptor {
            version: version.ok_or(DescriptorError::Missing { key: "version" })?,
            cid: cid.ok_or(DescriptorError::Missing { key: "CID" })?,
            parent_cid: parent_cid.unwrap_or(NO_PARENT),
            create_type: create_type.ok_or(DescriptorError::Missing { key: "createType" })?,
            encoding,
            parent_hint,
            extents,
            extra,
            ddb,
        })
    }

    /// Render as descriptor text (VMware's layout: header keys, extents, disk
    /// database). `CID` comes before any other line containing "CID", which
    /// qemu's reader relies on.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(512);
        // Writing to a String cannot fail.
        let _ = writeln!(s, "# Disk DescriptorFile");
        let _ = writeln!(s, "version={}", self.version);
        if let Some(e) = &self.encoding {
            let _ = writeln!(s, "encoding=\"{e}\"");
        }
        let _ = writeln!(s, "CID={:08x}", self.cid);
        let _ = writeln!(s, "parentCID={:08x}", self.parent_cid);
        let _ = writeln!(s, "createType=\"{}\"", self.create_type);
        if let Some(p) = &self.parent_hint {
            let _ = writeln!(s, "parentFileNameHint=\"{p}\"");
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}=\"{v}\"");
        }
        let _ = writeln!(s, "\n# Extent description");
        for e in &self.extents {
            let _ = write!(
                s,
                "{} {} {} \"{}\"",
                e.access.as_str(),
                e.sectors,
                e.kind.as_str(),
                e.file
            );
            if let Some(o) = e.offset {
                let _ = write!(s, " {o}");
            }
            s.push('\n');
        }
        let _ = writeln!(s, "\n# The Disk Data Base\n#DDB\n");
        for (k, v) in &self.ddb {
            let _ = writeln!(s, "{k} = \"{v}\"");
        }
        s
    }

    /// Value of the disk-database key `key` (with its `ddb.` prefix).
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A new random VMware-style disk UUID: 16 bytes as hex pairs, a dash between
/// the eighth and the ninth (`60 00 c2 9f 4a 3b 5c 6d-7e 8f 90 a1 b2 c3 d4 e5`),
/// with the RFC 4122 version-4 and variant bits set.
pub fn new_disk_uuid() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(47);
    for (i, byte) in b.iter().enumerate() {
        if i > 0 {
            s.push(if i == 8 { '-' } else { ' ' });
        }
        let _ = write!(s, "{byte:02x}");
    }
    Ok(s)
}

/// A new random content id: neither 0 nor [`NO_PARENT`].
pub fn new_cid() -> Result<u32, getrandom::Error> {
    loop {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)?;
        let cid = u32::from_le_bytes(b);
        if cid != 0 && cid != NO_PARENT {
            return Ok(cid);
        }
    }
}

/// The descriptor tidemark writes for a new image of `capacity` sectors:
/// `createType`, one read-write extent, and the disk database (hardware
/// version 4, lsilogic geometry 255 heads × 63 sectors, a fresh `ddb.uuid`).
pub fn new_descriptor(
    create_type: &str,
    capacity: u64,
    kind: ExtentKind,
    file: &str,
    offset: Option<u64>,
) -> Result<Descriptor, getrandom::Error> {
    let cylinders = capacity / (255 * 63);
    Ok(Descriptor {
        version: 1,
        cid: new_cid()?,
        parent_cid: NO_PARENT,
        create_type: create_type.to_string(),
        encoding: Some("UTF-8".to_string()),
        parent_hint: None,
        extents: vec![Extent {
            access: Access::ReadWrite,
            sectors: capacity,
            kind,
            file: file.to_string(),
            offset,
        }],
        extra: Vec::new(),
        ddb: vec![
            ("ddb.virtualHWVersion".into(), "4".into()),
            ("ddb.geometry.cylinders".into(), cylinders.to_string()),
            ("ddb.geometry.heads".into(), "255".into()),
            ("ddb.geometry.sectors".into(), "63".into()),
            ("ddb.adapterType".into(), "lsilogic".into()),
            ("ddb.uuid".into(), new_disk_uuid()?),
        ],
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const QEMU_FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=52d4c3c2\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 131072 FLAT \"ref-flat.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"130\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn parses_a_qemu_descriptor() {
        let d = Descriptor::parse(QEMU_FLAT.as_bytes()).unwrap();
        assert_eq!(d.version, 1);
        assert_eq!(d.cid, 0x52d4_c3c2);
        assert_eq!(d.parent_cid, NO_PARENT);
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(
            d.extents,
            vec![Extent {
                access: Access::ReadWrite,
                sectors: 131_072,
                kind: ExtentKind::Flat,
                file: "ref-flat.vmdk".into(),
                offset: Some(0),
            }]
        );
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        assert_eq!(d.ddb.len(), 6);
        // Windows line endings and trailing NUL padding are fine too.
        let crlf = QEMU_FLAT.replace('\n', "\r\n") + "\0\0\0garbage";
        assert_eq!(Descriptor::parse(crlf.as_bytes()).unwrap(), d);
    }

    #[test]
    fn new_descriptor_round_trips_and_has_a_uuid() {
        let d = new_descriptor(
            "monolithicSparse",
            2_097_152,
            ExtentKind::Sparse,
            "a b.vmdk",
            None,
        )
        .unwrap();
        let text = d.render();
        assert!(text.contains("createType=\"monolithicSparse\"\n"), "{text}");
        assert!(text.contains("RW 2097152 SPARSE \"a b.vmdk\"\n"), "{text}");
        // qemu finds the content id with strstr("CID"): it must come first.
        assert!(text.find("CID=").unwrap() < text.find("parentCID").unwrap());
        assert_eq!(Descriptor::parse(text.as_bytes()).unwrap(), d);
        let uuid = d.ddb("ddb.uuid").unwrap();
        assert_eq!(uuid.len(), 47);
        assert_eq!(uuid.as_bytes()[23], b'-');
        assert_ne!(new_disk_uuid().unwrap(), uuid);
        assert_eq!(d.ddb("ddb.geometry.cylinders"), Some("130"));
    }

    #[test]
    fn bad_descriptors_name_the_line() {
        let cases: &[(&str, &str)] = &[
            ("version=1\nCID=zz\ncreateType=\"x\"\n", "line 2"),
            (
                "version=1\nCID=1\nCID=2\ncreateType=\"x\"\n",
                "appears twice",
            ),
            (
                "version=1\nCID=1\ncreateType=\"x\"\nRW 12 FLAT noquote 0\n",
                "not quoted",
            ),
            (
                "version=1\nCID=1\ncreateType=\"x\"\nRW x FLAT \"f\" 0\n",
                "line 4",
            ),
            (
                "version=1\nCID=1\ncreateType=\"x\"\nRW 1 FLAT \"f\" -3\n",
                "offset",
            ),
            ("version=1\nCID=1\ncreateType=\"x\"\njunk line\n", "line 4"),
            ("version=1\ncreateType=\"x\"\n", "no CID"),
            ("CID=1\ncreateType=\"x\"\n", "no version"),
            ("version=1\nCID=1\n", "no createType"),
        ];
        for (text, want) in cases {
            let err = Descriptor::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let err = Descriptor::parse(b"version=1\n\xff\xfe").unwrap_err();
        assert_eq!(err, DescriptorError::NotText { offset: 10 });
        let big = vec![b'#'; MAX_DESCRIPTOR_BYTES + 1];
        assert!(matches!(
            Descriptor::parse(&big),
            Err(DescriptorError::TooLarge { .. })
        ));
    }

    fn word() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.]{1,12}"
    }

    fn descriptor() -> impl Strategy<Value = Descriptor> {
        (
            (0u32..4, any::<u32>(), any::<u32>(), word()),
            prop::option::of(word()),
            prop::option::of("[A-Za-z0-9 ._/-]{0,20}"),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        Access::ReadWrite,
                        Access::ReadOnly,
                        Access::NoAccess,
                    ]),
                    any::<u64>(),
                    prop::sample::select(vec!["SPARSE", "FLAT", "ZERO", "VMFS"]),
                    "[A-Za-z0-9 ._-]{0,20}",
                    prop::option::of(any::<u64>()),
                ),
                0..4,
            ),
            prop::collection::vec(("[a-zA-Z][a-zA-Z0-9]{0,8}", "[A-Za-z0-9 ._-]{0,16}"), 0..3),
            prop::collection::vec(("ddb\\.[a-zA-Z.]{1,12}", "[A-Za-z0-9 ._-]{0,16}"), 0..6),
        )
            .prop_map(
                |(
                    (version, cid, parent_cid, create_type),
                    encoding,
                    parent_hint,
                    extents,
                    extra,
                    ddb,
                )| {
                    Descriptor {
                        version,
                        cid,
                        parent_cid,
                        create_type,
                        encoding,
                        parent_hint,
                        extents: extents
                            .into_iter()
                            .map(|(access, sectors, kind, file, offset)| Extent {
                                access,
                                sectors,
                                kind: match kind {
                                    "SPARSE" => ExtentKind::Sparse,
                                    "FLAT" => ExtentKind::Flat,
                                    k => ExtentKind::Other(k.to_string()),
                                },
                                file,
                                offset,
                            })
                            .collect(),
                        extra: extra
                            .into_iter()
                            .filter(|(k, _)| {
                                !matches!(
                                    k.as_str(),
                                    "version"
                                        | "CID"
                                        | "parentCID"
                                        | "createType"
                                        | "encoding"
                                        | "parentFileNameHint"
                                )
                            })
                            .map(|(k, v)| (k, v.trim().to_string()))
                            .collect(),
                        ddb: ddb
                            .into_iter()
                            .map(|(k, v)| (k, v.trim().to_string()))
                            .collect(),
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// render then parse gives the same descriptor back.
        #[test]
        fn descriptor_round_trips(d in descriptor()) {
            let text = d.render();
            prop_assert_eq!(Descriptor::parse(text.as_bytes()), Ok(d));
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn parse_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Descriptor::parse(&bytes);
        }

        /// Arbitrary descriptor-like text never panics the parser.
        #[test]
        fn parse_arbitrary_text_never_panics(
            text in "([A-Za-z]{1,8}|RW|RDONLY|FLAT|SPARSE|=|\"|[0-9]{1,22}|-|#| |\t|\r|\n|\u{0}|\u{e9}){0,80}"
        ) {
            let _ = Descriptor::parse(text.as_bytes());
        }
    }
}
