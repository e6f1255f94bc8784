//! The live loop of `tracer watch` and of the daemon (`tracer run`): plan,
//! attach and drain through `live`, detect, stream and/or record, serve
//! metrics and push alerts, reload on SIGHUP; detach and summarize.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use common::ProbeId;

use crate::{
    Failure,
    alerts::AlertTask,
    doctor::kernel_failure,
    kernel::{self, PlanOptions},
    live,
    loader::{Counters, Session},
    log::{
        ClockPair, Header, PlanEntry,
        sink::LogSink,
        writer::{RecordConfig, Recorder},
    },
    metrics::{MetricsState, SharedMetrics, SharedWeb},
    pipeline::{FlightRecorder, Output, Pipeline},
};

mod services;
mod summary;

use services::{Services, count_attached, inject, start_metrics, start_service, update_metrics};
pub use summary::blind_gate;
use summary::{print_log_stats, summarize};

/// Where and how to record the event log.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub dir: PathBuf,
    pub config: RecordConfig,
    /// Events per VM kept for incident files (0: no incident files).
    pub flight_events: usize,
}

impl RecordOptions {
    /// The event log in `dir`, with the settings of `log`.
    pub fn new(dir: PathBuf, log: &crate::config::LogConfig) -> Self {
        Self {
            dir,
            config: log.record_config(),
            flight_events: log.flight_events,
        }
    }
}

/// What the daemon adds to `watch`: metrics, alerts, findings output, and
/// recorded events injected into the live pipeline (to try alert routing).
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS and basic auth of the metrics endpoint.
    pub web: Option<crate::web::WebServer>,
    pub alertmanager: Option<crate::alerts::Prepared>,
    /// The `host` label of alerts.
    pub host: String,
    /// `-` or a file: findings as JSON lines.
    pub findings_out: Option<String>,
    pub inject: Vec<PathBuf>,
    /// The config the daemon started with, and how to read it again on
    /// SIGHUP (`tracer run --config`).
    pub config: Option<crate::config::Config>,
    pub reload: Option<crate::reload::Reloader>,
}

/// What goes to stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Nothing: the daemon (`run`), which also waits for KVM to appear.
    Off,
    /// `watch`: readable lines.
    Readable,
    /// `watch --json`: JSON lines.
    Json,
}

impl Stream {
    fn output(self) -> Option<Output> {
        match self {
            Self::Off => None,
            Self::Readable => Some(Output::new(false)),
            Self::Json => Some(Output::new(true)),
        }
    }
}

pub struct WatchOptions {
    /// When the process started, for the time-to-attached figure.
    pub launched: Instant,
    pub stream: Stream,
    pub duration: Option<Duration>,
    pub ringbuf_bytes: u32,
    /// Wake the reader once this many bytes wait (0: every event).
    pub wakeup_bytes: u32,
    /// Drain the ring buffer at least this often.
    pub poll_interval: Duration,
    /// Attach an empty program beside each probe and report the cost ratio.
    pub baseline: bool,
    pub entry_transitions: bool,
    /// Try the kvm_entry gate as a BTF-enabled tracepoint first.
    pub entry_gate_btf: bool,
    /// Findings printed at least this severe.
    pub min_severity: crate::detector::Severity,
    /// Times, width and colour of the readable output.
    pub style: crate::human::Style,
    pub record: Option<RecordOptions>,
    pub service: ServiceOptions,
}

pub fn run(opts: &WatchOptions) -> Result<(), Failure> {
    live::require_capabilities(
        "tracer",
        "load and attach eBPF programs (root has them; so does \
         `setpriv --ambient-caps=+bpf,+perfmon`); `tracer doctor` works without them",
    )?;
    live::one_heap();
    crate::loader::prepare();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(async {
        let metrics: SharedMetrics = Arc::new(Mutex::new(MetricsState::default()));
        // The endpoint is up before anything else, so that a host without
        // KVM yet is seen waiting (503), not silent.
        let web = start_metrics(&opts.service, &metrics);
        let plan = match live::plan(&live::kernel_root(), plan_options(opts)) {
            Ok(plan) => plan,
            // The daemon waits for KVM; `watch` says what is missing.
            Err(e @ kernel::KernelError::NoKvm { .. }) if opts.stream == Stream::Off => {
                match wait_for_kvm(opts, &metrics, &e).await? {
                    Some(plan) => plan,
                    None => return Ok(()),
                }
            }
            Err(e) => return Err(kernel_failure(e)),
        };
        live::require_probes(&plan)?;
        metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .kernel_release
            .clone_from(&plan.kernel_release);
        watch(&plan, opts, metrics, web).await
    })
}

