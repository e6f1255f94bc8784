//! The model's steps: what each operation does to its VMs and vCPUs, and
//! the events and expected findings it emits, as the kernel's code paths
//! would.

use common::INVALID_PAGE;

use super::{
    Behaviour, DIRECT_ROLE, ENOMEM, Entry, KVM_DIRECT_ROOTS, MIRROR_ROLE, MVcpu, MVm, Model, Op,
    ZapCause,
};
use crate::{
    detector::{FindingKind, KVM_MIRROR_ROOTS},
    event::{Event, Kind},
};

impl Model {
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
