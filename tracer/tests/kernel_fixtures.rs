//! The kernel-knowledge module on files captured from real kernels
//! (tests/data/kernels/, see its README): this host's 6.18 with KVM built in
//! and no kprobes, and Debian's 6.18.15 and 6.12.117 with KVM as a module
//! (split BTF from kvm.ko).

use std::path::PathBuf;

use common::{INVALID_PAGE, OFFSET_ABSENT, ProbeId};
use tracer::kernel::{
    AttachKind, AttachPlan, KernelError, KernelInfo, KvmLocation, PlanOptions, plan::plan,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kernels")
        .join(name)
}

fn plan_for(name: &str) -> AttachPlan {
    let info = KernelInfo::inspect(&fixture(name))
        .unwrap_or_else(|e| panic!("inspecting fixture {name}: {e}"));
    plan(&info, PlanOptions::default())
}

fn attach(p: &AttachPlan, id: ProbeId) -> AttachKind {
    p.probe(id).attach
}

fn field(p: &AttachPlan, name: &str) -> Option<u32> {
    p.fields.iter().find(|f| f.name == name).unwrap().offset
}

#[test]
fn host_6_18_builtin_kvm_without_kprobes_falls_back_to_tracepoints() {
    let p = plan_for("host-6.18.44-kvm-builtin");
    assert_eq!(p.kernel_release, "6.18.44-fc-v669");
    assert_eq!(p.kvm, KvmLocation::BuiltIn);
    assert_eq!(p.btf_sources.len(), 1, "vmlinux only: {:?}", p.btf_sources);

    let kprobes = p.feature("kprobes").unwrap();
    assert!(!kprobes.enabled);
    assert!(
        kprobes.reason.contains("CONFIG_KPROBES is not set"),
        "{}",
        kprobes.reason
    );
    for id in [
        ProbeId::MmuLoad,
        ProbeId::MmuLoadRet,
        ProbeId::MmuAllocDirectRoots,
        ProbeId::TdpMmuAllocRoot,
        ProbeId::TdpMmuAllocRootRet,
        ProbeId::InvalidateRoots,
        ProbeId::VcpuDestroy,
        ProbeId::VmDestroy,
    ] {
        assert_eq!(attach(&p, id), AttachKind::Off, "{id:?}");
        assert!(p.probe(id).reason.contains("kprobes unavailable"), "{id:?}");
    }
    assert_eq!(attach(&p, ProbeId::ZapAllFastKprobe), AttachKind::Off);
    assert_eq!(
        attach(&p, ProbeId::ZapAllFastTracepoint),
        AttachKind::RawTracepoint
    );
    assert!(
        p.probe(ProbeId::ZapAllFastTracepoint)
            .reason
            .contains("every call")
    );
    assert_eq!(attach(&p, ProbeId::KvmEntry), AttachKind::RawTracepoint);
    assert_eq!(attach(&p, ProbeId::KvmRunExit), AttachKind::RawTracepoint);
    assert!(p.feature("mirror-root-tracking").unwrap().enabled);
}

#[test]
fn offsets_match_the_hand_computed_cross_check() {
    // kvm-notes.md: pgd 48, hpa 56, mirror 64, root_role 80 inside
    // struct kvm_mmu (7.1.5); unchanged in these 6.18 kernels.
    for name in ["host-6.18.44-kvm-builtin", "debian-6.18.15-kvm-module"] {
        let p = plan_for(name);
        assert_eq!(field(&p, "kvm_mmu.root.pgd"), Some(48), "{name}");
        assert_eq!(field(&p, "kvm_mmu.root.hpa"), Some(56), "{name}");
        assert_eq!(field(&p, "kvm_mmu.mirror_root_hpa"), Some(64), "{name}");
        assert_eq!(field(&p, "kvm_mmu.root_role"), Some(80), "{name}");
        assert_eq!(p.offsets.mmu_mirror_root_hpa, 64, "{name}");
        assert_eq!(field(&p, "kvm_vcpu.kvm"), Some(0), "{name}");
        // vm_type and mmu_valid_gen are adjacent u8s in struct kvm_arch.
        let gen_ = field(&p, "kvm.arch.mmu_valid_gen").unwrap();
        let ty = field(&p, "kvm.arch.vm_type").unwrap();
        assert_eq!(ty, gen_ + 1, "{name}");
    }
}

