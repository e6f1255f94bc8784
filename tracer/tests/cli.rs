//! The binary's contract: exit codes and error text for bad flags and
//! unsupported environments, and `doctor` on captured kernels.

#[path = "support/cli.rs"]
mod support;

use std::{path::PathBuf, process::Command};
use support::{run, tracer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kernels")
        .join(name)
}

#[test]
fn bad_flags_exit_2_with_clap_usage() {
    let r = run(tracer().args(["watch", "--no-such-flag"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--no-such-flag"), "{}", r.stderr);

    let r = run(tracer().args(["watch", "--duration", "soon"]));
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("not a duration"), "{}", r.stderr);

    let r = run(tracer().args(["watch", "--ringbuf-size", "5000"]));
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("power of two"), "{}", r.stderr);

    let r = run(tracer().args([
        "watch",
        "--ringbuf-size",
        "65536",
        "--wakeup-bytes",
        "65536",
    ]));
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr.contains("flag `--wakeup-bytes`") && r.stderr.contains("more than half"),
        "{}",
        r.stderr
    );

    let r = run(tracer().args(["watch", "--poll-interval", "20s"]));
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("flag `--poll-interval`"), "{}", r.stderr);

    let r = run(tracer().args(["run", "--wakeup-bytes", "99999999"]));
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("probes.wakeup_bytes"), "{}", r.stderr);

    let r = run(tracer().arg("frobnicate"));
    assert_eq!(r.code, Some(2));
}

#[test]
fn help_documents_the_exit_codes() {
    let r = run(tracer().arg("--help"));
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains("3 unsupported environment"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("doctor") && r.stdout.contains("watch"));
}

#[test]
fn kernel_without_btf_exits_3_naming_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(tracer().args(["doctor", "--root"]).arg(dir.path()));
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("this kernel has no BTF"), "{}", r.stderr);
    assert!(r.stderr.contains("CONFIG_DEBUG_INFO_BTF"), "{}", r.stderr);
}

#[test]
fn doctor_json_on_a_captured_debian_kernel() {
    let r = run(tracer()
        .args(["doctor", "--json", "--root"])
        .arg(fixture("debian-6.18.15-kvm-module")));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("doctor --json is JSON");
    assert_eq!(v["kernel_release"], "6.18.15+deb13-amd64");
    assert_eq!(v["kvm"], "module");
    let probes = v["probes"].as_array().unwrap();
    let load = probes
        .iter()
        .find(|p| p["probe"] == "kvm_mmu_load")
        .unwrap();
    assert_eq!(load["attach"], "kprobe");
    let mirror = v["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "kvm_mmu.mirror_root_hpa")
        .unwrap();
    assert_eq!(mirror["offset"], 64);
}

#[test]
fn doctor_text_says_why_a_feature_is_off() {
    let r = run(tracer()
        .args(["doctor", "--root"])
        .arg(fixture("debian-6.12.117-kvm-module")));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("mirror-root-tracking"))
        .expect("feature line");
    assert!(line.contains(" off "), "{line}");
    assert!(line.contains("6.14"), "{line}");
}

#[test]
fn watch_without_bpf_capabilities_exits_3_naming_them() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: run directly.
        let r = run(tracer().args(["watch", "--duration", "1s"]));
        assert_eq!(r.code, Some(3), "{}", r.stderr);
        assert!(r.stderr.contains("CAP_BPF"), "{}", r.stderr);
        return;
    }
    // As root, drop to nobody with setpriv (util-linux).
    let r = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_tracer"))
        .args(["watch", "--duration", "1s"]));
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"),
        "{}",
        r.stderr
    );
}

