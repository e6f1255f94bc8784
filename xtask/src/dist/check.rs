//! `cargo xtask dist --check`: each artifact used as an operator would, on
//! clean systems made with mmdebstrap from Debian's archive (as root):
//!
//! - the static binary in a bullseye root (glibc 2.31): `ldd` says static,
//!   `--version`, a `simulate | replay` round trip;
//! - the .deb passes lintian, then in a bookworm and a trixie root: install
//!   (not started), `--version`, `doctor --json` on this host's BTF,
//!   `systemd-analyze verify`, the completions in bash, each man page,
//!   an upgrade that keeps an edited conffile and restarts a running
//!   service, remove, and a purge that leaves nothing behind;
//! - the OCI image: its config, and its entrypoint run in a root made of
//!   its own layers.
//!
//! Commands run inside a root through `unshare --mount`, so the /proc and
//! /sys they need are mounted in a private namespace and vanish with it:
//! nothing stays mounted under `target/`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{Artifacts, deb};
use crate::{apt_install, run};

const MIRROR: &str = "http://deb.debian.org/debian";
/// The roots, and the packages each needs beyond minbase.
const BULLSEYE: (&str, &str) = ("bullseye", "libc-bin");
const DEB_ROOTS: [(&str, &str); 2] = [
    ("bookworm", "systemd,bash-completion,man-db"),
    ("trixie", "systemd,bash-completion,man-db"),
];

/// A Debian root under `target/dist-check/`.
struct Root {
    path: PathBuf,
}

/// The pristine `suite` root with `include`d packages, made once with
/// mmdebstrap and reused; returns its path.
fn pristine(root: &Path, (suite, include): (&str, &str)) -> Result<PathBuf> {
    let base = root.join("target/dist-check");
    let pristine = base.join(format!("{suite}.pristine"));
    let done = base.join(format!("{suite}.pristine.ok"));
    if std::fs::read_to_string(&done).is_ok_and(|made| made == include) {
        return Ok(pristine);
    }
    if pristine.exists() {
        std::fs::remove_dir_all(&pristine)?;
    }
    std::fs::create_dir_all(&base)?;
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", &format!("--include={include}"), suite])
        .arg(&pristine)
        .arg(MIRROR))
    .with_context(|| format!("mmdebstrap {suite} (a minimal Debian root)"))?;
    std::fs::write(&done, include)?;
    Ok(pristine)
}

/// Makes the roots `check` uses (for `.ci/run`, ahead of time).
pub fn prepare_roots(root: &Path) -> Result<()> {
    apt_install(&[("/usr/bin/mmdebstrap", "mmdebstrap")])?;
    for suite in [BULLSEYE].iter().chain(&DEB_ROOTS) {
        let path = pristine(root, *suite)?;
        println!("dist: {} ready", path.display());
    }
    Ok(())
}

impl Root {
    /// A fresh copy of the pristine `suite` root.
    fn fresh(root: &Path, suite: (&str, &str)) -> Result<Self> {
        let pristine = pristine(root, suite)?;
        let path = root.join("target/dist-check").join(suite.0);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
        run(Command::new("cp").arg("-a").arg(&pristine).arg(&path))?;
        Ok(Self { path })
    }

    /// Runs `script` with `sh` inside the root, with the host's /proc and
    /// /sys mounted (read-only) in a private mount namespace.
    fn sh(&self, script: &str) -> Result<Output> {
        chroot(&self.path, &["/bin/sh", "-c", script])
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .output()
            .with_context(|| format!("running in {}: {script}", self.path.display()))
    }