fn plan_options(opts: &WatchOptions) -> PlanOptions {
    PlanOptions {
        entry_transitions: opts.entry_transitions,
        entry_gate_btf: opts.entry_gate_btf,
        wakeup_bytes: opts.wakeup_bytes,
    }
}

/// How often a daemon without KVM looks again.
pub const KVM_RETRY: Duration = Duration::from_secs(5);

/// A daemon started before KVM (module not loaded yet) waits for it rather
/// than exit: `/healthz` answers 503 with the reason and
/// `kvm_root_tracer_tracing` is 0 until KVM is there. `None`: stopped
/// (signal, `--duration`) while waiting.
async fn wait_for_kvm(
    opts: &WatchOptions,
    metrics: &SharedMetrics,
    first: &kernel::KernelError,
) -> Result<Option<kernel::AttachPlan>, Failure> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let set_waiting = |why: String| {
        let mut m = metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.tracing = false;
        m.waiting = Some(why);
    };
    eprintln!(
        "tracer: warning: {first}; waiting for KVM (looking again every {} s; /healthz answers \
         503 until then)",
        KVM_RETRY.as_secs()
    );
    set_waiting(first.to_string());
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let stop = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = tokio::time::sleep(KVM_RETRY) => {}
            _ = sigint.recv() => return Ok(None),
            _ = sigterm.recv() => return Ok(None),
            () = &mut stop => return Ok(None),
        }
        match live::plan(&live::kernel_root(), plan_options(opts)) {
            Ok(plan) => {
                eprintln!("tracer: KVM is there now; attaching");
                return Ok(Some(plan));
            }
            Err(e @ kernel::KernelError::NoKvm { .. }) => set_waiting(e.to_string()),
            Err(e) => return Err(kernel_failure(e)),
        }
    }
}

/// The attach plan as the log header records it: how each probe attached
/// (the kvm_entry gate as a BTF or a raw tracepoint), the plan's kind for
/// the others.
pub fn plan_entries(plan: &kernel::AttachPlan, session: &Session) -> Vec<PlanEntry> {
    plan.probes
        .iter()
        .map(|p| PlanEntry {
            program: p.program.to_owned(),
            target: p.target.clone(),
            attach: session.attach_kind(p.probe).unwrap_or(p.attach).to_string(),
        })
        .collect()
}

