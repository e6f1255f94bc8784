//! `/proc/kallsyms`: which functions and tracepoints exist as symbols.
//!
//! A function that is not a text symbol was inlined (or is absent) and can't
//! take a kprobe. A raw tracepoint `X` exists where the kernel or a module
//! defines `__bpf_trace_X`, the BPF trampoline that raw tracepoints run.

use std::hash::BuildHasher as _;

use foldhash::{HashMap, fast::FixedState};

/// Where a symbol lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The kallsyms type letter (`T`, `t`, `D`, ...).
    pub kind: char,
    /// Its address (0 where kallsyms hides addresses from this user).
    pub addr: u64,
    /// The module, or `None` for vmlinux.
    pub module: Option<String>,
}

/// Parsed kallsyms: the text as read, and where each name's first line
/// starts, keyed by the name's hash (no string per symbol: kallsyms has
/// over 100,000 of them, and the tool looks up a few dozen).
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    text: Vec<u8>,
    /// Name hash → start of the first line with a name of that hash; a
    /// name whose hash another name took first is found by a scan.
    by_hash: HashMap<u64, u32>,
}

/// A fast hash, fixed: the names are the kernel's, and a colliding name is
/// found by a scan anyway.
fn name_hash(name: &[u8]) -> u64 {
    FixedState::default().hash_one(name)
}

/// The name of a line as the kernel prints it (`%px %c %s\t[%s]`, 64-bit
/// addresses), without splitting the whole line; `None` for anything else.
fn fast_name(line: &[u8]) -> Option<&[u8]> {
    if line.len() > 19 && line[16] == b' ' && line[18] == b' ' {
        let name = &line[19..];
        let end = name
            .iter()
            .position(|&b| b == b'\t' || b == b' ')
            .unwrap_or(name.len());
        (end > 0).then(|| &name[..end])
    } else {
        None
    }
}

/// One kallsyms line: `address type name [module]`.
struct Line<'a> {
    addr: &'a [u8],
    kind: u8,
    name: &'a [u8],
    module: Option<&'a [u8]>,
}

fn fields(line: &[u8]) -> Option<Line<'_>> {
    let mut it = line
        .split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty());
    let (addr, kind, name) = (it.next()?, it.next()?, it.next()?);
    let module = it.next().map(|m| {
        let m = m.strip_prefix(b"[").unwrap_or(m);
        m.strip_suffix(b"]").unwrap_or(m)
    });
    Some(Line {
        addr,
        kind: *kind.first()?,
        name,
        module,
    })
}

impl Symbols {
    /// Indexes kallsyms text: `address type name [module]` per line.
    /// Lines that don't fit are skipped; a name's first line counts.
    pub fn parse(text: Vec<u8>) -> Self {
        let mut by_hash = HashMap::with_capacity_and_hasher(
            text.len() / 40,
            foldhash::fast::RandomState::default(),
        );
        let mut start = 0usize;
        for line in text.split(|&b| b == b'\n') {
            let at = start;
            start += line.len() + 1;
            let Some(name) = fast_name(line).or_else(|| fields(line).map(|l| l.name)) else {
                continue;
            };
            let Ok(at) = u32::try_from(at) else {
                break;
            };
            by_hash.entry(name_hash(name)).or_insert(at);
        }
        Self { text, by_hash }
    }

    /// Distinct symbol names.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The first line naming `name`.
    fn get(&self, name: &str) -> Option<Symbol> {
        let want = name.as_bytes();
        let at = *self.by_hash.get(&name_hash(want))? as usize;
        let line_at = |at: usize| {
            let rest = &self.text[at..];
            &rest[..rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())]
        };
        let symbol = |line| {
            let Line {
                addr,
                kind,
                name: n,
                module,
            } = fields(line)?;
            (n == want).then(|| Symbol {
                kind: char::from(kind),
                addr: std::str::from_utf8(addr)
                    .ok()
                    .and_then(|a| u64::from_str_radix(a, 16).ok())
                    .unwrap_or(0),
                module: module.map(|m| String::from_utf8_lossy(m).into_owned()),
            })
        };
        // Another name with the same hash came first: scan for this one.
        symbol(line_at(at)).or_else(|| self.text.split(|&b| b == b'\n').find_map(symbol))
    }

    /// A function symbol (text, local or global), where kprobes can attach.
    pub fn function(&self, name: &str) -> Option<Symbol> {
        self.get(name).filter(|s| matches!(s.kind, 't' | 'T'))
    }

    /// The address of a data symbol of vmlinux (a kernel variable), when
    /// kallsyms shows it.
    pub fn variable(&self, name: &str) -> Option<u64> {
        self.get(name)
            .filter(|s| matches!(s.kind, 'd' | 'D' | 'b' | 'B' | 'r' | 'R') && s.module.is_none())
            .map(|s| s.addr)
            .filter(|&a| a != 0)
    }

    /// Whether raw tracepoint `name` exists.
    pub fn has_raw_tracepoint(&self, name: &str) -> bool {
        self.function(&format!("__bpf_trace_{name}")).is_some()
    }

    /// Whether any symbol belongs to `module`.
    pub fn has_module(&self, module: &str) -> bool {
        self.text
            .split(|&b| b == b'\n')
            .any(|l| fields(l).and_then(|f| f.module) == Some(module.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast name reader agrees with the full split on every line of the
    /// kallsyms captured from real kernels, and reads most of them.
    #[test]
    fn fast_names_are_the_split_names() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kernels");
        let mut fast = 0;
        for kernel in std::fs::read_dir(&dir).unwrap() {
            let Ok(text) = std::fs::read(kernel.unwrap().path().join("proc/kallsyms")) else {
                continue;
            };
            for line in text.split(|&b| b == b'\n') {
                if let Some(name) = fast_name(line) {
                    fast += 1;
                    assert_eq!(Some(name), fields(line).map(|l| l.name), "{line:?}");
                }
            }
        }
        assert!(fast > 1000, "{fast}");
    }

    #[test]
    fn parses_vmlinux_and_module_symbols() {
        let s = Symbols::parse(
            b"ffffffff812e1bf0 T kvm_mmu_load\n\
             0000000000000000 t kvm_mmu_zap_all_fast\t[kvm]\n\
             ffffffff81295ac0 t __bpf_trace_kvm_entry\n\
             ffffffff81000000 D some_data\n\
             ffffffff81000001 D some_data\n\
             garbage\n"
                .to_vec(),
        );
        assert_eq!(s.len(), 4);
        assert_eq!(s.function("kvm_mmu_load").unwrap().module, None);
        assert_eq!(
            s.function("kvm_mmu_zap_all_fast")
                .unwrap()
                .module
                .as_deref(),
            Some("kvm")
        );
        assert!(s.function("some_data").is_none(), "data is not a function");
        assert_eq!(s.variable("some_data"), Some(0xffff_ffff_8100_0000));
        assert_eq!(s.variable("kvm_mmu_load"), None, "a function is not data");
        assert!(s.function("mmu_alloc_direct_roots").is_none());
        assert!(s.has_raw_tracepoint("kvm_entry"));
        assert!(!s.has_raw_tracepoint("kvm_exit"));
        assert!(s.has_module("kvm"));
        assert!(!s.has_module("kvm_intel"));
    }
}
