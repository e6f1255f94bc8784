//! Fleet alerting against the real thing: Debian's Prometheus (and
//! promtool) and Alertmanager on loopback, the shipped rules and systemd
//! unit, and the daemon's config errors.
//!
//! The daemon tests need root, /dev/kvm and the `prometheus`,
//! `prometheus-alertmanager` packages (`.ci/run` installs them). Where
//! something is missing they fail saying what, unless TRACER_SKIP_LIVE=1,
//! in which case they print SKIPPED and the reason.

#[path = "support/cli.rs"]
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{free_port, model_log, tracer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// True when the test can run; panics (or skips when asked) otherwise.
fn needs(test: &str, root: bool, bins: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if root && unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_owned());
    }
    if root && !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm".to_owned());
    }
    for b in bins {
        if !Path::new(b).exists() {
            missing.push((*b).to_owned());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("needs {}", missing.join(", "));
    if std::env::var_os("TRACER_SKIP_LIVE").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {why} (TRACER_SKIP_LIVE=1)");
        return false;
    }
    panic!(
        "{test} {why}: run as root with /dev/kvm and `apt-get install prometheus \
         prometheus-alertmanager`, or set TRACER_SKIP_LIVE=1 to skip explicitly"
    );
}

/// A GET on loopback; the body of a 200 answer.
fn http_get(port: u16, path: &str) -> Option<String> {
    support::http(port, path).and_then(|(code, body)| (code == 200).then_some(body))
}

/// Polls `f` until it returns Some, for at most `limit`.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// A child process killed when the test ends, whatever happens.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alertmanager(dir: &Path) -> (Guard, u16) {
    alertmanager_with(
        dir,
        "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
    )
}

fn alertmanager_with(dir: &Path, config: &str) -> (Guard, u16) {
    let port = free_port();
    let cfg = dir.join("am.yml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new("/usr/bin/prometheus-alertmanager")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.path={}", dir.join("am").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start alertmanager");
    let guard = Guard(child);
    wait_for(Duration::from_secs(20), || http_get(port, "/api/v2/status"))
        .expect("alertmanager answers");
    (guard, port)
}

/// A Prometheus on loopback with `config` (its data in `dir/tsdb`); (guard,
/// port).
fn prometheus(dir: &Path, config: &str) -> (Guard, u16) {
    let port = free_port();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new("/usr/bin/prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    (Guard(child), port)
}

/// A simulated log with mirror-root findings, for `--inject`.
fn faulty_log(dir: &Path) -> PathBuf {
    model_log(dir, "sim.jsonl", ("mirror-freed-by-zap", "hotplug"), (2, 5))
}

/// `tracer run` for a minute with `args`, logging into `dir/log`; killed
/// when dropped.
fn daemon(dir: &Path, args: &[&str]) -> Guard {
    Guard(
        tracer()
            .args(["run", "--duration", "60s"])
            .args(args)
            .arg("--log-dir")
            .arg(dir.join("log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `tracer run` serving metrics on `port`.
fn metrics_daemon(dir: &Path, port: u16) -> Guard {
    daemon(dir, &["--metrics-listen", &format!("127.0.0.1:{port}")])
}

/// `tracer run` pushing to the Alertmanager on `am_port` what `inject`
/// holds, with the alert host `hv-test`.
fn pushing_daemon(dir: &Path, am_port: u16, inject: &Path) -> Guard {
    daemon(
        dir,
        &[
            "--metrics-listen",
            "",
            "--alert-host",
            "hv-test",
            "--alertmanager-url",
            &format!("http://127.0.0.1:{am_port}"),
            "--inject",
            inject.to_str().unwrap(),
        ],
    )
}

#[test]
fn shipped_rules_pass_promtool() {
    if !needs("shipped_rules_pass_promtool", false, &["/usr/bin/promtool"]) {
        return;
    }
    let out = Command::new("/usr/bin/promtool")
        .args(["check", "rules"])
        .arg(repo().join("dist/prometheus/kvm-root-tracer.rules.yml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
}

/// `promtool test rules` on the shipped unit tests: a first finding on a
/// fresh host, a finding before the first scrape, forbidden entries, a
/// single burst of drops, the daemon down, and every other rule.
#[test]
fn shipped_rules_pass_their_promtool_unit_tests() {
    if !needs(
        "shipped_rules_pass_their_promtool_unit_tests",
        false,
        &["/usr/bin/promtool"],
    ) {
        return;
    }
    let tests = repo().join("dist/prometheus/kvm-root-tracer.rules.test.yml");
    let out = Command::new("/usr/bin/promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS"), "{text}");
    // Every rule has a case.
    let rules =
        std::fs::read_to_string(repo().join("dist/prometheus/kvm-root-tracer.rules.yml")).unwrap();
    let cases = std::fs::read_to_string(&tests).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                cases.contains(&format!("alertname: {name}")),
                "no promtool case for {name}"
            );
        }
    }
}

/// Every findings series (each kind with its severity), the events of each
/// attached probe and the drops exist at 0 from start-up, before any event:
/// `increase()` needs that sample to see the first finding.
#[test]
fn every_series_exists_at_zero_from_start_up() {
    if !needs("every_series_exists_at_zero_from_start_up", true, &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let _daemon = metrics_daemon(dir.path(), mport);
    let text =
        wait_for(Duration::from_secs(30), || http_get(mport, "/metrics")).expect("metrics served");
    for kind in tracer::detector::FindingKind::ALL {
        let series = format!(
            "kvm_root_tracer_findings_total{{kind=\"{}\",severity=\"{}\"}} 0",
            kind.name(),
            kind.severity().name()
        );
        assert!(text.contains(&series), "no {series} in:\n{text}");
    }
    assert!(
        text.contains(
            "kvm_root_tracer_events_total{probe=\"kvm_mmu_zap_all_fast_tp\",kind=\"zap_all_fast\"} "
        ),
        "{text}"
    );
    assert!(
        text.contains("kvm_root_tracer_ringbuf_drops_total{probe=\"kvm_entry_gate\"} "),
        "{text}"
    );
}

#[test]
fn systemd_unit_verifies_where_systemd_analyze_exists() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("SKIPPED systemd_unit_verifies: systemd-analyze is not installed here");
        return;
    }
    let unit =
        std::fs::read_to_string(repo().join("dist/systemd/kvm-root-tracer.service")).unwrap();
    assert!(unit.contains("CapabilityBoundingSet=CAP_BPF CAP_PERFMON\n"));
    // verify checks that ExecStart exists: point it at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvm-root-tracer.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tracer", env!("CARGO_BIN_EXE_tracer")),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("kvm-root-tracer.service:"),
        "warnings about the unit: {err}"
    );
}

/// `systemd-analyze security --offline` of the shipped unit: the overall
/// exposure, and the lines that name `what`.
fn unit_security() -> Option<(f64, String)> {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("SKIPPED the unit's security score: systemd-analyze is not installed here");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvm-root-tracer.service");
    std::fs::copy(repo().join("dist/systemd/kvm-root-tracer.service"), &path).unwrap();
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let score = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for").nth(1))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {text}"));
    Some((score, text))
}

