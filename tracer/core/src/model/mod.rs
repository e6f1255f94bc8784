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
    detector::FindingKind,
    event::{Comm, Event, Kind},
};

mod ops;
mod scenario;

pub use scenario::{FLEET_VMS, Scenario, Simulation, run_scenario, simulate};

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
}
