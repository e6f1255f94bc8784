//! Table tests: one hand-written event sequence per finding kind, and the
//! sequences that must not raise it.

use std::borrow::Cow;

use tracer_core::{
    detector::{Boundary, Detector, DetectorConfig, Finding, FindingKind, Severity},
    event::{Comm, Event, Kind},
};

const INVALID: u64 = u64::MAX;
const KVM: u64 = 0xffff_8881_0000_0000;
const VCPU: u64 = 0xffff_8882_0000_2000;
const TDX: u8 = 5;

/// An event about VM `KVM` (type `vm_type`) at time `t` ms.
fn ev(kind: Kind, t_ms: u64, vm_type: u8) -> Event {
    Event {
        probe: Cow::Borrowed("test"),
        pid: 100,
        tid: 101,
        comm: Comm::new("qemu-kvm").unwrap(),
        kvm: Some(KVM),
        userspace_pid: Some(100),
        vm_type: Some(vm_type),
        mmu_valid_gen: Some(0),
        memslots_gen: Some(0),
        ..Event::bare(kind, t_ms * 1_000_000)
    }
}

/// An event about vCPU 3 of that VM, with its roots.
fn vcpu_ev(kind: Kind, t_ms: u64, vm_type: u8, root: u64, mirror: u64) -> Event {
    Event {
        vcpu: Some(VCPU),
        vcpu_id: Some(3),
        root_hpa: Some(root),
        mirror_root_hpa: Some(mirror),
        ..ev(kind, t_ms, vm_type)
    }
}

fn run(events: &[Event]) -> Vec<Finding> {
    run_with(DetectorConfig::default(), events)
}

fn run_with(cfg: DetectorConfig, events: &[Event]) -> Vec<Finding> {
    let mut d = Detector::new(cfg);
    let mut out = Vec::new();
    for e in events {
        d.observe(e, &mut out);
    }
    out
}

fn kinds(f: &[Finding]) -> Vec<FindingKind> {
    f.iter().map(|f| f.kind).collect()
}

#[test]
fn mirror_root_invalid_at_entry_from_the_kernel_gate() {
    let f = run(&[vcpu_ev(Kind::EntryForbidden, 1, TDX, 0x5000, INVALID)]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootInvalidAtEntry]);
    let f = &f[0];
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(
        (f.kvm, f.userspace_pid, f.vcpu_id),
        (KVM, Some(100), Some(3))
    );
    assert_eq!(f.evidence.len(), 1);
    assert!(
        f.explanation.contains("kvm_mmu_reload()"),
        "{}",
        f.explanation
    );
}

#[test]
fn mirror_root_invalid_at_entry_from_a_run_exit_sample_once_per_state() {
    let f = run(&[
        vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x6000),
        vcpu_ev(Kind::RunExit, 2, TDX, 0x7000, INVALID),
        vcpu_ev(Kind::RunExit, 3, TDX, 0x7000, INVALID),
        vcpu_ev(Kind::RunExit, 4, TDX, 0x7000, INVALID),
    ]);
    assert_eq!(
        kinds(&f),
        [
            FindingKind::MirrorRootChangedWithoutTeardown,
            FindingKind::MirrorRootInvalidAtEntry
        ],
        "one finding per forbidden state, not per entry"
    );
}

#[test]
fn failed_run_exit_is_not_an_entry() {
    let mut e = vcpu_ev(Kind::RunExit, 1, TDX, 0x5000, INVALID);
    e.ret = Some(-4);
    assert!(run(&[e]).is_empty());
}

#[test]
fn mirror_root_invalid_after_load() {
    let mut ret = vcpu_ev(Kind::LoadReturn, 2, TDX, 0x5000, INVALID);
    ret.ret = Some(0);
    let f = run(&[vcpu_ev(Kind::LoadEnter, 1, TDX, INVALID, INVALID), ret]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootInvalidAfterLoad]);
    assert_eq!(f[0].severity, Severity::Critical);
}

#[test]
fn legal_states_raise_nothing() {
    // (1) both invalid, (2) mirror only, (3) both valid.
    let mut events = Vec::new();
    for (t, (root, mirror)) in [(INVALID, INVALID), (INVALID, 0x6000), (0x5000, 0x6000)]
        .into_iter()
        .enumerate()
    {
        let mut r = vcpu_ev(Kind::LoadReturn, t as u64 * 2 + 1, TDX, root, mirror);
        r.ret = Some(0);
        events.push(r);
        events.push(vcpu_ev(
            Kind::EntryTransition,
            t as u64 * 2 + 2,
            TDX,
            root,
            mirror,
        ));
    }
    assert_eq!(kinds(&run(&events)), []);
}

