//! Real-kernel tests: the real `tracer watch` against a real KVM guest on
//! this host. They need root and /dev/kvm. Where those are missing they
//! fail, saying why, unless TRACER_SKIP_LIVE=1 is set, in which case they
//! print SKIPPED and what was missing.

#[path = "support/kvm.rs"]
mod kvm;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer::kernel::{
    KernelInfo, PlanOptions, Symbols,
    ksym::Lookup,
    plan::{KALLSYMS_NAMES, plan},
};

const INVALID_PAGE: u64 = u64::MAX;

/// `None` when the live tests can run; else the reason they can't.
fn live_blocker() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    None
}

/// True when the test should go on; panics when it can't run and skipping
/// was not asked for.
fn live_or_skip(test: &str) -> bool {
    let Some(why) = live_blocker() else {
        return true;
    };
    if std::env::var_os("TRACER_SKIP_LIVE").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED live-kernel test {test}: {why} (TRACER_SKIP_LIVE=1)");
        return false;
    }
    panic!(
        "live-kernel test {test} can't run: {why}. Run the tests as root on a host with \
         /dev/kvm, or set TRACER_SKIP_LIVE=1 to skip them explicitly"
    );
}

struct Watch {
    child: Child,
    stderr: mpsc::Receiver<String>,
    stderr_log: Vec<String>,
}

impl Watch {
    /// Starts `tracer watch --json` and waits until it has attached.
    fn start() -> Self {
        let (child, stderr, stderr_log) =
            start_attached(&["watch", "--json", "--duration", "60s"], Stdio::piped());
        Self {
            child,
            stderr,
            stderr_log,
        }
    }

    /// Stops it with SIGINT (Ctrl-C) and returns the JSON records and
    /// stderr.
    fn stop(mut self) -> (Vec<Value>, String) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: signals our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            self.stderr_log.push(line);
        }
        let stderr = self.stderr_log.join("\n");
        assert!(status.success(), "tracer watch failed: {status}\n{stderr}");
        let records = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
            .collect();
        (records, stderr)
    }
}