#[test]
fn debian_6_18_module_kvm_uses_kprobes_and_the_alloc_root_fallback() {
    let p = plan_for("debian-6.18.15-kvm-module");
    assert_eq!(p.kernel_release, "6.18.15+deb13-amd64");
    assert_eq!(p.kvm, KvmLocation::Module);
    assert_eq!(p.btf_sources.len(), 2, "vmlinux + kvm split BTF");
    assert!(p.feature("kprobes").unwrap().enabled);

    assert_eq!(attach(&p, ProbeId::MmuLoad), AttachKind::Kprobe);
    assert_eq!(attach(&p, ProbeId::MmuLoadRet), AttachKind::Kretprobe);
    // mmu_alloc_direct_roots is inlined in Debian's 6.18.15 kvm.ko.
    assert_eq!(attach(&p, ProbeId::MmuAllocDirectRoots), AttachKind::Off);
    assert!(
        p.probe(ProbeId::MmuAllocDirectRoots)
            .reason
            .contains("kvm_tdp_mmu_alloc_root instead")
    );
    assert_eq!(attach(&p, ProbeId::TdpMmuAllocRoot), AttachKind::Kprobe);
    assert_eq!(
        attach(&p, ProbeId::TdpMmuAllocRootRet),
        AttachKind::Kretprobe
    );
    assert_eq!(
        p.config.alloc_root_mirror_arg, 1,
        "(vcpu, mirror) prototype"
    );
    // Issue 12: the tracepoint wherever it exists, even with kprobes: the
    // static function may be inlined into some of its three callers.
    assert_eq!(attach(&p, ProbeId::ZapAllFastKprobe), AttachKind::Off);
    assert!(
        p.probe(ProbeId::ZapAllFastKprobe)
            .reason
            .contains("not needed")
    );
    assert_eq!(
        attach(&p, ProbeId::ZapAllFastTracepoint),
        AttachKind::RawTracepoint
    );
    assert_eq!(attach(&p, ProbeId::InvalidateRoots), AttachKind::Kprobe);
    assert_eq!(attach(&p, ProbeId::KvmEntry), AttachKind::RawTracepoint);
    assert_eq!(
        attach(&p, ProbeId::KvmRunExit),
        AttachKind::Off,
        "kprobes cover loads"
    );
    assert!(p.feature("mirror-root-tracking").unwrap().enabled);
    assert!(p.feature("entry-invariant-check").unwrap().enabled);
}

#[test]
fn debian_6_12_has_no_mirror_root_and_says_so() {
    let p = plan_for("debian-6.12.117-kvm-module");
    assert_eq!(p.kvm, KvmLocation::Module);
    assert_eq!(field(&p, "kvm_mmu.mirror_root_hpa"), None);
    assert_eq!(
        p.offsets.mmu_mirror_root_hpa, OFFSET_ABSENT,
        "never guessed"
    );
    let mirror = p.feature("mirror-root-tracking").unwrap();
    assert!(!mirror.enabled);
    assert!(
        mirror.reason.contains("no member mirror_root_hpa"),
        "{}",
        mirror.reason
    );
    assert!(mirror.reason.contains("6.14"), "{}", mirror.reason);
    assert!(!p.feature("tdx-vm-detection").unwrap().enabled);
    assert!(!p.feature("entry-invariant-check").unwrap().enabled);

    // kvm_tdp_mmu_alloc_root(vcpu) had no mirror argument yet.
    assert_eq!(attach(&p, ProbeId::TdpMmuAllocRoot), AttachKind::Kprobe);
    assert_eq!(p.config.alloc_root_mirror_arg, 0);
    // kvm_mmu_zap_all_fast is inlined in 6.12's kvm.ko; the tracepoint is
    // used anyway.
    assert_eq!(attach(&p, ProbeId::ZapAllFastKprobe), AttachKind::Off);
    assert_eq!(
        attach(&p, ProbeId::ZapAllFastTracepoint),
        AttachKind::RawTracepoint
    );
    // Only kvm_tdp_mmu_invalidate_all_roots(kvm) exists in 6.12.
    assert_eq!(attach(&p, ProbeId::InvalidateRoots), AttachKind::Off);
    // The other offsets still resolve through split BTF.
    assert!(field(&p, "kvm_mmu.root.hpa").is_some());
    assert!(field(&p, "kvm.userspace_pid").is_some());
    assert!(field(&p, "kvm.arch.vm_type").is_some());
}

