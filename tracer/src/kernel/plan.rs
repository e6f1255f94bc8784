//! The attach plan: for each probe, kprobe, else tracepoint, else off, with
//! the reason; the offsets handed to the programs; and which features are
//! on. A pure function of [`KernelInfo`], so fixtures test it.

use serde::Serialize;

use common::{KernelOffsets, ProbeConfig, ProbeId};

use super::{
    KernelInfo, KvmLocation,
    btf::{FieldOffset, RUN_SAMPLER_FIELDS, ResolvedOffsets, func_param_count, resolve_offsets},
    btf_reader::kind,
};

/// How a probe attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachKind {
    Kprobe,
    Kretprobe,
    RawTracepoint,
    /// A BTF-enabled tracepoint (`tp_btf`), loaded by the tracer itself.
    BtfTracepoint,
    Off,
}

impl std::fmt::Display for AttachKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kprobe => "kprobe",
            Self::Kretprobe => "kretprobe",
            Self::RawTracepoint => "raw-tracepoint",
            Self::BtfTracepoint => "btf-tracepoint",
            Self::Off => "off",
        })
    }
}

/// One program of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedProbe {
    #[serde(serialize_with = "ser_probe")]
    pub probe: ProbeId,
    /// The eBPF program's name.
    pub program: &'static str,
    /// The kernel function or tracepoint.
    pub target: String,
    pub attach: AttachKind,
    /// Why this attach kind was chosen (or why it is off).
    pub reason: String,
    /// Tried before `attach`, which is then the fallback: the BTF-enabled
    /// tracepoint, where BTF describes the tracepoint. Only the kernel can
    /// say whether it allows tracing programs, so the loader tries it and
    /// says which attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub btf_first: Option<BtfTracepoint>,
}

/// A tracepoint as a BTF-enabled tracepoint (`tp_btf`): its programs and
/// the BTF type the kernel attaches them by.
#[derive(Clone, Debug, Serialize)]
pub struct BtfTracepoint {
    pub program: &'static str,
    /// The empty program beside it (`--baseline`).
    pub floor: &'static str,
    /// The id of the typedef `btf_trace_<tracepoint>`.
    pub type_id: u32,
    /// The module whose BTF holds the typedef; `None` for vmlinux.
    pub module: Option<String>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes a reference"
)]
fn ser_probe<S: serde::Serializer>(p: &ProbeId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.program_name())
}

/// A capability that is on or off, and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub enabled: bool,
    pub reason: String,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Report each vCPU's first guest entry with new roots.
    pub entry_transitions: bool,
    /// Wake the reader only once this many bytes wait in the ring buffer
    /// (0: on every event).
    pub wakeup_bytes: u32,
    /// Try the kvm_entry gate as a BTF-enabled tracepoint first.
    pub entry_gate_btf: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            entry_transitions: true,
            wakeup_bytes: 0,
            entry_gate_btf: true,
        }
    }
}

/// The whole plan, as `doctor` prints it and the loader follows it.
#[derive(Clone, Debug, Serialize)]
pub struct AttachPlan {
    pub kernel_release: String,
    pub kvm: KvmLocation,
    pub btf_sources: Vec<String>,
    pub probes: Vec<PlannedProbe>,
    pub fields: Vec<FieldOffset>,
    pub features: Vec<Feature>,
    #[serde(skip)]
    pub offsets: KernelOffsets,
    #[serde(skip)]
    pub config: ProbeConfig,
}

impl AttachPlan {
    pub fn probe(&self, id: ProbeId) -> &PlannedProbe {
        self.probes
            .iter()
            .find(|p| p.probe == id)
            .expect("the plan has every probe")
    }

    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.name == name)
    }

    /// Probes that will attach.
    pub fn attached(&self) -> impl Iterator<Item = &PlannedProbe> {
        self.probes.iter().filter(|p| p.attach != AttachKind::Off)
    }

    /// One line: how many probes attach, and how.
    pub fn summary(&self) -> String {
        let count = |k| self.probes.iter().filter(|p| p.attach == k).count();
        format!(
            "{} kprobe, {} kretprobe, {} raw-tracepoint, {} off",
            count(AttachKind::Kprobe),
            count(AttachKind::Kretprobe),
            count(AttachKind::RawTracepoint),
            count(AttachKind::Off)
        )
    }
}

