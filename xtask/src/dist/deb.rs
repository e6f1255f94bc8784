//! The Debian package, built with `dpkg-deb` from a tree staged here.
//!
//! Why not cargo-deb: it wants to run the cargo build itself (ours is the
//! musl build `dist` already made, with musl-gcc as its C compiler), and
//! building cargo-deb would add a tool to every CI run, while `dpkg-deb` is
//! part of every Debian system. Staging the tree by hand keeps each file's
//! path and mode visible in one place; the maintainer scripts are plain
//! shell in `dist/debian/`, reviewable as they are installed.

use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::run;

pub const PACKAGE: &str = "kvm-root-tracer";
/// The Debian revision of the package `dist` ships.
pub const REVISION: &str = "1";
const UNIT: &str = "kvm-root-tracer.service";
const CONFFILE: &str = "etc/kvm-root-tracer/config.toml";

/// The package's version: the crate's version and a Debian revision.
pub fn version(revision: &str) -> String {
    format!("{}-{revision}", env!("CARGO_PKG_VERSION"))
}

/// Builds `kvm-root-tracer_<version>_amd64.deb` in `out` from the static
/// `binary`; `revision` is the Debian revision (`dist` ships "1"; the
/// upgrade test builds a lower one to upgrade from).
pub fn build(root: &Path, binary: &Path, revision: &str, out: &Path) -> Result<PathBuf> {
    let version = version(revision);
    let stage = root.join("target/dist-work").join(format!("deb-{version}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let dist = root.join("dist");
    let put = |rel: &str, bytes: &[u8], mode: u32| write_file(&stage, rel, bytes, mode);

    put("usr/bin/tracer", &std::fs::read(binary)?, 0o755)?;
    // The unit in dist/ is written for a copied binary in /usr/local/bin;
    // the package's binary is in /usr/bin.
    let unit = std::fs::read_to_string(dist.join("systemd").join(UNIT))?;
    ensure!(
        unit.contains("ExecStart=/usr/local/bin/tracer "),
        "dist/systemd/{UNIT}: ExecStart no longer starts /usr/local/bin/tracer; update deb.rs"
    );
    let unit = unit.replace("/usr/local/bin/tracer", "/usr/bin/tracer");
    put(
        &format!("usr/lib/systemd/system/{UNIT}"),
        unit.as_bytes(),
        0o644,
    )?;
    put(CONFFILE, &std::fs::read(dist.join("config.toml"))?, 0o644)?;
    for folder in ["prometheus", "alertmanager", "grafana"] {
        for entry in std::fs::read_dir(dist.join(folder))? {
            let path = entry?.path();
            let name = path.file_name().context("no file name")?.to_string_lossy();
            put(
                &format!("usr/share/{PACKAGE}/{folder}/{name}"),
                &std::fs::read(&path)?,
                0o644,
            )?;
        }
    }

    man_and_completions(binary, &stage)?;

    let doc = format!("usr/share/doc/{PACKAGE}");
    put(
        &format!("{doc}/README.md.gz"),
        &gzip(&root.join("README.md"))?,
        0o644,
    )?;
    put(
        &format!("{doc}/copyright"),
        &std::fs::read(dist.join("debian/copyright"))?,
        0o644,
    )?;
    let changelog = stage.join("../changelog.Debian");
    std::fs::write(&changelog, changelog_entry(root, &version)?)?;
    put(
        &format!("{doc}/changelog.Debian.gz"),
        &gzip(&changelog)?,
        0o644,
    )?;
    put(
        &format!("usr/share/lintian/overrides/{PACKAGE}"),
        &std::fs::read(dist.join("debian/lintian-overrides"))?,
        0o644,
    )?;

    // Control area.
    put(
        "DEBIAN/conffiles",
        format!("/{CONFFILE}\n").as_bytes(),
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        put(
            &format!("DEBIAN/{script}"),
            &std::fs::read(dist.join("debian").join(script))?,
            0o755,
        )?;
    }
    let (md5sums, installed_kib) = md5sums(&stage)?;
    put("DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    put(
        "DEBIAN/control",
        control(&version, installed_kib).as_bytes(),
        0o644,
    )?;

    std::fs::create_dir_all(out)?;
    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", source_date_epoch(root)))
    .context("dpkg-deb --build")?;
    Ok(deb)
}

/// The man pages (gzipped) and the bash, zsh and fish completions, from
/// the binary's own CLI definition.
fn man_and_completions(binary: &Path, stage: &Path) -> Result<()> {
    let pages = stage.join("../man-pages");
    if pages.exists() {
        std::fs::remove_dir_all(&pages)?;
    }
    let listed = run(Command::new(binary).args(["generate", "man"]).arg(&pages))?;
    ensure!(
        listed.lines().count() >= 2,
        "tracer generate man wrote {listed:?}"
    );
    for page in listed.lines() {
        let name = Path::new(page).file_name().context("no page name")?;
        let gz = gzip(Path::new(page))?;
        write_file(
            stage,
            &format!("usr/share/man/man1/{}.gz", name.to_string_lossy()),
            &gz,
            0o644,
        )?;
    }
    std::fs::remove_dir_all(&pages)?;
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/tracer"),
        ("zsh", "usr/share/zsh/vendor-completions/_tracer"),
        ("fish", "usr/share/fish/vendor_completions.d/tracer.fish"),
    ] {
        let script = run(Command::new(binary).args(["generate", "completion", shell]))?;
        write_file(stage, rel, format!("{script}\n").as_bytes(), 0o644)?;
    }
    Ok(())
}

fn control(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: kvm-root-tracer developers <maintainers@users.noreply.r-seed-4c2f7459.example>\n\
         Installed-Size: {installed_kib}\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: https://example.invalid/kvm-root-tracer\n\
         Suggests: prometheus, prometheus-alertmanager\n\
         Description: KVM MMU root-lifecycle tracer (eBPF) for TDX hosts\n \
         Traces the MMU roots of KVM's vCPUs with eBPF (kprobes where the kernel\n \
         has them, tracepoints otherwise) and catches vCPUs that enter a TDX\n \
         guest with an invalid mirror root, and the related root-lifecycle\n \
         faults. The daemon writes an event log that `tracer replay` reads,\n \
         serves Prometheus metrics and sends alerts to Alertmanager.\n \
         .\n \
         The service is installed, not enabled: check the host with\n \
         `tracer doctor`, then `systemctl enable --now kvm-root-tracer`.\n"
    )
}

