//! Kernel knowledge, in one place: what this kernel has (BTF, KVM, symbols,
//! kprobe support, config) and, from that, the attach plan.
//!
//! Everything is read below a root directory, `/` on a live host, so tests
//! run the same code on files captured from real kernels
//! (`tests/data/kernels/`). A file `X` may also be stored as `X.zst`.

pub mod btf;
pub mod btf_reader;
pub mod ksym;
pub mod plan;
pub mod symbols;

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use btf_reader::Btf;
use serde::Serialize;
use thiserror::Error;

pub use plan::{AttachKind, AttachPlan, BtfTracepoint, Feature, PlanOptions, PlannedProbe};
pub use symbols::Symbols;

/// Why the kernel can't be inspected at all. Each of these means an
/// unsupported environment (exit code 3), and says what is missing.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "this kernel has no BTF: {path} is missing (build it with CONFIG_DEBUG_INFO_BTF=y); \
         the tracer resolves every struct offset from BTF and never guesses them"
    )]
    NoBtf { path: PathBuf },
    #[error("failed to parse BTF in {path}")]
    BadBtf {
        path: PathBuf,
        #[source]
        source: btf_reader::BtfError,
    },
    #[error(
        "KVM is not loaded: no KVM types in BTF and no kvm module ({detail}); \
         load it with `modprobe kvm_intel` or `modprobe kvm_amd`"
    )]
    NoKvm { detail: String },
    #[error(
        "KVM is a module, but its BTF ({path}) is missing; \
         the kernel needs CONFIG_DEBUG_INFO_BTF_MODULES=y"
    )]
    NoModuleBtf { path: PathBuf },
    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where KVM's code and types live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmLocation {
    /// Built into vmlinux (`CONFIG_KVM=y`).
    BuiltIn,
    /// The `kvm` module, with split BTF in `/sys/kernel/btf/kvm`.
    Module,
}

/// Everything the plan is made from.
pub struct KernelInfo {
    pub root: PathBuf,
    pub release: String,
    pub btf: Btf,
    pub btf_sources: Vec<String>,
    pub kvm: KvmLocation,
    pub symbols: Symbols,
    /// Tracepoints listed by tracefs, when it is mounted.
    pub tracefs_events: Option<Vec<String>>,
    /// The perf kprobe PMU, which aya's kprobes use.
    pub kprobe_pmu: bool,
    /// Kernel config (`CONFIG_X` -> value), when available.
    pub config: HashMap<String, String>,
    pub dev_kvm: bool,
    /// KVM backends loaded (`kvm_intel`, `kvm_amd`, `kvm_pvm`), from
    /// `/sys/module`; empty when unknown.
    pub kvm_backends: Vec<String>,
}

impl KernelInfo {
    /// Inspects the live kernel.
    pub fn live() -> Result<Self, KernelError> {
        Self::inspect(Path::new("/"))
    }

    /// Inspects the kernel whose files are below `root`.
    pub fn inspect(root: &Path) -> Result<Self, KernelError> {
        let vmlinux_path = root.join("sys/kernel/btf/vmlinux");
        let symbols_path = root.join("proc/kallsyms");
        let module_path = root.join("sys/kernel/btf/kvm");
        // The kernel takes tens of ms to print kallsyms: everything else is
        // read meanwhile.
        let live = root == Path::new("/");
        let ((base, config, split), symbols) = with_symbols(&symbols_path, live, || {
            let base = read_btf(&vmlinux_path)?;
            Ok((base, read_config(root), read_maybe_zst(&module_path)))
        })?;

        // A loaded module has an `initstate` in sysfs; a built-in one
        // doesn't. Symbols looked up by name carry no module, so the live
        // kernel is asked that way.
        let kvm_is_module = if symbols.is_looked_up() {
            root.join("sys/module/kvm/initstate").exists()
        } else {
            symbols.has_module("kvm")
        };
        // KVM's own BTF wins: a kernel with KVM as a module may still carry
        // copies of KVM's structs in vmlinux BTF, but the module's split BTF
        // describes the code that runs.
        let (btf, kvm, btf_sources) = match split {
            Ok(split) => {
                let btf = Btf::parse_split(split, base).map_err(|source| KernelError::BadBtf {
                    path: module_path.clone(),
                    source,
                })?;
                (
                    btf,
                    KvmLocation::Module,
                    vec![
                        vmlinux_path.display().to_string(),
                        module_path.display().to_string(),
                    ],
                )
            }
            Err(_) if kvm_is_module => {
                return Err(KernelError::NoModuleBtf { path: module_path });
            }
            Err(_) => {
                let in_vmlinux = symbols
                    .function("kvm_mmu_load")
                    .is_some_and(|s| s.module.is_none())
                    || config.get("CONFIG_KVM").is_some_and(|v| v == "y");
                if !in_vmlinux {
                    return Err(KernelError::NoKvm {
                        detail: format!(
                            "{} is missing and KVM is not built into vmlinux",
                            module_path.display()
                        ),
                    });
                }
                (
                    base,
                    KvmLocation::BuiltIn,
                    vec![vmlinux_path.display().to_string()],
                )
            }
        };
        if !btf::has_struct(&btf, "kvm_vcpu") {
            return Err(KernelError::NoKvm {
                detail: "BTF has no struct kvm_vcpu".into(),
            });
        }

        let release = read_string(&root.join("proc/sys/kernel/osrelease"))
            .map_or_else(|| "unknown".into(), |s| s.trim().to_owned());
        let tracefs_events = read_string(&root.join("sys/kernel/tracing/available_events"))
            .map(|s| s.lines().map(str::to_owned).collect());
        let kprobe_pmu = root
            .join("sys/bus/event_source/devices/kprobe/type")
            .exists();
        let dev_kvm = root.join("dev/kvm").exists();
        let kvm_backends = ["kvm_intel", "kvm_amd", "kvm_pvm"]
            .into_iter()
            .filter(|m| root.join("sys/module").join(m).exists())
            .map(str::to_owned)
            .collect();

        Ok(Self {
            root: root.to_path_buf(),
            release,
            btf,
            btf_sources,
            kvm,
            symbols,
            tracefs_events,
            kprobe_pmu,
            config,
            dev_kvm,
            kvm_backends,
        })
    }

