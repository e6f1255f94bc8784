//! The event log: record → replay round trips, rotation, compression and
//! retention, a `kill -9` mid-write, every kind of bad input, and the
//! hand-written logs in tests/data/logs/ with their expected findings.

#[path = "support/cli.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use support::{Run, run, tracer};

use tracer::{
    log::reader::{self, ProblemKind, ReadStats, Record},
    replay::{Filter, replay},
};

/// `tracer simulate … --record dir` with extra flags.
fn record(dir: &Path, kernel: &str, scenario: &str, rounds: u32, extra: &[&str]) -> Run {
    let r = run(tracer()
        .args(["simulate", "--kernel", kernel, "--scenario", scenario])
        .args(["--vcpus", "4", "--rounds", &rounds.to_string(), "--record"])
        .arg(dir)
        .args(extra));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    r
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events-")
        })
        .collect();
    v.sort();
    v
}

fn read(paths: &[PathBuf]) -> (Vec<Record>, ReadStats) {
    let mut stats = ReadStats::default();
    let mut records = Vec::new();
    reader::read_all(paths, &mut stats, |_, r| records.push(r));
    (records, stats)
}

#[test]
fn record_then_replay_gives_the_live_findings() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    record(
        &log,
        "mirror-invalidated-by-zap",
        "churn",
        60,
        &["--segment-size", "64K"],
    );
    let r = replay(std::slice::from_ref(&log), &Filter::default(), |_, _| {}).unwrap();
    assert!(!r.findings.is_empty());
    assert_eq!(
        r.findings, r.recorded_findings,
        "replay recomputes exactly what the live pipeline recorded"
    );
    assert!(r.stats.problems.is_empty(), "{:?}", r.stats.problems);

    // The CLI agrees, and exits 1 on findings.
    let cli = run(tracer().args(["replay", "--json"]).arg(&log));
    assert_eq!(cli.code, Some(1), "{}", cli.stderr);
    assert_eq!(cli.stdout.lines().count(), r.findings.len());

    // A clean kernel's log replays to no findings, exit 0.
    let clean = dir.path().join("clean");
    record(&clean, "mainline", "steady", 30, &[]);
    let cli = run(tracer().arg("replay").arg(&clean));
    assert_eq!(cli.code, Some(0), "{}\n{}", cli.stdout, cli.stderr);
}

#[test]
fn segments_rotate_by_size_compress_and_carry_headers() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    record(&log, "mainline", "hotplug", 300, &["--segment-size", "64K"]);
    let segs = segments(&log);
    assert!(segs.len() >= 4, "rotated: {segs:?}");
    for (i, seg) in segs.iter().enumerate() {
        let name = seg.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".jsonl.zst"),
            "closed segments are compressed: {name}"
        );
        let (records, stats) = read(std::slice::from_ref(seg));
        assert!(stats.problems.is_empty(), "{name}: {:?}", stats.problems);
        match &records[0] {
            Record::Header(h) => {
                assert_eq!(h.segment, i as u64, "{name}");
                assert_eq!(h.schema, 1);
                assert_eq!(h.source, "model:mainline");
            }
            other => panic!("{name} starts with {other:?}"),
        }
        // Compressed segments are much smaller than the size limit.
        assert!(std::fs::metadata(seg).unwrap().len() < 64 << 10);
    }
    let (_, stats) = read(&segs);
    assert!(stats.events > 1000);
}

#[test]
fn retention_keeps_the_newest_segments_within_the_caps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    record(
        &log,
        "mainline",
        "hotplug",
        300,
        &["--segment-size", "32K", "--max-files", "3", "--no-compress"],
    );
    let segs = segments(&log);
    assert_eq!(segs.len(), 3, "{segs:?}");
    // The newest survive: segment numbers are the last ones.
    let (records, _) = read(&segs[..1]);
    let Record::Header(h) = &records[0] else {
        panic!("no header");
    };
    assert!(h.segment >= 3, "oldest kept is segment {}", h.segment);
    // Replay of a pruned log still works.
    let r = run(tracer().arg("replay").arg(&log));
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    let capped = dir.path().join("capped");
    record(
        &capped,
        "mainline",
        "hotplug",
        300,
        &[
            "--segment-size",
            "32K",
            "--max-total-size",
            "100K",
            "--no-compress",
        ],
    );
    let total: u64 = segments(&capped)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    // The cap holds up to the active segment's own growth.
    assert!(total <= (100 << 10) + (40 << 10), "{total} bytes kept");
}

