//! Loads the eBPF object with the plan's offsets, attaches the programs the
//! plan asks for, and reads the programs' own counters back.

mod btf_tp;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{KProbe, RawTracePoint},
};
use aya_log::EbpfLogger;
use serde::Serialize;

use common::{EntryCounters, EntryState, ProbeCounters, ProbeId};

use crate::{
    Failure,
    kernel::{AttachKind, AttachPlan},
    sys_bpf::{BPF_PROG_TEST_RUN, TestRunAttr, bpf},
};

/// The eBPF object built by build.rs.
static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// What went wrong loading or attaching, typed, with its cause chain (the
/// verifier's log, the syscall's errno) kept as `source`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to load the eBPF object")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(String),
    #[error("program {program} is not a {expected} program")]
    ProgramType {
        program: String,
        expected: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the verifier rejected {program}")]
    Verifier {
        program: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching {kind} {program} to {target}")]
    Attach {
        kind: AttachKind,
        program: String,
        target: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the eBPF object has no {0} map")]
    MissingMap(&'static str),
}

impl LoadError {
    /// The errno at the bottom of the cause chain, if a system call failed.
    pub fn errno(&self) -> Option<i32> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(code) = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
            {
                return Some(code);
            }
            cause = e.source();
        }
        None
    }

    /// The kernel refused with EPERM or EACCES although the capabilities
    /// were there: lockdown, an LSM, a seccomp filter (a container
    /// runtime's), or a missing capability in a user namespace. Not a bug
    /// of ours; retrying won't help.
    pub fn is_refused(&self) -> bool {
        matches!(self.errno(), Some(libc::EPERM | libc::EACCES))
    }
}

/// Why the kernel refuses: exit 3, with the cause chain.
impl From<LoadError> for Failure {
    fn from(e: LoadError) -> Self {
        if e.is_refused() {
            Self::unsupported(anyhow::Error::new(e).context(
                "the kernel refused the eBPF programs although CAP_BPF and CAP_PERFMON are \
                 held: kernel lockdown, an LSM (SELinux, AppArmor), or a seccomp filter such \
                 as a container runtime's default profile",
            ))
        } else {
            Self::from(anyhow::Error::new(e))
        }
    }
}

/// A probe that was meant to attach and didn't.
#[derive(Clone, Debug, Serialize)]
pub struct AttachFailure {
    pub program: &'static str,
    pub target: String,
    pub attach: AttachKind,
    /// The error with its causes, as printed.
    pub error: String,
    /// The typed error.
    #[serde(skip)]
    pub cause: std::sync::Arc<LoadError>,
}

/// A probe that attached as its plan's fallback.
#[derive(Clone, Debug, Serialize)]
pub struct Fallback {
    pub program: &'static str,
    pub tried: AttachKind,
    pub attached: AttachKind,
    /// Why the first choice failed, with its causes.
    pub error: String,
}

/// Loaded programs, their maps, and what attached.
pub struct Session {
    ebpf: Ebpf,
    /// Kept alive and drained: dropping it closes the log map.
    pub logger: Option<Logger>,
    pub attached: Vec<(ProbeId, AttachKind, String)>,
    /// Probes whose empty floor program is attached beside them.
    pub floors: Vec<ProbeId>,
    pub failures: Vec<AttachFailure>,
    /// Probes that attached as their plan's fallback, and why the first
    /// choice didn't.
    pub fallbacks: Vec<Fallback>,
    /// The tp_btf programs, loaded outside aya.
    tracing: Vec<btf_tp::TracingProgram>,
    /// From the start of `load` to the last attach.
    pub attach_time: Duration,
    /// Keeps the kernel's BPF run-time stats on while we run.
    /// The BPF_ENABLE_STATS fd (held to keep the stats on), `Ok(None)` when
    /// the sysctl has them on already, or why they are off.
    pub stats: Result<Option<std::os::fd::OwnedFd>, String>,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub probes: Vec<(&'static str, ProbeCounters)>,
    pub entry: EntryCounters,
}

impl Counters {
    /// Events lost because the ring buffer was full, all probes.
    pub fn reserve_failed(&self) -> u64 {
        self.probes.iter().map(|(_, c)| c.reserve_failed).sum()
    }
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass; failure only matters on
    // kernels before 5.11, where map creation then fails with a clear error.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };
    if ret != 0 {
        log::debug!("setrlimit(RLIMIT_MEMLOCK) failed; fine on kernels >= 5.11");
    }
}

type Logger = EbpfLogger<&'static dyn log::Log>;

/// A loader made ahead of time (see [`prepare`]).
static PREPARED: std::sync::Mutex<Option<std::thread::JoinHandle<EbpfLoader<'static>>>> =
    std::sync::Mutex::new(None);

/// Starts making the eBPF loader on a thread of its own, while the caller
/// inspects the kernel, and probes the kernel's BPF features there (aya
/// does that on first use).
pub fn prepare() {
    let handle = std::thread::spawn(|| {
        let _ = aya::features();
        // This thread does nothing else and ends here.
        loader_without_opens()
    });
    *PREPARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
}

/// The prepared loader, or a new one.
fn loader() -> EbpfLoader<'static> {
    let prepared = PREPARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    prepared
        .and_then(|h| h.join().ok())
        .unwrap_or_else(new_loader)
}

/// A loader without the kernel's BTF: no CO-RE relocations, every offset
/// comes from the tool's own BTF pass.
///
/// aya 0.14's `EbpfLoader::new` parses all of vmlinux's BTF whatever the
/// caller wants (aya-rs/aya#1172): about 40 ms of CPU and a 9 MiB peak of
/// parsed types, only to be dropped by `btf(None)`. So the loader is made on
/// a thread of its own that may not open files ([`deny_opens`]): aya's read
/// of `/sys/kernel/btf/vmlinux` fails at once, as on a kernel without BTF,
/// and the loader starts without it. The filter ends with that thread.
/// Where the filter can't be set, the loader is made the usual way.
fn new_loader() -> EbpfLoader<'static> {
    std::thread::spawn(loader_without_opens)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The loader, made after [`deny_opens`] on the calling thread: call it
/// only on a thread of its own that ends once the loader is made.
fn loader_without_opens() -> EbpfLoader<'static> {
    if let Err(e) = deny_opens() {
        log::debug!("the eBPF loader parses vmlinux BTF (no seccomp filter: {e})");
    }
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

/// Makes `open`/`openat` fail with ENOENT on the calling thread, for the
/// rest of its life (a seccomp filter set without `SECCOMP_FILTER_FLAG_TSYNC`
/// binds only the thread that sets it, and the threads it starts).
fn deny_opens() -> std::io::Result<()> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, sock_filter};
    // AUDIT_ARCH_* of <linux/audit.h>: the filter allows everything on
    // another ABI (its syscall numbers differ).
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Err(std::io::Error::other(
        "no seccomp filter for this architecture",
    ));
    #[cfg(target_arch = "x86_64")]
    const OPEN: u32 = libc::SYS_open as u32;
    #[cfg(not(target_arch = "x86_64"))]
    const OPEN: u32 = libc::SYS_openat as u32;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        const fn stmt(code: u32, k: u32) -> sock_filter {
            sock_filter {
                code: code as u16,
                jt: 0,
                jf: 0,
                k,
            }
        }
        const fn jeq(k: u32, jt: u8, jf: u8) -> sock_filter {
            sock_filter {
                code: (BPF_JMP | BPF_JEQ | BPF_K) as u16,
                jt,
                jf,
                k,
            }
        }
        // struct seccomp_data: int nr; __u32 arch; ...
        let (nr_at, arch_at) = (0, 4);
        let allow = stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW);
        let enoent = stmt(
            BPF_RET | BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOENT as u32,
        );
        let filter = [
            stmt(BPF_LD | BPF_W | BPF_ABS, arch_at),
            jeq(ARCH, 1, 0),
            allow,
            stmt(BPF_LD | BPF_W | BPF_ABS, nr_at),
            jeq(libc::SYS_openat as u32, 2, 0),
            jeq(OPEN, 1, 0),
            allow,
            enoent,
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only; it
        // binds the calling thread (and threads it starts), which only
        // makes the loader, so the rest of the process keeps its privileges.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `prog` points to `filter`, a valid classic BPF program of
        // `len` instructions, and both live across the call; the kernel
        // copies the program.
        if unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Creates the maps and sets the plan's globals; loads no program yet.
/// Also returns the maps' fds, taken before aya-log takes its map, for the
/// programs loaded outside aya.
fn open(
    plan: &AttachPlan,
    ringbuf_bytes: u32,
) -> Result<(Ebpf, Option<Logger>, btf_tp::MapFds), LoadError> {
    raise_memlock();
    let mut ebpf = loader()
        .override_global("OFFSETS", &plan.offsets, true)
        .override_global("PROBE_CONFIG", &plan.config, true)
        .map_max_entries("EVENTS", ringbuf_bytes)
        .load(PROBES)
        .map_err(|e| LoadError::Object(Box::new(e)))?;
    let maps = btf_tp::MapFds::of(&ebpf);
    let logger = match EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("eBPF program logs are unavailable: {e}");
            None
        }
    };
    Ok((ebpf, logger, maps))
}

