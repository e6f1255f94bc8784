//! Userspace figures: launch to attached, memory at start and at 10,000
//! vCPUs, the criterion benches of the pipeline, `top`'s frame, and replay's
//! rate.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Report,
    procs::{Proc, cpu_seconds, daemon, rss_kib, scrape, simulate, tracer_cmd},
};
use crate::free_port;

/// Launch to every probe attached, five times; the median.
pub(super) fn startup(tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    let mut times = Vec::new();
    for i in 0..5 {
        let err = work.join(format!("startup-{i}.err"));
        let started = Instant::now();
        let mut t = Proc::spawn(
            &mut tracer_cmd(tracer, &["watch", "--json"]),
            Stdio::null(),
            &err,
        )?;
        t.wait_attached()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        t.stop(libc::SIGINT)?;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    r.add(
        "start-up",
        "launch to all probes attached (median of 5)",
        median,
        "ms",
    );
    r.note(format!(
        "min {:.0} ms, max {:.0} ms (measured from spawn to the \"attached\" line)",
        times[0],
        times[times.len() - 1]
    ));
    r.target("< 100 ms", median < 100.0);
    Ok(())
}

/// Daemon RSS idle, and with 10,000 vCPUs tracked (model events injected).
pub(super) fn memory(tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let t = daemon(tracer, work, "mem-log", &["--metrics-listen", &listen])?;
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = rss_kib(t.pid())?;
    t.stop(libc::SIGTERM)?;
    r.add(
        "memory",
        "daemon RSS, idle (tracer run)",
        rss as f64 / 1024.0,
        "MiB",
    );
    r.note("the ring buffer map (4 MiB) counts once mapped");
    r.add(
        "memory",
        "daemon peak RSS, start-up included (VmHWM)",
        hwm as f64 / 1024.0,
        "MiB",
    );
    r.target("<= 32 MiB", hwm <= 32 * 1024);

    // 3 VMs x 3334 vCPUs from the model.
    let sim = work.join("mem-sim");
    simulate(
        tracer,
        &sim,
        &["--scenario", "steady", "--vcpus", "3334", "--rounds", "3"],
    )?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let t = daemon(
        tracer,
        work,
        "mem-log-10k",
        &[
            "--metrics-listen",
            &listen,
            "--inject",
            &sim.to_string_lossy(),
        ],
    )?;
    let started = Instant::now();
    let tracked = loop {
        let v = scrape(port, "kvm_root_tracer_tracked_vcpus").unwrap_or(0.0);
        if v >= 10_000.0 {
            break v;
        }
        if started.elapsed() > Duration::from_mins(1) {
            bail!("the daemon tracks {v} vCPUs, not 10,000, after 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(1));
    let (rss, hwm) = rss_kib(t.pid())?;
    t.stop(libc::SIGTERM)?;
    r.add(
        "memory",
        format!("daemon RSS, {tracked:.0} vCPUs tracked"),
        rss as f64 / 1024.0,
        "MiB",
    );
    r.note(format!("peak {:.1} MiB", hwm as f64 / 1024.0));
    r.target("<= 32 MiB", rss <= 32 * 1024);
    Ok(())
}

/// The criterion benches, short runs; events/s from their own estimates.
pub(super) fn userspace(root: &Path, r: &mut Report) -> Result<()> {
    let rows = criterion(root, "pipeline")?;
    for (name, per_s) in rows {
        r.add("userspace (1 core)", name.clone(), per_s, "events/s");
        if name == "decode+detect" {
            r.target(">= 2,000,000/s", per_s >= 2e6);
        }
    }
    Ok(())
}

/// Runs one criterion bench of the tracer, short; (name, elements per
/// second) from criterion's own estimates, fastest first.
pub(super) fn criterion(root: &Path, bench: &str) -> Result<Vec<(String, f64)>> {
    let crit = root.join("target/criterion").join(bench);
    let _ = std::fs::remove_dir_all(&crit);
    crate::cargo(
        root,
        &[
            "bench",
            "--package",
            "tracer",
            "--bench",
            bench,
            "--",
            "--warm-up-time",
            "1",
            "--measurement-time",
            "3",
        ],
    )?;
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(&crit)? {
        let dir = entry?.path();
        let Ok(b) = std::fs::read_to_string(dir.join("new/benchmark.json")) else {
            continue;
        };
        let b: Value = serde_json::from_str(&b)?;
        let e: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("new/estimates.json"))?)?;
        let elements = b["throughput"]["Elements"]
            .as_f64()
            .context("no throughput")?;
        let ns = e["mean"]["point_estimate"].as_f64().context("no mean")?;
        let name = b["function_id"].as_str().unwrap_or("?").to_owned();
        rows.push((name, elements / (ns * 1e-9)));
    }
    if rows.is_empty() {
        bail!("criterion wrote no estimates under {}", crit.display());
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(rows)
}

/// `tracer top` with 100 VMs of 64 vCPUs: frame time (criterion, test
/// backend), and the real binary's CPU use replaying the model's `fleet`
/// log in a 150x50 tmux window.
pub(super) fn top(root: &Path, tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    const SECTION: &str = "tracer top, 100 VMs x 64";
    for (name, per_s) in criterion(root, "top")? {
        if name.starts_with("frame") {
            r.add(
                SECTION,
                "frame time (200x60, test backend)",
                1e3 / per_s,
                "ms",
            );
        } else {
            r.add(SECTION, name, per_s, "events/s");
        }
    }
    crate::apt_install(&[("/usr/bin/tmux", "tmux")])?;
    let log = work.join("top-fleet");
    simulate(
        tracer,
        &log,
        &["--scenario", "fleet", "--vcpus", "64", "--rounds", "100"],
    )?;
    let socket = format!("tracer-bench-{}", std::process::id());
    let tmux = |args: &[&str]| {
        crate::run(
            Command::new("tmux")
                .args(["-L", &socket, "-f", "/dev/null"])
                .args(args),
        )
    };
    // The model log spans about 320 s: at 20x it plays for about 16 s.
    let cmd = format!(
        "{} top --replay {} --speed 20",
        tracer.display(),
        log.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "50",
        &cmd,
    ])?;
    let result = (|| -> Result<(f64, String)> {
        std::thread::sleep(Duration::from_secs(2));
        let mut pid: u32 = tmux(&["display", "-p", "-t", "top", "#{pane_pid}"])?
            .trim()
            .parse()?;
        // The pane may run a shell that runs tracer.
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))?.trim() != "tracer" {
            pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?
                .split_whitespace()
                .next()
                .context("the pane runs no tracer")?
                .parse()?;
        }
        let cpu0 = cpu_seconds(pid)?;
        std::thread::sleep(Duration::from_secs(10));
        let cpu1 = cpu_seconds(pid)?;
        let screen = tmux(&["capture-pane", "-p", "-t", "top"])?;
        Ok((cpu1 - cpu0, screen))
    })();
    let _ = tmux(&["kill-server"]);
    let (cpu, screen) = result?;
    if !screen.contains("VMs 100 (25 TDX)") {
        bail!("tracer top did not show the fleet:\n{screen}");
    }
    r.add(
        SECTION,
        "CPU while replaying at 20x (5 frames/s)",
        cpu / 10.0 * 100.0,
        "% core",
    );
    r.note("the real binary in tmux, 150x50, over 10 s of playback");
    std::fs::write(work.join("top-screen.txt"), &screen)?;
    Ok(())
}

