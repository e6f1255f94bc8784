//! The root-lifecycle detector: per-VM and per-vCPU state, and findings.
//!
//! Pure: it takes decoded events (their timestamps are its only clock) and
//! returns findings. No I/O, no tokio, no aya. Live tracing, replay, the
//! model and the tests all run this same code.
//!
//! State is bounded: VM and vCPU teardown events remove it, and caps with
//! counted eviction (least recently seen first) protect against unbounded
//! growth when teardown events are missed (kernels without kprobes).

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use common::{INVALID_PAGE, KVM_X86_TDX_VM};

use crate::event::{Event, Kind};

/// `KVM_MIRROR_ROOTS` in `enum kvm_tdp_mmu_root_types`.
pub const KVM_MIRROR_ROOTS: u64 = 4;

/// What a finding says happened. The names are stable: alert routing keys
/// on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    MirrorRootInvalidAtEntry,
    MirrorRootInvalidAfterLoad,
    MirrorRootReallocWhileValid,
    MirrorRootChangedWithoutTeardown,
    MirrorRootsInvalidatedLive,
    MmuLoadFailed,
    ZapStorm,
    MirrorRootStaleAtEntry,
    MirrorRootStaleAfterLoad,
}

impl FindingKind {
    pub const ALL: [Self; 9] = [
        Self::MirrorRootInvalidAtEntry,
        Self::MirrorRootInvalidAfterLoad,
        Self::MirrorRootStaleAtEntry,
        Self::MirrorRootStaleAfterLoad,
        Self::MirrorRootReallocWhileValid,
        Self::MirrorRootChangedWithoutTeardown,
        Self::MirrorRootsInvalidatedLive,
        Self::MmuLoadFailed,
        Self::ZapStorm,
    ];

