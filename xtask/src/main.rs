//! Project tasks that cargo alone can't do. Every task provisions the eBPF
//! toolchain into `.tools/` first (once; later runs reuse it), so each one
//! works on a fresh machine:
//! - `cargo xtask setup`: provision only;
//! - `cargo xtask run -- <tracer args>`: build the tracer and run it;
//! - `cargo xtask test`: fmt, clippy, and every test.

#![warn(unused_crate_dependencies)]

mod bench;
mod dist;
mod inject;
mod vmtest;

use std::{
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
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
    /// Provision, build the tracer (release), and run it with these
    /// arguments, e.g. `cargo xtask run -- watch`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Provision, then check formatting, run clippy with warnings denied,
    /// and run every test (the real-kernel ones need root and /dev/kvm).
    Test,
    /// Boot stock Debian kernels in QEMU with real KVM inside, and check
    /// the kprobe path on each (kernels are cached in target/vm-test/).
    VmTest {
        /// Kernel series to test (e.g. 6.18); default: the whole matrix.
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
        /// Hard timeout per boot, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Measure what the tracer costs on this machine: in-kernel cost per hit
    /// against empty programs (this host, and a Debian kernel in QEMU for
    /// the kprobes and kvm_entry), userspace and replay throughput, memory,
    /// start-up, and a side-by-side run with bpftrace. Prints a table and
    /// writes target/bench/results.json (needs root and /dev/kvm).
    Bench {
        /// Memslot deletions per churn process (two run at once) in the
        /// bpftrace comparison.
        #[arg(long, default_value_t = 50_000)]
        churns: u64,
        /// Skip the QEMU guest (kprobe and kvm_entry costs).
        #[arg(long)]
        no_vm: bool,
    },
    /// Build the release artifacts into target/dist/: the static (musl)
    /// binary, the Debian package, the OCI image (root only: buildah) and
    /// SHA256SUMS. Adds the musl target with rustup and Debian's
    /// musl-tools (as root) when missing.
    Dist {
        /// Then use each artifact on clean Debian roots made with
        /// mmdebstrap (root only): the static binary in bullseye (glibc
        /// 2.31); lintian, then install, upgrade, remove and purge of the
        /// .deb in bookworm and trixie; the image's layers as a root.
        #[arg(long)]
        check: bool,
        /// Only make (or keep) the clean roots --check uses, in
        /// target/dist-check/, and stop: `.ci/run` makes them in the
        /// background while the tests run.
        #[arg(long, conflicts_with = "check")]
        prepare_roots: bool,
    },
    /// Regenerate the README's captures (the `top` screen, the `watch`
    /// sample) from their commands; the tests then check them (the `watch`
    /// sample needs root and /dev/kvm).
    Readme,
    /// Fuzz the event-log reader with cargo-fuzz (installed into .tools/
    /// on first use) for a while.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let root = repo_root()?;
    match Cli::parse().task {
        Task::Setup => setup(&root),
        Task::Run { args } => {
            setup(&root)?;
            cargo(&root, &["build", "--release", "--package", "tracer"])?;
            let status = Command::new(root.join("target/release/tracer"))
                .args(&args)
                .status()
                .context("failed to start target/release/tracer")?;
            std::process::exit(status.code().unwrap_or(2));
        }
        Task::VmTest { kernels, timeout } => {
            setup(&root)?;
            build_release(&root)?;
            vmtest::vm_test(&root, &kernels, std::time::Duration::from_secs(timeout))
        }
        Task::Bench { churns, no_vm } => {
            setup(&root)?;
            build_release(&root)?;
            bench::bench(&root, &bench::Options { churns, no_vm })
        }
        Task::Dist {
            prepare_roots: true,
            ..
        } => dist::prepare_roots(&root),
        Task::Dist { check, .. } => {
            setup(&root)?;
            let artifacts = dist::dist(&root)?;
            if check {
                dist::check(&root, &artifacts)?;
            }
            Ok(())
        }
        Task::Readme => {
            setup(&root)?;
            let status = Command::new(env!("CARGO"))
                .current_dir(&root)
                .args(["test", "--package", "tracer", "--test", "readme"])
                .env("TRACER_UPDATE_README", "1")
                .status()
                .context("failed to run cargo test")?;
            anyhow::ensure!(status.success(), "regenerating the README failed");
            println!("README.md regenerated; review it with `git diff README.md`");
            Ok(())
        }
        Task::Fuzz { seconds } => {
            setup(&root)?;
            fuzz(&root, seconds)
        }
        Task::Test => {
            setup(&root)?;
            // The fleet tests run the real Prometheus and Alertmanager; the
            // `tracer top` end-to-end test drives it in tmux; the unit's
            // system call filter is checked against an strace of the daemon.
            apt_install(&[
                ("/usr/bin/tmux", "tmux"),
                ("/usr/bin/strace", "strace"),
                ("/usr/bin/curl", "curl"),
                ("/usr/bin/prometheus", "prometheus"),
                ("/usr/bin/promtool", "prometheus"),
                (
                    "/usr/bin/prometheus-alertmanager",
                    "prometheus-alertmanager",
                ),
            ])?;
            cargo(&root, &["fmt", "--all", "--", "--check"])?;
            cargo(&root, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
            clippy_ebpf(&root)?;
            core_stands_alone(&root)?;
            cargo(
                &root,
                &[
                    "test",
                    "-p",
                    "kvm-root-common",
                    "-p",
                    "tracer",
                    "-p",
                    "xtask",
                ],
            )
        }
    }
}

/// The pure core builds and passes its tests with stable Rust alone: in a
/// copy of the sources without `.tools/` (no bpf-linker, no nightly on
/// PATH), with its own target folder. Its dependency tree has no aya,
/// tokio or ratatui. (Its tests run here only, not again in the workspace
/// run.)
fn core_stands_alone(root: &Path) -> Result<()> {
    let work = root.join("target/core-alone");
    let src = work.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    std::fs::create_dir_all(&src)?;
    let files = run(Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "-z",
        ])
        .current_dir(root))?;
    for rel in files.split('\0').filter(|f| !f.is_empty()) {
        let from = root.join(rel);
        if rel.starts_with(".tools/") || !from.is_file() {
            continue;
        }
        let to = src.join(rel);
        std::fs::create_dir_all(to.parent().context("no parent")?)?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {rel}"))?;
    }
    ensure!(
        !src.join(".tools").exists(),
        "the copy must have no .tools/"
    );
    let path: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|p| !p.starts_with(root.join(".tools")) && !p.to_string_lossy().contains("nightly"))
        .collect();
    let stable = |args: &[&str]| -> Result<String> {
        eprintln!("xtask: (stable, no .tools) cargo {}", args.join(" "));
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "stable", "cargo"])
            .args(args)
            .current_dir(&src)
            .env("PATH", std::env::join_paths(&path)?)
            .env("CARGO_TARGET_DIR", work.join("target"))
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC_WRAPPER");
        let out = cmd.output().context("running cargo")?;
        ensure!(
            out.status.success(),
            "the core without the eBPF toolchain: cargo {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let tree = stable(&[
        "tree",
        "--locked",
        "-p",
        "tracer-core",
        "-e",
        "normal,build",
        "--prefix",
        "none",
    ])?;
    let heavy: Vec<&str> = tree
        .lines()
        .filter(|l| {
            ["aya", "tokio", "ratatui", "tracer "]
                .iter()
                .any(|c| l.starts_with(c))
        })
        .collect();
    ensure!(heavy.is_empty(), "tracer-core depends on {heavy:?}");
    let tests = stable(&["test", "--locked", "-p", "tracer-core"])?;
    eprintln!(
        "xtask: tracer-core: no aya, tokio or ratatui in its tree; its tests pass with stable \
         Rust and no .tools/ ({} test binaries)",
        tests.matches("test result: ok").count()
    );
    Ok(())
}

