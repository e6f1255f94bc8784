//! Debian's kernels for the matrix: resolving each series to its newest
//! package through a private apt state, downloading and unpacking it (cached),
//! and finding its image and KVM modules (dependencies first, decompressed).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

pub(super) const SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm trixie trixie-backports sid experimental
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// apt options that use a private sources list and state under `dir`.
pub(super) fn apt_opts(dir: &Path) -> Vec<String> {
    vec![
        format!(
            "-oDir::Etc::SourceList={}",
            dir.join("debian.sources").display()
        ),
        "-oDir::Etc::SourceParts=/dev/null".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".into(),
    ]
}

/// Makes sure QEMU and a static busybox are installed (Debian packages).
pub(super) fn ensure_host_tools() -> Result<()> {
    crate::apt_install(&[
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/bin/file", "file"),
    ])?;
    let busybox_static = run(Command::new("file").arg("/bin/busybox"))
        .is_ok_and(|s| s.contains("statically linked"));
    if !busybox_static {
        bail!("/bin/busybox is not statically linked; install the busybox-static package");
    }
    Ok(())
}

/// For each series, the package and release, or why none can be tested.
pub(super) type Resolved = Vec<(String, std::result::Result<(String, String), String>)>;

pub(super) fn resolve(apt: &Path, series: &[&str]) -> Result<Resolved> {
    std::fs::create_dir_all(apt.join("lists/partial"))?;
    std::fs::create_dir_all(apt.join("cache/archives/partial"))?;
    std::fs::write(apt.join("debian.sources"), SOURCES)?;
    let stamp = apt.join("lists/.updated");
    let fresh = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e < Duration::from_hours(12)));
    if !fresh {
        eprintln!(
            "vm-test: apt-get update (bookworm, trixie, trixie-backports, sid, experimental)"
        );
        run(Command::new("apt-get").args(apt_opts(apt)).arg("update"))?;
        std::fs::write(&stamp, "")?;
    }
    let names = run(Command::new("apt-cache")
        .args(apt_opts(apt))
        .args(["pkgnames", "linux-image-"]))?;
    let modules: std::collections::BTreeSet<String> = run(Command::new("apt-cache")
        .args(apt_opts(apt))
        .args(["pkgnames", "linux-modules-"]))?
    .lines()
    .map(str::to_owned)
    .collect();
    let mut out = Vec::new();
    for s in series {
        // 6.1 is `6.1.0-NN-amd64`; trixie's are `6.12.57+deb13-amd64`;
        // experimental's release candidates are `7.3-amd64`.
        let mut candidates: Vec<(Vec<u64>, String)> = names
            .lines()
            .filter(|n| n.ends_with("-amd64") && !n.contains("cloud") && !n.contains("-rt-"))
            .filter(|n| !n.ends_with("-unsigned") && !n.contains("dbg"))
            .filter_map(|n| {
                let ver = n.strip_prefix("linux-image-")?.strip_suffix("-amd64")?;
                let nums: Vec<u64> = ver
                    .split(['.', '-', '+'])
                    .map_while(|p| p.parse().ok())
                    .collect();
                let prefix: Vec<u64> = s.split('.').filter_map(|p| p.parse().ok()).collect();
                (nums.len() >= prefix.len() && nums[..prefix.len()] == prefix[..])
                    .then(|| (nums, n.to_owned()))
            })
            .collect();
        candidates.sort();
        // The newest whose parts the archive has: from 6.19 Debian splits the
        // image, and a split package's linux-modules-* can lag behind its
        // image package. (One pkgnames listing, not an `apt-cache show` per
        // candidate: with sid and experimental indexes each show takes
        // seconds.)
        let pick = candidates.into_iter().rev().find(|(nums, pkg)| {
            let release = pkg.trim_start_matches("linux-image-");
            let split = nums[..2] >= [6u64, 19][..];
            let ok = !split || modules.contains(&format!("linux-modules-{release}"));
            if !ok {
                eprintln!("vm-test: skipping {pkg}: linux-modules-{release} is not in the archive");
            }
            ok
        });
        out.push((
            (*s).to_owned(),
            pick.map(|(_, pkg)| {
                let release = pkg.trim_start_matches("linux-image-").to_owned();
                (pkg, release)
            })
            .ok_or_else(|| {
                format!(
                    "no installable linux-image package for {s} in Debian's archive (a split \
                     package's linux-modules-* is missing)"
                )
            }),
        ));
    }
    Ok(out)
}

