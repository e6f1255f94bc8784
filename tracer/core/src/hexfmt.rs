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

/// `"0x…"` for a `u64`, formatted on the stack: encoding an event allocates
/// nothing.
pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 18];
    let mut i = buf.len();
    let mut n = *v;
    loop {
        i -= 1;
        buf[i] = DIGITS[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[i - 2] = b'0';
    buf[i - 1] = b'x';
    s.serialize_str(std::str::from_utf8(&buf[i - 2..]).expect("ASCII digits"))
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

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_alternate_hex() {
        for v in [0, 1, 0xf, 0x10, 0xdead_beef, u64::MAX, 1 << 63] {
            let mut out = Vec::new();
            super::serialize(&v, &mut serde_json::Serializer::new(&mut out)).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{v:#x}\""));
        }
    }
}
