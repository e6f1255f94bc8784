//! Read-only views of the detector's per-VM and per-vCPU state. `top` and
//! the flight recorder show or keep things per VM through these, so the
//! detector's tables are the only VM and vCPU tables: one cap, one eviction
//! rule (least recently seen), one teardown rule.

use super::{Detector, state::VcpuState, state::VmState};

/// One VM as the detector knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmView {
    /// `struct kvm *`.
    pub kvm: u64,
    pub userspace_pid: Option<i32>,
    pub vm_type: Option<u8>,
    pub mmu_valid_gen: Option<u8>,
    /// Its vCPUs tracked.
    pub vcpus: usize,
    /// `kvm_mmu_load()` returns seen.
    pub loads: u64,
    /// Fast zaps seen.
    pub zaps: u64,
    /// Findings raised about it.
    pub findings: u64,
    /// Time of its newest event.
    pub last_seen_ns: u64,
}

/// One vCPU as the detector knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuView {
    /// `struct kvm_vcpu *`.
    pub vcpu: u64,
    pub vcpu_id: Option<i32>,
    pub root_hpa: Option<u64>,
    pub mirror_root_hpa: Option<u64>,
    /// (timestamp, return code) of the last `kvm_mmu_load()`.
    pub last_load: Option<(u64, i64)>,
    pub mmu_valid_gen: Option<u8>,
    pub last_seen_ns: u64,
}

impl VmView {
    fn of(kvm: u64, s: &VmState) -> Self {
        Self {
            kvm,
            userspace_pid: s.userspace_pid,
            vm_type: s.vm_type,
            mmu_valid_gen: s.mmu_valid_gen,
            vcpus: s.vcpus.len(),
            loads: s.loads,
            zaps: s.zaps_seen,
            findings: s.findings,
            last_seen_ns: s.last_seen,
        }
    }
}

impl VcpuView {
    fn of(vcpu: u64, s: &VcpuState) -> Self {
        Self {
            vcpu,
            vcpu_id: s.vcpu_id,
            root_hpa: s.root_hpa,
            mirror_root_hpa: s.mirror_root_hpa,
            last_load: s.last_load,
            mmu_valid_gen: s.mmu_valid_gen,
            last_seen_ns: s.last_seen,
        }
    }
}

impl Detector {
    /// The VMs tracked, in no particular order.
    pub fn vms(&self) -> impl Iterator<Item = VmView> + '_ {
        self.vms.iter().map(|(&k, s)| VmView::of(k, s))
    }

    /// One VM, when tracked.
    pub fn vm(&self, kvm: u64) -> Option<VmView> {
        self.vms.get(&kvm).map(|s| VmView::of(kvm, s))
    }

    /// The vCPUs tracked of one VM (none when the VM isn't tracked).
    pub fn vcpus_of(&self, kvm: u64) -> impl Iterator<Item = VcpuView> + '_ {
        self.vms
            .get(&kvm)
            .into_iter()
            .flat_map(|vm| vm.vcpus.iter())
            .filter_map(|v| self.vcpus.get(v).map(|s| VcpuView::of(*v, s)))
    }
}