/// Runs the nightly toolchain's `cargo` in `dir`, with the project's tools
/// first on PATH and none of the outer cargo's overrides; `what` names the
/// job in the error.
fn nightly_cargo(
    root: &Path,
    dir: &Path,
    args: &[String],
    env: &[(&str, &Path)],
    what: &str,
) -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .args(args)
        .current_dir(dir)
        .env("PATH", tools_path(root)?)
        .env_remove("RUSTC")
        .env_remove("CARGO");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().context("failed to start rustup")?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// Clippy on the eBPF crate, which only builds for the bpfel target with
/// nightly and `-Z build-std=core`.
fn clippy_ebpf(root: &Path) -> Result<()> {
    eprintln!("xtask: cargo +nightly clippy (probe-ebpf, bpfel-unknown-none)");
    nightly_cargo(
        root,
        &root.join("probe-ebpf"),
        &strings(&[
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]),
        &[],
        "clippy on probe-ebpf",
    )
}

/// This process runs as root (apt, mmdebstrap and buildah need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and can't fail.
    unsafe { libc::geteuid() == 0 }
}

/// Opens (or creates, 0600) a lock file in a world-writable folder as root:
/// never through a link planted at its name, never truncating what is there.
fn open_lock(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))
}

/// Installs the Debian packages whose files are missing (as root; other
/// users get a note, and the tests that need them say so). Services the
/// packages ship are not started.
pub fn apt_install(wanted: &[(&str, &str)]) -> Result<()> {
    let mut pkgs: Vec<&str> = wanted
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    pkgs.dedup();
    if pkgs.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask: not root, so not installing {}; tests that need them will say so",
            pkgs.join(" ")
        );
        return Ok(());
    }
    // One xtask at a time installs (`.ci/run` makes the Debian roots in the
    // background while the tests run): the policy-rc.d below is shared.
    let lock = open_lock(Path::new("/run/lock/kvm-root-tracer-xtask-apt.lock"))?;
    // SAFETY: flock on a file this function owns; it is released when the
    // file is closed, at the end of this function.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "locking the xtask apt lock: {}",
            std::io::Error::last_os_error()
        );
    }
    // Another xtask may have installed them meanwhile.
    pkgs.retain(|pkg| {
        wanted
            .iter()
            .any(|(file, p)| p == pkg && !Path::new(file).exists())
    });
    if pkgs.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} from Debian", pkgs.join(" "));
    // Keep package scripts from starting services (they would listen
    // beyond loopback).
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists();
    if made_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if made_policy {
        let _ = std::fs::remove_file(policy);
    }
    if let Err(e) = &result {
        eprintln!("xtask: apt-get install failed; trying once more after apt-get update: {e:#}");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// PATH with the project's tools first.
fn tools_path(root: &Path) -> Result<std::ffi::OsString> {
    Ok(std::env::join_paths(
        std::iter::once(root.join(".tools/bin")).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )?)
}

/// `cargo fuzz run log_reader` for `seconds`: new inputs go to the
/// (ignored) corpus folder, the committed seeds are read too.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    let tools = root.join(".tools");
    if !tools.join("bin/cargo-fuzz").is_file() {
        eprintln!("xtask: installing cargo-fuzz into .tools/ (about a minute)");
        let mut args = strings(&["install", "cargo-fuzz", "--locked", "--version", "0.13.2"]);
        args.extend(["--root".to_owned(), tools.display().to_string()]);
        nightly_cargo(root, root, &args, &[], "installing cargo-fuzz")?;
    }
    // The event-log reader, then the config parser, half the time each.
    // The working corpora are not committed (only the reader's seeds are).
    for (target, seeds) in [("log_reader", Some("fuzz/seeds")), ("config", None)] {
        std::fs::create_dir_all(root.join("tracer/fuzz/corpus").join(target))?;
        eprintln!("xtask: fuzzing {target} for {} s", seconds.div_ceil(2));
        let corpus = format!("fuzz/corpus/{target}");
        let mut args = strings(&["fuzz", "run", target, &corpus]);
        args.extend(seeds.map(str::to_owned));
        args.push("--".into());
        args.push(format!("-max_total_time={}", seconds.div_ceil(2)));
        nightly_cargo(
            root,
            &root.join("tracer"),
            &args,
            &[],
            "the fuzzer found a failure (see tracer/fuzz/artifacts/), or fuzzing",
        )?;
    }
    Ok(())
}

