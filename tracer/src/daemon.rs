//! The live loop of `tracer watch` and of the daemon (`tracer run`): plan,
//! attach and drain through `live`, detect, stream and/or record, serve
//! metrics and push alerts, reload on SIGHUP; detach and summarize.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use common::ProbeId;

use std::sync::{Arc, Mutex};

use crate::{
    Failure,
    alerts::AlertTask,
    detector::FindingKind,
    doctor::kernel_failure,
    kernel::{self, PlanOptions},
    live,
    loader::{Cost, Counters, Session},
    log::{
        ClockPair, Header, PlanEntry,
        sink::LogSink,
        writer::{RecordConfig, Recorder},
    },
    metrics::{MetricsState, SharedMetrics, SharedWeb},
    pipeline::{FlightRecorder, Output, Pipeline, Tally},
};

/// Where and how to record the event log.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub dir: PathBuf,
    pub config: RecordConfig,
    /// Events per VM kept for incident files (0: no incident files).
    pub flight_events: usize,
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

/// The attach plan as the log header records it.
pub fn plan_entries(plan: &kernel::AttachPlan) -> Vec<PlanEntry> {
    plan.probes
        .iter()
        .map(|p| PlanEntry {
            program: p.program.to_owned(),
            target: p.target.clone(),
            attach: p.attach.to_string(),
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
                .map_err(|e| anyhow!("can't record the event log: {e}"))?;
            // Live, a full queue drops (counted) rather than stall the ring
            // buffer; a simulation waits for the disk.
            let recorder = LogSink::spawn(recorder, !live_clock)
                .map_err(|e| anyhow!("can't start the event log's thread: {e}"))?;
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
        .map_err(|e| anyhow!("ring buffer fd: {e}"))?;
    let logs = match session.logger.take() {
        // SAFETY: as above, the logger owns its ring buffer's fd.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow!("log ring buffer fd: {e}"))?,
        ),
        None => None,
    };
    Ok((events, logs))
}

/// The metrics endpoint, when one is configured: never a reason to stop
/// tracing (a taken port is retried).
fn start_metrics(opts: &ServiceOptions, metrics: &SharedMetrics) -> SharedWeb {
    raise_nofile();
    let web = opts.web.clone().unwrap_or(crate::web::WebServer {
        tls: None,
        auth: None,
    });
    let shared: SharedWeb = Arc::new(std::sync::RwLock::new(web.clone()));
    if let Some(addr) = opts.metrics_listen {
        if !addr.ip().is_loopback() && (web.tls.is_none() || web.auth.is_none()) {
            eprintln!(
                "tracer: warning: metrics on {addr} are served beyond this host{}{}: anyone \
                 who reaches it reads VM ids and kernel activity; prefer loopback, or set \
                 [metrics] web_config_file",
                if web.tls.is_none() {
                    ", without TLS"
                } else {
                    ""
                },
                if web.auth.is_none() {
                    ", without authentication"
                } else {
                    ""
                },
            );
        }
        // A port another process holds is a warning and a retry: tracing
        // never waits for the metrics endpoint.
        tokio::spawn(crate::metrics::serve_bound(
            addr,
            crate::metrics::bind_now(addr),
            metrics.clone(),
            shared.clone(),
            std::time::Duration::from_secs(10),
        ));
    }
    shared
}

/// Opens `--findings-out`: `-` is stdout; a file is appended to, created
/// 0640, never through a symlink.
fn open_findings_out(out: &str) -> Result<Box<dyn io::Write + Send>, Failure> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if out == "-" {
        return Ok(Box::new(io::stdout()));
    }
    Ok(Box::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(out)
            .map_err(|e| anyhow!("can't open the findings output {out}: {e}"))?,
    ))
}

/// The daemon's services while it runs: what SIGHUP reopens and reloads.
struct Services {
    findings_out: Option<String>,
    config: Option<crate::config::Config>,
    reload: Option<crate::reload::Reloader>,
    alerts: Option<AlertTask>,
    host: String,
    clock: ClockPair,
}

