//! Drives a real KVM guest: `kvm_workload [VCPUS] [CHURNS] [MODE]` creates a
//! VM, runs its vCPUs to `hlt`, then deletes and re-adds a memslot CHURNS
//! times, running the vCPUs again after each. MODE `churn-only` skips those
//! runs (the fastest memslot churn, for benchmarks); `extra-runs=N` runs the
//! vCPUs N more times at the end (guest entries without zaps); `hold=FILE`
//! keeps running the vCPUs to `hlt` (each exit to userspace and re-entry is
//! a guest entry) until FILE exists, for fault injection into the running
//! kernel; `idle=FILE` keeps the VM alive, idle, until FILE exists. Prints what it did as JSON. Arguments after MODE are ignored, so
//! a test can give it a QEMU-like command line (`-name guest=NAME -uuid U`)
//! for the daemon to read from `/proc/<pid>/cmdline`.

#[path = "../tests/support/kvm.rs"]
mod kvm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let vcpus: u64 = args.next().map_or(Ok(1), |s| s.parse())?;
    let churns: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let mut hold = None;
    let mut idle = None;
    let (run, extra_runs) = match args.next().as_deref() {
        None => (true, 0),
        Some(m) if m.starts_with("idle=") => {
            idle = Some(std::path::PathBuf::from(&m["idle=".len()..]));
            (true, 0)
        }
        Some("churn-only") => (false, 0),
        Some(m) if m.starts_with("extra-runs=") => (true, m["extra-runs=".len()..].parse()?),
        Some(m) if m.starts_with("hold=") => {
            hold = Some(std::path::PathBuf::from(&m["hold=".len()..]));
            (true, 0)
        }
        Some(other) => {
            return Err(format!(
                "unknown mode {other:?}; expected churn-only, extra-runs=N, hold=FILE or idle=FILE"
            )
            .into());
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
    let mut held_runs = 0u64;
    if let Some(stop) = hold {
        while !stop.exists() {
            guest.run_to_hlt()?;
            held_runs += 1;
        }
    }
    if let Some(stop) = idle {
        while !stop.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    println!(
        "{{\"pid\":{},\"vcpus\":{vcpus},\"memslot_deletions\":{churns},\"held_runs\":{held_runs},\"seconds\":{}}}",
        std::process::id(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