/// The verifier's verdict on one program.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub program: &'static str,
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What attaches instead if this program is refused; a refusal is then
    /// not an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<AttachKind>,
}

/// Loads every program, attached or not, so the kernel's verifier checks
/// each one with this kernel's offsets. Attaches nothing.
pub fn verify_all(plan: &AttachPlan) -> Result<Vec<Verdict>> {
    let (mut ebpf, _logger, maps) = open(plan, 4096)?;
    let mut verdicts = Vec::new();
    for p in &plan.probes {
        if let Some(first) = &p.btf_first {
            let result = btf_tp::verify(PROBES, &maps, first);
            verdicts.push(Verdict {
                program: first.program,
                accepted: result.is_ok(),
                error: result.err().map(|e| chain(&e)),
                fallback: Some(p.attach),
            });
        }
    }
    for id in ProbeId::ALL {
        let name = id.program_name();
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| LoadError::MissingProgram(name.to_owned()))?;
        let result = match prog {
            aya::programs::Program::KProbe(p) => p.load(),
            aya::programs::Program::RawTracePoint(p) => p.load(),
            _ => {
                return Err(anyhow!(
                    "program {name} is neither a kprobe nor a raw tracepoint"
                ));
            }
        };
        verdicts.push(Verdict {
            program: name,
            accepted: result.is_ok(),
            error: result.err().map(|e| format!("{:#}", anyhow::Error::new(e))),
            fallback: None,
        });
    }
    Ok(verdicts)
}

