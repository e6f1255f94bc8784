//! A model of KVM's MMU root lifecycle that emits events the way a kernel
//! with this tool's probes would: vCPU creation, root loads (entry and
//! return, with the root allocations inside), guest entries (as the
//! `kvm_entry` gate reports them), fast zaps, generation wraps, and vCPU and
//! VM teardown.
//!
//! Its kernel behaviour is switchable, so the detector can be tested (and
//! users can try their alert routing) without a TDX host:
//! - `mainline`: the merged code (6.14+);
//! - `v3-unconditional-mirror-alloc`: v3 of the TDX MMU patch, which
//!   allocated the mirror root on every load, taking a reference that was
//!   never put after a fast zap;
//! - `mirror-invalidated-by-zap`: a regression where the fast zap also
//!   invalidates mirror roots (`KVM_MIRROR_ROOTS`). As in the kernel,
//!   invalidation only sets `role.invalid` on the root's page and leaves
//!   `mirror_root_hpa` alone; `kvm_mmu_reload()` frees the obsolete direct
//!   root only, reloads, and `mmu_alloc_direct_roots()` sees a valid-looking
//!   mirror root, so the vCPU enters with a *stale* mirror root;
//! - `mirror-freed-by-zap`: a regression where the fast zap frees the mirror
//!   roots (writing `INVALID_PAGE`) while the vCPUs keep their direct roots,
//!   so `kvm_mmu_reload()` sees a valid `root.hpa`, returns early, and the
//!   vCPU enters with an invalid mirror root: the forbidden state.
//!
//! In every behaviour a mirror root stays allocated until the vCPU's
//! `kvm_mmu_destroy()`, except where the behaviour says otherwise. Events
//! about TDX vCPUs with a valid mirror root carry the role word of the
//! root's page (`mirror_role`), as the probes read it where the kernel
//! allows.
//!
//! The model also records the findings a correct detector must raise
//! (`expected`), which the property tests compare against.

use std::borrow::Cow;

use serde::Serialize;

use common::{INVALID_PAGE, KVM_X86_TDX_VM};

use crate::{
    detector::{FindingKind, KVM_MIRROR_ROOTS},
    event::{Comm, Event, Kind},
};

/// `KVM_DIRECT_ROOTS` in `enum kvm_tdp_mmu_root_types`.
const KVM_DIRECT_ROOTS: u64 = 2;
/// `-ENOMEM`.
const ENOMEM: i64 = -12;
/// Role word of a 4-level direct root (level 4, direct bit 7).
const DIRECT_ROLE: u32 = 0x84;
/// Role word of a mirror root (is_mirror bit 19).
const MIRROR_ROLE: u32 = DIRECT_ROLE | (1 << 19);
/// `role.invalid`.
/// `role.invalid` (bit 11 up to 7.1; the model is such a kernel).
const ROLE_INVALID: u32 = 1 << 11;

/// A root pair and whether the mirror root's page is invalid.
type Entry = (u64, u64, bool);

/// Which kernel the model behaves like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    /// The merged code.
    Mainline,
    /// v3 of the TDX MMU patch (2024): the mirror root is allocated on every
    /// load.
    #[value(name = "v3-unconditional-mirror-alloc")]
    V3UnconditionalMirrorAlloc,
    /// A regression: the fast zap also invalidates mirror roots, which stay
    /// in `mirror_root_hpa` (stale).
    #[value(name = "mirror-invalidated-by-zap")]
    MirrorInvalidatedByZap,
    /// A regression: the fast zap frees mirror roots (`INVALID_PAGE`) while
    /// the vCPUs keep their direct roots.
    #[value(name = "mirror-freed-by-zap")]
    MirrorFreedByZap,
}

/// What makes a fast zap happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZapCause {
    /// Memslot delete or move: default VMs only (`SLOT_ZAP_ALL` quirk).
    MemslotDelete,
    /// The MMIO generation (19 bits of the memslot generation) wrapped:
    /// every VM type, TDX included.
    GenerationWrap,
}