    /// `sh`, which must succeed; returns its stdout.
    fn ok(&self, script: &str) -> Result<String> {
        let out = self.sh(script)?;
        ensure!(
            out.status.success(),
            "in {}: `{script}` failed ({}):\n{}{}",
            self.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What the systemctl shim was asked since the last call.
    fn systemctl_calls(&self) -> Result<String> {
        let log = self.path.join("tmp/systemctl.log");
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::write(&log, "")?;
        Ok(said)
    }

    /// Every path in the root but the mount points, scratch folders and
    /// what dpkg, apt and man-db keep about packages.
    fn tree(&self) -> Result<BTreeSet<String>> {
        let list = run(Command::new("find").arg(&self.path).args([
            "-mindepth", "1", "-regextype", "posix-extended", "-regex",
            ".*/(proc|sys|dev|tmp|run)/.*|.*/var/(lib/dpkg|cache/man|cache/debconf|cache/ldconfig)/.*\
             |.*/var/log/(dpkg\\.log|apt|alternatives\\.log)(/.*)?",
            "-prune", "-o", "-print",
        ]))?;
        let prefix = self.path.display().to_string();
        Ok(list
            .lines()
            .map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_owned())
            .collect())
    }
}

/// `argv` run in the root at `path`, with the host's /proc and /sys
/// (read-only where the kernel allows) mounted in a private mount namespace
/// that ends with it; no environment, stdin from /dev/null. The path and
/// the arguments reach the shell as arguments, never as its script.
pub(super) fn chroot(path: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "set -e; mount -t proc proc \"$0/proc\"; \
             mount --rbind -o ro /sys \"$0/sys\" 2>/dev/null || mount --rbind /sys \"$0/sys\"; \
             exec chroot \"$0\" \"$@\"",
        )
        .arg(path)
        .args(argv)
        .env_clear()
        .stdin(Stdio::null());
    cmd
}

pub fn check(root: &Path, a: &Artifacts) -> Result<()> {
    apt_install(&[
        ("/usr/bin/mmdebstrap", "mmdebstrap"),
        ("/usr/bin/lintian", "lintian"),
    ])?;
    static_in_bullseye(root, a)?;
    lintian(&a.deb)?;
    let previous = deb::build(root, &a.static_binary, "0", &root.join("target/dist-work"))?;
    for suite in DEB_ROOTS {
        deb_in(root, suite, &previous, &a.deb)?;
    }
    match &a.image {
        Some(image) => super::image::check(root, image)?,
        None => println!("dist: no image was built (not root), so none is checked"),
    }
    Ok(())
}

/// Runs the static binary in a bullseye root: it must work with glibc 2.31
/// around it, and with no library of its own.
fn static_in_bullseye(root: &Path, a: &Artifacts) -> Result<()> {
    let chroot = Root::fresh(root, BULLSEYE)?;
    let glibc = chroot.ok("ldd --version")?;
    let glibc = glibc.lines().next().unwrap_or_default().to_owned();
    ensure!(
        glibc.contains("2.31"),
        "bullseye's glibc is 2.31, this root says {glibc}"
    );
    std::fs::copy(&a.static_binary, chroot.path.join("usr/local/bin/tracer"))?;
    let ldd = chroot.sh("ldd /usr/local/bin/tracer 2>&1")?;
    let ldd_says = String::from_utf8_lossy(&ldd.stdout);
    ensure!(
        ldd_says.contains("not a dynamic executable") || ldd_says.contains("statically linked"),
        "ldd in bullseye: {ldd_says}"
    );
    let version = chroot.ok("tracer --version")?;
    let found = chroot.ok(
        "tracer simulate --kernel mirror-freed-by-zap | tracer replay --json - | \
         grep -c '\"kind\":\"mirror_root_invalid_at_entry\"' || true",
    )?;
    let found = found.trim();
    ensure!(
        found.parse::<u32>().is_ok_and(|n| n > 0),
        "simulate | replay in bullseye found no mirror_root_invalid_at_entry: {found}"
    );
    println!(
        "dist: in a bullseye root ({glibc}): ldd says static, `{}`, simulate | replay found \
         {found} mirror_root_invalid_at_entry",
        version.trim()
    );
    Ok(())
}

