//! Issue 13, as a local attacker who can write the log folder would try it:
//! planted symlinks at predictable names, names already taken, segments of
//! another user, a permissive umask, terminal escapes in thread names.

#[path = "support/kvm.rs"]
mod kvm;
#[path = "support/cli.rs"]
mod support;

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use support::{free_port, live_or_skip, model_log, run, tracer};
use tracer::log::{
    Header,
    writer::{RecordConfig, Recorder, compress_segment, list_segments, utc_compact},
};

fn names(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// A root-owned 0600 file an attacker would like overwritten.
fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, "precious\n").unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
    v
}

fn simulate_into(log: &Path) {
    let r = run(tracer()
        .args([
            "simulate",
            "--kernel",
            "mirror-freed-by-zap",
            "--scenario",
            "hotplug",
        ])
        .args(["--vcpus", "2", "--rounds", "5", "--record"])
        .arg(log));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn incident_files_never_follow_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    // The model's clock is fixed, so the incident names are predictable:
    // learn them from one run, plant links at them for the next.
    let first = dir.path().join("first");
    simulate_into(&first);
    let planted = names(&first, "incident-");
    assert!(
        !planted.is_empty(),
        "the faulty model wrote no incident file"
    );
    let log = dir.path().join("log");
    std::fs::create_dir(&log).unwrap();
    let target = victim(dir.path());
    for n in &planted {
        std::os::unix::fs::symlink(&target, log.join(n)).unwrap();
    }
    simulate_into(&log);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    for n in &planted {
        assert!(
            log.join(n)
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    let written: Vec<String> = names(&log, "incident-")
        .into_iter()
        .filter(|n| !planted.contains(n))
        .collect();
    assert_eq!(
        written.len(),
        planted.len(),
        "the incidents went to other names"
    );
}

#[test]
fn a_planted_zst_tmp_symlink_is_removed_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = victim(dir.path());
    let seg = dir.path().join("events-20261128T000000Z-000000.jsonl");
    std::fs::write(&seg, "{\"record\":\"summary\"}\n").unwrap();
    let tmp = dir
        .path()
        .join("events-20261128T000000Z-000000.jsonl.zst.tmp");
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    compress_segment(&seg).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    let zst = dir.path().join("events-20261128T000000Z-000000.jsonl.zst");
    let back = zstd::decode_all(std::fs::File::open(&zst).unwrap()).unwrap();
    assert_eq!(back, b"{\"record\":\"summary\"}\n");
    assert!(!zst.symlink_metadata().unwrap().file_type().is_symlink());
    assert!(!tmp.exists() && !seg.exists());
}

#[test]
fn a_taken_segment_name_picks_the_next_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Every name the first segment could get in the next few seconds.
    for s in 0..5 {
        let name = format!("events-{}-000000.jsonl", utc_compact(now + s));
        std::fs::write(dir.path().join(name), "planted\n").unwrap();
    }
    let header = Header::for_this_host("test".into(), "test".into(), vec![]);
    let cfg = RecordConfig {
        min_free_bytes: 0,
        compress: false,
        ..RecordConfig::default()
    };
    let r =
        Recorder::open(dir.path(), cfg, header, true).expect("a collision never ends the daemon");
    let ours = r
        .current_path()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(ours.ends_with("-000001.jsonl"), "{ours}");
    drop(r);
    for s in 0..5 {
        let name = format!("events-{}-000000.jsonl", utc_compact(now + s));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(name)).unwrap(),
            "planted\n"
        );
    }
}