#[test]
fn systemd_unit_exposure_stays_at_or_below_2_6() {
    let Some((score, text)) = unit_security() else {
        return;
    };
    eprintln!("systemd-analyze security: overall exposure {score}");
    assert!(score <= 2.6, "exposure {score}:\n{text}");
    // ProtectProc= stays default on purpose: the daemon reads VMMs' command
    // lines (VM names), and libvirt runs QEMU as another user.
    for ok in ["ProtectKernelTunables=", "SystemCallFilter=~@resources"] {
        assert!(
            text.lines().any(|l| l.starts_with('✓') && l.contains(ok)),
            "{ok} is not satisfied:\n{text}"
        );
    }
    assert!(!text.contains("char-rtc"), "{text}");
    let unit =
        std::fs::read_to_string(repo().join("dist/systemd/kvm-root-tracer.service")).unwrap();
    assert_eq!(
        unit.matches("\nReadWritePaths=").count(),
        0,
        "StateDirectory= covers it"
    );
    assert!(unit.contains("\nIPAddressDeny=any\n"));
    assert!(unit.contains("\nProtectProc=default\n"));
    assert!(unit.contains("\nIPAddressAllow=localhost\n"));
}

/// The system calls a `SystemCallFilter=` group stands for, nested groups
/// expanded.
fn syscall_group(name: &str, out: &mut std::collections::BTreeSet<String>) {
    if !name.starts_with('@') {
        out.insert(name.to_owned());
        return;
    }
    let text = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    for line in text.lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        syscall_group(item, out);
    }
}

/// What the unit's `SystemCallFilter=` lines allow, in order: the first is
/// an allow list, `~` lines take away, later plain lines add.
fn unit_allowed_syscalls() -> std::collections::BTreeSet<String> {
    let unit =
        std::fs::read_to_string(repo().join("dist/systemd/kvm-root-tracer.service")).unwrap();
    let mut allowed = std::collections::BTreeSet::new();
    for line in unit.lines() {
        let Some(v) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (deny, items) = match v.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, v),
        };
        let mut set = std::collections::BTreeSet::new();
        for item in items.split_whitespace() {
            syscall_group(item, &mut set);
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    allowed
}

