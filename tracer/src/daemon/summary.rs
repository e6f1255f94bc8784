//! What a live run says when it ends: drops, findings, the log's figures, a
//! blind entry gate, and each probe's in-kernel cost.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    time::Duration,
};

use common::ProbeId;

use crate::{
    loader::{Cost, Counters},
    pipeline::{Pipeline, Tally},
};

pub(super) fn print_log_stats(rec: &crate::log::writer::RecorderStats) {
    eprintln!(
        "tracer: event log: {} record(s), {} bytes in {} segment(s), {} dropped",
        rec.records, rec.bytes, rec.segments_opened, rec.dropped
    );
}

/// The `kvm_entry` gate is blind when vCPUs ran but it saw no guest entry:
/// some KVM backends (PVM, for one) never fire `kvm:kvm_entry`.
pub fn blind_gate(gate_attached: bool, counters: &Counters) -> Option<String> {
    // vCPUs ran: KVM_RUN returned (the sys_exit fallback), or loaded their
    // roots (the kvm_mmu_load kprobe, where that replaces the fallback).
    let hits = |id: ProbeId| {
        counters
            .probes
            .iter()
            .find(|(name, _)| *name == id.program_name())
            .map_or(0, |(_, c)| c.hits)
    };
    let (runs, loads) = (hits(ProbeId::KvmRunExit), hits(ProbeId::MmuLoadRet));
    (gate_attached && counters.entry.entries == 0 && runs + loads > 0).then(|| {
        let seen = if runs > 0 {
            format!("{runs} KVM_RUN calls returned")
        } else {
            format!("{loads} kvm_mmu_load calls returned")
        };
        format!(
            "vCPUs ran ({seen}) but kvm:kvm_entry never fired: this KVM backend does not \
             trace guest entries (e.g. PVM), so the in-kernel entry check is blind here; \
             roots are still sampled at each KVM_RUN exit or root load"
        )
    })
}

pub(super) fn summarize(p: &mut Pipeline, counters: &Counters, costs: &[Cost], elapsed: Duration) {
    let tally: &Tally = &p.tally;
    let total: u64 = tally.by_kind.values().sum();
    let dropped = counters.reserve_failed();
    let json = serde_json::json!({
        "record": "summary",
        "duration_s": elapsed.as_secs_f64(),
        "events": tally.by_kind.iter().map(|(k, v)| (k.name(), v)).collect::<BTreeMap<_, _>>(),
        "events_total": total,
        "decode_errors": tally.decode_errors,
        "findings": tally.findings.iter().map(|(k, v)| (k.name(), v)).collect::<BTreeMap<_, _>>(),
        "dropped": dropped,
        "probes": counters.probes.iter().map(|(name, c)| serde_json::json!({
            "program": name,
            "hits": c.hits,
            "emitted": c.emitted,
            "reserve_failed": c.reserve_failed,
            "read_failed": c.read_failed,
            "unpaired": c.unpaired,
        })).collect::<Vec<_>>(),
        "kvm_entry": {
            "entries": counters.entry.entries,
            "tdx_entries": counters.entry.tdx_entries,
            "forbidden_entries": counters.entry.forbidden_entries,
            "slow_path": counters.entry.slow_path,
            "stale_entries": counters.entry.stale_entries,
            "read_failed": counters.entry.read_failed,
            "report_retries": counters.entry.retries,
        },
        "bpf_cost": costs.iter().map(|c| serde_json::json!({
            "program": c.program,
            "attach": c.attach,
            "target": c.target,
            "run_count": c.run_count,
            "run_time_ns": c.run_time_ns,
            "ns_per_run": c.ns_per_run(),
            "floor_run_count": c.floor_run_count,
            "floor_run_time_ns": c.floor_run_time_ns,
            "floor_ns_per_run": c.floor_ns_per_run(),
            "ratio_to_floor": c.ratio(),
        })).collect::<Vec<_>>(),
    });
    let mut e = io::stderr().lock();
    let _ = writeln!(
        e,
        "tracer: detached after {:.1}s: {total} event(s), {dropped} dropped (ring buffer full), {} undecodable",
        elapsed.as_secs_f64(),
        tally.decode_errors
    );
    for (k, v) in &tally.by_kind {
        let _ = writeln!(e, "  {:<20} {v}", k.name());
    }
    let nfindings: u64 = tally.findings.values().sum();
    let _ = writeln!(e, "  findings: {nfindings}");
    for (k, v) in &tally.findings {
        let _ = writeln!(e, "    {:<36} {v}", k.name());
    }
    let _ = writeln!(
        e,
        "  {:<28} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "program", "hits", "emitted", "dropped", "badread", "unpaired"
    );
    for (name, c) in &counters.probes {
        if c.hits + c.emitted + c.reserve_failed + c.unpaired == 0 {
            continue;
        }
        let _ = writeln!(
            e,
            "  {name:<28} {:>10} {:>10} {:>8} {:>8} {:>8}",
            c.hits, c.emitted, c.reserve_failed, c.read_failed, c.unpaired
        );
    }
    let _ = writeln!(
        e,
        "  kvm_entry gate: {} entries, {} TDX, {} forbidden ({} stale mirror root), {} slow \
         path, {} unreadable, {} report retries (ring buffer full)",
        counters.entry.entries,
        counters.entry.tdx_entries,
        counters.entry.forbidden_entries,
        counters.entry.stale_entries,
        counters.entry.slow_path,
        counters.entry.read_failed,
        counters.entry.retries
    );
    print_costs(&mut e, costs);
    drop(e);
    if let Some(o) = p.out.as_mut()
        && o.is_json()
    {
        o.write_raw(&format!("{json}\n"));
        o.flush();
    }
}

/// The in-kernel cost table of the summary.
pub(super) fn print_costs(e: &mut impl io::Write, costs: &[Cost]) {
    if !costs.iter().any(|c| c.run_count > 0) {
        return;
    }
    let _ = writeln!(
        e,
        "  {:<28} {:>10} {:>10} {:>10} {:>7}",
        "in-kernel cost", "runs", "ns/run", "floor", "ratio"
    );
    let f = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"));
    for c in costs.iter().filter(|c| c.run_count > 0) {
        let _ = writeln!(
            e,
            "  {:<28} {:>10} {:>10} {:>10} {:>7}",
            c.program,
            c.run_count,
            f(c.ns_per_run(), 1),
            f(c.floor_ns_per_run(), 1),
            f(c.ratio(), 2)
        );
    }
}
