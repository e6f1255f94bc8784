//! The attach plan: for each probe, kprobe, else tracepoint, else off, with
//! the reason; the offsets handed to the programs; and which features are
//! on. A pure function of [`KernelInfo`], so fixtures test it.

use serde::Serialize;

use common::{KernelOffsets, ProbeConfig, ProbeId};

use super::{
    KernelInfo, KvmLocation,
    btf::{FieldOffset, RUN_SAMPLER_FIELDS, func_param_count, resolve_offsets},
};

/// How a probe attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachKind {
    Kprobe,
    Kretprobe,
    RawTracepoint,
    Off,
}

impl std::fmt::Display for AttachKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kprobe => "kprobe",
            Self::Kretprobe => "kretprobe",
            Self::RawTracepoint => "raw-tracepoint",
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
}

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
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            entry_transitions: true,
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

/// Decides the plan.
pub fn plan(k: &KernelInfo, opts: PlanOptions) -> AttachPlan {
    let resolved = resolve_offsets(&k.btf);
    let no_kprobes = kprobes_unavailable(k);
    let mirror = resolved.get("kvm_mmu.mirror_root_hpa").is_some();

    // A kprobe on `func`, or why not.
    let kprobe = |func: &str| -> Result<String, String> {
        if let Some(why) = &no_kprobes {
            return Err(why.clone());
        }
        match k.symbols.function(func) {
            Some(sym) => Ok(format!(
                "{func} is a {} symbol in {}",
                if sym.kind == 'T' { "global" } else { "local" },
                sym.module.as_deref().unwrap_or("vmlinux")
            )),
            None => Err(format!(
                "{func} is not a function symbol in kallsyms (inlined or absent)"
            )),
        }
    };
    let mk = |probe: ProbeId, target: &str, attach: AttachKind, reason: String| PlannedProbe {
        probe,
        program: probe.program_name(),
        target: target.to_owned(),
        attach,
        reason,
    };
    let mut probes = Vec::new();

    // kvm_mmu_load: entry and return.
    let load = kprobe("kvm_mmu_load");
    for (id, kind) in [
        (ProbeId::MmuLoad, AttachKind::Kprobe),
        (ProbeId::MmuLoadRet, AttachKind::Kretprobe),
    ] {
        probes.push(match &load {
            Ok(why) => mk(id, "kvm_mmu_load", kind, why.clone()),
            Err(why) => mk(id, "kvm_mmu_load", AttachKind::Off, why.clone()),
        });
    }

    // mmu_alloc_direct_roots where it is a symbol; kvm_tdp_mmu_alloc_root
    // always where possible (its `mirror` argument is the better signal).
    let direct = kprobe("mmu_alloc_direct_roots");
    probes.push(match &direct {
        Ok(why) => mk(
            ProbeId::MmuAllocDirectRoots,
            "mmu_alloc_direct_roots",
            AttachKind::Kprobe,
            why.clone(),
        ),
        Err(why) => mk(
            ProbeId::MmuAllocDirectRoots,
            "mmu_alloc_direct_roots",
            AttachKind::Off,
            format!("{why}; root allocation is traced at kvm_tdp_mmu_alloc_root instead"),
        ),
    });
    let alloc_params = func_param_count(&k.btf, "kvm_tdp_mmu_alloc_root");
    let alloc = kprobe("kvm_tdp_mmu_alloc_root").map(|why| match alloc_params {
        Some(2) => format!("{why}; BTF prototype (vcpu, mirror)"),
        Some(n) => format!("{why}; BTF prototype has {n} parameter(s): no mirror argument"),
        None => format!("{why}; no BTF prototype, the mirror argument is not read"),
    });
    for (id, kind) in [
        (ProbeId::TdpMmuAllocRoot, AttachKind::Kprobe),
        (ProbeId::TdpMmuAllocRootRet, AttachKind::Kretprobe),
    ] {
        probes.push(match &alloc {
            Ok(why) => mk(id, "kvm_tdp_mmu_alloc_root", kind, why.clone()),
            Err(why) => mk(id, "kvm_tdp_mmu_alloc_root", AttachKind::Off, why.clone()),
        });
    }

    // kvm_mmu_zap_all_fast: kprobe, else the raw tracepoint.
    let has_zap_tp = k.has_tracepoint("kvmmmu", "kvm_mmu_zap_all_fast");
    match kprobe("kvm_mmu_zap_all_fast") {
        Ok(why) => {
            probes.push(mk(
                ProbeId::ZapAllFastKprobe,
                "kvm_mmu_zap_all_fast",
                AttachKind::Kprobe,
                why,
            ));
            probes.push(mk(
                ProbeId::ZapAllFastTracepoint,
                "kvmmmu:kvm_mmu_zap_all_fast",
                AttachKind::Off,
                "the kprobe on kvm_mmu_zap_all_fast is used".into(),
            ));
        }
        Err(why) => {
            probes.push(mk(
                ProbeId::ZapAllFastKprobe,
                "kvm_mmu_zap_all_fast",
                AttachKind::Off,
                why.clone(),
            ));
            probes.push(if has_zap_tp {
                mk(
                    ProbeId::ZapAllFastTracepoint,
                    "kvmmmu:kvm_mmu_zap_all_fast",
                    AttachKind::RawTracepoint,
                    format!("fallback: {why}; the raw tracepoint passes the struct kvm pointer"),
                )
            } else {
                mk(
                    ProbeId::ZapAllFastTracepoint,
                    "kvmmmu:kvm_mmu_zap_all_fast",
                    AttachKind::Off,
                    format!("{why}, and the tracepoint kvmmmu:kvm_mmu_zap_all_fast is absent"),
                )
            });
        }
    }

    // kvm_tdp_mmu_invalidate_roots(kvm, root_types), where it exists.
    let inval_params = func_param_count(&k.btf, "kvm_tdp_mmu_invalidate_roots");
    probes.push(
        match (kprobe("kvm_tdp_mmu_invalidate_roots"), inval_params) {
            (Ok(why), Some(2)) => mk(
                ProbeId::InvalidateRoots,
                "kvm_tdp_mmu_invalidate_roots",
                AttachKind::Kprobe,
                format!("{why}; BTF prototype (kvm, root_types)"),
            ),
            (Ok(_), other) => mk(
                ProbeId::InvalidateRoots,
                "kvm_tdp_mmu_invalidate_roots",
                AttachKind::Off,
                format!(
                    "BTF prototype of kvm_tdp_mmu_invalidate_roots is {}, not (kvm, root_types)",
                    other.map_or("missing".to_owned(), |n| format!("{n} parameter(s)"))
                ),
            ),
            (Err(why), _) => mk(
                ProbeId::InvalidateRoots,
                "kvm_tdp_mmu_invalidate_roots",
                AttachKind::Off,
                why,
            ),
        },
    );

    // The kvm_entry gate.
    let can_read_roots =
        resolved.get("kvm_vcpu.arch.mmu").is_some() && resolved.get("kvm_mmu.root.hpa").is_some();
    probes.push(if !k.has_tracepoint("kvm", "kvm_entry") {
        mk(
            ProbeId::KvmEntry,
            "kvm:kvm_entry",
            AttachKind::Off,
            "the tracepoint kvm:kvm_entry is absent".into(),
        )
    } else if !can_read_roots {
        mk(
            ProbeId::KvmEntry,
            "kvm:kvm_entry",
            AttachKind::Off,
            "the vCPU's roots can't be read (see fields)".into(),
        )
    } else {
        mk(
            ProbeId::KvmEntry,
            "kvm:kvm_entry",
            AttachKind::RawTracepoint,
            if mirror {
                "checks the mirror-root invariant at every guest entry; counts per CPU".into()
            } else {
                "counts guest entries per CPU; no mirror roots on this kernel".into()
            },
        )
    });

    // ioctl(KVM_RUN) exit: where kvm_mmu_load can't be kprobed, sample the
    // roots each vCPU ran with.
    let missing: Vec<&str> = RUN_SAMPLER_FIELDS
        .iter()
        .copied()
        .filter(|f| resolved.get(f).is_none())
        .collect();
    probes.push(if load.is_ok() {
        mk(
            ProbeId::KvmRunExit,
            "raw_syscalls:sys_exit",
            AttachKind::Off,
            "not needed: kvm_mmu_load is kprobed".into(),
        )
    } else if !k.has_tracepoint("raw_syscalls", "sys_exit") {
        mk(
            ProbeId::KvmRunExit,
            "raw_syscalls:sys_exit",
            AttachKind::Off,
            "the tracepoint raw_syscalls:sys_exit is absent".into(),
        )
    } else if !missing.is_empty() || !can_read_roots {
        mk(
            ProbeId::KvmRunExit,
            "raw_syscalls:sys_exit",
            AttachKind::Off,
            format!("fields missing from BTF: {}", missing.join(", ")),
        )
    } else {
        mk(
            ProbeId::KvmRunExit,
            "raw_syscalls:sys_exit",
            AttachKind::RawTracepoint,
            "fallback for kvm_mmu_load (no kprobe): samples the vCPU's roots when \
             ioctl(KVM_RUN) returns; works on every KVM backend"
                .into(),
        )
    });

    let mut features = Vec::new();
    features.push(Feature {
        name: "kprobes",
        enabled: no_kprobes.is_none(),
        reason: no_kprobes
            .clone()
            .unwrap_or_else(|| "perf kprobe PMU present".into()),
    });
    let mirror_field = resolved
        .fields
        .iter()
        .find(|f| f.name == "kvm_mmu.mirror_root_hpa");
    features.push(Feature {
        name: "mirror-root-tracking",
        enabled: mirror,
        reason: match mirror_field.and_then(|f| f.absent.clone()) {
            Some(why) => why,
            None => "struct kvm_mmu has mirror_root_hpa".into(),
        },
    });
    let vm_type = resolved.get("kvm.arch.vm_type").is_some();
    features.push(Feature {
        name: "tdx-vm-detection",
        enabled: vm_type && mirror,
        reason: if !vm_type {
            "struct kvm has no arch.vm_type; TDX VMs can't be told apart".into()
        } else if !mirror {
            "no mirror roots on this kernel, so no TDX mirror invariant to check".into()
        } else {
            "kvm->arch.vm_type == 5 (KVM_X86_TDX_VM) marks TDX VMs".into()
        },
    });
    let gate = probes
        .iter()
        .any(|p| p.probe == ProbeId::KvmEntry && p.attach != AttachKind::Off);
    features.push(Feature {
        name: "entry-invariant-check",
        enabled: gate && mirror && vm_type,
        reason: if !gate {
            "the kvm_entry gate is off".into()
        } else if !(mirror && vm_type) {
            "needs mirror_root_hpa and arch.vm_type".into()
        } else {
            "in-kernel check at kvm_entry: valid root.hpa with INVALID mirror_root_hpa on TDX"
                .into()
        },
    });
    features.push(Feature {
        name: "entry-transitions",
        enabled: gate && opts.entry_transitions,
        reason: if !gate {
            "the kvm_entry gate is off".into()
        } else if opts.entry_transitions {
            "reports a vCPU's first guest entry with new roots (once per root change)".into()
        } else {
            "turned off by --no-entry-transitions".into()
        },
    });

    AttachPlan {
        kernel_release: k.release.clone(),
        kvm: k.kvm,
        btf_sources: k.btf_sources.clone(),
        probes,
        fields: resolved.fields,
        features,
        offsets: resolved.offsets,
        config: ProbeConfig {
            entry_transitions: u32::from(opts.entry_transitions),
            alloc_root_mirror_arg: u32::from(alloc_params == Some(2)),
        },
    }
}
