//! The metrics endpoint's HTTP side: binding, serving with bounded
//! connections and time, basic auth, content negotiation (OpenMetrics or the
//! Prometheus text format), and `/healthz`.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::{MetricsState, SharedMetrics, SharedWeb, render};

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 128;

/// A connection must finish its TLS handshake and each request head within
/// this, or it is closed (an idle keep-alive connection too).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection lives at most this long (a reader that takes a scrape's
/// answer a byte a second can't hold a connection slot forever).
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_mins(1);

/// Binds `addr` at once, before the runtime runs anything else (the
/// endpoint answers while the kernel is still being inspected); `None`
/// when it can't be bound now.
pub fn bind_now(addr: std::net::SocketAddr) -> Option<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).ok()?;
    l.set_nonblocking(true).ok()?;
    Some(l)
}

/// Serves `bound` (from [`bind_now`]), or binds `addr` and serves it,
/// retrying every `retry` while it can't be bound (another process holds
/// the port): a metrics endpoint that can't bind is a loud warning, never a
/// reason to stop tracing.
pub async fn serve_bound(
    addr: std::net::SocketAddr,
    bound: Option<std::net::TcpListener>,
    state: SharedMetrics,
    web: SharedWeb,
    retry: std::time::Duration,
) {
    let mut failures = 0u64;
    let mut bound = bound.and_then(|l| TcpListener::from_std(l).ok());
    let tls = web
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .tls
        .is_some();
    let scheme = if tls { "https" } else { "http" };
    loop {
        let attempt = match bound.take() {
            Some(l) => Ok(l),
            None => TcpListener::bind(addr).await,
        };
        match attempt {
            Ok(listener) => {
                eprintln!("tracer: metrics on {scheme}://{addr}/metrics");
                serve(listener, state, web).await;
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

/// Serves `GET /metrics` (and `GET /healthz`) with hyper until the task is
/// dropped, over TLS and behind basic auth when `web` says so. At most
/// [`MAX_CONNECTIONS`] at once; handshakes and request heads have
/// [`REQUEST_TIMEOUT`]; `accept` errors (out of file descriptors) back off
/// instead of spinning.
pub async fn serve(listener: TcpListener, state: SharedMetrics, web: SharedWeb) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Full: close it now rather than hold a descriptor for it.
            drop(sock);
            continue;
        };
        let state = state.clone();
        let web = web
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection(sock, state, web)).await;
        });
    }
}

pub(super) type Body = http_body_util::Full<hyper::body::Bytes>;

pub(super) fn reply(status: u16, ctype: &str, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("a valid status");
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_str(ctype).expect("a valid content type"),
    );
    r
}

/// The content type of the OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the Prometheus text format answer.
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) async fn respond<B>(
    req: &hyper::Request<B>,
    state: &SharedMetrics,
    auth: Option<&crate::web::BasicAuth>,
) -> hyper::Response<Body> {
    if let Some(auth) = auth {
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(hyper::header::HeaderValue::as_bytes);
        if !auth.allows(header).await {
            let mut r = reply(401, "text/plain", "Unauthorized\n".into());
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"kvm-root-tracer\""),
            );
            return r;
        }
    }
    let head = req.method() == hyper::Method::HEAD;
    if req.method() != hyper::Method::GET && !head {
        let mut r = reply(405, "text/plain", "GET only\n".into());
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let snapshot = || {
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    };
    let mut r = match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let text = render(&snapshot());
            if wants_openmetrics(accept) {
                reply(200, OPENMETRICS, text)
            } else {
                reply(200, TEXT_004, openmetrics_to_text004(&text))
            }
        }
        "/healthz" => {
            let (status, body) = health(&snapshot());
            reply(status, "text/plain; charset=utf-8", body)
        }
        _ => reply(404, "text/plain", "try /metrics or /healthz\n".into()),
    };
    if head {
        *r.body_mut() = Body::default();
    }
    r
}

/// `/healthz`: the status and the reason.
pub fn health(s: &MetricsState) -> (u16, String) {
    // 503 while blind to what the tool exists to watch; a failing log alone
    // is still 200: detection goes on without the log, and a restart would
    // not bring the disk back. Every reason is a line of its own.
    let mut lines = Vec::new();
    if let Some(why) = &s.waiting {
        lines.push(format!("blind: not tracing: {why}"));
    }
    if let Some(why) = &s.entry_gate_blind {
        lines.push(format!("blind: entry check: {why}"));
    }
    let status = if lines.is_empty() { 200 } else { 503 };
    if let Some(why) = &s.log_failing {
        lines.push(format!("degraded: event log: {why}"));
    }
    if lines.is_empty() {
        lines.push("ok".into());
    }
    (status, lines.join("\n") + "\n")
}

/// Whether an `Accept` header prefers OpenMetrics to the Prometheus text
/// format 0.0.4 (by q-value; a tie, no header or `*/*` is text 0.0.4, what
/// every tool reads).
pub fn wants_openmetrics(accept: &str) -> bool {
    let (mut om, mut text) = (0.0f32, 0.0f32);
    for item in accept.split(',') {
        let mut parts = item.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut q = 1.0f32;
        let mut version = None;
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.trim().parse().unwrap_or(0.0),
                    "version" => version = Some(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        match media.as_str() {
            // 0.0.1 is an earlier OpenMetrics draft; ours is 1.0.0.
            "application/openmetrics-text" if version.as_deref().is_none_or(|v| v == "1.0.0") => {
                om = om.max(q);
            }
            "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => text = text.max(q),
            _ => {}
        }
    }
    om > text
}

/// The same metrics in the Prometheus text format 0.0.4: counters named
/// with their `_total`, `info` as a gauge named `_info`, no `# UNIT` and no
/// `# EOF` (what `promtool check metrics`, Telegraf and netdata read).
pub fn openmetrics_to_text004(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some((h, text)) = help.take() {
                debug_assert_eq!(h, rest.split(' ').next().unwrap_or(""));
                out.push_str("# HELP ");
                out.push_str(&name);
                out.push(' ');
                out.push_str(text);
                out.push('\n');
            }
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
        } else if line.starts_with("# ") {
            // # UNIT, # EOF: OpenMetrics only.
        } else if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub(super) async fn connection(
    sock: tokio::net::TcpStream,
    state: SharedMetrics,
    web: crate::web::WebServer,
) {
    let auth = web.auth.clone();
    match &web.tls {
        Some(acceptor) => {
            if let Ok(Ok(tls)) = tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(sock)).await
            {
                http1(tls, state, auth).await;
            }
        }
        None => http1(sock, state, auth).await,
    }
}

pub(super) async fn http1<S>(io: S, state: SharedMetrics, auth: Option<Arc<crate::web::BasicAuth>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let (state, auth) = (state.clone(), auth.clone());
        async move { Ok::<_, std::convert::Infallible>(respond(&req, &state, auth.as_deref()).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(16 << 10)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}
