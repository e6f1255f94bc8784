//! Issue 14, items 4 to 6: least privilege, visible blindness and VM
//! identity, on the real kernel. Capabilities, not the uid, decide who can
//! trace; a daemon started before KVM waits for it (503 meanwhile); a blind
//! entry gate is a gauge and a 503; missing BPF stats are a warning and a
//! gauge; a VMM's `-name` and `-uuid` reach the event log and replay.
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

use support::{free_port, http, live_or_skip, poll, tracer};

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

/// A real VMM process with a QEMU-like command line: the daemon reads its
/// `-name guest=…` and `-uuid` once and records them (a `vm` record) before
/// its events; replay puts them on the findings of that pid, and the
/// kernel pointer stays out of them.
#[test]
fn a_vmms_name_and_uuid_reach_the_event_log_and_replay() {
    if !live_or_skip("a_vmms_name_and_uuid_reach_the_event_log_and_replay") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let uuid = "6b29fc40-ca47-1067-b31d-00dd010662da";
    let mut daemon = tracer()
        .args([
            "run",
            "--duration",
            "60s",
            "--no-compress",
            "--metrics-listen",
            "",
        ])
        .arg("--log-dir")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = daemon.stderr.take().unwrap();
    let attached = std::thread::spawn(move || {
        use std::io::Read as _;
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_secs(3));
    let workload = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/kvm_workload");
    let stop = dir.path().join("stop");
    let mut vmm = Command::new(&workload)
        .args(["1", "2"])
        .arg(format!("idle={}", stop.display()))
        .args(["-name", "guest=td-named,debug-threads=on", "-uuid", uuid])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", workload.display()));
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, "").unwrap();
    assert!(vmm.wait().unwrap().success());
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
    let err = attached.join().unwrap();
    let mut text = String::new();
    for e in std::fs::read_dir(&log).unwrap() {
        text.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
    }
    let line = text
        .lines()
        .find(|l| {
            l.contains("\"record\":\"vm\"")
                && l.contains(&format!("\"userspace_pid\":{}", vmm.id()))
        })
        .unwrap_or_else(|| panic!("no vm record for pid {}:\n{err}\n{text}", vmm.id()));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["name"], "td-named", "{line}");
    assert_eq!(v["uuid"], uuid, "{line}");
    // Before the VMM's first event in the log.
    let vm_at = text.find(line).unwrap();
    let first_event = text
        .find(&format!("\"userspace_pid\":{}", vmm.id()))
        .unwrap();
    assert_eq!(
        vm_at + line.find("\"userspace_pid\"").unwrap(),
        first_event,
        "{text}"
    );
    // Replay reads the log, record and all, without a problem.
    let out = tracer()
        .args(["replay", "--json"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The timeline names the VM at its group's head from the `vm` record,
    // though no finding carries the name (a default VM raises none).
    let out = tracer()
        .args(["replay", "--timeline", "--pid", &vmm.id().to_string()])
        .arg(&log)
        .output()
        .unwrap();
    let timeline = String::from_utf8_lossy(&out.stdout);
    let head = timeline
        .lines()
        .find(|l| l.starts_with(&format!("VM vmm={} ", vmm.id())))
        .unwrap_or_else(|| panic!("no group for the VMM:\n{timeline}"));
    assert!(head.ends_with(" name=td-named"), "{head}");
}

/// Replay names the VM of a finding from the log's `vm` record, after the
/// pid is long gone (no root needed).
#[test]
fn replay_names_the_vm_of_a_finding_from_its_vm_record() {
    let dir = tempfile::tempdir().unwrap();
    let sim = support::model_log(
        dir.path(),
        "sim.jsonl",
        ("mirror-freed-by-zap", "hotplug"),
        (1, 3),
    );
    let text = std::fs::read_to_string(&sim).unwrap();
    let pids: std::collections::BTreeSet<i64> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["userspace_pid"].as_i64()
        })
        .collect();
    // The header first, then the names, then the events.
    let (header, rest) = text.split_once('\n').unwrap();
    let vm_records = pids.iter().fold(String::new(), |mut out, pid| {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "{{\"record\":\"vm\",\"ts_ns\":0,\"userspace_pid\":{pid},\"name\":\"td-tenant-{pid}\",\"uuid\":\"6b29fc40-ca47-1067-b31d-00dd010662da\"}}"
        );
        out
    });
    let named = dir.path().join("named.jsonl");
    std::fs::write(&named, format!("{header}\n{vm_records}{rest}")).unwrap();
    let out = tracer()
        .args(["replay", "--json"])
        .arg(&named)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "findings expected");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["record"] == "finding")
        .collect();
    assert!(!findings.is_empty(), "{stdout}");
    for f in &findings {
        let want = format!("td-tenant-{}", f["userspace_pid"]);
        assert_eq!(f["vm"]["name"], want.as_str(), "{f}");
        assert_eq!(
            f["vm"]["uuid"], "6b29fc40-ca47-1067-b31d-00dd010662da",
            "{f}"
        );
    }
}