#[test]
fn mirror_root_realloc_while_valid() {
    let mut first = vcpu_ev(Kind::AllocRoot, 1, TDX, INVALID, 0x6000);
    first.arg = Some(1);
    first.before_hpa = Some(INVALID);
    let mut again = vcpu_ev(Kind::AllocRoot, 2, TDX, INVALID, 0x6000);
    again.arg = Some(1);
    again.before_hpa = Some(0x6000);
    let f = run(&[first.clone(), again]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootReallocWhileValid]);
    assert_eq!(f[0].severity, Severity::Error);
    assert_eq!(
        f[0].evidence.len(),
        2,
        "the allocation that set it, and this one"
    );
    assert_eq!(f[0].evidence[0], first);
    // A direct-root allocation while the mirror is valid is normal.
    let mut direct = vcpu_ev(Kind::AllocRoot, 3, TDX, 0x5000, 0x6000);
    direct.arg = Some(0);
    direct.before_hpa = Some(INVALID);
    assert_eq!(kinds(&run(&[first, direct])), []);
}

#[test]
fn mirror_root_changed_without_teardown_but_not_across_teardown() {
    let a = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x6000);
    let b = vcpu_ev(Kind::EntryTransition, 2, TDX, 0x5000, 0x9000);
    let f = run(&[a.clone(), b.clone()]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootChangedWithoutTeardown]);
    assert_eq!(f[0].evidence, vec![a.clone(), b.clone()]);

    let destroy = vcpu_ev(Kind::VcpuDestroy, 2, TDX, 0x5000, 0x6000);
    let mut reborn = b;
    reborn.ts_ns = 3_000_000;
    assert_eq!(kinds(&run(&[a, destroy, reborn])), []);
}

#[test]
fn mirror_roots_invalidated_live_only_with_running_vcpus() {
    let mut inval = ev(Kind::InvalidateRoots, 5, TDX);
    inval.arg = Some(6);
    let running = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x6000);

    let f = run(&[running.clone(), inval.clone()]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootsInvalidatedLive]);
    assert_eq!(f[0].vcpu_id, None, "a VM-level finding");

    // Direct roots only: the normal fast zap.
    let mut direct = inval.clone();
    direct.arg = Some(2);
    assert_eq!(kinds(&run(&[running.clone(), direct])), []);
    // Teardown: the VM event comes first, then the invalidation.
    let destroy = ev(Kind::VmDestroy, 4, TDX);
    assert_eq!(kinds(&run(&[running.clone(), destroy, inval.clone()])), []);
    // No vCPU ever seen.
    assert_eq!(
        kinds(&run(&[ev(Kind::ZapAllFast, 1, TDX), inval.clone()])),
        []
    );
    // A vCPU that only loaded its roots (KVM_TDX_INIT_MEM_REGION before any
    // KVM_RUN, or a kprobe host with --no-entry-transitions) is alive: its
    // mirror root is in use. Issue 12: "running" must not depend on entry
    // transitions.
    let loaded = vcpu_ev(Kind::LoadEnter, 1, TDX, INVALID, INVALID);
    assert_eq!(
        kinds(&run(&[loaded, inval])),
        [FindingKind::MirrorRootsInvalidatedLive]
    );
}

#[test]
fn mmu_load_failed_names_the_errno() {
    let mut ret = vcpu_ev(Kind::LoadReturn, 2, 0, INVALID, INVALID);
    ret.ret = Some(-12);
    let f = run(&[ret]);
    assert_eq!(kinds(&f), [FindingKind::MmuLoadFailed]);
    assert_eq!(f[0].severity, Severity::Warning);
    assert!(f[0].explanation.contains("-ENOMEM"), "{}", f[0].explanation);
}

#[test]
fn zap_storm_is_informational_and_once_per_window() {
    let cfg = DetectorConfig {
        zap_storm_count: 10,
        zap_storm_window_ns: 1_000_000_000,
        ..DetectorConfig::default()
    };
    // 30 zaps 10 ms apart: 300 ms, one window.
    let storm: Vec<Event> = (0..30).map(|i| ev(Kind::ZapAllFast, 10 * i, 0)).collect();
    let f = run_with(cfg, &storm);
    assert_eq!(kinds(&f), [FindingKind::ZapStorm]);
    assert_eq!(f[0].severity, Severity::Info);
    // 30 zaps 200 ms apart: never 10 within a second.
    let calm: Vec<Event> = (0..30).map(|i| ev(Kind::ZapAllFast, 200 * i, 0)).collect();
    assert_eq!(kinds(&run_with(cfg, &calm)), []);
}

