//! The container image: `dist/container/Containerfile` built by Debian's
//! buildah (vfs storage, chroot isolation: no daemon, no overlay mounts),
//! written as an OCI archive. Needs root. The storage is a folder under
//! `target/` made for one build and removed after it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{apt_install, run};

/// Builds `kvm-root-tracer-<version>.oci.tar` in `out` from the static
/// `binary` and `dist/config.toml`; the image is tagged
/// `kvm-root-tracer:<version>` inside the archive.
pub fn build(root: &Path, binary: &Path, epoch: &str, out: &Path) -> Result<PathBuf> {
    apt_install(&[("/usr/bin/buildah", "buildah")])?;
    let version = env!("CARGO_PKG_VERSION");
    let work = root.join("target/dist-work/image");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let context = work.join("context");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(binary, context.join("tracer"))?;
    std::fs::copy(root.join("dist/config.toml"), context.join("config.toml"))?;
    let revision = run(Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root))
    .unwrap_or_else(|_| "unknown".into());
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(work.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        cmd
    };
    let tag = format!("localhost/kvm-root-tracer:{version}");
    let containerfile = root.join("dist/container/Containerfile");
    run(buildah(&[
        "bud",
        "--isolation",
        "chroot",
        "--timestamp",
        epoch,
        "--build-arg",
        &format!("VERSION={version}"),
        "--build-arg",
        &format!("REVISION={revision}"),
        "-t",
        &tag,
        "-f",
    ])
    .arg(&containerfile)
    .arg(&context))
    .context("buildah bud (dist/container/Containerfile)")?;
    let archive = out.join(format!("kvm-root-tracer-{version}.oci.tar"));
    if archive.exists() {
        std::fs::remove_file(&archive)?;
    }
    run(buildah(&["push", &tag]).arg(format!(
        "oci-archive:{}:kvm-root-tracer:{version}",
        archive.display()
    )))
    .context("buildah push to an OCI archive")?;
    std::fs::remove_dir_all(&work)
        .with_context(|| format!("removing buildah's storage {}", work.display()))?;
    Ok(archive)
}

/// The archive as a runtime sees it: its index, manifest and config (the
/// entrypoint, the command, the labels), then its layers unpacked into a
/// root where the entrypoint runs its command with `--check-config`, and
/// `doctor` on this host's kernel.
pub fn check(root: &Path, archive: &Path) -> Result<()> {
    let work = root.join("target/dist-check/image");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let oci = work.join("oci");
    std::fs::create_dir_all(&oci)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&oci))?;
    let blob = |digest: &serde_json::Value| -> Result<PathBuf> {
        let digest = digest.as_str().context("a digest is not a string")?;
        let hex = digest
            .strip_prefix("sha256:")
            .context("not a sha256 digest")?;
        anyhow::ensure!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "bad digest {digest}"
        );
        Ok(oci.join("blobs/sha256").join(hex))
    };
    let json = |path: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(path)?)?)
    };
    let index = json(&oci.join("index.json"))?;
    let manifest = json(&blob(&index["manifests"][0]["digest"])?)?;
    let config = json(&blob(&manifest["config"]["digest"])?)?;
    let c = &config["config"];
    let entrypoint: Vec<String> = serde_json::from_value(c["Entrypoint"].clone())?;
    let cmd: Vec<String> = serde_json::from_value(c["Cmd"].clone())?;
    anyhow::ensure!(
        entrypoint == ["/usr/bin/tracer"] && cmd.first().is_some_and(|s| s == "run"),
        "image entrypoint {entrypoint:?}, command {cmd:?}"
    );
    let version = c["Labels"]["org.opencontainers.image.version"].as_str();
    anyhow::ensure!(
        version == Some(env!("CARGO_PKG_VERSION")),
        "image version label {version:?}"
    );
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let layers = manifest["layers"].as_array().context("no layers")?;
    for layer in layers {
        run(Command::new("tar")
            .arg("-xf")
            .arg(blob(&layer["digest"])?)
            .arg("-C")
            .arg(&rootfs))?;
    }
    let files = run(Command::new("find")
        .arg(&rootfs)
        .args(["-type", "f", "-printf", "/%P\n"]))?;
    let mut files: Vec<&str> = files.lines().collect();
    files.sort_unstable();
    anyhow::ensure!(
        files == ["/etc/kvm-root-tracer/config.toml", "/usr/bin/tracer"],
        "the image holds {files:?}"
    );
    // What a runtime provides: the mount points.
    for dir in ["proc", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    let in_image = |args: &[String]| -> Result<std::process::Output> {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        super::check::chroot(&rootfs, &argv)
            .output()
            .context("running in the image's root")
    };
    let mut check_config: Vec<String> = entrypoint.iter().chain(&cmd).cloned().collect();
    check_config.push("--check-config".into());
    let out = in_image(&check_config)?;
    anyhow::ensure!(
        out.status.success(),
        "the image's command with --check-config: {out:?}"
    );
    let doctor = in_image(&["/usr/bin/tracer".into(), "doctor".into(), "--json".into()])?;
    anyhow::ensure!(
        doctor.status.success()
            && serde_json::from_slice::<serde_json::Value>(&doctor.stdout).is_ok(),
        "doctor in the image's root: {doctor:?}"
    );
    let size = std::fs::metadata(archive)?.len();
    println!(
        "dist: image {} ({} KiB): entrypoint {entrypoint:?} {cmd:?}, {} layer(s) holding only \
         the binary and the config; its command passes --check-config and doctor runs in it",
        archive.display(),
        size / 1024,
        layers.len()
    );
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