/// Builds the pipeline: stdout stream, recorder and flight recorder.
pub fn build_pipeline(
    stream: Stream,
    record: Option<&RecordOptions>,
    header: Header,
    live_clock: bool,
) -> Result<Pipeline, Failure> {
    let (recorder, flight) = match record {
        Some(r) => {
            let recorder = Recorder::open(&r.dir, r.config, header.clone(), live_clock)
                .context("can't record the event log")?;
            // Live, a full queue drops (counted) rather than stall the ring
            // buffer; a simulation waits for the disk.
            let recorder = LogSink::spawn(recorder, !live_clock)
                .context("can't start the event log's thread")?;
            let flight =
                (r.flight_events > 0).then(|| FlightRecorder::new(r.flight_events, header));
            (Some(recorder), flight)
        }
        None => (None, None),
    };
    Ok(Pipeline::new(stream.output(), recorder, flight))
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
    for f in &session.fallbacks {
        eprintln!(
            "tracer: fallback {:<14} {:<28} -> refused ({}); attached as {} instead",
            f.tried.to_string(),
            f.program,
            f.error,
            f.attached
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
        if session.failures.iter().all(|f| f.cause.is_refused()) && !session.failures.is_empty() {
            return Err(Failure::unsupported(anyhow!(
                "no probe attached: the kernel refused every one (EPERM/EACCES) although \
                 CAP_BPF and CAP_PERFMON are held: kernel lockdown, an LSM, or a seccomp filter"
            )));
        }
        return Err(anyhow!("no probe attached; see the failures above").into());
    }
    for p in plan
        .probes
        .iter()
        .filter(|p| p.attach == kernel::AttachKind::Off)
    {
        eprintln!("tracer: off      {:<28} {}", p.program, p.reason);
    }
    if let Some(r) = &opts.record {
        eprintln!("tracer: recording the event log in {}", r.dir.display());
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

type Logs = AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>;

/// The event ring buffer and the programs' log buffer, registered with
/// tokio.
fn register(session: &mut Session) -> Result<(AsyncFd<RingBuf<MapData>>, Option<Logs>), Failure> {
    let rb = session.take_events().map_err(Failure::from)?;
    // SAFETY: the ring buffer owns its map fd (an OwnedFd inside MapData),
    // which stays open and unchanged until the AsyncFd drops it.
    let events = unsafe { AsyncFd::register_with_interest(rb, Interest::READABLE) }
        .context("ring buffer fd")?;
    let logs = match session.logger.take() {
        // SAFETY: as above, the logger owns its ring buffer's fd.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .context("log ring buffer fd")?,
        ),
        None => None,
    };
    Ok((events, logs))
}

/// The pipeline of a live run and the alert sender.
fn live_pipeline(
    plan: &kernel::AttachPlan,
    session: &Session,
    opts: &WatchOptions,
    metrics: &SharedMetrics,
) -> Result<(Pipeline, Option<AlertTask>, ClockPair), Failure> {
    let header = Header::for_this_host(
        "live".into(),
        plan.kernel_release.clone(),
        plan_entries(plan, session),
    );
    let clock = header.clock;
    let mut p = build_pipeline(opts.stream, opts.record.as_ref(), header.clone(), true)?;
    if let Some(o) = p.out.as_mut() {
        o.min_severity = opts.min_severity;
        o.style = opts.style;
        o.header(&header);
    }
    p.names = Some(crate::vmid::VmNames::live());
    let alert_task = start_service(&mut p, &opts.service, metrics, clock)?;
    Ok((p, alert_task, clock))
}

async fn watch(
    plan: &kernel::AttachPlan,
    opts: &WatchOptions,
    metrics: SharedMetrics,
    web: SharedWeb,
) -> Result<(), Failure> {
    // Signals first: a SIGINT or SIGTERM that arrives once "attached" is
    // printed must detach cleanly, not kill the process.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // Attached first, so that the log's header records how each probe
    // attached; events wait in the ring buffer meanwhile.
    let mut session =
        Session::start(plan, opts.ringbuf_bytes, opts.baseline).map_err(Failure::from)?;
    let (mut p, alert_task, clock) = live_pipeline(plan, &session, opts, &metrics)?;
    let mut services = Services {
        findings_out: opts.service.findings_out.clone(),
        config: opts.service.config.clone(),
        reload: opts.service.reload.clone(),
        alerts: alert_task,
        host: opts.service.host.clone(),
        clock,
    };
    report_attach(&session, plan, opts)?;
    // Loading parsed and relocated the object: give the scratch back.
    live::trim_heap();
    count_attached(&metrics, plan, &session);
    inject(&mut p, &opts.service.inject)?;

    let (mut events, mut logs) = register(&mut session)?;
    // The first scrape already sees every series (at 0).
    let counters = session.counters().map_err(Failure::from)?;
    update_metrics(&metrics, &p, &counters, &session);
    let started = Instant::now();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // With wakeup batching the kernel doesn't wake us for every event: this
    // drains whatever waits below the wakeup threshold.
    let mut poll = tokio::time::interval(opts.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut losses = live::Losses::default();
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
                p.tally.decode_errors += live::drain(guard.get_inner_mut(), |ev| p.event(ev));
                guard.clear_ready();
            }
            _ = poll.tick() => {
                p.tally.decode_errors += live::drain(events.get_mut(), |ev| p.event(ev));
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
            _ = tick.tick() => {
                account(&session, &mut losses, &mut p, &metrics)?;
            }
            _ = sighup.recv() => {
                if let Some(r) = p.recorder.as_mut() {
                    r.reopen();
                }
                services.hangup(&mut p, &metrics, &web);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = &mut sleep => break,
        }
        p.end_batch(ClockPair::now().monotonic_ns);
        if p.stdout_closed() {
            break;
        }
    }
    // Nothing recorded is lost: drain what is left before detaching.
    p.tally.decode_errors += live::drain(events.get_mut(), |ev| p.event(ev));
    let counters = account(&session, &mut losses, &mut p, &metrics)?;
    // Let queued alerts go out (bounded), then stop.
    p.alerts = None;
    if let Some(task) = services.alerts.take() {
        task.drain(Duration::from_secs(10)).await;
    }
    let elapsed = started.elapsed();
    let gate_attached = session
        .attached
        .iter()
        .any(|(p, _, _)| *p == ProbeId::KvmEntry);
    let costs = session.costs();
    drop(session);
    let rec = p.finish(ClockPair::now().monotonic_ns, Some(Duration::from_secs(30)));
    summarize(&mut p, &counters, &costs, elapsed);
    rec.inspect(print_log_stats);
    if let Some(warning) = blind_gate(gate_attached, &counters) {
        eprintln!("tracer: warning: {warning}");
    }
    Ok(())
}

/// Reads the probes' counters, records what was lost since the last time,
/// and updates the metrics; returns the counters.
fn account(
    session: &Session,
    losses: &mut live::Losses,
    p: &mut Pipeline,
    metrics: &SharedMetrics,
) -> Result<Counters, Failure> {
    let counters = session.counters().map_err(Failure::from)?;
    for loss in losses.poll(&counters, p.tally.decode_errors) {
        p.loss(&loss);
    }
    update_metrics(metrics, p, &counters, session);
    Ok(counters)
}