#[test]
fn kill_9_mid_write_loses_only_the_unwritten_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut child = tracer()
        .args([
            "simulate",
            "--kernel",
            "v3-unconditional-mirror-alloc",
            "--scenario",
            "hotplug",
        ])
        .args([
            "--vcpus", "16", "--rounds", "40000", "--fsync", "never", "--record",
        ])
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until records are being written, then kill it hard.
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    loop {
        let written: u64 = std::fs::read_dir(&log)
            .map_or(0, |d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum());
        if written > 1 << 20 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nothing written");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let r = run(tracer().arg("replay").arg(&log));
    assert!(
        matches!(r.code, Some(0 | 1)),
        "replay survives: {}",
        r.stderr
    );
    let segs = segments(&log);
    let (records, stats) = read(&segs);
    assert!(stats.events > 1000, "{} events", stats.events);
    // At most the last line of the active segment is torn; nothing else
    // is wrong.
    assert!(stats.torn_lines <= 1, "{:?}", stats.problems);
    assert!(
        stats
            .problems
            .iter()
            .all(|p| p.kind == ProblemKind::TornLine),
        "{:?}",
        stats.problems
    );
    assert_eq!(stats.skipped_lines, stats.torn_lines);
    assert!(matches!(records[0], Record::Header(_)));
    if stats.torn_lines == 1 {
        assert!(r.stderr.contains("stops mid-record"), "{}", r.stderr);
    }
}

/// A log with a header and a few events, as lines.
fn good_lines() -> Vec<String> {
    let r = run(tracer().args([
        "simulate",
        "--kernel",
        "mirror-invalidated-by-zap",
        "--scenario",
        "hotplug",
        "--rounds",
        "3",
    ]));
    r.stdout.lines().map(str::to_owned).collect()
}

#[test]
fn bad_lines_are_reported_by_file_and_line_and_the_rest_still_replays() {
    let dir = tempfile::tempdir().unwrap();
    let lines = good_lines();
    let full = replay_text(dir.path(), "full.jsonl", &lines.join("\n"));
    assert_eq!(full.code, Some(1));
    let n_events = lines.len() - 1;
    assert!(
        full.stderr
            .contains(&format!("replayed {n_events} event(s)")),
        "{}",
        full.stderr
    );

    // A truncated file: cut in the middle of its last line.
    let text = lines.join("\n");
    let cut = &text[..text.len() - 40];
    let r = replay_text(dir.path(), "truncated.jsonl", cut);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let last = lines.len();
    assert!(
        r.stderr.contains(&format!(
            "truncated.jsonl:{last}: the last line (line {last}) stops mid-record"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("replayed {} event(s)", n_events - 1)),
        "{}",
        r.stderr
    );

    // A corrupt line in the middle.
    let mut corrupt = lines.clone();
    corrupt[5] = corrupt[5].replace("\"kind\"", "\"kund\"").replace('}', "");
    let r = replay_text(dir.path(), "corrupt.jsonl", &corrupt.join("\n"));
    assert!(r.stderr.contains("corrupt.jsonl:6: "), "{}", r.stderr);
    assert!(
        r.stderr.contains("1 line(s) skipped (0 torn)"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("replayed {} event(s)", n_events - 1)),
        "{}",
        r.stderr
    );

    // A wrong schema version.
    let mut future = lines.clone();
    future[0] = future[0].replace("\"schema\":1", "\"schema\":7");
    let r = replay_text(dir.path(), "future.jsonl", &future.join("\n"));
    assert_eq!(r.code, Some(0));
    assert!(
        r.stderr.contains(
            "future.jsonl:1: schema version 7, but this tracer reads version 1; file skipped"
        ),
        "{}",
        r.stderr
    );

    // An empty file.
    let r = replay_text(dir.path(), "empty.jsonl", "");
    assert_eq!(r.code, Some(0));
    assert!(
        r.stderr.contains("empty.jsonl: file is empty"),
        "{}",
        r.stderr
    );
}

#[test]
fn binary_garbage_empty_folders_and_cut_compressed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let lines = good_lines();
    let n_events = lines.len() - 1;

    // Binary garbage, then valid records.
    let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    garbage.push(b'\n');
    garbage.extend_from_slice(lines.join("\n").as_bytes());
    let path = dir.path().join("garbage.jsonl");
    std::fs::write(&path, &garbage).unwrap();
    let r = run(tracer().arg("replay").arg(&path));
    assert_eq!(
        r.code,
        Some(1),
        "valid records after the garbage replay: {}",
        r.stderr
    );
    assert!(r.stderr.contains("garbage.jsonl:1: "), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("replayed {n_events} event(s)")),
        "{}",
        r.stderr
    );

    // A folder with no logs.
    let empty_dir = dir.path().join("nothing");
    std::fs::create_dir(&empty_dir).unwrap();
    std::fs::write(empty_dir.join("notes.txt"), "hi").unwrap();
    let r = run(tracer().arg("replay").arg(&empty_dir));
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr.contains("no event logs in this folder"),
        "{}",
        r.stderr
    );

    // A compressed segment cut short.
    let zst = zstd::encode_all(lines.join("\n").as_bytes(), 3).unwrap();
    let path = dir.path().join("events-cut.jsonl.zst");
    std::fs::write(&path, &zst[..zst.len() / 2]).unwrap();
    let r = run(tracer().arg("replay").arg(&path));
    assert!(matches!(r.code, Some(0 | 1)), "{}", r.stderr);
    assert!(r.stderr.contains("events-cut.jsonl.zst"), "{}", r.stderr);
    assert!(
        r.stderr.contains("corrupt or truncated compressed data")
            || r.stderr.contains("stops mid-record"),
        "{}",
        r.stderr
    );
}

