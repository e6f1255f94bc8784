//! Soak: a million vCPU lifecycles of the model through the detector. The
//! detector's state must stay bounded: with teardown seen it returns to
//! zero, and with teardown missed (kernels without kprobes) the caps hold
//! and every eviction is counted.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use tracer_core::{
    detector::{Detector, DetectorConfig},
    model::{Behaviour, Model, Op, ZapCause},
};

/// Counts live heap bytes, so the soak measures the detector's real memory.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The heap count is process-wide: tests here run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const VCPUS_PER_VM: usize = 64;
const LIFECYCLES: usize = 1_000_000;

struct Peak {
    vms: usize,
    vcpus: usize,
    bytes: usize,
}

/// Runs LIFECYCLES vCPU lifecycles in VMs of VCPUS_PER_VM; `teardown`
/// says whether teardown events reach the detector.
fn soak(teardown: bool, cfg: DetectorConfig) -> (Detector, Peak) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut model = Model::new(Behaviour::Mainline, 42);
    let mut detector = Detector::new(cfg);
    let mut findings = Vec::new();
    let mut peak = Peak {
        vms: 0,
        vcpus: 0,
        bytes: 0,
    };
    let vms = LIFECYCLES / VCPUS_PER_VM;
    for i in 0..vms {
        let mut ops = vec![Op::CreateVm { tdx: i % 2 == 0 }];
        ops.extend((0..VCPUS_PER_VM).map(|_| Op::AddVcpu { vm: 0 }));
        ops.extend((0..VCPUS_PER_VM).map(|v| Op::Enter { vm: 0, vcpu: v }));
        if i % 4 == 0 {
            ops.push(Op::Zap {
                vm: 0,
                cause: ZapCause::GenerationWrap,
            });
            ops.extend((0..VCPUS_PER_VM).map(|v| Op::Enter { vm: 0, vcpu: v }));
        }
        for op in ops.into_iter().chain([Op::DestroyVm { vm: 0 }]) {
            if matches!(op, Op::DestroyVm { .. }) {
                peak.vms = peak.vms.max(detector.tracked_vms());
                peak.vcpus = peak.vcpus.max(detector.tracked_vcpus());
                if i % 256 == 0 {
                    peak.bytes = peak.bytes.max(detector.approx_bytes());
                }
            }
            model.apply(op);
            for ev in model.take_events() {
                // A kernel without kprobes shows neither teardown nor root
                // invalidation.
                let is_teardown = matches!(
                    ev.kind,
                    tracer_core::event::Kind::VmDestroy
                        | tracer_core::event::Kind::VcpuDestroy
                        | tracer_core::event::Kind::InvalidateRoots
                );
                if teardown || !is_teardown {
                    detector.observe(&ev, &mut findings);
                }
            }
        }
    }
    assert!(findings.is_empty(), "mainline: {} findings", findings.len());
    assert_eq!(model.live_vcpus(), 0);
    (detector, peak)
}

#[test]
fn a_million_lifecycles_with_teardown_leave_no_state() {
    let (d, peak) = soak(true, DetectorConfig::default());
    assert_eq!((d.tracked_vms(), d.tracked_vcpus()), (0, 0));
    let s = d.stats();
    assert_eq!(
        s.vcpus_torn_down as usize,
        LIFECYCLES / VCPUS_PER_VM * VCPUS_PER_VM
    );
    assert_eq!((s.vms_evicted, s.vcpus_evicted), (0, 0));
    assert_eq!(peak.vcpus, VCPUS_PER_VM, "one VM's vCPUs at a time");
    eprintln!(
        "soak with teardown: {} events, peak {} VMs / {} vCPUs tracked, ~{} bytes",
        s.events, peak.vms, peak.vcpus, peak.bytes
    );
}

#[test]
fn a_million_lifecycles_without_teardown_stay_within_the_caps() {
    let cfg = DetectorConfig {
        max_vms: 256,
        max_vcpus: 10_000,
        ..DetectorConfig::default()
    };
    let (d, peak) = soak(false, cfg);
    let s = d.stats();
    assert!(
        peak.vms <= 256 && peak.vcpus <= 10_000,
        "{peak_vms} {peak_vcpus}",
        peak_vms = peak.vms,
        peak_vcpus = peak.vcpus
    );
    // Every vCPU that is not tracked any more was evicted, and counted.
    assert_eq!(
        s.vcpus_evicted as usize + d.tracked_vcpus(),
        LIFECYCLES / VCPUS_PER_VM * VCPUS_PER_VM
    );
    let per_vcpu = peak.bytes / peak.vcpus.max(1);
    assert!(per_vcpu < 1024, "{per_vcpu} bytes per tracked vCPU");
    eprintln!(
        "soak without teardown: {} events, peak {} VMs / {} vCPUs tracked, ~{} bytes \
         (~{per_vcpu} bytes per vCPU), {} vCPUs and {} VMs evicted",
        s.events, peak.vms, peak.vcpus, peak.bytes, s.vcpus_evicted, s.vms_evicted
    );
}

/// Real heap (not an estimate) of a detector tracking 10,000 vCPUs.
#[test]
fn memory_per_tracked_vcpu() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut model = Model::new(Behaviour::Mainline, 5);
    let mut detector = Detector::new(DetectorConfig::default());
    let mut findings = Vec::new();
    let mut events = Vec::new();
    for vm in 0..(10_000 / 100) {
        model.apply(Op::CreateVm { tdx: vm % 2 == 0 });
        for v in 0..100 {
            model.apply(Op::AddVcpu { vm });
            model.apply(Op::Enter { vm, vcpu: v });
        }
        events.extend(model.take_events());
    }
    let before = LIVE.load(Ordering::Relaxed);
    for ev in &events {
        detector.observe(ev, &mut findings);
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(detector.tracked_vcpus(), 10_000);
    assert!(findings.is_empty());
    let per = used / 10_000;
    eprintln!(
        "detector heap with 10,000 vCPUs: {used} bytes, {per} bytes per vCPU (estimate said {})",
        detector.approx_bytes()
    );
    assert!(used < 32 << 20, "{used} bytes");
    assert!(per < 1024, "{per} bytes per vCPU");
}
