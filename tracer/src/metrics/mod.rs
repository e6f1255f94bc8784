//! Prometheus metrics: plain state the daemon updates once per batch, the
//! OpenMetrics text rendering (prometheus-client) made when scraped, and a
//! small HTTP server for `GET /metrics` (loopback by default; `http`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
mod http;

pub use http::{
    CONNECTION_LIFETIME, MAX_CONNECTIONS, OPENMETRICS, REQUEST_TIMEOUT, TEXT_004, bind_now, health,
    openmetrics_to_text004, serve, serve_bound, wants_openmetrics,
};

/// What the metrics say, as plain numbers.
#[derive(Clone, Debug, Default)]
pub struct MetricsState {
    pub kernel_release: String,
    /// (probe, kind) → events.
    pub events: BTreeMap<(String, String), u64>,
    /// (kind, severity) → findings.
    pub findings: BTreeMap<(String, String), u64>,
    /// probe → events lost because the ring buffer was full.
    pub drops: BTreeMap<String, u64>,
    /// attach kind (kprobe, kretprobe, raw-tracepoint, off) → programs.
    pub probes: BTreeMap<String, u64>,
    pub tracked_vms: u64,
    pub tracked_vcpus: u64,
    pub tdx_vms: u64,
    /// program → (run time ns, run count), from the kernel's BPF stats.
    pub bpf: BTreeMap<String, (u64, u64)>,
    pub entries: u64,
    pub forbidden_entries: u64,
    pub log_write_errors: u64,
    pub stale_entries: u64,
    pub entry_report_retries: u64,
    /// Alertmanager URL → alerts it accepted.
    pub alerts_sent: BTreeMap<String, u64>,
    /// Alertmanager URL → alerts not delivered after every attempt.
    pub alerts_failed: BTreeMap<String, u64>,
    /// Alertmanager URL → alerts dropped because its queue was full.
    pub alerts_dropped: BTreeMap<String, u64>,
    pub log_records: u64,
    pub log_dropped: u64,
    /// Why the event log can't be written now (disk full, read-only,
    /// folder removed, a stalled filesystem), while it can't.
    pub log_failing: Option<String>,
    /// Recording is on.
    pub log_enabled: bool,
    /// Every planned program: (program, attach, target) → attached.
    pub programs: BTreeMap<(String, String, String), bool>,
    /// Feature (as `tracer doctor` names it) → on.
    pub features: BTreeMap<String, bool>,
    /// Probes are attached and events stream.
    pub tracing: bool,
    /// Why nothing is traced yet (KVM not loaded, waited for).
    pub waiting: Option<String>,
    /// Why the kvm_entry gate is blind (vCPUs ran, it saw no entry).
    pub entry_gate_blind: Option<String>,
}

pub type SharedMetrics = Arc<Mutex<MetricsState>>;

/// The metrics server's TLS and auth, swapped on a config reload (new
/// certificates, new users) without closing the listener.
pub type SharedWeb = Arc<std::sync::RwLock<crate::web::WebServer>>;

fn counter_family(
    r: &mut Registry,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Vec<(String, String)>, u64)>,
) {
    let fam = Family::<Vec<(String, String)>, Counter>::default();
    for (labels, v) in rows {
        fam.get_or_create(&labels).inc_by(v);
    }
    r.register(name, help, fam);
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: u64) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn pair(a: &str, av: &str, b: &str, bv: &str) -> Vec<(String, String)> {
    vec![(a.into(), av.into()), (b.into(), bv.into())]
}