#[test]
fn non_tdx_vms_never_raise_mirror_findings() {
    for vm_type in [0u8, 1, 2, 3, 4] {
        let mut alloc = vcpu_ev(Kind::AllocRoot, 3, vm_type, INVALID, 0x6000);
        alloc.arg = Some(1);
        alloc.before_hpa = Some(0x6000);
        let mut load = vcpu_ev(Kind::LoadReturn, 4, vm_type, 0x5000, INVALID);
        load.ret = Some(0);
        let mut inval = ev(Kind::InvalidateRoots, 6, vm_type);
        inval.arg = Some(6);
        let events = [
            vcpu_ev(Kind::EntryTransition, 1, vm_type, 0x5000, 0x6000),
            vcpu_ev(Kind::EntryTransition, 2, vm_type, 0x5000, 0x7000),
            alloc,
            load,
            vcpu_ev(Kind::EntryForbidden, 5, vm_type, 0x5000, INVALID),
            vcpu_ev(Kind::RunExit, 5, vm_type, 0x5000, INVALID),
            inval,
        ];
        let f = run(&events);
        assert!(
            f.iter().all(|f| !f.kind.is_mirror()),
            "vm_type {vm_type}: {:?}",
            kinds(&f)
        );
    }
}

#[test]
fn state_is_bounded_by_the_caps_and_eviction_is_counted() {
    let cfg = DetectorConfig {
        max_vms: 8,
        max_vcpus: 64,
        ..DetectorConfig::default()
    };
    let mut d = Detector::new(cfg);
    let mut out = Vec::new();
    for i in 0..10_000u64 {
        let mut e = vcpu_ev(Kind::EntryTransition, i, 0, 0x5000, INVALID);
        e.kvm = Some(KVM + (i % 50) * 0x10000);
        e.vcpu = Some(VCPU + i * 0x2000);
        d.observe(&e, &mut out);
        assert!(d.tracked_vms() <= 8 && d.tracked_vcpus() <= 64);
    }
    let s = d.stats();
    assert!(s.vcpus_evicted >= 10_000 - 64, "{s:?}");
    assert!(s.vms_evicted > 0, "{s:?}");
    assert!(out.is_empty());
}

#[test]
fn teardown_frees_all_state() {
    let mut d = Detector::new(DetectorConfig::default());
    let mut out = Vec::new();
    for v in 0..4u64 {
        let mut e = vcpu_ev(Kind::EntryTransition, v, TDX, 0x5000, 0x6000);
        e.vcpu = Some(VCPU + v * 0x2000);
        d.observe(&e, &mut out);
    }
    assert_eq!((d.tracked_vms(), d.tracked_vcpus()), (1, 4));
    d.observe(&ev(Kind::VmDestroy, 10, TDX), &mut out);
    assert_eq!((d.tracked_vms(), d.tracked_vcpus()), (0, 0));
    assert_eq!(d.stats().vcpus_torn_down, 4);
}

