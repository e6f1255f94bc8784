//! A small, lazy reader of BTF (`Documentation/bpf/btf.rst`): one pass
//! records where each type starts; names are compared in place when looked
//! up. The tool resolves a few dozen fields, so it never builds the full
//! type graph of vmlinux (5–6 MB of BTF, 150,000 types): start-up stays in
//! milliseconds and a few MiB.
//!
//! Split BTF (a module's, over vmlinux's) continues the base's type ids and
//! string offsets, as the kernel numbers them.

use std::fmt;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// Bytes of `struct btf_type`.
const TYPE_LEN: usize = 12;

/// BTF kinds (`BTF_KIND_*`).
pub mod kind {
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;
}

/// Why BTF could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtfError(String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

fn err<T>(what: impl Into<String>) -> Result<T, BtfError> {
    Err(BtfError(what.into()))
}

/// One BTF blob: its types and strings.
#[derive(Debug)]
struct Blob {
    data: Vec<u8>,
    /// Start and length of the string section in `data`.
    strs: usize,
    strs_len: usize,
    /// Offset of each type's record in `data`, by id minus the first id.
    offsets: Vec<u32>,
}

/// The kind in a type's `info` word (bits 24-28).
fn info_kind(info: u32) -> u8 {
    ((info >> 24) & 0x1f) as u8
}

/// The member, parameter or value count in a type's `info` word.
fn info_vlen(info: u32) -> usize {
    (info & 0xffff) as usize
}

/// Bytes a record of kind `k` carries after its `struct btf_type`; `None`
/// for a kind this reader does not know (the record's size is unknown).
fn extra_len(k: u8, vlen: usize) -> Option<usize> {
    Some(match k {
        kind::INT | kind::VAR | kind::DECL_TAG => 4,
        kind::ARRAY => 12,
        kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
        kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
        kind::PTR
        | kind::FWD
        | kind::TYPEDEF
        | kind::VOLATILE
        | kind::CONST
        | kind::RESTRICT
        | kind::FUNC
        | kind::FLOAT
        | kind::TYPE_TAG => 0,
        _ => return None,
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Blob {
    fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN {
            return err(format!(
                "{} bytes is too short for a BTF header",
                data.len()
            ));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != MAGIC {
            return err(format!("bad magic {magic:#06x} (not little-endian BTF)"));
        }
        if data[2] != 1 {
            return err(format!("unsupported BTF version {}", data[2]));
        }
        let field = |at| u32_at(&data, at).map_or(0, |v| v as usize);
        let hdr_len = field(4);
        let (type_off, type_len, str_off, str_len) = (field(8), field(12), field(16), field(20));
        let types = hdr_len.saturating_add(type_off);
        let strs = hdr_len.saturating_add(str_off);
        if hdr_len < HEADER_LEN
            || types.saturating_add(type_len) > data.len()
            || strs.saturating_add(str_len) > data.len()
        {
            return err("the BTF header's sections run past the end of the data");
        }
        let mut offsets = Vec::with_capacity(type_len / 16);
        let mut at = types;
        let end = types + type_len;
        while at < end {
            let Some(info) = u32_at(&data, at + 4) else {
                return err(format!("a type record is cut at byte {at}"));
            };
            let (k, vlen) = (info_kind(info), info_vlen(info));
            let Some(extra) = extra_len(k, vlen) else {
                return err(format!("unknown BTF kind {k} at byte {at}"));
            };
            let Ok(off) = u32::try_from(at) else {
                return err("BTF larger than 4 GiB");
            };
            offsets.push(off);
            at += TYPE_LEN + extra;
        }
        if at != end {
            return err("the last type record runs past the type section");
        }
        Ok(Self {
            data,
            strs,
            strs_len: str_len,
            offsets,
        })
    }

    fn str_at(&self, off: usize) -> Option<&[u8]> {
        if off >= self.strs_len {
            return None;
        }
        let s = &self.data[self.strs + off..self.strs + self.strs_len];
        Some(&s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())])
    }
}

/// vmlinux's BTF, or a module's split BTF over it.
#[derive(Debug)]
pub struct Btf {
    base: Option<Box<Btf>>,
    blob: Blob,
    /// The id of this blob's first type (1, or after the base's).
    first_id: u32,
    /// This blob's first string offset (0, or the base's string length).
    first_str: usize,
}

/// A type record, read in place.
#[derive(Clone, Copy)]
pub struct Type<'a> {
    pub id: u32,
    pub kind: u8,
    kind_flag: bool,
    vlen: usize,
    name_off: u32,
    /// `size` for ints, structs, unions, enums; `type` for the others.
    word: u32,
    extra: &'a [u8],
}

