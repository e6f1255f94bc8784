//! In-kernel costs: each probe against its empty program beside it (on
//! this host and in the QEMU guests), the entry gate's native fast path, and
//! the zap churn against bpftrace's.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    Report,
    procs::{Proc, bpf_run_time, daemon, summary, tracer_cmd},
};
use crate::vmtest::{self, Workload};

/// Runs the churn workload: `procs` processes of `churns` memslot
/// deletions each, in parallel. Returns (deletions, wall seconds).
pub(super) fn churn(workload: &Path, procs: u64, churns: u64, mode: &[&str]) -> Result<(u64, f64)> {
    let started = Instant::now();
    let children: Vec<Child> = (0..procs)
        .map(|_| {
            Command::new(workload)
                .args(["1", &churns.to_string()])
                .args(mode)
                .stdout(Stdio::piped())
                .spawn()
                .context("failed to start kvm_workload")
        })
        .collect::<Result<_>>()?;
    let mut total = 0;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("kvm_workload failed ({})", out.status);
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        total += v["memslot_deletions"].as_u64().unwrap_or(0);
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

/// Costs from a summary's `bpf_cost`, as figures.
pub(super) fn add_costs(r: &mut Report, section: &'static str, costs: &[Value]) {
    for c in costs {
        let program = c["program"].as_str().unwrap_or("?");
        let runs = c["run_count"].as_u64().unwrap_or(0);
        let Some(ns) = c["ns_per_run"].as_f64() else {
            r.add(section, format!("{program} ns/run"), 0.0, "ns");
            r.note(format!(
                "never ran here ({})",
                c["target"].as_str().unwrap_or("")
            ));
            continue;
        };
        let floor = c["floor_ns_per_run"].as_f64();
        r.add(section, format!("{program} ns/run"), ns, "ns");
        r.note(format!(
            "{runs} runs on {} {}; empty program there: {}",
            c["attach"].as_str().unwrap_or(""),
            c["target"].as_str().unwrap_or(""),
            floor.map_or("-".into(), |f| format!("{f:.1} ns/run"))
        ));
        if let Some(ratio) = c["ratio_to_floor"].as_f64() {
            r.add(section, format!("{program} / empty program"), ratio, "x");
            if program.starts_with("kvm_entry_gate") {
                r.target("<= 1.5x", ratio <= 1.5);
            }
        }
    }
}

/// This host: memslot churn with vCPU runs between (zap raw tracepoint,
/// sys_exit sampling). The kvm_entry gate never fires here (PVM).
pub(super) fn host_costs(
    tracer: &Path,
    workload: &Path,
    work: &Path,
    r: &mut Report,
) -> Result<()> {
    let out = work.join("host-watch.jsonl");
    let mut t = Proc::spawn(
        &mut tracer_cmd(tracer, &["watch", "--json", "--baseline"]),
        Stdio::from(std::fs::File::create(&out)?),
        &work.join("host-watch.err"),
    )?;
    t.wait_attached()?;
    let (n, secs) = churn(workload, 2, 2000, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    t.stop(libc::SIGINT)?;
    let s = summary(&std::fs::read_to_string(&out)?)?;
    eprintln!("bench: host: {n} memslot deletions with vCPU runs in {secs:.2} s");
    let costs = s["bpf_cost"].as_array().cloned().unwrap_or_default();
    add_costs(r, "in-kernel cost (host)", &costs);
    r.raw.insert("host_bpf_cost".into(), Value::Array(costs));
    Ok(())
}

/// Debian 6.18 in QEMU (TCG, nested SVM): kprobes and the kvm_entry gate,
/// twice: the gate as a BTF tracepoint (tp_btf, the default), then as a
/// raw tracepoint (`--no-entry-gate-btf`), each beside its own empty
/// program. TCG inflates every time; the ratios to the empty programs are
/// the figures that carry over.
pub(super) fn vm_costs(root: &Path, r: &mut Report) -> Result<()> {
    let mut raw = serde_json::Map::new();
    for (entry_gate_btf, section, key) in [
        (true, "in-kernel cost (QEMU, gate as tp_btf)", "tp_btf"),
        (false, "in-kernel cost (QEMU, gate as raw_tp)", "raw_tp"),
    ] {
        // Few zaps (a storm is a finding), many guest entries.
        let w = Workload {
            vcpus: 2,
            churns: 3,
            extra_runs: 500,
            baseline: true,
            entry_gate_btf,
            inject: false,
        };
        let o = vmtest::boot_one(root, "6.18", Duration::from_mins(15), w)?;
        if !o.failures.is_empty() {
            bail!(
                "the guest run failed: {} (serial log {})",
                o.failures.join("; "),
                o.serial_log.display()
            );
        }
        eprintln!(
            "bench: QEMU {}: {} guest entries, {:.1} s, gate: {}",
            o.release, o.entries, o.boot_s, o.gate
        );
        // The second run only adds its gate: the other probes are the same.
        let costs: Vec<Value> = o
            .costs
            .iter()
            .filter(|c| entry_gate_btf || c["program"] == "kvm_entry_gate")
            .cloned()
            .collect();
        add_costs(r, section, &costs);
        r.note(format!("the gate attached as: {}", o.gate));
        raw.insert(
            key.into(),
            json!({ "kernel": o.release, "gate": o.gate, "costs": o.costs, "kvm_entry_entries": o.entries }),
        );
    }
    r.raw.insert("vm_bpf_cost".into(), Value::Object(raw));
    Ok(())
}

/// The kvm_entry gate on this host's CPU through BPF_PROG_TEST_RUN on a real
/// guest's vCPUs (kvm:kvm_entry never fires on this PVM host).
pub(super) fn gate_native(gate_cost: &Path, r: &mut Report) -> Result<()> {
    const SECTION: &str = "kvm_entry gate (native)";
    let out = crate::run(Command::new(gate_cost).arg("220000"))?;
    let v: Value = serde_json::from_str(&out).context("gate_cost output")?;
    for (key, what) in [
        ("fast_path", "fast path (same vCPU, same roots)"),
        ("alternating_vcpus", "2 vCPUs alternating on one CPU"),
    ] {
        let fig = &v[key];
        let gate = fig["kvm_entry_gate"].as_f64().context("no gate figure")?;
        let empty = fig["floor_kvm_entry"].as_f64().context("no floor figure")?;
        let ratio = fig["ratio"].as_f64().context("no ratio")?;
        r.add(SECTION, format!("{what}: gate ns/run"), gate, "ns");
        r.note(format!(
            "empty program on the same hook, interleaved: {empty:.1} ns/run"
        ));
        r.add(SECTION, format!("{what}: gate / empty program"), ratio, "x");
        r.note(format!(
            "median of 11 blocks; range {:.2}..{:.2}",
            fig["ratio_min"].as_f64().unwrap_or(0.0),
            fig["ratio_max"].as_f64().unwrap_or(0.0)
        ));
        if key == "fast_path" {
            r.target("<= 1.5x", ratio <= 1.5);
        }
    }
    r.raw.insert("gate_native".into(), v);
    Ok(())
}

/// bpftrace (Debian's package) and the tracer on the same tracepoint, in
/// one run, under the heaviest memslot churn this host drives.
pub(super) fn versus_bpftrace(
    tracer: &Path,
    workload: &Path,
    work: &Path,
    churns: u64,
    r: &mut Report,
) -> Result<()> {
    crate::apt_install(&[("/usr/bin/bpftrace", "bpftrace")])?;
    if !Path::new("/sys/kernel/tracing/events/kvmmmu").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
    if !Path::new("/sys/kernel/tracing/events/kvmmmu/kvm_mmu_zap_all_fast").is_dir() {
        bail!("tracefs has no kvmmmu:kvm_mmu_zap_all_fast here; bpftrace needs its format");
    }
    // Per-program run time for both tools while this runs.
    let stats_path = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let stats_before = std::fs::read_to_string(stats_path).unwrap_or_default();
    std::fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled")?;
    let result = versus_inner(tracer, workload, work, churns, r);
    let _ = std::fs::write(stats_path, stats_before.trim());
    result
}

pub(super) fn versus_inner(
    tracer: &Path,
    workload: &Path,
    work: &Path,
    churns: u64,
    r: &mut Report,
) -> Result<()> {
    const SECTION: &str = "vs bpftrace (zap churn)";
    let bt_out = work.join("bpftrace.jsonl");
    let script = "tracepoint:kvmmmu:kvm_mmu_zap_all_fast { printf(\"%llu %d %d %s %u %u\\n\", \
                  nsecs, pid, tid, comm, args->mmu_valid_gen, args->mmu_used_pages); }";
    let mut bt = Proc::spawn(
        Command::new("bpftrace").args(["-f", "json", "-e", script]),
        Stdio::from(std::fs::File::create(&bt_out)?),
        &work.join("bpftrace.err"),
    )?;
    bt.wait_for(&bt_out, "attached_probes", Duration::from_mins(1))?;
    let log = work.join("vs-log");
    let t = daemon(
        tracer,
        work,
        "vs-log",
        &["--metrics-listen", "", "--no-compress"],
    )?;
    // Start-up (BTF parsing, LLVM) is not what we compare.
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = (bt.cpu_s()?, t.cpu_s()?);
    let bpf0 = (bpf_run_time(bt.pid())?, bpf_run_time(t.pid())?);
    let (deletions, secs) = churn(workload, 2, churns, &["churn-only"])?;
    // Both drain (the tracer polls every 100 ms).
    std::thread::sleep(Duration::from_secs(1));
    let cpu1 = (bt.cpu_s()?, t.cpu_s()?);
    let bpf1 = (bpf_run_time(bt.pid())?, bpf_run_time(t.pid())?);
    let terr = t.stop(libc::SIGTERM)?;
    // bpftrace prints what it holds before it exits: give it time.
    bt.stop_within(libc::SIGINT, Duration::from_mins(2))?;

    let rate = deletions as f64 / secs;
    let (bt_events, bt_lost) = bpftrace_counts(&bt_out)?;
    let (tr_events, tr_lost) = tracer_counts(&log, &terr)?;
    let bt_cpu = cpu1.0 - cpu0.0;
    let tr_cpu = cpu1.1 - cpu0.1;
    let bt_kernel = (bpf1.0.0 - bpf0.0.0) as f64 / 1e9;
    let tr_kernel = (bpf1.1.0 - bpf0.1.0) as f64 / 1e9;

    r.add(
        SECTION,
        "memslot deletions (2 processes)",
        deletions as f64,
        "zaps",
    );
    r.note(format!(
        "{rate:.0} zaps/s over {secs:.2} s: the heaviest churn this host drives"
    ));
    r.add(
        SECTION,
        "bpftrace events captured",
        bt_events as f64,
        "events",
    );
    r.add(SECTION, "bpftrace events lost", bt_lost as f64, "events");
    r.add(
        SECTION,
        "tracer events captured",
        tr_events as f64,
        "events",
    );
    r.add(SECTION, "tracer events lost", tr_lost as f64, "events");
    r.target("0 lost", tr_lost == 0 && tr_events == deletions);
    r.add(SECTION, "bpftrace CPU (user+sys, process)", bt_cpu, "s");
    r.add(SECTION, "tracer CPU (user+sys, process)", tr_cpu, "s");
    r.target("< bpftrace", tr_cpu < bt_cpu);
    r.add(SECTION, "bpftrace in-kernel BPF time", bt_kernel, "s");
    r.add(
        SECTION,
        "tracer in-kernel BPF time (all programs)",
        tr_kernel,
        "s",
    );
    r.note("includes kvm_run_exit on every syscall of the host, which bpftrace does not run");
    r.raw.insert(
        "versus_bpftrace".into(),
        json!({
            "deletions": deletions, "seconds": secs,
            "bpftrace": { "events": bt_events, "lost": bt_lost, "cpu_s": bt_cpu, "bpf_s": bt_kernel, "bpf_runs": bpf1.0.1 - bpf0.0.1 },
            "tracer": { "events": tr_events, "lost": tr_lost, "cpu_s": tr_cpu, "bpf_s": tr_kernel, "bpf_runs": bpf1.1.1 - bpf0.1.1 },
            "bpftrace_script": script,
        }),
    );
    Ok(())
}

/// bpftrace's `-f json` output: printf records, and lost-event records.
pub(super) fn bpftrace_counts(out: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(out)?;
    let (mut events, mut lost) = (0u64, 0u64);
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        match v["type"].as_str() {
            Some("printf") => events += 1,
            Some("lost_events") => lost += v["data"]["events"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    Ok((events, lost))
}

/// The tracer's zap events in its log (plain JSON lines), and its losses
/// from its summary: ring-buffer drops plus records the log writer dropped.
pub(super) fn tracer_counts(log: &Path, stderr: &str) -> Result<(u64, u64)> {
    let mut events = 0u64;
    for e in std::fs::read_dir(log)? {
        let text = std::fs::read_to_string(e?.path())?;
        events += text
            .lines()
            .filter(|l| {
                l.contains("\"record\":\"event\"") && l.contains("\"kind\":\"zap_all_fast\"")
            })
            .count() as u64;
    }
    let after = |marker: &str| -> Result<u64> {
        stderr
            .split(marker)
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no count after {marker:?} in the tracer's summary"))
    };
    // "… N event(s), D dropped (ring buffer full)" and
    // "event log: … in S segment(s), D dropped".
    Ok((events, after("event(s), ")? + after("segment(s), ")?))
}