#[test]
fn findings_round_trip_through_json() {
    let f = run(&[vcpu_ev(Kind::EntryForbidden, 1, TDX, 0x5000, INVALID)]);
    let json = f[0].to_json_record();
    assert!(
        json.starts_with(r#"{"record":"finding","kind":"mirror_root_invalid_at_entry""#),
        "{json}"
    );
    assert!(json.contains(r#""severity":"critical""#), "{json}");
    assert!(json.contains(r#""kvm":"0xffff888100000000""#), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let back: Finding = serde_json::from_value(v).unwrap();
    assert_eq!(back, f[0]);
}

// ---------------------------------------------------------------------------
// Issue 12: verdicts you can page on. Each test below failed before the fix.

fn run_steps(steps: &[Step]) -> (Detector, Vec<Finding>) {
    let mut d = Detector::new(DetectorConfig::default());
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Ev(e) => d.observe(e, &mut out),
            Step::B(b) => d.boundary(*b),
        }
    }
    (d, out)
}

#[expect(clippy::large_enum_variant, reason = "test steps, a handful per test")]
enum Step {
    Ev(Event),
    B(Boundary),
}

fn with_pid(mut e: Event, pid: i32) -> Event {
    e.userspace_pid = Some(pid);
    e
}

#[test]
fn a_new_creator_pid_on_a_known_kvm_pointer_is_a_new_vm() {
    let a = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x3000);
    let b = with_pid(vcpu_ev(Kind::EntryTransition, 2, TDX, 0x9000, 0x7000), 200);
    let (d, f) = run_steps(&[Step::Ev(a), Step::Ev(b)]);
    assert_eq!(kinds(&f), []);
    assert_eq!(d.stats().vms_reused, 1);
}

#[test]
fn a_new_boot_or_a_new_recording_resets_what_is_known() {
    let a = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x3000);
    let b = vcpu_ev(Kind::EntryTransition, 2, TDX, 0x9000, 0x7000);
    for boundary in [Boundary::NewBoot, Boundary::NewRecording, Boundary::Gap] {
        let (_, f) = run_steps(&[Step::Ev(a.clone()), Step::B(boundary), Step::Ev(b.clone())]);
        assert_eq!(kinds(&f), [], "{boundary:?}");
    }
    // Once seen after the gap, a change is a change again.
    let c = vcpu_ev(Kind::EntryTransition, 3, TDX, 0x9000, 0x8000);
    let (_, f) = run_steps(&[
        Step::Ev(a),
        Step::B(Boundary::Gap),
        Step::Ev(b),
        Step::Ev(c),
    ]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootChangedWithoutTeardown]);
}

#[test]
fn after_a_gap_realloc_rests_on_the_kernels_before_value() {
    let seen = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x3000);
    let mut alloc = vcpu_ev(Kind::AllocRoot, 3, TDX, INVALID, 0x7000);
    alloc.arg = Some(1);
    // No before value read: remembered state stands in only without a gap.
    let (_, f) = run_steps(&[Step::Ev(seen.clone()), Step::Ev(alloc.clone())]);
    assert!(kinds(&f).contains(&FindingKind::MirrorRootReallocWhileValid));
    let (_, f) = run_steps(&[
        Step::Ev(seen.clone()),
        Step::B(Boundary::Gap),
        Step::Ev(alloc.clone()),
    ]);
    assert_eq!(kinds(&f), []);
    // The kernel's before value decides, gap or not.
    alloc.before_hpa = Some(INVALID);
    let (_, f) = run_steps(&[Step::Ev(seen.clone()), Step::Ev(alloc.clone())]);
    assert!(!kinds(&f).contains(&FindingKind::MirrorRootReallocWhileValid));
    alloc.before_hpa = Some(0x6000);
    let (_, f) = run_steps(&[Step::Ev(seen), Step::B(Boundary::Gap), Step::Ev(alloc)]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootReallocWhileValid]);
}

#[test]
fn after_a_gap_invalidated_live_needs_a_vcpu_seen_again() {
    let seen = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x3000);
    let mut inval = ev(Kind::InvalidateRoots, 5, TDX);
    inval.arg = Some(6);
    let (_, f) = run_steps(&[
        Step::Ev(seen.clone()),
        Step::B(Boundary::Gap),
        Step::Ev(inval.clone()),
    ]);
    assert_eq!(kinds(&f), []);
    let again = vcpu_ev(Kind::EntryTransition, 3, TDX, 0x5000, 0x3000);
    let (_, f) = run_steps(&[
        Step::Ev(seen),
        Step::B(Boundary::Gap),
        Step::Ev(again),
        Step::Ev(inval),
    ]);
    assert_eq!(kinds(&f), [FindingKind::MirrorRootsInvalidatedLive]);
}

#[test]
fn late_events_of_a_destroyed_vm_do_not_bring_it_back() {
    let mut d = Detector::new(DetectorConfig::default());
    let mut out = Vec::new();
    d.observe(
        &vcpu_ev(Kind::EntryTransition, 1, 0, 0x5000, INVALID),
        &mut out,
    );
    d.observe(&ev(Kind::VmDestroy, 2, 0), &mut out);
    // __x86_set_memory_region() in kvm_arch_destroy_vm: a fast zap.
    d.observe(&ev(Kind::ZapAllFast, 3, 0), &mut out);
    d.observe(&vcpu_ev(Kind::VcpuDestroy, 4, 0, 0x5000, INVALID), &mut out);
    assert!(!d.knows_vm(KVM));
    assert_eq!(d.tracked_vms(), 0);
    assert_eq!(d.stats().events_after_teardown, 1);
    // A vCPU event at that address is a new VM.
    d.observe(&vcpu_ev(Kind::LoadEnter, 5, 0, INVALID, INVALID), &mut out);
    assert!(d.knows_vm(KVM));
}

