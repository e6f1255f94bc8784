//! The README as a tested artifact: every command in its shell blocks runs
//! here (or, for the test and matrix commands, in `.ci/run` itself) with
//! the outcome the README states: the findings it names, its captures, the
//! exit codes. The flags of the commands written in its prose exist.
//!
//! Captures are regenerated, never pasted: `cargo xtask readme` (root, for
//! the `watch` sample) runs these tests with TRACER_UPDATE_README=1, which
//! writes what the commands print into the README instead of comparing.

#[path = "support/cli.rs"]
mod support;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

fn readme_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md")
}

fn readme() -> String {
    std::fs::read_to_string(readme_path()).unwrap()
}

/// Whether captures are written into the README rather than compared.
fn updating() -> bool {
    std::env::var_os("TRACER_UPDATE_README").is_some_and(|v| v == "1")
}

/// One writer of the README at a time (tests run in threads).
static WRITING: Mutex<()> = Mutex::new(());

/// Replaces the body of the first fenced block that follows `after` with
/// `body`, re-reading the README under the lock.
fn write_block_after(after: &str, body: &str) {
    let _guard = WRITING.lock().unwrap();
    let text = readme();
    let (start, end) = block_after(&text, after).expect("the block to update");
    let new = format!("{}{body}{}", &text[..start], &text[end..]);
    std::fs::write(readme_path(), new).unwrap();
}

/// The byte range of the body of the first fenced block after the first
/// occurrence of `after` (the block's own lines, without its fences).
fn block_after(text: &str, after: &str) -> Option<(usize, usize)> {
    let at = text.find(after)? + after.len();
    let open = at + text[at..].find("\n```")? + 1;
    let start = open + text[open..].find('\n')? + 1;
    let end = start + text[start..].find("```\n")?;
    Some((start, end))
}

/// The lines of the README's fenced shell blocks (```sh), comments cut.
fn shell_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for l in text.lines() {
        if let Some(lang) = l.strip_prefix("```") {
            in_sh = !in_sh && lang == "sh";
            continue;
        }
        if in_sh {
            let cmd = l.split(" #").next().unwrap_or("").trim();
            if !cmd.is_empty() {
                out.push(cmd.to_owned());
            }
        }
    }
    out
}

/// Runs a README shell line with the built `tracer` first on PATH.
fn sh(line: &str, dir: &std::path::Path) -> support::Run {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tracer"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    support::run(
        Command::new("bash")
            .args(["-o", "pipefail", "-c", line])
            .env("PATH", path)
            .current_dir(dir),
    )
}

/// Every `tracer simulate … | tracer replay …` line of the README's shell
/// blocks finds something and exits 1, as the README says replay does.
#[test]
fn every_simulate_replay_example_finds_what_it_promises() {
    let text = readme();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tracer simulate") && l.contains("| tracer replay"))
        .collect();
    assert!(lines.len() >= 3, "{lines:?}");
    let dir = tempfile::tempdir().unwrap();
    for line in lines {
        let r = sh(line, dir.path());
        assert_eq!(r.code, Some(1), "{line}: {}", r.stderr);
        assert!(
            r.stdout.contains("FINDING") || r.stdout.contains("\"record\":\"finding\""),
            "{line}"
        );
    }
}

/// Each kernel behaviour the README lists raises, with default flags, the
/// findings the README names for it; mainline raises none.
#[test]
fn each_behaviour_raises_the_findings_the_readme_names_with_default_flags() {
    let text = readme();
    let dir = tempfile::tempdir().unwrap();
    for (kernel, kinds) in [
        ("mainline", &[][..]),
        (
            "v3-unconditional-mirror-alloc",
            &["mirror_root_realloc_while_valid"][..],
        ),
        (
            "mirror-invalidated-by-zap",
            &["mirror_root_stale_after_load", "mirror_root_stale_at_entry"][..],
        ),
        ("mirror-freed-by-zap", &["mirror_root_invalid_at_entry"][..]),
    ] {
        assert!(
            text.contains(&format!("- `{kernel}`")),
            "the README lists {kernel}"
        );
        let r = sh(
            &format!("tracer simulate --kernel {kernel} | tracer replay --json -"),
            dir.path(),
        );
        if kinds.is_empty() {
            assert_eq!(r.code, Some(0), "{kernel}: {}", r.stdout);
        } else {
            assert_eq!(r.code, Some(1), "{kernel}: {}", r.stderr);
        }
        for k in kinds {
            assert!(
                r.stdout.contains(&format!("\"kind\":\"{k}\"")),
                "{kernel} with default flags raised no {k}"
            );
        }
    }
}

