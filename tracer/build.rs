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