#[test]
fn a_failed_read_is_unknown_never_invalid() {
    let seen = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x3000);
    // The gate's record, but the mirror read failed.
    let mut forbidden = vcpu_ev(Kind::EntryForbidden, 2, TDX, 0x5000, INVALID);
    forbidden.mirror_root_hpa = None;
    // The root read failed on a sample; an earlier event's INVALID mirror
    // must not be combined with a later event's root.
    let first = vcpu_ev(Kind::LoadEnter, 3, TDX, INVALID, INVALID);
    let mut sample = vcpu_ev(Kind::RunExit, 4, TDX, 0x5000, INVALID);
    sample.mirror_root_hpa = None;
    sample.ret = Some(0);
    assert_eq!(kinds(&run(&[seen.clone(), forbidden])), []);
    assert_eq!(kinds(&run(&[first, sample])), []);
    // entry_forbidden whose own fields show a legal state is not trusted.
    let legal = vcpu_ev(Kind::EntryForbidden, 2, TDX, 0x5000, 0x3000);
    assert_eq!(kinds(&run(&[seen, legal])), []);
}

#[test]
fn a_second_episode_is_reported_and_entry_after_load_too() {
    let mut load = vcpu_ev(Kind::LoadReturn, 1, TDX, 0x5000, INVALID);
    load.ret = Some(0);
    let f = run(&[
        load,
        vcpu_ev(Kind::EntryForbidden, 2, TDX, 0x5000, INVALID),
        vcpu_ev(Kind::EntryForbidden, 3, TDX, 0x5000, INVALID),
        vcpu_ev(Kind::EntryTransition, 4, TDX, INVALID, INVALID),
        vcpu_ev(Kind::EntryForbidden, 5, TDX, 0x5000, INVALID),
    ]);
    assert_eq!(
        kinds(&f),
        [
            FindingKind::MirrorRootInvalidAfterLoad,
            FindingKind::MirrorRootInvalidAtEntry,
            FindingKind::MirrorRootInvalidAtEntry
        ]
    );
}

#[test]
fn stale_mirror_roots_from_an_invalidation_or_from_the_kernel() {
    let seen = vcpu_ev(Kind::EntryTransition, 1, TDX, 0x5000, 0x3000);
    let mut inval = ev(Kind::InvalidateRoots, 2, TDX);
    inval.arg = Some(6);
    let mut load = vcpu_ev(Kind::LoadReturn, 3, TDX, 0x9000, 0x3000);
    load.ret = Some(0);
    let entry = vcpu_ev(Kind::EntryTransition, 4, TDX, 0x9000, 0x3000);
    let f = run(&[seen.clone(), inval, load, entry.clone()]);
    assert_eq!(
        kinds(&f),
        [
            FindingKind::MirrorRootsInvalidatedLive,
            FindingKind::MirrorRootStaleAfterLoad,
            FindingKind::MirrorRootStaleAtEntry
        ]
    );
    assert!(f.iter().skip(1).all(|f| f.severity == Severity::Critical));
    // The kernel read role.invalid on the root's page (invalidate unseen).
    let mut stale = entry.clone();
    stale.mirror_role = Some(0x80884);
    stale.mirror_stale = Some(true);
    assert_eq!(
        kinds(&run(&[seen.clone(), stale])),
        [FindingKind::MirrorRootStaleAtEntry]
    );
    // The kernel says the page is valid: no finding. (Bit 11 of this role
    // word is set, but on 7.2+ `invalid` is bit 12: the probe judges with the
    // position from BTF, never the detector with a constant.)
    let mut fresh = entry;
    fresh.mirror_role = Some(0x80884);
    fresh.mirror_stale = Some(false);
    assert_eq!(kinds(&run(&[seen, fresh])), []);
}

#[test]
fn invalidated_live_does_not_depend_on_entry_transitions() {
    // A kprobe host with --no-entry-transitions sees loads, not entries.
    let enter = vcpu_ev(Kind::LoadEnter, 1, TDX, INVALID, 0x3000);
    let mut ret = vcpu_ev(Kind::LoadReturn, 2, TDX, 0x5000, 0x3000);
    ret.ret = Some(0);
    let mut inval = ev(Kind::InvalidateRoots, 3, TDX);
    inval.arg = Some(6);
    assert_eq!(
        kinds(&run(&[enter, ret, inval])),
        [FindingKind::MirrorRootsInvalidatedLive]
    );
}