impl Services {
    /// SIGHUP: reopen `--findings-out` (logrotate moved it), then read the
    /// config again and apply what can change live.
    fn hangup(&mut self, p: &mut Pipeline, metrics: &SharedMetrics, web: &SharedWeb) {
        if let Some(out) = self.findings_out.clone() {
            Self::reopen_findings(p, &out);
        }
        let Some(reload) = self.reload.clone() else {
            return;
        };
        let new = match (reload.0)() {
            Ok(new) => new,
            Err(e) => {
                eprintln!("tracer: warning: config reload failed, the running config stays: {e}");
                return;
            }
        };
        if let Some(old) = &self.config {
            let keys = crate::reload::needs_restart(old, &new.config);
            if !keys.is_empty() {
                eprintln!(
                    "tracer: warning: config reload: {} changed; that takes a restart (the \
                     running value stays)",
                    keys.join(", ")
                );
            }
        }
        *web.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            new.web.unwrap_or(crate::web::WebServer {
                tls: None,
                auth: None,
            });
        let out =
            (!new.config.findings.output.is_empty()).then(|| new.config.findings.output.clone());
        if out != self.findings_out {
            match &out {
                Some(o) => Self::reopen_findings(p, o),
                None => p.findings_out = None,
            }
            self.findings_out = out;
        }
        // New Alertmanager senders; the old ones finish their queues.
        p.alerts = None;
        if let Some(old) = self.alerts.take() {
            tokio::spawn(old.drain(Duration::from_secs(10)));
        }
        {
            let mut m = metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            m.alerts_sent.clear();
            m.alerts_failed.clear();
            m.alerts_dropped.clear();
        }
        self.host = new.host;
        if let Some(am) = &new.alertmanager {
            let (sink, task) =
                crate::alerts::spawn(am, self.host.clone(), self.clock, metrics.clone());
            p.alerts = Some(sink);
            self.alerts = Some(task);
        }
        self.config = Some(new.config);
        eprintln!("tracer: config reloaded");
    }

    fn reopen_findings(p: &mut Pipeline, out: &str) {
        match open_findings_out(out) {
            Ok(w) => p.findings_out = Some(w),
            Err(e) => {
                eprintln!(
                    "tracer: warning: {}; findings output is off until the next SIGHUP",
                    e.error
                );
                p.findings_out = None;
            }
        }
    }
}

/// Alert sender and findings output, before attaching.
fn start_service(
    p: &mut Pipeline,
    opts: &ServiceOptions,
    metrics: &SharedMetrics,
    clock: ClockPair,
) -> Result<Option<AlertTask>, Failure> {
    if let Some(out) = &opts.findings_out {
        p.findings_out = Some(open_findings_out(out)?);
    }
    Ok(match &opts.alertmanager {
        Some(am) => {
            let (sink, task) = crate::alerts::spawn(am, opts.host.clone(), clock, metrics.clone());
            let urls: Vec<&str> = am.targets.iter().map(|t| t.url.as_str()).collect();
            eprintln!("tracer: findings go to Alertmanager at {}", urls.join(", "));
            p.alerts = Some(sink);
            Some(task)
        }
        None => None,
    })
}

/// Feeds recorded events into the live pipeline.
fn inject(p: &mut Pipeline, files: &[PathBuf]) -> Result<(), Failure> {
    if files.is_empty() {
        return Ok(());
    }
    let files = crate::log::reader::expand_inputs(files).map_err(|e| anyhow!("--inject: {e}"))?;
    let mut stats = crate::log::reader::ReadStats::default();
    let mut n = 0u64;
    crate::log::reader::read_all(&files, &mut stats, |_, r| {
        if let crate::log::reader::Record::Event(ev) = r {
            p.event(&ev);
            n += 1;
        }
    });
    eprintln!("tracer: injected {n} recorded event(s)");
    Ok(())
}