    /// The alert both routes give it: the shipped Prometheus rule's name
    /// (dist/prometheus), and the `alertname` of a pushed alert.
    pub fn alertname(self) -> &'static str {
        match self {
            Self::MirrorRootInvalidAtEntry
            | Self::MirrorRootInvalidAfterLoad
            | Self::MirrorRootStaleAtEntry
            | Self::MirrorRootStaleAfterLoad => "KvmMirrorRootInvalid",
            Self::MirrorRootReallocWhileValid
            | Self::MirrorRootChangedWithoutTeardown
            | Self::MirrorRootsInvalidatedLive => "KvmMirrorRootLifecycleFault",
            Self::MmuLoadFailed => "KvmMmuLoadFailures",
            Self::ZapStorm => "KvmZapStorm",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::MirrorRootInvalidAtEntry => "mirror_root_invalid_at_entry",
            Self::MirrorRootInvalidAfterLoad => "mirror_root_invalid_after_load",
            Self::MirrorRootReallocWhileValid => "mirror_root_realloc_while_valid",
            Self::MirrorRootChangedWithoutTeardown => "mirror_root_changed_without_teardown",
            Self::MirrorRootsInvalidatedLive => "mirror_roots_invalidated_live",
            Self::MmuLoadFailed => "mmu_load_failed",
            Self::ZapStorm => "zap_storm",
            Self::MirrorRootStaleAtEntry => "mirror_root_stale_at_entry",
            Self::MirrorRootStaleAfterLoad => "mirror_root_stale_after_load",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Self::MirrorRootInvalidAtEntry
            | Self::MirrorRootInvalidAfterLoad
            | Self::MirrorRootStaleAtEntry
            | Self::MirrorRootStaleAfterLoad => Severity::Critical,
            Self::MirrorRootReallocWhileValid
            | Self::MirrorRootChangedWithoutTeardown
            | Self::MirrorRootsInvalidatedLive => Severity::Error,
            Self::MmuLoadFailed => Severity::Warning,
            Self::ZapStorm => Severity::Info,
        }
    }

    /// Whether the kind is about TDX mirror roots (never raised for other
    /// VM types).
    pub fn is_mirror(self) -> bool {
        !matches!(self, Self::MmuLoadFailed | Self::ZapStorm)
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    /// `info`, `warning`, `error` or `critical`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "info" => Ok(Self::Info),
            "warning" => Ok(Self::Warning),
            "error" => Ok(Self::Error),
            "critical" => Ok(Self::Critical),
            _ => Err(format!("{s:?} is not info, warning, error or critical")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

/// One finding: what, where, the events that prove it, and what to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: Severity,
    /// Timestamp of the event that raised it.
    pub ts_ns: u64,
    #[serde(with = "crate::hexfmt")]
    pub kvm: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace_pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_id: Option<i32>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub vcpu: Option<u64>,
    /// The events that prove it, oldest first.
    pub evidence: Vec<Event>,
    /// A paragraph a host engineer can act on.
    pub explanation: String,
    /// The VM's names (QEMU `-name`, `-uuid`, libvirt domain), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vmid::VmIdentity>,
}

impl Finding {
    /// `{"record":"finding", …}` (no trailing newline).
    pub fn to_json_record(&self) -> String {
        let body = serde_json::to_string(self).expect("findings always serialize");
        format!("{{\"record\":\"finding\",{}", &body[1..])
    }
}

/// `text` in lines of at most `width` characters (words kept whole).
pub(crate) fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

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

#[derive(Debug)]
struct VmState {
    userspace_pid: Option<i32>,
    vm_type: Option<u8>,
    mmu_valid_gen: Option<u8>,
    vcpus: Vec<u64>,
    /// Timestamps of recent fast zaps, within the storm window.
    zaps: VecDeque<u64>,
    /// End of the window of the last storm reported (one per window).
    storm_reported_until: u64,
    /// Mirror roots invalidated while the VM lived (`role.invalid` is set on
    /// their pages; `mirror_root_hpa` still points at them).
    stale_mirrors: Vec<u64>,
    last_seen: u64,
}

/// A forbidden state as reported: (root, mirror, stale).
type Forbidden = (u64, u64, bool);

#[derive(Debug)]
struct VcpuState {
    kvm: u64,
    vcpu_id: Option<i32>,
    root_hpa: Option<u64>,
    mirror_root_hpa: Option<u64>,
    /// The event that last set a valid mirror root (evidence).
    mirror_set_by: Option<Box<Event>>,
    last_load: Option<(u64, i64)>,
    mmu_valid_gen: Option<u8>,
    /// Seen alive (any event of its own) since creation or the last gap.
    alive: bool,
    /// The stored mirror root was observed after the last gap, so a change
    /// from it is a real change, not a teardown we missed.
    verified: bool,
    /// The forbidden state last reported at entry and after a load, so a
    /// vCPU stuck in one state raises one finding, not one per entry.
    /// Cleared when the vCPU is seen in a legal state.
    reported_entry: Option<Forbidden>,
    reported_load: Option<Forbidden>,
    last_seen: u64,
}

fn valid(hpa: Option<u64>) -> bool {
    hpa.is_some_and(|h| h != INVALID_PAGE)
}

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
            out.push(Finding {
                vm: None,
                kind: FindingKind::ZapStorm,
                severity: FindingKind::ZapStorm.severity(),
                ts_ns: ev.ts_ns,
                kvm,
                userspace_pid: vm.userspace_pid,
                vcpu_id: None,
                vcpu: None,
                evidence: vec![ev.clone()],
                explanation: format!(
                    "{n} fast zaps (kvm_mmu_zap_all_fast) on this VM within {:.0} s. Each one \
                     invalidates every direct root, so every vCPU reloads its roots and refaults \
                     its memory. The usual causes are memory hot-plug/unplug or memslot churn by \
                     the VMM, MMIO-generation wraps, or writes to the nx_huge_pages parameter. \
                     Informational: expect latency spikes in the guest; on TDX VMs each reload is \
                     also where mirror-root bugs show.",
                    std::time::Duration::from_nanos(cfg.zap_storm_window_ns).as_secs_f64()
                ),
            });
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
        out.push(Finding {
            vm: None,
            kind: FindingKind::MirrorRootsInvalidatedLive,
            severity: FindingKind::MirrorRootsInvalidatedLive.severity(),
            ts_ns: ev.ts_ns,
            kvm,
            userspace_pid: vm.userspace_pid,
            vcpu_id: None,
            vcpu: None,
            evidence: vec![ev.clone()],
            explanation: format!(
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
        });
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

/// What every vCPU finding is built from.
struct Raise<'a> {
    ev: &'a Event,
    vcpu: u64,
    pid: Option<i32>,
}

impl Raise<'_> {
    fn finding(&self, kind: FindingKind, evidence: Vec<Event>, explanation: String) -> Finding {
        Finding {
            vm: None,
            kind,
            severity: kind.severity(),
            ts_ns: self.ev.ts_ns,
            kvm: self.ev.kvm.unwrap_or(0),
            userspace_pid: self.pid,
            vcpu_id: self.ev.vcpu_id,
            vcpu: Some(self.vcpu),
            evidence,
            explanation,
        }
    }

    /// The event that set the vCPU's mirror root, then this one.
    fn evidence(&self, vc: &VcpuState) -> Vec<Event> {
        let mut evidence: Vec<Event> = vc.mirror_set_by.iter().map(|e| (**e).clone()).collect();
        evidence.push(self.ev.clone());
        evidence
    }
}

