//! End to end: the real `tracer top --replay` in a real terminal (tmux),
//! driven with keys, on a model log of a faulty kernel. Checks what the
//! screen shows, sorting, filtering, a resize to a tiny window and back,
//! and that `q` and SIGTERM both leave the terminal as it was.
//!
//! Needs tmux (`cargo xtask test` installs it). Without it the test fails
//! saying so, unless TRACER_SKIP_TMUX=1, when it prints SKIPPED.

#[path = "support/screen.rs"]
mod screen;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use screen::vm_rows;

const TRACER: &str = env!("CARGO_BIN_EXE_tracer");

/// A private tmux server, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A private server (named `tag` and this process's id) running
    /// `script` in a 150x45 window called `top`.
    fn start(tag: &str, script: &str) -> Self {
        let tmux = Tmux {
            socket: format!("{tag}-{}", std::process::id()),
        };
        tmux.cmd(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "150",
            "-y",
            "45",
            "sh",
            "-c",
            script,
        ]);
        tmux
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "top"])
    }

    /// Waits until the screen satisfies `ok`; panics with the screen if it
    /// never does.
    fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            let s = self.screen();
            // Twice the same: a capture taken while a frame is being drawn
            // shows its top half new and its bottom half old.
            if ok(&s) && s == last {
                return s;
            }
            last.clone_from(&s);
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The pid of the running `tracer top` replaying `log` (its command line
/// names the test's own temporary log). `/proc/PID/task/TID/children` is
/// not used: the kernel documents it as unreliable for running tasks.
fn tracer_pid(log: &Path) -> Option<i32> {
    let needle = log.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("top\0--replay")
                    && c.contains(&needle)
                    && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|st| !st.contains(") Z "))
            })
        })
}

/// tmux is here, or an explicit skip (TRACER_SKIP_TMUX=1) that says so.
fn tmux_or_skip(test: &str) -> bool {
    if Command::new("tmux").arg("-V").output().is_ok() {
        return true;
    }
    if std::env::var_os("TRACER_SKIP_TMUX").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: no tmux");
        return false;
    }
    panic!(
        "tmux is missing, so the end-to-end test of `tracer top` can't run: \
         `cargo xtask test` installs it (apt-get install tmux); \
         TRACER_SKIP_TMUX=1 skips the test explicitly"
    );
}

