//! Property tests: random interleavings of the lifecycle model, fed to the
//! detector. `mainline` must yield no mirror finding; each faulty kernel
//! behaviour must yield exactly the findings the model says it caused, on
//! the right vCPU, every time.

use proptest::prelude::*;
use tracer_core::{
    detector::{Detector, DetectorConfig, FindingKind},
    model::{Behaviour, Expected, Model, Op, ZapCause},
};

fn op() -> impl Strategy<Value = Op> {
    let idx = 0usize..16;
    prop_oneof![
        1 => any::<bool>().prop_map(|tdx| Op::CreateVm { tdx }),
        2 => idx.clone().prop_map(|vm| Op::AddVcpu { vm }),
        10 => (idx.clone(), idx.clone()).prop_map(|(vm, vcpu)| Op::Enter { vm, vcpu }),
        2 => idx.clone().prop_map(|vm| Op::Zap { vm, cause: ZapCause::GenerationWrap }),
        1 => idx.clone().prop_map(|vm| Op::Zap { vm, cause: ZapCause::MemslotDelete }),
        1 => (idx.clone(), idx.clone()).prop_map(|(vm, vcpu)| Op::FailNextLoad { vm, vcpu }),
        1 => (idx.clone(), idx.clone()).prop_map(|(vm, vcpu)| Op::DestroyVcpu { vm, vcpu }),
        1 => idx.prop_map(|vm| Op::DestroyVm { vm }),
    ]
}

/// Runs the ops; returns (what the detector found, what the model says it
/// must find), both sorted, zap storms aside (they depend on the window).
fn run(behaviour: Behaviour, seed: u64, ops: &[Op]) -> (Vec<Expected>, Vec<Expected>) {
    let mut model = Model::new(behaviour, seed);
    // Start with a TDX VM and a default VM so every run has both.
    for op in [
        Op::CreateVm { tdx: true },
        Op::AddVcpu { vm: 0 },
        Op::CreateVm { tdx: false },
        Op::AddVcpu { vm: 1 },
    ] {
        model.apply(op);
    }
    let mut detector = Detector::new(DetectorConfig {
        zap_storm_count: usize::MAX,
        ..DetectorConfig::default()
    });
    let mut findings = Vec::new();
    for &op in ops {
        model.apply(op);
        for ev in model.take_events() {
            detector.observe(&ev, &mut findings);
        }
    }
    let mut found: Vec<Expected> = findings
        .iter()
        .map(|f| Expected {
            kind: f.kind,
            kvm: f.kvm,
            vcpu: f.vcpu,
        })
        .collect();
    let mut expected = model.expected.clone();
    found.sort();
    expected.sort();
    (found, expected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mainline_yields_no_mirror_findings(seed: u64, ops in prop::collection::vec(op(), 1..300)) {
        let (found, expected) = run(Behaviour::Mainline, seed, &ops);
        prop_assert!(found.iter().all(|f| !f.kind.is_mirror()), "{found:?}");
        prop_assert_eq!(found, expected);
    }

    #[test]
    fn v3_realloc_is_caught_on_the_right_vcpu_every_time(
        seed: u64,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let (found, expected) = run(Behaviour::V3UnconditionalMirrorAlloc, seed, &ops);
        prop_assert!(expected.iter().all(|e| e.kind != FindingKind::MirrorRootInvalidAtEntry));
        prop_assert_eq!(found, expected);
    }

    #[test]
    fn mirror_invalidated_by_zap_is_caught_on_the_right_vcpu_every_time(
        seed: u64,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let (found, expected) = run(Behaviour::MirrorInvalidatedByZap, seed, &ops);
        prop_assert!(expected.iter().all(|e| e.kind != FindingKind::MirrorRootInvalidAtEntry));
        prop_assert_eq!(found, expected);
    }

    #[test]
    fn mirror_freed_by_zap_is_caught_on_the_right_vcpu_every_time(
        seed: u64,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let (found, expected) = run(Behaviour::MirrorFreedByZap, seed, &ops);
        prop_assert!(expected.iter().all(|e| e.kind != FindingKind::MirrorRootStaleAtEntry));
        prop_assert_eq!(found, expected);
    }
}

/// The faulty behaviours do fault: over a fixed busy sequence, each raises
/// its own finding (so the properties above are not vacuously true).
#[test]
fn each_faulty_behaviour_raises_its_finding() {
    let mut ops = Vec::new();
    for round in 0..20 {
        ops.push(Op::AddVcpu { vm: 0 });
        for v in 0..4 {
            ops.push(Op::Enter { vm: 0, vcpu: v });
            ops.push(Op::Enter { vm: 1, vcpu: v });
        }
        ops.push(Op::Zap {
            vm: round,
            cause: ZapCause::GenerationWrap,
        });
    }
    for (behaviour, kind) in [
        (
            Behaviour::V3UnconditionalMirrorAlloc,
            FindingKind::MirrorRootReallocWhileValid,
        ),
        (
            Behaviour::MirrorInvalidatedByZap,
            FindingKind::MirrorRootStaleAtEntry,
        ),
        (
            Behaviour::MirrorInvalidatedByZap,
            FindingKind::MirrorRootStaleAfterLoad,
        ),
        (
            Behaviour::MirrorInvalidatedByZap,
            FindingKind::MirrorRootsInvalidatedLive,
        ),
        (
            Behaviour::MirrorFreedByZap,
            FindingKind::MirrorRootInvalidAtEntry,
        ),
        (
            Behaviour::MirrorFreedByZap,
            FindingKind::MirrorRootsInvalidatedLive,
        ),
    ] {
        let (found, expected) = run(behaviour, 7, &ops);
        assert_eq!(found, expected);
        let n = found.iter().filter(|f| f.kind == kind).count();
        assert!(n >= 2, "{behaviour:?} raised {n} {kind:?}: {found:?}");
    }
    let (found, _) = run(Behaviour::Mainline, 7, &ops);
    assert!(found.is_empty(), "{found:?}");
}
