//! Prometheus metrics: plain state the daemon updates once per batch, the
//! OpenMetrics text rendering (prometheus-client) made when scraped, and a
//! small HTTP server for `GET /metrics` (loopback by default).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
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
    pub alerts_sent: u64,
    pub alerts_failed: u64,
    pub alerts_dropped: u64,
    pub log_records: u64,
    pub log_dropped: u64,
    /// Why the event log can't be written now (disk full, read-only,
    /// folder removed, a stalled filesystem), while it can't.
    pub log_failing: Option<String>,
    /// Recording is on.
    pub log_enabled: bool,
}

pub type SharedMetrics = Arc<Mutex<MetricsState>>;

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
    let mut r = Registry::with_prefix("kvm_root_tracer");
    r.register(
        "build",
        "Version of the tracer and the kernel it runs on",
        Info::new(vec![
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            ("kernel_release".to_owned(), s.kernel_release.clone()),
        ]),
    );
    counter_family(
        &mut r,
        "events",
        "Root events received, by probe and kind",
        s.events
            .iter()
            .map(|((p, k), v)| (pair("probe", p, "kind", k), *v)),
    );
    counter_family(
        &mut r,
        "findings",
        "Findings raised, by kind and severity",
        s.findings
            .iter()
            .map(|((k, sev), v)| (pair("kind", k, "severity", sev), *v)),
    );
    counter_family(
        &mut r,
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
    gauge(
        &mut r,
        "tracked_vms",
        "VMs the detector tracks",
        s.tracked_vms,
    );
    gauge(
        &mut r,
        "tracked_vcpus",
        "vCPUs the detector tracks",
        s.tracked_vcpus,
    );
    gauge(
        &mut r,
        "tdx_vms",
        "Tracked VMs whose vm_type is TDX",
        s.tdx_vms,
    );
    if s.log_enabled {
        gauge(
            &mut r,
            "log_writable",
            "1 while the event log is written, 0 while it fails (see /healthz for why); detection goes on either way",
            u64::from(s.log_failing.is_none()),
        );
    }
    counter_family(
        &mut r,
        "bpf_run_time_nanoseconds",
        "Time the kernel spent in each eBPF program (BPF stats)",
        s.bpf
            .iter()
            .map(|(p, (ns, _))| (vec![("program".to_owned(), p.clone())], *ns)),
    );
    counter_family(
        &mut r,
        "bpf_runs",
        "Runs of each eBPF program (BPF stats)",
        s.bpf
            .iter()
            .map(|(p, (_, n))| (vec![("program".to_owned(), p.clone())], *n)),
    );
    register_totals(&mut r, s);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String can't fail");
    out
}

/// The plain counters: gate, alerts, log.
fn register_totals(r: &mut Registry, s: &MetricsState) {
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
        ("alerts_sent", "Alerts Alertmanager accepted", s.alerts_sent),
        (
            "alerts_failed",
            "Alerts not delivered after every attempt",
            s.alerts_failed,
        ),
        (
            "alerts_dropped",
            "Alerts dropped because the send queue was full",
            s.alerts_dropped,
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

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 128;

/// A connection must deliver its request head within this, or it is closed.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr` and serves it, retrying every `retry` while it can't be
/// bound (another process holds the port): a metrics endpoint that can't
/// bind is a loud warning, never a reason to stop tracing.
pub async fn serve_retrying(
    addr: std::net::SocketAddr,
    state: SharedMetrics,
    retry: std::time::Duration,
) {
    let mut failures = 0u64;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                eprintln!("tracer: metrics on http://{addr}/metrics");
                serve(listener, state).await;
                return;
            }
            Err(e) => {
                if failures == 0 {
                    eprintln!(
                        "tracer: warning: can't serve metrics on {addr}: {e}; tracing goes on, \
                         retrying every {} s",
                        retry.as_secs()
                    );
                }
                failures += 1;
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// Serves `GET /metrics` (and `GET /healthz`) until the task is dropped. At
/// most [`MAX_CONNECTIONS`] at once, each closed after [`REQUEST_TIMEOUT`]
/// without an answer; `accept` errors (out of file descriptors) back off
/// instead of spinning.
pub async fn serve(listener: TcpListener, state: SharedMetrics) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Full: close it now rather than hold a descriptor for it.
            drop(sock);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(&mut sock, &state)).await;
        });
    }
}

/// Reads one request head and answers it.
async fn answer(sock: &mut tokio::net::TcpStream, state: &SharedMetrics) {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // Read the request head (we ignore any body).
    while len < buf.len() {
        match sock.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match (head.starts_with("GET "), path) {
        (true, "/metrics") => {
            let snapshot = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(&snapshot),
            )
        }
        (true, "/healthz") => {
            let failing = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .log_failing
                .clone();
            // Still 200: detection goes on without the log, and a restart
            // would not bring the disk back.
            let body = match failing {
                None => "ok\n".to_owned(),
                Some(why) => format!("degraded: event log: {why}\n"),
            };
            ("200 OK", "text/plain", body)
        }
        (true, _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
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
            text.contains(
                r#"kvm_root_tracer_build_info{version="0.1.0",kernel_release="6.18.0"} 1"#
            ),
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
}
