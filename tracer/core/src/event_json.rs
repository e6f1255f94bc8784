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
        let len = self.b[start..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
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
        let digits = self.b[start..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 || digits > 20 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        self.at += digits;
        if matches!(self.b.get(self.at), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        // 20 digits can pass u64::MAX: checked, where 19 never overflow.
        let v = self.b[start..self.at].iter().try_fold(0u64, |v, &c| {
            v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        })?;
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
        let s = self.string()?;
        u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
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