/// The exposition text.
pub fn render(s: &MetricsState) -> String {
    let mut root = Registry::default();
    register_process(&mut root);
    let r = root.sub_registry_with_prefix("kvm_root_tracer");
    r.register(
        "build",
        "Version of the tracer and the kernel it runs on",
        Info::new(vec![
            ("version".to_owned(), crate::VERSION.to_owned()),
            ("revision".to_owned(), crate::GIT_REVISION.to_owned()),
            ("build_date".to_owned(), crate::BUILD_DATE.to_owned()),
            ("kernel_release".to_owned(), s.kernel_release.clone()),
        ]),
    );
    counter_family(
        r,
        "events",
        "Root events received, by probe and kind",
        s.events
            .iter()
            .map(|((p, k), v)| (pair("probe", p, "kind", k), *v)),
    );
    counter_family(
        r,
        "findings",
        "Findings raised, by kind and severity",
        s.findings
            .iter()
            .map(|((k, sev), v)| (pair("kind", k, "severity", sev), *v)),
    );
    counter_family(
        r,
        "ringbuf_drops",
        "Events lost because the ring buffer was full, by probe",
        s.drops
            .iter()
            .map(|(p, v)| (vec![("probe".to_owned(), p.clone())], *v)),
    );
    let probes = Family::<Vec<(String, String)>, Gauge>::default();
    for (attach, n) in &s.probes {
        probes
            .get_or_create(&vec![("attach".to_owned(), attach.clone())])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    r.register(
        "probes",
        "eBPF programs by how they attached (off: not attached)",
        probes,
    );
    register_blindness(r, s);
    gauge(r, "tracked_vms", "VMs the detector tracks", s.tracked_vms);
    gauge(
        r,
        "tracked_vcpus",
        "vCPUs the detector tracks",
        s.tracked_vcpus,
    );
    gauge(r, "tdx_vms", "Tracked VMs whose vm_type is TDX", s.tdx_vms);
    if s.log_enabled {
        gauge(
            r,
            "log_writable",
            "1 while the event log is written, 0 while it fails (see /healthz for why); detection goes on either way",
            u64::from(s.log_failing.is_none()),
        );
    }
    let run_time =
        Family::<Vec<(String, String)>, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    for (p, (ns, _)) in &s.bpf {
        #[allow(clippy::cast_precision_loss)] // exact to the ns for 104 days of run time
        run_time
            .get_or_create(&vec![("program".to_owned(), p.clone())])
            .inc_by(*ns as f64 / 1e9);
    }
    r.register(
        "bpf_run_time_seconds",
        "Time the kernel spent in each eBPF program (BPF stats)",
        run_time,
    );
    counter_family(
        r,
        "bpf_runs",
        "Runs of each eBPF program (BPF stats)",
        s.bpf
            .iter()
            .map(|(p, (_, n))| (vec![("program".to_owned(), p.clone())], *n)),
    );
    register_totals(r, s);
    let mut out = String::new();
    encode(&mut out, &root).expect("writing to a String can't fail");
    out
}

/// The standard `process_*` metrics (what client_golang exports), read from
/// `/proc/self`: memory against the unit's `MemoryMax`, CPU, descriptors
/// against the limit, threads, start time.
#[allow(clippy::cast_precision_loss)] // exact below 2^53: bytes, fds, ticks
fn register_process(r: &mut Registry) {
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
    let Some(p) = ProcessStats::read() else {
        return;
    };
    let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by(p.cpu_seconds);
    r.register(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        cpu,
    );
    let fgauge = |r: &mut Registry, name: &str, help: &str, v: f64| {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(v);
        r.register(name, help, g);
    };
    fgauge(
        r,
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        p.rss_bytes as f64,
    );
    fgauge(
        r,
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        p.vsize_bytes as f64,
    );
    fgauge(
        r,
        "process_open_fds",
        "Number of open file descriptors",
        p.open_fds as f64,
    );
    fgauge(
        r,
        "process_max_fds",
        "Maximum number of open file descriptors",
        p.max_fds as f64,
    );
    fgauge(
        r,
        "process_threads",
        "Number of OS threads in the process",
        p.threads as f64,
    );
    fgauge(
        r,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        p.start_time_seconds,
    );
}

/// This process's figures from `/proc/self`.
#[derive(Debug)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    #[allow(clippy::cast_precision_loss)] // ticks and seconds, far below 2^53
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may hold spaces: fields
        // are counted after its closing one (field 3 is `state`).
        let after = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
        // SAFETY: sysconf only reads a configuration value.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let btime: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
            lim.rlim_cur
        } else {
            0
        };
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / tick,
            threads: field(20)?,
            start_time_seconds: btime + field(22)? as f64 / tick,
            vsize_bytes: field(23)?,
            rss_bytes: field(24)? * page,
            open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
            max_fds,
        })
    }
}

/// What the tool can and can't see: per-program attach state, features,
/// whether it traces at all, and the entry gate's blindness.
fn register_blindness(r: &mut Registry, s: &MetricsState) {
    let programs = Family::<Vec<(String, String)>, Gauge>::default();
    for ((program, attach, target), on) in &s.programs {
        programs
            .get_or_create(&vec![
                ("program".to_owned(), program.clone()),
                ("attach".to_owned(), attach.clone()),
                ("target".to_owned(), target.clone()),
            ])
            .set(i64::from(*on));
    }
    r.register(
        "program_attached",
        "1 for each eBPF program attached, 0 for one planned but off or failed (tracer doctor says why)",
        programs,
    );
    let features = Family::<Vec<(String, String)>, Gauge>::default();
    for (name, on) in &s.features {
        features
            .get_or_create(&vec![("feature".to_owned(), name.clone())])
            .set(i64::from(*on));
    }
    r.register(
        "feature_enabled",
        "1 for each capability on for this kernel and host, 0 when off (tracer doctor says why)",
        features,
    );
    gauge(
        r,
        "tracing",
        "1 while probes are attached and events stream; 0 while waiting for KVM (see /healthz)",
        u64::from(s.tracing),
    );
    gauge(
        r,
        "entry_gate_blind",
        "1 when vCPUs ran but the kvm_entry gate saw no guest entry: the entry check is blind on this host",
        u64::from(s.entry_gate_blind.is_some()),
    );
}