/// Programs by how they attached (`off` for planned-but-failed too).
fn count_attached(metrics: &SharedMetrics, plan: &kernel::AttachPlan, session: &Session) {
    let mut m = metrics
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for probe in &plan.probes {
        let attached = session.attached.iter().any(|(id, _, _)| *id == probe.probe);
        let kind = if attached {
            probe.attach.to_string()
        } else {
            "off".into()
        };
        *m.probes.entry(kind).or_default() += 1;
        m.programs.insert(
            (
                probe.program.to_owned(),
                probe.attach.to_string(),
                probe.target.clone(),
            ),
            attached,
        );
    }
    for f in &plan.features {
        m.features.insert(f.name.to_owned(), f.enabled);
    }
    m.features
        .insert("bpf-stats".to_owned(), session.stats_enabled());
    m.tracing = !session.attached.is_empty();
    m.waiting = None;
}

/// Copies the pipeline's, detector's and probes' numbers into the metrics.
fn update_metrics(metrics: &SharedMetrics, p: &Pipeline, counters: &Counters, session: &Session) {
    let mut m = metrics
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Every series exists from start-up, at 0: `increase()` over a series
    // that appears at 1 reads 0, and the first finding would never alert.
    m.events = session
        .attached
        .iter()
        .flat_map(|(probe, _, _)| {
            crate::event::Kind::emitted_by(*probe)
                .iter()
                .map(|k| ((probe.program_name().to_owned(), k.name().to_owned()), 0))
        })
        .collect();
    for ((probe, kind), v) in &p.tally.by_probe_kind {
        m.events
            .insert((probe.to_string(), kind.name().to_owned()), *v);
    }
    m.findings = FindingKind::ALL
        .iter()
        .map(|k| {
            let n = p.tally.findings.get(k).copied().unwrap_or(0);
            ((k.name().to_owned(), k.severity().name().to_owned()), n)
        })
        .collect();
    m.drops = counters
        .probes
        .iter()
        .map(|(name, c)| ((*name).to_owned(), c.reserve_failed))
        .collect();
    let d = p.detector();
    m.tracked_vms = d.tracked_vms() as u64;
    m.tracked_vcpus = d.tracked_vcpus() as u64;
    m.tdx_vms = d.tdx_vms() as u64;
    m.entries = counters.entry.entries;
    m.forbidden_entries = counters.entry.forbidden_entries;
    m.stale_entries = counters.entry.stale_entries;
    m.entry_report_retries = counters.entry.retries;
    let gate_attached = session
        .attached
        .iter()
        .any(|(p, _, _)| *p == ProbeId::KvmEntry);
    m.entry_gate_blind = blind_gate(gate_attached, counters);
    m.bpf = session
        .bpf_stats()
        .into_iter()
        .map(|(name, ns, n)| (name.to_owned(), (ns, n)))
        .collect();
    if let Some(r) = p.recorder.as_ref() {
        let s = r.stats();
        m.log_records = s.records;
        m.log_dropped = s.dropped;
        m.log_write_errors = s.write_errors;
        m.log_failing = r.failing();
        m.log_enabled = true;
    }
}

