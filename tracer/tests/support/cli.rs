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
