//! `cargo xtask dist`: the release artifacts, in `target/dist/`.
//!
//! - `kvm-root-tracer-<version>-x86_64-linux-musl`: the tracer as one static
//!   binary (musl, the eBPF object embedded), for any x86-64 Linux with BTF
//!   whatever its libc;
//! - `kvm-root-tracer_<version>-1_amd64.deb`: the Debian package (`deb`);
//! - `kvm-root-tracer-<version>.oci.tar`: the container image (`image`;
//!   needs root, for buildah);
//! - `SHA256SUMS` over them.
//!
//! `--check` then uses each on clean Debian systems (`check`).

mod check;
mod deb;
mod image;

pub use check::{check, prepare_roots};

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
    pub deb: PathBuf,
    /// None when not root (buildah needs root).
    pub image: Option<PathBuf>,
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
        // Stripped: the symbols double the size and nothing reads them
        // (lintian: unstripped-binary-or-object).
        &[
            ("CC_x86_64_unknown_linux_musl", "musl-gcc"),
            ("CARGO_PROFILE_RELEASE_STRIP", "symbols"),
        ],
    )?;
    let built = root.join("target").join(MUSL).join("release/tracer");
    ensure_static(&built)?;
    Ok(built)
}

pub fn dist(root: &Path) -> Result<Artifacts> {
    let started = Instant::now();
    let built = build_static(root)?;
    let dist = root.join("target/dist");
    if dist.exists() {
        std::fs::remove_dir_all(&dist)?;
    }
    std::fs::create_dir_all(&dist)?;
    let version = env!("CARGO_PKG_VERSION");
    let out = dist.join(format!("kvm-root-tracer-{version}-x86_64-linux-musl"));
    std::fs::copy(&built, &out).with_context(|| format!("copying to {}", out.display()))?;
    // The compilers' version strings: nothing reads them (lintian:
    // binary-has-unneeded-section, as dh_strip removes them).
    run(Command::new("strip")
        .args(["--remove-section=.comment"])
        .arg(&out))
    .context("strip --remove-section=.comment (binutils)")?;
    let deb = deb::build(root, &out, deb::REVISION, &dist)?;
    let image = if crate::is_root() {
        Some(image::build(
            root,
            &out,
            &deb::source_date_epoch(root),
            &dist,
        )?)
    } else {
        println!("dist: not root, so no container image (buildah needs root)");
        None
    };
    let mut names = Vec::new();
    for path in [Some(&out), Some(&deb), image.as_ref()]
        .into_iter()
        .flatten()
    {
        let name = path.file_name().context("no file name")?.to_string_lossy();
        let size = std::fs::metadata(path)?.len();
        println!("dist: {name}: {} KiB", size / 1024);
        names.push(name.into_owned());
    }
    let sums = run(Command::new("sha256sum").args(&names).current_dir(&dist))?;
    std::fs::write(dist.join("SHA256SUMS"), format!("{sums}\n"))?;
    println!(
        "dist: {} artifacts and SHA256SUMS in {} in {} s",
        names.len(),
        dist.display(),
        started.elapsed().as_secs()
    );
    Ok(Artifacts {
        static_binary: out,
        deb,
        image,
    })
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
