//! `tracer watch`: attach, stream decoded events, detach, summarize.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use common::ProbeId;

use crate::{
    Failure,
    detector::{Detector, DetectorConfig, Finding, FindingKind},
    doctor::kernel_failure,
    event::{Event, Kind},
    kernel::{self, KernelInfo, PlanOptions},
    loader::{Counters, Session},
};

pub struct WatchOptions {
    /// When the process started, for the time-to-attached figure.
    pub launched: Instant,
    pub json: bool,
    pub duration: Option<Duration>,
    pub ringbuf_bytes: u32,
    pub entry_transitions: bool,
}

pub fn run(opts: &WatchOptions) -> Result<(), Failure> {
    // SAFETY: geteuid has no preconditions and can't fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::unsupported(anyhow!(
            "tracer watch must run as root (it loads eBPF programs: CAP_BPF, CAP_PERFMON); \
             `tracer doctor` works without root"
        )));
    }
    let info = KernelInfo::live().map_err(kernel_failure)?;
    let plan = kernel::plan::plan(
        &info,
        PlanOptions {
            entry_transitions: opts.entry_transitions,
        },
    );
    if plan.attached().next().is_none() {
        return Err(Failure::unsupported(anyhow!(
            "no probe can attach on this kernel; run `tracer doctor` for the reasons"
        )));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(watch(&plan, opts))
}

/// What the stream saw, for the summary.
#[derive(Default)]
struct Tally {
    by_kind: BTreeMap<Kind, u64>,
    decode_errors: u64,
    findings: BTreeMap<FindingKind, u64>,
}

/// The live pipeline after decoding: detector, counts, output.
struct Pipeline {
    detector: Detector,
    findings: Vec<Finding>,
    tally: Tally,
    out: Output,
}

impl Pipeline {
    fn event(&mut self, ev: &Event) {
        *self.tally.by_kind.entry(ev.kind).or_default() += 1;
        self.out.event(ev);
        self.detector.observe(ev, &mut self.findings);
        for f in self.findings.drain(..) {
            *self.tally.findings.entry(f.kind).or_default() += 1;
            self.out.finding(&f);
        }
    }
}

struct Output {
    out: io::BufWriter<io::Stdout>,
    json: bool,
    /// stdout was closed (e.g. `| head`): stop writing, keep counting.
    closed: bool,
}

impl Output {
    fn event(&mut self, ev: &Event) {
        if self.closed {
            return;
        }
        let r = if self.json {
            writeln!(self.out, "{}", ev.to_json_record())
        } else {
            writeln!(self.out, "{}", ev.to_line())
        };
        if r.is_err() {
            self.closed = true;
        }
    }

    fn finding(&mut self, f: &Finding) {
        if self.closed {
            return;
        }
        let r = if self.json {
            writeln!(self.out, "{}", f.to_json_record())
        } else {
            write!(self.out, "{}", f.to_text())
        };
        if r.is_err() {
            self.closed = true;
        }
    }

    fn flush(&mut self) {
        if !self.closed && self.out.flush().is_err() {
            self.closed = true;
        }
    }
}

fn drain(rb: &mut RingBuf<MapData>, p: &mut Pipeline) {
    while let Some(item) = rb.next() {
        match Event::decode(&item) {
            Ok(ev) => p.event(&ev),
            Err(e) => {
                p.tally.decode_errors += 1;
                log::warn!("undecodable ring-buffer record: {e}");
            }
        }
    }
    p.out.flush();
}

/// Says on stderr what attached, what failed and what is off.
fn report_attach(
    session: &Session,
    plan: &kernel::AttachPlan,
    opts: &WatchOptions,
) -> Result<(), Failure> {
    for (probe, kind, target) in &session.attached {
        eprintln!(
            "tracer: attached {kind:<14} {:<28} -> {target}",
            probe.program_name()
        );
    }
    for f in &session.failures {
        eprintln!(
            "tracer: FAILED   {:<14} {:<28} -> {}: {}",
            f.attach.to_string(),
            f.program,
            f.target,
            f.error
        );
    }
    if session.attached.is_empty() {
        return Err(anyhow!("no probe attached; see the failures above").into());
    }
    for p in plan
        .probes
        .iter()
        .filter(|p| p.attach == kernel::AttachKind::Off)
    {
        eprintln!("tracer: off      {:<28} {}", p.program, p.reason);
    }
    eprintln!(
        "tracer: attached {} probe(s) in {} ms ({} ms since launch); streaming{}",
        session.attached.len(),
        session.attach_time.as_millis(),
        opts.launched.elapsed().as_millis(),
        opts.duration
            .map_or(", Ctrl-C to stop".to_owned(), |d| format!(" for {d:?}"))
    );
    Ok(())
}

