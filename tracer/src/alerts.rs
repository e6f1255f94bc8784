//! Findings to Alertmanager (`POST /api/v2/alerts`), from background
//! tasks, one per Alertmanager URL: each alert goes to every URL (as
//! Prometheus does for an HA pair), so a down or slow replica delays only
//! its own queue. The pipeline only `try_send`s into bounded queues, so
//! alerting never blocks tracing. Each batch is retried with exponential
//! back-off a bounded number of times; what can't be delivered is counted
//! per URL. The event log keeps every finding regardless. HTTP is hyper's,
//! TLS rustls's (`https://` with a CA file or the system's roots), with
//! basic auth or a bearer token.

use std::{path::Path, sync::Arc, time::Duration};

use http_body_util::BodyExt as _;
use hyper::header::HeaderValue;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::mpsc, task::JoinHandle};
use tokio_rustls::rustls::{ClientConfig, pki_types::ServerName};

use crate::{
    config::AlertmanagerConfig,
    detector::{Finding, Severity},
    log::{ClockPair, writer::utc_rfc3339},
    metrics::SharedMetrics,
};

/// The pipeline's end of the queues.
pub struct AlertSink {
    queues: Vec<(String, mpsc::Sender<Arc<Value>>)>,
    min_severity: Severity,
    host: String,
    clock: ClockPair,
    metrics: SharedMetrics,
}

/// The sender tasks, to drain on shutdown.
pub struct AlertTask(Vec<JoinHandle<()>>);

impl AlertTask {
    /// Waits up to `deadline` for queued alerts to go out.
    pub async fn drain(self, deadline: Duration) {
        let _ = tokio::time::timeout(deadline, async {
            for t in self.0 {
                let _ = t.await;
            }
        })
        .await;
    }
}

/// One Alertmanager: `http[s]://host[:port][/prefix]`.
#[derive(Clone, Debug)]
pub struct Target {
    /// The URL as configured (the `alertmanager` label of the counters).
    pub url: String,
    addr: String,
    authority: String,
    path: String,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

/// Everything the senders need, checked and loaded before anything
/// attaches: URLs parsed, CA file and secrets read.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub targets: Vec<Target>,
    auth: Option<HeaderValue>,
    cfg: AlertmanagerConfig,
}

fn parse_url(url: &str, tls: Option<&Arc<ClientConfig>>) -> Result<Target, String> {
    let (rest, port, secure) = if let Some(r) = url.strip_prefix("http://") {
        (r, 80, false)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, 443, true)
    } else {
        return Err(format!("{url:?} must start with http:// or https://"));
    };
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') {
        return Err(format!(
            "{url:?}: credentials don't go in the URL (it is a metric label); use \
             basic_auth or bearer_token_file"
        ));
    }
    if authority.is_empty() || prefix.contains(['?', '#']) {
        return Err(format!(
            "{url:?} is not a URL like http://host:9093[/prefix]"
        ));
    }
    // [v6]:port, host:port, [v6], host
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        ),
        _ => (authority, port),
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tls = if secure {
        let cfg = tls.ok_or_else(|| format!("{url:?}: no TLS config"))?;
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|e| format!("{url:?}: {bare:?} is not a TLS server name: {e}"))?;
        Some((cfg.clone(), name))
    } else {
        None
    };
    let prefix = prefix.trim_end_matches('/');
    Ok(Target {
        url: url.to_owned(),
        addr: format!("{host}:{port}"),
        authority: authority.to_owned(),
        path: if prefix.is_empty() {
            "/api/v2/alerts".into()
        } else {
            format!("/{prefix}/api/v2/alerts")
        },
        tls,
    })
}

impl Prepared {
    /// Parses the URLs and reads the CA file and the secret files.
    pub fn new(cfg: &AlertmanagerConfig) -> Result<Self, String> {
        let urls = cfg.all_urls();
        let tls = if urls.iter().any(|u| u.starts_with("https://")) {
            let ca = (!cfg.ca_file.as_os_str().is_empty()).then_some(cfg.ca_file.as_path());
            Some(crate::web::client_tls(ca).map_err(|e| format!("ca_file: {e}"))?)
        } else {
            None
        };
        let mut targets = Vec::new();
        for u in &urls {
            let t = parse_url(u, tls.as_ref())?;
            if targets.iter().any(|o: &Target| o.url == t.url) {
                return Err(format!("{u:?} is listed twice"));
            }
            targets.push(t);
        }
        let auth = match (
            &cfg.basic_auth,
            cfg.bearer_token_file.as_os_str().is_empty(),
        ) {
            (Some(_), false) => {
                return Err("basic_auth and bearer_token_file are exclusive".into());
            }
            (Some(b), true) => {
                use base64::Engine as _;
                if b.username.is_empty() || b.username.contains(':') {
                    return Err("basic_auth.username: empty or has a ':'".into());
                }
                let pass = crate::web::read_secret(Path::new(&b.password_file))
                    .map_err(|e| format!("basic_auth.password_file: {e}"))?;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{pass}", b.username));
                Some(header_value(&format!("Basic {token}"))?)
            }
            (None, false) => {
                let token = crate::web::read_secret(&cfg.bearer_token_file)
                    .map_err(|e| format!("bearer_token_file: {e}"))?;
                Some(header_value(&format!("Bearer {token}"))?)
            }
            (None, true) => None,
        };
        Ok(Self {
            targets,
            auth,
            cfg: cfg.clone(),
        })
    }
}

