//! `cargo xtask dist`: the release artifacts, in `target/dist/`.
//!
//! - `kvm-root-tracer-<version>-x86_64-linux-musl`: the tracer as one static
//!   binary (musl, the eBPF object embedded), for any x86-64 Linux with BTF
//!   whatever its libc;
//! - `SHA256SUMS` over them.
//!
//! `--check` then runs the static binary inside a minimal Debian bullseye
//! root (glibc 2.31, older than the 2.34 the glibc build needs), made with
//! mmdebstrap: `--version`, and a `simulate | replay` round trip with the
//! findings the model promises.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{apt_install, cargo_with_env, run};

const MUSL: &str = "x86_64-unknown-linux-musl";

/// What `dist` built, for `--check`.
pub struct Artifacts {
    pub static_binary: PathBuf,
}

/// Builds the static tracer (adding the musl target and musl-gcc when
/// missing) and checks it needs no dynamic loader; returns its path.
pub fn build_static(root: &Path) -> Result<PathBuf> {
    let installed = run(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == MUSL) {
        run(Command::new("rustup").args(["target", "add", MUSL]))
            .context("adding the musl target (rustup target add x86_64-unknown-linux-musl)")?;
    }
    apt_install(&[("/usr/bin/musl-gcc", "musl-tools")])?;
    ensure!(
        Path::new("/usr/bin/musl-gcc").exists(),
        "musl-gcc is missing: install Debian's musl-tools (as root: apt-get install musl-tools); \
         ring and zstd compile C for the static binary"
    );
    cargo_with_env(
        root,
        &[
            "build",
            "--release",
            "--package",
            "tracer",
            "--target",
            MUSL,
        ],
        &[("CC_x86_64_unknown_linux_musl", "musl-gcc")],
    )?;
    let built = root.join("target").join(MUSL).join("release/tracer");
    ensure_static(&built)?;
    Ok(built)
}

pub fn dist(root: &Path) -> Result<Artifacts> {
    let started = Instant::now();
    let built = build_static(root)?;
    let dist = root.join("target/dist");
    std::fs::create_dir_all(&dist)?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("kvm-root-tracer-{version}-x86_64-linux-musl");
    let out = dist.join(&name);
    std::fs::copy(&built, &out).with_context(|| format!("copying to {}", out.display()))?;
    let sums = run(Command::new("sha256sum").arg(&name).current_dir(&dist))?;
    std::fs::write(dist.join("SHA256SUMS"), format!("{sums}\n"))?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "dist: {} ({} KiB, static) and SHA256SUMS in {} s",
        out.display(),
        size / 1024,
        started.elapsed().as_secs()
    );
    Ok(Artifacts { static_binary: out })
}

/// Refuses a binary with a program interpreter (a dynamic loader): the
/// static build must need no library from the host.
fn ensure_static(path: &Path) -> Result<()> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF",
        path.display()
    );
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(elf[at..at + 4].try_into()?);
        // PT_INTERP
        if p_type == 3 {
            bail!("{} asks for a dynamic loader: not static", path.display());
        }
    }
    Ok(())
}

/// Runs the static binary in a bullseye root: it must work with glibc 2.31
/// around it, and with no library of its own.
pub fn check(root: &Path, a: &Artifacts) -> Result<()> {
    apt_install(&[("/usr/bin/mmdebstrap", "mmdebstrap")])?;
    let chroot = root.join("target/dist-check/bullseye");
    if !chroot.join("usr/bin/ldd").exists() {
        let _ = std::fs::remove_dir_all(&chroot);
        std::fs::create_dir_all(chroot.parent().context("no parent")?)?;
        run(Command::new("mmdebstrap")
            .args(["--variant=minbase", "--include=libc-bin", "bullseye"])
            .arg(&chroot)
            .arg("http://deb.debian.org/debian"))
        .context("mmdebstrap bullseye (a minimal Debian 11 root)")?;
    }
    let glibc = run(Command::new("chroot")
        .arg(&chroot)
        .args(["ldd", "--version"]))?;
    let glibc = glibc.lines().next().unwrap_or_default().to_owned();
    ensure!(
        glibc.contains("2.31"),
        "bullseye's glibc is 2.31, this root says {glibc}"
    );
    std::fs::copy(&a.static_binary, chroot.join("usr/local/bin/tracer"))?;
    let ldd = Command::new("chroot")
        .arg(&chroot)
        .args(["ldd", "/usr/local/bin/tracer"])
        .output()?;
    let ldd_says = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    ensure!(
        ldd_says.contains("not a dynamic executable") || ldd_says.contains("statically linked"),
        "ldd in bullseye: {ldd_says}"
    );
    let version = run(Command::new("chroot")
        .arg(&chroot)
        .args(["/usr/local/bin/tracer", "--version"]))?;
    let round_trip = Command::new("chroot")
        .arg(&chroot)
        .args([
            "sh",
            "-c",
            "tracer simulate --kernel mirror-freed-by-zap | tracer replay --json - | \
             grep -c '\"kind\":\"mirror_root_invalid_at_entry\"'",
        ])
        .output()?;
    let found = String::from_utf8_lossy(&round_trip.stdout)
        .trim()
        .to_owned();
    ensure!(
        found.parse::<u32>().is_ok_and(|n| n > 0),
        "simulate | replay in bullseye found no mirror_root_invalid_at_entry: {found} {}",
        String::from_utf8_lossy(&round_trip.stderr)
    );
    println!(
        "dist: in a bullseye root ({glibc}): ldd says static, `{version}`, simulate | replay \
         found {found} mirror_root_invalid_at_entry"
    );
    Ok(())
}