/// `tracer simulate --kernel K --scenario S | tracer replay --json -`,
/// through the real binaries and a real pipe.
fn simulate_then_replay(kernel: &str, scenario: &str) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut sim = tracer()
        .args(["simulate", "--kernel", kernel, "--scenario", scenario])
        .args(["--vcpus", "3", "--rounds", "30", "--seed", "9"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let replay = tracer()
        .args(["replay", "--json", "-"])
        .stdin(sim.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(sim.wait().unwrap().success());
    let findings = String::from_utf8_lossy(&replay.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (replay.status.code(), findings)
}

fn count(findings: &[serde_json::Value], kind: &str) -> usize {
    findings.iter().filter(|f| f["kind"] == kind).count()
}

#[test]
fn simulate_piped_into_replay_gives_each_behaviours_findings() {
    for scenario in ["steady", "hotplug", "churn"] {
        let (code, f) = simulate_then_replay("mainline", scenario);
        assert_eq!(code, Some(0), "mainline {scenario}: {f:?}");
        assert!(f.is_empty(), "mainline {scenario}: {f:?}");
    }

    let (code, f) = simulate_then_replay("v3-unconditional-mirror-alloc", "hotplug");
    assert_eq!(code, Some(1), "findings exit 1");
    assert!(count(&f, "mirror_root_realloc_while_valid") > 0, "{f:?}");
    assert_eq!(count(&f, "mirror_root_invalid_at_entry"), 0);
    for finding in &f {
        assert_eq!(finding["record"], "finding");
        assert!(finding["vcpu_id"].is_i64(), "{finding}");
        assert!(!finding["explanation"].as_str().unwrap().is_empty());
        assert!(!finding["evidence"].as_array().unwrap().is_empty());
    }

    // The mirror roots invalidated under running vCPUs: role.invalid set,
    // mirror_root_hpa untouched, so they enter on a stale root.
    let (code, f) = simulate_then_replay("mirror-invalidated-by-zap", "steady");
    assert_eq!(code, Some(1));
    assert!(count(&f, "mirror_root_stale_at_entry") > 0, "{f:?}");
    assert!(count(&f, "mirror_root_stale_after_load") > 0, "{f:?}");
    assert!(count(&f, "mirror_roots_invalidated_live") > 0, "{f:?}");
    assert_eq!(count(&f, "mirror_root_invalid_at_entry"), 0, "{f:?}");

    let (code, f) = simulate_then_replay("mirror-freed-by-zap", "steady");
    assert_eq!(code, Some(1));
    assert!(count(&f, "mirror_root_invalid_at_entry") > 0, "{f:?}");
    assert!(count(&f, "mirror_roots_invalidated_live") > 0, "{f:?}");
    assert!(
        count(&f, "mirror_root_changed_without_teardown") > 0,
        "{f:?}"
    );
    let critical = f
        .iter()
        .find(|x| x["kind"] == "mirror_root_invalid_at_entry")
        .unwrap();
    assert_eq!(critical["severity"], "critical");

    let (_, f) = simulate_then_replay("mainline", "zap-storm");
    assert_eq!(count(&f, "zap_storm"), 1, "{f:?}");
    assert_eq!(f[0]["severity"], "info");

    let (_, f) = simulate_then_replay("mainline", "load-failure");
    assert!(count(&f, "mmu_load_failed") > 0, "{f:?}");
}

#[test]
fn simulate_is_deterministic_per_seed() {
    let a = run(tracer().args(["simulate", "--seed", "3", "--scenario", "churn"]));
    let b = run(tracer().args(["simulate", "--seed", "3", "--scenario", "churn"]));
    let c = run(tracer().args(["simulate", "--seed", "4", "--scenario", "churn"]));
    assert_eq!(a.code, Some(0));
    assert_eq!(a.stdout, b.stdout);
    assert_ne!(a.stdout, c.stdout);
}

#[test]
fn simulate_rejects_unknown_behaviours_with_the_list() {
    let r = run(tracer().args(["simulate", "--kernel", "v4"]));
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr.contains("mirror-invalidated-by-zap"),
        "{}",
        r.stderr
    );
}

#[test]
fn replay_skips_bad_lines_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let good = run(tracer().args([
        "simulate",
        "--kernel",
        "mirror-freed-by-zap",
        "--scenario",
        "hotplug",
    ]))
    .stdout;
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(3, "{not json");
    lines.insert(5, r#"{"record":"event","kind":"warp_drive"}"#);
    std::fs::write(&log, lines.join("\n")).unwrap();
    let r = run(tracer().arg("replay").arg(&log));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("events.jsonl:4: not a JSON record"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("events.jsonl:6: bad event record"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("2 line(s) skipped"), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("FINDING CRITICAL mirror_root_invalid_at_entry"),
        "{}",
        r.stdout
    );

    let r = run(tracer().arg("replay").arg(dir.path().join("missing.jsonl")));
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr.contains("missing.jsonl: no such file or folder"),
        "{}",
        r.stderr
    );
}

#[test]
fn top_rejects_bad_logs_speeds_and_a_missing_terminal() {
    let r = run(tracer().args(["top", "--replay", "/nonexistent/log"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent/log"), "{}", r.stderr);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "not json\n").unwrap();
    let r = run(tracer().arg("top").arg("--replay").arg(&bad));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("no events in"), "{}", r.stderr);
    assert!(r.stderr.contains("bad.jsonl:1"), "{}", r.stderr);

    let r = run(tracer().args(["top", "--replay", "-", "--speed", "0"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("outside"), "{}", r.stderr);

    // A good log, but stdout is a pipe here: no full-screen view.
    let log = dir.path().join("log");
    let sim = run(tracer()
        .args(["simulate", "--rounds", "2", "--record"])
        .arg(&log));
    assert_eq!(sim.code, Some(0), "{}", sim.stderr);
    let r = run(tracer().arg("top").arg("--replay").arg(&log));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("needs a terminal"), "{}", r.stderr);
}

/// `--min-severity` sets what replay shows and what makes it exit 1: a
/// memslot loop's `info` zap_storm is exit 1 by default (every finding, as
/// documented) and exit 0 with `--min-severity warning`.
#[test]
fn replay_min_severity_sets_what_is_shown_and_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let log = support::model_log(
        dir.path(),
        "storm.jsonl",
        ("mainline", "zap-storm"),
        (4, 50),
    );
    let all = run(tracer().arg("replay").arg(&log));
    assert_eq!(all.code, Some(1), "{}", all.stderr);
    assert!(all.stdout.contains("zap_storm"), "{}", all.stdout);
    let paging = run(tracer()
        .args(["replay", "--min-severity", "warning"])
        .arg(&log));
    assert_eq!(paging.code, Some(0), "{}", paging.stderr);
    assert!(!paging.stdout.contains("zap_storm"), "{}", paging.stdout);
    let bad = run(tracer()
        .args(["replay", "--min-severity", "loud"])
        .arg(&log));
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("info, warning, error or critical"),
        "{}",
        bad.stderr
    );
}

/// A filter that matches nothing says so instead of a silent exit 0; a
/// replay with no input at a terminal prints usage and exits 2 instead of
/// waiting on the keyboard.
#[test]
fn replay_is_never_silent() {
    let dir = tempfile::tempdir().unwrap();
    let log = support::model_log(
        dir.path(),
        "faults.jsonl",
        ("mirror-freed-by-zap", "hotplug"),
        (2, 5),
    );
    let r = run(tracer().args(["replay", "--pid", "99999"]).arg(&log));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("matches --pid 99999"), "{}", r.stderr);
    // A pseudo-terminal on stdin (script(1) from util-linux).
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!("{} replay", env!("CARGO_BIN_EXE_tracer")))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("no input") && text.contains("Usage: tracer replay"),
        "{text}"
    );
}