#[test]
fn segments_another_user_planted_are_ignored_by_retention_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    simulate_into(&log);
    let ours = list_segments(&log).unwrap();
    assert!(!ours.is_empty());
    // A 2 TB sparse file that sorts last, owned by nobody; and a FIFO.
    let big = log.join("events-99991231T235959Z-999999.jsonl");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(2 << 40).unwrap();
    std::os::unix::fs::chown(&big, Some(65534), Some(65534)).unwrap();
    let fifo = log.join("events-99991231T235959Z-999998.jsonl");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we pass.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    assert_eq!(
        list_segments(&log).unwrap(),
        ours,
        "only the daemon's own segments"
    );
    // Retention with a 1 GiB budget: the planted 2 TB file must not make it
    // delete the real segments.
    let header = Header::for_this_host("test".into(), "test".into(), vec![]);
    let cfg = RecordConfig {
        min_free_bytes: 0,
        compress: false,
        ..RecordConfig::default()
    };
    drop(Recorder::open(&log, cfg, header, true).unwrap());
    for (p, _) in &ours {
        assert!(p.exists(), "{} was pruned", p.display());
    }
    // Replay reads ours, names what it ignored, and does not hang on the FIFO.
    let r = run(tracer().arg("replay").arg(&log).env("TMPDIR", dir.path()));
    assert!(r.stderr.contains("owned by uid 65534"), "{}", r.stderr);
    assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    assert!(r.code == Some(0) || r.code == Some(1), "{}", r.stderr);

    // A segment whose name is not UTF-8 is named (lossily) and said to be
    // ignored, not skipped in silence.
    let odd = log.join(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
            b"events-2026\xff-000001.jsonl",
        ),
    );
    std::fs::copy(&ours[0].0, &odd).unwrap();
    let r = run(tracer().arg("replay").arg(&log));
    assert!(r.stderr.contains("its name is not UTF-8"), "{}", r.stderr);
    assert!(
        r.stderr.contains("events-2026\u{fffd}-000001.jsonl"),
        "{}",
        r.stderr
    );
}

#[test]
fn log_files_are_0640_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} simulate --kernel mirror-freed-by-zap --scenario hotplug --vcpus 2 --rounds 5 --record {}",
            env!("CARGO_BIN_EXE_tracer"),
            log.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(100));
    let files: Vec<PathBuf> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files
            .iter()
            .any(|p| p.to_string_lossy().contains("incident-"))
    );
    for p in files {
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}: {mode:o}", p.display());
    }
}

#[test]
fn a_symlinked_or_shared_log_folder_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let sim = |log: &Path| {
        run(tracer()
            .args([
                "simulate",
                "--scenario",
                "steady",
                "--rounds",
                "2",
                "--record",
            ])
            .arg(log))
    };
    let r = sim(&link);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        names(&real, "events-").is_empty(),
        "nothing written through the link"
    );

    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = sim(&real);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("writable by group or others"),
        "{}",
        r.stderr
    );

    std::os::unix::fs::chown(&real, Some(65534), None).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = sim(&real);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("owned by uid 65534"), "{}", r.stderr);

    // A folder it creates itself is 0750.
    let fresh = dir.path().join("fresh/log");
    assert_eq!(sim(&fresh).code, Some(0));
    assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o750);
}

/// Root and /dev/kvm, or an explicit skip (TRACER_SKIP_LIVE=1) that says so.
/// `tracer run` with its stderr in a file; killed when dropped.
struct Daemon {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, metrics: &str) -> Self {
        let log = dir.join("log");
        daemon_with(
            dir,
            &[
                "--log-dir",
                log.to_str().unwrap(),
                "--metrics-listen",
                metrics,
            ],
        )
    }

    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and the exit code.
    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn scrape(port: u16) -> Option<String> {
    get(port, "/metrics")
}

/// `GET path` on the daemon's port: the whole answer, if it is a 200.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// CPU seconds the process used (utime + stime).
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks / f64::from(u32::try_from(hz).unwrap_or(100))
}

#[test]
fn a_squatted_metrics_port_is_a_warning_and_a_retry_not_an_exit() {
    if !live_or_skip("a_squatted_metrics_port_is_a_warning_and_a_retry_not_an_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let d = Daemon::start(dir.path(), &format!("127.0.0.1:{port}"));
    assert!(d.err().contains("can't serve metrics"), "{}", d.err());
    drop(squatter);
    assert!(
        wait(Duration::from_secs(25), || scrape(port).is_some()),
        "the daemon never took the port back: {}",
        d.err()
    );
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn idle_connections_do_not_exhaust_the_daemon() {
    if !live_or_skip("idle_connections_do_not_exhaust_the_daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::start(dir.path(), &format!("127.0.0.1:{port}"));
    assert!(wait(Duration::from_secs(10), || scrape(port).is_some()));
    // This test process needs descriptors for its 1,100 sockets too.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or fill the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut rl);
        rl.rlim_cur = rl.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rl);
    }
    let cpu0 = cpu_s(d.pid());
    let idle: Vec<std::net::TcpStream> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(idle.len() > 1000, "{} connections", idle.len());
    std::thread::sleep(Duration::from_secs(2));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    let spent = cpu_s(d.pid()) - cpu0;
    eprintln!("1,100 idle connections: daemon holds {fds} fds, used {spent:.2} s CPU in 2 s");
    assert!(fds < 400, "{fds} descriptors held");
    assert!(spent < 1.0, "{spent:.2} s CPU: a busy loop?");
    // Idle connections are closed after the request timeout; scrapes work
    // again while the attacker's sockets are still open.
    assert!(
        wait(Duration::from_secs(15), || scrape(port).is_some()),
        "no scrape answered"
    );
    drop(idle);
    let err = d.err();
    assert_eq!(d.stop(), Some(0), "{err}");
}

/// Runs `cmd`: its exit code, stderr, and its peak RSS in MiB: the VmHWM of
/// its own address space, sampled every 5 ms until it exits. (wait4's
/// ru_maxrss would count the test process's own pages: a spawned child
/// inherits the parent's high-water mark through exec.)
fn peak_rss(cmd: &mut std::process::Command) -> (Option<i32>, String, u64) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        err
    });
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(hwm) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        }) {
            peak_kib = peak_kib.max(hwm);
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status.code(), reader.join().unwrap(), peak_kib >> 10)
}