impl Session {
    /// Loads the object and attaches every probe of `plan` that is not off.
    /// A probe that fails to load or attach is recorded, not fatal: the rest
    /// keep working, and the failure is reported.
    ///
    /// With `baseline`, an empty program is attached beside each probe on the
    /// same hook, so [`Session::costs`] can compare each probe's cost per hit
    /// with the hook's floor.
    pub fn start(plan: &AttachPlan, ringbuf_bytes: u32, baseline: bool) -> Result<Self, LoadError> {
        let started = Instant::now();
        let (mut ebpf, logger, maps) = open(plan, ringbuf_bytes)?;
        let mut attached = Vec::new();
        let mut floors = Vec::new();
        let mut failures = Vec::new();
        let mut fallbacks = Vec::new();
        let mut tracing = Vec::new();
        for p in plan.attached() {
            if let Some(first) = &p.btf_first {
                match btf_tp::attach(PROBES, &maps, first, baseline) {
                    Ok(progs) => {
                        attached.push((p.probe, AttachKind::BtfTracepoint, p.target.clone()));
                        if baseline {
                            floors.push(p.probe);
                        }
                        tracing.extend(progs);
                        continue;
                    }
                    Err(e) => fallbacks.push(Fallback {
                        program: first.program,
                        tried: AttachKind::BtfTracepoint,
                        attached: p.attach,
                        error: chain(&e),
                    }),
                }
            }
            let mut programs = vec![(p.program, p.probe.program_name())];
            if baseline {
                programs.push((p.probe.floor_program_name(), p.probe.floor_program_name()));
            }
            for (i, (program, name)) in programs.into_iter().enumerate() {
                match attach_one(&mut ebpf, name, p.attach, &p.target) {
                    Ok(()) if i == 0 => attached.push((p.probe, p.attach, p.target.clone())),
                    Ok(()) => floors.push(p.probe),
                    Err(e) => failures.push(AttachFailure {
                        program,
                        target: p.target.clone(),
                        attach: p.attach,
                        error: chain(&e),
                        cause: std::sync::Arc::new(e),
                    }),
                }
            }
        }
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Ok(Some(fd)),
            // Someone (sysctl kernel.bpf_stats_enabled=1) turned them on for
            // everyone: they count without our fd.
            Err(_) if bpf_stats_sysctl() => Ok(None),
            Err(e) => Err(format!(
                "BPF run-time stats are off ({e}; BPF_ENABLE_STATS needs CAP_SYS_ADMIN): the \
                 per-program cost metrics stay 0. Set `sysctl kernel.bpf_stats_enabled=1` to \
                 turn them on"
            )),
        };
        if let Err(why) = &stats {
            eprintln!("tracer: warning: {why}");
        }
        Ok(Self {
            ebpf,
            logger,
            attached,
            floors,
            failures,
            fallbacks,
            tracing,
            attach_time: started.elapsed(),
            stats,
        })
    }

    /// How `probe` attached, if it did.
    pub fn attach_kind(&self, probe: ProbeId) -> Option<AttachKind> {
        self.attached
            .iter()
            .find(|(id, _, _)| *id == probe)
            .map(|&(_, kind, _)| kind)
    }

    /// Whether the kernel counts the programs' run time.
    pub fn stats_enabled(&self) -> bool {
        self.stats.is_ok()
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(LoadError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).context("EVENTS is not a ring buffer")
    }

    /// The kernel's run time (ns) and run count of each attached program.
    pub fn bpf_stats(&self) -> Vec<(&'static str, u64, u64)> {
        self.attached
            .iter()
            .filter_map(|&(id, kind, _)| {
                let name = program_name(id, kind);
                let (ns, runs) = self.program_stats(name)?;
                Some((name, ns, runs))
            })
            .collect()
    }

    /// Runs a loaded raw-tracepoint program once through `BPF_PROG_TEST_RUN`
    /// with these tracepoint arguments, in the calling thread, as the hook
    /// would. Its run counts in the kernel's stats like a real hit.
    pub fn test_run_raw_tp(&self, program: &str, args: &[u64]) -> Result<u32> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = if let Some(p) = self.tracing.iter().find(|p| p.name == program) {
            p.raw_fd()
        } else {
            let prog = self
                .ebpf
                .program(program)
                .ok_or_else(|| LoadError::MissingProgram(program.to_owned()))?;
            prog.fd()?.as_fd().as_raw_fd()
        };
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(fd)?,
            ctx_size_in: u32::try_from(size_of_val(args))?,
            ctx_in: args.as_ptr() as u64,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)
            .map_err(|e| anyhow!("BPF_PROG_TEST_RUN of {program}: {e}"))?;
        Ok(attr.retval)
    }

    /// The kernel's run time (ns) and run count of one loaded program.
    pub fn program_stats(&self, program: &str) -> Option<(u64, u64)> {
        if let Some(p) = self.tracing.iter().find(|p| p.name == program) {
            return p.stats();
        }
        let info = self.ebpf.program(program)?.info().ok()?;
        Some((
            u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            info.run_count(),
        ))
    }

    /// Each attached program's cost per hit, beside its floor's when
    /// `--baseline` attached one.
    pub fn costs(&self) -> Vec<Cost> {
        self.attached
            .iter()
            .filter_map(|(id, attach, target)| {
                let program = program_name(*id, *attach);
                let (run_time_ns, run_count) = self.program_stats(program)?;
                let floor = self
                    .floors
                    .contains(id)
                    .then(|| self.program_stats(floor_program_name(*id, *attach)))
                    .flatten();
                Some(Cost {
                    program,
                    attach: *attach,
                    target: target.clone(),
                    run_time_ns,
                    run_count,
                    floor_run_time_ns: floor.map(|f| f.0),
                    floor_run_count: floor.map(|f| f.1),
                })
            })
            .collect()
    }

    /// Reads and sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters> {
        let probes: PerCpuArray<_, ProbeCounters> = PerCpuArray::try_from(
            self.ebpf
                .map("PROBE_COUNTERS")
                .ok_or(LoadError::MissingMap("PROBE_COUNTERS"))?,
        )?;
        let mut out = Counters::default();
        for id in ProbeId::ALL {
            let mut sum = ProbeCounters::default();
            for c in probes.get(&(id as u32), 0)?.iter() {
                sum.hits += c.hits;
                sum.emitted += c.emitted;
                sum.reserve_failed += c.reserve_failed;
                sum.read_failed += c.read_failed;
                sum.unpaired += c.unpaired;
            }
            out.probes.push((id.program_name(), sum));
        }
        let entry: PerCpuArray<_, EntryState> = PerCpuArray::try_from(
            self.ebpf
                .map("ENTRY_STATE")
                .ok_or(LoadError::MissingMap("ENTRY_STATE"))?,
        )?;
        for c in entry.get(&0, 0)?.iter().map(|s| &s.counters) {
            out.entry.entries += c.entries;
            out.entry.tdx_entries += c.tdx_entries;
            out.entry.forbidden_entries += c.forbidden_entries;
            out.entry.slow_path += c.slow_path;
            out.entry.read_failed += c.read_failed;
            out.entry.stale_entries += c.stale_entries;
            out.entry.retries += c.retries;
        }
        Ok(out)
    }
}

