//! `cargo xtask bench`: what the tracer costs, measured on this machine and
//! printed as a table (and as JSON in target/bench/results.json).
//!
//! - in-kernel cost per hit of each program, from the kernel's BPF run-time
//!   stats, beside an empty program on the same hook (`watch --baseline`):
//!   this host's memslot churn for the zap and `sys_exit` paths, a Debian
//!   kernel in QEMU for the kprobes and the `kvm_entry` gate;
//! - userspace throughput (criterion: decode, detect, record), replay
//!   throughput and bytes per event on disk;
//! - daemon memory idle and with 10,000 tracked vCPUs, start-up time;
//! - side by side with bpftrace on `kvmmmu:kvm_mmu_zap_all_fast` under the
//!   heaviest memslot churn this host drives: events captured and lost, CPU.

#![expect(
    clippy::cast_precision_loss,
    reason = "measured figures, printed with two decimals at most"
)]

mod kernel;
mod procs;
mod userspace;

use std::{collections::BTreeMap, path::Path};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use kernel::{gate_native, host_costs, versus_bpftrace, vm_costs};
use userspace::{memory, replay, startup, top, userspace};

/// One measured figure.
struct Figure {
    section: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
    /// The target and whether it was met, for the figures the issue sets
    /// one for.
    target: Option<(String, bool)>,
    note: String,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
    /// Sections that could not be measured, and why.
    failed: Vec<(String, String)>,
    raw: BTreeMap<String, Value>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        self.figures.push(Figure {
            section,
            name: name.into(),
            value,
            unit,
            target: None,
            note: String::new(),
        });
    }

    fn note(&mut self, note: impl Into<String>) {
        if let Some(f) = self.figures.last_mut() {
            f.note = note.into();
        }
    }

    fn target(&mut self, target: impl Into<String>, met: bool) {
        if let Some(f) = self.figures.last_mut() {
            f.target = Some((target.into(), met));
        }
    }

    fn section(&mut self, name: &str, result: Result<()>) {
        if let Err(e) = result {
            eprintln!("bench: {name}: FAILED: {e:#}");
            self.failed.push((name.to_owned(), format!("{e:#}")));
        }
    }
}

pub struct Options {
    /// Memslot deletions per churn process in the bpftrace comparison.
    pub churns: u64,
    /// Skip the QEMU boot (kprobe and kvm_entry costs).
    pub no_vm: bool,
}

pub fn bench(root: &Path, opts: &Options) -> Result<()> {
    let bin = root.join("target/release");
    let tracer = bin.join("tracer");
    let workload = bin.join("examples/kvm_workload");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let mut r = Report::default();

    let res = host_costs(&tracer, &workload, &work, &mut r);
    r.section("in-kernel cost (host)", res);
    if opts.no_vm {
        eprintln!("bench: in-kernel cost (QEMU guest): skipped (--no-vm)");
        r.raw
            .insert("vm_bpf_cost".into(), json!("skipped: --no-vm"));
    } else {
        let res = vm_costs(root, &mut r);
        r.section("in-kernel cost (QEMU guest)", res);
    }
    let res = gate_native(&bin.join("examples/gate_cost"), &mut r);
    r.section("kvm_entry gate (native)", res);
    let res = startup(&tracer, &work, &mut r);
    r.section("start-up", res);
    let res = memory(&tracer, &work, &mut r);
    r.section("memory", res);
    let res = userspace(root, &mut r);
    r.section("userspace throughput", res);
    let res = top(root, &tracer, &work, &mut r);
    r.section("tracer top", res);
    let res = replay(&tracer, &work, &mut r);
    r.section("replay", res);
    let res = versus_bpftrace(&tracer, &workload, &work, opts.churns, &mut r);
    r.section("side by side with bpftrace", res);

    print_report(&r);
    let json = json!({
        "machine": machine(),
        "figures": r.figures.iter().map(|f| json!({
            "section": f.section,
            "name": f.name,
            "value": f.value,
            "unit": f.unit,
            "target": f.target.as_ref().map(|t| &t.0),
            "met": f.target.as_ref().map(|t| t.1),
            "note": f.note,
        })).collect::<Vec<_>>(),
        "failed": r.failed.iter().map(|(s, e)| json!({"section": s, "error": e})).collect::<Vec<_>>(),
        "raw": r.raw,
    });
    let out = work.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    eprintln!("bench: results in {}", out.display());
    if !r.failed.is_empty() {
        bail!("{} section(s) could not be measured", r.failed.len());
    }
    Ok(())
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu_model": read("/proc/cpuinfo").lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())),
    })
}

fn print_report(r: &Report) {
    println!(
        "{:<26} {:<44} {:>14} {:<10} target",
        "section", "figure", "value", "unit"
    );
    for f in &r.figures {
        let target = f.target.as_ref().map_or(String::new(), |(t, met)| {
            format!("{t} {}", if *met { "MET" } else { "MISSED" })
        });
        let value = if f.value.abs() >= 1000.0 || f.value.fract() == 0.0 {
            format!("{:.0}", f.value)
        } else {
            format!("{:.2}", f.value)
        };
        println!(
            "{:<26} {:<44} {:>14} {:<10} {target}",
            f.section, f.name, value, f.unit
        );
        if !f.note.is_empty() {
            println!("{:<26} {:<44} {}", "", "", f.note);
        }
    }
    for (s, e) in &r.failed {
        println!("{s:<26} NOT MEASURED: {e}");
    }
}

// ---------------------------------------------------------------------------
// Processes

// ---------------------------------------------------------------------------
// Sections