fn hex(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected a hex string, got {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn watch_sees_a_real_guest_zap_and_roots() {
    if !live_or_skip("watch_sees_a_real_guest_zap_and_roots") {
        return;
    }
    let watch = Watch::start();
    // kvm->userspace_pid is task_pid_nr(current) at KVM_CREATE_VM: the id of
    // the creating *thread*, which for a test is not the process id.
    // SAFETY: gettid has no preconditions.
    let me = i64::from(unsafe { libc::gettid() });

    // Two VMs: A churns its extra memslot 5 times, B 3 times.
    let mut a = kvm::Guest::new(2).expect("VM A");
    let mut b = kvm::Guest::new(1).expect("VM B");
    a.run_to_hlt().unwrap();
    b.run_to_hlt().unwrap();
    for i in 0..5 {
        a.churn_slot().unwrap();
        a.run_to_hlt().unwrap();
        if i < 3 {
            b.churn_slot().unwrap();
            b.run_to_hlt().unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (records, stderr) = watch.stop();
    eprintln!("{stderr}");

    let events: Vec<&Value> = records
        .iter()
        .filter(|r| r["record"] == "event" && r["userspace_pid"].as_i64() == Some(me))
        .collect();
    let summary = records
        .iter()
        .find(|r| r["record"] == "summary")
        .expect("a summary record");
    assert_eq!(summary["dropped"], 0, "no ring-buffer drops: {summary}");
    assert_eq!(summary["decode_errors"], 0);

    // One zap per memslot deletion, per VM, with a toggling generation.
    let mut zaps: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["kind"] == "zap_all_fast") {
        let kvm = hex(&e["kvm"]);
        assert!(
            kvm >= 0xffff_8000_0000_0000,
            "kvm {kvm:#x} is a kernel pointer"
        );
        assert_eq!(e["vm_type"], 0, "default VM: {e}");
        zaps.entry(kvm)
            .or_default()
            .push(e["mmu_valid_gen"].as_i64().unwrap());
    }
    let mut counts: Vec<usize> = zaps.values().map(Vec::len).collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![3, 5], "zaps per VM: {zaps:?}\n{stderr}");
    for (kvm, gens) in &zaps {
        for w in gens.windows(2) {
            assert_eq!(
                w[1],
                1 - w[0],
                "mmu_valid_gen toggles on VM {kvm:#x}: {gens:?}"
            );
        }
    }

    // vCPU state read from kernel memory: a default VM, a valid direct
    // root after a successful run or load, and an INVALID mirror root
    // where the kernel has the field.
    let vcpu_events: Vec<&&Value> = events
        .iter()
        .filter(|e| {
            ["run_exit", "load_return", "entry_transition"]
                .contains(&e["kind"].as_str().unwrap_or(""))
        })
        .collect();
    assert!(
        !vcpu_events.is_empty(),
        "no vCPU state events for our VMs\n{stderr}"
    );
    let mut seen_vcpus = BTreeSet::new();
    for e in &vcpu_events {
        assert_eq!(e["vm_type"], 0, "{e}");
        assert!(
            zaps.contains_key(&hex(&e["kvm"])),
            "vCPU of one of our VMs: {e}"
        );
        if e["ret"] == 0 {
            assert_ne!(
                hex(&e["root_hpa"]),
                INVALID_PAGE,
                "valid root after success: {e}"
            );
        }
        if !e["mirror_root_hpa"].is_null() {
            assert_eq!(hex(&e["mirror_root_hpa"]), INVALID_PAGE, "non-TDX VM: {e}");
        }
        seen_vcpus.insert((hex(&e["kvm"]), e["vcpu_id"].as_i64().unwrap()));
    }
    assert_eq!(seen_vcpus.len(), 3, "every vCPU observed: {seen_vcpus:?}");
    let mirror_on = vcpu_events.iter().any(|e| !e["mirror_root_hpa"].is_null());
    eprintln!(
        "live: {} zap events, {} vCPU state events, mirror_root_hpa read: {mirror_on}",
        zaps.values().map(Vec::len).sum::<usize>(),
        vcpu_events.len()
    );
}

#[test]
fn doctor_reports_this_hosts_kprobe_support_and_fallbacks() {
    if !live_or_skip("doctor_reports_this_hosts_kprobe_support_and_fallbacks") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let feature = |n: &str| {
        v["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == n)
            .unwrap()
            .clone()
    };
    let probe = |n: &str| {
        v["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["probe"] == n)
            .unwrap()
            .clone()
    };
    let has_kprobes = Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    assert_eq!(feature("kprobes")["enabled"], has_kprobes);
    // The zap tracepoint is preferred wherever it exists, kprobes or not.
    let tp = probe("kvm_mmu_zap_all_fast_tp");
    assert_eq!(tp["attach"], "raw-tracepoint");
    assert!(
        tp["reason"].as_str().unwrap().contains("every call"),
        "{tp}"
    );
    assert_eq!(probe("kvm_mmu_zap_all_fast")["attach"], "off");
    if has_kprobes {
        assert_eq!(probe("kvm_mmu_load")["attach"], "kprobe");
    } else {
        let why = feature("kprobes")["reason"].as_str().unwrap().to_owned();
        assert!(why.contains("kprobes unavailable"), "{why}");
        assert_eq!(probe("kvm_mmu_load")["attach"], "off");
        eprintln!("live: kprobes off here: {why}");
    }
    assert_eq!(v["environment"]["dev_kvm"], true);
}

/// The plan's symbols, looked up by name through BPF, are what kallsyms
/// lists: the same names found, at the same addresses (where kallsyms shows
/// addresses), and `doctor` says it looked them up.
#[test]
fn symbols_looked_up_by_name_are_the_ones_kallsyms_lists() {
    if !live_or_skip("symbols_looked_up_by_name_are_the_ones_kallsyms_lists") {
        return;
    }
    let listed = Symbols::parse(&std::fs::read("/proc/kallsyms").unwrap());
    let lookup = Lookup::load().expect("syscall programs and bpf_kallsyms_lookup_name (5.16)");
    let mut found = 0;
    for name in KALLSYMS_NAMES {
        let by_name = lookup.address(name).unwrap();
        // `function`/`variable` only check the type; `has_raw_tracepoint`
        // and friends all go through one of them.
        let in_list = listed
            .function(name)
            .map(|s| s.addr)
            .or_else(|| listed.variable(name));
        assert_eq!(
            by_name.is_some(),
            in_list.is_some(),
            "{name}: looked up {by_name:x?}, kallsyms {in_list:x?}"
        );
        if let (Some(a), Some(b)) = (by_name, in_list)
            && b != 0
        {
            assert_eq!(a, b, "{name}");
        }
        found += usize::from(by_name.is_some());
    }
    assert!(found >= 5, "only {found} of the plan's names exist here");
    assert_eq!(lookup.address("no_such_symbol_here").unwrap(), None);

    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["environment"]["kallsyms"], "looked-up", "{v}");
    assert_eq!(v["environment"]["kallsyms_symbols"], found);

    // The same kernel seen through a path that isn't `/` reads kallsyms:
    // both plans attach the same way, with the same offsets.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::os::unix::fs::symlink("/", &root).unwrap();
    let read = KernelInfo::inspect(&root).unwrap();
    let looked = KernelInfo::live().unwrap();
    assert!(!read.symbols.is_looked_up() && looked.symbols.is_looked_up());
    let (a, b) = (
        plan(&read, PlanOptions::default()),
        plan(&looked, PlanOptions::default()),
    );
    let kinds = |p: &tracer::kernel::AttachPlan| {
        p.probes
            .iter()
            .map(|p| (p.program, p.attach))
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&a), kinds(&b));
    assert_eq!(a.offsets, b.offsets);
}

#[test]
fn verifier_accepts_every_program_with_this_kernels_offsets() {
    if !live_or_skip("verifier_accepts_every_program_with_this_kernels_offsets") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["doctor", "--verify", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let verdicts = v["verifier"].as_array().expect("verifier verdicts");
    // The 12 probes, and the gate's tp_btf twin (this kernel allows it).
    assert_eq!(verdicts.len(), 13, "every program, attached or not");
    for verdict in verdicts {
        assert_eq!(verdict["accepted"], true, "{verdict}");
    }
    eprintln!("live: verifier accepted {} programs", verdicts.len());
}

#[test]
fn watch_raises_a_zap_storm_finding_live_on_real_memslot_churn() {
    if !live_or_skip("watch_raises_a_zap_storm_finding_live_on_real_memslot_churn") {
        return;
    }
    let watch = Watch::start();
    // SAFETY: gettid has no preconditions.
    let me = i64::from(unsafe { libc::gettid() });
    let mut guest = kvm::Guest::new(1).expect("VM");
    guest.run_to_hlt().unwrap();
    // The default storm threshold is 50 fast zaps within 10 s.
    for _ in 0..60 {
        guest.churn_slot().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (records, stderr) = watch.stop();
    let ours = |r: &&Value| r["userspace_pid"].as_i64() == Some(me);
    let zaps = records
        .iter()
        .filter(|r| r["record"] == "event" && r["kind"] == "zap_all_fast")
        .filter(ours)
        .count();
    assert_eq!(zaps, 60, "{stderr}");
    let storms: Vec<&Value> = records
        .iter()
        .filter(|r| r["record"] == "finding" && r["kind"] == "zap_storm")
        .filter(ours)
        .collect();
    assert_eq!(storms.len(), 1, "one storm finding per window\n{stderr}");
    assert_eq!(storms[0]["severity"], "info");
    // Findings come in the stream right after the event that proved them.
    let pos = records.iter().position(|r| r == storms[0]).unwrap();
    assert_eq!(records[pos - 1]["kind"], "zap_all_fast");
    assert!(
        stderr.contains("zap_storm"),
        "summary lists findings: {stderr}"
    );
    eprintln!(
        "live: {zaps} real zaps raised {} zap_storm finding",
        storms.len()
    );
}

/// Starts `tracer <args>` and waits until it has attached; returns the
/// child, its remaining stderr lines, and the lines read so far. The caller
/// waits for the child.
#[expect(clippy::zombie_processes, reason = "every caller waits for the child")]
fn start_attached(args: &[&str], stdout: Stdio) -> (Child, mpsc::Receiver<String>, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer");
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let done = line.contains("probe(s) in");
                log.push(line);
                if done {
                    return (child, rx, log);
                }
            }
            Err(e) => panic!(
                "tracer {} did not attach within 30 s ({e}); stderr:\n{}",
                args[0],
                log.join("\n")
            ),
        }
    }
}

/// Zap events of VMs created by this thread, from a recorded log folder.
fn our_zaps(log: &Path, me: i64) -> usize {
    let mut zaps = 0;
    let r = tracer::replay::replay(
        &[log.to_path_buf()],
        &tracer::replay::Filter::default(),
        |ev, _| {
            if ev.kind == tracer::event::Kind::ZapAllFast
                && ev.userspace_pid.map(i64::from) == Some(me)
            {
                zaps += 1;
            }
        },
    )
    .expect("the log replays");
    assert!(
        r.stats
            .problems
            .iter()
            .all(|p| p.kind == tracer::log::reader::ProblemKind::TornLine),
        "{:?}",
        r.stats.problems
    );
    zaps
}

#[test]
fn run_records_until_sigterm_and_sighup_reopens_the_log() {
    if !live_or_skip("run_records_until_sigterm_and_sighup_reopens_the_log") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut child, _stderr, _) =
        start_attached(&["run", "--log-dir", log.to_str().unwrap()], Stdio::null());
    // SAFETY: gettid has no preconditions.
    let me = i64::from(unsafe { libc::gettid() });
    let mut guest = kvm::Guest::new(1).expect("VM");
    guest.run_to_hlt().unwrap();
    for _ in 0..5 {
        guest.churn_slot().unwrap();
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        guest.churn_slot().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    let segments: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with("events-").then_some(name)
        })
        .collect();
    assert!(
        segments.len() >= 2,
        "SIGHUP opened a new segment: {segments:?}"
    );
    assert!(
        segments.iter().all(|s| s.ends_with(".jsonl.zst")),
        "closed and compressed at exit: {segments:?}"
    );
    assert_eq!(our_zaps(&log, me), 8);
}

