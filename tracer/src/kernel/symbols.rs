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

/// Parsed kallsyms: the lines of the names the tool asks about (or every
/// line), where each name's first line starts keyed by the name's hash, and
/// which modules have symbols. kallsyms has over 100,000 symbols (5-8 MB of
/// text) and the tool looks up a dozen: keeping only those lines keeps the
/// start-up peak down by about 10 MiB.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    text: Vec<u8>,
    /// Name hash → start of the first line with a name of that hash; a
    /// name whose hash another name took first is found by a scan.
    by_hash: HashMap<u64, u32>,
    /// Modules named by any line, in the order they first appear.
    modules: Vec<String>,
    /// Symbol lines read.
    lines: usize,
    /// The names kept, or `None` when every line is.
    only: Option<&'static [&'static str]>,
    /// Found by name ([`super::ksym`]) rather than read from kallsyms: no
    /// types, no modules.
    looked_up: bool,
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

/// The module of a line whose name is `name` (a slice of `line`).
fn module_after<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let end = name.as_ptr() as usize - line.as_ptr() as usize + name.len();
    let rest = line[end..].trim_ascii();
    let m = rest.strip_prefix(b"[")?;
    Some(m.strip_suffix(b"]").unwrap_or(m))
}

/// How much of kallsyms is read per system call when it is streamed.
const CHUNK: usize = 256 << 10;

/// More than this is no kernel's kallsyms (5-8 MB on distribution kernels):
/// an endless file (`/dev/zero` given with `doctor --root`) stops here.
const MAX_BYTES: u64 = 256 << 20;

impl Symbols {
    /// Indexes kallsyms text: `address type name [module]` per line, every
    /// line kept. Lines that don't fit are skipped; a name's first line
    /// counts.
    pub fn parse(text: &[u8]) -> Self {
        let mut s = Self::default();
        s.scan(text);
        s.index();
        s
    }