fn header_value(v: &str) -> Result<HeaderValue, String> {
    let mut h = HeaderValue::from_str(v).map_err(|_| "a secret has bytes a header can't carry")?;
    h.set_sensitive(true);
    Ok(h)
}

/// Starts one sender per URL; returns the sink for the pipeline.
pub fn spawn(
    prepared: &Prepared,
    host: String,
    clock: ClockPair,
    metrics: SharedMetrics,
) -> (AlertSink, AlertTask) {
    let cfg = &prepared.cfg;
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    {
        let mut m = metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for t in &prepared.targets {
            // Every counter exists at 0 from start-up.
            m.alerts_sent.insert(t.url.clone(), 0);
            m.alerts_failed.insert(t.url.clone(), 0);
            m.alerts_dropped.insert(t.url.clone(), 0);
        }
    }
    for t in &prepared.targets {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        queues.push((t.url.clone(), tx));
        tasks.push(tokio::spawn(sender(
            rx,
            t.clone(),
            prepared.auth.clone(),
            cfg.clone(),
            metrics.clone(),
        )));
    }
    (
        AlertSink {
            queues,
            min_severity: cfg.min_severity,
            host,
            clock,
            metrics,
        },
        AlertTask(tasks),
    )
}

impl AlertSink {
    /// Queues a finding at or above the minimum severity for every
    /// Alertmanager; never blocks. A full queue drops and counts it.
    pub fn send(&self, f: &Finding) {
        if f.severity < self.min_severity {
            return;
        }
        let alert = Arc::new(alert_for(f, &self.host, self.clock));
        for (url, tx) in &self.queues {
            if tx.try_send(alert.clone()).is_err() {
                *self
                    .metrics
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .alerts_dropped
                    .entry(url.clone())
                    .or_default() += 1;
            }
        }
    }
}
/// The Alertmanager v2 alert for a finding.
pub fn alert_for(f: &Finding, host: &str, clock: ClockPair) -> Value {
    // The same alertname as the Prometheus rule for the kind; no kernel
    // pointer (the `kvm` address stays in the event log: it would defeat
    // KASLR for anyone who reads alerts).
    let mut labels = json!({
        "alertname": f.kind.alertname(),
        "kind": f.kind.name(),
        "severity": f.severity.name(),
        "host": host,
        "service": "kvm-root-tracer",
    });
    if let Some(pid) = f.userspace_pid {
        labels["vmm_pid"] = json!(pid.to_string());
    }
    if let Some(v) = f.vcpu_id {
        labels["vcpu"] = json!(v.to_string());
    }
    // The VM's names outlive its pid: a tenant can be found after a restart.
    if let Some(vm) = &f.vm {
        for (key, value) in [
            ("vm_name", &vm.name),
            ("vm_uuid", &vm.uuid),
            ("libvirt_domain", &vm.libvirt_domain),
        ] {
            if let Some(v) = value {
                labels[key] = json!(v);
            }
        }
    }
    json!({
        "labels": labels,
        "annotations": {
            "summary": format!("{} on {host}", f.kind.name()),
            "description": f.explanation,
        },
        "startsAt": utc_rfc3339(clock.to_realtime(f.ts_ns)),
    })
}

async fn sender(
    mut rx: mpsc::Receiver<Arc<Value>>,
    target: Target,
    auth: Option<HeaderValue>,
    cfg: AlertmanagerConfig,
    metrics: SharedMetrics,
) {
    let mut batch: Vec<Arc<Value>> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let body = hyper::body::Bytes::from(
            serde_json::to_vec(&batch.iter().map(|a| &**a).collect::<Vec<&Value>>())
                .expect("JSON values serialize"),
        );
        batch.clear();
        let mut delay = Duration::from_millis(500);
        let mut ok = false;
        for attempt in 1..=cfg.attempts {
            match tokio::time::timeout(cfg.timeout, post(&target, auth.as_ref(), body.clone()))
                .await
            {
                Ok(Ok(())) => {
                    ok = true;
                    break;
                }
                Ok(Err(e)) => log::warn!("alertmanager {}: attempt {attempt}: {e}", target.url),
                Err(_) => log::warn!("alertmanager {}: attempt {attempt}: timed out", target.url),
            }
            if attempt < cfg.attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        let mut m = metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            *m.alerts_sent.entry(target.url.clone()).or_default() += n;
        } else {
            *m.alerts_failed.entry(target.url.clone()).or_default() += n;
            eprintln!(
                "tracer: warning: {n} alert(s) not delivered to Alertmanager {} after {} \
                 attempt(s); they are in the event log",
                target.url, cfg.attempts
            );
        }
    }
}

/// The most of an Alertmanager response that is read.
const RESPONSE_MAX: usize = 64 << 10;