/// The plain counters: gate, alerts, log.
fn register_totals(r: &mut Registry, s: &MetricsState) {
    for (name, help, rows) in [
        (
            "alerts_sent",
            "Alerts each Alertmanager accepted",
            &s.alerts_sent,
        ),
        (
            "alerts_failed",
            "Alerts not delivered to an Alertmanager after every attempt",
            &s.alerts_failed,
        ),
        (
            "alerts_dropped",
            "Alerts dropped because an Alertmanager's send queue was full",
            &s.alerts_dropped,
        ),
    ] {
        counter_family(
            r,
            name,
            help,
            rows.iter()
                .map(|(url, v)| (vec![("alertmanager".to_owned(), url.clone())], *v)),
        );
    }
    for (name, help, v) in [
        (
            "guest_entries",
            "Guest entries the kvm_entry gate saw",
            s.entries,
        ),
        (
            "forbidden_entries",
            "TDX guest entries with a valid root and an invalid (or stale) mirror root",
            s.forbidden_entries,
        ),
        (
            "stale_mirror_entries",
            "TDX guest entries whose mirror root's page has role.invalid set",
            s.stale_entries,
        ),
        (
            "entry_report_retries",
            "Forbidden-state reports the kvm_entry gate retried because the ring buffer was full",
            s.entry_report_retries,
        ),
        (
            "log_records",
            "Records written to the event log",
            s.log_records,
        ),
        (
            "log_dropped",
            "Records the event log could not write (disk full, write errors)",
            s.log_dropped,
        ),
        (
            "log_write_errors",
            "Times writing the event log failed (disk full, read-only, folder removed); it is retried every batch",
            s.log_write_errors,
        ),
    ] {
        counter(r, name, help, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_labels() {
        let mut s = MetricsState {
            kernel_release: "6.18.0".into(),
            ..MetricsState::default()
        };
        s.events
            .insert(("kvm_mmu_zap_all_fast_tp".into(), "zap_all_fast".into()), 3);
        s.findings.insert(
            ("mirror_root_invalid_at_entry".into(), "critical".into()),
            1,
        );
        s.probes.insert("raw-tracepoint".into(), 3);
        s.tracked_vcpus = 7;
        let text = render(&s);
        assert!(
            text.contains(&format!(
                "kvm_root_tracer_build_info{{version=\"0.1.0\",revision=\"{}\",build_date=\"{}\",kernel_release=\"6.18.0\"}} 1",
                crate::GIT_REVISION,
                crate::BUILD_DATE
            )),
            "{text}"
        );
        assert!(text.contains(r#"kvm_root_tracer_events_total{probe="kvm_mmu_zap_all_fast_tp",kind="zap_all_fast"} 3"#), "{text}");
        assert!(text.contains(r#"kvm_root_tracer_findings_total{kind="mirror_root_invalid_at_entry",severity="critical"} 1"#), "{text}");
        assert!(
            text.contains(r#"kvm_root_tracer_probes{attach="raw-tracepoint"} 3"#),
            "{text}"
        );
        assert!(text.contains("kvm_root_tracer_tracked_vcpus 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn health_is_503_while_blind_and_names_every_reason() {
        let mut s = MetricsState::default();
        assert_eq!(health(&s), (200, "ok\n".into()));
        s.log_failing = Some("disk full".into());
        assert_eq!(health(&s), (200, "degraded: event log: disk full\n".into()));
        s.entry_gate_blind = Some("no kvm_entry".into());
        let (code, body) = health(&s);
        assert_eq!(code, 503);
        assert!(
            body.starts_with("blind: entry check: no kvm_entry\n"),
            "{body}"
        );
        assert!(body.contains("degraded: event log: disk full"), "{body}");
    }

    #[test]
    fn accept_headers() {
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;version=1.0.0;q=0.2,text/plain;version=0.0.4;q=0.9"
        ));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;version=0.0.1"
        ));
    }

    #[test]
    fn text_004_renames_counters_and_info() {
        let s = MetricsState {
            kernel_release: "6.18.0".into(),
            ..MetricsState::default()
        };
        let text = openmetrics_to_text004(&render(&s));
        assert!(
            text.contains("# TYPE kvm_root_tracer_build_info gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP kvm_root_tracer_guest_entries_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kvm_root_tracer_guest_entries_total counter\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
}
