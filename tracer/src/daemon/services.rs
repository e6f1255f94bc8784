//! The daemon's services around the pipeline: the metrics endpoint and what
//! it shows, the Alertmanager sender, the findings output, and injected logs.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, anyhow};

use common::ProbeId;

use super::{ServiceOptions, summary::blind_gate};
use crate::{
    Failure,
    alerts::AlertTask,
    detector::FindingKind,
    kernel,
    loader::{Counters, Session},
    log::ClockPair,
    metrics::{SharedMetrics, SharedWeb},
    pipeline::Pipeline,
};

/// The metrics endpoint, when one is configured: never a reason to stop
/// tracing (a taken port is retried).
pub(super) fn start_metrics(opts: &ServiceOptions, metrics: &SharedMetrics) -> SharedWeb {
    raise_nofile();
    let web = opts.web.clone().unwrap_or(crate::web::WebServer {
        tls: None,
        auth: None,
    });
    let shared: SharedWeb = Arc::new(RwLock::new(web.clone()));
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
pub(super) fn open_findings_out(out: &str) -> Result<Box<dyn io::Write + Send>, Failure> {
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
            .with_context(|| format!("can't open the findings output {out}"))?,
    ))
}

/// The daemon's services while it runs: what SIGHUP reopens and reloads.
pub(super) struct Services {
    pub(super) findings_out: Option<String>,
    pub(super) config: Option<crate::config::Config>,
    pub(super) reload: Option<crate::reload::Reloader>,
    pub(super) alerts: Option<AlertTask>,
    pub(super) host: String,
    pub(super) clock: ClockPair,
}

impl Services {
    /// SIGHUP: reopen `--findings-out` (logrotate moved it), then read the
    /// config again and apply what can change live.
    pub(super) fn hangup(&mut self, p: &mut Pipeline, metrics: &SharedMetrics, web: &SharedWeb) {
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

    pub(super) fn reopen_findings(p: &mut Pipeline, out: &str) {
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
pub(super) fn start_service(
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
pub(super) fn inject(p: &mut Pipeline, files: &[PathBuf]) -> Result<(), Failure> {
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
pub(super) fn count_attached(
    metrics: &SharedMetrics,
    plan: &kernel::AttachPlan,
    session: &Session,
) {
    let mut m = metrics
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for probe in &plan.probes {
        let actual = session.attach_kind(probe.probe);
        let attached = actual.is_some();
        let kind = actual.map_or_else(|| "off".into(), |k| k.to_string());
        *m.probes.entry(kind).or_default() += 1;
        m.programs.insert(
            (
                probe.program.to_owned(),
                actual.unwrap_or(probe.attach).to_string(),
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
pub(super) fn update_metrics(
    metrics: &SharedMetrics,
    p: &Pipeline,
    counters: &Counters,
    session: &Session,
) {
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

/// Raises the soft limit of open files to the hard one, so connections to
/// the metrics endpoint can't take the descriptors the log and the probes
/// need (the server also caps its connections).
pub(super) fn raise_nofile() {
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
