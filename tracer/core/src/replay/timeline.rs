//! `tracer replay --timeline`: the root history of the selected vCPUs, grouped
//! by VM, as readable lines or JSON.

use std::fmt::Write as _;

use crate::{
    detector::Finding,
    event::{Event, Kind, hpa},
    log::ClockPair,
};

/// Rows a text timeline holds at most before it is printed; beyond them
/// rows are counted and the output says so (narrow with filters).
pub(super) const TIMELINE_ROWS_KEPT: u64 = 1_000_000;

/// One VM's part of the timeline.
pub(super) struct VmGroup {
    head: String,
    /// The VMM's pid, to name the VM from the log's `vm` records.
    pid: Option<i32>,
    /// The guest's name, from a finding that carries it.
    name: Option<String>,
    /// (vCPU id, time) → row; `None` is the VM's own events (zaps,
    /// invalidations), shown in each vCPU's history at their time.
    rows: Vec<(Option<i32>, u64, String)>,
}

/// The root history: JSON rows stream as judged; text rows are grouped by
/// VM (named at the group's head) and by vCPU, each row compared with the
/// same vCPU's previous roots.
#[derive(Default)]
pub(super) struct Timeline {
    /// The roots each vCPU (kvm, vCPU id) had at its last row.
    pub(super) last: std::collections::HashMap<(u64, i32), (Option<u64>, Option<u64>)>,
    pub(super) vms: Vec<VmGroup>,
    pub(super) index: std::collections::HashMap<u64, usize>,
    pub(super) rows: u64,
    pub(super) not_kept: u64,
}

impl Timeline {
    pub(super) fn group(
        &mut self,
        kvm: u64,
        pid: Option<i32>,
        vm_type: Option<u8>,
    ) -> &mut VmGroup {
        let i = *self.index.entry(kvm).or_insert_with(|| {
            self.vms.push(VmGroup {
                head: format!(
                    "VM vmm={} type={} kvm={kvm:#x}",
                    pid.map_or_else(|| "?".into(), |p| p.to_string()),
                    vm_type.map_or("?", crate::event::vm_type_name),
                ),
                pid,
                name: None,
                rows: Vec::new(),
            });
            self.vms.len() - 1
        });
        &mut self.vms[i]
    }

    pub(super) fn keep(&mut self) -> bool {
        self.rows += 1;
        if self.rows > TIMELINE_ROWS_KEPT {
            self.not_kept += 1;
            return false;
        }
        true
    }

    /// The row for `ev`, if it makes one (vCPU events, zaps, invalidations):
    /// returned at once in JSON, held for grouping in text.
    pub(super) fn row(
        &mut self,
        ev: &Event,
        clock: Option<ClockPair>,
        json: bool,
        style: crate::human::Style,
    ) -> Option<String> {
        if ev.vcpu.is_none() && !matches!(ev.kind, Kind::ZapAllFast | Kind::InvalidateRoots) {
            return None;
        }
        if json {
            self.rows += 1;
            return Some(ev.to_json_record() + "\n");
        }
        let kvm = ev.kvm.unwrap_or(0);
        let roots = (ev.root_hpa, ev.mirror_root_hpa);
        let vcpu = ev.vcpu.and(ev.vcpu_id);
        let change = match vcpu.and_then(|v| self.last.insert((kvm, v), roots)) {
            Some(prev) if prev != roots => "  <- roots changed",
            _ => "",
        };
        if !self.keep() {
            return None;
        }
        let when = style.time(ev.ts_ns, clock);
        let fmt = |v: Option<u64>| v.map_or_else(|| "-".into(), hpa);
        let what = match ev.kind {
            Kind::LoadReturn => format!("load_return ret={}", ev.ret.unwrap_or(0)),
            Kind::AllocRoot => format!(
                "alloc_root mirror={} before={}",
                ev.arg.unwrap_or(0),
                fmt(ev.before_hpa)
            ),
            Kind::InvalidateRoots => {
                format!("invalidate_roots types={:#x}", ev.arg.unwrap_or(0))
            }
            Kind::ZapAllFast => format!("zap_all_fast gen={}", ev.mmu_valid_gen.unwrap_or(0)),
            k => k.name().to_owned(),
        };
        let text = if ev.vcpu.is_some() {
            let line = format!(
                "    {when}  vcpu {:<4} {what:<34} root={:<18} mirror={:<18}{change}",
                ev.vcpu_id.map_or_else(|| "?".into(), |v| v.to_string()),
                fmt(ev.root_hpa),
                fmt(ev.mirror_root_hpa)
            );
            line.trim_end().to_owned()
        } else {
            format!("    {when}  vm        {what}")
        };
        self.group(kvm, ev.userspace_pid, ev.vm_type)
            .rows
            .push((vcpu, ev.ts_ns, text));
        None
    }

    /// A finding, under its VM and vCPU (text), or at once (JSON).
    pub(super) fn finding(&mut self, f: &Finding, json: bool) -> Option<String> {
        if json {
            return Some(f.to_json_record() + "\n");
        }
        if !self.keep() {
            return None;
        }
        let text = format!(
            "    {:>27}  !! {} {}",
            "",
            f.severity.name().to_uppercase(),
            f.kind.name()
        );
        let name = f.vm.as_ref().and_then(|v| v.display_name());
        let g = self.group(f.kvm, f.userspace_pid, None);
        if g.name.is_none() {
            g.name = name.map(str::to_owned);
        }
        g.rows.push((f.vcpu_id, f.ts_ns, text));
        None
    }

    /// The grouped text: each VM's head, then each vCPU's history (with
    /// the VM's own events at their time), in the order they were judged.
    pub(super) fn render(&self, names: &crate::vmid::VmNames) -> String {
        let mut s = String::new();
        for g in &self.vms {
            let name = g
                .name
                .as_deref()
                .or_else(|| names.get(g.pid)?.display_name());
            let _ = match name {
                Some(n) => writeln!(s, "{} name={n}", g.head),
                None => writeln!(s, "{}", g.head),
            };
            let mut vcpus: Vec<i32> = g.rows.iter().filter_map(|r| r.0).collect();
            vcpus.sort_unstable();
            vcpus.dedup();
            if vcpus.is_empty() {
                for (_, _, row) in &g.rows {
                    let _ = writeln!(s, "{row}");
                }
            }
            for v in vcpus {
                let _ = writeln!(s, "  vCPU {v}");
                for (_, _, row) in g.rows.iter().filter(|r| r.0.is_none_or(|x| x == v)) {
                    let _ = writeln!(s, "{row}");
                }
            }
        }
        if self.not_kept > 0 {
            let _ = writeln!(
                s,
                "(timeline: {} row(s) beyond the first {TIMELINE_ROWS_KEPT} not shown; narrow it \
                 with --pid, --vcpu or --since)",
                self.not_kept
            );
        }
        s
    }
}