/// One changelog entry for this build, dated by the commit.
fn changelog_entry(root: &Path, version: &str) -> Result<String> {
    let epoch = source_date_epoch(root);
    let date = run(Command::new("date")
        .args(["-u", "-R", "-d"])
        .arg(format!("@{epoch}")))?;
    let revision = run(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root))
    .unwrap_or_else(|_| "unknown".into());
    Ok(format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
         * Built from git {revision}.\n\n \
         -- kvm-root-tracer developers <maintainers@users.noreply.r-seed-4c2f7459.example>  \
         {date}\n"
    ))
}

/// `SOURCE_DATE_EPOCH`, else the commit's time, else now: the package's
/// file times and changelog date.
pub fn source_date_epoch(root: &Path) -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| {
            run(Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .current_dir(root))
            .ok()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| run(Command::new("date").arg("+%s")).unwrap_or_default())
}

/// Writes `bytes` at `stage/rel` with `mode`, making folders 0755.
fn write_file(stage: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let path = stage.join(rel);
    let mut dir = path.parent().context("no parent")?.to_path_buf();
    std::fs::create_dir_all(&dir)?;
    while dir.starts_with(stage) {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        if !dir.pop() {
            break;
        }
    }
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n` of a file (no name or time inside: reproducible).
fn gzip(path: &Path) -> Result<Vec<u8>> {
    let out = Command::new("gzip")
        .args(["-9n", "-c"])
        .arg(path)
        .output()
        .context("running gzip")?;
    ensure!(out.status.success(), "gzip {} failed", path.display());
    Ok(out.stdout)
}

/// `DEBIAN/md5sums` for the files outside `DEBIAN/` and `etc/` (dpkg keeps
/// conffiles' sums itself), and the installed size in KiB as dpkg counts
/// it (each file rounded up, one per folder).
fn md5sums(stage: &Path) -> Result<(String, u64)> {
    let mut files = Vec::new();
    let mut kib = 0;
    let mut dirs = vec![stage.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(stage)?.to_string_lossy().into_owned();
            if rel == "DEBIAN" {
                continue;
            }
            if path.is_dir() {
                kib += 1;
                dirs.push(path);
            } else {
                kib += std::fs::metadata(&path)?.len().div_ceil(1024);
                if !rel.starts_with("etc/") {
                    files.push(rel);
                }
            }
        }
    }
    files.sort();
    let sums = run(Command::new("md5sum").args(&files).current_dir(stage))?;
    let mut text = String::new();
    for line in sums.lines() {
        writeln!(text, "{line}")?;
    }
    Ok((text, kib))
}