/// Downloads a package into `cache` and unpacks it into `dir`.
pub(super) fn download_unpack(apt: &Path, cache: &Path, pkg: &str, dir: &Path) -> Result<()> {
    eprintln!("vm-test: downloading {pkg}");
    run(Command::new("apt-get")
        .args(apt_opts(apt))
        .args(["download", pkg])
        .current_dir(cache))?;
    let deb = std::fs::read_dir(cache)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{pkg}_"))
                    && Path::new(n).extension().is_some_and(|e| e == "deb")
            })
        })
        .with_context(|| format!("apt-get download left no {pkg}_*.deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir))?;
    std::fs::remove_file(&deb)?;
    Ok(())
}

/// Downloads and unpacks a kernel (cached). From 6.19 Debian splits the
/// image package: the kernel is in `linux-binary-*`, the modules in
/// `linux-modules-*`.
pub(super) fn fetch(apt: &Path, cache: &Path, pkg: &str, release: &str) -> Result<PathBuf> {
    let dir = cache.join(pkg);
    if dir.join(".done").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    download_unpack(apt, cache, pkg, &dir)?;
    if vmlinuz(&dir, release).is_none() {
        for part in ["linux-binary", "linux-modules"] {
            download_unpack(apt, cache, &format!("{part}-{release}"), &dir)?;
        }
    }
    std::fs::write(dir.join(".done"), "")?;
    Ok(dir)
}

/// The kernel image in an unpacked package: `boot/vmlinuz-<release>`, or
/// (Debian from 7.x) `usr/lib/modules/<release>/vmlinuz`.
pub(super) fn vmlinuz(dir: &Path, release: &str) -> Option<PathBuf> {
    [
        dir.join("boot").join(format!("vmlinuz-{release}")),
        dir.join("usr/lib/modules").join(release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// A module's file in the unpacked package, by module name.
pub(super) fn find_module(root: &Path, name: &str) -> Option<PathBuf> {
    let want = name.replace('-', "_");
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).ok()?.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let file = p.file_name()?.to_str()?.to_owned();
            let base = file
                .strip_suffix(".ko.xz")
                .or_else(|| file.strip_suffix(".ko.zst"))
                .or_else(|| file.strip_suffix(".ko"));
            if base.is_some_and(|b| b.replace('-', "_") == want) {
                return Some(p);
            }
        }
    }
    None
}

/// The module's bytes, decompressed.
pub(super) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        let out = Command::new("xz").arg("-dc").arg(path).output()?;
        if !out.status.success() {
            bail!("xz -dc {name} failed");
        }
        Ok(out.stdout)
    } else if name.ends_with(".zst") {
        let out = Command::new("zstd").arg("-dc").arg(path).output()?;
        if !out.status.success() {
            bail!("zstd -dc {name} failed");
        }
        Ok(out.stdout)
    } else {
        Ok(std::fs::read(path)?)
    }
}

/// `depends=` from a module's .modinfo.
pub(super) fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            let rest = &ko[i + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Adds module `name` after its dependencies.
pub(super) fn visit(
    root: &Path,
    name: &str,
    order: &mut Vec<(String, Vec<u8>)>,
    depth: usize,
) -> Result<()> {
    if depth > 16 || order.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    let path = find_module(root, name)
        .with_context(|| format!("module {name} is not in {}", root.display()))?;
    let bytes = module_bytes(&path)?;
    for dep in depends(&bytes) {
        visit(root, &dep, order, depth + 1)?;
    }
    order.push((name.to_owned(), bytes));
    Ok(())
}

/// KVM's modules for AMD, dependencies first.
pub(super) fn kvm_modules(kernel_dir: &Path, release: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let root = kernel_dir.join("usr/lib/modules").join(release);
    let root = if root.exists() {
        root
    } else {
        kernel_dir.join("lib/modules").join(release)
    };
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    visit(&root, "kvm-amd", &mut order, 0)?;
    Ok(order)
}