#[test]
fn replay_memory_stays_bounded_on_hostile_logs() {
    let dir = tempfile::tempdir().unwrap();
    // One 256 MiB line, zstd-compressed to a few KiB.
    let long = dir.path().join("events-20261128T000000Z-000000.jsonl.zst");
    {
        let mut enc = zstd::Encoder::new(std::fs::File::create(&long).unwrap(), 3).unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..256 {
            std::io::Write::write_all(&mut enc, &chunk).unwrap();
        }
        std::io::Write::write_all(&mut enc, b"\n").unwrap();
        enc.finish().unwrap();
    }
    assert!(std::fs::metadata(&long).unwrap().len() < 64 << 10);
    let (code, err, mib) = peak_rss(tracer().arg("replay").arg(&long));
    eprintln!("one 256 MiB line: peak RSS {mib} MiB");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("longer than"), "{err}");
    assert!(mib < 64, "peak RSS {mib} MiB");

    // Two million bad lines.
    let bad = dir.path().join("bad.jsonl.zst");
    {
        let mut enc = zstd::Encoder::new(std::fs::File::create(&bad).unwrap(), 3).unwrap();
        for _ in 0..2_000_000 {
            std::io::Write::write_all(&mut enc, b"{not json\n").unwrap();
        }
        enc.finish().unwrap();
    }
    let (code, err, mib) = peak_rss(tracer().arg("replay").arg(&bad));
    eprintln!("two million bad lines: peak RSS {mib} MiB");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("2000000 line(s) skipped"), "{err}");
    assert!(err.contains("not kept"), "{err}");
    assert!(mib < 64, "peak RSS {mib} MiB");

    // 300 recorded findings of 2,000 evidence events each: 250 MB of JSON
    // in a few KiB. Kept: the first of them, their evidence cut.
    let sim_log = model_log(
        dir.path(),
        "sim.jsonl",
        ("mirror-freed-by-zap", "fleet"),
        (2, 3),
    );
    let found = tracer()
        .arg("replay")
        .arg("--json")
        .arg(&sim_log)
        .output()
        .unwrap();
    let text = String::from_utf8(found.stdout).unwrap();
    let finding: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut big = finding.clone();
    let one = finding["evidence"][0].clone();
    big["evidence"] = serde_json::Value::Array(vec![one; 2000]);
    let header = std::fs::read_to_string(&sim_log)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let bomb = dir.path().join("findings.jsonl.zst");
    let mut bytes = zstd::encode_all(format!("{header}\n").as_bytes(), 3).unwrap();
    let block = zstd::encode_all(format!("{big}\n").repeat(10).as_bytes(), 3).unwrap();
    for _ in 0..30 {
        bytes.extend_from_slice(&block);
    }
    std::fs::write(&bomb, &bytes).unwrap();
    let (code, err, mib) = peak_rss(tracer().arg("replay").arg(&bomb));
    eprintln!(
        "300 recorded findings x 2,000 evidence events in {} KiB: peak RSS {mib} MiB",
        bytes.len() >> 10
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(mib < 64, "peak RSS {mib} MiB");
    let r = tracer::replay::replay(&[bomb], &tracer::replay::Filter::default(), |_, _| {}).unwrap();
    assert_eq!(r.recorded_findings_total, 300);
    assert!(r.recorded_findings.iter().all(|f| f.evidence.len() <= 16));

    // A device and a FIFO are not read (exit 2, at once).
    let fifo = dir.path().join("fifo.jsonl");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we pass.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    for input in [Path::new("/dev/zero"), fifo.as_path()] {
        let r = run(tracer().arg("replay").arg(input));
        assert_eq!(r.code, Some(2), "{}", r.stderr);
        assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
        let r = run(tracer().arg("run").arg("--config").arg(input));
        assert_eq!(r.code, Some(2), "{}", r.stderr);
        assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    }
}

