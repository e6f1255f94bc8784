//! Drives a real KVM guest: `kvm_workload [VCPUS] [CHURNS] [churn-only]`
//! creates a VM, runs its vCPUs to `hlt`, then deletes and re-adds a memslot
//! CHURNS times, running the vCPUs again after each (not with `churn-only`:
//! the fastest memslot churn, for benchmarks). Prints what it did as JSON.

#[path = "../tests/support/kvm.rs"]
mod kvm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let vcpus: u64 = args.next().map_or(Ok(1), |s| s.parse())?;
    let churns: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let run = match args.next().as_deref() {
        None => true,
        Some("churn-only") => false,
        Some(other) => return Err(format!("unknown mode {other:?}; expected churn-only").into()),
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
    println!(
        "{{\"pid\":{},\"vcpus\":{vcpus},\"memslot_deletions\":{churns},\"seconds\":{}}}",
        std::process::id(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