/// Why kprobes can't be used, or `None` when they can.
fn kprobes_unavailable(k: &KernelInfo) -> Option<String> {
    if k.kprobe_pmu {
        return None;
    }
    let config = match (k.config("CONFIG_KPROBES"), k.config("CONFIG_KPROBE_EVENTS")) {
        (Some("n"), _) => " (CONFIG_KPROBES is not set)",
        (_, Some("n") | None) if !k.config.is_empty() => " (CONFIG_KPROBE_EVENTS is not set)",
        _ => "",
    };
    Some(format!(
        "kprobes unavailable: no perf kprobe PMU at /sys/bus/event_source/devices/kprobe{config}"
    ))
}

/// The facts every probe decision looks at.
struct Planner<'a> {
    k: &'a KernelInfo,
    resolved: ResolvedOffsets,
    /// Why kprobes can't be used at all, if so.
    no_kprobes: Option<String>,
    probes: Vec<PlannedProbe>,
    opts: PlanOptions,
}

impl Planner<'_> {
    /// A kprobe on `func`, or why not.
    fn kprobe(&self, func: &str) -> Result<String, String> {
        if let Some(why) = &self.no_kprobes {
            return Err(why.clone());
        }
        match self.k.symbols.function(func) {
            Some(sym) if sym.kind == '?' => Ok(format!(
                "{func} is a kernel symbol (looked up by name: bpf_kallsyms_lookup_name)"
            )),
            Some(sym) => Ok(format!(
                "{func} is a {} symbol in {}",
                if sym.kind == 'T' { "global" } else { "local" },
                sym.module.as_deref().unwrap_or("vmlinux")
            )),
            None => Err(format!(
                "{func} is not a function symbol in kallsyms (inlined or absent)"
            )),
        }
    }

    fn has(&self, field: &str) -> bool {
        self.resolved.get(field).is_some()
    }

    fn push(&mut self, probe: ProbeId, target: &str, attach: AttachKind, reason: String) {
        self.probes.push(PlannedProbe {
            probe,
            program: probe.program_name(),
            target: target.to_owned(),
            attach,
            reason,
            btf_first: None,
        });
    }

    /// An entry/return pair on `func`: both attach, or both are off.
    fn pair(
        &mut self,
        entry: ProbeId,
        ret: ProbeId,
        func: &str,
        decision: &Result<String, String>,
    ) {
        for (id, kind) in [(entry, AttachKind::Kprobe), (ret, AttachKind::Kretprobe)] {
            match decision {
                Ok(why) => self.push(id, func, kind, why.clone()),
                Err(why) => self.push(id, func, AttachKind::Off, why.clone()),
            }
        }
    }

    /// mmu_alloc_direct_roots where it is a symbol; kvm_tdp_mmu_alloc_root
    /// always where possible (its `mirror` argument is the better signal).
    /// Returns whether the latter takes `(vcpu, mirror)`.
    fn alloc(&mut self) -> bool {
        let func = "mmu_alloc_direct_roots";
        match self.kprobe(func) {
            Ok(why) => self.push(ProbeId::MmuAllocDirectRoots, func, AttachKind::Kprobe, why),
            Err(why) => self.push(
                ProbeId::MmuAllocDirectRoots,
                func,
                AttachKind::Off,
                format!("{why}; root allocation is traced at kvm_tdp_mmu_alloc_root instead"),
            ),
        }
        let params = func_param_count(&self.k.btf, "kvm_tdp_mmu_alloc_root");
        let alloc = self
            .kprobe("kvm_tdp_mmu_alloc_root")
            .map(|why| match params {
                Some(2) => format!("{why}; BTF prototype (vcpu, mirror)"),
                Some(n) => format!("{why}; BTF prototype has {n} parameter(s): no mirror argument"),
                None => format!("{why}; no BTF prototype, the mirror argument is not read"),
            });
        self.pair(
            ProbeId::TdpMmuAllocRoot,
            ProbeId::TdpMmuAllocRootRet,
            "kvm_tdp_mmu_alloc_root",
            &alloc,
        );
        params == Some(2)
    }

    /// kvm_mmu_zap_all_fast: the raw tracepoint wherever it exists (the
    /// function is static with three callers, and a compiler may inline some
    /// of them, so a kprobe can miss calls; the tracepoint sees every one),
    /// else the kprobe.
    fn zap(&mut self) {
        let (kp, tp) = ("kvm_mmu_zap_all_fast", "kvmmmu:kvm_mmu_zap_all_fast");
        if self.k.has_tracepoint("kvmmmu", "kvm_mmu_zap_all_fast") {
            self.push(
                ProbeId::ZapAllFastKprobe,
                kp,
                AttachKind::Off,
                format!("not needed: the tracepoint {tp} is used"),
            );
            self.push(
                ProbeId::ZapAllFastTracepoint,
                tp,
                AttachKind::RawTracepoint,
                "the tracepoint fires on every call (the static function may be inlined into \
                 some of its callers) and passes the struct kvm pointer"
                    .into(),
            );
            return;
        }
        let no_tp = format!("the tracepoint {tp} is absent");
        match self.kprobe(kp) {
            Ok(why) => self.push(
                ProbeId::ZapAllFastKprobe,
                kp,
                AttachKind::Kprobe,
                format!("fallback: {no_tp}; {why} (calls inlined into a caller are missed)"),
            ),
            Err(why) => self.push(ProbeId::ZapAllFastKprobe, kp, AttachKind::Off, why),
        }
        self.push(ProbeId::ZapAllFastTracepoint, tp, AttachKind::Off, no_tp);
    }

    /// kvm_tdp_mmu_invalidate_roots(kvm, root_types), where it exists.
    fn invalidate(&mut self) {
        let func = "kvm_tdp_mmu_invalidate_roots";
        let params = func_param_count(&self.k.btf, func);
        match (self.kprobe(func), params) {
            (Ok(why), Some(2)) => self.push(
                ProbeId::InvalidateRoots,
                func,
                AttachKind::Kprobe,
                format!("{why}; BTF prototype (kvm, root_types)"),
            ),
            (Ok(_), other) => self.push(
                ProbeId::InvalidateRoots,
                func,
                AttachKind::Off,
                format!(
                    "BTF prototype of {func} is {}, not (kvm, root_types)",
                    other.map_or("missing".to_owned(), |n| format!("{n} parameter(s)"))
                ),
            ),
            (Err(why), _) => self.push(ProbeId::InvalidateRoots, func, AttachKind::Off, why),
        }
    }

    fn can_read_roots(&self) -> bool {
        self.has("kvm_vcpu.arch.mmu") && self.has("kvm_mmu.root.hpa")
    }

    /// The kvm_entry gate.
    fn entry_gate(&mut self) {
        let target = "kvm:kvm_entry";
        let (attach, reason) = if !self.k.has_tracepoint("kvm", "kvm_entry") {
            (
                AttachKind::Off,
                "the tracepoint kvm:kvm_entry is absent".into(),
            )
        } else if !self.can_read_roots() {
            (
                AttachKind::Off,
                "the vCPU's roots can't be read (see fields)".into(),
            )
        } else if self.has("kvm_mmu.mirror_root_hpa") {
            (
                AttachKind::RawTracepoint,
                "checks the mirror-root invariant at every guest entry; counts per CPU".into(),
            )
        } else {
            (
                AttachKind::RawTracepoint,
                "counts guest entries per CPU; no mirror roots on this kernel".into(),
            )
        };
        let btf_first = (attach != AttachKind::Off && self.opts.entry_gate_btf)
            .then(|| self.btf_tracepoint("kvm_entry"))
            .flatten();
        let reason = match &btf_first {
            Some(_) => format!(
                "{reason}; as a BTF tracepoint (tp_btf: direct loads) where the kernel allows \
                 tracing programs, else as a raw tracepoint"
            ),
            None => reason,
        };
        self.push(ProbeId::KvmEntry, target, attach, reason);
        if let Some(last) = self.probes.last_mut() {
            last.btf_first = btf_first.map(|(type_id, module)| BtfTracepoint {
                program: "kvm_entry_gate_btf",
                floor: "floor_kvm_entry_btf",
                type_id,
                module,
            });
        }
    }

    /// The BTF id of `btf_trace_<tracepoint>`, and the module whose BTF
    /// holds it (`None`: vmlinux).
    fn btf_tracepoint(&self, tracepoint: &str) -> Option<(u32, Option<String>)> {
        let name = format!("btf_trace_{tracepoint}");
        let t = self.k.btf.by_name(&name, &[kind::TYPEDEF]).last()?;
        let module = (self.k.kvm == KvmLocation::Module && t.id >= self.k.btf.first_id())
            .then(|| "kvm".to_owned());
        Some((t.id, module))
    }

    /// ioctl(KVM_RUN) exit: where kvm_mmu_load can't be kprobed, sample the
    /// roots each vCPU ran with.
    fn run_exit(&mut self, load_kprobed: bool) {
        let target = "raw_syscalls:sys_exit";
        let missing: Vec<&str> = RUN_SAMPLER_FIELDS
            .iter()
            .copied()
            .filter(|f| !self.has(f))
            .collect();
        let (attach, reason) = if load_kprobed {
            (
                AttachKind::Off,
                "not needed: kvm_mmu_load is kprobed".into(),
            )
        } else if !self.k.has_tracepoint("raw_syscalls", "sys_exit") {
            (
                AttachKind::Off,
                "the tracepoint raw_syscalls:sys_exit is absent".into(),
            )
        } else if !missing.is_empty() || !self.can_read_roots() {
            (
                AttachKind::Off,
                format!("fields missing from BTF: {}", missing.join(", ")),
            )
        } else {
            (
                AttachKind::RawTracepoint,
                "fallback for kvm_mmu_load (no kprobe): samples the vCPU's roots when \
                 ioctl(KVM_RUN) returns; works on every KVM backend"
                    .into(),
            )
        };
        self.push(ProbeId::KvmRunExit, target, attach, reason);
    }

    /// Teardown probes: without them the detector relies on its caps.
    fn teardown(&mut self) {
        for (id, func) in [
            (ProbeId::VcpuDestroy, "kvm_mmu_destroy"),
            (ProbeId::VmDestroy, "kvm_arch_destroy_vm"),
        ] {
            match self.kprobe(func) {
                Ok(why) => self.push(id, func, AttachKind::Kprobe, why),
                Err(why) => self.push(
                    id,
                    func,
                    AttachKind::Off,
                    format!("{why}; teardown is not seen, the detector's state caps bound memory"),
                ),
            }
        }
    }

    /// Following a TDX vCPU's mirror root to its page's `role.invalid`.
    fn stale_check(&self, vmemmap: Option<u64>) -> Feature {
        let missing: Vec<&str> = [
            "kvm_mmu.mirror_root_hpa",
            "kvm.arch.vm_type",
            "page.private",
            "kvm_mmu_page.role",
            super::btf::PAGE_SIZE_FIELD,
            super::btf::ROLE_INVALID_FIELD,
        ]
        .into_iter()
        .filter(|f| !self.has(f))
        .collect();
        let (enabled, reason) = if !missing.is_empty() {
            (
                false,
                format!("fields missing from BTF: {}", missing.join(", ")),
            )
        } else if vmemmap.is_none() {
            (
                false,
                "the address of vmemmap_base is not in kallsyms (CONFIG_KALLSYMS_ALL off, or \
                 addresses hidden from this user): a stale mirror root (valid hpa, page with \
                 role.invalid set) is seen only through invalidate events"
                    .into(),
            )
        } else {
            (
                true,
                "TDX vCPUs' mirror roots are followed to their page (vmemmap_base → \
                 page.private → kvm_mmu_page.role) at each entry and event: role.invalid set \
                 is a stale mirror root"
                    .into(),
            )
        };
        Feature {
            name: "stale-mirror-check",
            enabled,
            reason,
        }
    }

    fn features(&self, opts: PlanOptions) -> Vec<Feature> {
        let mirror = self.has("kvm_mmu.mirror_root_hpa");
        let vm_type = self.has("kvm.arch.vm_type");
        let gate = self
            .probes
            .iter()
            .any(|p| p.probe == ProbeId::KvmEntry && p.attach != AttachKind::Off);
        let mirror_absent = self
            .resolved
            .fields
            .iter()
            .find(|f| f.name == "kvm_mmu.mirror_root_hpa")
            .and_then(|f| f.absent.clone());
        // PVM runs guests without VMX/SVM and never fires kvm:kvm_entry: the
        // gate attaches but sees nothing while only it is loaded.
        let b = &self.k.kvm_backends;
        let blind_backend = (!b.is_empty() && b.iter().all(|m| m == "kvm_pvm")).then(|| {
            "the only KVM backend loaded is kvm_pvm, which never fires kvm:kvm_entry: the \
             entry check can't see guest entries here (roots are still sampled when \
             KVM_RUN returns)"
                .to_owned()
        });
        vec![
            Feature {
                name: "kprobes",
                enabled: self.no_kprobes.is_none(),
                reason: self
                    .no_kprobes
                    .clone()
                    .unwrap_or_else(|| "perf kprobe PMU present".into()),
            },
            Feature {
                name: "mirror-root-tracking",
                enabled: mirror,
                reason: mirror_absent
                    .unwrap_or_else(|| "struct kvm_mmu has mirror_root_hpa".into()),
            },
            Feature {
                name: "tdx-vm-detection",
                enabled: vm_type && mirror,
                reason: if !vm_type {
                    "struct kvm has no arch.vm_type; TDX VMs can't be told apart".into()
                } else if !mirror {
                    "no mirror roots on this kernel, so no TDX mirror invariant to check".into()
                } else {
                    "kvm->arch.vm_type == 5 (KVM_X86_TDX_VM) marks TDX VMs".into()
                },
            },
            Feature {
                name: "entry-invariant-check",
                enabled: gate && mirror && vm_type && blind_backend.is_none(),
                reason: if !gate {
                    "the kvm_entry gate is off".into()
                } else if let Some(why) = &blind_backend {
                    why.clone()
                } else if !(mirror && vm_type) {
                    "needs mirror_root_hpa and arch.vm_type".into()
                } else {
                    "in-kernel check at kvm_entry: valid root.hpa with INVALID mirror_root_hpa \
                     on TDX"
                        .into()
                },
            },
            Feature {
                name: "entry-transitions",
                enabled: gate && opts.entry_transitions && blind_backend.is_none(),
                reason: if !gate {
                    "the kvm_entry gate is off".into()
                } else if let Some(why) = &blind_backend {
                    why.clone()
                } else if opts.entry_transitions {
                    "reports a vCPU's first guest entry with new roots (once per root change)"
                        .into()
                } else {
                    "turned off by --no-entry-transitions".into()
                },
            },
        ]
    }
}