/// lintian on the package: no tag left but those overridden, each with its
/// reason, in `dist/debian/lintian-overrides`.
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning,info",
            "--display-info",
            "--tag-display-limit",
            "0",
        ])
        .arg(deb)
        .output()
        .context("running lintian")?;
    // Its one remark about running as root is not about the package.
    let said: String = [&out.stdout, &out.stderr]
        .iter()
        .flat_map(|s| {
            String::from_utf8_lossy(s)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.contains("running with root privileges is not recommended"))
        // The spelling override is for random bytes: a build whose bytes
        // spell nothing leaves it unused.
        .filter(|l| !(l.contains("unused-override") && l.contains("spelling-error-in-binary")))
        .map(|l| l + "\n")
        .collect();
    ensure!(
        // 2 is "tags at the --fail-on level", which may be only those
        // filtered out above (1 is lintian's own error); anything else
        // lintian says is in `said`.
        matches!(out.status.code(), Some(0 | 2)) && said.trim().is_empty(),
        "lintian on {}:\n{said}",
        deb.display()
    );
    println!(
        "dist: lintian (errors, warnings, info) clean on {}",
        deb.display()
    );
    Ok(())
}

/// The .deb's life on a clean `suite` system.
fn deb_in(root: &Path, suite: (&str, &str), previous: &Path, current: &Path) -> Result<()> {
    let r = Root::fresh(root, suite)?;
    let suite = suite.0;
    // Pretend systemd runs (the scripts act only then) with a systemctl that
    // records what it is asked; the real one is used for `enable`.
    std::fs::create_dir_all(r.path.join("run/systemd/system"))?;
    let shim = r.path.join("usr/local/sbin/systemctl");
    std::fs::write(
        &shim,
        "#!/bin/sh\necho \"$*\" >> /tmp/systemctl.log\nexit 0\n",
    )?;
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut names = Vec::new();
    for deb in [previous, current] {
        let name = deb.file_name().context("name")?.to_string_lossy();
        std::fs::copy(deb, r.path.join("tmp").join(&*name))?;
        names.push(format!("/tmp/{name}"));
    }
    let before = r.tree()?;

    // Install: state made, nothing started or enabled.
    r.ok(&format!("dpkg -i {}", names[0]))?;
    let log = r.systemctl_calls()?;
    ensure!(
        log.contains("daemon-reload")
            && !["start", "enable", "restart"]
                .iter()
                .any(|w| log.contains(w)),
        "{suite}: a first install must not start or enable the service; systemctl was asked:\n{log}"
    );
    let modes = r.ok("stat -c '%a %U' /var/lib/kvm-root-tracer /var/log/kvm-root-tracer")?;
    ensure!(
        modes.lines().all(|l| l == "750 root"),
        "{suite}: state folders: {modes}"
    );
    let version = r.ok("tracer --version")?;
    let pages = installed_files_work(&r, suite)?;
    let installed = upgrade_remove_purge(&r, suite, &names[1], &before)?;
    println!(
        "dist: {suite}: installed {} (not started), `{}`, doctor exit 0, unit verified, \
         bash completes, {pages} man pages render, upgrade to {installed} kept the edited \
         conffile and try-restarted, remove stopped, purge left nothing",
        deb::version("0"),
        version.trim(),
    );
    Ok(())
}

