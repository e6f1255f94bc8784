//! What the detector remembers per VM and per vCPU between events, and how
//! a vCPU's roots follow its events.

use std::collections::VecDeque;

use common::INVALID_PAGE;

use super::checks::{Judged, judged_state};
use crate::event::Event;

#[derive(Debug)]
pub(super) struct VmState {
    pub(super) userspace_pid: Option<i32>,
    pub(super) vm_type: Option<u8>,
    pub(super) mmu_valid_gen: Option<u8>,
    pub(super) vcpus: Vec<u64>,
    /// Timestamps of recent fast zaps, within the storm window.
    pub(super) zaps: VecDeque<u64>,
    /// End of the window of the last storm reported (one per window).
    pub(super) storm_reported_until: u64,
    /// Mirror roots invalidated while the VM lived (`role.invalid` is set on
    /// their pages; `mirror_root_hpa` still points at them).
    pub(super) stale_mirrors: Vec<u64>,
    pub(super) last_seen: u64,
    /// Counts since it was first seen: `kvm_mmu_load()` returns, fast zaps,
    /// findings.
    pub(super) loads: u64,
    pub(super) zaps_seen: u64,
    pub(super) findings: u64,
}

/// A forbidden state as reported: (root, mirror, stale).
pub(super) type Forbidden = (u64, u64, bool);

#[derive(Debug)]
pub(super) struct VcpuState {
    pub(super) kvm: u64,
    pub(super) vcpu_id: Option<i32>,
    pub(super) root_hpa: Option<u64>,
    pub(super) mirror_root_hpa: Option<u64>,
    /// The event that last set a valid mirror root (evidence).
    pub(super) mirror_set_by: Option<Box<Event>>,
    pub(super) last_load: Option<(u64, i64)>,
    pub(super) mmu_valid_gen: Option<u8>,
    /// Seen alive (any event of its own) since creation or the last gap.
    pub(super) alive: bool,
    /// The stored mirror root was observed after the last gap, so a change
    /// from it is a real change, not a teardown we missed.
    pub(super) verified: bool,
    /// The forbidden state last reported at entry and after a load, so a
    /// vCPU stuck in one state raises one finding, not one per entry.
    /// Cleared when the vCPU is seen in a legal state.
    pub(super) reported_entry: Option<Forbidden>,
    pub(super) reported_load: Option<Forbidden>,
    pub(super) last_seen: u64,
}

pub(super) fn valid(hpa: Option<u64>) -> bool {
    hpa.is_some_and(|h| h != INVALID_PAGE)
}

impl VcpuState {
    pub(super) fn update_roots(&mut self, ev: &Event) {
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
    pub(super) fn newly_forbidden(
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