#[test]
fn missing_btf_and_missing_kvm_are_reported_as_such() {
    let empty = tempfile::tempdir().unwrap();
    match KernelInfo::inspect(empty.path()) {
        Err(KernelError::NoBtf { path }) => assert!(path.ends_with("sys/kernel/btf/vmlinux")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an empty root has no BTF"),
    }

    // Debian's vmlinux BTF without kvm's split BTF: KVM not loaded.
    let no_kvm = tempfile::tempdir().unwrap();
    let btf_dir = no_kvm.path().join("sys/kernel/btf");
    std::fs::create_dir_all(&btf_dir).unwrap();
    std::fs::copy(
        fixture("debian-6.18.15-kvm-module").join("sys/kernel/btf/vmlinux.zst"),
        btf_dir.join("vmlinux.zst"),
    )
    .unwrap();
    match KernelInfo::inspect(no_kvm.path()) {
        Err(e @ KernelError::NoKvm { .. }) => {
            assert!(e.to_string().contains("modprobe kvm_intel"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("no KVM types anywhere"),
    }

    // kvm's symbols are there but its BTF is not.
    std::fs::create_dir_all(no_kvm.path().join("proc")).unwrap();
    std::fs::write(
        no_kvm.path().join("proc/kallsyms"),
        "0000000000000000 T kvm_mmu_load\t[kvm]\n",
    )
    .unwrap();
    assert!(matches!(
        KernelInfo::inspect(no_kvm.path()),
        Err(KernelError::NoModuleBtf { .. })
    ));
}

#[test]
fn invalid_page_is_all_ones() {
    assert_eq!(INVALID_PAGE, !0u64);
}

/// A host whose only KVM backend is kvm_pvm (as this CI machine's) never
/// fires kvm:kvm_entry: the gate still attaches, but the entry check and
/// the entry transitions are reported off, saying why, where a host with
/// kvm_amd (or no /sys/module at all) keeps them on.
#[test]
fn a_kvm_pvm_host_reports_the_entry_check_as_unable_to_work() {
    let with = |modules: &[&str]| {
        let mut info = KernelInfo::inspect(&fixture("debian-6.18.15-kvm-module")).unwrap();
        info.kvm_backends = modules.iter().map(|m| (*m).to_owned()).collect();
        plan(&info, PlanOptions::default())
    };
    let p = with(&["kvm_pvm"]);
    assert_eq!(attach(&p, ProbeId::KvmEntry), AttachKind::RawTracepoint);
    for f in ["entry-invariant-check", "entry-transitions"] {
        let f = p.feature(f).unwrap();
        assert!(!f.enabled, "{f:?}");
        assert!(f.reason.contains("kvm_pvm"), "{f:?}");
    }
    for modules in [&["kvm_pvm", "kvm_amd"][..], &["kvm_intel"], &[]] {
        assert!(
            with(modules)
                .feature("entry-invariant-check")
                .unwrap()
                .enabled
        );
    }
}

/// Every field, offset, absence reason and probe decision of each fixture
/// kernel is what `plan.golden.json` beside it records: the golden files
/// were written by the code that parsed all of BTF with btf-rs, so the lazy
/// reader that replaced it must resolve exactly the same
/// (TRACER_UPDATE_GOLDEN=1 rewrites them).
#[test]
fn every_fixture_plans_exactly_as_recorded() {
    for name in [
        "host-6.18.44-kvm-builtin",
        "debian-6.18.15-kvm-module",
        "debian-6.12.117-kvm-module",
    ] {
        let p = plan_for(name);
        let mut got = serde_json::to_value(&p).unwrap();
        // Paths of this checkout aside.
        got.as_object_mut().unwrap().remove("btf_sources");
        got["offsets"] = serde_json::Value::String(format!("{:?}", p.offsets));
        got["config"] = serde_json::Value::String(format!("{:?}", p.config));
        let golden = fixture(name).join("plan.golden.json");
        let text = serde_json::to_string_pretty(&got).unwrap() + "\n";
        if std::env::var_os("TRACER_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        assert_eq!(
            text,
            want,
            "{name}: the plan differs from {}",
            golden.display()
        );
    }
}

/// The kvm_entry gate is planned as a BTF tracepoint first on each fixture:
/// its attach point is the typedef `btf_trace_kvm_entry`, found in the BTF
/// object that holds KVM (the kvm module's split BTF, whose ids continue
/// vmlinux's, or vmlinux), and the raw tracepoint stays the fallback. With
/// the option off, nothing is tried first.
#[test]
fn the_entry_gate_is_a_btf_tracepoint_first_with_the_typedef_of_its_btf_object() {
    use tracer::kernel::btf_reader::kind;
    for (name, module) in [
        ("host-6.18.44-kvm-builtin", None),
        ("debian-6.18.15-kvm-module", Some("kvm")),
        ("debian-6.12.117-kvm-module", Some("kvm")),
    ] {
        let info = KernelInfo::inspect(&fixture(name)).unwrap();
        let p = plan(&info, PlanOptions::default());
        let gate = p.probe(ProbeId::KvmEntry);
        assert_eq!(
            gate.attach,
            AttachKind::RawTracepoint,
            "{name}: the fallback"
        );
        let first = gate.btf_first.as_ref().unwrap_or_else(|| panic!("{name}"));
        assert_eq!(first.module.as_deref(), module, "{name}");
        assert_eq!(
            (first.program, first.floor),
            ("kvm_entry_gate_btf", "floor_kvm_entry_btf")
        );
        let t = info.btf.get(first.type_id).unwrap();
        assert_eq!(t.kind, kind::TYPEDEF, "{name}");
        assert_eq!(info.btf.type_name(&t), b"btf_trace_kvm_entry", "{name}");
        if module.is_some() {
            assert!(
                info.btf.first_id() > 1 && first.type_id >= info.btf.first_id(),
                "{name}: a module's typedef has a split-BTF id, after vmlinux's"
            );
        }

        let off = PlanOptions {
            entry_gate_btf: false,
            ..PlanOptions::default()
        };
        assert!(
            plan(&info, off)
                .probe(ProbeId::KvmEntry)
                .btf_first
                .is_none()
        );
    }
}