impl VcpuState {
    fn update_roots(&mut self, ev: &Event) {
        if let Some(r) = ev.root_hpa {
            self.root_hpa = Some(r);
        }
        if let Some(m) = ev.mirror_root_hpa {
            if valid(Some(m)) && self.mirror_root_hpa != Some(m) {
                self.mirror_set_by = Some(Box::new(ev.clone()));
            }
            self.mirror_root_hpa = Some(m);
            self.verified = true;
        }
        if ev.mmu_valid_gen.is_some() {
            self.mmu_valid_gen = ev.mmu_valid_gen;
        }
    }

    /// The forbidden state `ev` shows, when it was not reported yet at
    /// entry (`at_entry`) or after a load: a vCPU stuck in one state raises
    /// one finding, and a legal state clears both, so a second episode is
    /// reported again.
    fn newly_forbidden(
        &mut self,
        ev: &Event,
        tdx: bool,
        stale: bool,
        at_entry: bool,
    ) -> Option<Forbidden> {
        let pair = match judged_state(ev, tdx, stale) {
            Judged::Unknown => return None,
            Judged::Legal => {
                self.reported_entry = None;
                self.reported_load = None;
                return None;
            }
            Judged::Forbidden(pair) => pair,
        };
        let reported = if at_entry {
            &mut self.reported_entry
        } else {
            &mut self.reported_load
        };
        (reported.replace(pair) != Some(pair)).then_some(pair)
    }
}

/// The state an event's own fields show, judged on its own: a failed read
/// is unknown, never `INVALID_PAGE`, and two reads from different moments
/// are never combined.
enum Judged {
    Unknown,
    Legal,
    Forbidden(Forbidden),
}

fn judged_state(ev: &Event, tdx: bool, stale: bool) -> Judged {
    let (Some(root), Some(mirror)) = (ev.root_hpa, ev.mirror_root_hpa) else {
        return Judged::Unknown;
    };
    if tdx && root != INVALID_PAGE && (mirror == INVALID_PAGE || stale) {
        Judged::Forbidden((root, mirror, stale && mirror != INVALID_PAGE))
    } else {
        Judged::Legal
    }
}