/// Every system call the daemon makes, traced with strace through its
/// start, attaching, recording, rotation, compression, a scrape, SIGHUP
/// and stop, is one the shipped unit's filter allows: the tighter filter
/// (no @privileged, no @resources) does not kill it.
#[test]
fn the_daemon_makes_only_system_calls_the_unit_allows() {
    if !needs(
        "the_daemon_makes_only_system_calls_the_unit_allows",
        true,
        &["/usr/bin/strace", "/usr/bin/systemd-analyze"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inject = model_log(
        dir.path(),
        "busy.jsonl",
        ("mirror-freed-by-zap", "fleet"),
        (2, 3),
    );
    let port = free_port();
    let trace = dir.path().join("strace.txt");
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_tracer"))
        .args([
            "run",
            "--duration",
            "8s",
            "--segment-age",
            "2s",
            "--log-dir",
        ])
        .arg(dir.path().join("log"))
        .args(["--metrics-listen", &format!("127.0.0.1:{port}"), "--inject"])
        .arg(&inject)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while http_get(port, "/metrics").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never served metrics"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The daemon is strace's child.
    let daemon =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
            .unwrap_or_default();
    for pid in daemon.split_whitespace() {
        // SAFETY: kill has no memory preconditions; the pid is our grandchild.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGHUP) };
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{err}");
    let text = std::fs::read_to_string(&trace).unwrap();
    let used: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            let call = l.split_whitespace().nth(1)?;
            let name = call.split('(').next()?;
            (call.contains('(')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .then(|| name.to_owned())
        })
        .collect();
    assert!(used.contains("bpf"), "the trace saw the daemon: {used:?}");
    let allowed = unit_allowed_syscalls();
    let denied: Vec<&String> = used.iter().filter(|s| !allowed.contains(*s)).collect();
    eprintln!(
        "{} distinct system calls, all allowed: {:?}",
        used.len(),
        denied.is_empty()
    );
    assert!(
        denied.is_empty(),
        "the unit's SystemCallFilter denies {denied:?}"
    );
    for s in [
        "setuid",
        "chown",
        "setrlimit",
        "sched_setaffinity",
        "ptrace",
    ] {
        assert!(!allowed.contains(s), "{s} should be filtered out");
    }
}

#[test]
fn config_errors_name_file_key_and_reason_before_attaching() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[log]\nmax_files = 100\nsegment_sise = \"1M\"\n").unwrap();
    let out = tracer()
        .arg("run")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("config {}", bad.display())), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("unknown field `segment_sise`"), "{err}");
    assert!(!err.contains("attached"), "nothing attached: {err}");

    let out = tracer()
        .args(["run", "--metrics-listen", "nowhere"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("key `metrics.listen`"), "{err}");

    let out = tracer()
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("can't read config"));
}