/// `tracer replay` over a model log of ~120k events, and its size on disk,
/// zstd-compressed (as the daemon leaves closed segments) and not.
pub(super) fn replay(tracer: &Path, work: &Path, r: &mut Report) -> Result<()> {
    // On-disk bytes of a fresh model log.
    let recorded = |dir: &Path, extra: &[&str]| -> Result<u64> {
        let mut args = vec!["--scenario", "churn", "--vcpus", "64", "--rounds", "200"];
        args.extend_from_slice(extra);
        simulate(tracer, dir, &args)?;
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum())
    };
    let dir = work.join("replay-log");
    let compressed = recorded(&dir, &[])?;
    let raw = recorded(&work.join("replay-log-raw"), &["--no-compress"])?;
    // Five runs, the median: one run of 0.2 s moves by ±20% here.
    let mut runs = Vec::new();
    let mut events = 0.0;
    for _ in 0..5 {
        let started = Instant::now();
        let o = Command::new(tracer)
            .args(["replay", "--json"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        runs.push(started.elapsed().as_secs_f64());
        let err = String::from_utf8_lossy(&o.stderr);
        // "tracer: replayed N event(s) from …"
        events = err
            .split("replayed ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no event count in replay's output: {err}"))?;
    }
    runs.sort_by(f64::total_cmp);
    let secs = runs[runs.len() / 2];
    r.add(
        "replay",
        "tracer replay (zstd segments, parse, detect), median of 5",
        events / secs,
        "events/s",
    );
    r.note(format!(
        "{events:.0} model events in {secs:.3} s (runs {:.3}..{:.3} s), the whole process",
        runs[0],
        runs[runs.len() - 1]
    ));
    r.target(">= 1 M events/s", events / secs >= 1e6);
    r.add(
        "replay",
        "bytes per event on disk (zstd)",
        compressed as f64 / events,
        "B",
    );
    r.add(
        "replay",
        "bytes per event, uncompressed JSON",
        raw as f64 / events,
        "B",
    );
    Ok(())
}