/// Every line of the README's shell blocks is one this file runs, or one
/// `.ci/run` runs itself: a new example without a test fails here.
#[test]
fn every_shell_line_is_run_by_a_test() {
    for line in shell_lines(&readme()) {
        let covered = (line.starts_with("tracer simulate") && line.contains("| tracer replay"))
            || line.starts_with("tracer simulate --kernel mirror-freed-by-zap --rounds 200 --record")
            || line.starts_with("tracer top --replay /tmp/log")
            || (line.starts_with("tracer replay ") && line.ends_with(DAEMON_LOG))
            || line
                .strip_prefix("cargo xtask run -- ")
                .is_some_and(|a| LIVE.iter().any(|(args, _)| *args == a))
            // `.ci/run` runs these itself.
            || [
                "cargo xtask test",
                "cargo xtask vm-test",
                "cargo xtask vm-test --kernel 6.18",
                "cargo xtask dist",
                "cargo xtask dist --check",
            ]
            .contains(&line.as_str());
        assert!(covered, "the README shows `{line}`, which no test runs");
    }
}

/// The `top --replay` capture is what the shell block before it prints
/// (its log's path aside, the same on any machine: the snapshot plays the
/// log on its own clock).
#[test]
fn the_top_capture_is_what_its_commands_print() {
    let text = readme();
    let lines: Vec<String> = shell_lines(&text)
        .into_iter()
        .filter(|l| {
            l.starts_with("tracer simulate --kernel mirror-freed-by-zap --rounds 200 --record")
                || l.starts_with("tracer top --replay /tmp/log")
        })
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let dir = tempfile::tempdir().unwrap();
    let mut screen = String::new();
    for l in &lines {
        let r = sh(&l.replace("/tmp/log", "log"), dir.path());
        assert_eq!(r.code, Some(0), "{l}: {}", r.stderr);
        screen = r.stdout;
    }
    let screen = screen.replace("replay of log ", "replay of /tmp/log ");
    // The capture is the block after the commands' block.
    let anchor = format!("{}\n```\n", lines[1]);
    let anchor = anchor.as_str();
    if updating() {
        write_block_after(anchor, &screen);
        return;
    }
    let (start, end) = block_after(&text, anchor).expect("a capture after the commands");
    assert_eq!(
        text[start..end],
        screen,
        "the README's top capture is not what its commands print; `cargo xtask readme` \
         regenerates it"
    );
    for want in ["events 1418", "findings 46 (8 critical)", "VMs 3 (2 TDX)"] {
        assert!(screen.contains(want), "{want}:\n{screen}");
    }
}

/// Where the README's incident examples read the daemon's log.
const DAEMON_LOG: &str = "/var/lib/kvm-root-tracer/log";

/// The "after an incident" examples, run on a model log of a faulty kernel
/// as the README says: each finds what it should, and its filters narrow
/// it as written.
#[test]
fn the_incident_examples_reproduce_on_a_model_log() {
    let dir = tempfile::tempdir().unwrap();
    let r = sh(
        "tracer simulate --kernel mirror-freed-by-zap --record log",
        dir.path(),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<String> = shell_lines(&readme())
        .into_iter()
        .filter(|l| l.starts_with("tracer replay ") && l.ends_with(DAEMON_LOG))
        .collect();
    assert!(lines.len() >= 5, "{lines:?}");
    let all = sh(
        &format!("tracer replay {DAEMON_LOG}").replace(DAEMON_LOG, "log"),
        dir.path(),
    );
    let count = |out: &str| out.lines().filter(|l| l.starts_with("FINDING ")).count();
    assert_eq!(all.code, Some(1), "{}", all.stderr);
    assert!(count(&all.stdout) > 0, "{}", all.stdout);
    for line in lines {
        let r = sh(&line.replace(DAEMON_LOG, "log"), dir.path());
        assert_eq!(r.code, Some(1), "{line}: findings expected\n{}", r.stderr);
        assert!(
            !r.stderr.contains("matches"),
            "{line}: a filter matched nothing\n{}",
            r.stderr
        );
        if let Some(pid) = line
            .split("--pid ")
            .nth(1)
            .and_then(|p| p.split(' ').next())
        {
            if line.contains("--timeline") {
                let heads: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("VM ")).collect();
                assert_eq!(heads.len(), 1, "{line}:\n{}", r.stdout);
                assert!(heads[0].starts_with(&format!("VM vmm={pid} ")), "{line}");
                assert!(r.stdout.contains("  vCPU 1\n"), "{line}:\n{}", r.stdout);
            } else {
                let n = count(&r.stdout);
                assert!(n > 0 && n < count(&all.stdout), "{line}: {n} findings");
                for f in r.stdout.lines().filter(|l| l.starts_with("FINDING ")) {
                    let vmm = format!("vmm={pid}");
                    assert!(
                        f.ends_with(&vmm) || f.contains(&format!("{vmm} ")),
                        "{line}: {f}"
                    );
                }
            }
        } else if line.contains("--min-severity warning") {
            assert!(count(&r.stdout) <= count(&all.stdout), "{line}");
            assert!(!r.stdout.contains("FINDING INFO"), "{line}");
        } else {
            // The whole log, or its last 10 minutes (the model's log lasts
            // seconds): everything.
            assert_eq!(count(&r.stdout), count(&all.stdout), "{line}");
        }
    }
}