/// A tmpfs of `size` mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A busy faulty model log to feed `tracer run --inject`.
fn busy_log(dir: &Path) -> PathBuf {
    model_log(dir, "busy.jsonl", ("mirror-freed-by-zap", "fleet"), (4, 10))
}

fn daemon_with(dir: &Path, args: &[&str]) -> Daemon {
    let stderr = dir.join("run.err");
    let child = tracer()
        .args(["run", "--duration", "60s"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, stderr };
    assert!(
        wait(Duration::from_secs(30), || d.err().contains("probe(s) in")),
        "never attached: {}",
        d.err()
    );
    d
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_full_disk_degrades_the_log_and_detection_goes_on() {
    if !live_or_skip("a_full_disk_degrades_the_log_and_detection_goes_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("mnt"), "256k");
    let log = fs.0.join("log");
    let sim = busy_log(dir.path());
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = daemon_with(
        dir.path(),
        &[
            "--log-dir",
            log.to_str().unwrap(),
            "--min-free",
            "1",
            "--no-compress",
            "--metrics-listen",
            &metrics,
            "--inject",
            sim.to_str().unwrap(),
        ],
    );
    assert!(
        wait(Duration::from_secs(30), || d
            .err()
            .contains("can't be written")),
        "{}",
        d.err()
    );
    let m = (0..50)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(200));
            scrape(port).filter(|m| metric(m, "kvm_root_tracer_log_dropped_total") > 0.0)
        })
        .expect("the metrics count the records the log lost");
    assert!(
        metric(&m, "kvm_root_tracer_findings_total") > 0.0,
        "detection went on"
    );
    assert!(metric(&m, "kvm_root_tracer_log_write_errors_total") > 0.0);
    let err = d.err();
    assert_eq!(d.stop(), Some(0), "{err}");
}

#[test]
fn a_read_only_log_folder_at_start_is_a_degraded_start() {
    if !live_or_skip("a_read_only_log_folder_at_start_is_a_degraded_start") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("mnt"), "1m");
    let log = fs.0.join("log");
    std::fs::create_dir(&log).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&fs.0)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let d = daemon_with(
        dir.path(),
        &["--log-dir", log.to_str().unwrap(), "--metrics-listen", ""],
    );
    assert!(d.err().contains("can't be written"), "{}", d.err());
    let err = d.err();
    assert_eq!(d.stop(), Some(0), "{err}");
}

#[test]
fn a_removed_log_folder_is_made_again() {
    if !live_or_skip("a_removed_log_folder_is_made_again") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let d = daemon_with(
        dir.path(),
        &["--log-dir", log.to_str().unwrap(), "--metrics-listen", ""],
    );
    std::fs::remove_dir_all(&log).unwrap();
    // SAFETY: kill sends SIGHUP to our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    assert!(
        wait(Duration::from_secs(10), || !names_if(&log, "events-")
            .is_empty()),
        "{}",
        d.err()
    );
    let err = d.err();
    assert_eq!(d.stop(), Some(0), "{err}");
}

fn names_if(dir: &Path, prefix: &str) -> Vec<String> {
    if dir.is_dir() {
        names(dir, prefix)
    } else {
        Vec::new()
    }
}

#[test]
fn a_crashs_leftovers_are_compressed_or_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let left = dir.path().join("events-20260101T000000Z-000000.jsonl");
    std::fs::write(&left, "{\"record\":\"summary\"}\n").unwrap();
    let tmp = dir
        .path()
        .join("events-20260101T000000Z-000000.jsonl.zst.tmp");
    std::fs::write(&tmp, "half a compression").unwrap();
    let header = Header::for_this_host("test".into(), "test".into(), vec![]);
    let cfg = RecordConfig {
        min_free_bytes: 0,
        ..RecordConfig::default()
    };
    Recorder::open(dir.path(), cfg, header, true)
        .unwrap()
        .close()
        .unwrap();
    assert!(!tmp.exists() && !left.exists());
    assert!(
        dir.path()
            .join("events-20260101T000000Z-000000.jsonl.zst")
            .exists()
    );
}

/// An ext4 image on a loop device, mounted for one test; thawed and
/// unmounted when dropped (even when the test fails).
struct FrozenCapable(PathBuf);