async fn watch(plan: &kernel::AttachPlan, opts: &WatchOptions) -> Result<(), Failure> {
    let mut session = Session::start(plan, opts.ringbuf_bytes).map_err(Failure::from)?;
    report_attach(&session, plan, opts)?;

    let rb = session.take_events().map_err(Failure::from)?;
    // SAFETY: the ring buffer owns its map fd (an OwnedFd inside MapData),
    // which stays open and unchanged until the AsyncFd drops it.
    let mut events = unsafe { AsyncFd::register_with_interest(rb, Interest::READABLE) }
        .map_err(|e| anyhow!("ring buffer fd: {e}"))?;
    let mut logs = match session.logger.take() {
        // SAFETY: as above, the logger owns its ring buffer's fd.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow!("log ring buffer fd: {e}"))?,
        ),
        None => None,
    };
    let mut p = Pipeline {
        detector: Detector::new(DetectorConfig::default()),
        findings: Vec::new(),
        tally: Tally::default(),
        out: Output {
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            json: opts.json,
            closed: false,
        },
    };
    let started = Instant::now();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);

    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                drain(guard.get_inner_mut(), &mut p);
                guard.clear_ready();
            }
            guard = async {
                match logs.as_mut() {
                    Some(l) => l.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard.context("log ring buffer poll")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            () = &mut sleep => break,
        }
        if p.out.closed {
            break;
        }
    }
    // Nothing recorded is lost: drain what is left before detaching.
    drain(events.get_mut(), &mut p);
    let counters = session.counters().map_err(Failure::from)?;
    let elapsed = started.elapsed();
    let gate_attached = session
        .attached
        .iter()
        .any(|(p, _, _)| *p == ProbeId::KvmEntry);
    drop(session);
    summarize(&mut p.out, &p.tally, &counters, elapsed);
    if let Some(warning) = blind_gate(gate_attached, &counters) {
        eprintln!("tracer: warning: {warning}");
    }
    Ok(())
}

/// The `kvm_entry` gate is blind when vCPUs ran but it saw no guest entry:
/// some KVM backends (PVM, for one) never fire `kvm:kvm_entry`.
pub fn blind_gate(gate_attached: bool, counters: &Counters) -> Option<String> {
    let runs = counters
        .probes
        .iter()
        .find(|(name, _)| *name == ProbeId::KvmRunExit.program_name())
        .map_or(0, |(_, c)| c.hits);
    (gate_attached && counters.entry.entries == 0 && runs > 0).then(|| {
        format!(
            "vCPUs ran ({runs} KVM_RUN calls returned) but kvm:kvm_entry never fired: this KVM \
             backend does not trace guest entries (e.g. PVM), so the in-kernel entry check is \
             blind here; roots are still sampled at each KVM_RUN exit"
        )
    })
}

fn summarize(out: &mut Output, tally: &Tally, counters: &Counters, elapsed: Duration) {
    let total: u64 = tally.by_kind.values().sum();
    let dropped = counters.reserve_failed();
    if out.json {
        let summary = serde_json::json!({
            "record": "summary",
            "duration_s": elapsed.as_secs_f64(),
            "events": tally.by_kind.iter().map(|(k, v)| (k.name(), v)).collect::<BTreeMap<_, _>>(),
            "events_total": total,
            "decode_errors": tally.decode_errors,
            "findings": tally.findings.iter().map(|(k, v)| (k.name(), v)).collect::<BTreeMap<_, _>>(),
            "dropped": dropped,
            "probes": counters.probes.iter().map(|(name, c)| serde_json::json!({
                "program": name,
                "hits": c.hits,
                "emitted": c.emitted,
                "reserve_failed": c.reserve_failed,
                "read_failed": c.read_failed,
                "unpaired": c.unpaired,
            })).collect::<Vec<_>>(),
            "kvm_entry": {
                "entries": counters.entry.entries,
                "tdx_entries": counters.entry.tdx_entries,
                "forbidden_entries": counters.entry.forbidden_entries,
                "slow_path": counters.entry.slow_path,
            },
        });
        if !out.closed {
            let _ = writeln!(out.out, "{summary}");
        }
        out.flush();
    }
    let mut e = io::stderr().lock();
    let _ = writeln!(
        e,
        "tracer: detached after {:.1}s: {total} event(s), {dropped} dropped (ring buffer full), {} undecodable",
        elapsed.as_secs_f64(),
        tally.decode_errors
    );
    for (k, v) in &tally.by_kind {
        let _ = writeln!(e, "  {:<20} {v}", k.name());
    }
    let nfindings: u64 = tally.findings.values().sum();
    let _ = writeln!(e, "  findings: {nfindings}");
    for (k, v) in &tally.findings {
        let _ = writeln!(e, "    {:<36} {v}", k.name());
    }
    let _ = writeln!(
        e,
        "  {:<28} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "program", "hits", "emitted", "dropped", "badread", "unpaired"
    );
    for (name, c) in &counters.probes {
        if c.hits + c.emitted + c.reserve_failed + c.unpaired == 0 {
            continue;
        }
        let _ = writeln!(
            e,
            "  {name:<28} {:>10} {:>10} {:>8} {:>8} {:>8}",
            c.hits, c.emitted, c.reserve_failed, c.read_failed, c.unpaired
        );
    }
    let _ = writeln!(
        e,
        "  kvm_entry gate: {} entries, {} TDX, {} forbidden, {} slow path",
        counters.entry.entries,
        counters.entry.tdx_entries,
        counters.entry.forbidden_entries,
        counters.entry.slow_path
    );
}