/// Allocation of a mirror root while the vCPU holds a valid one. Rests on
/// `before_hpa`, read from the kernel at the call; remembered state stands
/// in only when it was observed since the last gap.
fn check_realloc(vc: &VcpuState, r: &Raise<'_>, out: &mut Vec<Finding>) {
    let ev = r.ev;
    if ev.kind != Kind::AllocRoot || ev.arg != Some(1) {
        return;
    }
    let held = ev
        .before_hpa
        .or_else(|| vc.verified.then_some(vc.mirror_root_hpa).flatten());
    if !valid(held) {
        return;
    }
    out.push(r.finding(
        FindingKind::MirrorRootReallocWhileValid,
        r.evidence(vc),
        format!(
            "kvm_tdp_mmu_alloc_root(vcpu, mirror=true) ran while vCPU {} already held the \
             valid mirror root {:#x}. Each allocation takes a reference on the root; the one \
             taken here is never put, so the mirror root (and its secure-EPT pages) leaks. This \
             is the bug found in review of v3 of the TDX MMU series: mmu_alloc_direct_roots() \
             must allocate the mirror root only when !VALID_PAGE(mmu->mirror_root_hpa). Check \
             the host kernel for that guard; expect memory to grow with every fast zap on TDX \
             VMs.",
            id(ev.vcpu_id),
            held.unwrap_or(INVALID_PAGE)
        ),
    ));
}

/// A valid mirror root that changes while the vCPU lives. Only from a root
/// observed since the last gap: across a gap the vCPU may have been torn
/// down and its memory reused unseen.
fn check_mirror_change(vc: &VcpuState, r: &Raise<'_>, out: &mut Vec<Finding>) {
    let Some(new) = r.ev.mirror_root_hpa else {
        return;
    };
    if !vc.verified || !valid(vc.mirror_root_hpa) || vc.mirror_root_hpa == Some(new) {
        return;
    }
    let old = vc.mirror_root_hpa.unwrap_or(INVALID_PAGE);
    out.push(r.finding(
        FindingKind::MirrorRootChangedWithoutTeardown,
        r.evidence(vc),
        format!(
            "The mirror root of TDX vCPU {} changed from {old:#x} to {} while the vCPU stayed \
             alive. In the merged code the mirror root is set once and freed only in \
             kvm_mmu_destroy() at vCPU teardown; kvm_mmu_unload() and fast zaps never touch it. \
             A change means something dropped or replaced the root the TDX module's private \
             page tables hang off: the vCPU's private memory mapping is no longer the one KVM \
             tracks. Capture the event log and the kernel version; the VM should be considered \
             suspect.",
            id(r.ev.vcpu_id),
            crate::event::hpa(new)
        ),
    ));
}

/// `kvm_mmu_load()` returned: an error, or the forbidden state.
fn check_load(vc: &mut VcpuState, tdx: bool, stale: bool, r: &Raise<'_>, out: &mut Vec<Finding>) {
    let ev = r.ev;
    let ret = ev.ret.unwrap_or(0);
    vc.last_load = Some((ev.ts_ns, ret));
    if ret < 0 {
        out.push(r.finding(
            FindingKind::MmuLoadFailed,
            vec![ev.clone()],
            format!(
                "kvm_mmu_load() failed on vCPU {} with {} ({ret}). The vCPU can't enter the \
                 guest until its roots load; KVM_RUN returns the error to the VMM, which usually \
                 stops the VM. -ENOMEM points at host memory pressure (root and page-table \
                 allocation); -EIO or others at a kernel bug. Check the host's memory and dmesg.",
                id(ev.vcpu_id),
                errno_name(ret)
            ),
        ));
        return;
    }
    let Some(pair) = vc.newly_forbidden(ev, tdx, stale, false) else {
        return;
    };
    let (kind, text) = if pair.2 {
        (
            FindingKind::MirrorRootStaleAfterLoad,
            format!(
                "kvm_mmu_load() returned 0 on TDX vCPU {} with root.hpa = {:#x} and \
                 mirror_root_hpa = {:#x}, but that mirror root was invalidated (role.invalid is \
                 set on its page). Invalidation never rewrites mirror_root_hpa and \
                 kvm_mmu_reload() never checks it, so the vCPU will enter the guest on a mirror \
                 root KVM has given up: private (secure-EPT) faults go to a dead root. Stop the \
                 VM (or migrate it away) and report the kernel build.",
                id(ev.vcpu_id),
                pair.0,
                pair.1
            ),
        )
    } else {
        (
            FindingKind::MirrorRootInvalidAfterLoad,
            format!(
                "kvm_mmu_load() returned 0 on TDX vCPU {} leaving root.hpa = {:#x} valid but \
                 mirror_root_hpa = INVALID_PAGE. kvm_mmu_reload() checks only root.hpa, so the \
                 vCPU will enter the guest without a mirror root: the state kvm_mmu_reload()'s \
                 comment says never happens. Private (secure-EPT) faults have no root to map \
                 into. Stop the VM (or migrate it away) and report the kernel build.",
                id(ev.vcpu_id),
                pair.0
            ),
        )
    };
    out.push(r.finding(kind, vec![ev.clone()], text));
}