/// The pipeline of a live run and the alert sender.
fn live_pipeline(
    plan: &kernel::AttachPlan,
    opts: &WatchOptions,
    metrics: &SharedMetrics,
) -> Result<(Pipeline, Option<AlertTask>, ClockPair), Failure> {
    let header = Header::for_this_host(
        "live".into(),
        plan.kernel_release.clone(),
        plan_entries(plan),
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
    let (mut p, alert_task, clock) = live_pipeline(plan, opts, &metrics)?;
    let mut services = Services {
        findings_out: opts.service.findings_out.clone(),
        config: opts.service.config.clone(),
        reload: opts.service.reload.clone(),
        alerts: alert_task,
        host: opts.service.host.clone(),
        clock,
    };
    let mut session =
        Session::start(plan, opts.ringbuf_bytes, opts.baseline).map_err(Failure::from)?;
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

fn print_log_stats(rec: &crate::log::writer::RecorderStats) {
    eprintln!(
        "tracer: event log: {} record(s), {} bytes in {} segment(s), {} dropped",
        rec.records, rec.bytes, rec.segments_opened, rec.dropped
    );
}

/// The `kvm_entry` gate is blind when vCPUs ran but it saw no guest entry:
/// some KVM backends (PVM, for one) never fire `kvm:kvm_entry`.
pub fn blind_gate(gate_attached: bool, counters: &Counters) -> Option<String> {
    // vCPUs ran: KVM_RUN returned (the sys_exit fallback), or loaded their
    // roots (the kvm_mmu_load kprobe, where that replaces the fallback).
    let hits = |id: ProbeId| {
        counters
            .probes
            .iter()
            .find(|(name, _)| *name == id.program_name())
            .map_or(0, |(_, c)| c.hits)
    };
    let (runs, loads) = (hits(ProbeId::KvmRunExit), hits(ProbeId::MmuLoadRet));
    (gate_attached && counters.entry.entries == 0 && runs + loads > 0).then(|| {
        let seen = if runs > 0 {
            format!("{runs} KVM_RUN calls returned")
        } else {
            format!("{loads} kvm_mmu_load calls returned")
        };
        format!(
            "vCPUs ran ({seen}) but kvm:kvm_entry never fired: this KVM backend does not \
             trace guest entries (e.g. PVM), so the in-kernel entry check is blind here; \
             roots are still sampled at each KVM_RUN exit or root load"
        )
    })
}

fn summarize(p: &mut Pipeline, counters: &Counters, costs: &[Cost], elapsed: Duration) {
    let tally: &Tally = &p.tally;
    let total: u64 = tally.by_kind.values().sum();
    let dropped = counters.reserve_failed();
    let json = serde_json::json!({
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
            "stale_entries": counters.entry.stale_entries,
            "read_failed": counters.entry.read_failed,
            "report_retries": counters.entry.retries,
        },
        "bpf_cost": costs.iter().map(|c| serde_json::json!({
            "program": c.program,
            "attach": c.attach,
            "target": c.target,
            "run_count": c.run_count,
            "run_time_ns": c.run_time_ns,
            "ns_per_run": c.ns_per_run(),
            "floor_run_count": c.floor_run_count,
            "floor_run_time_ns": c.floor_run_time_ns,
            "floor_ns_per_run": c.floor_ns_per_run(),
            "ratio_to_floor": c.ratio(),
        })).collect::<Vec<_>>(),
    });
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
        "  kvm_entry gate: {} entries, {} TDX, {} forbidden ({} stale mirror root), {} slow \
         path, {} unreadable, {} report retries (ring buffer full)",
        counters.entry.entries,
        counters.entry.tdx_entries,
        counters.entry.forbidden_entries,
        counters.entry.stale_entries,
        counters.entry.slow_path,
        counters.entry.read_failed,
        counters.entry.retries
    );
    print_costs(&mut e, costs);
    drop(e);
    if let Some(o) = p.out.as_mut()
        && o.is_json()
    {
        o.write_raw(&format!("{json}\n"));
        o.flush();
    }
}

/// The in-kernel cost table of the summary.
fn print_costs(e: &mut impl io::Write, costs: &[Cost]) {
    if !costs.iter().any(|c| c.run_count > 0) {
        return;
    }
    let _ = writeln!(
        e,
        "  {:<28} {:>10} {:>10} {:>10} {:>7}",
        "in-kernel cost", "runs", "ns/run", "floor", "ratio"
    );
    let f = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"));
    for c in costs.iter().filter(|c| c.run_count > 0) {
        let _ = writeln!(
            e,
            "  {:<28} {:>10} {:>10} {:>10} {:>7}",
            c.program,
            c.run_count,
            f(c.ns_per_run(), 1),
            f(c.floor_ns_per_run(), 1),
            f(c.ratio(), 2)
        );
    }
}

/// Raises the soft limit of open files to the hard one, so connections to
/// the metrics endpoint can't take the descriptors the log and the probes
/// need (the server also caps its connections).
fn raise_nofile() {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or fill the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut rlim) == 0 && rlim.rlim_cur < rlim.rlim_max
        {
            rlim.rlim_cur = rlim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rlim);
        }
    }
}
