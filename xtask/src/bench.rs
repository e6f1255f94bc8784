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

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::vmtest::{self, Workload};

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

/// A tracer (or bpftrace) process with its stderr in a file.
struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, stdout: Stdio, stderr: &Path) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(stderr)?)
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        Ok(Self {
            child,
            stderr: stderr.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `file` contains `needle` (or the process exits).
    fn wait_for(&mut self, file: &Path, needle: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if std::fs::read_to_string(file).is_ok_and(|s| s.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "exited ({status}) before {needle:?}:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            if started.elapsed() > timeout {
                bail!("no {needle:?} after {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_attached(&mut self) -> Result<()> {
        let stderr = self.stderr.clone();
        self.wait_for(&stderr, "probe(s) in", Duration::from_mins(1))
    }

    /// Sends `signal`, waits (at most `timeout`), returns stderr.
    fn stop_within(mut self, signal: i32, timeout: Duration) -> Result<String> {
        let pid = i32::try_from(self.pid()).context("pid")?;
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(pid, signal) };
        let started = Instant::now();
        let status = wait_timeout(&mut self.child, timeout)
            .with_context(|| format!("{} after the signal", self.stderr.display()))?;
        eprintln!(
            "bench: pid {pid} exited {:.1} s after signal {signal}",
            started.elapsed().as_secs_f64()
        );
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if !status.success() {
            bail!("exited with {status}:\n{err}");
        }
        Ok(err)
    }

    fn stop(self, signal: i32) -> Result<String> {
        self.stop_within(signal, Duration::from_secs(30))
    }

    /// User + system CPU seconds so far.
    fn cpu_s(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }
}

impl Drop for Proc {
    /// A section that failed half-way leaves nothing running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            bail!("did not exit within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// utime + stime of a live process, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may hold spaces.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get = |key: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("bad status line")?
            .parse()?)
    };
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}