impl FrozenCapable {
    fn mount(dir: &Path) -> Self {
        let img = dir.join("fs.img");
        let at = dir.join("mnt");
        std::fs::create_dir_all(&at).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let sh = |cmd: &str, args: &[&std::ffi::OsStr]| {
            let ok = std::process::Command::new(cmd)
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{cmd} {args:?}");
        };
        sh("mkfs.ext4", &["-q".as_ref(), img.as_os_str()]);
        sh(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                img.as_os_str(),
                at.as_os_str(),
            ],
        );
        Self(at)
    }

    fn freeze(&self, on: bool) {
        let ok = std::process::Command::new("fsfreeze")
            .arg(if on { "-f" } else { "-u" })
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok || !on, "fsfreeze");
    }
}

impl Drop for FrozenCapable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_frozen_log_filesystem_stalls_only_the_log() {
    if !live_or_skip("a_frozen_log_filesystem_stalls_only_the_log") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = FrozenCapable::mount(dir.path());
    let log = fs.0.join("log");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = daemon_with(
        dir.path(),
        &[
            "--log-dir",
            log.to_str().unwrap(),
            "--min-free",
            "1",
            "--metrics-listen",
            &metrics,
        ],
    );
    let before = wait(Duration::from_secs(10), || scrape(port).is_some());
    assert!(before, "no scrape before the freeze: {}", d.err());
    let events_before = metric(&scrape(port).unwrap(), "kvm_root_tracer_events_total");
    fs.freeze(true);
    // Real guests while the log can't be written: each memslot deletion is
    // a fast zap, each first run a root load.
    let mut guest = kvm::Guest::new(2).unwrap();
    guest.run_to_hlt().unwrap();
    let mut scrapes = 0;
    let mut failed = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        for _ in 0..20 {
            guest.churn_slot().unwrap();
            guest.run_to_hlt().unwrap();
        }
        scrapes += 1;
        if scrape(port).is_none() {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(guest);
    let m = scrape(port);
    // Any status: a host whose backend never fires kvm:kvm_entry (this CI
    // machine) is also blind (503); the log's state is a line of its own.
    let health = support::http(port, "/healthz").map(|(_, body)| body);
    fs.freeze(false);
    eprintln!("frozen 7 s: {failed} of {scrapes} scrapes failed; healthz {health:?}");
    assert_eq!(
        failed,
        0,
        "scrapes stalled behind the frozen log: {}",
        d.err()
    );
    let m = m.expect("metrics while frozen");
    let events = metric(&m, "kvm_root_tracer_events_total") - events_before;
    assert!(events > 100.0, "only {events} events seen while frozen");
    assert!(
        metric(&m, "kvm_root_tracer_ringbuf_drops_total") < 0.5,
        "ring-buffer drops"
    );
    assert!(metric(&m, "kvm_root_tracer_log_writable") < 0.5, "{m}");
    let health = health.expect("healthz while frozen");
    assert!(health.contains("degraded: event log"), "{health}");
    // Thawed: the log catches up and says it is writable again.
    assert!(
        wait(Duration::from_secs(10), || scrape(port).is_some_and(
            |m| metric(&m, "kvm_root_tracer_log_writable") > 0.5
        )),
        "the log never recovered: {}",
        d.err()
    );
    let err = d.err();
    assert_eq!(d.stop(), Some(0), "{err}");
    let written: usize = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events-"))
        .map(|e| {
            let text = std::fs::read(e.path()).unwrap();
            let text = if e.file_name().to_string_lossy().ends_with(".zst") {
                zstd::decode_all(&text[..]).unwrap()
            } else {
                text
            };
            String::from_utf8_lossy(&text)
                .lines()
                .filter(|l| l.contains("\"zap_all_fast\""))
                .count()
        })
        .sum();
    assert!(written > 0, "nothing of the frozen time reached the log");
}

/// A copy of this test binary that the unprivileged user can run (the
/// build folder may not be theirs to enter), in a folder it may read.
struct AttackerExe {
    _dir: tempfile::TempDir,
    exe: PathBuf,
}

impl AttackerExe {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = dir.path().join("attacker");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { _dir: dir, exe }
    }

