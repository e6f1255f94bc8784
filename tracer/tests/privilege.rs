//! Issue 14, items 4 and 6: least privilege and visible blindness, on the
//! real kernel. Capabilities, not the uid, decide who can trace; a daemon
//! started before KVM waits for it (503 meanwhile); a blind entry gate is a
//! gauge and a 503; missing BPF stats are a warning and a gauge.
//!
//! These need root and /dev/kvm; without them they fail saying so, unless
//! TRACER_SKIP_LIVE=1, in which case they print SKIPPED and the reason.

#![allow(
    clippy::float_cmp,
    reason = "the gauges compared are exact small integers"
)]

#[allow(dead_code, reason = "only the guest that runs to HLT is used here")]
#[path = "support/kvm.rs"]
mod kvm;
#[path = "support/cli.rs"]
mod support;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use support::{free_port, http, poll, tracer};

fn live_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("TRACER_SKIP_LIVE").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: needs root and /dev/kvm (TRACER_SKIP_LIVE=1)");
        return false;
    }
    panic!("{test} needs root and /dev/kvm, or TRACER_SKIP_LIVE=1 to skip explicitly");
}

/// A gauge's value (the sum over its series matching `prefix`).
fn gauge(text: &str, prefix: &str) -> Option<f64> {
    let v: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// A folder the user nobody owns (for its event log).
fn nobodys_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    dir
}

/// `setpriv` as nobody, with `caps` ambient (e.g. "+bpf,+perfmon").
fn as_nobody(caps: Option<&str>) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if let Some(caps) = caps {
        c.arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"));
    }
    c.arg(env!("CARGO_BIN_EXE_tracer"));
    c
}

/// The uid doesn't decide; CAP_BPF and CAP_PERFMON do. Without them the
/// error names them (exit 3); with them, as nobody, the daemon attaches,
/// and the BPF stats it can't turn on (BPF_ENABLE_STATS needs
/// CAP_SYS_ADMIN) are a warning on stderr and a 0 gauge, not a silent 0.
#[test]
fn capabilities_not_the_uid_decide_who_can_trace() {
    if !live_or_skip("capabilities_not_the_uid_decide_who_can_trace") {
        return;
    }
    let dir = nobodys_dir();
    let log = dir.path().join("log");
    let out = as_nobody(None)
        .args([
            "run",
            "--duration",
            "1s",
            "--metrics-listen",
            "",
            "--log-dir",
        ])
        .arg(&log)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("CAP_BPF and CAP_PERFMON"), "{err}");

    let port = free_port();
    let child = as_nobody(Some("+bpf,+perfmon"))
        .args(["run", "--duration", "20s", "--log-dir"])
        .arg(&log)
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let text = poll(Duration::from_secs(30), || {
        let (code, text) = http(port, "/metrics")?;
        (code == 200 && gauge(&text, "kvm_root_tracer_tracing ") == Some(1.0)).then_some(text)
    });
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = text.unwrap_or_else(|| panic!("never traced as nobody with caps: {err}"));
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("attached raw-tracepoint"), "{err}");
    let stats = gauge(
        &text,
        "kvm_root_tracer_feature_enabled{feature=\"bpf-stats\"}",
    );
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|s| s.trim() == "1");
    if sysctl {
        assert_eq!(stats, Some(1.0), "{text}");
    } else {
        assert_eq!(stats, Some(0.0), "{text}");
        assert!(err.contains("BPF run-time stats are off"), "{err}");
    }
}

/// A daemon started before KVM is loaded waits for it: the metrics answer,
/// `tracing` is 0 and /healthz is 503 saying why; once KVM is there it
/// attaches without a restart. (KVM can't be unloaded here, so the kernel
/// the daemon inspects is a folder without KVM's BTF, then `/`.)
#[test]
fn a_daemon_started_before_kvm_waits_for_it() {
    if !live_or_skip("a_daemon_started_before_kvm_waits_for_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let no_kvm = dir.path().join("no-kvm");
    let btf = no_kvm.join("sys/kernel/btf");
    std::fs::create_dir_all(&btf).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/kernels/debian-6.18.15-kvm-module/sys/kernel/btf/vmlinux.zst"),
        btf.join("vmlinux.zst"),
    )
    .unwrap();
    let root = dir.path().join("root");
    std::os::unix::fs::symlink(&no_kvm, &root).unwrap();
    let port = free_port();
    let mut child = tracer()
        .args(["run", "--duration", "60s", "--log-dir"])
        .arg(dir.path().join("log"))
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("TRACER_TEST_KERNEL_ROOT", &root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let health = poll(Duration::from_secs(30), || http(port, "/healthz"));
    let (code, why) = health.expect("/healthz answers while waiting");
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("KVM is not loaded"), "{why}");
    let (_, text) = http(port, "/metrics").unwrap();
    assert_eq!(
        gauge(&text, "kvm_root_tracer_tracing "),
        Some(0.0),
        "{text}"
    );
    assert!(child.try_wait().unwrap().is_none(), "the daemon exited");

    // KVM "loads".
    std::fs::remove_file(&root).unwrap();
    std::os::unix::fs::symlink("/", &root).unwrap();
    let text = poll(Duration::from_secs(30), || {
        let (_, text) = http(port, "/metrics")?;
        (gauge(&text, "kvm_root_tracer_tracing ") == Some(1.0)).then_some(text)
    })
    .expect("attached once KVM was there");
    assert!(
        gauge(
            &text,
            "kvm_root_tracer_program_attached{program=\"kvm_mmu_zap_all_fast_tp\""
        ) == Some(1.0),
        "{text}"
    );
    let (code, body) = http(port, "/healthz").unwrap();
    assert!(code == 200 || body.contains("entry check"), "{code} {body}");
    let _ = child.kill();
    let _ = child.wait();
}

/// vCPUs run, the kvm_entry gate sees no entry (a kvm_pvm host such as this
/// CI machine): `entry_gate_blind` is 1 and /healthz 503 says so. On a host
/// whose backend fires kvm:kvm_entry, the same run is not blind.
#[test]
fn a_blind_entry_gate_is_a_gauge_and_a_503() {
    if !live_or_skip("a_blind_entry_gate_is_a_gauge_and_a_503") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = tracer()
        .args(["run", "--duration", "60s", "--log-dir"])
        .arg(dir.path().join("log"))
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(Duration::from_secs(30), || {
        let (_, text) = http(port, "/metrics")?;
        (gauge(&text, "kvm_root_tracer_tracing ") == Some(1.0)).then_some(())
    })
    .expect("tracing");
    let mut guest = kvm::Guest::new(1).expect("a guest");
    guest.run_to_hlt().expect("the guest runs");
    let pvm_only = Path::new("/sys/module/kvm_pvm").exists()
        && !Path::new("/sys/module/kvm_intel").exists()
        && !Path::new("/sys/module/kvm_amd").exists();
    let blind = poll(Duration::from_secs(10), || {
        let (_, text) = http(port, "/metrics")?;
        let b = gauge(&text, "kvm_root_tracer_entry_gate_blind ")?;
        let entries = gauge(&text, "kvm_root_tracer_guest_entries_total ")?;
        (b == 1.0 || entries > 0.0).then_some(b == 1.0)
    })
    .expect("the gate saw entries or was found blind");
    let (code, body) = http(port, "/healthz").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("kvm_pvm only: {pvm_only}; gate blind: {blind}; /healthz {code} {body}");
    assert_eq!(blind, pvm_only);
    if blind {
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("kvm:kvm_entry never fired"), "{body}");
    } else {
        assert_eq!(code, 200, "{body}");
    }
}
