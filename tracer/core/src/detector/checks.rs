//! The per-vCPU checks: each looks at one event against the vCPU's state
//! and raises the findings it proves.

use common::INVALID_PAGE;

use super::{
    Finding, FindingKind, errno_name,
    state::{Forbidden, VcpuState, valid},
};
use crate::event::{Event, Kind};

/// What every vCPU finding is built from.
pub(super) struct Raise<'a> {
    pub(super) ev: &'a Event,
    pub(super) vcpu: u64,
    pub(super) pid: Option<i32>,
}

impl Raise<'_> {
    pub(super) fn finding(
        &self,
        kind: FindingKind,
        evidence: Vec<Event>,
        explanation: String,
    ) -> Finding {
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

/// The state an event's own fields show, judged on its own: a failed read
/// is unknown, never `INVALID_PAGE`, and two reads from different moments
/// are never combined.
pub(super) enum Judged {
    Unknown,
    Legal,
    Forbidden(Forbidden),
}

pub(super) fn judged_state(ev: &Event, tdx: bool, stale: bool) -> Judged {
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
pub(super) fn check_realloc(vc: &VcpuState, r: &Raise<'_>, out: &mut Vec<Finding>) {
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
pub(super) fn check_mirror_change(vc: &VcpuState, r: &Raise<'_>, out: &mut Vec<Finding>) {
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
pub(super) fn check_load(
    vc: &mut VcpuState,
    tdx: bool,
    stale: bool,
    r: &Raise<'_>,
    out: &mut Vec<Finding>,
) {
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
pub(super) fn check_entry(
    vc: &mut VcpuState,
    tdx: bool,
    stale: bool,
    r: &Raise<'_>,
    out: &mut Vec<Finding>,
) {
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

pub(super) fn id(vcpu_id: Option<i32>) -> String {
    vcpu_id.map_or_else(|| "?".into(), |v| v.to_string())
}