fn replay_text(dir: &Path, name: &str, text: &str) -> Run {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    run(tracer().arg("replay").arg(&path))
}

#[test]
fn hand_written_logs_give_their_expected_findings() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/logs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let expected_path = path.with_extension("expected");
        let expected: Vec<String> = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()))
            .lines()
            .map(str::to_owned)
            .collect();
        let r = replay(std::slice::from_ref(&path), &Filter::default(), |_, _| {}).unwrap();
        assert!(
            r.stats.problems.is_empty(),
            "{}: {:?}",
            path.display(),
            r.stats.problems
        );
        let got: Vec<String> = r
            .findings
            .iter()
            .map(|f| {
                format!(
                    "{} {:#x} {}",
                    f.kind.name(),
                    f.kvm,
                    f.vcpu_id.map_or_else(|| "-".into(), |v| v.to_string())
                )
            })
            .collect();
        assert_eq!(got, expected, "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} logs");
}

#[test]
fn filters_and_the_timeline() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/logs");
    let all: Vec<PathBuf> = ["tdx-forbidden-entry", "v3-mirror-realloc", "load-enomem"]
        .iter()
        .map(|n| data.join(format!("{n}.jsonl")))
        .collect();
    let count = |args: &[&str]| {
        let r = run(tracer().args(["replay", "--json"]).args(args).args(&all));
        r.stdout.lines().count()
    };
    assert_eq!(count(&[]), 4);
    assert_eq!(count(&["--pid", "7001"]), 2);
    assert_eq!(count(&["--kvm", "0xffff888200000000"]), 1);
    assert_eq!(count(&["--vcpu", "3"]), 1);
    // tdx-forbidden-entry's header maps monotonic 1 s to 2026-11-28T04:14:21Z:
    // its findings are at 2.6 s, i.e. 04:14:22.6.
    assert_eq!(
        count(&["--pid", "7001", "--since", "2026-11-28T04:14:22Z"]),
        2
    );
    assert_eq!(
        count(&["--pid", "7001", "--until", "2026-11-28T04:14:22Z"]),
        0
    );

    let r = run(tracer()
        .args([
            "replay",
            "--utc",
            "--timeline",
            "--pid",
            "7001",
            "--vcpu",
            "1",
        ])
        .arg(&all[0]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    // Grouped: the VM named at its head, then the vCPU's history.
    assert!(lines[0].starts_with("VM vmm=7001 type=tdx"), "{}", r.stdout);
    assert_eq!(lines[1], "  vCPU 1", "{}", r.stdout);
    assert!(
        lines[2].starts_with("    2026-11-28T04:14:22.000000Z  vcpu 1"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("vm        zap_all_fast gen=0"),
        "{}",
        r.stdout
    );
    let forbidden = lines
        .iter()
        .find(|l| l.contains("entry_forbidden"))
        .unwrap();
    assert!(forbidden.contains("mirror=INVALID"), "{forbidden}");
    assert!(forbidden.ends_with("<- roots changed"), "{forbidden}");
    assert!(
        r.stdout
            .contains("!! CRITICAL mirror_root_invalid_at_entry"),
        "{}",
        r.stdout
    );
}

#[test]
fn every_example_in_the_schema_document_parses() {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/event-log.md"),
    )
    .unwrap();
    let mut kinds = Vec::new();
    let mut in_json = false;
    for line in doc.lines() {
        match line.trim() {
            "```json" => in_json = true,
            "```" => in_json = false,
            l if in_json => {
                let record = reader::parse(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                kinds.push(match record {
                    Record::Header(_) => "header",
                    Record::Event(_) => "event",
                    Record::Finding(_) => "finding",
                    Record::Loss(_) => "loss",
                    Record::Vm(_) => "vm",
                    Record::Summary => "summary",
                    Record::Skipped => "skipped",
                });
            }
            _ => {}
        }
    }
    assert_eq!(kinds, ["header", "event", "finding", "loss", "vm"]);
}

/// Every record line carries its wall-clock time (RFC 3339, from `ts_ns`
/// and the segment's clocks) and the host, so a line shipped alone still
/// says when and where; what that costs after compression is measured.
#[test]
fn records_carry_wall_time_and_host_and_what_it_costs_compressed() {
    let dir = tempfile::tempdir().unwrap();
    record(
        dir.path(),
        "mirror-freed-by-zap",
        "fleet",
        300,
        &["--no-compress"],
    );
    let segs = segments(dir.path());
    let text: String = segs
        .iter()
        .map(|s| std::fs::read_to_string(s).unwrap())
        .collect();
    let header: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let (mono, real) = (
        header["clock"]["monotonic_ns"].as_u64().unwrap(),
        header["clock"]["realtime_ns"].as_u64().unwrap(),
    );
    let mut plain = String::new();
    let mut records = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["record"] == "header" {
            plain.push_str(line);
            plain.push('\n');
            continue;
        }
        records += 1;
        assert_eq!(v["host"], header["hostname"], "{line}");
        let ts = v["ts_ns"].as_u64().or_else(|| v["to_ns"].as_u64()).unwrap();
        let want = tracer::log::writer::utc_rfc3339_millis(real + ts - mono.min(ts));
        assert_eq!(v["time"], want.as_str(), "{line}");
        let cut = line.rfind(",\"time\":\"").unwrap();
        plain.push_str(&line[..cut]);
        plain.push_str("}\n");
    }
    assert!(records > 1000, "{records}");
    let zstd_len = |s: &str| zstd::encode_all(s.as_bytes(), 3).unwrap().len();
    let gzip_len = |s: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, s.as_bytes()).unwrap();
        e.finish().unwrap().len()
    };
    let pct = |a: usize, b: usize| {
        let f = |n: usize| f64::from(u32::try_from(n).unwrap());
        (f(a) / f(b) - 1.0) * 100.0
    };
    let (raw, raw0) = (text.len(), plain.len());
    let (z, z0) = (zstd_len(&text), zstd_len(&plain));
    let (g, g0) = (gzip_len(&text), gzip_len(&plain));
    eprintln!(
        "time+host on {records} records: raw {raw0} → {raw} bytes (+{:.1}%), zstd -3 {z0} → {z} \
         (+{:.1}%), gzip -6 {g0} → {g} (+{:.1}%)",
        pct(raw, raw0),
        pct(z, z0),
        pct(g, g0)
    );
    assert!(pct(z, z0) < 15.0, "zstd cost {:.1}%", pct(z, z0));
}

