//! The binary's contract: exit codes and error text for bad flags and
//! unsupported environments, and `doctor` on captured kernels.

use std::{path::PathBuf, process::Command};

fn tracer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tracer"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kernels")
        .join(name)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("run tracer");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
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
fn watch_as_non_root_exits_3() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: run directly.
        let r = run(tracer().args(["watch", "--duration", "1s"]));
        assert_eq!(r.code, Some(3), "{}", r.stderr);
        assert!(r.stderr.contains("must run as root"), "{}", r.stderr);
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
    assert!(r.stderr.contains("must run as root"), "{}", r.stderr);
}