#[test]
fn prometheus_scrapes_the_daemon() {
    if !needs(
        "prometheus_scrapes_the_daemon",
        true,
        &["/usr/bin/prometheus"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let _daemon = metrics_daemon(dir.path(), mport);
    wait_for(Duration::from_secs(30), || http_get(mport, "/metrics")).expect("metrics served");
    let (_prom, pport) = prometheus(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kvm-root-tracer\n    \
             static_configs:\n      - targets: ['127.0.0.1:{mport}']\n"
        ),
    );
    let query = |q: &str| -> Option<Vec<Value>> {
        let body = http_get(pport, &format!("/api/v1/query?query={q}"))?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?.clone();
        (!r.is_empty()).then_some(r)
    };
    let info = wait_for(Duration::from_mins(1), || {
        query("kvm_root_tracer_build_info")
    })
    .expect("Prometheus scraped kvm_root_tracer_build_info");
    assert_eq!(info[0]["metric"]["job"], "kvm-root-tracer");
    assert_eq!(info[0]["metric"]["version"], env!("CARGO_PKG_VERSION"));
    let up = query("up").expect("up");
    assert_eq!(up[0]["value"][1], "1");
    let attached = query("sum(kvm_root_tracer_probes%7Battach!=%22off%22%7D)").expect("probes");
    let n: f64 = attached[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(n >= 1.0, "probes attached: {n}");
}

#[test]
fn findings_reach_alertmanager_with_their_labels() {
    if !needs(
        "findings_reach_alertmanager_with_their_labels",
        true,
        &["/usr/bin/prometheus-alertmanager"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_am, port) = alertmanager(dir.path());
    let sim = faulty_log(dir.path());
    let (_daemon, found) = findings_daemon(
        dir.path(),
        &[
            "--metrics-listen",
            "",
            "--alert-host",
            "hv-test",
            "--alertmanager-url",
            &format!("http://127.0.0.1:{port}"),
            "--inject",
            sim.to_str().unwrap(),
        ],
    );
    let first = found
        .recv_timeout(Duration::from_mins(1))
        .expect("the daemon raised a finding");
    let [seen] = first_seen(|_| {
        let body = http_get(port, "/api/v2/alerts")?;
        let alerts: Vec<Value> = serde_json::from_str(&body).ok()?;
        (!alerts.is_empty()).then(Instant::now)
    });
    let seen = seen.expect("the finding arrived in Alertmanager");
    eprintln!(
        "fleet: finding → visible in one Alertmanager (plain HTTP, polling every 10 ms): {} ms",
        seen.saturating_duration_since(first).as_millis()
    );
    let alert = wait_for(Duration::from_mins(1), || {
        let body = http_get(port, "/api/v2/alerts")?;
        let alerts: Vec<Value> = serde_json::from_str(&body).ok()?;
        alerts
            .into_iter()
            .find(|a| a["labels"]["kind"] == "mirror_root_invalid_at_entry")
    })
    .expect("the finding arrived in Alertmanager");
    let l = &alert["labels"];
    // The Prometheus rule's name; the kind is a label; no kernel pointer.
    assert_eq!(l["alertname"], "KvmMirrorRootInvalid");
    assert!(l.get("kvm").is_none(), "{l}");
    assert_eq!(l["severity"], "critical");
    assert_eq!(l["host"], "hv-test");
    assert!(
        l["vmm_pid"]
            .as_str()
            .is_some_and(|p| p.parse::<i32>().is_ok()),
        "{l}"
    );
    assert!(l["vcpu"].is_string(), "{l}");
    assert!(
        alert["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("kvm_mmu_reload()")
    );
}

#[test]
fn alertmanager_down_loses_nothing_from_the_log_and_is_counted() {
    if !needs(
        "alertmanager_down_loses_nothing_from_the_log_and_is_counted",
        true,
        &[],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sim = faulty_log(dir.path());
    let closed = free_port();
    let log = dir.path().join("log");
    let out = tracer()
        .args(["run", "--duration", "4s", "--metrics-listen", ""])
        .arg("--alertmanager-url")
        .arg(format!("http://127.0.0.1:{closed}"))
        .args([
            "--alertmanager-attempts",
            "2",
            "--alertmanager-timeout",
            "200ms",
        ])
        .arg("--inject")
        .arg(&sim)
        .arg("--log-dir")
        .arg(&log)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("not delivered to Alertmanager"),
        "counted: {err}"
    );
    // Every finding is in the event log, and replay recomputes the same.
    let r = tracer::replay::replay(&[log], &tracer::replay::Filter::default(), |_, _| {}).unwrap();
    let expected = tracer::replay::replay(&[sim], &tracer::replay::Filter::default(), |_, _| {})
        .unwrap()
        .findings;
    assert!(!expected.is_empty());
    let recorded: Vec<_> = r
        .recorded_findings
        .iter()
        .map(|f| (f.kind, f.kvm, f.vcpu_id))
        .collect();
    let want: Vec<_> = expected
        .iter()
        .map(|f| (f.kind, f.kvm, f.vcpu_id))
        .collect();
    assert_eq!(recorded, want);
}

/// The shipped Alertmanager routing (dist/alertmanager) passes `amtool
/// check-config`, and with it one VM whose 8 vCPUs all run with an invalid
/// mirror root is one notification group, not eight.
#[test]
fn one_faulty_vm_is_one_alertmanager_group() {
    if !needs(
        "one_faulty_vm_is_one_alertmanager_group",
        true,
        &["/usr/bin/prometheus-alertmanager", "/usr/bin/amtool"],
    ) {
        return;
    }
    let shipped = repo().join("dist/alertmanager/kvm-root-tracer.yml");
    let out = Command::new("/usr/bin/amtool")
        .arg("check-config")
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(&shipped).unwrap();
    let (_am, port) = alertmanager_with(dir.path(), &config);
    // Two TDX VMs of 8 vCPUs each, through hot-plug cycles, on a kernel
    // that frees mirror roots under them.
    let log = model_log(
        dir.path(),
        "sim.jsonl",
        ("mirror-freed-by-zap", "hotplug"),
        (8, 5),
    );
    let _daemon = pushing_daemon(dir.path(), port, &log);
    let groups = wait_for(Duration::from_mins(1), || {
        let body = http_get(port, "/api/v2/alerts/groups")?;
        let groups: Vec<Value> = serde_json::from_str(&body).ok()?;
        let ours: Vec<Value> = groups
            .into_iter()
            .filter(|g| g["labels"]["alertname"] == "KvmMirrorRootInvalid")
            .collect();
        let vcpus: usize = ours
            .iter()
            .map(|g| g["alerts"].as_array().map_or(0, Vec::len))
            .sum();
        (vcpus >= 16).then_some(ours)
    })
    .expect("the 8 vCPUs' alerts arrived");
    let pids: std::collections::BTreeSet<String> = groups
        .iter()
        .flat_map(|g| g["alerts"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["labels"]["vmm_pid"].as_str().map(str::to_owned))
        .collect();
    let biggest = groups
        .iter()
        .map(|g| g["alerts"].as_array().map_or(0, Vec::len))
        .max()
        .unwrap_or(0);
    eprintln!(
        "{} group(s) for {} VM(s); the biggest holds {biggest} alert(s)",
        groups.len(),
        pids.len()
    );
    assert_eq!(groups.len(), pids.len(), "one group per VM: {groups:?}");
    assert!(biggest >= 8, "the VM's 8 vCPUs share one group: {groups:?}");
    for g in &groups {
        assert_eq!(
            g["receiver"]["name"], "hypervisor-pager",
            "critical pages: {g}"
        );
    }
}

/// A test CA and a server certificate for 127.0.0.1 and localhost, as PEM
/// files in `dir`: (ca.pem, server.pem, server.key), the last two also
/// named relative to `dir`.
fn pki(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kvm-root-tracer test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

/// A web config (exporter-toolkit format, read by the daemon and by
/// Alertmanager alike): TLS with `dir`'s server certificate (relative
/// paths) and one basic-auth user.
fn web_config(dir: &Path, user: &str, password: &str) -> PathBuf {
    let hash = bcrypt::hash(password, 4).unwrap();
    let path = dir.join("web.yml");
    std::fs::write(
        &path,
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n\
             basic_auth_users:\n  {user}: {hash}\n"
        ),
    )
    .unwrap();
    path
}

/// `curl` (status, body); status 0 when no HTTP answer came.
fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A scrape asked for in the Prometheus text format 0.0.4 passes `promtool
/// check metrics` (OpenMetrics' `info` type broke it, and Telegraf and
/// netdata with it); OpenMetrics is still served to whoever prefers it;
/// `process_*` metrics are there.
#[test]
fn a_text_scrape_passes_promtool_check_metrics() {
    if !needs(
        "a_text_scrape_passes_promtool_check_metrics",
        true,
        &["/usr/bin/promtool", "/usr/bin/curl"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let _daemon = metrics_daemon(dir.path(), mport);
    let url = format!("http://127.0.0.1:{mport}/metrics");
    wait_for(Duration::from_secs(30), || http_get(mport, "/metrics")).expect("metrics served");
    let head = |accept: &str| {
        let out = Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", "-H"])
            .arg(format!("Accept: {accept}"))
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    };
    assert!(
        head("text/plain;version=0.0.4").contains("content-type: text/plain; version=0.0.4"),
        "{}",
        head("text/plain;version=0.0.4")
    );
    // Prometheus 2.42's own Accept header prefers OpenMetrics.
    let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert!(
        head(prom).contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{}",
        head(prom)
    );
    let (code, text) = curl(&url, &["-H", "Accept: text/plain;version=0.0.4"]);
    assert_eq!(code, 200);
    for name in [
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
        "# TYPE kvm_root_tracer_findings_total counter",
        "# TYPE kvm_root_tracer_build_info gauge",
    ] {
        assert!(text.contains(name), "no {name:?} in:\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");
    let mut check = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("promtool check metrics: ok on a {} byte scrape", text.len());
}

/// `--web-config-file` as node_exporter reads it: TLS with the given
/// certificate and basic auth with bcrypt hashes; a real Prometheus scrapes
/// through both; wrong, missing credentials and plain HTTP get nothing.
#[test]
fn metrics_over_tls_with_basic_auth_as_the_web_config_says() {
    if !needs(
        "metrics_over_tls_with_basic_auth_as_the_web_config_says",
        true,
        &["/usr/bin/prometheus", "/usr/bin/curl"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let web = web_config(dir.path(), "prom", "scrape-secret");
    let mport = free_port();
    let _daemon = daemon(
        dir.path(),
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
            "--web-config-file",
            web.to_str().unwrap(),
        ],
    );
    let url = format!("https://127.0.0.1:{mport}/metrics");
    let ca_arg = ["--cacert", ca.to_str().unwrap()];
    let with = |extra: &[&str]| {
        let args: Vec<&str> = ca_arg
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        curl(&url, &args)
    };
    wait_for(Duration::from_secs(30), || {
        (with(&["-u", "prom:scrape-secret"]).0 == 200).then_some(())
    })
    .expect("metrics served over TLS to the right user");
    assert_eq!(with(&["-u", "prom:wrong"]).0, 401);
    assert_eq!(with(&["-u", "nobody:scrape-secret"]).0, 401);
    assert_eq!(with(&[]).0, 401);
    assert_eq!(
        curl(&format!("https://127.0.0.1:{mport}/healthz"), &ca_arg).0,
        401,
        "health is behind the same auth"
    );
    assert_ne!(
        curl(&format!("http://127.0.0.1:{mport}/metrics"), &[]).0,
        200,
        "plain HTTP on the TLS port"
    );
    assert_eq!(
        curl(&url, &["-k", "--tlsv1.3", "-u", "prom:scrape-secret"]).0,
        200
    );

    let (_prom, pport) = prometheus(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kvm-root-tracer\n    \
             scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      \
             username: prom\n      password: scrape-secret\n    static_configs:\n      \
             - targets: ['127.0.0.1:{mport}']\n",
            ca.display()
        ),
    );
    let up = wait_for(Duration::from_mins(1), || {
        let body = http_get(pport, "/api/v1/query?query=up")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?.first()?.clone();
        (r["value"][1] == "1").then_some(r)
    });
    assert!(up.is_some(), "Prometheus scraped over TLS with basic auth");
}

/// A web config the daemon can't use is exit 2, with the file and the
/// reason, before anything attaches (no root needed to see it).
#[test]
fn a_bad_web_config_is_exit_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (text, reason) in [
        ("basic_auth_users:\n  prom: plain\n", "not a bcrypt hash"),
        (
            "tls_server_config:\n  cert_file: none.pem\n  key_file: none.key\n",
            "none.pem",
        ),
        ("tls_config:\n  cert_file: a\n", "unknown field"),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
            "a:",
        ),
    ] {
        let web = dir.path().join("web.yml");
        std::fs::write(&web, text).unwrap();
        let out = tracer()
            .args(["run", "--duration", "1s", "--web-config-file"])
            .arg(&web)
            .arg("--log-dir")
            .arg(dir.path().join("log"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains("web.yml") && err.contains(reason),
            "{text}: {err}"
        );
        assert!(!err.contains("attached"), "{err}");
    }
}

/// `tracer run --findings-out -` with `args`; the receiver gets the moment
/// each finding line came out.
fn findings_daemon(dir: &Path, args: &[&str]) -> (Guard, std::sync::mpsc::Receiver<Instant>) {
    use std::io::BufRead as _;
    let mut child = tracer()
        .args(["run", "--duration", "60s", "--findings-out", "-"])
        .args(args)
        .arg("--log-dir")
        .arg(dir.join("log"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in std::io::BufReader::new(out).lines() {
            if tx.send(Instant::now()).is_err() {
                break;
            }
        }
    });
    (Guard(child), rx)
}

/// One Alertmanager replica of a two-replica cluster on loopback, served
/// over TLS with basic auth (`web`); (guard, web port).
fn cluster_replica(dir: &Path, name: &str, web: &Path, ports: (u16, u16, u16)) -> Guard {
    let (port, gossip, peer) = ports;
    let cfg = dir.join(format!("{name}.yml"));
    std::fs::write(
        &cfg,
        "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
    )
    .unwrap();
    Guard(
        Command::new("/usr/bin/prometheus-alertmanager")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.join(name).display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.config.file={}", web.display()))
            .arg(format!("--cluster.listen-address=127.0.0.1:{gossip}"))
            .arg(format!("--cluster.peer=127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start alertmanager"),
    )
}

/// When `check(i)` first came true for each i < N, polling every 10 ms
/// for 20 s at most.
fn first_seen<const N: usize>(
    mut check: impl FnMut(usize) -> Option<Instant>,
) -> [Option<Instant>; N] {
    let mut seen = [None; N];
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, s) in seen.iter_mut().enumerate() {
            *s = s.or_else(|| check(i));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// An alert counter's value for one Alertmanager URL, from a scrape.
fn alert_counter(text: &str, name: &str, url: &str) -> Option<f64> {
    let key = format!("{name}{{alertmanager=\"{url}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
}

/// GET on a replica of [`tls_cluster`] as the user `tracer`.
fn am_get(port: u16, path: &str, ca: &str) -> (u16, String) {
    curl(
        &format!("https://127.0.0.1:{port}{path}"),
        &["--cacert", ca, "-u", "tracer:am-secret"],
    )
}

/// Two Alertmanager replicas peered on loopback, served over TLS with
/// basic auth (`web`); returns once both see two peers.
fn tls_cluster(dir: &Path, web: &Path, ca: &str) -> (Vec<Guard>, u16, u16) {
    let (a1, a2, g1, g2) = (free_port(), free_port(), free_port(), free_port());
    let guards = vec![
        cluster_replica(dir, "am1", web, (a1, g1, g2)),
        cluster_replica(dir, "am2", web, (a2, g2, g1)),
    ];
    for port in [a1, a2] {
        wait_for(Duration::from_secs(30), || {
            let (code, body) = am_get(port, "/api/v2/status", ca);
            let v: Value = serde_json::from_str(&body).ok()?;
            let peers = v["cluster"]["peers"].as_array().map_or(0, Vec::len);
            (code == 200 && peers == 2).then_some(())
        })
        .expect("both replicas up and peered");
    }
    (guards, a1, a2)
}

/// A loopback port that accepts connections and never answers.
fn never_answers() -> u16 {
    let slow = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = slow.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in slow.incoming() {
            held.push(s);
        }
    });
    port
}

/// Every alert goes to both replicas of a real TLS + basic-auth
/// Alertmanager cluster, while a third URL is down and a fourth accepts
/// and never answers: neither delays the replicas, nor tracing (metrics
/// answer, events flow), and the down one is counted.
#[test]
fn alerts_reach_both_replicas_of_a_tls_alertmanager_cluster() {
    if !needs(
        "alerts_reach_both_replicas_of_a_tls_alertmanager_cluster",
        true,
        &["/usr/bin/prometheus-alertmanager", "/usr/bin/curl"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let web = web_config(dir.path(), "tracer", "am-secret");
    let ca_s = ca.to_str().unwrap().to_owned();
    let (_cluster, a1, a2) = tls_cluster(dir.path(), &web, &ca_s);
    let am = |port: u16, path: &str| am_get(port, path, &ca_s);
    let down = free_port();
    let slow_port = never_answers();
    std::fs::write(dir.path().join("pw"), "am-secret\n").unwrap();
    let mport = free_port();
    let config = dir.path().join("tracer.toml");
    std::fs::write(
        &config,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{mport}\"\n[alertmanager]\nurls = \
             [\"http://127.0.0.1:{slow_port}\", \"http://127.0.0.1:{down}\", \
             \"https://127.0.0.1:{a1}\", \"https://127.0.0.1:{a2}\"]\n\
             ca_file = \"{ca_s}\"\nbasic_auth = {{ username = \"tracer\", password_file = \"{}\" }}\n\
             timeout = \"30s\"\nattempts = 2\nhost = \"hv-ha\"\n",
            dir.path().join("pw").display()
        ),
    )
    .unwrap();
    let sim = faulty_log(dir.path());
    let (_daemon, found) = findings_daemon(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--inject",
            sim.to_str().unwrap(),
        ],
    );
    let first = found
        .recv_timeout(Duration::from_mins(1))
        .expect("the daemon raised a finding");
    let visible = |port: u16| {
        let (_, body) = am(port, "/api/v2/alerts");
        let alerts: Vec<Value> = serde_json::from_str(&body).ok()?;
        alerts
            .iter()
            .any(|a| a["labels"]["host"] == "hv-ha")
            .then(Instant::now)
    };
    let [t1, t2] = first_seen(|i| visible([a1, a2][i]));
    let (t1, t2) = (
        t1.expect("replica 1 got the alerts"),
        t2.expect("replica 2 got the alerts"),
    );
    let ms = |t: Instant| t.saturating_duration_since(first).as_millis();
    eprintln!(
        "fleet: finding → visible in Alertmanager (TLS + basic auth, curl polling every 10 ms): \
         replica 1 {} ms, replica 2 {} ms, both {} ms; a down and a never-answering URL beside them",
        ms(t1),
        ms(t2),
        ms(t1.max(t2))
    );
    // The never-answering URL has a 30 s timeout: had it been in the way,
    // the replicas would have waited for it.
    assert!(t1.max(t2) < first + Duration::from_secs(10));
    let metric = alert_counter;
    let text = wait_for(Duration::from_secs(20), || {
        let text = http_get(mport, "/metrics")?;
        let failed = metric(
            &text,
            "kvm_root_tracer_alerts_failed_total",
            &format!("http://127.0.0.1:{down}"),
        )?;
        (failed > 0.0).then_some(text)
    })
    .expect("the down Alertmanager's failures are counted, and metrics answer");
    for port in [a1, a2] {
        let sent = metric(
            &text,
            "kvm_root_tracer_alerts_sent_total",
            &format!("https://127.0.0.1:{port}"),
        );
        assert!(sent.is_some_and(|n| n >= 1.0), "{text}");
    }
    let slow_url = format!("http://127.0.0.1:{slow_port}");
    assert_eq!(
        metric(&text, "kvm_root_tracer_alerts_sent_total", &slow_url),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("kvm_root_tracer_events_total{") && !l.ends_with(" 0")),
        "events flow while an Alertmanager hangs:\n{text}"
    );
}

/// Every PromQL expression of the shipped Grafana dashboard parses (promtool
/// checks it as a recording rule, with Grafana's variables filled in), and
/// every metric it names is one the daemon exports.
#[test]
fn the_grafana_dashboard_queries_real_metrics_with_valid_promql() {
    if !needs(
        "the_grafana_dashboard_queries_real_metrics_with_valid_promql",
        false,
        &["/usr/bin/promtool"],
    ) {
        return;
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dist/grafana/kvm-root-tracer.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let grafana_vars = |e: &str| {
        e.replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
    };
    let rules: String = std::iter::once("groups:\n  - name: grafana\n    rules:\n".to_owned())
        .chain(exprs.iter().enumerate().map(|(i, e)| {
            format!(
                "      - record: grafana:panel_{i}\n        expr: {}\n",
                serde_json::to_string(&grafana_vars(e)).unwrap()
            )
        }))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("grafana.rules.yml");
    std::fs::write(&rules_file, &rules).unwrap();
    let out = Command::new("/usr/bin/promtool")
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // What the daemon exports, every family with a series.
    let mut s = tracer::metrics::MetricsState::default();
    s.events.insert(("p".into(), "k".into()), 1);
    s.findings.insert(("k".into(), "critical".into()), 1);
    s.drops.insert("p".into(), 1);
    s.probes.insert("kprobe".into(), 1);
    s.programs
        .insert(("p".into(), "kprobe".into(), "t".into()), true);
    s.features.insert("f".into(), true);
    s.bpf.insert("p".into(), (1, 1));
    for m in [
        &mut s.alerts_sent,
        &mut s.alerts_failed,
        &mut s.alerts_dropped,
    ] {
        m.insert("http://am".into(), 1);
    }
    let exported = tracer::metrics::openmetrics_to_text004(&tracer::metrics::render(&s));
    let names: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for e in exprs.iter().chain(std::iter::once(
        &dash["templating"]["list"][1]["query"]
            .as_str()
            .unwrap()
            .to_owned(),
    )) {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("kvm_root_tracer_") || word.starts_with("process_") {
                used.insert(word.to_owned());
            }
        }
    }
    for n in &used {
        assert!(names.contains(n.as_str()), "{n} is not exported: {names:?}");
    }
    eprintln!(
        "grafana: {} expressions valid, {} metric names all exported",
        exprs.len(),
        used.len()
    );
}

/// `tracer run --check-config`: 0 and a summary for a config that works,
/// 2 and the reason for one that doesn't (files it names included); no
/// root needed, nothing attached.
#[test]
fn check_config_exits_0_or_2_without_attaching() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[alertmanager]\nurls = [\"http://127.0.0.1:9093\", \"http://127.0.0.1:9094\"]\n\
         [log]\ncompression = \"gzip\"\n",
    )
    .unwrap();
    let out = tracer()
        .args(["run", "--check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("config ok"), "{stdout}");
    assert!(stdout.contains("http://127.0.0.1:9094"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("attached"));
    for (text, reason) in [
        ("[log]\ncompression = \"lz4\"\n", "compression"),
        (
            "[alertmanager]\nurls = [\"https://am:9093\"]\nca_file = \"/nonexistent/ca.pem\"\n",
            "/nonexistent/ca.pem",
        ),
        (
            "[alertmanager]\nurls = [\"http://am\"]\nbearer_token_file = \"/nonexistent/t\"\n",
            "bearer_token_file",
        ),
        (
            "[metrics]\nweb_config_file = \"/nonexistent/web.yml\"\n",
            "web.yml",
        ),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = tracer()
            .args(["run", "--check-config", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(reason), "{text}: {err}");
    }
}

/// What a scrape costs with 10,000 vCPUs tracked (100 VMs of 100, one in
/// four TDX): the metrics have no per-vCPU or per-VM series, so the answer
/// stays small whatever the host runs. Prints bytes and milliseconds.
#[test]
fn a_scrape_at_10000_tracked_vcpus_stays_small() {
    if !needs("a_scrape_at_10000_tracked_vcpus_stays_small", true, &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fleet = model_log(dir.path(), "fleet.jsonl", ("mainline", "fleet"), (100, 1));
    let mport = free_port();
    let _daemon = daemon(
        dir.path(),
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
            "--inject",
            fleet.to_str().unwrap(),
        ],
    );
    let gauge = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    wait_for(Duration::from_mins(1), || {
        let text = http_get(mport, "/metrics")?;
        (gauge(&text, "kvm_root_tracer_tracked_vcpus ")? >= 10_000.0).then_some(())
    })
    .expect("10,000 vCPUs tracked");
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let text = http_get(mport, "/metrics").expect("a scrape");
        times.push(t.elapsed());
        bytes = text.len();
    }
    times.sort();
    eprintln!(
        "scrape at 10,000 tracked vCPUs: {bytes} bytes; median {:.2} ms, max {:.2} ms over 20 \
         (debug build, loopback, HTTP/1.0)",
        times[10].as_secs_f64() * 1e3,
        times[19].as_secs_f64() * 1e3
    );
    assert!(bytes < 64 << 10, "{bytes} bytes");
}

/// The operator's path end to end: a fresh daemon, a real Prometheus with
/// the shipped rules scraping it, the shipped Alertmanager routing. The
/// first critical finding fires `KvmMirrorRootInvalid` and gives exactly one
/// notification group; no label anywhere (scrape, Prometheus alert,
/// Alertmanager group) carries a kernel address.
#[test]
fn the_first_critical_finding_fires_the_shipped_rule_as_one_group() {
    if !needs(
        "the_first_critical_finding_fires_the_shipped_rule_as_one_group",
        true,
        &["/usr/bin/prometheus", "/usr/bin/prometheus-alertmanager"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(repo().join("dist/alertmanager/kvm-root-tracer.yml")).unwrap();
    let (_am, am_port) = alertmanager_with(dir.path(), &shipped);
    // One faulty TDX VM of 4 vCPUs (churn: one VM at a time).
    let log = model_log(
        dir.path(),
        "one.jsonl",
        ("mirror-freed-by-zap", "churn"),
        (4, 5),
    );
    let mport = free_port();
    let _daemon = daemon(
        dir.path(),
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
            "--inject",
            log.to_str().unwrap(),
        ],
    );
    let (_prom, pport) = prometheus(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
             scrape_configs:\n  - job_name: kvm-root-tracer\n    static_configs:\n      \
             - targets: ['127.0.0.1:{mport}']\n",
            repo()
                .join("dist/prometheus/kvm-root-tracer.rules.yml")
                .display()
        ),
    );
    let groups = wait_for(Duration::from_mins(2), || {
        let body = http_get(am_port, "/api/v2/alerts/groups")?;
        let groups: Vec<Value> = serde_json::from_str(&body).ok()?;
        let ours: Vec<Value> = groups
            .into_iter()
            .filter(|g| {
                g["alerts"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|a| a["labels"]["alertname"] == "KvmMirrorRootInvalid")
                })
            })
            .collect();
        (!ours.is_empty()).then_some(ours)
    })
    .expect("KvmMirrorRootInvalid reached Alertmanager through the shipped rule");
    assert_eq!(groups.len(), 1, "one notification group: {groups:#?}");
    assert_eq!(
        groups[0]["receiver"]["name"], "hypervisor-pager",
        "{}",
        groups[0]
    );
    let scrape = http_get(mport, "/metrics").unwrap();
    let rules = http_get(pport, "/api/v1/alerts").unwrap();
    for (what, text) in [
        ("scrape", scrape.as_str()),
        ("Prometheus alerts", rules.as_str()),
        (
            "Alertmanager groups",
            &serde_json::to_string(&groups).unwrap(),
        ),
    ] {
        assert!(
            !text.contains("0xffff") && !text.contains("ffff88"),
            "a kernel address in the {what}: {text}"
        );
    }
}