/// `--compression gzip`: closed segments are `.jsonl.gz` (what Vector and
/// Fluent Bit read), valid gzip, and replay reads them like zstd ones.
#[test]
fn gzip_segments_are_gzip_and_replay_alike() {
    let gz = tempfile::tempdir().unwrap();
    let zst = tempfile::tempdir().unwrap();
    for (dir, codec) in [(&gz, "gzip"), (&zst, "zstd")] {
        record(
            dir.path(),
            "mirror-freed-by-zap",
            "fleet",
            300,
            &["--segment-size", "16K", "--compression", codec],
        );
    }
    let closed: Vec<PathBuf> = segments(gz.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    assert!(closed.len() >= 2, "{:?}", segments(gz.path()));
    for p in &closed {
        let mut d = flate2::read::MultiGzDecoder::new(std::fs::File::open(p).unwrap());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut d, &mut text).unwrap();
        assert!(
            text.starts_with("{\"record\":\"header\""),
            "{}",
            p.display()
        );
    }
    let findings = |dir: &Path| {
        let r = run(tracer().args(["replay", "--json"]).arg(dir));
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        r.stdout
            .lines()
            .filter(|l| l.contains("\"record\":\"finding\""))
            .count()
    };
    assert_eq!(findings(gz.path()), findings(zst.path()));
}