/// SIGHUP, as logrotate and an operator send it: `--findings-out` is
/// reopened (a moved file is made again), the config is read again —
/// [alertmanager] changes live, a restart-only key is named in a warning —
/// and a broken config keeps the running one.
#[test]
fn sighup_reopens_findings_and_reloads_the_config() {
    if !live_or_skip("sighup_reopens_findings_and_reloads_the_config") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let findings = dir.path().join("findings.jsonl");
    let config = dir.path().join("tracer.toml");
    let port = free_port();
    let (am1, am2) = (free_port(), free_port());
    let write_config = |am: u16, segment: &str| {
        std::fs::write(
            &config,
            format!(
                "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[findings]\noutput = \"{}\"\n\
                 [alertmanager]\nurls = [\"http://127.0.0.1:{am}\"]\nattempts = 1\n\
                 [log]\nsegment_size = \"{segment}\"\n",
                findings.display()
            ),
        )
        .unwrap();
    };
    write_config(am1, "64M");
    let sim = support::model_log(
        dir.path(),
        "sim.jsonl",
        ("mirror-freed-by-zap", "hotplug"),
        (2, 5),
    );
    let err_file = dir.path().join("run.err");
    let mut child = tracer()
        .args(["run", "--duration", "60s", "--config"])
        .arg(&config)
        .arg("--log-dir")
        .arg(dir.path().join("log"))
        .arg("--inject")
        .arg(&sim)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let err = || std::fs::read_to_string(&err_file).unwrap_or_default();
    poll(Duration::from_secs(30), || {
        (std::fs::metadata(&findings).ok()?.len() > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("no findings written: {}", err()));
    let series = |am: u16| {
        format!("kvm_root_tracer_alerts_sent_total{{alertmanager=\"http://127.0.0.1:{am}\"}}")
    };
    let (_, text) = poll(Duration::from_secs(10), || http(port, "/metrics")).expect("metrics");
    assert!(text.contains(&series(am1)), "{text}");

    // logrotate moves the file; the operator points alerts elsewhere and
    // changes a key that needs a restart.
    std::fs::rename(&findings, dir.path().join("findings.jsonl.1")).unwrap();
    write_config(am2, "32M");
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    poll(Duration::from_secs(10), || {
        err().contains("config reloaded").then_some(())
    })
    .unwrap_or_else(|| panic!("no reload: {}", err()));
    assert!(findings.exists(), "the findings file was not made again");
    assert!(
        err().contains("log.segment_size changed; that takes a restart"),
        "{}",
        err()
    );
    let (_, text) = http(port, "/metrics").unwrap();
    assert!(text.contains(&series(am2)), "{text}");
    assert!(!text.contains(&series(am1)), "{text}");

    // A broken config: a warning, and the running one stays.
    std::fs::write(&config, "[alertmanager]\nurls = \"not a list\"\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    poll(Duration::from_secs(10), || {
        err()
            .contains("config reload failed, the running config stays")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{}", err()));
    let (_, text) = http(port, "/metrics").expect("still serving");
    assert!(text.contains(&series(am2)), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
    let _ = child.kill();
    let _ = child.wait();
}

/// `watch --json` begins with the log's header record, so its output
/// replays like a segment, without a "not a header" warning.
#[test]
fn watch_json_begins_with_a_header_and_replays_cleanly() {
    if !live_or_skip("watch_json_begins_with_a_header_and_replays_cleanly") {
        return;
    }
    let out = tracer()
        .args(["watch", "--json", "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first: serde_json::Value =
        serde_json::from_str(stdout.lines().next().unwrap_or("")).unwrap();
    assert_eq!(first["record"], "header", "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("watch.jsonl");
    std::fs::write(&file, stdout.as_bytes()).unwrap();
    let r = tracer().arg("replay").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(0), "{err}");
    assert!(!err.contains("not a header"), "{err}");
}

/// Makes the child's `bpf()` calls fail with EPERM (and, with `attach_only`,
/// only BPF_RAW_TRACEPOINT_OPEN and BPF_LINK_CREATE), as a container
/// runtime's seccomp profile or an LSM would, before it runs.
fn refuse_bpf(cmd: &mut Command, attach_only: bool) {
    use std::os::unix::process::CommandExt as _;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const BPF_RAW_TRACEPOINT_OPEN: u32 = 17;
    const BPF_LINK_CREATE: u32 = 28;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let allow = stmt(ret, libc::SECCOMP_RET_ALLOW);
    let eperm = stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    // seccomp_data: nr at 0, arch at 4, args[0] (low half) at 16.
    let mut filter = vec![
        stmt(load, 4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        allow,
        stmt(load, 0),
        jeq(libc::SYS_bpf as u32, 1, 0),
        allow,
    ];
    if attach_only {
        filter.extend([
            stmt(load, 16),
            jeq(BPF_RAW_TRACEPOINT_OPEN, 2, 0),
            jeq(BPF_LINK_CREATE, 1, 0),
            allow,
        ]);
    }
    filter.push(eperm);
    // SAFETY: between fork and exec the closure only makes two prctl calls
    // on memory it owns (the filter vector, moved into it); no allocation,
    // no lock.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &raw const prog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A kernel that refuses eBPF to a process holding the capabilities
/// (lockdown, an LSM, a container's seccomp profile) is an unsupported
/// environment, exit 3 with the reason, not a runtime error: at load, and
/// when every attach is refused.
#[test]
fn a_kernel_that_refuses_ebpf_is_exit_3_with_the_reason() {
    if !live_or_skip("a_kernel_that_refuses_ebpf_is_exit_3_with_the_reason") {
        return;
    }
    for attach_only in [false, true] {
        let mut cmd = tracer();
        cmd.args(["watch", "--duration", "2s"]);
        refuse_bpf(&mut cmd, attach_only);
        let out = support::run(&mut cmd);
        eprintln!(
            "attach_only={attach_only}: exit {:?}\n{}",
            out.code, out.stderr
        );
        assert_eq!(
            out.code,
            Some(3),
            "attach_only={attach_only}: {}{}",
            out.stdout,
            out.stderr
        );
        assert!(
            out.stderr.contains("refused") && out.stderr.contains("seccomp"),
            "{}",
            out.stderr
        );
        if attach_only {
            assert!(out.stderr.contains("FAILED"), "{}", out.stderr);
        } else {
            assert!(
                out.stderr.contains("Operation not permitted"),
                "the errno is in the chain: {}",
                out.stderr
            );
        }
    }
}