    /// Reads kallsyms from `reader` a chunk at a time, keeping only the
    /// lines naming one of `only`: the full text is never held.
    pub fn read_only(
        mut reader: impl std::io::Read,
        only: &'static [&'static str],
    ) -> std::io::Result<Self> {
        let mut s = Self {
            only: Some(only),
            ..Self::default()
        };
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        // Inside a line longer than a chunk (no kernel prints one; a file
        // given with `doctor --root` might): dropped up to its newline, so
        // the buffer never grows.
        let mut skipping = false;
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n as u64;
            if total > MAX_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("over {} MiB: not a kernel's kallsyms", MAX_BYTES >> 20),
                ));
            }
            filled += n;
            let whole = if n == 0 {
                filled
            } else {
                buf[..filled]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1)
            };
            if whole == 0 && filled == buf.len() {
                filled = 0;
                skipping = true;
                continue;
            }
            let mut text = &buf[..whole];
            if skipping {
                match text.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        text = &text[end + 1..];
                        skipping = false;
                    }
                    None => text = &[],
                }
            }
            s.scan(text);
            buf.copy_within(whole..filled, 0);
            filled -= whole;
            if n == 0 {
                break;
            }
        }
        s.index();
        Ok(s)
    }

    /// The addresses of `only`, each found by `address` (a lookup by name):
    /// a symbol of unknown type (`?`) and module for each name found.
    pub fn looked_up(
        only: &'static [&'static str],
        mut address: impl FnMut(&str) -> std::io::Result<Option<u64>>,
    ) -> std::io::Result<Self> {
        let mut s = Self {
            only: Some(only),
            looked_up: true,
            ..Self::default()
        };
        for name in only {
            if let Some(addr) = address(name)? {
                s.text
                    .extend_from_slice(format!("{addr:016x} ? {name}\n").as_bytes());
                s.lines += 1;
            }
        }
        s.index();
        Ok(s)
    }

    /// Whether the symbols were found by name, without types or modules.
    pub fn is_looked_up(&self) -> bool {
        self.looked_up
    }

    /// Counts the lines of `text` (whole lines), notes their modules and
    /// keeps the ones asked for.
    fn scan(&mut self, text: &[u8]) {
        for line in text.split(|&b| b == b'\n') {
            let Some(name) = fast_name(line).or_else(|| fields(line).map(|l| l.name)) else {
                continue;
            };
            self.lines += 1;
            if let Some(module) = module_after(line, name)
                && self.modules.last().is_none_or(|m| m.as_bytes() != module)
                && !self.modules.iter().any(|m| m.as_bytes() == module)
            {
                self.modules
                    .push(String::from_utf8_lossy(module).into_owned());
            }
            if self
                .only
                .is_none_or(|only| only.iter().any(|o| o.as_bytes() == name))
            {
                self.text.extend_from_slice(line);
                self.text.push(b'\n');
            }
        }
    }

    /// Finds each kept name's first line.
    fn index(&mut self) {
        let mut by_hash = HashMap::with_capacity_and_hasher(
            self.text.len() / 40,
            foldhash::fast::RandomState::default(),
        );
        let mut start = 0usize;
        for line in self.text.split(|&b| b == b'\n') {
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
        self.by_hash = by_hash;
    }

    /// Symbol lines read (names found, when looked up).
    pub fn len(&self) -> usize {
        self.lines
    }

    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// The first line naming `name`.
    fn get(&self, name: &str) -> Option<Symbol> {
        debug_assert!(
            self.only.is_none_or(|only| only.contains(&name)),
            "{name} is looked up but not kept from kallsyms: add it to the names read"
        );
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

    /// A function symbol (text, local or global), where kprobes can attach;
    /// a symbol looked up by name (type `?`) counts.
    pub fn function(&self, name: &str) -> Option<Symbol> {
        self.get(name).filter(|s| matches!(s.kind, 't' | 'T' | '?'))
    }

    /// The address of a data symbol of vmlinux (a kernel variable), when
    /// kallsyms shows it.
    pub fn variable(&self, name: &str) -> Option<u64> {
        self.get(name)
            .filter(|s| {
                matches!(s.kind, 'd' | 'D' | 'b' | 'B' | 'r' | 'R' | '?') && s.module.is_none()
            })
            .map(|s| s.addr)
            .filter(|&a| a != 0)
    }

    /// Whether raw tracepoint `name` exists.
    pub fn has_raw_tracepoint(&self, name: &str) -> bool {
        self.function(&format!("__bpf_trace_{name}")).is_some()
    }

    /// Whether any symbol belongs to `module` (never, when looked up).
    pub fn has_module(&self, module: &str) -> bool {
        self.modules.iter().any(|m| m == module)
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
             garbage\n",
        );
        assert_eq!(s.len(), 5, "symbol lines, a repeated name included");
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

    /// A reader that returns at most `step` bytes per read: lines cut at
    /// every place a chunk can end.
    struct Trickle<'a> {
        text: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.text.len());
            buf[..n].copy_from_slice(&self.text[..n]);
            self.text = &self.text[n..];
            Ok(n)
        }
    }

    const WANTED: &[&str] = &["kvm_mmu_load", "vmemmap_base", "__bpf_trace_kvm_entry"];

    /// Streaming keeps only the names asked for, whatever the chunks, and
    /// still counts every line and sees every module.
    #[test]
    fn streaming_keeps_only_the_names_asked_for() {
        let text = b"ffffffff812e1bf0 T kvm_mmu_load\n\
                     ffffffff81000000 D vmemmap_base\n\
                     ffffffff81000010 D not_wanted\n\
                     0000000000000000 t kvm_mmu_zap_all_fast\t[kvm]\n\
                     0000000000000000 t __bpf_trace_kvm_entry\t[kvm]\n\
                     0000000000000000 t vmx_vcpu_run\t[kvm_intel]\n\
                     0000000000000000 t last_line_without_newline\t[kvm]";
        for step in [1, 7, 19, 64, text.len()] {
            let s = Symbols::read_only(Trickle { text, step }, WANTED).unwrap();
            assert_eq!(s.len(), 7, "step {step}");
            assert_eq!(s.variable("vmemmap_base"), Some(0xffff_ffff_8100_0000));
            assert_eq!(
                s.function("__bpf_trace_kvm_entry")
                    .unwrap()
                    .module
                    .as_deref(),
                Some("kvm")
            );
            assert!(s.function("kvm_mmu_load").is_some());
            assert!(s.has_module("kvm") && s.has_module("kvm_intel"));
            assert!(!s.has_module("kvm_amd"));
            assert!(!s.is_looked_up());
            assert_eq!(s.by_hash.len(), 3, "the lines kept");
        }
    }

    /// A line longer than a chunk is dropped whole, without the buffer
    /// growing, and the lines after it still count.
    #[test]
    fn a_line_longer_than_a_chunk_is_dropped_not_held() {
        let mut text = b"ffffffff81000000 D vmemmap_base\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 3 * CHUNK + 5));
        text.extend_from_slice(b" tail of the long line\nffffffff812e1bf0 T kvm_mmu_load\n");
        for step in [4096, CHUNK, text.len()] {
            let s = Symbols::read_only(Trickle { text: &text, step }, WANTED).unwrap();
            assert!(s.function("kvm_mmu_load").is_some(), "step {step}");
            assert_eq!(s.variable("vmemmap_base"), Some(0xffff_ffff_8100_0000));
            assert_eq!(s.len(), 2, "step {step}: the long line is no symbol");
        }
    }

    /// An endless input ends with an error, not a hang.
    #[test]
    fn an_endless_input_is_refused() {
        let e = Symbols::read_only(std::io::repeat(b'x'), WANTED).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("not a kernel's kallsyms"), "{e}");
        let e = Symbols::read_only(std::io::repeat(b'\n'), WANTED).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    /// A name looked up for but not kept is a bug in the caller's list: a
    /// debug build says so rather than answer "absent".
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "not kept from kallsyms")]
    fn a_lookup_outside_the_kept_names_fails_loudly() {
        let text = b"ffffffff812e1bf0 T kvm_mmu_load\n";
        let s = Symbols::read_only(&text[..], WANTED).unwrap();
        let _ = s.function("kvm_mmu_destroy");
    }

    /// Symbols found by name: no type letter, no module; functions and
    /// variables both answer, absent names don't, and an error stops.
    #[test]
    fn looked_up_symbols_answer_by_name() {
        let s = Symbols::looked_up(WANTED, |name| {
            Ok(match name {
                "kvm_mmu_load" => Some(0xffff_ffff_812e_1bf0),
                "vmemmap_base" => Some(0xffff_ffff_8100_0000),
                _ => None,
            })
        })
        .unwrap();
        assert!(s.is_looked_up());
        assert_eq!(s.len(), 2);
        let load = s.function("kvm_mmu_load").unwrap();
        assert_eq!((load.kind, load.module), ('?', None));
        assert_eq!(s.variable("vmemmap_base"), Some(0xffff_ffff_8100_0000));
        assert!(!s.has_raw_tracepoint("kvm_entry"));
        assert!(!s.has_module("kvm"));
        let e = Symbols::looked_up(WANTED, |_| Err(std::io::Error::other("EPERM"))).unwrap_err();
        assert_eq!(e.to_string(), "EPERM");
    }
}
