//! Hand-written TDX incident logs (issue 12): daemon restarts, two boots in
//! one folder, a loss then address reuse, stale mirror roots, interleaved
//! VMs, out-of-order events, corrupt lines, failed reads. Each folder under
//! tests/data/incidents/ holds the segments and an `expected` file: the
//! findings kernel semantics demand (`kind kvm vcpu_id`, in any order) after
//! `#` lines that say why. The real binary replays each folder.

#[path = "support/cli.rs"]
mod support;

use std::path::PathBuf;

use support::{run, tracer};

#[test]
fn incident_logs_replay_with_exactly_the_findings_kernel_semantics_demand() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/incidents");
    let mut checked = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let mut expected: Vec<String> = std::fs::read_to_string(dir.join("expected"))
            .unwrap_or_else(|e| panic!("{}/expected: {e}", dir.display()))
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        let r = run(tracer().args(["replay", "--json"]).arg(&dir));
        let mut got: Vec<String> = r
            .stdout
            .lines()
            .map(|l| {
                let f: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {} {}",
                    f["kind"].as_str().unwrap(),
                    f["kvm"].as_str().unwrap(),
                    f["vcpu_id"]
                        .as_i64()
                        .map_or_else(|| "-".into(), |v| v.to_string())
                )
            })
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "{}\nstderr: {}", dir.display(), r.stderr);
        let want_code = i32::from(!expected.is_empty());
        assert_eq!(r.code, Some(want_code), "{}: {}", dir.display(), r.stderr);
        checked.push(dir.file_name().unwrap().to_string_lossy().into_owned());
    }
    for name in [
        "restart-same-boot",
        "restart-then-real-change",
        "two-boots",
        "loss-then-reuse",
        "stale-mirror-roots",
        "interleaved-vms",
        "out-of-order",
        "corrupt-lines",
        "episodes",
        "failed-reads",
    ] {
        assert!(checked.iter().any(|c| c == name), "{name} not checked");
    }
}

/// The corrupt-lines incident names each bad line with its file and line.
#[test]
fn corrupt_incident_lines_are_reported_with_file_and_line() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/incidents/corrupt-lines");
    let r = run(tracer().args(["replay"]).arg(&dir));
    assert!(
        r.stderr.contains(".jsonl:3: not a JSON record"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("2 line(s) skipped"), "{}", r.stderr);
}
