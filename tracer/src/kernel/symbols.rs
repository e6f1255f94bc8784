//! `/proc/kallsyms`: which functions and tracepoints exist as symbols.
//!
//! A function that is not a text symbol was inlined (or is absent) and can't
//! take a kprobe. A raw tracepoint `X` exists where the kernel or a module
//! defines `__bpf_trace_X`, the BPF trampoline that raw tracepoints run.

use std::collections::HashMap;

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

/// Parsed kallsyms.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    by_name: HashMap<String, Symbol>,
}

impl Symbols {
    /// Parses kallsyms text: `address type name [module]` per line.
    /// Lines that don't fit are skipped.
    pub fn parse(text: &str) -> Self {
        let mut by_name = HashMap::new();
        for line in text.lines() {
            let mut it = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let Some(kind) = kind.chars().next() else {
                continue;
            };
            let module = it
                .next()
                .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_owned());
            by_name.entry(name.to_owned()).or_insert(Symbol {
                kind,
                addr: u64::from_str_radix(addr, 16).unwrap_or(0),
                module,
            });
        }
        Self { by_name }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// A function symbol (text, local or global), where kprobes can attach.
    pub fn function(&self, name: &str) -> Option<&Symbol> {
        self.by_name
            .get(name)
            .filter(|s| matches!(s.kind, 't' | 'T'))
    }

    /// The address of a data symbol of vmlinux (a kernel variable), when
    /// kallsyms shows it.
    pub fn variable(&self, name: &str) -> Option<u64> {
        self.by_name
            .get(name)
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
        self.by_name
            .values()
            .any(|s| s.module.as_deref() == Some(module))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmlinux_and_module_symbols() {
        let s = Symbols::parse(
            "ffffffff812e1bf0 T kvm_mmu_load\n\
             0000000000000000 t kvm_mmu_zap_all_fast\t[kvm]\n\
             ffffffff81295ac0 t __bpf_trace_kvm_entry\n\
             ffffffff81000000 D some_data\n\
             garbage\n",
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