/// One step of the lifecycle. Indices pick among live VMs and vCPUs,
/// modulo their number, so any sequence is valid (for property tests).
#[derive(Clone, Copy, Debug)]
pub enum Op {
    CreateVm {
        tdx: bool,
    },
    AddVcpu {
        vm: usize,
    },
    /// The vCPU enters the guest (`kvm_mmu_reload()` first).
    Enter {
        vm: usize,
        vcpu: usize,
    },
    Zap {
        vm: usize,
        cause: ZapCause,
    },
    /// The vCPU's next load fails with `-ENOMEM`.
    FailNextLoad {
        vm: usize,
        vcpu: usize,
    },
    DestroyVcpu {
        vm: usize,
        vcpu: usize,
    },
    DestroyVm {
        vm: usize,
    },
}

/// A finding the detector must raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Expected {
    pub kind: FindingKind,
    pub kvm: u64,
    pub vcpu: Option<u64>,
}

#[derive(Debug)]
struct MVcpu {
    vcpu: u64,
    id: i32,
    root: u64,
    mirror: u64,
    /// Its direct root was invalidated by a fast zap; freed at next entry.
    obsolete: bool,
    /// The roots it last entered with (the gate's per-vCPU memory).
    last_entry: Option<Entry>,
    /// The mirror value the last event about it carried.
    observed_mirror: Option<u64>,
    /// The forbidden states a detector reported at entry and after a load
    /// (once per state; cleared by a legal one).
    reported_entry: Option<Entry>,
    reported_load: Option<Entry>,
    fail_next_load: bool,
}

#[derive(Debug)]
struct MVm {
    kvm: u64,
    pid: i32,
    tdx: bool,
    valid_gen: u8,
    slots_gen: u64,
    /// The shared root of each kind: vCPUs reuse a valid root of the same
    /// role (taking a reference) or allocate a new one.
    direct_root: u64,
    mirror_root: u64,
    /// Mirror roots invalidated (role.invalid set) but still held by vCPUs.
    stale: Vec<u64>,
    vcpus: Vec<MVcpu>,
}

impl MVm {
    fn entry_of(&self, c: &MVcpu) -> Entry {
        (c.root, c.mirror, self.stale.contains(&c.mirror))
    }

    /// The forbidden state (TDX, valid direct root, mirror invalid or stale).
    fn forbidden(&self, e: Entry) -> bool {
        self.tdx && e.0 != INVALID_PAGE && (e.1 == INVALID_PAGE || e.2)
    }
}

/// SplitMix64: small, seedable, good enough for scheduling.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The model.
#[derive(Debug)]
pub struct Model {
    behaviour: Behaviour,
    rng: Rng,
    t_ns: u64,
    next_kvm: u64,
    next_vcpu: u64,
    next_hpa: u64,
    next_pid: i32,
    vms: Vec<MVm>,
    /// Events emitted since the last `take_events`.
    events: Vec<Event>,
    /// Findings a correct detector raises for the events so far.
    pub expected: Vec<Expected>,
}

impl Model {
    pub fn new(behaviour: Behaviour, seed: u64) -> Self {
        Self {
            behaviour,
            rng: Rng::new(seed),
            t_ns: 1_000_000_000,
            next_kvm: 0xffff_8881_0000_0000,
            next_vcpu: 0xffff_8882_0000_0000,
            next_hpa: 0x1_0000_0000,
            next_pid: 4000,
            vms: Vec::new(),
            events: Vec::new(),
            expected: Vec::new(),
        }
    }

