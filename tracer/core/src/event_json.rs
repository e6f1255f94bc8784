//! A fast path for reading the event records the tool itself writes: one
//! scan of the line, no intermediate values, no allocation. It accepts only
//! the exact shape the writer produces (no whitespace, no escapes, no
//! `null`, no floats) and gives up (`None`) on anything else, which then
//! goes through serde, so errors, and what is accepted, are serde's. Where
//! it answers, it answers what serde would: `tracer/core/tests/event_json.rs`
//! checks that on written events and on mutated lines.

use std::borrow::Cow;

use common::ProbeId;

use crate::event::{Comm, Event, Kind};

/// The line's text after `{"record":"event",`.
const PREFIX: &str = "{\"record\":\"event\",";

/// The bytes that end the fast read of a string: its closing quote, and
/// what only serde reads (an escape, a control character).
const STOPS_STRING: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// A mask with the high bit set in a byte of `word` that is a
/// [`STOPS_STRING`] byte, exact for the lowest such byte (bytes above it may
/// be set too: the borrow of the subtractions), or 0 when there is none.
fn stops_in(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    let quote = zero_in(word ^ (ONES * u64::from(b'"')));
    let escape = zero_in(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word;
    (quote | escape | control) & HIGH
}

/// Hex digit values; 16 and up for anything else.
const HEX: [u8; 256] = {
    let mut t = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

struct Scan<'a> {
    text: &'a str,
    b: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.b.get(self.at) == Some(&c)).then(|| self.at += 1)
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        // One pass: the closing quote, unless an escape or a control
        // character comes first (then serde reads the line).
        let rest = &self.b[start..];
        let mut len = 0;
        // Eight bytes at a time (the lowest stop's byte from the mask), the
        // tail byte by byte.
        loop {
            if let Some(word) = rest.get(len..len + 8) {
                let stops = stops_in(u64::from_le_bytes(word.try_into().ok()?));
                if stops == 0 {
                    len += 8;
                    continue;
                }
                len += stops.trailing_zeros() as usize / 8;
            } else {
                len += rest[len..]
                    .iter()
                    .position(|&c| STOPS_STRING[usize::from(c)])?;
            }
            break;
        }
        if self.b[start + len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // Quotes are ASCII: both ends are character boundaries.
        self.text.get(start..start + len)
    }

    /// An integer as JSON writes it (`0`, or no leading zero; `-` where
    /// `signed`), not followed by a fraction or exponent.
    fn integer(&mut self, signed: bool) -> Option<i128> {
        let neg = signed && self.eat(b'-').is_some();
        let start = self.at;
        // One pass: 19 digits never overflow a u64; a 20th is checked.
        let mut v = 0u64;
        let mut digits = 0;
        while let Some(&c) = self.b.get(start + digits) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            v = if digits < 19 {
                v * 10 + u64::from(d)
            } else {
                v.checked_mul(10)?.checked_add(u64::from(d))?
            };
            digits += 1;
        }
        if digits == 0 || digits > 20 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        self.at += digits;
        if matches!(self.b.get(self.at), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let v = i128::from(v);
        Some(if neg { -v } else { v })
    }

    fn unsigned<T: TryFrom<i128>>(&mut self) -> Option<T> {
        T::try_from(self.integer(false)?).ok()
    }

    fn signed<T: TryFrom<i128>>(&mut self) -> Option<T> {
        T::try_from(self.integer(true)?).ok()
    }

    fn boolean(&mut self) -> Option<bool> {
        let rest = &self.b[self.at..];
        if rest.starts_with(b"true") {
            self.at += 4;
            Some(true)
        } else if rest.starts_with(b"false") {
            self.at += 5;
            Some(false)
        } else {
            None
        }
    }

    /// A `"0x…"` string, read as `hexfmt` reads it.
    fn hex(&mut self) -> Option<u64> {
        let digits = self.string()?.strip_prefix("0x")?;
        // 1 to 16 hex digits, as the writer writes them, decoded here;
        // anything else (a sign, more digits) the way hexfmt reads it.
        if (1..=16).contains(&digits.len()) {
            let mut v = 0u64;
            for &c in digits.as_bytes() {
                let d = HEX[usize::from(c)];
                if d > 15 {
                    return u64::from_str_radix(digits, 16).ok();
                }
                v = (v << 4) | u64::from(d);
            }
            return Some(v);
        }
        u64::from_str_radix(digits, 16).ok()
    }
}

/// Which fields were seen, for duplicates (serde refuses them) and the
/// required ones.
#[derive(Default)]
struct Seen(u32);

impl Seen {
    fn first(&mut self, bit: u32) -> Option<()> {
        let mask = 1 << bit;
        (self.0 & mask == 0).then(|| self.0 |= mask)
    }
}

fn kind(name: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.name() == name)
}

/// The probe's name, borrowed when it is one of ours (no allocation).
fn probe(name: &str) -> Cow<'static, str> {
    ProbeId::ALL
        .into_iter()
        .map(ProbeId::program_name)
        .chain(["model"])
        .find(|p| *p == name)
        .map_or_else(|| Cow::Owned(name.to_owned()), Cow::Borrowed)
}

