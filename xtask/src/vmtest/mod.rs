//! `cargo xtask vm-test`: the kprobe path on stock Debian kernels, with real
//! KVM inside QEMU (TCG, `-cpu max`: nested SVM with NPT).
//!
//! For each kernel: fetch its package through Debian's tools (cached under
//! target/vm-test/), build an initramfs holding busybox, the kernel's KVM
//! modules, `tracer` and a small guest workload, boot it with a hard
//! timeout, and check what came back on the serial console: the attach
//! plan, the verifier's verdicts, the events a real guest produced, the
//! values read, zero findings, and a host replay of the log recorded inside
//! the VM.

mod checks;
mod initramfs;
mod kernels;
mod qemu;

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::inject;

pub use checks::Outcome;
use checks::injection_cell;
use kernels::{ensure_host_tools, resolve};
use qemu::boot;

/// The default matrix: Debian series, newest point release of each.
pub const MATRIX: &[(&str, &str)] = &[
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
    ("6.16", "trixie-backports"),
    ("6.17", "trixie-backports"),
    ("6.18", "trixie-backports"),
    ("6.19", "trixie-backports"),
    ("7.2", "sid"),
    ("7.3", "experimental"),
];

/// The workload inside the VM, and how the tracer watches it.
#[derive(Clone, Copy)]
pub struct Workload {
    pub vcpus: u64,
    /// Memslot deletions (each one fast zap), the vCPUs run after each.
    pub churns: u64,
    /// Then run the vCPUs to `hlt` this many more times (guest entries).
    pub extra_runs: u64,
    /// `tracer watch --baseline`: empty programs beside the probes.
    pub baseline: bool,
    /// The kvm_entry gate as a BTF tracepoint where the guest's kernel
    /// allows it (the default); false: `--no-entry-gate-btf`.
    pub entry_gate_btf: bool,
    /// Then the fault-injection phase (see [`INJECT_PHASE`]).
    pub inject: bool,
}

/// The matrix check: a small guest, three memslot deletions.
pub const CHECK: Workload = Workload {
    vcpus: 2,
    churns: 3,
    extra_runs: 0,
    baseline: false,
    entry_gate_btf: true,
    inject: true,
};

/// `cargo xtask vm-test`.
pub fn vm_test(root: &Path, kernels: &[String], timeout: Duration) -> Result<()> {
    ensure_host_tools()?;
    let base = root.join("target/vm-test");
    let apt = base.join("apt");
    let cache = base.join("cache");
    std::fs::create_dir_all(&cache)?;
    let series: Vec<&str> = if kernels.is_empty() {
        MATRIX.iter().map(|(s, _)| *s).collect()
    } else {
        kernels.iter().map(String::as_str).collect()
    };
    let resolved = resolve(&apt, &series)?;
    let mut outcomes = Vec::new();
    let mut skipped = Vec::new();
    for (series, r) in &resolved {
        let (pkg, release) = match r {
            Ok(v) => v,
            Err(why) => {
                eprintln!("vm-test: {series}: SKIPPED, can't be tested here: {why}");
                skipped.push((series.clone(), why.clone()));
                continue;
            }
        };
        eprintln!("vm-test: {release}: booting");
        let o = boot(root, &apt, &cache, pkg, release, timeout, CHECK)?;
        eprintln!(
            "vm-test: {release}: {} in {:.1} s; events {:?}; kvm_entry {} (gate: {})",
            if o.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            },
            o.boot_s,
            o.events,
            o.entries,
            o.gate
        );
        for f in &o.failures {
            eprintln!("vm-test: {release}:   {f}");
        }
        if !o.failures.is_empty() {
            let text = std::fs::read_to_string(&o.serial_log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "vm-test: {release}: serial log {} (last lines):\n{}",
                o.serial_log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        outcomes.push(o);
    }
    let results = write_results(&base, &outcomes, &skipped)?;
    println!(
        "{:<24} {:>6} {:>8}  {:<36} events",
        "kernel", "result", "time", "injection (fault -> finding)"
    );
    for o in &outcomes {
        let inj = injection_cell(o.injection.as_ref());
        println!(
            "{:<24} {:>6} {:>7.1}s  {inj:<36} {}",
            o.release,
            if o.failures.is_empty() { "ok" } else { "FAIL" },
            o.boot_s,
            o.events
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for (series, why) in &skipped {
        println!("{series:<24} {:>6}  {why}", "SKIP");
    }
    eprintln!("vm-test: results in {}", results.display());
    let failed = outcomes.iter().filter(|o| !o.failures.is_empty()).count();
    if failed > 0 {
        bail!("{failed} kernel(s) failed");
    }
    Ok(())
}

/// Writes `results.json`: each kernel's outcome, and the skipped series.
fn write_results(
    base: &Path,
    outcomes: &[Outcome],
    skipped: &[(String, String)],
) -> Result<std::path::PathBuf> {
    let json: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "kernel": o.release,
                "ok": o.failures.is_empty(),
                "boot_and_test_s": o.boot_s,
                "plan": o.plan.iter().cloned().collect::<BTreeMap<_, _>>(),
                "events": o.events,
                "kvm_entry_entries": o.entries,
                "kvm_entry_gate": o.gate,
                "injection": o.injection.as_ref().map(inject::Report::to_json),
                "failures": o.failures,
            })
        })
        .chain(skipped.iter().map(
            |(series, why)| serde_json::json!({ "kernel": series, "ok": null, "skipped": why }),
        ))
        .collect();
    let results = base.join("results.json");
    std::fs::write(&results, serde_json::to_string_pretty(&json)?)?;
    Ok(results)
}

/// Boots one kernel of the matrix with workload `w`, for `cargo xtask
/// bench`: the same checks, and the summary's in-kernel costs.
pub fn boot_one(root: &Path, series: &str, timeout: Duration, w: Workload) -> Result<Outcome> {
    ensure_host_tools()?;
    let base = root.join("target/vm-test");
    let apt = base.join("apt");
    let cache = base.join("cache");
    std::fs::create_dir_all(&cache)?;
    let resolved = resolve(&apt, &[series])?;
    let (_, r) = resolved
        .into_iter()
        .next()
        .context("the kernel series resolved to nothing")?;
    let (pkg, release) = r.map_err(|why| anyhow::anyhow!("{series}: {why}"))?;
    boot(root, &apt, &cache, &pkg, &release, timeout, w)
}