/// Every kallsyms name the plan looks up: the kprobe targets, the raw
/// tracepoints' BPF trampolines (`__bpf_trace_X`, the tracepoint check
/// without tracefs) and `vmemmap_base`. Only these lines of kallsyms are
/// kept; a lookup of any other name fails a debug assertion.
pub const KALLSYMS_NAMES: &[&str] = &[
    "kvm_mmu_load",
    "mmu_alloc_direct_roots",
    "kvm_tdp_mmu_alloc_root",
    "kvm_mmu_zap_all_fast",
    "kvm_tdp_mmu_invalidate_roots",
    "kvm_mmu_destroy",
    "kvm_arch_destroy_vm",
    "vmemmap_base",
    "__bpf_trace_kvm_mmu_zap_all_fast",
    "__bpf_trace_kvm_entry",
    "__bpf_trace_sys_exit",
];

/// Decides the plan.
pub fn plan(k: &KernelInfo, opts: PlanOptions) -> AttachPlan {
    let mut p = Planner {
        k,
        resolved: resolve_offsets(&k.btf),
        no_kprobes: kprobes_unavailable(k),
        probes: Vec::new(),
        opts,
    };
    let load = p.kprobe("kvm_mmu_load");
    p.pair(ProbeId::MmuLoad, ProbeId::MmuLoadRet, "kvm_mmu_load", &load);
    let alloc_mirror_arg = p.alloc();
    p.zap();
    p.invalidate();
    p.entry_gate();
    p.run_exit(load.is_ok());
    p.teardown();
    let vmemmap = k.symbols.variable("vmemmap_base");
    let mut features = p.features(opts);
    let stale = p.stale_check(vmemmap);
    let stale_on = stale.enabled;
    features.push(stale);
    let mut offsets = p.resolved.offsets;
    offsets.vmemmap_base_addr = if stale_on { vmemmap.unwrap_or(0) } else { 0 };
    AttachPlan {
        kernel_release: k.release.clone(),
        kvm: k.kvm,
        btf_sources: k.btf_sources.clone(),
        probes: p.probes,
        fields: p.resolved.fields,
        features,
        offsets,
        config: ProbeConfig {
            entry_transitions: u32::from(opts.entry_transitions),
            alloc_root_mirror_arg: u32::from(alloc_mirror_arg),
            wakeup_bytes: opts.wakeup_bytes,
        },
    }
}
