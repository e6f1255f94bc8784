//! What each kernel's serial log must show: the plan and the verifier's
//! verdicts, the events a real guest produced and the values read, the log's
//! replay on the host, and the findings of the injected faults.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use super::Workload;
use crate::inject;

/// Sections of the serial log between `@@VMTEST begin X` and `end X`.
pub(super) fn sections(serial: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut blocks = BTreeMap::new();
    let mut marks = BTreeMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("@@VMTEST ") {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            match k {
                "begin" => cur = Some((v.to_owned(), String::new())),
                "end" => {
                    let (name, status) = v.split_once(' ').unwrap_or((v, ""));
                    if let Some((n, body)) = cur.take() {
                        blocks.insert(n, body);
                    }
                    marks.insert(format!("{name}-exit"), status.to_owned());
                }
                _ => {
                    marks.insert(k.to_owned(), v.to_owned());
                }
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    (blocks, marks)
}

/// What one kernel showed, and what failed.
pub struct Outcome {
    pub release: String,
    pub boot_s: f64,
    pub plan: Vec<(String, String)>,
    pub events: BTreeMap<String, u64>,
    pub entries: u64,
    /// How the kvm_entry gate attached (`btf-tracepoint`, or
    /// `raw-tracepoint` with the reason tp_btf was refused).
    pub gate: String,
    /// The summary's in-kernel cost per program (`bpf_cost`).
    pub costs: Vec<Value>,
    pub failures: Vec<String>,
    pub serial_log: PathBuf,
    /// The fault injection, where the workload has it.
    pub injection: Option<inject::Report>,
}

pub(super) fn check(
    release: &str,
    serial: &str,
    host_tracer: &Path,
    work: &Path,
    w: Workload,
) -> Outcome {
    let (blocks, marks) = sections(serial);
    let mut o = Outcome {
        release: release.to_owned(),
        boot_s: 0.0,
        plan: Vec::new(),
        events: BTreeMap::new(),
        entries: 0,
        gate: String::new(),
        costs: Vec::new(),
        failures: Vec::new(),
        serial_log: work.join("serial.log"),
        injection: None,
    };
    if !marks.contains_key("done") {
        o.failures
            .push("the VM did not finish the test script (hang, panic or timeout)".into());
    }
    if let Some(m) = marks.get("insmod-failed") {
        o.failures.push(format!("insmod failed: {m}"));
    }
    let series: Vec<u64> = release
        .split(['.', '-', '+'])
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    let has_mirror = series >= vec![6, 14];
    let plan = check_plan(&blocks, &marks, has_mirror, &mut o.failures);
    o.plan = plan.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let n_events = check_events(&blocks, &plan, has_mirror, w, &mut o);
    check_replay(
        &blocks,
        &marks,
        n_events,
        host_tracer,
        work,
        &mut o.failures,
    );
    o
}

/// The plan `doctor` chose, and the verifier's verdicts.
pub(super) fn check_plan(
    blocks: &BTreeMap<String, String>,
    marks: &BTreeMap<String, String>,
    has_mirror: bool,
    fail: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let doctor: Value = if let Some(Ok(v)) = blocks.get("doctor").map(|d| serde_json::from_str(d)) {
        v
    } else {
        fail.push("no doctor --json output".into());
        Value::Null
    };
    if marks.get("doctor-exit").map(String::as_str) != Some("0") {
        fail.push(format!(
            "doctor --verify exited {:?}",
            marks.get("doctor-exit")
        ));
    }
    let feature = |n: &str| {
        doctor["features"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == n))
            .map(|f| f["enabled"] == true)
    };
    let plan: BTreeMap<String, String> = doctor["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["probe"].as_str().unwrap_or("").to_owned(),
                p["attach"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let attach = |p: &str| plan.get(p).map_or("", String::as_str);
    if feature("kprobes") != Some(true) {
        fail.push("kprobes are not available".into());
    }
    // Every kernel of the matrix (5.16+) looks the plan's symbols up by
    // name instead of printing kallsyms; the stale injection then checks
    // the address found for vmemmap_base.
    let env = &doctor["environment"];
    if env["kallsyms"] != "looked-up" || env["kallsyms_symbols"].as_u64().unwrap_or(0) < 5 {
        fail.push(format!(
            "the plan's kernel symbols were not looked up by name: {env}"
        ));
    }
    if feature("mirror-root-tracking") != Some(has_mirror) {
        fail.push(format!(
            "mirror tracking should be {}",
            if has_mirror { "on" } else { "off" }
        ));
    }
    if attach("kvm_mmu_load") != "kprobe" || attach("kvm_mmu_load_ret") != "kretprobe" {
        fail.push("kvm_mmu_load is not kprobed and kretprobed".into());
    }
    if attach("mmu_alloc_direct_roots") == "off"
        && attach("kvm_tdp_mmu_alloc_root") != "kprobe"
        && has_mirror
    {
        fail.push("neither mmu_alloc_direct_roots nor kvm_tdp_mmu_alloc_root is probed".into());
    }
    if attach("kvm_mmu_zap_all_fast") != "kprobe"
        && attach("kvm_mmu_zap_all_fast_tp") != "raw-tracepoint"
    {
        fail.push("kvm_mmu_zap_all_fast is neither kprobed nor traced".into());
    }
    // The programs with a fallback (the tp_btf gate) may be refused: the
    // run says which attached.
    let verdicts: Vec<Value> = doctor["verifier"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v["fallback"].is_null())
        .collect();
    if verdicts.len() != 12 || verdicts.iter().any(|v| v["accepted"] != true) {
        fail.push(format!(
            "the verifier did not accept every program: {verdicts:?}"
        ));
    }
    plan
}

/// The events the real guest produced, and the values read. Returns the
/// number of events.
/// How `tracer watch` says the kvm_entry gate attached.
fn gate_attach(stderr: &str) -> String {
    let attached = stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("tracer: attached ")?;
        let (kind, program) = rest.split_once(' ')?;
        program
            .trim_start()
            .starts_with("kvm_entry_gate ")
            .then(|| kind.to_owned())
    });
    let fallback = stderr
        .lines()
        .find(|l| l.starts_with("tracer: fallback") && l.contains("kvm_entry_gate_btf"));
    match (attached, fallback) {
        (Some(kind), Some(f)) => format!("{kind}; {}", f.trim_start_matches("tracer: ")),
        (Some(kind), None) => kind,
        (None, _) => "not attached".into(),
    }
}

pub(super) fn check_events(
    blocks: &BTreeMap<String, String>,
    plan: &BTreeMap<String, String>,
    has_mirror: bool,
    w: Workload,
    o: &mut Outcome,
) -> usize {
    let records: Vec<Value> = blocks
        .get("watch")
        .map(|w| {
            w.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default();
    let events: Vec<&Value> = records.iter().filter(|r| r["record"] == "event").collect();
    for e in &events {
        *o.events
            .entry(e["kind"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let summary = records.iter().find(|r| r["record"] == "summary");
    o.gate = gate_attach(blocks.get("watch-err").map_or("", String::as_str));
    o.entries = summary
        .and_then(|s| s["kvm_entry"]["entries"].as_u64())
        .unwrap_or(0);
    o.costs = summary
        .and_then(|s| s["bpf_cost"].as_array().cloned())
        .unwrap_or_default();
    let count = |k: &str| o.events.get(k).copied().unwrap_or(0);
    let attach = |p: &str| plan.get(p).map_or("", String::as_str);
    let fail = &mut o.failures;
    for k in ["load_enter", "load_return"] {
        if count(k) == 0 {
            fail.push(format!("no {k} events"));
        }
    }
    if attach("kvm_tdp_mmu_alloc_root") == "kprobe" && count("alloc_root") == 0 {
        fail.push("no alloc_root events".into());
    }
    if count("zap_all_fast") != w.churns {
        fail.push(format!(
            "{} zap events for {} memslot deletions",
            count("zap_all_fast"),
            w.churns
        ));
    }
    if attach("kvm_mmu_zap_all_fast") == "kprobe"
        && events
            .iter()
            .filter(|e| e["kind"] == "zap_all_fast")
            .any(|e| e["probe"] != "kvm_mmu_zap_all_fast")
    {
        fail.push("zap events did not come from the kprobe".into());
    }
    if o.entries == 0 {
        fail.push("the kvm_entry gate counted no guest entry".into());
    }
    if summary.is_none_or(|s| s["dropped"] != 0) {
        fail.push("ring-buffer drops, or no summary".into());
    }
    if let Some(bad) = events.iter().find_map(|e| bad_value(e, has_mirror)) {
        fail.push(bad);
    }
    let findings = records.iter().filter(|r| r["record"] == "finding").count();
    if findings != 0 {
        fail.push(format!("{findings} finding(s) on a healthy non-TDX VM"));
    }
    events.len()
}

/// A value no healthy default VM can show.
pub(super) fn bad_value(e: &Value, has_mirror: bool) -> Option<String> {
    let invalid = "0xffffffffffffffff";
    if e["vm_type"].is_number() && e["vm_type"] != 0 {
        return Some(format!("vm_type {} on a default VM", e["vm_type"]));
    }
    if e["kind"] == "load_return" && e["ret"] == 0 && e["root_hpa"] == invalid {
        return Some("invalid root.hpa after a successful load".into());
    }
    if has_mirror && e["vcpu"].is_string() && e["mirror_root_hpa"] != invalid {
        return Some(format!(
            "mirror_root_hpa {} on a non-TDX VM",
            e["mirror_root_hpa"]
        ));
    }
    if !has_mirror && !e["mirror_root_hpa"].is_null() {
        return Some("mirror_root_hpa read on a kernel without the field".into());
    }
    None
}

/// The log recorded inside the VM replays to the same result on the host.
pub(super) fn check_replay(
    blocks: &BTreeMap<String, String>,
    marks: &BTreeMap<String, String>,
    n_events: usize,
    host_tracer: &Path,
    work: &Path,
    fail: &mut Vec<String>,
) {
    let in_vm = marks.get("replay-exit").cloned().unwrap_or_default();
    if in_vm != "0" {
        fail.push(format!("replay inside the VM exited {in_vm:?}"));
    }
    let log = work.join("log");
    let _ = std::fs::remove_dir_all(&log);
    let _ = std::fs::create_dir_all(&log);
    let _ = std::fs::write(
        log.join("events-vm-000000.jsonl"),
        blocks.get("log").cloned().unwrap_or_default(),
    );
    match Command::new(host_tracer).arg("replay").arg(&log).output() {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let want = format!("replayed {n_events} event(s)");
            if out.status.code() != Some(0) || !err.contains(&want) {
                fail.push(format!(
                    "host replay of the VM's log differs ({want}?): {err}"
                ));
            }
        }
        Err(e) => fail.push(format!("host replay failed to start: {e}")),
    }
}

/// What the daemon made of the injected fault: on kernels with mirror roots
/// and VM types, exactly one `mirror_root_invalid_at_entry` (and, where
/// injected, one `mirror_root_stale_at_entry`) per vCPU, naming the right
/// VM, vCPU and VMM pid, in the log, as incident files and in the findings
/// counter; nothing before the injection or after the restore. Elsewhere,
/// nothing at all.
pub(super) fn check_injection(
    serial: &str,
    r: Option<&inject::Report>,
    host_tracer: &Path,
    work: &Path,
    fail: &mut Vec<String>,
) {
    let (blocks, marks) = sections(serial);
    let Some(r) = r else {
        fail.push("the guest never got to the injection (no inject-ready)".into());
        return;
    };
    for e in &r.errors {
        fail.push(format!("injection: {e}"));
    }
    if r.applicable && !r.restored {
        fail.push("injection: the kernel memory was not restored".into());
    }
    if marks.get("inject-host").map(String::as_str) != Some("done") {
        fail.push(format!(
            "the guest did not hear 'done' from the host: {:?}",
            marks.get("inject-host")
        ));
    }
    if marks.get("run-exit").map(String::as_str) != Some("0") {
        fail.push(format!(
            "tracer run exited {:?}: {}",
            marks.get("run-exit"),
            blocks.get("run-err").cloned().unwrap_or_default()
        ));
    }
    if r.stale_too_early != 0 {
        fail.push(format!(
            "{} mirror_root_stale_at_entry raised while the mirror roots were valid",
            r.stale_too_early
        ));
    }
    if r.findings_before != 0 || r.findings_after_restore != 0 {
        fail.push(format!(
            "findings before the injection: {}, after the restore: {}",
            r.findings_before, r.findings_after_restore
        ));
    }
    let findings: Vec<Value> = blocks
        .get("inject-log")
        .map(|l| {
            l.lines()
                .filter_map(|x| serde_json::from_str::<Value>(x).ok())
                .filter(|x| x["record"] == "finding")
                .collect()
        })
        .unwrap_or_default();
    let mut want: Vec<(&str, usize)> = Vec::new();
    if r.applicable {
        want.push(("mirror_root_invalid_at_entry", r.vcpus.len()));
        if r.stale_injected {
            want.push(("mirror_root_stale_at_entry", r.vcpus.len()));
        }
    }
    let total: usize = want.iter().map(|(_, n)| n).sum();
    if findings.len() != total {
        let kinds: Vec<&str> = findings.iter().filter_map(|f| f["kind"].as_str()).collect();
        fail.push(format!(
            "the log holds {} finding(s) {kinds:?}, want {total} ({want:?})",
            findings.len()
        ));
    }
    let metrics = blocks.get("inject-metrics").cloned().unwrap_or_default();
    let incidents = blocks.get("incidents").cloned().unwrap_or_default();
    for (kind, n) in &want {
        check_kind(r, &findings, kind, *n, (&metrics, &incidents), fail);
    }
    check_host_replay(&blocks, total, host_tracer, work, fail);
}

/// One kind of injected fault: once per vCPU, naming the VM, the vCPU and
/// the VMM, in the counter and as an incident file.
pub(super) fn check_kind(
    r: &inject::Report,
    findings: &[Value],
    kind: &str,
    n: usize,
    (metrics, incidents): (&str, &str),
    fail: &mut Vec<String>,
) {
    let of_kind: Vec<&Value> = findings.iter().filter(|f| f["kind"] == kind).collect();
    let mut vcpus: Vec<&str> = of_kind.iter().filter_map(|f| f["vcpu"].as_str()).collect();
    vcpus.sort_unstable();
    vcpus.dedup();
    let mut want_vcpus: Vec<&str> = r.vcpus.iter().map(String::as_str).collect();
    want_vcpus.sort_unstable();
    if of_kind.len() != n || vcpus != want_vcpus {
        fail.push(format!(
            "{kind}: {} finding(s) on vCPUs {vcpus:?}, want one on each of {want_vcpus:?}",
            of_kind.len()
        ));
    }
    for f in &of_kind {
        if f["kvm"].as_str() != Some(r.kvm.as_str())
            || f["userspace_pid"].as_i64() != Some(r.vmm_pid)
            || f["severity"] != "critical"
        {
            fail.push(format!(
                "{kind} names kvm {} pid {}, severity {}; want {} pid {} critical",
                f["kvm"], f["userspace_pid"], f["severity"], r.kvm, r.vmm_pid
            ));
        }
    }
    let counter =
        format!("kvm_root_tracer_findings_total{{kind=\"{kind}\",severity=\"critical\"}} {n}");
    if !metrics.contains(&counter) {
        fail.push(format!("the metrics lack `{counter}`"));
    }
    let incident = format!("-{kind}-vmm{}", r.vmm_pid);
    if !incidents.lines().any(|l| l.contains(&incident)) {
        fail.push(format!("no incident file *{incident}*: {incidents:?}"));
    }
}

/// The daemon's log replays on the host to the same findings.
pub(super) fn check_host_replay(
    blocks: &BTreeMap<String, String>,
    total: usize,
    host_tracer: &Path,
    work: &Path,
    fail: &mut Vec<String>,
) {
    let log = work.join("inject-log");
    let _ = std::fs::remove_dir_all(&log);
    let _ = std::fs::create_dir_all(&log);
    let _ = std::fs::write(
        log.join("events-vm-000000.jsonl"),
        blocks.get("inject-log").cloned().unwrap_or_default(),
    );
    match Command::new(host_tracer)
        .args(["replay", "--json"])
        .arg(&log)
        .output()
    {
        Ok(out) => {
            let n = String::from_utf8_lossy(&out.stdout).lines().count();
            if n != total {
                fail.push(format!(
                    "host replay of the daemon's log: {n} finding(s), want {total}"
                ));
            }
        }
        Err(e) => fail.push(format!("host replay failed to start: {e}")),
    }
}

/// The table's injection column.
pub(super) fn injection_cell(r: Option<&inject::Report>) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "MISSED".into(), |v| format!("{v:.0} ms"));
    match r {
        None => "-".into(),
        Some(r) if r.applicable => format!(
            "invalid {}, stale {}",
            ms(r.invalid_latency_ms),
            if r.stale_injected {
                ms(r.stale_latency_ms)
            } else {
                "not injected".into()
            }
        ),
        Some(_) => "n/a (no mirror roots): 0 findings".into(),
    }
}
