//! Serde helpers: `u64` values (kernel pointers, physical addresses) as
//! `"0x…"` strings, since JSON numbers above 2^53 lose precision in most
//! readers.

use serde::{Deserialize, Deserializer, Serializer, de::Error};

fn parse<E: Error>(s: &str) -> Result<u64, E> {
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| E::custom(format!("expected a 0x-prefixed hex string, got {s:?}")))?;
    u64::from_str_radix(digits, 16).map_err(|e| E::custom(format!("bad hex {s:?}: {e}")))
}

pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = std::borrow::Cow::<str>::deserialize(d)?;
    parse(&s)
}

/// The same for `Option<u64>`.
pub mod opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<std::borrow::Cow<'de, str>>::deserialize(d)? {
            Some(s) => super::parse(&s).map(Some),
            None => Ok(None),
        }
    }
}
