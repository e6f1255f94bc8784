//! The root-lifecycle detector: the state machine that turns events into
//! findings. `finding`: what it reports; `state`: what it remembers per VM
//! and vCPU; `checks`: the per-vCPU checks.
//!
//! Pure: it takes decoded events (their timestamps are its only clock) and
//! returns findings. No I/O, no tokio, no aya. Live tracing, replay, the
//! model and the tests all run this same code.
//!
//! State is bounded: VM and vCPU teardown events remove it, and caps with
//! counted eviction (least recently seen first) protect against unbounded
//! growth when teardown events are missed (kernels without kprobes).

use std::collections::VecDeque;

// A fast hasher, seeded per process: the keys are kernel pointers (or a
// log's values), so a fixed seed would let crafted input collide them.
use foldhash::HashMap;
use serde::Serialize;

use common::{INVALID_PAGE, KVM_X86_TDX_VM};

use crate::event::{Event, Kind};

mod checks;
mod finding;
mod state;
mod view;

use checks::{Raise, check_entry, check_load, check_mirror_change, check_realloc};
pub(crate) use finding::wrap;
pub use finding::{Finding, FindingKind, Severity, errno_name};
use state::{VcpuState, VmState};
pub use view::{VcpuView, VmView};

/// `KVM_MIRROR_ROOTS` in `enum kvm_tdp_mmu_root_types`.
pub const KVM_MIRROR_ROOTS: u64 = 4;

/// Tunables. The defaults suit a host with hundreds of VMs.
#[derive(Clone, Copy, Debug)]
pub struct DetectorConfig {
    /// VMs tracked at most; the least recently seen are evicted beyond it.
    pub max_vms: usize,
    /// vCPUs tracked at most.
    pub max_vcpus: usize,
    /// Fast zaps on one VM within `zap_storm_window_ns` that make a storm.
    pub zap_storm_count: usize,
    pub zap_storm_window_ns: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            max_vms: 4096,
            max_vcpus: 65_536,
            zap_storm_count: 50,
            zap_storm_window_ns: 10_000_000_000,
        }
    }
}

/// Counters about the detector itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DetectorStats {
    pub events: u64,
    pub findings: u64,
    pub vms_torn_down: u64,
    pub vcpus_torn_down: u64,
    /// State dropped by the caps, not by teardown.
    pub vms_evicted: u64,
    pub vcpus_evicted: u64,
    /// A known `struct kvm *` that turned out to be a new VM (another
    /// `userspace_pid`): the old one was torn down unseen.
    pub vms_reused: u64,
    /// Events about a VM after its teardown (a default VM's fast zap in
    /// `kvm_arch_destroy_vm`, say): ignored, they don't bring it back.
    pub events_after_teardown: u64,
    /// Gaps (lost events, a new recording): state since then is unverified.
    pub gaps: u64,
    /// New boots: all state dropped.
    pub boots: u64,
}

/// What a log boundary or a loss tells the detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// A new boot: kernel pointers mean nothing any more. All state goes.
    NewBoot,
    /// A new recording on the same boot (the daemon restarted): any vCPU may
    /// be first seen mid-run, and what was reported is reported afresh.
    NewRecording,
    /// Events were lost (a `loss` record, ring-buffer drops): a teardown may
    /// be missing and its memory reused by a new VM or vCPU.
    Gap,
}

/// Why a VM's state goes.
#[derive(Clone, Copy)]
enum Removal {
    /// Its `vm_destroy` was seen.
    Teardown,
    /// The caps made room.
    Evicted,
    /// Its pointer turned up with another creator: a new VM.
    Reused,
}

/// VMs torn down recently, so their late events don't bring them back.
const TOMBSTONES: usize = 4096;

/// How long after its teardown a VM's late events are expected.
const TOMBSTONE_NS: u64 = 10_000_000_000;

/// Stale (invalidated) mirror roots remembered per VM.
const STALE_MIRRORS: usize = 64;

