//! Builds the eBPF object (`probe-ebpf`) with aya-build and the project's own
//! bpf-linker, and refuses, with the command that fixes it, when the machine
//! is not provisioned yet.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const FIX: &str = "run `cargo xtask setup` from the repository root (it installs the nightly \
                   rust-src component and bpf-linker 0.13.0 into .tools/, once)";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("tracer has no parent directory")?;
    stamp_build(root);
    let tools_bin = root.join(".tools").join("bin");
    let linker = tools_bin.join("bpf-linker");
    println!("cargo:rerun-if-changed={}", linker.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("common").join("src").display()
    );

    if !linker.is_file() {
        bail!(
            "the eBPF probes can't be built: bpf-linker is missing from {}.\n  To fix it, {FIX}.",
            tools_bin.display()
        );
    }
    check_rust_src()?;

    // aya-build runs `rustup run nightly cargo build` for the bpfel target,
    // which finds bpf-linker on PATH.
    let mut path = OsString::from(tools_bin.as_os_str());
    if let Some(old) = env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    // SAFETY: build scripts are single-threaded until aya-build spawns cargo,
    // so nothing reads the environment concurrently.
    unsafe {
        env::set_var("PATH", path);
        // aya-build turns every line the nested cargo prints into a
        // `cargo:warning`; keep only real warnings and errors.
        env::set_var("CARGO_TERM_QUIET", "true");
    }

    let probe_dir = root.join("probe-ebpf");
    let probe_dir = probe_dir.to_str().context("non UTF-8 path to probe-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "probe-ebpf",
            root_dir: probe_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .with_context(|| {
        format!("building the eBPF probes failed; if the toolchain is the cause, {FIX}")
    })
}

/// The git revision and the build date, for `--version` and the
/// `build_info` metric: `TRACER_GIT_REV` / `SOURCE_DATE_EPOCH` when set (a
/// build from a tarball, a reproducible build), else git and the clock.
fn stamp_build(root: &Path) {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = env::var("TRACER_GIT_REV")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date_args = match env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => vec![
            "-u".to_owned(),
            "-d".to_owned(),
            format!("@{epoch}"),
            "+%F".to_owned(),
        ],
        Err(_) => vec!["-u".to_owned(), "+%F".to_owned()],
    };
    let date = Command::new("date")
        .args(&date_args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    println!("cargo:rustc-env=TRACER_GIT_REV={rev}");
    println!("cargo:rustc-env=TRACER_BUILD_DATE={date}");
    println!("cargo:rerun-if-env-changed=TRACER_GIT_REV");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit (HEAD moves, or the branch it names does). Only files
    // that exist: cargo counts a missing one as changed, every build.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        let head = git(&["symbolic-ref", "-q", "HEAD"]);
        for file in [
            Some("HEAD"),
            head.as_deref(),
            Some("refs/heads"),
            Some("packed-refs"),
        ]
        .into_iter()
        .flatten()
        {
            let path = dir.join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

fn check_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    let sysroot = match out {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
        Ok(out) => bail!(
            "the eBPF probes need the nightly toolchain, and `rustup run nightly rustc` failed: {}\n  To fix it, {FIX}.",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => {
            bail!("the eBPF probes need rustup and a nightly toolchain ({e}).\n  To fix it, {FIX}.")
        }
    };
    let src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !Path::new(&src).is_dir() {
        bail!(
            "the eBPF probes need the nightly rust-src component, and {} is missing.\n  To fix it, {FIX}.",
            src.display()
        );
    }
    Ok(())
}
