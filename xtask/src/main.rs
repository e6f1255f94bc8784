//! Project tasks that cargo alone can't do: `cargo xtask setup` provisions
//! the eBPF toolchain into `.tools/` (once; later runs reuse it).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// The bpf-linker release the probes are built with.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(about = "Project tasks for kvm-root-tracer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs: the nightly rust-src component and
    /// bpf-linker, built against the nightly toolchain's own libLLVM, into
    /// .tools/. Does nothing that is already done.
    Setup,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(&repo_root()?),
    }
}

fn repo_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn setup(root: &Path) -> Result<()> {
    let tools = root.join(".tools");
    let sysroot = PathBuf::from(
        run(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("the nightly toolchain is needed; install it with `rustup toolchain install nightly`")?,
    );

    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("setup: nightly rust-src: present");
    } else {
        eprintln!("setup: nightly rust-src: installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker = tools.join("bin").join("bpf-linker");
    let have = if linker.is_file() {
        run(Command::new(&linker).arg("--version")).unwrap_or_default()
    } else {
        String::new()
    };
    if have.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "setup: bpf-linker {BPF_LINKER_VERSION}: present in {}",
            linker.display()
        );
        return Ok(());
    }

    // bpf-linker must use the same LLVM as the rustc that emits the bitcode:
    // link it against the nightly toolchain's own libLLVM.
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    let major = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split(['.', '-']).next())
        .context("can't read the LLVM major version")?
        .to_owned();
    let prefix = tools.join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    // Both names: `libLLVM.so` for the build, and the soname that the
    // linker's RUNPATH (this folder) must resolve at run time.
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }

    eprintln!(
        "setup: bpf-linker {BPF_LINKER_VERSION}: building against LLVM {major} (about a minute)"
    );
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "install",
            "bpf-linker",
            "--force",
            "--locked",
        ])
        .arg("--version")
        .arg(BPF_LINKER_VERSION)
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("failed to start cargo install")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status})");
    }
    eprintln!("setup: done; tools are in {}", tools.display());
    Ok(())
}