    /// Runs `attack` with `arg` as the user nobody (`setpriv`, no groups,
    /// no capabilities): the `as_nobody` helper below in a child process.
    fn spawn(&self, attack: &str, arg: &str) -> std::process::Child {
        std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(&self.exe)
            .args([
                "--exact",
                "as_nobody",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ATTACK", attack)
            .env("ATTACK_ARG", arg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }
}

/// Reads the attacker's stdout up to its line starting with `READY` (or
/// its end): what it reported once in place.
fn attacker_ready(child: &mut std::process::Child) -> String {
    use std::io::BufRead as _;
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let mut said = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        said.push_str(&line);
        said.push('\n');
        // libtest prints "test as_nobody ... " before the helper's words.
        if line.contains("READY") || line.contains("DONE") {
            break;
        }
    }
    // Keep the pipe drained so the attacker never blocks on it.
    std::thread::spawn(move || lines.for_each(drop));
    said
}

/// Not a test: what the unprivileged attacker does, run by the tests
/// above as the user nobody through `setpriv`.
#[test]
#[ignore = "a helper: the tests run it as the user nobody"]
fn as_nobody() {
    use std::io::Write as _;
    let arg = std::env::var("ATTACK_ARG").unwrap_or_default();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_ne!(uid, 0, "the attacker must not be root");
    match std::env::var("ATTACK").unwrap_or_default().as_str() {
        "squat" => {
            let l = std::net::TcpListener::bind(arg.as_str()).unwrap();
            println!("READY uid {uid} holds {}", l.local_addr().unwrap());
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_mins(1));
        }
        "idle" => {
            let idle: Vec<std::net::TcpStream> = (0..1100)
                .filter_map(|_| std::net::TcpStream::connect(arg.as_str()).ok())
                .collect();
            println!("READY uid {uid} holds {} idle connections", idle.len());
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_mins(1));
        }
        "plant" => {
            // Everything a local user would try in the daemon's log folder.
            let dir = Path::new(&arg);
            let tries = [
                ("list", std::fs::read_dir(dir).map(drop)),
                (
                    "symlink",
                    std::os::unix::fs::symlink("/etc/shadow", dir.join("incident-x.jsonl")),
                ),
                (
                    "segment",
                    std::fs::write(dir.join("events-99991231T235959Z-999999.jsonl"), b"{}\n"),
                ),
            ];
            for (what, r) in tries {
                println!(
                    "{what}: {}",
                    r.map_or_else(|e| e.to_string(), |()| "ok".into())
                );
            }
            println!("DONE");
        }
        other => panic!("unknown attack {other:?}"),
    }
}

#[test]
fn an_unprivileged_user_cannot_plant_in_the_log_folder_or_starve_the_daemon() {
    if !live_or_skip("an_unprivileged_user_cannot_plant_in_the_log_folder_or_starve_the_daemon") {
        return;
    }
    let attacker = AttackerExe::new();
    // A folder every user can reach, as /var/lib is.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("log");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");

    // 1. nobody takes the metrics port first: a warning and a retry.
    let mut squatter = attacker.spawn("squat", &addr);
    let said = attacker_ready(&mut squatter);
    assert!(said.contains("READY uid 65534 holds"), "{said}");
    let d = Daemon::start(dir.path(), &addr);
    assert!(d.err().contains("can't serve metrics"), "{}", d.err());
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(
        wait(Duration::from_secs(25), || scrape(port).is_some()),
        "the daemon never took its port back from nobody: {}",
        d.err()
    );

    // 2. nobody can't list, link or write in the folder the daemon made.
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750, "{mode:o}");
    let mut planter = attacker.spawn("plant", log.to_str().unwrap());
    let said = attacker_ready(&mut planter);
    let _ = planter.wait();
    for what in ["list", "symlink", "segment"] {
        assert!(
            said.contains(&format!("{what}: Permission denied")),
            "{what}: {said}"
        );
    }

    // 3. nobody holds 1,100 idle connections: the daemon keeps its
    //    descriptors and answers scrapes again within the request timeout.
    // SAFETY: getrlimit/setrlimit read or fill the struct we pass; the
    // attacker inherits the raised limit.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut rl);
        rl.rlim_cur = rl.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rl);
    }
    let mut idler = attacker.spawn("idle", &addr);
    let said = attacker_ready(&mut idler);
    let held: usize = said
        .split("READY")
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(held > 1000, "{said}");
    std::thread::sleep(Duration::from_secs(2));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    eprintln!("nobody holds {held} idle connections: the daemon holds {fds} fds");
    assert!(fds < 400, "{fds} descriptors held");
    assert!(
        wait(Duration::from_secs(15), || scrape(port).is_some()),
        "no scrape answered while nobody held {held} connections"
    );
    let _ = idler.kill();
    let _ = idler.wait();
    let err = d.err();
    assert_eq!(d.stop(), Some(0), "{err}");
}
