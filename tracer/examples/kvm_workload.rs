//! Drives a real KVM guest: `kvm_workload [VCPUS] [CHURNS]` creates a VM,
//! runs its vCPUs to `hlt`, then deletes and re-adds a memslot CHURNS times,
//! running the vCPUs again after each. Prints what it did as JSON.

#[path = "../tests/support/kvm.rs"]
mod kvm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let vcpus: u64 = args.next().map_or(Ok(1), |s| s.parse())?;
    let churns: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let mut guest = kvm::Guest::new(vcpus)?;
    guest.run_to_hlt()?;
    for _ in 0..churns {
        guest.churn_slot()?;
        guest.run_to_hlt()?;
    }
    println!(
        "{{\"pid\":{},\"vcpus\":{vcpus},\"memslot_deletions\":{churns}}}",
        std::process::id()
    );
    Ok(())
}