/// `doctor` on this host's kernel, the unit, the completions and the man
/// pages, as installed; returns how many pages.
fn installed_files_work(r: &Root, suite: &str) -> Result<usize> {
    let doctor = r.sh("tracer doctor --json")?;
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        let json: serde_json::Value = serde_json::from_slice(&doctor.stdout)
            .with_context(|| format!("{suite}: doctor --json printed no JSON: {doctor:?}"))?;
        ensure!(
            doctor.status.code() == Some(0) && json.get("features").is_some(),
            "{suite}: doctor --json on this host's BTF: {doctor:?}"
        );
    } else {
        ensure!(
            doctor.status.code() == Some(3) && !doctor.stderr.is_empty(),
            "{suite}: without BTF doctor must exit 3 with a reason: {doctor:?}"
        );
    }

    let verify = r.sh("systemd-analyze verify /usr/lib/systemd/system/kvm-root-tracer.service")?;
    let said = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && !said.contains("kvm-root-tracer.service:"),
        "{suite}: systemd-analyze verify: {said}"
    );

    // Completions: bash-completion finds the script by the command's name,
    // and it completes a subcommand.
    let completed = r.ok("bash -c '. /usr/share/bash-completion/bash_completion; \
         _comp_load tracer 2>/dev/null || _completion_loader tracer; complete -p tracer; \
         COMP_WORDS=(tracer rep); COMP_CWORD=1; COMP_LINE=\"tracer rep\"; COMP_POINT=10; \
         _tracer tracer rep tracer; echo \"reply: ${COMPREPLY[*]}\"'")?;
    ensure!(
        completed.contains("-F _tracer") && completed.contains("reply: replay"),
        "{suite}: bash completion: {completed}"
    );
    let pages = r.ok("ls /usr/share/man/man1 | grep '^tracer'")?;
    let pages: Vec<&str> = pages.lines().collect();
    ensure!(pages.len() >= 7, "{suite}: man pages: {pages:?}");
    for page in &pages {
        let out = r.sh(&format!("MANWIDTH=80 man -l /usr/share/man/man1/{page}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let stem = page.trim_end_matches(".1.gz");
        ensure!(
            out.status.success()
                && text.contains("NAME")
                && text.contains(stem)
                && out.stderr.is_empty(),
            "{suite}: man -l {page}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    r.ok("man -w tracer-replay")?;
    Ok(pages.len())
}

/// The operator edits the config, enables the service and it records; an
/// upgrade keeps the edit and restarts; remove keeps the state; purge
/// leaves the tree as it was `before` the install. Returns the version
/// upgraded to.
fn upgrade_remove_purge(
    r: &Root,
    suite: &str,
    current: &str,
    before: &BTreeSet<String>,
) -> Result<String> {
    r.ok(
        "echo '# edited by the operator' >> /etc/kvm-root-tracer/config.toml && \
         SYSTEMD_OFFLINE=1 /usr/bin/systemctl enable kvm-root-tracer.service && \
         tracer simulate --rounds 10 --record /var/lib/kvm-root-tracer/log >/dev/null",
    )?;
    r.systemctl_calls()?;

    r.ok(&format!("dpkg -i {current}"))?;
    let log = r.systemctl_calls()?;
    ensure!(
        log.contains("try-restart kvm-root-tracer.service") && !log.contains("enable"),
        "{suite}: an upgrade must restart the service if it runs; systemctl was asked:\n{log}"
    );
    let config = r.ok("cat /etc/kvm-root-tracer/config.toml")?;
    ensure!(
        config.ends_with("# edited by the operator\n"),
        "{suite}: the upgrade lost the edited conffile"
    );
    r.ok("tracer run --check-config --config /etc/kvm-root-tracer/config.toml")?;
    let installed = r.ok("dpkg-query -W -f '${Version}' kvm-root-tracer")?;
    ensure!(
        installed == deb::version(deb::REVISION),
        "{suite}: after the upgrade dpkg says {installed}"
    );
    r.ok("ls /var/lib/kvm-root-tracer/log | grep -q .")?;

    r.ok("dpkg -r kvm-root-tracer")?;
    let log = r.systemctl_calls()?;
    ensure!(
        log.contains("stop kvm-root-tracer.service"),
        "{suite}: remove must stop the service; systemctl was asked:\n{log}"
    );
    r.ok("test -d /var/lib/kvm-root-tracer/log && test -f /etc/kvm-root-tracer/config.toml")?;
    r.ok("dpkg --purge kvm-root-tracer")?;
    let after = r.tree()?;
    let left: Vec<_> = after.difference(before).collect();
    let gone: Vec<_> = before.difference(&after).collect();
    if !left.is_empty() || !gone.is_empty() {
        bail!("{suite}: after purge, left behind: {left:?}; removed: {gone:?}");
    }
    Ok(installed)
}