/// A struct or union member.
pub struct Member<'a> {
    pub name: &'a [u8],
    pub type_id: u32,
    pub bit_offset: u32,
}

impl Type<'_> {
    /// Byte size of an int, enum, struct or union.
    pub fn size(&self) -> u32 {
        self.word
    }

    /// The type this one refers to (pointer target, typedef, qualifier,
    /// func prototype).
    pub fn target(&self) -> u32 {
        self.word
    }

    /// Parameters of a func prototype; members of a struct or union.
    pub fn vlen(&self) -> usize {
        self.vlen
    }

    /// The element type of an array.
    pub fn array_elem(&self) -> Option<u32> {
        (self.kind == kind::ARRAY).then(|| u32_at(self.extra, 0))?
    }
}

impl Btf {
    /// Reads vmlinux's BTF (`/sys/kernel/btf/vmlinux`).
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        Ok(Self {
            base: None,
            blob: Blob::parse(data)?,
            first_id: 1,
            first_str: 0,
        })
    }

    /// Reads a module's split BTF over `base`.
    pub fn parse_split(data: Vec<u8>, base: Self) -> Result<Self, BtfError> {
        let blob = Blob::parse(data)?;
        let first_id = base.end_id();
        let first_str = base.end_str();
        Ok(Self {
            base: Some(Box::new(base)),
            blob,
            first_id,
            first_str,
        })
    }

    /// The id of this blob's first type: a module's own types are those
    /// from here on.
    pub fn first_id(&self) -> u32 {
        self.first_id
    }

    /// One past the last type id.
    fn end_id(&self) -> u32 {
        self.first_id
            .saturating_add(u32::try_from(self.blob.offsets.len()).unwrap_or(u32::MAX))
    }

    fn end_str(&self) -> usize {
        self.first_str + self.blob.strs_len
    }

    /// Number of types, the base's included.
    pub fn len(&self) -> usize {
        self.end_id() as usize - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name at string offset `off`.
    pub fn name(&self, off: u32) -> &[u8] {
        let off = off as usize;
        if off < self.first_str {
            return self.base.as_ref().map_or(&[][..], |b| b.name(off as u32));
        }
        self.blob.str_at(off - self.first_str).unwrap_or(&[])
    }

    pub fn type_name(&self, t: &Type<'_>) -> &[u8] {
        self.name(t.name_off)
    }

    /// The type with id `id` (0 is void: `None`).
    pub fn get(&self, id: u32) -> Option<Type<'_>> {
        if id < self.first_id {
            return self.base.as_ref()?.get(id);
        }
        let at = *self.blob.offsets.get((id - self.first_id) as usize)? as usize;
        let d = &self.blob.data;
        let name_off = u32_at(d, at)?;
        let info = u32_at(d, at + 4)?;
        let word = u32_at(d, at + 8)?;
        let (k, vlen) = (info_kind(info), info_vlen(info));
        // Every record's kind was checked when the blob was indexed.
        let extra = d.get(at + TYPE_LEN..at + TYPE_LEN + extra_len(k, vlen)?)?;
        Some(Type {
            id,
            kind: k,
            kind_flag: info >> 31 == 1,
            vlen,
            name_off,
            word,
            extra,
        })
    }

    /// The types named `name` of one of `kinds`, this blob's after the
    /// base's, in id order.
    pub fn by_name<'a>(&'a self, name: &'a str, kinds: &'a [u8]) -> impl Iterator<Item = Type<'a>> {
        let base: Box<dyn Iterator<Item = Type<'a>>> = match &self.base {
            Some(b) => Box::new(b.by_name(name, kinds)),
            None => Box::new(std::iter::empty()),
        };
        let want = name.as_bytes();
        let d = &self.blob.data;
        let own = self
            .blob
            .offsets
            .iter()
            .enumerate()
            .filter(move |&(_, &at)| {
                let at = at as usize;
                let info = u32_at(d, at + 4).unwrap_or(0);
                kinds.contains(&info_kind(info))
                    && u32_at(d, at).is_some_and(|off| self.name(off) == want)
            })
            .filter_map(move |(i, _)| self.get(self.first_id + i as u32));
        base.chain(own)
    }

    /// The members of a struct or union.
    pub fn members<'a>(&'a self, t: &Type<'a>) -> impl Iterator<Item = Member<'a>> {
        let bitfields = t.kind_flag;
        let extra = if matches!(t.kind, kind::STRUCT | kind::UNION) {
            t.extra
        } else {
            &[]
        };
        extra.chunks_exact(12).map(move |m| {
            let name_off = u32_at(m, 0).unwrap_or(0);
            let offset = u32_at(m, 8).unwrap_or(0);
            Member {
                name: self.name(name_off),
                type_id: u32_at(m, 4).unwrap_or(0),
                bit_offset: if bitfields {
                    offset & 0x00ff_ffff
                } else {
                    offset
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of these type records and strings, behind its header.
    fn with_header(types: &[u8], strs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        let (t, s) = (types.len() as u32, strs.len() as u32);
        for w in [24u32, 0, t, t, s] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(types);
        out.extend_from_slice(strs);
        out
    }

    /// A tiny BTF blob: `int` (4 bytes), `struct s { int a; int *b; }`,
    /// `typedef struct s s_t`.
    fn blob() -> Vec<u8> {
        let strs = b"\0int\0s\0a\0b\0s_t\0".to_vec();
        let mut types = Vec::new();
        let mut rec = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // [1] int: name "int"(1), kind INT, size 4, encoding: signed, 32 bits
        rec(&[1, u32::from(kind::INT) << 24, 4, (1 << 24) | 32]);
        // [2] ptr to [1]
        rec(&[0, u32::from(kind::PTR) << 24, 1]);
        // [3] struct s, 2 members, size 16
        rec(&[5, (u32::from(kind::STRUCT) << 24) | 2, 16]);
        rec(&[7, 1, 0]); // a: int at bit 0
        rec(&[9, 2, 64]); // b: int * at bit 64
        // [4] typedef s_t -> [3]
        rec(&[11, u32::from(kind::TYPEDEF) << 24, 3]);
        with_header(&types, &strs)
    }

    #[test]
    fn reads_types_members_and_names() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(btf.len(), 4);
        let s = btf.by_name("s", &[kind::STRUCT]).next().unwrap();
        assert_eq!((s.id, s.size(), s.vlen()), (3, 16, 2));
        let m: Vec<_> = btf
            .members(&s)
            .map(|m| {
                (
                    String::from_utf8_lossy(m.name).into_owned(),
                    m.type_id,
                    m.bit_offset,
                )
            })
            .collect();
        assert_eq!(m, [("a".into(), 1, 0), ("b".into(), 2, 64)]);
        assert_eq!(btf.get(2).unwrap().target(), 1);
        assert_eq!(
            btf.by_name("s_t", &[kind::TYPEDEF])
                .next()
                .unwrap()
                .target(),
            3
        );
        assert!(btf.by_name("s", &[kind::UNION]).next().is_none());
        assert!(btf.get(0).is_none() && btf.get(5).is_none());
    }

    #[test]
    fn split_btf_continues_ids_and_strings() {
        let base = Btf::parse(blob()).unwrap();
        let base_strs = base.end_str() as u32;
        let strs = b"\0m\0x\0".to_vec();
        let mut types = Vec::new();
        // [5] struct m { s_t x; } size 16; name at split offset 1.
        for w in [
            base_strs + 1,
            (u32::from(kind::STRUCT) << 24) | 1,
            16,
            base_strs + 3,
            4,
            0,
        ] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        let btf = Btf::parse_split(with_header(&types, &strs), base).unwrap();
        let m = btf.by_name("m", &[kind::STRUCT]).next().unwrap();
        assert_eq!(m.id, 5);
        let x = btf.members(&m).next().unwrap();
        assert_eq!(x.name, b"x");
        assert_eq!(btf.get(x.type_id).unwrap().kind, kind::TYPEDEF);
        assert_eq!(btf.by_name("s", &[kind::STRUCT]).next().unwrap().id, 3);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(Btf::parse(vec![0; 10]).unwrap_err().0.contains("too short"));
        let mut b = blob();
        b[0] = 0;
        assert!(Btf::parse(b).unwrap_err().0.contains("magic"));
        let mut b = blob();
        b.truncate(b.len() - 20);
        assert!(Btf::parse(b).unwrap_err().0.contains("past the end"));
        let mut b = blob();
        b[24 + 7] = 30; // kind 30 in the first record's info
        assert!(Btf::parse(b).unwrap_err().0.contains("unknown BTF kind"));
    }
}
