//! Named workloads for the model (`tracer simulate --scenario`), and the
//! simulation `tracer simulate` prints or records: a fixed header and the
//! events, the same bytes for the same seed.

use super::{Behaviour, Model, Op, Rng, ZapCause};
use crate::{
    event::Event,
    log::{ClockPair, Header},
};

/// Named workloads for `tracer simulate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Two TDX VMs and one default VM run; memslot deletes on the default
    /// VM and MMIO-generation wraps on all of them zap from time to time.
    Steady,
    /// TDX VMs through memory hot-plug/unplug cycles: frequent generation
    /// wraps, each followed by every vCPU re-entering.
    Hotplug,
    /// VMs and vCPUs created, run, zapped and torn down, over and over.
    Churn,
    /// One default VM whose VMM deletes and re-adds memslots in a tight
    /// loop: a zap storm.
    ZapStorm,
    /// A TDX VM whose root loads sometimes fail with -ENOMEM.
    LoadFailure,
    /// A busy host: 100 VMs (one in four TDX) of --vcpus vCPUs each; every
    /// round all vCPUs enter and a few VMs zap.
    Fleet,
}

/// VMs in the `fleet` scenario.
pub const FLEET_VMS: usize = 100;

/// The `fleet` scenario: FLEET_VMS VMs, one in four TDX; every round all
/// vCPUs enter and three VMs zap.
fn fleet(model: &mut Model, rng: &mut Rng, vcpus: usize, rounds: usize) {
    for i in 0..FLEET_VMS {
        model.apply(Op::CreateVm {
            tdx: i.is_multiple_of(4),
        });
        for _ in 0..vcpus {
            model.apply(Op::AddVcpu { vm: i });
        }
    }
    for _ in 0..rounds {
        for vm in 0..model.live_vms() {
            for vcpu in 0..model.vms[vm].vcpus.len() {
                model.apply(Op::Enter { vm, vcpu });
            }
        }
        for _ in 0..3 {
            let vm = rng.below(FLEET_VMS as u64) as usize;
            let cause = if vm.is_multiple_of(4) {
                ZapCause::GenerationWrap
            } else {
                ZapCause::MemslotDelete
            };
            model.apply(Op::Zap { vm, cause });
        }
    }
}

/// Runs a scenario: `vcpus` per VM, deterministic for a `seed`.
pub fn run_scenario(model: &mut Model, scenario: Scenario, vcpus: usize, rounds: usize) {
    let vcpus = vcpus.max(1);
    let mut rng = Rng::new(model.rng.next_u64());
    let enter_all = |m: &mut Model| {
        for vm in 0..m.live_vms() {
            for c in 0..m.vms[vm].vcpus.len() {
                m.apply(Op::Enter { vm, vcpu: c });
            }
        }
    };
    let spawn = |m: &mut Model, tdx: bool| {
        m.apply(Op::CreateVm { tdx });
        let vm = m.live_vms() - 1;
        for _ in 0..vcpus {
            m.apply(Op::AddVcpu { vm });
        }
    };
    match scenario {
        Scenario::Steady => {
            spawn(model, true);
            spawn(model, true);
            spawn(model, false);
            for _ in 0..rounds {
                enter_all(model);
                match rng.below(4) {
                    0 => model.apply(Op::Zap {
                        vm: 2,
                        cause: ZapCause::MemslotDelete,
                    }),
                    1 => model.apply(Op::Zap {
                        vm: rng.below(3) as usize,
                        cause: ZapCause::GenerationWrap,
                    }),
                    _ => {}
                }
            }
        }
        Scenario::Hotplug => {
            spawn(model, true);
            spawn(model, true);
            for _ in 0..rounds {
                enter_all(model);
                for vm in 0..2 {
                    model.apply(Op::Zap {
                        vm,
                        cause: ZapCause::GenerationWrap,
                    });
                }
                enter_all(model);
            }
        }
        Scenario::Churn => {
            for _ in 0..rounds {
                spawn(model, rng.below(2) == 0);
                enter_all(model);
                model.apply(Op::Zap {
                    vm: rng.below(8) as usize,
                    cause: ZapCause::GenerationWrap,
                });
                enter_all(model);
                if rng.below(3) == 0 {
                    model.apply(Op::DestroyVcpu {
                        vm: rng.below(8) as usize,
                        vcpu: rng.below(64) as usize,
                    });
                }
                if model.live_vms() > 3 {
                    model.apply(Op::DestroyVm {
                        vm: rng.below(8) as usize,
                    });
                }
            }
            while model.live_vms() > 0 {
                model.apply(Op::DestroyVm { vm: 0 });
            }
        }
        Scenario::ZapStorm => {
            spawn(model, false);
            enter_all(model);
            for _ in 0..rounds.max(60) {
                model.apply(Op::Zap {
                    vm: 0,
                    cause: ZapCause::MemslotDelete,
                });
                enter_all(model);
            }
        }
        Scenario::Fleet => fleet(model, &mut rng, vcpus, rounds),
        Scenario::LoadFailure => {
            spawn(model, true);
            for _ in 0..rounds {
                if rng.below(4) == 0 {
                    model.apply(Op::FailNextLoad {
                        vm: 0,
                        vcpu: rng.below(vcpus as u64) as usize,
                    });
                }
                enter_all(model);
            }
        }
    }
}

/// What `tracer simulate` prints or records.
pub struct Simulation {
    pub header: Header,
    pub events: Vec<Event>,
}

/// Runs `scenario` on a model of `behaviour`, deterministic for a `seed`,
/// with a header that is too: model time 0 is 2026-01-01T00:00:00Z.
pub fn simulate(
    behaviour: Behaviour,
    scenario: Scenario,
    vcpus: usize,
    rounds: usize,
    seed: u64,
) -> Simulation {
    let mut model = Model::new(behaviour, seed);
    run_scenario(&mut model, scenario, vcpus, rounds);
    let name = serde_json::to_value(behaviour)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut header = Header::for_this_host(format!("model:{name}"), "model".into(), vec![]);
    header.hostname = "model".into();
    header.boot_id = format!("model-seed-{seed}");
    header.recording = Some(format!("model-seed-{seed}"));
    header.clock = ClockPair {
        monotonic_ns: 0,
        realtime_ns: 1_767_225_600_000_000_000,
    };
    Simulation {
        header,
        events: model.take_events(),
    }
}
