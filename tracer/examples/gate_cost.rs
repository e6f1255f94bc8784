//! The `kvm_entry` gate's cost per guest entry on this machine's CPU, beside
//! the empty program on the same hook, without needing `kvm:kvm_entry` to
//! fire: a real guest gives real `struct kvm_vcpu` pointers, and the kernel
//! runs both loaded programs on them through `BPF_PROG_TEST_RUN`, exactly as
//! the tracepoint would (same arguments, same kernel memory, same maps).
//!
//! `gate_cost [RUNS]` prints one JSON object: for the fast path (one vCPU
//! re-entering with the same roots, the steady state) and for two vCPUs
//! alternating on one CPU (the per-CPU cache misses every time), the gate's
//! and the empty program's ns per run and their ratio, the median of 11
//! blocks in which the two programs run interleaved, call by call. Needs root and
//! /dev/kvm; `cargo xtask bench` runs it.

#[path = "../tests/support/kvm.rs"]
#[expect(
    dead_code,
    reason = "the shared guest helper; this example churns no memslot"
)]
mod kvm;

use anyhow::{Context as _, Result, bail};
use common::ProbeId;
use tracer::{
    event::{Event, Kind},
    kernel::{
        KernelInfo,
        plan::{PlanOptions, plan},
    },
    loader::Session,
};

/// Blocks per pattern; the median block is reported.
const BLOCKS: u64 = 11;

fn main() -> Result<()> {
    let runs: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(200_000), |s| s.parse())
        .context("RUNS must be a number")?;
    let mut guest = kvm::Guest::new(2).map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = KernelInfo::live()?;
    // The raw-tracepoint gate: the kernel runs tp_btf programs through
    // BPF_PROG_TEST_RUN only for fentry/fexit (EFAULT otherwise), so the
    // tp_btf twin is measured where kvm:kvm_entry fires, in the QEMU guests.
    let opts = PlanOptions {
        entry_gate_btf: false,
        ..PlanOptions::default()
    };
    let plan = plan(&info, opts);
    drop(info);
    let mut session = Session::start(&plan, 1 << 20, true)?;
    let gate = ProbeId::KvmEntry;
    if !session.attached.iter().any(|(p, _, _)| *p == gate) || !session.floors.contains(&gate) {
        bail!("the kvm_entry gate or its empty program did not load here");
    }

    // The vCPU pointers, from the events of a real KVM_RUN.
    let mut rb = session.take_events()?;
    guest.run_to_hlt().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut vcpus = Vec::new();
    while let Some(item) = rb.next() {
        if let Ok(ev) = Event::decode(&item)
            && matches!(ev.kind, Kind::RunExit | Kind::LoadEnter | Kind::LoadReturn)
            && let Some(v) = ev.vcpu
            && !vcpus.contains(&v)
        {
            vcpus.push(v);
        }
    }
    if vcpus.len() < 2 {
        bail!(
            "saw {} vCPU pointer(s) from the guest's KVM_RUN; need 2",
            vcpus.len()
        );
    }

    // Gate and empty program interleaved call by call, in blocks: both see
    // the same machine, and the median block ratio resists noise.
    let (gate_name, floor_name) = (gate.program_name(), gate.floor_program_name());
    let mut out = serde_json::Map::new();
    for (name, pattern) in [
        ("fast_path", vec![vcpus[0]]),
        ("alternating_vcpus", vec![vcpus[0], vcpus[1]]),
    ] {
        let mut blocks = Vec::new();
        let per_block = (runs / BLOCKS).max(1);
        for _ in 0..BLOCKS {
            let g0 = session.program_stats(gate_name).context("no run stats")?;
            let f0 = session.program_stats(floor_name).context("no run stats")?;
            for i in 0..per_block {
                let vcpu = pattern[(i as usize) % pattern.len()];
                session.test_run_raw_tp(gate_name, &[vcpu])?;
                session.test_run_raw_tp(floor_name, &[vcpu])?;
            }
            let g1 = session.program_stats(gate_name).context("no run stats")?;
            let f1 = session.program_stats(floor_name).context("no run stats")?;
            if g1.1 - g0.1 != per_block || f1.1 - f0.1 != per_block {
                bail!("run counts moved by something else: the hook fired for real?");
            }
            #[expect(clippy::cast_precision_loss, reason = "averages in ns")]
            let (g, f) = (
                (g1.0 - g0.0) as f64 / per_block as f64,
                (f1.0 - f0.0) as f64 / per_block as f64,
            );
            blocks.push((g / f, g, f));
        }
        blocks.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ratio, g, f) = blocks[blocks.len() / 2];
        let mut figures = serde_json::Map::new();
        figures.insert(gate_name.into(), g.into());
        figures.insert(floor_name.into(), f.into());
        figures.insert("ratio".into(), ratio.into());
        figures.insert("ratio_min".into(), blocks[0].0.into());
        figures.insert("ratio_max".into(), blocks[blocks.len() - 1].0.into());
        out.insert(name.into(), figures.into());
    }
    let counters = session.counters()?;
    out.insert("runs".into(), runs.into());
    out.insert("slow_path_runs".into(), counters.entry.slow_path.into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