/// The tracer and its example workloads, release build: what the QEMU
/// matrix ships into its guests and the benchmarks run.
fn build_release(root: &Path) -> Result<()> {
    cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "tracer",
            "--examples",
            "--bins",
        ],
    )
}

/// Runs cargo (the toolchain that runs xtask) in the repository.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    cargo_with_env(root, args, &[])
}

/// [`cargo`] with these environment variables set.
fn cargo_with_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .context("failed to start cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// A TCP port free on loopback now (for a server the task starts).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn repo_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

/// Runs a command; its stdout, trimmed, or an error with both outputs.
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
    let mut args = strings(&[
        "install",
        "bpf-linker",
        "--force",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
    ]);
    args.extend([
        format!("llvm-{major}"),
        "--root".to_owned(),
        tools.display().to_string(),
    ]);
    nightly_cargo(
        root,
        root,
        &args,
        &[("LLVM_PREFIX", &prefix)],
        "building bpf-linker",
    )?;
    eprintln!("setup: done; tools are in {}", tools.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_never_follows_a_planted_link_nor_truncates() {
        let dir = std::env::temp_dir().join(format!("xtask-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let lock = dir.join("lock");
        std::os::unix::fs::symlink(&victim, &lock).unwrap();
        assert!(open_lock(&lock).is_err(), "a planted link must be refused");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(&lock).unwrap();
        std::fs::write(&lock, "held").unwrap();
        drop(open_lock(&lock).unwrap());
        assert_eq!(std::fs::read_to_string(&lock).unwrap(), "held");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
