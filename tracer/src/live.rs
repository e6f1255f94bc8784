//! The live path every attaching command shares (`watch`, `run`, `top`):
//! the capability check, the plan for this kernel, the check that something
//! can attach, draining the ring buffer into decoded events, and counting
//! what was lost (a full ring buffer, an undecodable record) the same way.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::anyhow;
use aya::maps::{MapData, RingBuf};

use crate::{
    Failure,
    event::Event,
    kernel::{self, KernelInfo, PlanOptions},
    loader::Counters,
    log::{ClockPair, Loss},
};

/// Fails with exit 3 when this process lacks the capabilities to load and
/// attach eBPF programs: "`who` needs CAP_… to `why`".
pub fn require_capabilities(who: &str, why: &str) -> Result<(), Failure> {
    match missing_capabilities() {
        Some(missing) => Err(Failure::unsupported(anyhow!(
            "{who} needs {missing} to {why}"
        ))),
        None => Ok(()),
    }
}

/// The capabilities missing to load and attach the programs, if any:
/// CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN (what the kernel checks), not
/// uid 0.
pub fn missing_capabilities() -> Option<String> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })?;
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| n)
        .collect();
    Some(format!("{} (or CAP_SYS_ADMIN)", missing.join(" and ")))
}

/// The kernel to inspect: `/`, or for tests the folder named by
/// `TRACER_TEST_KERNEL_ROOT` (a symlink a test can turn from a root without
/// KVM to `/`, to see the daemon wait for KVM).
pub fn kernel_root() -> PathBuf {
    std::env::var_os("TRACER_TEST_KERNEL_ROOT").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// Inspects the kernel under `root` and plans the attachment; the BTF and
/// kallsyms read for it (a few MB) are freed before this returns.
pub fn plan(
    root: &std::path::Path,
    options: PlanOptions,
) -> Result<kernel::AttachPlan, kernel::KernelError> {
    let info = KernelInfo::inspect(root)?;
    let plan = kernel::plan::plan(&info, options);
    drop(info);
    trim_heap();
    Ok(plan)
}

/// Fails with exit 3 when the plan attaches nothing.
pub fn require_probes(plan: &kernel::AttachPlan) -> Result<(), Failure> {
    if plan.attached().next().is_none() {
        return Err(Failure::unsupported(anyhow!(
            "no probe can attach on this kernel; run `tracer doctor` for the reasons"
        )));
    }
    Ok(())
}

/// Hands every record waiting in the ring buffer to `event`, decoded;
/// returns how many could not be decoded (each is a loss).
pub fn drain(rb: &mut RingBuf<MapData>, mut event: impl FnMut(&Event)) -> u64 {
    let mut undecodable = 0;
    while let Some(item) = rb.next() {
        match Event::decode(&item) {
            Ok(ev) => event(&ev),
            Err(e) => {
                undecodable += 1;
                log::warn!("undecodable ring-buffer record: {e}");
            }
        }
    }
    undecodable
}

/// What was lost since the last look: the growth of each probe's
/// ring-buffer-full counter and of the undecodable records, as loss
/// records (the event log keeps them; replay reports the gaps).
pub struct Losses {
    last: BTreeMap<&'static str, u64>,
    last_undecodable: u64,
    since_ns: u64,
}

impl Default for Losses {
    fn default() -> Self {
        Self {
            last: BTreeMap::new(),
            last_undecodable: 0,
            since_ns: ClockPair::now().monotonic_ns,
        }
    }
}

impl Losses {
    /// The losses since the last call, given the probes' counters and the
    /// undecodable records counted so far.
    pub fn poll(&mut self, counters: &Counters, undecodable: u64) -> Vec<Loss> {
        let now = ClockPair::now().monotonic_ns;
        let mut lost = Vec::new();
        for (name, c) in &counters.probes {
            let prev = self.last.insert(name, c.reserve_failed).unwrap_or(0);
            if c.reserve_failed > prev {
                lost.push(Loss {
                    probe: (*name).to_owned(),
                    from_ns: self.since_ns,
                    to_ns: now,
                    lost: c.reserve_failed - prev,
                    reason: "ring buffer full".into(),
                });
            }
        }
        if undecodable > self.last_undecodable {
            lost.push(Loss {
                probe: "decoder".into(),
                from_ns: self.since_ns,
                to_ns: now,
                lost: undecodable - self.last_undecodable,
                reason: "undecodable ring-buffer record".into(),
            });
            self.last_undecodable = undecodable;
        }
        self.since_ns = now;
        lost
    }
}

/// One malloc arena for the long-running process: start-up's scratch
/// (BTF, kallsyms, the loader made on a thread) is freed in one heap that
/// [`trim_heap`] can give back, instead of per-thread arenas that keep it
/// (measured: 22 MiB idle with them, 15.5 MiB with one).
///
/// And fixed mmap and trim thresholds: glibc raises both after the first
/// large free (up to 32 and 64 MiB) and from then on keeps that much freed
/// memory. An injection's or a replay's buffers then stayed: the daemon
/// tracking 10,002 vCPUs (5 MiB of state) sat at 45 MiB RSS; 21 MiB with
/// fixed thresholds, as the static (musl) build already was.
pub fn one_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before the
    // process starts its other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
    }
}

/// Gives free heap pages back to the kernel after start-up's scratch
/// (glibc keeps them; musl's allocator returns them by itself).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
