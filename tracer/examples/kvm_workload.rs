//! Drives a real KVM guest: `kvm_workload [VCPUS] [CHURNS] [MODE]` creates a
//! VM, runs its vCPUs to `hlt`, then deletes and re-adds a memslot CHURNS
//! times, running the vCPUs again after each. MODE `churn-only` skips those
//! runs (the fastest memslot churn, for benchmarks); `extra-runs=N` runs the
//! vCPUs N more times at the end (guest entries without zaps). Prints what
//! it did as JSON.

#[path = "../tests/support/kvm.rs"]
mod kvm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let vcpus: u64 = args.next().map_or(Ok(1), |s| s.parse())?;
    let churns: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let (run, extra_runs) = match args.next().as_deref() {
        None => (true, 0),
        Some("churn-only") => (false, 0),
        Some(m) if m.starts_with("extra-runs=") => (true, m["extra-runs=".len()..].parse()?),
        Some(other) => {
            return Err(
                format!("unknown mode {other:?}; expected churn-only or extra-runs=N").into(),
            );
        }
    };
    let mut guest = kvm::Guest::new(vcpus)?;
    guest.run_to_hlt()?;
    let started = std::time::Instant::now();
    for _ in 0..churns {
        guest.churn_slot()?;
        if run {
            guest.run_to_hlt()?;
        }
    }
    for _ in 0..extra_runs {
        guest.run_to_hlt()?;
    }
    println!(
        "{{\"pid\":{},\"vcpus\":{vcpus},\"memslot_deletions\":{churns},\"seconds\":{}}}",
        std::process::id(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