/// What each `cargo xtask run -- ARGS` line of the README must do, run as
/// `tracer ARGS` (the binary `cargo xtask run` builds and runs).
const LIVE: &[(&str, &str)] = &[
    ("watch", "streams events under a column header until Ctrl-C"),
    ("doctor", "explains the probes and features, exit 0"),
    ("watch --json", "streams JSON lines, a header record first"),
    (
        "watch --duration 10s",
        "stops by itself after 10 s with a summary",
    ),
    ("top", "draws the live view on a terminal and quits on q"),
];

/// Keeps a real guest entering and exiting (KVM_RUN) and zapping (memslot
/// deletions) until dropped.
struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut guest = kvm::Guest::new(2).expect("a guest");
            while !flag.load(Ordering::Relaxed) {
                guest.run_to_hlt().expect("KVM_RUN");
                guest.churn_slot().expect("a memslot deletion");
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One live test at a time: each traces the whole host, and the other's
/// guest would show in its output.
static LIVE_LOCK: Mutex<()> = Mutex::new(());

/// Runs `tracer ARGS` while a guest is busy; stops it with SIGINT after
/// `secs` unless it stops by itself first.
fn watch_for(args: &str, secs: u64) -> (support::Run, Duration) {
    let _busy = Busy::start();
    let started = Instant::now();
    let child = support::tracer()
        .args(args.split(' '))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        // SAFETY: kill has no memory preconditions; the pid is our child,
        // not yet reaped (wait_with_output below reaps it).
        unsafe { libc::kill(pid, libc::SIGINT) };
    });
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    drop(killer);
    (
        support::Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        took,
    )
}