/// The program that runs for `id` when it attached as `kind`: the gate
/// has a tp_btf twin.
pub fn program_name(id: ProbeId, kind: AttachKind) -> &'static str {
    match (id, kind) {
        (ProbeId::KvmEntry, AttachKind::BtfTracepoint) => "kvm_entry_gate_btf",
        _ => id.program_name(),
    }
}

/// The empty program beside [`program_name`]'s.
fn floor_program_name(id: ProbeId, kind: AttachKind) -> &'static str {
    match (id, kind) {
        (ProbeId::KvmEntry, AttachKind::BtfTracepoint) => "floor_kvm_entry_btf",
        _ => id.floor_program_name(),
    }
}

/// One program's measured cost, from the kernel's BPF run-time stats.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub program: &'static str,
    pub attach: AttachKind,
    pub target: String,
    pub run_time_ns: u64,
    pub run_count: u64,
    /// The empty program on the same hook (`--baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_run_time_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_run_count: Option<u64>,
}

impl Cost {
    /// Nanoseconds per run, if it ran.
    pub fn ns_per_run(&self) -> Option<f64> {
        per_run(self.run_time_ns, self.run_count)
    }

    pub fn floor_ns_per_run(&self) -> Option<f64> {
        per_run(self.floor_run_time_ns?, self.floor_run_count?)
    }