/// The event of a line the writer wrote, or `None` for serde to read.
#[expect(
    clippy::too_many_lines,
    reason = "one arm per field of the event, as the struct lists them"
)]
pub fn parse_event(text: &str) -> Option<Event> {
    let mut s = Scan {
        text,
        b: text.as_bytes(),
        at: 0,
    };
    s.b.starts_with(PREFIX.as_bytes()).then_some(())?;
    s.at = PREFIX.len();
    let mut seen = Seen::default();
    let mut ev = Event::bare(Kind::LoadEnter, 0);
    loop {
        let key = s.string()?;
        s.eat(b':')?;
        match key {
            "ts_ns" => {
                seen.first(0)?;
                ev.ts_ns = s.unsigned()?;
            }
            "kind" => {
                seen.first(1)?;
                ev.kind = kind(s.string()?)?;
            }
            "probe" => {
                seen.first(2)?;
                ev.probe = probe(s.string()?);
            }
            "cpu" => {
                seen.first(3)?;
                ev.cpu = s.unsigned()?;
            }
            "pid" => {
                seen.first(4)?;
                ev.pid = s.unsigned()?;
            }
            "tid" => {
                seen.first(5)?;
                ev.tid = s.unsigned()?;
            }
            "comm" => {
                seen.first(6)?;
                ev.comm = Comm::new(s.string()?).ok()?;
            }
            "kvm" => {
                seen.first(7)?;
                ev.kvm = Some(s.hex()?);
            }
            "vcpu" => {
                seen.first(8)?;
                ev.vcpu = Some(s.hex()?);
            }
            "vcpu_id" => {
                seen.first(9)?;
                ev.vcpu_id = Some(s.signed()?);
            }
            "userspace_pid" => {
                seen.first(10)?;
                ev.userspace_pid = Some(s.signed()?);
            }
            "vm_type" => {
                seen.first(11)?;
                ev.vm_type = Some(s.unsigned()?);
            }
            "root_hpa" => {
                seen.first(12)?;
                ev.root_hpa = Some(s.hex()?);
            }
            "root_pgd" => {
                seen.first(13)?;
                ev.root_pgd = Some(s.hex()?);
            }
            "mirror_root_hpa" => {
                seen.first(14)?;
                ev.mirror_root_hpa = Some(s.hex()?);
            }
            "root_role" => {
                seen.first(15)?;
                ev.root_role = Some(s.unsigned()?);
            }
            "mirror_role" => {
                seen.first(16)?;
                ev.mirror_role = Some(s.unsigned()?);
            }
            "mirror_stale" => {
                seen.first(17)?;
                ev.mirror_stale = Some(s.boolean()?);
            }
            "mmu_valid_gen" => {
                seen.first(18)?;
                ev.mmu_valid_gen = Some(s.unsigned()?);
            }
            "memslots_gen" => {
                seen.first(19)?;
                ev.memslots_gen = Some(s.unsigned()?);
            }
            "ret" => {
                seen.first(20)?;
                ev.ret = Some(s.signed()?);
            }
            "arg" => {
                seen.first(21)?;
                ev.arg = Some(s.unsigned()?);
            }
            "before_hpa" => {
                seen.first(22)?;
                ev.before_hpa = Some(s.hex()?);
            }
            "duration_ns" => {
                seen.first(23)?;
                ev.duration_ns = Some(s.unsigned()?);
            }
            // Fields the event doesn't have (`time`, `host`, a repeated
            // `record`): serde skips them; strings and integers only here.
            _ => {
                if s.b.get(s.at) == Some(&b'"') {
                    s.string()?;
                } else {
                    s.integer(true)?;
                }
            }
        }
        if s.eat(b',').is_none() {
            break;
        }
    }
    s.eat(b'}')?;
    // The required fields, and nothing after the object.
    (seen.0 & 0x7f == 0x7f && s.at == s.b.len()).then_some(ev)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{STOPS_STRING, stops_in};

    /// The first stop byte of a word, byte by byte.
    fn first_stop(bytes: [u8; 8]) -> Option<usize> {
        bytes.iter().position(|&c| STOPS_STRING[usize::from(c)])
    }

    fn lowest(word: u64) -> Option<usize> {
        (word != 0).then(|| word.trailing_zeros() as usize / 8)
    }

    /// Every byte value at every position, among bytes that don't stop.
    #[test]
    fn the_word_mask_finds_each_stop_byte_where_it_is() {
        for pos in 0..8 {
            for c in 0..=255u8 {
                let mut bytes = *b"0xffff88";
                bytes[pos] = c;
                let want = first_stop(bytes);
                assert_eq!(
                    lowest(stops_in(u64::from_le_bytes(bytes))),
                    want,
                    "{bytes:?}"
                );
            }
        }
    }

    proptest! {
        /// Any word: the lowest byte the mask marks is the first stop byte
        /// (the borrows only mark bytes above it).
        #[test]
        fn the_word_mask_agrees_with_the_byte_scan(bytes in any::<[u8; 8]>()) {
            prop_assert_eq!(lowest(stops_in(u64::from_le_bytes(bytes))), first_stop(bytes));
        }
    }
}
