//! Findings to Alertmanager (`POST /api/v2/alerts`), from a background
//! task: the pipeline only `try_send`s into a bounded queue, so alerting
//! never blocks tracing. Each batch is retried with exponential back-off a
//! bounded number of times; what can't be delivered is counted. The event
//! log keeps every finding regardless.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    config::AlertmanagerConfig,
    detector::{Finding, Severity},
    log::{ClockPair, writer::utc_rfc3339},
    metrics::SharedMetrics,
};

/// The pipeline's end of the queue.
pub struct AlertSink {
    tx: mpsc::Sender<Value>,
    min_severity: Severity,
    host: String,
    clock: ClockPair,
    metrics: SharedMetrics,
}

/// The sender task, to drain on shutdown.
pub struct AlertTask(JoinHandle<()>);

impl AlertTask {
    /// Waits up to `deadline` for queued alerts to go out.
    pub async fn drain(self, deadline: Duration) {
        let _ = tokio::time::timeout(deadline, self.0).await;
    }
}

/// `http://host:port[/prefix]`.
struct Target {
    addr: String,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} must start with http://"))?;
    let (hostport, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let prefix = prefix.trim_end_matches('/');
    Ok(Target {
        addr,
        host: hostport.to_owned(),
        path: if prefix.is_empty() {
            "/api/v2/alerts".into()
        } else {
            format!("/{prefix}/api/v2/alerts")
        },
    })
}

/// Starts the sender; returns the sink for the pipeline.
pub fn spawn(
    cfg: &AlertmanagerConfig,
    host: String,
    clock: ClockPair,
    metrics: SharedMetrics,
) -> Result<(AlertSink, AlertTask), String> {
    let target = parse_url(&cfg.url)?;
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    let task = tokio::spawn(sender(rx, target, cfg.clone(), metrics.clone()));
    Ok((
        AlertSink {
            tx,
            min_severity: cfg.min_severity,
            host,
            clock,
            metrics,
        },
        AlertTask(task),
    ))
}

impl AlertSink {
    /// Queues a finding at or above the minimum severity; never blocks. A
    /// full queue drops and counts it.
    pub fn send(&self, f: &Finding) {
        if f.severity < self.min_severity {
            return;
        }
        let alert = alert_for(f, &self.host, self.clock);
        if self.tx.try_send(alert).is_err() {
            self.metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .alerts_dropped += 1;
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
    mut rx: mpsc::Receiver<Value>,
    target: Target,
    cfg: AlertmanagerConfig,
    metrics: SharedMetrics,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let body = Value::Array(std::mem::take(&mut batch)).to_string();
        let n = body_len(&body);
        let mut delay = Duration::from_millis(500);
        let mut ok = false;
        for attempt in 1..=cfg.attempts {
            match tokio::time::timeout(cfg.timeout, post(&target, &body)).await {
                Ok(Ok(())) => {
                    ok = true;
                    break;
                }
                Ok(Err(e)) => log::warn!("alertmanager: attempt {attempt}: {e}"),
                Err(_) => log::warn!("alertmanager: attempt {attempt}: timed out"),
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
            m.alerts_sent += n;
        } else {
            m.alerts_failed += n;
            eprintln!(
                "tracer: warning: {n} alert(s) not delivered to Alertmanager after {} attempt(s); \
                 they are in the event log",
                cfg.attempts
            );
        }
    }
}

/// The most of an Alertmanager response that is read.
const RESPONSE_MAX: u64 = 64 << 10;

fn body_len(body: &str) -> u64 {
    serde_json::from_str::<Vec<Value>>(body).map_or(0, |v| v.len() as u64)
}

async fn post(t: &Target, body: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(&t.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", t.addr))?;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        t.path,
        t.host,
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    // At most RESPONSE_MAX bytes are read: an endless answer can't grow
    // the daemon's memory.
    let mut resp = Vec::new();
    (&mut s)
        .take(RESPONSE_MAX)
        .read_to_end(&mut resp)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&resp);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(format!(
            "HTTP {status}: {}",
            head.lines().last().unwrap_or("")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:9093").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("127.0.0.1:9093", "/api/v2/alerts")
        );
        let t = parse_url("http://am.local/prefix/").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("am.local:80", "/prefix/api/v2/alerts")
        );
        assert!(parse_url("https://am").is_err());
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
            tx,
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