#[test]
fn watch_record_survives_kill_9() {
    if !live_or_skip("watch_record_survives_kill_9") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut child, _stderr, _) =
        start_attached(&["watch", "--record", log.to_str().unwrap()], Stdio::null());
    // SAFETY: gettid has no preconditions.
    let me = i64::from(unsafe { libc::gettid() });
    let mut guest = kvm::Guest::new(1).expect("VM");
    guest.run_to_hlt().unwrap();
    for _ in 0..20 {
        guest.churn_slot().unwrap();
    }
    // Each batch is handed to the kernel as it is drained; give the daemon
    // a moment to drain, then kill it without warning.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(our_zaps(&log, me), 20, "nothing written was lost");
}

/// The `kvm_entry` gate on this host, where `kvm:kvm_entry` never fires
/// (PVM): the kernel runs the loaded gate through `BPF_PROG_TEST_RUN` on a
/// real guest's `struct kvm_vcpu *`, as the tracepoint would. The first
/// entry reports the roots read from kernel memory; the next ones take the
/// per-CPU fast path and report nothing.
/// The events in the ring buffer that this process caused, decoded.
fn our_events(rb: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<tracer::event::Event> {
    let me = std::process::id();
    let mut evs = Vec::new();
    while let Some(item) = rb.next() {
        let ev = tracer::event::Event::decode(&item).unwrap();
        if ev.pid == me {
            evs.push(ev);
        }
    }
    evs
}

/// A session with the gate as a raw tracepoint: `BPF_PROG_TEST_RUN` runs
/// raw tracepoints, not tp_btf programs.
fn raw_gate_session(ringbuf_bytes: u32) -> tracer::loader::Session {
    let raw_gate = PlanOptions {
        entry_gate_btf: false,
        ..PlanOptions::default()
    };
    let plan = plan(&KernelInfo::live().unwrap(), raw_gate);
    tracer::loader::Session::start(&plan, ringbuf_bytes, false).unwrap()
}

#[test]
fn entry_gate_reads_a_real_vcpus_roots_and_then_stays_quiet() {
    use tracer::event::Kind;
    if !live_or_skip("entry_gate_reads_a_real_vcpus_roots_and_then_stays_quiet") {
        return;
    }
    let mut guest = kvm::Guest::new(1).expect("a KVM guest");
    let mut session = raw_gate_session(1 << 20);
    let mut rb = session.take_events().unwrap();
    let mut drain = || our_events(&mut rb);
    guest.run_to_hlt().unwrap();
    // This process's vCPU, and the root it ran with (sampled at KVM_RUN exit
    // here, at kvm_mmu_load where kprobes exist).
    let seen = drain();
    let ran = seen
        .iter()
        .rev()
        .find(|e| e.vcpu.is_some() && e.root_hpa.is_some())
        .unwrap_or_else(|| panic!("no event with this guest's vCPU: {seen:?}"));
    let vcpu = ran.vcpu.unwrap();

    session
        .test_run_raw_tp(common::ProbeId::KvmEntry.program_name(), &[vcpu])
        .unwrap();
    let first = drain();
    assert_eq!(first.len(), 1, "{first:?}");
    let e = &first[0];
    assert_eq!(e.kind, Kind::EntryTransition);
    assert_eq!(e.vcpu, Some(vcpu));
    assert_eq!(e.root_hpa, ran.root_hpa, "the gate read another root");
    assert_ne!(e.root_hpa, Some(INVALID_PAGE));
    assert_eq!(e.mirror_root_hpa, Some(INVALID_PAGE), "non-TDX vCPU");
    assert_ne!(e.vm_type, Some(5), "not a TDX VM");

    for _ in 0..99 {
        session
            .test_run_raw_tp(common::ProbeId::KvmEntry.program_name(), &[vcpu])
            .unwrap();
    }
    assert!(
        drain().is_empty(),
        "unchanged roots must not be reported again"
    );
    let c = session.counters().unwrap().entry;
    assert_eq!(
        (c.entries, c.slow_path, c.forbidden_entries, c.tdx_entries),
        (100, 1, 0, 0)
    );
}

/// Issue 12: the gate caches a state only once its report was reserved. With
/// the ring buffer full, the report is counted as a retry and nothing is
/// cached; once there is room (and the 1 ms retry limit passed), the next
/// entry reports it. Before the fix, the state was cached first and never
/// reported again.
#[test]
fn entry_gate_retries_a_report_the_ring_buffer_had_no_room_for() {
    use tracer::event::Kind;
    if !live_or_skip("entry_gate_retries_a_report_the_ring_buffer_had_no_room_for") {
        return;
    }
    let mut guest = kvm::Guest::new(1).expect("a KVM guest");
    // The smallest ring buffer: one page, a couple of dozen events.
    let mut session = raw_gate_session(4096);
    let mut rb = session.take_events().unwrap();
    guest.run_to_hlt().unwrap();
    let vcpu = our_events(&mut rb)
        .iter()
        .rev()
        .find_map(|ev| ev.vcpu)
        .expect("an event with this guest's vCPU");
    // Fill the ring buffer: every zap is an event, none is drained.
    let full = |s: &tracer::loader::Session| s.counters().unwrap().reserve_failed();
    let before = full(&session);
    for _ in 0..200 {
        guest.churn_slot().unwrap();
        if full(&session) > before {
            break;
        }
    }
    assert!(full(&session) > before, "the ring buffer never filled");
    let gate = common::ProbeId::KvmEntry.program_name();
    session.test_run_raw_tp(gate, &[vcpu]).unwrap();
    let c = session.counters().unwrap().entry;
    assert_eq!(c.retries, 1, "{c:?}");
    // Room again; past the retry limit, the next entry reports the state.
    while rb.next().is_some() {}
    std::thread::sleep(Duration::from_millis(5));
    session.test_run_raw_tp(gate, &[vcpu]).unwrap();
    let reports = |rb: &mut aya::maps::RingBuf<aya::maps::MapData>| {
        our_events(rb)
            .iter()
            .filter(|ev| ev.kind == Kind::EntryTransition && ev.vcpu == Some(vcpu))
            .count()
    };
    assert_eq!(reports(&mut rb), 1, "the report was lost behind the cache");
    // Now cached: the same state is not reported again.
    session.test_run_raw_tp(gate, &[vcpu]).unwrap();
    assert_eq!(reports(&mut rb), 0);
}

/// The gate attaches as a BTF tracepoint where the kernel allows it (this
/// host does: tp_btf is a tracing program without a trampoline), beside its
/// own empty program; with the option off it is the raw tracepoint; and a
/// tp_btf the kernel refuses (here: a plan naming the wrong BTF type) falls
/// back to the raw tracepoint, saying why, with nothing counted as failed.
#[test]
fn entry_gate_attaches_as_tp_btf_or_falls_back_to_raw_saying_why() {
    use common::ProbeId;
    use tracer::{
        kernel::{AttachKind, KernelInfo, PlanOptions, plan::plan},
        loader::Session,
    };
    if !live_or_skip("entry_gate_attaches_as_tp_btf_or_falls_back_to_raw_saying_why") {
        return;
    }
    let info = KernelInfo::live().unwrap();
    let gate = |s: &Session| {
        s.attached
            .iter()
            .find(|(p, _, _)| *p == ProbeId::KvmEntry)
            .map(|(_, kind, _)| *kind)
    };

    let p = plan(&info, PlanOptions::default());
    assert!(p.probe(ProbeId::KvmEntry).btf_first.is_some(), "{p:?}");
    let s = Session::start(&p, 1 << 16, true).unwrap();
    assert_eq!(
        gate(&s),
        Some(AttachKind::BtfTracepoint),
        "{:?}",
        s.fallbacks
    );
    assert!(s.fallbacks.is_empty() && s.failures.is_empty());
    assert!(s.floors.contains(&ProbeId::KvmEntry));
    assert!(s.program_stats("kvm_entry_gate_btf").is_some());
    assert!(s.program_stats("floor_kvm_entry_btf").is_some());
    drop(s);

    let off = PlanOptions {
        entry_gate_btf: false,
        ..PlanOptions::default()
    };
    let s = Session::start(&plan(&info, off), 1 << 16, false).unwrap();
    assert_eq!(gate(&s), Some(AttachKind::RawTracepoint));
    assert!(s.fallbacks.is_empty());
    drop(s);

    let mut wrong = plan(&info, PlanOptions::default());
    let first = wrong
        .probes
        .iter_mut()
        .find(|p| p.probe == ProbeId::KvmEntry)
        .and_then(|p| p.btf_first.as_mut())
        .unwrap();
    first.type_id = 1; // a base type, not btf_trace_kvm_entry
    let s = Session::start(&wrong, 1 << 16, false).unwrap();
    assert_eq!(gate(&s), Some(AttachKind::RawTracepoint));
    assert!(s.failures.is_empty(), "{:?}", s.failures);
    let [f] = s.fallbacks.as_slice() else {
        panic!("one fallback: {:?}", s.fallbacks)
    };
    assert_eq!(
        (f.program, f.tried, f.attached),
        (
            "kvm_entry_gate_btf",
            AttachKind::BtfTracepoint,
            AttachKind::RawTracepoint
        )
    );
    assert!(
        f.error.contains("refused kvm_entry_gate_btf"),
        "{}",
        f.error
    );
}

/// Two vCPUs taking turns on one CPU each keep their own way of the gate's
/// per-CPU cache: after the first entry of each, every entry is a fast-path
/// hit, except one full read per vCPU every `ENTRY_REVALIDATE_HITS` hits
/// (what the fast path doesn't compare, the VM type, can't hide behind it
/// for longer). Before the ways, each turn missed the one-slot cache.
#[test]
fn entry_gate_keeps_alternating_vcpus_on_the_fast_path_and_revalidates() {
    use common::ENTRY_REVALIDATE_HITS;
    use tracer::event::Kind;
    if !live_or_skip("entry_gate_keeps_alternating_vcpus_on_the_fast_path_and_revalidates") {
        return;
    }
    let mut guest = kvm::Guest::new(2).expect("a KVM guest");
    let mut session = raw_gate_session(1 << 20);
    let mut rb = session.take_events().unwrap();
    guest.run_to_hlt().unwrap();
    let mut vcpus = Vec::new();
    for ev in our_events(&mut rb) {
        if matches!(ev.kind, Kind::RunExit | Kind::LoadEnter | Kind::LoadReturn)
            && let Some(v) = ev.vcpu
            && !vcpus.contains(&v)
        {
            vcpus.push(v);
        }
    }
    assert_eq!(vcpus.len(), 2, "this guest's vCPUs: {vcpus:?}");
    let gate = common::ProbeId::KvmEntry.program_name();
    let turns = u64::from(ENTRY_REVALIDATE_HITS) + 100;
    for _ in 0..turns {
        for &v in &vcpus {
            session.test_run_raw_tp(gate, &[v]).unwrap();
        }
    }
    let c = session.counters().unwrap().entry;
    assert_eq!(c.entries, 2 * turns);
    // Two vCPUs share a way when their pointers hash alike (1 in
    // ENTRY_CACHE_WAYS): then each turn evicts the other.
    let shared = common::entry_way(vcpus[0]) == common::entry_way(vcpus[1]);
    let want = if shared { 2 * turns } else { 4 };
    assert_eq!(
        c.slow_path, want,
        "first entry and one revalidation per vCPU (ways shared: {shared})"
    );
}

/// The log's header records how each probe attached, not only the plan: on
/// this host the kvm_entry gate as a BTF tracepoint, and as a raw one with
/// `--no-entry-gate-btf` (a post-mortem reader must know which program
/// watched the entries).
#[test]
fn the_log_header_records_how_the_gate_attached() {
    if !live_or_skip("the_log_header_records_how_the_gate_attached") {
        return;
    }
    for (flags, want) in [
        (&[][..], "btf-tracepoint"),
        (&["--no-entry-gate-btf"][..], "raw-tracepoint"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(["watch", "--duration", "200ms", "--no-compress", "--record"])
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .expect("a segment");
        let text = std::fs::read_to_string(segment).unwrap();
        let header: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let gate = header["attach_plan"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["program"] == "kvm_entry_gate")
            .cloned()
            .unwrap_or_default();
        assert_eq!(gate["attach"], want, "{flags:?}: {header}");
    }
}