#[test]
fn top_replays_a_faulty_kernel_in_a_real_terminal() {
    if !tmux_or_skip("top_replays_a_faulty_kernel_in_a_real_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let sim = Command::new(TRACER)
        .args(["simulate", "--kernel", "mirror-freed-by-zap"])
        .args(["--scenario", "steady", "--rounds", "200", "--record"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(sim.status.success(), "{sim:?}");

    // Three runs in one pane: the first quits with q, the second gets
    // SIGTERM, the third loses its terminal. After each the shell prints the
    // exit code on the normal screen, and waits for Enter before the next
    // run, so the test can read it before another run covers the screen.
    let run = format!(
        "{TRACER} top --replay {log} --speed 100000",
        log = log.display()
    );
    let script = format!(
        "{run}; echo EXIT1=$?; read _; {run}; echo EXIT2=$?; read _; {run}; echo EXIT3=$?; sleep 120"
    );
    let tmux = Tmux::start("tracer-top-test", &script);

    let s = tmux.wait("the end of the log", |s| s.contains("end of log"));
    assert!(s.contains("tracer top"), "{s}");
    assert!(s.contains("model:mirror-freed-by-zap"), "{s}");
    assert!(s.contains("VMs 3 (2 TDX)"), "{s}");
    assert_eq!(vm_rows(&s).len(), 3, "{s}");
    assert!(s.contains("INVALID"), "{s}");
    assert!(s.contains("mirror_roots_invalidated_live"), "{s}");
    assert!(s.contains("sort: findings"), "{s}");

    tmux.keys(&["s"]);
    tmux.wait("sorting by zaps/s", |s| s.contains("sort: zaps/s"));
    tmux.keys(&["/", "4003", "Enter"]);
    let s = tmux.wait("the filter", |s| {
        s.contains("filter: 4003") && vm_rows(s).len() == 1
    });
    assert!(s.contains("vCPUs of VMM 4003"), "{s}");
    tmux.keys(&["Escape"]);
    tmux.wait("the filter cleared", |s| vm_rows(s).len() == 3);

    tmux.cmd(&["resize-window", "-t", "top", "-x", "40", "-y", "10"]);
    tmux.wait("the too-small notice", |s| s.contains("needs 60x16"));
    tmux.cmd(&["resize-window", "-t", "top", "-x", "150", "-y", "45"]);
    tmux.wait("the full view again", |s| vm_rows(s).len() == 3);

    tmux.keys(&["q"]);
    let s = tmux.wait("the first run to exit", |s| s.contains("EXIT1="));
    assert!(s.contains("EXIT1=0"), "{s}");
    tmux.keys(&["Enter"]);

    // The second run: SIGTERM restores the terminal too.
    let s = tmux.wait("the second run", |s| s.contains("end of log"));
    assert!(!s.contains("EXIT1"), "the UI covers the screen:\n{s}");
    let pid = tracer_pid(&log).expect("the second tracer's pid");
    // SAFETY: kill has no memory preconditions; the pid is the test's own
    // grandchild, alive (the pane shows it).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let s = tmux.wait("the second run to exit", |s| s.contains("EXIT2="));
    assert!(s.contains("EXIT2=0"), "{s}");
    assert!(s.contains("EXIT1=0"), "the normal screen is back:\n{s}");
    assert!(!s.contains("tracer top"), "the UI is gone:\n{s}");
    tmux.keys(&["Enter"]);
    assert!(Path::new(&log).exists());

    // The third run: the terminal goes away under it (the tmux server is
    // killed); it must exit, not spin on a dead terminal.
    let s = tmux.wait("the third run", |s| s.contains("end of log"));
    assert!(!s.contains("EXIT2"), "{s}");
    let pid = tracer_pid(&log).expect("the third tracer's pid");
    tmux.cmd(&["kill-server"]);
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| !st.contains(") Z "))
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "tracer top (pid {pid}) still runs 5 s after its terminal went away"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 13: `top --replay` of a log of a million events that compresses
/// to a few KiB took gigabytes, because the whole log was loaded first. It
/// streams now: the memory does not grow with the log.
#[test]
fn a_long_replay_streams_in_bounded_memory() {
    if !tmux_or_skip("a_long_replay_streams_in_bounded_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sim = Command::new(TRACER)
        .args(["simulate", "--kernel", "mainline", "--scenario", "steady"])
        .args(["--rounds", "1"])
        .output()
        .unwrap();
    assert!(sim.status.success(), "{sim:?}");
    let text = String::from_utf8(sim.stdout).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let event = lines.next().unwrap();
    // 100 zstd frames of 10,000 events each: a stream of a million events
    // (~350 MB of JSON) in a file of a few KiB.
    let log = dir.path().join("long.jsonl.zst");
    let head = zstd::encode_all(format!("{header}\n").as_bytes(), 3).unwrap();
    let block = zstd::encode_all(format!("{event}\n").repeat(10_000).as_bytes(), 3).unwrap();
    let mut bytes = head;
    for _ in 0..100 {
        bytes.extend_from_slice(&block);
    }
    std::fs::write(&log, &bytes).unwrap();
    assert!(bytes.len() < 256 << 10, "{} bytes", bytes.len());

    let run = format!("{TRACER} top --replay {} --speed 100000", log.display());
    let tmux = Tmux::start("tracer-top-long", &run);
    let started = Instant::now();
    let mut peak_kib = 0u64;
    let mut seen = false;
    while started.elapsed() < Duration::from_secs(8) {
        if let Some(pid) = tracer_pid(&log) {
            seen = true;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let screen = tmux.screen();
    eprintln!(
        "top --replay of 1,000,000 events in {} KiB: peak RSS {} MiB",
        bytes.len() >> 10,
        peak_kib >> 10
    );
    assert!(seen, "tracer top never ran: {screen}");
    assert!(
        screen.contains("tracer top"),
        "the UI is up while it streams:\n{screen}"
    );
    assert!(peak_kib < 64 << 10, "peak RSS {} MiB", peak_kib >> 10);
}