    /// Whether tracepoint `system:name` exists (tracefs, else kallsyms).
    pub fn has_tracepoint(&self, system: &str, name: &str) -> bool {
        let full = format!("{system}:{name}");
        self.tracefs_events
            .as_ref()
            .is_some_and(|ev| ev.contains(&full))
            || self.symbols.has_raw_tracepoint(name)
    }

    /// A config option's value (`y`, `m`, ...), `None` when unset or unknown.
    pub fn config(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }
}

/// vmlinux's BTF.
fn read_btf(vmlinux_path: &Path) -> Result<Btf, KernelError> {
    read_maybe_zst(vmlinux_path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KernelError::NoBtf {
                path: vmlinux_path.to_path_buf(),
            },
            _ => KernelError::Io {
                path: vmlinux_path.to_path_buf(),
                source: e,
            },
        })
        .and_then(|vmlinux| {
            Btf::parse(vmlinux).map_err(|source| KernelError::BadBtf {
                path: vmlinux_path.to_path_buf(),
                source,
            })
        })
}

/// The plan's symbols, found on a thread of its own while `meanwhile` runs
/// on this one: on the live kernel looked up by name ([`ksym`]), else (or
/// where the kernel won't look them up) read from kallsyms, which the
/// kernel takes tens of ms to print.
fn with_symbols<T>(
    symbols_path: &Path,
    live: bool,
    meanwhile: impl FnOnce() -> Result<T, KernelError>,
) -> Result<(T, Symbols), KernelError> {
    std::thread::scope(|scope| {
        let symbols = scope.spawn(|| {
            let looked_up = live.then(look_up_symbols).and_then(|looked| {
                looked
                    .inspect_err(|e| {
                        log::debug!("kallsyms is read: symbols can't be looked up by name: {e}");
                    })
                    .ok()
            });
            match looked_up.map_or_else(|| read_symbols(symbols_path), Ok) {
                Ok(symbols) => Ok(symbols),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Symbols::default()),
                Err(source) => Err(KernelError::Io {
                    path: symbols_path.to_path_buf(),
                    source,
                }),
            }
        });
        let early = meanwhile();
        let symbols = symbols
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok::<_, KernelError>((early?, symbols?))
    })
}

/// The plan's symbols, each looked up by name through BPF.
fn look_up_symbols() -> std::io::Result<Symbols> {
    let lookup = ksym::Lookup::load()?;
    Symbols::looked_up(plan::KALLSYMS_NAMES, |name| lookup.address(name))
}

/// Streams kallsyms (or a fixture's `path.zst`), keeping the lines of the
/// names the plan looks up: procfs reports no size, and the whole text
/// (5-8 MB on distribution kernels) would only be held to be searched.
fn read_symbols(path: &Path) -> std::io::Result<Symbols> {
    match std::fs::File::open(path) {
        Ok(f) => Symbols::read_only(f, plan::KALLSYMS_NAMES),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = std::fs::File::open(zst_beside(path)).map_err(|_| e)?;
            Symbols::read_only(zstd::Decoder::new(f)?, plan::KALLSYMS_NAMES)
        }
        Err(e) => Err(e),
    }
}

/// Reads `path`, or `path.zst` decompressed.
fn read_maybe_zst(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let raw = std::fs::read(zst_beside(path)).map_err(|_| e)?;
            zstd::decode_all(raw.as_slice())
        }
        other => other,
    }
}

/// `path.zst`: where a fixture keeps a file compressed.
fn zst_beside(path: &Path) -> PathBuf {
    let mut zst = path.as_os_str().to_owned();
    zst.push(".zst");
    PathBuf::from(zst)
}

fn read_string(path: &Path) -> Option<String> {
    read_maybe_zst(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Kernel config from `/proc/config.gz`, `/proc/config[.zst]` (fixtures) or
/// `/boot/config-<release>`.
fn read_config(root: &Path) -> HashMap<String, String> {
    let release = read_string(&root.join("proc/sys/kernel/osrelease"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let text = std::fs::read(root.join("proc/config.gz"))
        .ok()
        .and_then(|gz| {
            let mut s = String::new();
            flate2::read::GzDecoder::new(gz.as_slice())
                .read_to_string(&mut s)
                .ok()
                .map(|_| s)
        })
        .or_else(|| read_string(&root.join("proc/config")))
        .or_else(|| read_string(&root.join(format!("boot/config-{release}"))));
    parse_config(text.as_deref().unwrap_or(""))
}

fn parse_config(text: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            map.insert(k.trim().to_owned(), v.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("# ")
            && let Some(k) = rest.strip_suffix(" is not set")
        {
            map.insert(k.to_owned(), "n".to_owned());
        }
    }
    map
}