/// `--since` takes offsets and relative durations counted back from the
/// log's last event: `--since 100000h` keeps everything, `--since 1ms`
/// almost nothing, and a relative time on stdin is a clear error.
#[test]
fn replay_since_takes_offsets_and_durations_back_from_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    let log = support::model_log(
        dir.path(),
        "faults.jsonl",
        ("mirror-freed-by-zap", "hotplug"),
        (2, 5),
    );
    let count = |args: &[&str]| {
        let r = run(tracer().arg("replay").args(args).arg("--json").arg(&log));
        assert!(r.code == Some(0) || r.code == Some(1), "{}", r.stderr);
        r.stdout
            .lines()
            .filter(|l| l.contains("\"record\":\"finding\""))
            .count()
    };
    let all = count(&[]);
    assert!(all > 0);
    assert_eq!(count(&["--since", "100000h"]), all);
    assert!(count(&["--since", "1ms"]) < all);
    assert_eq!(count(&["--since", "1970-01-01T01:00:00+01:00"]), all);
    let r = run(tracer()
        .args(["replay", "--since", "10m", "-"])
        .stdin(std::fs::File::open(&log).unwrap()));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("not stdin"), "{}", r.stderr);
}

/// `--timeline` without `--vcpu`: grouped by VM (each named at its head)
/// and vCPU, each row compared with the same vCPU's previous roots, so
/// "roots changed" marks real changes, not the interleaving of vCPUs.
#[test]
fn timeline_groups_by_vm_and_vcpu() {
    let dir = tempfile::tempdir().unwrap();
    let log = support::model_log(dir.path(), "steady.jsonl", ("mainline", "steady"), (4, 20));
    let r = run(tracer().args(["replay", "--timeline"]).arg(&log));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let heads: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("VM vmm="))
        .collect();
    assert_eq!(heads.len(), 3, "{}", r.stdout);
    assert!(
        heads.iter().filter(|h| h.contains("type=tdx")).count() == 2,
        "{heads:?}"
    );
    // Within each vCPU's history, a row says "roots changed" exactly when
    // its roots differ from that vCPU's previous row.
    let mut prev: Option<String> = None;
    let mut rows = 0;
    for line in r.stdout.lines() {
        if line.starts_with("VM ") || line.starts_with("  vCPU ") {
            prev = None;
            continue;
        }
        let Some(at) = line.find("root=").filter(|_| line.contains("  vcpu ")) else {
            continue;
        };
        rows += 1;
        let roots = line[at..]
            .trim_end_matches("<- roots changed")
            .trim()
            .to_owned();
        let changed = line.ends_with("<- roots changed");
        assert_eq!(
            changed,
            prev.as_ref().is_some_and(|p| *p != roots),
            "{line}\n{}",
            r.stdout
        );
        prev = Some(roots);
    }
    assert!(rows > 100, "{rows}");
    // VM groups are contiguous: a VM's head appears once.
    let mut seen = std::collections::BTreeSet::new();
    for h in &heads {
        assert!(seen.insert(*h), "{h} twice");
    }
}