/// Each `cargo xtask run -- …` line does what the README says, on this
/// kernel, with a real guest running.
#[test]
fn the_live_commands_do_what_the_readme_says() {
    if !support::live_or_skip("the_live_commands_do_what_the_readme_says") {
        return;
    }
    let _one = LIVE_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = readme();
    for (args, what) in LIVE {
        assert!(
            text.contains(&format!("cargo xtask run -- {args}")),
            "the README no longer shows `{args}`: drop it here"
        );
        match *args {
            "doctor" => {
                let r = support::run(support::tracer().arg("doctor"));
                assert_eq!(r.code, Some(0), "{what}: {}", r.stderr);
                for w in ["kvm_entry_gate", "mirror"] {
                    assert!(r.stdout.contains(w), "{what}: no {w}\n{}", r.stdout);
                }
            }
            "watch" | "watch --json" => {
                let (r, _) = watch_for(args, 3);
                assert_eq!(r.code, Some(0), "{args}: {}", r.stderr);
                let first = r.stdout.lines().next().unwrap_or_default();
                if args.ends_with("--json") {
                    assert!(first.contains("\"record\":\"header\""), "{args}: {first}");
                    assert!(r.stdout.contains("\"kind\":\"run_exit\""), "{args}");
                } else {
                    assert!(first.starts_with("TIME "), "{args}: {first}");
                    assert!(r.stdout.contains(" run_exit "), "{args}:\n{}", r.stdout);
                }
                assert!(r.stdout.contains("zap_all_fast"), "{args}: no zap seen");
            }
            "watch --duration 10s" => {
                let (r, took) = watch_for(args, 60);
                assert_eq!(r.code, Some(0), "{args}: {}", r.stderr);
                assert!(
                    (Duration::from_secs(10)..Duration::from_secs(30)).contains(&took),
                    "{args} took {took:?}"
                );
                assert!(
                    r.stderr.contains("tracer: detached after 10.0s: "),
                    "{args}: no summary\n{}",
                    r.stderr
                );
                assert!(r.stderr.contains("  findings: "), "{args}: {}", r.stderr);
            }
            "top" => {
                let bin = env!("CARGO_BIN_EXE_tracer");
                let mut c = Command::new("script")
                    .args([
                        "-qec",
                        &format!("stty cols 120 rows 40; {bin} top"),
                        "/dev/null",
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("script(1)");
                std::thread::sleep(Duration::from_secs(3));
                {
                    use std::io::Write as _;
                    let mut stdin = c.stdin.take().unwrap();
                    stdin.write_all(b"q").unwrap();
                    std::thread::sleep(Duration::from_secs(1));
                }
                let out = c.wait_with_output().unwrap();
                let screen = String::from_utf8_lossy(&out.stdout);
                assert_eq!(out.status.code(), Some(0), "{what}");
                for w in ["tracer top", "plan:", "live", "attached"] {
                    assert!(screen.contains(w), "{what}: no {w} drawn");
                }
            }
            other => panic!("no check for `{other}`"),
        }
    }
}

/// The `watch` sample is real output of its command on this host: the
/// header line as the code prints it, and rows laid out in its columns.
#[test]
fn the_watch_sample_is_real_output() {
    if !support::live_or_skip("the_watch_sample_is_real_output") {
        return;
    }
    let _one = LIVE_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let anchor = "$ sudo tracer watch --utc\n";
    let (r, _) = watch_for("watch --utc", 3);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut lines = r.stdout.lines();
    let header = lines.next().unwrap_or_default().to_owned();
    let rows: Vec<&str> = lines.filter(|l| !l.starts_with("FINDING")).collect();
    // A zap between two run exits of its VMM (the VMM column is the
    // creating thread's id: the guest's thread here).
    let word = |l: &str, i: usize| l.split_whitespace().nth(i).map(str::to_owned);
    let sample: Vec<&str> = (0..rows.len())
        .filter(|&i| word(rows[i], 2).as_deref() == Some("zap_all_fast"))
        .find_map(|zap| {
            let vmm = word(rows[zap], 3);
            let kind = |l: &&&str| word(l, 2).as_deref() == Some("run_exit") && word(l, 3) == vmm;
            let before = rows[..zap].iter().rev().find(kind)?;
            let after = rows[zap + 1..].iter().find(kind)?;
            Some(vec![*before, rows[zap], *after])
        })
        .unwrap_or_else(|| panic!("no zap between run exits:\n{}", r.stdout));
    if updating() {
        let text = readme();
        let (start, end) = block_after(&text, "\n## `watch`").unwrap();
        assert!(text[start..end].starts_with(anchor.trim_start()));
        let _guard = WRITING.lock().unwrap();
        let text = readme();
        let body = format!("{anchor}{header}\n{}\n", sample.join("\n"));
        let new = format!("{}{body}{}", &text[..start], &text[end..]);
        std::fs::write(readme_path(), new).unwrap();
        return;
    }
    let text = readme();
    let (start, end) = block_after(&text, "\n## `watch`").unwrap();
    let block = &text[start..end];
    let mut shown = block
        .strip_prefix(anchor)
        .expect("the sample's command")
        .lines();
    assert_eq!(
        shown.next(),
        Some(header.as_str()),
        "the README's watch header"
    );
    // Columns start where the real rows' columns start.
    let starts = |l: &str| -> Vec<usize> {
        let b = l.as_bytes();
        (0..b.len())
            .filter(|&i| b[i] != b' ' && (i == 0 || b[i - 1] == b' '))
            .collect()
    };
    for row in shown {
        let kind = row.split_whitespace().nth(2).unwrap();
        let real = rows
            .iter()
            .find(|r| r.split_whitespace().nth(2) == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} row on this host:\n{}", r.stdout));
        assert_eq!(starts(row).len(), starts(real).len(), "{row}\n{real}");
        assert_eq!(row.len(), real.len(), "{row}\n{real}");
    }
}

/// The commands written in the README's prose use flags their command has.
#[test]
fn prose_commands_use_flags_that_exist() {
    let text = readme().replace('\n', " ");
    let mut checked = 0;
    for span in text.split('`').skip(1).step_by(2) {
        let Some(rest) = span.strip_prefix("tracer ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(sub) = words
            .next()
            .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
        else {
            continue;
        };
        let help = support::run(support::tracer().args([sub, "--help"]));
        assert_eq!(help.code, Some(0), "`{span}`: no subcommand {sub}");
        for flag in words.filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.stdout.contains(&format!("{flag} "))
                    || help.stdout.contains(&format!("{flag}\n"))
                    || help.stdout.contains(&format!("{flag}="))
                    || help.stdout.contains(&format!("{flag} <")),
                "`{span}`: `tracer {sub}` has no {flag}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "{checked} flags checked");
}

#[allow(
    dead_code,
    reason = "only the guest that runs to HLT and churns is used here"
)]
#[path = "support/kvm.rs"]
mod kvm;