/// Total run time (ns) and run count of the BPF programs a process holds,
/// from /proc/PID/fdinfo (the kernel's BPF stats must be on).
fn bpf_run_time(pid: u32) -> Result<(u64, u64)> {
    let (mut ns, mut runs) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        for line in info.lines() {
            if let Some(v) = line.strip_prefix("run_time_ns:") {
                ns += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("run_cnt:") {
                runs += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((ns, runs))
}

/// Runs the churn workload: `procs` processes of `churns` memslot
/// deletions each, in parallel. Returns (deletions, wall seconds).
fn churn(workload: &Path, procs: u64, churns: u64, mode: &[&str]) -> Result<(u64, f64)> {
    let started = Instant::now();
    let children: Vec<Child> = (0..procs)
        .map(|_| {
            Command::new(workload)
                .args(["1", &churns.to_string()])
                .args(mode)
                .stdout(Stdio::piped())
                .spawn()
                .context("failed to start kvm_workload")
        })
        .collect::<Result<_>>()?;
    let mut total = 0;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("kvm_workload failed ({})", out.status);
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        total += v["memslot_deletions"].as_u64().unwrap_or(0);
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

/// The last JSON line of `text` with `"record":"summary"`.
fn summary(text: &str) -> Result<Value> {
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["record"] == "summary")
        .context("no summary record")
}

fn tracer_cmd(tracer: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(tracer);
    c.args(args);
    c
}

/// `tracer simulate ARGS --record DIR` into a fresh `dir`.
fn simulate(tracer: &Path, dir: &Path, args: &[&str]) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    crate::run(
        tracer_cmd(tracer, &["simulate"])
            .args(args)
            .arg("--record")
            .arg(dir)
            .stdout(Stdio::null()),
    )?;
    Ok(())
}

/// `tracer run` with its log in a fresh `work/NAME` and its stderr in
/// `work/NAME.err`, plus `args`; returns once every probe is attached.
fn daemon(tracer: &Path, work: &Path, name: &str, args: &[&str]) -> Result<Proc> {
    let log = work.join(name);
    let _ = std::fs::remove_dir_all(&log);
    let mut t = Proc::spawn(
        tracer_cmd(tracer, &["run", "--log-dir"])
            .arg(&log)
            .args(args),
        Stdio::null(),
        &work.join(format!("{name}.err")),
    )?;
    t.wait_attached()?;
    Ok(t)
}

// ---------------------------------------------------------------------------
// Sections

/// Costs from a summary's `bpf_cost`, as figures.
fn add_costs(r: &mut Report, section: &'static str, costs: &[Value]) {
    for c in costs {
        let program = c["program"].as_str().unwrap_or("?");
        let runs = c["run_count"].as_u64().unwrap_or(0);
        let Some(ns) = c["ns_per_run"].as_f64() else {
            r.add(section, format!("{program} ns/run"), 0.0, "ns");
            r.note(format!(
                "never ran here ({})",
                c["target"].as_str().unwrap_or("")
            ));
            continue;
        };
        let floor = c["floor_ns_per_run"].as_f64();
        r.add(section, format!("{program} ns/run"), ns, "ns");
        r.note(format!(
            "{runs} runs on {} {}; empty program there: {}",
            c["attach"].as_str().unwrap_or(""),
            c["target"].as_str().unwrap_or(""),
            floor.map_or("-".into(), |f| format!("{f:.1} ns/run"))
        ));
        if let Some(ratio) = c["ratio_to_floor"].as_f64() {
            r.add(section, format!("{program} / empty program"), ratio, "x");
            if program == "kvm_entry_gate" {
                r.target("<= 1.5x", ratio <= 1.5);
            }
        }
    }
}

/// This host: memslot churn with vCPU runs between (zap raw tracepoint,
/// sys_exit sampling). The kvm_entry gate never fires here (PVM).
fn host_costs(tracer: &Path, workload: &Path, work: &Path, r: &mut Report) -> Result<()> {
    let out = work.join("host-watch.jsonl");
    let mut t = Proc::spawn(
        &mut tracer_cmd(tracer, &["watch", "--json", "--baseline"]),
        Stdio::from(std::fs::File::create(&out)?),
        &work.join("host-watch.err"),
    )?;
    t.wait_attached()?;
    let (n, secs) = churn(workload, 2, 2000, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    t.stop(libc::SIGINT)?;
    let s = summary(&std::fs::read_to_string(&out)?)?;
    eprintln!("bench: host: {n} memslot deletions with vCPU runs in {secs:.2} s");
    let costs = s["bpf_cost"].as_array().cloned().unwrap_or_default();
    add_costs(r, "in-kernel cost (host)", &costs);
    r.raw.insert("host_bpf_cost".into(), Value::Array(costs));
    Ok(())
}

/// Debian 6.18 in QEMU (TCG, nested SVM): kprobes and the kvm_entry gate.
/// TCG inflates every time; the ratios to the empty programs are the
/// figures that carry over.
fn vm_costs(root: &Path, r: &mut Report) -> Result<()> {
    // Few zaps (a storm is a finding), many guest entries.
    let w = Workload {
        vcpus: 2,
        churns: 3,
        extra_runs: 500,
        baseline: true,
        inject: false,
    };
    let o = vmtest::boot_one(root, "6.18", Duration::from_mins(15), w)?;
    if !o.failures.is_empty() {
        bail!(
            "the guest run failed: {} (serial log {})",
            o.failures.join("; "),
            o.serial_log.display()
        );
    }
    eprintln!(
        "bench: QEMU {}: {} guest entries, {:.1} s",
        o.release, o.entries, o.boot_s
    );
    add_costs(r, "in-kernel cost (QEMU)", &o.costs);
    r.raw.insert(
        "vm_bpf_cost".into(),
        json!({ "kernel": o.release, "costs": o.costs, "kvm_entry_entries": o.entries }),
    );
    Ok(())
}

/// The kvm_entry gate on this host's CPU through BPF_PROG_TEST_RUN on a real
/// guest's vCPUs (kvm:kvm_entry never fires on this PVM host).
fn gate_native(gate_cost: &Path, r: &mut Report) -> Result<()> {
    const SECTION: &str = "kvm_entry gate (native)";
    let out = crate::run(Command::new(gate_cost).arg("220000"))?;
    let v: Value = serde_json::from_str(&out).context("gate_cost output")?;
    for (key, what) in [
        ("fast_path", "fast path (same vCPU, same roots)"),
        ("alternating_vcpus", "2 vCPUs alternating on one CPU"),
    ] {
        let fig = &v[key];
        let gate = fig["kvm_entry_gate"].as_f64().context("no gate figure")?;
        let empty = fig["floor_kvm_entry"].as_f64().context("no floor figure")?;
        let ratio = fig["ratio"].as_f64().context("no ratio")?;
        r.add(SECTION, format!("{what}: gate ns/run"), gate, "ns");
        r.note(format!(
            "empty program on the same hook, interleaved: {empty:.1} ns/run"
        ));
        r.add(SECTION, format!("{what}: gate / empty program"), ratio, "x");
        r.note(format!(
            "median of 11 blocks; range {:.2}..{:.2}",
            fig["ratio_min"].as_f64().unwrap_or(0.0),
            fig["ratio_max"].as_f64().unwrap_or(0.0)
        ));
        if key == "fast_path" {
            r.target("<= 1.5x", ratio <= 1.5);
        }
    }
    r.raw.insert("gate_native".into(), v);
    Ok(())
}

/// Launch to every probe attached, five times; the median.
fn startup(tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    let mut times = Vec::new();
    for i in 0..5 {
        let err = work.join(format!("startup-{i}.err"));
        let started = Instant::now();
        let mut t = Proc::spawn(
            &mut tracer_cmd(tracer, &["watch", "--json"]),
            Stdio::null(),
            &err,
        )?;
        t.wait_attached()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        t.stop(libc::SIGINT)?;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    r.add(
        "start-up",
        "launch to all probes attached (median of 5)",
        median,
        "ms",
    );
    r.note(format!(
        "min {:.0} ms, max {:.0} ms (measured from spawn to the \"attached\" line)",
        times[0],
        times[times.len() - 1]
    ));
    r.target("< 100 ms", median < 100.0);
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One metric's value from the daemon's /metrics.
fn scrape(port: u16, metric: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| {
        l.strip_prefix(metric)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Daemon RSS idle, and with 10,000 vCPUs tracked (model events injected).
fn memory(tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let t = daemon(tracer, work, "mem-log", &["--metrics-listen", &listen])?;
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = rss_kib(t.pid())?;
    t.stop(libc::SIGTERM)?;
    r.add(
        "memory",
        "daemon RSS, idle (tracer run)",
        rss as f64 / 1024.0,
        "MiB",
    );
    r.note("the ring buffer map (4 MiB) counts once mapped");
    r.add(
        "memory",
        "daemon peak RSS, start-up included (VmHWM)",
        hwm as f64 / 1024.0,
        "MiB",
    );
    r.target("<= 32 MiB", hwm <= 32 * 1024);

    // 3 VMs x 3334 vCPUs from the model.
    let sim = work.join("mem-sim");
    simulate(
        tracer,
        &sim,
        &["--scenario", "steady", "--vcpus", "3334", "--rounds", "3"],
    )?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let t = daemon(
        tracer,
        work,
        "mem-log-10k",
        &[
            "--metrics-listen",
            &listen,
            "--inject",
            &sim.to_string_lossy(),
        ],
    )?;
    let started = Instant::now();
    let tracked = loop {
        let v = scrape(port, "kvm_root_tracer_tracked_vcpus").unwrap_or(0.0);
        if v >= 10_000.0 {
            break v;
        }
        if started.elapsed() > Duration::from_mins(1) {
            bail!("the daemon tracks {v} vCPUs, not 10,000, after 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(1));
    let (rss, hwm) = rss_kib(t.pid())?;
    t.stop(libc::SIGTERM)?;
    r.add(
        "memory",
        format!("daemon RSS, {tracked:.0} vCPUs tracked"),
        rss as f64 / 1024.0,
        "MiB",
    );
    r.note(format!("peak {:.1} MiB", hwm as f64 / 1024.0));
    r.target("<= 32 MiB", rss <= 32 * 1024);
    Ok(())
}

/// The criterion benches, short runs; events/s from their own estimates.
fn userspace(root: &Path, r: &mut Report) -> Result<()> {
    let rows = criterion(root, "pipeline")?;
    for (name, per_s) in rows {
        r.add("userspace (1 core)", name.clone(), per_s, "events/s");
        if name == "decode+detect" {
            r.target(">= 2,000,000/s", per_s >= 2e6);
        }
    }
    Ok(())
}

/// Runs one criterion bench of the tracer, short; (name, elements per
/// second) from criterion's own estimates, fastest first.
fn criterion(root: &Path, bench: &str) -> Result<Vec<(String, f64)>> {
    let crit = root.join("target/criterion").join(bench);
    let _ = std::fs::remove_dir_all(&crit);
    crate::cargo(
        root,
        &[
            "bench",
            "--package",
            "tracer",
            "--bench",
            bench,
            "--",
            "--warm-up-time",
            "1",
            "--measurement-time",
            "3",
        ],
    )?;
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(&crit)? {
        let dir = entry?.path();
        let Ok(b) = std::fs::read_to_string(dir.join("new/benchmark.json")) else {
            continue;
        };
        let b: Value = serde_json::from_str(&b)?;
        let e: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("new/estimates.json"))?)?;
        let elements = b["throughput"]["Elements"]
            .as_f64()
            .context("no throughput")?;
        let ns = e["mean"]["point_estimate"].as_f64().context("no mean")?;
        let name = b["function_id"].as_str().unwrap_or("?").to_owned();
        rows.push((name, elements / (ns * 1e-9)));
    }
    if rows.is_empty() {
        bail!("criterion wrote no estimates under {}", crit.display());
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(rows)
}

/// `tracer top` with 100 VMs of 64 vCPUs: frame time (criterion, test
/// backend), and the real binary's CPU use replaying the model's `fleet`
/// log in a 150x50 tmux window.
fn top(root: &Path, tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    const SECTION: &str = "tracer top, 100 VMs x 64";
    for (name, per_s) in criterion(root, "top")? {
        if name.starts_with("frame") {
            r.add(
                SECTION,
                "frame time (200x60, test backend)",
                1e3 / per_s,
                "ms",
            );
        } else {
            r.add(SECTION, name, per_s, "events/s");
        }
    }
    crate::apt_install(&[("/usr/bin/tmux", "tmux")])?;
    let log = work.join("top-fleet");
    simulate(
        tracer,
        &log,
        &["--scenario", "fleet", "--vcpus", "64", "--rounds", "100"],
    )?;
    let socket = format!("tracer-bench-{}", std::process::id());
    let tmux = |args: &[&str]| {
        crate::run(
            Command::new("tmux")
                .args(["-L", &socket, "-f", "/dev/null"])
                .args(args),
        )
    };
    // The model log spans about 320 s: at 20x it plays for about 16 s.
    let cmd = format!(
        "{} top --replay {} --speed 20",
        tracer.display(),
        log.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "50",
        &cmd,
    ])?;
    let result = (|| -> Result<(f64, String)> {
        std::thread::sleep(Duration::from_secs(2));
        let mut pid: u32 = tmux(&["display", "-p", "-t", "top", "#{pane_pid}"])?
            .trim()
            .parse()?;
        // The pane may run a shell that runs tracer.
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))?.trim() != "tracer" {
            pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?
                .split_whitespace()
                .next()
                .context("the pane runs no tracer")?
                .parse()?;
        }
        let cpu0 = cpu_seconds(pid)?;
        std::thread::sleep(Duration::from_secs(10));
        let cpu1 = cpu_seconds(pid)?;
        let screen = tmux(&["capture-pane", "-p", "-t", "top"])?;
        Ok((cpu1 - cpu0, screen))
    })();
    let _ = tmux(&["kill-server"]);
    let (cpu, screen) = result?;
    if !screen.contains("VMs 100 (25 TDX)") {
        bail!("tracer top did not show the fleet:\n{screen}");
    }
    r.add(
        SECTION,
        "CPU while replaying at 20x (5 frames/s)",
        cpu / 10.0 * 100.0,
        "% core",
    );
    r.note("the real binary in tmux, 150x50, over 10 s of playback");
    std::fs::write(work.join("top-screen.txt"), &screen)?;
    Ok(())
}

/// `tracer replay` over a model log of ~120k events, and its size on disk,
/// zstd-compressed (as the daemon leaves closed segments) and not.
fn replay(tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    // On-disk bytes of a fresh model log.
    let recorded = |dir: &Path, extra: &[&str]| -> Result<u64> {
        let mut args = vec!["--scenario", "churn", "--vcpus", "64", "--rounds", "200"];
        args.extend_from_slice(extra);
        simulate(tracer, dir, &args)?;
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum())
    };
    let dir = work.join("replay-log");
    let compressed = recorded(&dir, &[])?;
    let raw = recorded(&work.join("replay-log-raw"), &["--no-compress"])?;
    let started = Instant::now();
    let o = Command::new(tracer)
        .args(["replay", "--json"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let secs = started.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr);
    // "tracer: replayed N event(s) from …"
    let events: f64 = err
        .split("replayed ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no event count in replay's output: {err}"))?;
    r.add(
        "replay",
        "tracer replay (zstd segments, parse, detect)",
        events / secs,
        "events/s",
    );
    r.note(format!(
        "{events:.0} model events in {secs:.2} s, the whole process"
    ));
    r.target(">= 1 M events/s", events / secs >= 1e6);
    r.add(
        "replay",
        "bytes per event on disk (zstd)",
        compressed as f64 / events,
        "B",
    );
    r.add(
        "replay",
        "bytes per event, uncompressed JSON",
        raw as f64 / events,
        "B",
    );
    Ok(())
}

/// bpftrace (Debian's package) and the tracer on the same tracepoint, in
/// one run, under the heaviest memslot churn this host drives.
fn versus_bpftrace(
    tracer: &Path,
    workload: &Path,
    work: &Path,
    churns: u64,
    r: &mut Report,
) -> Result<()> {
    crate::apt_install(&[("/usr/bin/bpftrace", "bpftrace")])?;
    if !Path::new("/sys/kernel/tracing/events/kvmmmu").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
    if !Path::new("/sys/kernel/tracing/events/kvmmmu/kvm_mmu_zap_all_fast").is_dir() {
        bail!("tracefs has no kvmmmu:kvm_mmu_zap_all_fast here; bpftrace needs its format");
    }
    // Per-program run time for both tools while this runs.
    let stats_path = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let stats_before = std::fs::read_to_string(stats_path).unwrap_or_default();
    std::fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled")?;
    let result = versus_inner(tracer, workload, work, churns, r);
    let _ = std::fs::write(stats_path, stats_before.trim());
    result
}

fn versus_inner(
    tracer: &Path,
    workload: &Path,
    work: &Path,
    churns: u64,
    r: &mut Report,
) -> Result<()> {
    const SECTION: &str = "vs bpftrace (zap churn)";
    let bt_out = work.join("bpftrace.jsonl");
    let script = "tracepoint:kvmmmu:kvm_mmu_zap_all_fast { printf(\"%llu %d %d %s %u %u\\n\", \
                  nsecs, pid, tid, comm, args->mmu_valid_gen, args->mmu_used_pages); }";
    let mut bt = Proc::spawn(
        Command::new("bpftrace").args(["-f", "json", "-e", script]),
        Stdio::from(std::fs::File::create(&bt_out)?),
        &work.join("bpftrace.err"),
    )?;
    bt.wait_for(&bt_out, "attached_probes", Duration::from_mins(1))?;
    let log = work.join("vs-log");
    let t = daemon(
        tracer,
        work,
        "vs-log",
        &["--metrics-listen", "", "--no-compress"],
    )?;
    // Start-up (BTF parsing, LLVM) is not what we compare.
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = (bt.cpu_s()?, t.cpu_s()?);
    let bpf0 = (bpf_run_time(bt.pid())?, bpf_run_time(t.pid())?);
    let (deletions, secs) = churn(workload, 2, churns, &["churn-only"])?;
    // Both drain (the tracer polls every 100 ms).
    std::thread::sleep(Duration::from_secs(1));
    let cpu1 = (bt.cpu_s()?, t.cpu_s()?);
    let bpf1 = (bpf_run_time(bt.pid())?, bpf_run_time(t.pid())?);
    let terr = t.stop(libc::SIGTERM)?;
    // bpftrace prints what it holds before it exits: give it time.
    bt.stop_within(libc::SIGINT, Duration::from_mins(2))?;

    let rate = deletions as f64 / secs;
    let (bt_events, bt_lost) = bpftrace_counts(&bt_out)?;
    let (tr_events, tr_lost) = tracer_counts(&log, &terr)?;
    let bt_cpu = cpu1.0 - cpu0.0;
    let tr_cpu = cpu1.1 - cpu0.1;
    let bt_kernel = (bpf1.0.0 - bpf0.0.0) as f64 / 1e9;
    let tr_kernel = (bpf1.1.0 - bpf0.1.0) as f64 / 1e9;

    r.add(
        SECTION,
        "memslot deletions (2 processes)",
        deletions as f64,
        "zaps",
    );
    r.note(format!(
        "{rate:.0} zaps/s over {secs:.2} s: the heaviest churn this host drives"
    ));
    r.add(
        SECTION,
        "bpftrace events captured",
        bt_events as f64,
        "events",
    );
    r.add(SECTION, "bpftrace events lost", bt_lost as f64, "events");
    r.add(
        SECTION,
        "tracer events captured",
        tr_events as f64,
        "events",
    );
    r.add(SECTION, "tracer events lost", tr_lost as f64, "events");
    r.target("0 lost", tr_lost == 0 && tr_events == deletions);
    r.add(SECTION, "bpftrace CPU (user+sys, process)", bt_cpu, "s");
    r.add(SECTION, "tracer CPU (user+sys, process)", tr_cpu, "s");
    r.target("< bpftrace", tr_cpu < bt_cpu);
    r.add(SECTION, "bpftrace in-kernel BPF time", bt_kernel, "s");
    r.add(
        SECTION,
        "tracer in-kernel BPF time (all programs)",
        tr_kernel,
        "s",
    );
    r.note("includes kvm_run_exit on every syscall of the host, which bpftrace does not run");
    r.raw.insert(
        "versus_bpftrace".into(),
        json!({
            "deletions": deletions, "seconds": secs,
            "bpftrace": { "events": bt_events, "lost": bt_lost, "cpu_s": bt_cpu, "bpf_s": bt_kernel, "bpf_runs": bpf1.0.1 - bpf0.0.1 },
            "tracer": { "events": tr_events, "lost": tr_lost, "cpu_s": tr_cpu, "bpf_s": tr_kernel, "bpf_runs": bpf1.1.1 - bpf0.1.1 },
            "bpftrace_script": script,
        }),
    );
    Ok(())
}

/// bpftrace's `-f json` output: printf records, and lost-event records.
fn bpftrace_counts(out: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(out)?;
    let (mut events, mut lost) = (0u64, 0u64);
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        match v["type"].as_str() {
            Some("printf") => events += 1,
            Some("lost_events") => lost += v["data"]["events"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    Ok((events, lost))
}

/// The tracer's zap events in its log (plain JSON lines), and its losses
/// from its summary: ring-buffer drops plus records the log writer dropped.
fn tracer_counts(log: &Path, stderr: &str) -> Result<(u64, u64)> {
    let mut events = 0u64;
    for e in std::fs::read_dir(log)? {
        let text = std::fs::read_to_string(e?.path())?;
        events += text
            .lines()
            .filter(|l| {
                l.contains("\"record\":\"event\"") && l.contains("\"kind\":\"zap_all_fast\"")
            })
            .count() as u64;
    }
    let after = |marker: &str| -> Result<u64> {
        stderr
            .split(marker)
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no count after {marker:?} in the tracer's summary"))
    };
    // "… N event(s), D dropped (ring buffer full)" and
    // "event log: … in S segment(s), D dropped".
    Ok((events, after("event(s), ")? + after("segment(s), ")?))
}