/// `tracer --help` and every subcommand's help fit in 80 columns and give
/// an example.
#[test]
fn every_help_fits_80_columns_with_an_example() {
    for sub in [
        &[][..],
        &["doctor"],
        &["watch"],
        &["run"],
        &["replay"],
        &["simulate"],
        &["top"],
    ] {
        let r = run(tracer().args(sub).arg("--help"));
        assert_eq!(r.code, Some(0), "{sub:?}: {}", r.stderr);
        let widest = r.stdout.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(widest <= 80, "{sub:?}: {widest} columns\n{}", r.stdout);
        assert!(
            r.stdout.contains("\nExample:\n  "),
            "{sub:?}:\n{}",
            r.stdout
        );
    }
}

/// `--version` names the git revision the binary was built from and the
/// build date, as the `build_info` metric does.
#[test]
fn version_names_the_revision_and_the_build_date() {
    let r = run(tracer().arg("--version"));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let line = r.stdout.trim();
    let rest = line
        .strip_prefix(concat!("tracer ", env!("CARGO_PKG_VERSION"), " (git "))
        .unwrap_or_else(|| panic!("{line}"));
    let (rev, date) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(rev, tracer::GIT_REVISION, "{line}");
    assert!(
        rev.len() == 12 && rev.bytes().all(|b| b.is_ascii_hexdigit()),
        "a 12-digit revision from this checkout: {line}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    // The build script runs again when HEAD moves: the binary under test
    // names the commit checked out.
    assert_eq!(rev, String::from_utf8_lossy(&head.stdout).trim(), "{line}");
    let d = date.as_bytes();
    assert!(
        d.len() == 10 && d[4] == b'-' && d[7] == b'-' && date.starts_with("20"),
        "a YYYY-MM-DD build date: {line}"
    );
}