async fn post(
    t: &Target,
    auth: Option<&HeaderValue>,
    body: hyper::body::Bytes,
) -> Result<(), String> {
    let tcp = TcpStream::connect(&t.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", t.addr))?;
    let _ = tcp.set_nodelay(true);
    match &t.tls {
        Some((cfg, name)) => {
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS with {}: {e}", t.addr))?;
            exchange(tls, t, auth, body).await
        }
        None => exchange(tcp, t, auth, body).await,
    }
}

/// One request on a fresh connection; at most [`RESPONSE_MAX`] bytes of
/// the answer are read, so an endless answer can't grow the daemon.
async fn exchange<S>(
    io: S,
    t: &Target,
    auth: Option<&HeaderValue>,
    body: hyper::body::Bytes,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let mut req = hyper::Request::post(&t.path)
        .header(hyper::header::HOST, &t.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("kvm-root-tracer/", env!("CARGO_PKG_VERSION")),
        )
        .body(http_body_util::Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    if let Some(a) = auth {
        req.headers_mut()
            .insert(hyper::header::AUTHORIZATION, a.clone());
    }
    let work = async move {
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        let text = http_body_util::Limited::new(resp.into_body(), RESPONSE_MAX)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "HTTP {status}: {}",
                text.lines().next().unwrap_or("")
            ))
        }
    };
    tokio::pin!(conn);
    tokio::select! {
        r = work => r,
        c = &mut conn => Err(match c {
            Err(e) => format!("connection: {e}"),
            Ok(()) => "connection closed before an answer".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:9093", None).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("127.0.0.1:9093", "/api/v2/alerts")
        );
        let t = parse_url("http://am.local/prefix/", None).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("am.local:80", "/prefix/api/v2/alerts")
        );
        let t = parse_url("http://[::1]:9093", None).unwrap();
        assert_eq!(t.addr, "[::1]:9093");
        let tls = crate::web::client_tls(None).ok();
        if let Some(tls) = &tls {
            let t = parse_url("https://am.example", Some(tls)).unwrap();
            assert_eq!(t.addr, "am.example:443");
        }
        for bad in [
            "ftp://am",
            "http://user:pw@am:9093",
            "http://am:99999",
            "http://",
            "http://am/?x",
        ] {
            assert!(parse_url(bad, tls.as_ref()).is_err(), "{bad}");
        }
    }

    fn finding(kind: crate::detector::FindingKind) -> Finding {
        Finding {
            kind,
            severity: kind.severity(),
            ts_ns: 1,
            kvm: 0xffff_8881_0000_1000,
            userspace_pid: Some(7001),
            vcpu_id: Some(3),
            vcpu: None,
            evidence: vec![],
            explanation: "x".into(),
            vm: None,
        }
    }

    #[test]
    fn pushed_alerts_use_the_rules_names_and_no_kernel_pointer() {
        use crate::detector::FindingKind as K;
        let clock = ClockPair {
            monotonic_ns: 0,
            realtime_ns: 0,
        };
        let a = alert_for(&finding(K::MirrorRootStaleAtEntry), "hv1", clock);
        assert_eq!(a["labels"]["alertname"], "KvmMirrorRootInvalid");
        assert_eq!(a["labels"]["kind"], "mirror_root_stale_at_entry");
        assert!(a["labels"].get("kvm").is_none(), "{a}");
        assert!(!a.to_string().contains("ffff8881"), "{a}");
        // The VM's names, when known, are labels.
        let mut f = finding(K::MirrorRootStaleAtEntry);
        f.vm = Some(crate::vmid::VmIdentity {
            name: Some("td-guest-7".into()),
            uuid: Some("6b29fc40-ca47-1067-b31d-00dd010662da".into()),
            libvirt_domain: None,
        });
        let a = alert_for(&f, "hv1", clock);
        assert_eq!(a["labels"]["vm_name"], "td-guest-7");
        assert_eq!(
            a["labels"]["vm_uuid"],
            "6b29fc40-ca47-1067-b31d-00dd010662da"
        );
        assert!(a["labels"].get("libvirt_domain").is_none(), "{a}");
        // Every alertname a push can carry is a rule in dist/ (or info).
        let rules = include_str!("../../dist/prometheus/kvm-root-tracer.rules.yml");
        for k in K::ALL {
            assert!(
                k.severity() == Severity::Info
                    || rules.contains(&format!("- alert: {}\n", k.alertname())),
                "{}",
                k.alertname()
            );
        }
    }

    #[test]
    fn findings_below_the_minimum_severity_are_not_pushed() {
        use crate::detector::FindingKind as K;
        let (tx, mut rx) = mpsc::channel(8);
        let sink = AlertSink {
            queues: vec![("http://am".into(), tx)],
            min_severity: Severity::Warning,
            host: "hv1".into(),
            clock: ClockPair {
                monotonic_ns: 0,
                realtime_ns: 0,
            },
            metrics: SharedMetrics::default(),
        };
        sink.send(&finding(K::ZapStorm));
        assert!(rx.try_recv().is_err(), "an info zap_storm was pushed");
        sink.send(&finding(K::MmuLoadFailed));
        assert!(rx.try_recv().is_ok(), "a warning was not pushed");
    }
}