/// The detector.
#[derive(Debug, Default)]
pub struct Detector {
    cfg: DetectorConfig,
    vms: HashMap<u64, VmState>,
    vcpus: HashMap<u64, VcpuState>,
    /// `struct kvm *` → (`userspace_pid`, teardown time), oldest first.
    tombstones: HashMap<u64, (Option<i32>, u64)>,
    tombstone_order: VecDeque<u64>,
    stats: DetectorStats,
}

impl Detector {
    pub fn new(cfg: DetectorConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    pub fn stats(&self) -> DetectorStats {
        self.stats
    }

    pub fn tracked_vms(&self) -> usize {
        self.vms.len()
    }

    pub fn tracked_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Whether `kvm` is a VM the detector tracks (not torn down, not
    /// evicted).
    pub fn knows_vm(&self, kvm: u64) -> bool {
        self.vms.contains_key(&kvm)
    }

    /// VMs whose `vm_type` is TDX.
    pub fn tdx_vms(&self) -> usize {
        self.vms
            .values()
            .filter(|v| v.vm_type == Some(KVM_X86_TDX_VM))
            .count()
    }

    /// An estimate of the heap the state takes (tables and evidence).
    pub fn approx_bytes(&self) -> usize {
        let vm = size_of::<(u64, VmState)>() + 8;
        let vcpu = size_of::<(u64, VcpuState)>() + 8;
        let vm_extra: usize = self
            .vms
            .values()
            .map(|v| {
                v.vcpus.capacity() * 8 + v.zaps.capacity() * 8 + v.stale_mirrors.capacity() * 8
            })
            .sum();
        let evidence = self
            .vcpus
            .values()
            .filter(|v| v.mirror_set_by.is_some())
            .count()
            * size_of::<Event>();
        let tombs = self.tombstones.capacity() * 40 + self.tombstone_order.capacity() * 8;
        self.vms.capacity() * vm + self.vcpus.capacity() * vcpu + vm_extra + evidence + tombs
    }

    /// A boundary in the event stream: a new boot, a new recording, or lost
    /// events. See [`Boundary`].
    pub fn boundary(&mut self, b: Boundary) {
        match b {
            Boundary::NewBoot => {
                self.stats.boots += 1;
                self.vms.clear();
                self.vcpus.clear();
                self.tombstones.clear();
                self.tombstone_order.clear();
            }
            Boundary::NewRecording | Boundary::Gap => {
                self.stats.gaps += 1;
                for vc in self.vcpus.values_mut() {
                    vc.alive = false;
                    vc.verified = false;
                    if b == Boundary::NewRecording {
                        vc.reported_entry = None;
                        vc.reported_load = None;
                    }
                }
            }
        }
    }

    /// Feeds one event; findings it proves are pushed to `out`.
    pub fn observe(&mut self, ev: &Event, out: &mut Vec<Finding>) {
        self.stats.events += 1;
        let before = out.len();
        match ev.kind {
            Kind::VmDestroy => {
                if let Some(kvm) = ev.kvm {
                    let pid = self
                        .vms
                        .get(&kvm)
                        .and_then(|v| v.userspace_pid)
                        .or(ev.userspace_pid);
                    self.remove_vm(kvm, Removal::Teardown);
                    self.bury(kvm, pid, ev.ts_ns);
                }
            }
            Kind::VcpuDestroy => {
                if let Some(vcpu) = ev.vcpu {
                    self.remove_vcpu(vcpu, true);
                }
            }
            _ => self.observe_live(ev, out),
        }
        self.stats.findings += (out.len() - before) as u64;
        for f in &out[before..] {
            if let Some(vm) = self.vms.get_mut(&f.kvm) {
                vm.findings += 1;
            }
        }
    }

    fn bury(&mut self, kvm: u64, pid: Option<i32>, ts: u64) {
        if self.tombstones.insert(kvm, (pid, ts)).is_none() {
            self.tombstone_order.push_back(kvm);
        }
        while self.tombstone_order.len() > TOMBSTONES {
            if let Some(old) = self.tombstone_order.pop_front() {
                self.tombstones.remove(&old);
            }
        }
    }

    /// Whether `ev` is a late event of a VM already torn down. A vCPU event,
    /// another `userspace_pid` or enough time since the teardown mean a new
    /// VM at the same address.
    fn after_teardown(&mut self, kvm: u64, ev: &Event) -> bool {
        let Some(&(pid, ts)) = self.tombstones.get(&kvm) else {
            return false;
        };
        let new_vm = (ev.vcpu.is_some() && ev.kind != Kind::VcpuDestroy)
            || matches!((pid, ev.userspace_pid), (Some(a), Some(b)) if a != b)
            || ev.ts_ns.saturating_sub(ts) > TOMBSTONE_NS;
        if new_vm {
            self.tombstones.remove(&kvm);
            self.tombstone_order.retain(|&k| k != kvm);
            return false;
        }
        self.stats.events_after_teardown += 1;
        true
    }

    fn observe_live(&mut self, ev: &Event, out: &mut Vec<Finding>) {
        let Some(kvm) = ev.kvm else {
            return;
        };
        if self.after_teardown(kvm, ev) {
            return;
        }
        // A root invalidation is no sign of life: at VM teardown it comes
        // after the VM's own teardown event.
        if ev.kind == Kind::InvalidateRoots && !self.vms.contains_key(&kvm) {
            return;
        }
        self.touch_vm(kvm, ev);
        if let Some(vcpu) = ev.vcpu {
            self.touch_vcpu(vcpu, kvm, ev);
        }
        let vm = &self.vms[&kvm];
        let tdx = vm.vm_type == Some(KVM_X86_TDX_VM);
        match ev.kind {
            Kind::ZapAllFast => self.zap(kvm, ev, out),
            Kind::InvalidateRoots if tdx && ev.arg.is_some_and(|t| t & KVM_MIRROR_ROOTS != 0) => {
                self.invalidated_live(kvm, ev, out);
            }
            _ => {}
        }
        let Some(vcpu) = ev.vcpu else {
            return;
        };
        self.vcpu_event(vcpu, tdx, ev, out);
    }

    fn vcpu_event(&mut self, vcpu: u64, tdx: bool, ev: &Event, out: &mut Vec<Finding>) {
        let kvm = self.vcpus[&vcpu].kvm;
        let vm = self.vms.get(&kvm);
        let raise = Raise {
            ev,
            vcpu,
            pid: vm.and_then(|v| v.userspace_pid),
        };
        // Stale: the kernel read the page and found it invalid, or this VM's
        // mirror roots were invalidated under it and this is one of them.
        let stale = ev
            .mirror_root_hpa
            .filter(|&m| m != INVALID_PAGE)
            .and_then(|m| {
                ev.mirror_root_stale()
                    .or_else(|| vm.map(|v| v.stale_mirrors.contains(&m)))
            })
            == Some(true);
        let vc = self.vcpus.get_mut(&vcpu).expect("touch_vcpu inserted it");
        if tdx {
            check_realloc(vc, &raise, out);
            check_mirror_change(vc, &raise, out);
        }
        vc.update_roots(ev);
        vc.alive = true;
        match ev.kind {
            Kind::LoadReturn => check_load(vc, tdx, stale, &raise, out),
            Kind::EntryForbidden | Kind::EntryTransition | Kind::RunExit => {
                check_entry(vc, tdx, stale, &raise, out);
            }
            _ => {}
        }
    }

    fn zap(&mut self, kvm: u64, ev: &Event, out: &mut Vec<Finding>) {
        let cfg = self.cfg;
        let vm = self.vms.get_mut(&kvm).expect("touch_vm inserted it");
        vm.zaps.push_back(ev.ts_ns);
        while vm
            .zaps
            .front()
            .is_some_and(|&t| t + cfg.zap_storm_window_ns < ev.ts_ns)
        {
            vm.zaps.pop_front();
        }
        if vm.zaps.len() >= cfg.zap_storm_count && ev.ts_ns >= vm.storm_reported_until {
            vm.storm_reported_until = ev.ts_ns + cfg.zap_storm_window_ns;
            let n = vm.zaps.len();
            out.push(Finding::about_vm(
                FindingKind::ZapStorm,
                ev,
                kvm,
                vm.userspace_pid,
                format!(
                    "{n} fast zaps (kvm_mmu_zap_all_fast) on this VM within {:.0} s. Each one \
                     invalidates every direct root, so every vCPU reloads its roots and refaults \
                     its memory. The usual causes are memory hot-plug/unplug or memslot churn by \
                     the VMM, MMIO-generation wraps, or writes to the nx_huge_pages parameter. \
                     Informational: expect latency spikes in the guest; on TDX VMs each reload is \
                     also where mirror-root bugs show.",
                    std::time::Duration::from_nanos(cfg.zap_storm_window_ns).as_secs_f64()
                ),
            ));
        }
    }

    /// Mirror roots invalidated while the VM lives: its vCPUs' mirror roots
    /// are stale from now on (the kernel sets `role.invalid` and leaves
    /// `mirror_root_hpa` alone), and a finding when vCPUs were seen alive
    /// since the last gap.
    fn invalidated_live(&mut self, kvm: u64, ev: &Event, out: &mut Vec<Finding>) {
        let vm = self.vms.get_mut(&kvm).expect("touch_vm inserted it");
        let mut running = 0;
        for v in &vm.vcpus {
            let Some(s) = self.vcpus.get(v) else {
                continue;
            };
            if let Some(m) = s.mirror_root_hpa.filter(|&m| m != INVALID_PAGE)
                && !vm.stale_mirrors.contains(&m)
            {
                if vm.stale_mirrors.len() >= STALE_MIRRORS {
                    vm.stale_mirrors.remove(0);
                }
                vm.stale_mirrors.push(m);
            }
            if s.alive {
                running += 1;
            }
        }
        if running == 0 {
            return;
        }
        out.push(Finding::about_vm(
            FindingKind::MirrorRootsInvalidatedLive,
            ev,
            kvm,
            vm.userspace_pid,
            format!(
                "kvm_tdp_mmu_invalidate_roots() was called with root_types {:#x}, which \
                 includes KVM_MIRROR_ROOTS, while {running} vCPU(s) of this TDX VM were alive. In \
                 the merged code mirror roots are invalidated only at VM teardown (root_types \
                 6, after the vCPUs are gone); a live VM's fast zap passes KVM_DIRECT_ROOTS only. \
                 Invalidation sets role.invalid on the root's page but leaves mirror_root_hpa \
                 pointing at it, and kvm_mmu_reload() never looks at the mirror root, so the \
                 vCPUs go on entering with a stale mirror root. Watch for \
                 mirror_root_stale_at_entry on this VM and check the kernel's zap paths.",
                ev.arg.unwrap_or(0),
            ),
        ));
    }

    fn touch_vm(&mut self, kvm: u64, ev: &Event) {
        // Another creator on a known pointer: a new VM, the old one's
        // teardown was missed.
        if let (Some(vm), Some(pid)) = (self.vms.get(&kvm), ev.userspace_pid)
            && vm.userspace_pid.is_some_and(|old| old != pid)
        {
            self.remove_vm(kvm, Removal::Reused);
        }
        if !self.vms.contains_key(&kvm) && self.vms.len() >= self.cfg.max_vms {
            self.evict_vms();
        }
        let vm = self.vms.entry(kvm).or_insert_with(|| VmState {
            userspace_pid: None,
            vm_type: None,
            mmu_valid_gen: None,
            vcpus: Vec::new(),
            zaps: VecDeque::new(),
            storm_reported_until: 0,
            stale_mirrors: Vec::new(),
            last_seen: 0,
            loads: 0,
            zaps_seen: 0,
            findings: 0,
        });
        vm.last_seen = ev.ts_ns;
        if ev.userspace_pid.is_some() {
            vm.userspace_pid = ev.userspace_pid;
        }
        if ev.vm_type.is_some() {
            vm.vm_type = ev.vm_type;
        }
        if ev.mmu_valid_gen.is_some() {
            vm.mmu_valid_gen = ev.mmu_valid_gen;
        }
        match ev.kind {
            Kind::LoadReturn => vm.loads += 1,
            Kind::ZapAllFast => vm.zaps_seen += 1,
            _ => {}
        }
    }

    fn touch_vcpu(&mut self, vcpu: u64, kvm: u64, ev: &Event) {
        if let Some(vc) = self.vcpus.get_mut(&vcpu) {
            vc.last_seen = ev.ts_ns;
            if vc.kvm == kvm {
                if ev.vcpu_id.is_some() {
                    vc.vcpu_id = ev.vcpu_id;
                }
                return;
            }
            // The same address now belongs to another VM's vCPU: the old
            // one was torn down unseen.
            self.remove_vcpu(vcpu, false);
            self.stats.vcpus_evicted += 1;
        }
        if self.vcpus.len() >= self.cfg.max_vcpus {
            self.evict_vcpus();
        }
        self.vcpus.insert(
            vcpu,
            VcpuState {
                kvm,
                vcpu_id: ev.vcpu_id,
                root_hpa: None,
                mirror_root_hpa: None,
                mirror_set_by: None,
                last_load: None,
                mmu_valid_gen: None,
                alive: false,
                verified: false,
                reported_entry: None,
                reported_load: None,
                last_seen: ev.ts_ns,
            },
        );
        if let Some(vm) = self.vms.get_mut(&kvm) {
            vm.vcpus.push(vcpu);
        }
    }

    fn remove_vcpu(&mut self, vcpu: u64, teardown: bool) {
        if let Some(vc) = self.vcpus.remove(&vcpu) {
            if teardown {
                self.stats.vcpus_torn_down += 1;
            }
            if let Some(vm) = self.vms.get_mut(&vc.kvm) {
                vm.vcpus.retain(|&v| v != vcpu);
            }
        }
    }

    /// Drops a VM and its vCPUs, counted by why.
    fn remove_vm(&mut self, kvm: u64, why: Removal) {
        let Some(vm) = self.vms.remove(&kvm) else {
            return;
        };
        let vcpus = vm
            .vcpus
            .iter()
            .filter(|v| self.vcpus.remove(v).is_some())
            .count() as u64;
        match why {
            Removal::Teardown => {
                self.stats.vms_torn_down += 1;
                self.stats.vcpus_torn_down += vcpus;
            }
            Removal::Evicted => {
                self.stats.vms_evicted += 1;
                self.stats.vcpus_evicted += vcpus;
            }
            Removal::Reused => {
                self.stats.vms_reused += 1;
                self.stats.vcpus_evicted += vcpus;
            }
        }
    }

    /// Drops the least recently seen 1/16 of the vCPUs (at least one), so
    /// eviction costs O(log n) per insertion, amortized.
    fn evict_vcpus(&mut self) {
        let n = (self.vcpus.len() / 16).max(1);
        let mut by_age: Vec<(u64, u64)> =
            self.vcpus.iter().map(|(k, v)| (v.last_seen, *k)).collect();
        by_age.select_nth_unstable(n - 1);
        for &(_, vcpu) in &by_age[..n] {
            self.remove_vcpu(vcpu, false);
            self.stats.vcpus_evicted += 1;
        }
    }

    fn evict_vms(&mut self) {
        let n = (self.vms.len() / 16).max(1);
        let mut by_age: Vec<(u64, u64)> = self.vms.iter().map(|(k, v)| (v.last_seen, *k)).collect();
        by_age.select_nth_unstable(n - 1);
        for &(_, kvm) in &by_age[..n] {
            self.remove_vm(kvm, Removal::Evicted);
        }
    }
}