    /// Cost per hit over the floor's.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.ns_per_run()? / self.floor_ns_per_run()?)
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "nanosecond averages, printed with one decimal"
)]
fn per_run(ns: u64, runs: u64) -> Option<f64> {
    (runs > 0).then(|| ns as f64 / runs as f64)
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &str,
    kind: AttachKind,
    target: &str,
) -> Result<(), LoadError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::MissingProgram(name.to_owned()))?;
    let typed = |expected, source| LoadError::ProgramType {
        program: name.to_owned(),
        expected,
        source: Box::new(source),
    };
    let verifier = |source| LoadError::Verifier {
        program: name.to_owned(),
        source: Box::new(source),
    };
    let attach = |target: &str, source| LoadError::Attach {
        kind,
        program: name.to_owned(),
        target: target.to_owned(),
        source: Box::new(source),
    };
    match kind {
        AttachKind::Kprobe | AttachKind::Kretprobe => {
            let p: &mut KProbe = prog.try_into().map_err(|e| typed("kprobe", e))?;
            p.load().map_err(verifier)?;
            p.attach(target, 0).map_err(|e| attach(target, e))?;
        }
        AttachKind::RawTracepoint => {
            let tp = target.split_once(':').map_or(target, |(_, n)| n);
            let p: &mut RawTracePoint = prog.try_into().map_err(|e| typed("raw tracepoint", e))?;
            p.load().map_err(verifier)?;
            p.attach(tp).map_err(|e| attach(tp, e))?;
        }
        // Loaded outside aya (`btf_tp`); never planned as the only kind.
        AttachKind::BtfTracepoint | AttachKind::Off => {}
    }
    Ok(())
}

/// An error and its causes on one line, as anyhow's `{:#}` prints them.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `kernel.bpf_stats_enabled` is 1.
fn bpf_stats_sysctl() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::deny_opens;

    /// The filter binds the thread that sets it, not the process: the
    /// thread can't open a file, the test's own thread still can.
    #[test]
    fn opens_are_denied_on_the_loader_thread_only() {
        let denied = std::thread::spawn(|| {
            deny_opens().expect("seccomp filters are available here");
            std::fs::File::open("/proc/self/status").map(|_| ())
        })
        .join()
        .unwrap();
        assert_eq!(
            denied.unwrap_err().kind(),
            std::io::ErrorKind::NotFound,
            "the loader thread opened a file"
        );
        std::fs::File::open("/proc/self/status").expect("this thread still opens files");
    }
}
