//! Running the real `tracer` binary from integration tests.

#![allow(
    dead_code,
    reason = "each test binary includes this module and uses a part of it"
)]

use std::process::Command;

pub fn tracer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tracer"))
}

/// What a run printed, and how it ended.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("run tracer");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A model log (`tracer simulate`) of `kernel` running `scenario` with
/// `vcpus` vCPUs for `rounds` rounds, written to `dir/<name>`: input for
/// `tracer run --inject` or `tracer replay`.
pub fn model_log(
    dir: &std::path::Path,
    name: &str,
    (kernel, scenario): (&str, &str),
    (vcpus, rounds): (u32, u32),
) -> std::path::PathBuf {
    let out = tracer()
        .args(["simulate", "--kernel", kernel, "--scenario", scenario])
        .args([
            "--vcpus",
            &vcpus.to_string(),
            "--rounds",
            &rounds.to_string(),
        ])
        .output()
        .expect("run tracer simulate");
    assert!(out.status.success(), "{out:?}");
    let path = dir.join(name);
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// A loopback port nothing listens on (now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A GET on loopback: (status, body), or None without an answer.
pub fn http(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Polls `f` every 100 ms until it returns Some, for at most `limit`.
pub fn poll<T>(limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// True when the live tests can run (root and /dev/kvm); else false after
/// printing SKIPPED when TRACER_SKIP_LIVE=1 asks for that, and a panic
/// naming what is missing otherwise: a live test never skips silently.
pub fn live_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("TRACER_SKIP_LIVE").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: needs root and /dev/kvm (TRACER_SKIP_LIVE=1)");
        return false;
    }
    panic!("{test} needs root and /dev/kvm, or TRACER_SKIP_LIVE=1 to skip explicitly");
}