    /// Events emitted so far, handed over (the model keeps none).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn live_vms(&self) -> usize {
        self.vms.len()
    }

    pub fn live_vcpus(&self) -> usize {
        self.vms.iter().map(|v| v.vcpus.len()).sum()
    }

    /// Advances the clock by `lo..hi` ns.
    fn tick(&mut self, lo: u64, hi: u64) {
        self.t_ns += lo + self.rng.below(hi - lo);
    }

    fn alloc_hpa(&mut self) -> u64 {
        self.next_hpa += 0x1000;
        self.next_hpa
    }

    fn event(&self, kind: Kind, vm: &MVm, vcpu: Option<&MVcpu>) -> Event {
        let vcpu_fields = vcpu.map(|c| (c.vcpu, c.id, c.root, c.mirror));
        // What the probes read of a TDX vCPU's valid mirror root: its page's
        // role, and whether role.invalid is set.
        let mirror = vcpu
            .filter(|c| vm.tdx && c.mirror != INVALID_PAGE)
            .map(|c| vm.stale.contains(&c.mirror));
        Event {
            probe: Cow::Borrowed("model"),
            cpu: vcpu.map_or(0, |c| c.id as u32 % 64),
            pid: vm.pid as u32,
            tid: vm.pid as u32 + vcpu.map_or(0, |c| 1 + c.id as u32),
            comm: Comm::new("qemu-kvm").expect("short"),
            kvm: Some(vm.kvm),
            vcpu: vcpu_fields.map(|f| f.0),
            vcpu_id: vcpu_fields.map(|f| f.1),
            userspace_pid: Some(vm.pid),
            vm_type: Some(if vm.tdx { KVM_X86_TDX_VM } else { 0 }),
            root_hpa: vcpu_fields.map(|f| f.2),
            root_pgd: vcpu_fields.map(|_| 0),
            mirror_root_hpa: vcpu_fields.map(|f| f.3),
            root_role: vcpu_fields.map(|_| DIRECT_ROLE),
            mirror_role: mirror.map(|stale| {
                if stale {
                    MIRROR_ROLE | ROLE_INVALID
                } else {
                    MIRROR_ROLE
                }
            }),
            mirror_stale: mirror,
            mmu_valid_gen: Some(vm.valid_gen),
            memslots_gen: Some(vm.slots_gen),
            ..Event::bare(kind, self.t_ns)
        }
    }

    fn expect(&mut self, kind: FindingKind, kvm: u64, vcpu: Option<u64>) {
        self.expected.push(Expected { kind, kvm, vcpu });
    }

    fn pick_vm(&self, i: usize) -> Option<usize> {
        (!self.vms.is_empty()).then(|| i % self.vms.len())
    }

    fn pick_vcpu(&self, vm: usize, i: usize) -> Option<(usize, usize)> {
        let vm = self.pick_vm(vm)?;
        let n = self.vms[vm].vcpus.len();
        (n > 0).then(|| (vm, i % n))
    }

    /// Applies one step.
    pub fn apply(&mut self, op: Op) {
        self.tick(10_000, 1_000_000);
        match op {
            Op::CreateVm { tdx } => self.create_vm(tdx),
            Op::AddVcpu { vm } => {
                if let Some(vm) = self.pick_vm(vm) {
                    self.add_vcpu(vm);
                }
            }
            Op::Enter { vm, vcpu } => {
                if let Some((vm, vcpu)) = self.pick_vcpu(vm, vcpu) {
                    self.enter(vm, vcpu);
                }
            }
            Op::Zap { vm, cause } => {
                if let Some(vm) = self.pick_vm(vm) {
                    self.zap(vm, cause);
                }
            }
            Op::FailNextLoad { vm, vcpu } => {
                if let Some((vm, vcpu)) = self.pick_vcpu(vm, vcpu) {
                    let c = &mut self.vms[vm].vcpus[vcpu];
                    c.fail_next_load = true;
                    // Only a load can fail: make sure one happens.
                    c.obsolete = true;
                }
            }
            Op::DestroyVcpu { vm, vcpu } => {
                if let Some((vm, vcpu)) = self.pick_vcpu(vm, vcpu) {
                    let c = self.vms[vm].vcpus.remove(vcpu);
                    let ev = self.event(Kind::VcpuDestroy, &self.vms[vm], Some(&c));
                    self.events.push(ev);
                }
            }
            Op::DestroyVm { vm } => {
                if let Some(vm) = self.pick_vm(vm) {
                    self.destroy_vm(vm);
                }
            }
        }
    }

    fn create_vm(&mut self, tdx: bool) {
        self.next_kvm += 0x10_000;
        self.next_pid += 1;
        self.vms.push(MVm {
            kvm: self.next_kvm,
            pid: self.next_pid,
            tdx,
            valid_gen: 0,
            slots_gen: 0,
            direct_root: INVALID_PAGE,
            mirror_root: INVALID_PAGE,
            stale: Vec::new(),
            vcpus: Vec::new(),
        });
    }

    fn add_vcpu(&mut self, vm: usize) {
        self.next_vcpu += 0x2000;
        let id = self.vms[vm]
            .vcpus
            .iter()
            .map(|c| c.id + 1)
            .max()
            .unwrap_or(0);
        self.vms[vm].vcpus.push(MVcpu {
            vcpu: self.next_vcpu,
            id,
            root: INVALID_PAGE,
            mirror: INVALID_PAGE,
            obsolete: false,
            last_entry: None,
            observed_mirror: None,
            reported_entry: None,
            reported_load: None,
            fail_next_load: false,
        });
    }

    /// Records what an event shows about a vCPU's mirror root, and the
    /// finding a change of a valid mirror root must raise on a TDX VM.
    fn observe_mirror(&mut self, vm: usize, vcpu: usize) {
        let (kvm, tdx) = (self.vms[vm].kvm, self.vms[vm].tdx);
        let c = &mut self.vms[vm].vcpus[vcpu];
        let (ptr, old, new) = (c.vcpu, c.observed_mirror, c.mirror);
        c.observed_mirror = Some(new);
        if tdx && old.is_some_and(|o| o != INVALID_PAGE && o != new) {
            self.expect(
                FindingKind::MirrorRootChangedWithoutTeardown,
                kvm,
                Some(ptr),
            );
        }
    }

    fn push_vcpu_event(&mut self, kind: Kind, vm: usize, vcpu: usize, f: impl FnOnce(&mut Event)) {
        let mut ev = self.event(kind, &self.vms[vm], Some(&self.vms[vm].vcpus[vcpu]));
        f(&mut ev);
        self.observe_mirror(vm, vcpu);
        self.events.push(ev);
    }

    /// `kvm_tdp_mmu_alloc_root(vcpu, mirror)`: reuse a valid root of the
    /// role, else allocate one.
    fn alloc_root(&mut self, vm: usize, vcpu: usize, mirror: bool) {
        let before = {
            let c = &self.vms[vm].vcpus[vcpu];
            if mirror { c.mirror } else { c.root }
        };
        let shared = if mirror {
            self.vms[vm].mirror_root
        } else {
            self.vms[vm].direct_root
        };
        let root = if shared == INVALID_PAGE {
            self.alloc_hpa()
        } else {
            shared
        };
        let v = &mut self.vms[vm];
        if mirror {
            v.mirror_root = root;
            v.vcpus[vcpu].mirror = root;
        } else {
            v.direct_root = root;
            v.vcpus[vcpu].root = root;
        }
        if mirror && before != INVALID_PAGE {
            let (kvm, ptr) = (v.kvm, v.vcpus[vcpu].vcpu);
            self.expect(FindingKind::MirrorRootReallocWhileValid, kvm, Some(ptr));
        }
        self.tick(1_000, 20_000);
        self.push_vcpu_event(Kind::AllocRoot, vm, vcpu, |ev| {
            ev.arg = Some(u64::from(mirror));
            ev.before_hpa = Some(before);
            ev.root_role = Some(if mirror { MIRROR_ROLE } else { DIRECT_ROLE });
            ev.duration_ns = Some(5_000);
        });
    }

    /// `kvm_mmu_load()`: the root allocations of `mmu_alloc_direct_roots()`.
    fn load(&mut self, vm: usize, vcpu: usize) {
        let start = self.t_ns;
        let before = self.vms[vm].vcpus[vcpu].root;
        self.push_vcpu_event(Kind::LoadEnter, vm, vcpu, |_| {});
        let fail = std::mem::take(&mut self.vms[vm].vcpus[vcpu].fail_next_load);
        if fail {
            let (kvm, ptr) = (self.vms[vm].kvm, self.vms[vm].vcpus[vcpu].vcpu);
            self.expect(FindingKind::MmuLoadFailed, kvm, Some(ptr));
        } else {
            let tdx = self.vms[vm].tdx;
            let mirror_valid = self.vms[vm].vcpus[vcpu].mirror != INVALID_PAGE;
            let alloc_mirror = tdx
                && match self.behaviour {
                    Behaviour::V3UnconditionalMirrorAlloc => true,
                    Behaviour::Mainline
                    | Behaviour::MirrorInvalidatedByZap
                    | Behaviour::MirrorFreedByZap => !mirror_valid,
                };
            if alloc_mirror {
                self.alloc_root(vm, vcpu, true);
            }
            self.alloc_root(vm, vcpu, false);
        }
        self.tick(1_000, 50_000);
        let now = self.t_ns;
        if !fail {
            let v = &self.vms[vm];
            let e = v.entry_of(&v.vcpus[vcpu]);
            let kind = if e.2 {
                FindingKind::MirrorRootStaleAfterLoad
            } else {
                FindingKind::MirrorRootInvalidAfterLoad
            };
            self.judge(vm, vcpu, e, kind, |c| &mut c.reported_load);
        }
        self.push_vcpu_event(Kind::LoadReturn, vm, vcpu, |ev| {
            ev.ret = Some(if fail { ENOMEM } else { 0 });
            ev.before_hpa = Some(before);
            ev.duration_ns = Some(now - start);
        });
    }

    /// What a detector must report of a vCPU seen in state `e`: a forbidden
    /// state once (per `slot`, until a legal state clears both slots).
    fn judge(
        &mut self,
        vm: usize,
        vcpu: usize,
        e: Entry,
        kind: FindingKind,
        slot: fn(&mut MVcpu) -> &mut Option<Entry>,
    ) {
        let forbidden = self.vms[vm].forbidden(e);
        let kvm = self.vms[vm].kvm;
        let c = &mut self.vms[vm].vcpus[vcpu];
        if !forbidden {
            c.reported_entry = None;
            c.reported_load = None;
            return;
        }
        if *slot(c) == Some(e) {
            return;
        }
        *slot(c) = Some(e);
        let ptr = c.vcpu;
        self.expect(kind, kvm, Some(ptr));
    }

    /// `kvm_mmu_reload()` and the guest entry, as the `kvm_entry` gate
    /// reports it: an event only when the vCPU's roots changed.
    fn enter(&mut self, vm: usize, vcpu: usize) {
        let c = &mut self.vms[vm].vcpus[vcpu];
        if c.obsolete {
            // kvm_mmu_free_obsolete_roots(): the invalidated direct root goes.
            c.root = INVALID_PAGE;
            c.obsolete = false;
        }
        if c.root == INVALID_PAGE {
            self.load(vm, vcpu);
        }
        let v = &self.vms[vm];
        let c = &v.vcpus[vcpu];
        if c.root == INVALID_PAGE {
            // The load failed: KVM_RUN returns the error, no entry.
            return;
        }
        let pair = v.entry_of(c);
        let forbidden = v.forbidden(pair);
        let c = &mut self.vms[vm].vcpus[vcpu];
        if c.last_entry == Some(pair) {
            return;
        }
        c.last_entry = Some(pair);
        let kind = if pair.2 {
            FindingKind::MirrorRootStaleAtEntry
        } else {
            FindingKind::MirrorRootInvalidAtEntry
        };
        self.judge(vm, vcpu, pair, kind, |c| &mut c.reported_entry);
        let kind = if forbidden {
            Kind::EntryForbidden
        } else {
            Kind::EntryTransition
        };
        self.push_vcpu_event(kind, vm, vcpu, |_| {});
    }

    /// `kvm_mmu_zap_all_fast()`.
    fn zap(&mut self, vm: usize, cause: ZapCause) {
        let v = &mut self.vms[vm];
        match cause {
            ZapCause::MemslotDelete => {
                v.slots_gen += 3;
                if v.tdx {
                    // No SLOT_ZAP_ALL quirk for TDX VMs: no fast zap.
                    return;
                }
            }
            ZapCause::GenerationWrap => v.slots_gen += 1 << 19,
        }
        // The tracepoint fires before mmu_valid_gen toggles.
        let ev = self.event(Kind::ZapAllFast, &self.vms[vm], None);
        self.events.push(ev);
        let regression = matches!(
            self.behaviour,
            Behaviour::MirrorInvalidatedByZap | Behaviour::MirrorFreedByZap
        );
        let v = &mut self.vms[vm];
        v.valid_gen ^= 1;
        v.direct_root = INVALID_PAGE;
        let root_types = if regression {
            KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
        } else {
            KVM_DIRECT_ROOTS
        };
        let mut ev = self.event(Kind::InvalidateRoots, &self.vms[vm], None);
        ev.arg = Some(root_types);
        self.events.push(ev);
        let v = &mut self.vms[vm];
        if regression && v.tdx {
            // A vCPU the detector has seen (any event) is alive to it.
            let live = v.vcpus.iter().any(|c| c.observed_mirror.is_some());
            if live {
                let kvm = v.kvm;
                self.expect(FindingKind::MirrorRootsInvalidatedLive, kvm, None);
            }
        }
        let v = &mut self.vms[vm];
        match self.behaviour {
            Behaviour::MirrorFreedByZap if v.tdx => {
                // The mirror roots are freed, but the vCPUs keep their direct
                // roots, so kvm_mmu_reload() sees a valid root.hpa and
                // returns early.
                v.mirror_root = INVALID_PAGE;
                for c in &mut v.vcpus {
                    c.mirror = INVALID_PAGE;
                }
            }
            Behaviour::MirrorInvalidatedByZap if v.tdx => {
                // role.invalid on the shared mirror root; mirror_root_hpa
                // untouched. kvm_tdp_mmu_alloc_root() never reuses an invalid
                // root, so a new vCPU gets a new one.
                if v.mirror_root != INVALID_PAGE {
                    v.stale.push(v.mirror_root);
                }
                v.mirror_root = INVALID_PAGE;
                for c in &mut v.vcpus {
                    c.obsolete = true;
                }
            }
            _ => {
                for c in &mut v.vcpus {
                    c.obsolete = true;
                }
            }
        }
    }

    /// `kvm_arch_destroy_vm()`: the VM event first (the kprobe fires on
    /// entry), then each vCPU's `kvm_mmu_destroy()`, then the teardown
    /// invalidation of all roots.
    fn destroy_vm(&mut self, vm: usize) {
        let v = self.vms.remove(vm);
        self.events.push(self.event(Kind::VmDestroy, &v, None));
        for c in &v.vcpus {
            self.tick(1_000, 10_000);
            self.events.push(self.event(Kind::VcpuDestroy, &v, Some(c)));
        }
        let mut ev = self.event(Kind::InvalidateRoots, &v, None);
        ev.arg = Some(KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS);
        self.events.push(ev);
    }
}

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