/// The vCPU entered the guest (the gate) or returned from KVM_RUN.
fn check_entry(vc: &mut VcpuState, tdx: bool, stale: bool, r: &Raise<'_>, out: &mut Vec<Finding>) {
    let ev = r.ev;
    let ran = ev.kind != Kind::RunExit || ev.ret.is_none_or(|ret| ret >= 0);
    if !ran {
        return;
    }
    let Some(pair) = vc.newly_forbidden(ev, tdx, stale, true) else {
        return;
    };
    let (kind, text) = if pair.2 {
        (
            FindingKind::MirrorRootStaleAtEntry,
            format!(
                "TDX vCPU {} entered the guest with root.hpa = {:#x} and mirror_root_hpa = \
                 {:#x}, a mirror root that was invalidated (role.invalid is set on its page). \
                 Invalidation leaves mirror_root_hpa pointing at the dead root and \
                 kvm_mmu_reload() checks only root.hpa, so nothing reloads it: the vCPU runs on \
                 private (secure-EPT) page tables KVM no longer maintains. It follows mirror \
                 roots being invalidated while the VM's vCPUs lived. Stop or migrate the VM, \
                 keep the event log, and check the kernel's zap and invalidation paths.",
                id(ev.vcpu_id),
                pair.0,
                pair.1
            ),
        )
    } else {
        (
            FindingKind::MirrorRootInvalidAtEntry,
            format!(
                "TDX vCPU {} entered the guest with a valid direct root ({:#x}) and an INVALID \
                 mirror root. kvm_mmu_reload() returned early because root.hpa was valid, so \
                 the vCPU runs without the root of its private (secure-EPT) page tables. This \
                 is the forbidden state of kvm_mmu_reload()'s invariant; in merged kernels only \
                 kvm_mmu_destroy() frees the mirror root, so something freed or overwrote it \
                 while the vCPU lived. Stop or migrate the VM, keep the event log, and check \
                 the kernel for changes to mirror-root handling.",
                id(ev.vcpu_id),
                pair.0
            ),
        )
    };
    out.push(r.finding(kind, vec![ev.clone()], text));
}

fn id(vcpu_id: Option<i32>) -> String {
    vcpu_id.map_or_else(|| "?".into(), |v| v.to_string())
}

/// Symbolic name of a negative errno.
pub fn errno_name(ret: i64) -> &'static str {
    match -ret {
        1 => "-EPERM",
        4 => "-EINTR",
        5 => "-EIO",
        11 => "-EAGAIN",
        12 => "-ENOMEM",
        14 => "-EFAULT",
        16 => "-EBUSY",
        22 => "-EINVAL",
        28 => "-ENOSPC",
        _ => "an error",
    }
}
