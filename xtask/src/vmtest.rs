//! `cargo xtask vm-test`: the kprobe path on stock Debian kernels, with real
//! KVM inside QEMU (TCG, `-cpu max`: nested SVM with NPT).
//!
//! For each kernel: fetch its package through Debian's tools (cached under
//! target/vm-test/), build an initramfs holding busybox, the kernel's KVM
//! modules, `tracer` and a small guest workload, boot it with a hard
//! timeout, and check what came back on the serial console: the attach
//! plan, the verifier's verdicts, the events a real guest produced, the
//! values read, zero findings, and a host replay of the log recorded inside
//! the VM.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{inject, run};
use serde_json::Value;

/// The default matrix: Debian series, newest point release of each.
pub const MATRIX: &[(&str, &str)] = &[
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
    ("6.16", "trixie-backports"),
    ("6.17", "trixie-backports"),
    ("6.18", "trixie-backports"),
    ("6.19", "trixie-backports"),
    ("7.2", "sid"),
    ("7.3", "experimental"),
];

const SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm trixie trixie-backports sid experimental
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// The workload inside the VM, and how the tracer watches it.
#[derive(Clone, Copy)]
pub struct Workload {
    pub vcpus: u64,
    /// Memslot deletions (each one fast zap), the vCPUs run after each.
    pub churns: u64,
    /// Then run the vCPUs to `hlt` this many more times (guest entries).
    pub extra_runs: u64,
    /// `tracer watch --baseline`: empty programs beside the probes.
    pub baseline: bool,
    /// Then the fault-injection phase (see [`INJECT_PHASE`]).
    pub inject: bool,
}

/// The matrix check: a small guest, three memslot deletions.
pub const CHECK: Workload = Workload {
    vcpus: 2,
    churns: 3,
    extra_runs: 0,
    baseline: false,
    inject: true,
};

/// apt options that use a private sources list and state under `dir`.
fn apt_opts(dir: &Path) -> Vec<String> {
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
fn ensure_host_tools() -> Result<()> {
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
type Resolved = Vec<(String, std::result::Result<(String, String), String>)>;

fn resolve(apt: &Path, series: &[&str]) -> Result<Resolved> {
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
fn download_unpack(apt: &Path, cache: &Path, pkg: &str, dir: &Path) -> Result<()> {
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
fn fetch(apt: &Path, cache: &Path, pkg: &str, release: &str) -> Result<PathBuf> {
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
fn vmlinuz(dir: &Path, release: &str) -> Option<PathBuf> {
    [
        dir.join("boot").join(format!("vmlinuz-{release}")),
        dir.join("usr/lib/modules").join(release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// A module's file in the unpacked package, by module name.
fn find_module(root: &Path, name: &str) -> Option<PathBuf> {
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
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
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
fn depends(ko: &[u8]) -> Vec<String> {
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
fn visit(root: &Path, name: &str, order: &mut Vec<(String, Vec<u8>)>, depth: usize) -> Result<()> {
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
fn kvm_modules(kernel_dir: &Path, release: &str) -> Result<Vec<(String, Vec<u8>)>> {
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

/// A newc cpio archive, built in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.ino += 1;
        let mut h = String::new();
        let _ = write!(
            h,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(h.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        // Parent folders first.
        let mut acc = String::new();
        for part in name
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.dir(&acc);
        }
        self.entry(name, 0o100_000 | mode, body);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// The init script run inside the VM.
fn init_script(modules: &[(String, Vec<u8>)], w: Workload) -> String {
    let Workload {
        vcpus,
        churns,
        extra_runs,
        baseline,
        inject: _,
    } = w;
    let baseline = if baseline { " --baseline" } else { "" };
    let mut insmods = String::new();
    for (n, _) in modules {
        let _ = writeln!(
            insmods,
            "insmod /lib/modules/{n}.ko || echo \"@@VMTEST insmod-failed {n}\""
        );
    }
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "@@VMTEST uname $(uname -r)"
{insmods}
echo "@@VMTEST begin doctor"
tracer doctor --json --verify
echo "@@VMTEST end doctor $?"
tracer watch --json{baseline} --record /tmp/log --no-compress --min-free 1M > /tmp/watch.jsonl 2> /tmp/watch.err &
W=$!
i=0
while ! grep -q "probe(s) in" /tmp/watch.err 2>/dev/null; do
  sleep 1; i=$((i+1)); [ $i -gt 120 ] && break
done
echo "@@VMTEST begin workload"
kvm_workload {vcpus} {churns} extra-runs={extra_runs}
echo "@@VMTEST end workload $?"
sleep 2
kill -INT $W
wait $W
echo "@@VMTEST watch-exit $?"
echo "@@VMTEST begin watch-err"
cat /tmp/watch.err
echo "@@VMTEST end watch-err"
echo "@@VMTEST begin watch"
cat /tmp/watch.jsonl
echo "@@VMTEST end watch"
echo "@@VMTEST begin log"
cat /tmp/log/events-*.jsonl
echo "@@VMTEST end log"
echo "@@VMTEST begin replay"
tracer replay --json /tmp/log
echo "@@VMTEST end replay $?"
{inject}
echo "@@VMTEST done"
poweroff -f
"#,
        inject = if w.inject { INJECT_PHASE } else { "" }
    )
}

/// The fault-injection phase: the daemon (`tracer run`) watches a guest of
/// two vCPUs that keep exiting to userspace on `hlt` and re-entering, while
/// the host writes the running kernel's memory through QEMU's gdbstub. The
/// daemon's findings go to the console as they happen; the host answers on
/// the second serial port (ttyS1) once it has restored what it changed.
const INJECT_PHASE: &str = r#"
echo "@@VMTEST ksym $(grep -E ' (vmemmap_base|page_offset_base|init_top_pgt|phys_base)$' /proc/kallsyms | tr '\n' ' ')"
mkdir -p /tmp/ilog
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
tracer run --log-dir /tmp/ilog --no-compress --min-free 1M --metrics-listen 127.0.0.1:10464 --findings-out - --poll-interval 10ms 2> /tmp/run.err &
R=$!
i=0
while ! grep -q "probe(s) in" /tmp/run.err 2>/dev/null; do
  sleep 1; i=$((i+1)); [ $i -gt 120 ] && break
done
rm -f /tmp/stop
kvm_workload 2 0 hold=/tmp/stop > /tmp/hold.json &
H=$!
i=0
while [ "$(cat /tmp/ilog/events-*.jsonl 2>/dev/null | grep -c '"vcpu":')" -lt 4 ]; do
  sleep 1; i=$((i+1)); [ $i -gt 120 ] && break
done
sleep 1
KVM=$(grep -o '"kvm":"0x[0-9a-f]*"' /tmp/ilog/events-*.jsonl | head -1 | cut -d'"' -f4)
VCPUS=$(grep -o '"vcpu":"0x[0-9a-f]*"' /tmp/ilog/events-*.jsonl | cut -d'"' -f4 | sort -u | tr '
' ',')
echo "@@VMTEST inject-ready kvm=$KVM vcpus=$VCPUS pid=$H"
stty -F /dev/ttyS1 -echo 2>/dev/null
read -r CMD < /dev/ttyS1
echo "@@VMTEST inject-host $CMD"
touch /tmp/stop
wait $H
echo "@@VMTEST begin hold"
cat /tmp/hold.json
echo "@@VMTEST end hold $?"
sleep 1
echo "@@VMTEST begin inject-metrics"
wget -qO- http://127.0.0.1:10464/metrics
echo "@@VMTEST end inject-metrics $?"
kill -INT $R
wait $R
echo "@@VMTEST run-exit $?"
echo "@@VMTEST begin run-err"
cat /tmp/run.err
echo "@@VMTEST end run-err"
echo "@@VMTEST begin inject-log"
cat /tmp/ilog/events-*.jsonl
echo "@@VMTEST end inject-log"
echo "@@VMTEST begin incidents"
ls /tmp/ilog | grep '^incident-'
echo "@@VMTEST end incidents"
"#;

/// Shared libraries a binary needs (from ldd), interpreter included.
fn libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run(Command::new("ldd").arg(bin))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn build_initramfs(
    out: &Path,
    modules: &[(String, Vec<u8>)],
    tracer: &Path,
    workload: &Path,
    w: Workload,
) -> Result<()> {
    let mut c = Cpio::default();
    c.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?);
    c.file("init", 0o755, init_script(modules, w).as_bytes());
    for (name, bytes) in modules {
        c.file(&format!("lib/modules/{name}.ko"), 0o644, bytes);
    }
    let mut shipped = std::collections::BTreeSet::new();
    c.file("usr/bin/tracer", 0o755, &std::fs::read(tracer)?);
    // The test workload is an ordinary (dynamic) program: its libraries go
    // in with it.
    for bin in [workload] {
        let name = bin.file_name().unwrap().to_string_lossy().into_owned();
        c.file(&format!("usr/bin/{name}"), 0o755, &std::fs::read(bin)?);
        for lib in libs(bin)? {
            if shipped.insert(lib.clone()) {
                let real = std::fs::canonicalize(&lib)?;
                let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
                c.file(&inside, 0o755, &std::fs::read(real)?);
            }
        }
    }
    std::fs::write(out, c.finish())?;
    Ok(())
}

/// Sections of the serial log between `@@VMTEST begin X` and `end X`.
fn sections(serial: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut blocks = BTreeMap::new();
    let mut marks = BTreeMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("@@VMTEST ") {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            match k {
                "begin" => cur = Some((v.to_owned(), String::new())),
                "end" => {
                    let (name, status) = v.split_once(' ').unwrap_or((v, ""));
                    if let Some((n, body)) = cur.take() {
                        blocks.insert(n, body);
                    }
                    marks.insert(format!("{name}-exit"), status.to_owned());
                }
                _ => {
                    marks.insert(k.to_owned(), v.to_owned());
                }
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    (blocks, marks)
}

/// What one kernel showed, and what failed.
pub struct Outcome {
    pub release: String,
    pub boot_s: f64,
    pub plan: Vec<(String, String)>,
    pub events: BTreeMap<String, u64>,
    pub entries: u64,
    /// The summary's in-kernel cost per program (`bpf_cost`).
    pub costs: Vec<Value>,
    pub failures: Vec<String>,
    pub serial_log: PathBuf,
    /// The fault injection, where the workload has it.
    pub injection: Option<inject::Report>,
}

fn check(release: &str, serial: &str, host_tracer: &Path, work: &Path, w: Workload) -> Outcome {
    let (blocks, marks) = sections(serial);
    let mut o = Outcome {
        release: release.to_owned(),
        boot_s: 0.0,
        plan: Vec::new(),
        events: BTreeMap::new(),
        entries: 0,
        costs: Vec::new(),
        failures: Vec::new(),
        serial_log: work.join("serial.log"),
        injection: None,
    };
    if !marks.contains_key("done") {
        o.failures
            .push("the VM did not finish the test script (hang, panic or timeout)".into());
    }
    if let Some(m) = marks.get("insmod-failed") {
        o.failures.push(format!("insmod failed: {m}"));
    }
    let series: Vec<u64> = release
        .split(['.', '-', '+'])
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    let has_mirror = series >= vec![6, 14];
    let plan = check_plan(&blocks, &marks, has_mirror, &mut o.failures);
    o.plan = plan.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let n_events = check_events(&blocks, &plan, has_mirror, w, &mut o);
    check_replay(
        &blocks,
        &marks,
        n_events,
        host_tracer,
        work,
        &mut o.failures,
    );
    o
}

/// The plan `doctor` chose, and the verifier's verdicts.
fn check_plan(
    blocks: &BTreeMap<String, String>,
    marks: &BTreeMap<String, String>,
    has_mirror: bool,
    fail: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let doctor: Value = if let Some(Ok(v)) = blocks.get("doctor").map(|d| serde_json::from_str(d)) {
        v
    } else {
        fail.push("no doctor --json output".into());
        Value::Null
    };
    if marks.get("doctor-exit").map(String::as_str) != Some("0") {
        fail.push(format!(
            "doctor --verify exited {:?}",
            marks.get("doctor-exit")
        ));
    }
    let feature = |n: &str| {
        doctor["features"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == n))
            .map(|f| f["enabled"] == true)
    };
    let plan: BTreeMap<String, String> = doctor["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["probe"].as_str().unwrap_or("").to_owned(),
                p["attach"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let attach = |p: &str| plan.get(p).map_or("", String::as_str);
    if feature("kprobes") != Some(true) {
        fail.push("kprobes are not available".into());
    }
    if feature("mirror-root-tracking") != Some(has_mirror) {
        fail.push(format!(
            "mirror tracking should be {}",
            if has_mirror { "on" } else { "off" }
        ));
    }
    if attach("kvm_mmu_load") != "kprobe" || attach("kvm_mmu_load_ret") != "kretprobe" {
        fail.push("kvm_mmu_load is not kprobed and kretprobed".into());
    }
    if attach("mmu_alloc_direct_roots") == "off"
        && attach("kvm_tdp_mmu_alloc_root") != "kprobe"
        && has_mirror
    {
        fail.push("neither mmu_alloc_direct_roots nor kvm_tdp_mmu_alloc_root is probed".into());
    }
    if attach("kvm_mmu_zap_all_fast") != "kprobe"
        && attach("kvm_mmu_zap_all_fast_tp") != "raw-tracepoint"
    {
        fail.push("kvm_mmu_zap_all_fast is neither kprobed nor traced".into());
    }
    let verdicts = doctor["verifier"].as_array().cloned().unwrap_or_default();
    if verdicts.len() != 12 || verdicts.iter().any(|v| v["accepted"] != true) {
        fail.push(format!(
            "the verifier did not accept every program: {verdicts:?}"
        ));
    }
    plan
}

/// The events the real guest produced, and the values read. Returns the
/// number of events.
fn check_events(
    blocks: &BTreeMap<String, String>,
    plan: &BTreeMap<String, String>,
    has_mirror: bool,
    w: Workload,
    o: &mut Outcome,
) -> usize {
    let records: Vec<Value> = blocks
        .get("watch")
        .map(|w| {
            w.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default();
    let events: Vec<&Value> = records.iter().filter(|r| r["record"] == "event").collect();
    for e in &events {
        *o.events
            .entry(e["kind"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let summary = records.iter().find(|r| r["record"] == "summary");
    o.entries = summary
        .and_then(|s| s["kvm_entry"]["entries"].as_u64())
        .unwrap_or(0);
    o.costs = summary
        .and_then(|s| s["bpf_cost"].as_array().cloned())
        .unwrap_or_default();
    let count = |k: &str| o.events.get(k).copied().unwrap_or(0);
    let attach = |p: &str| plan.get(p).map_or("", String::as_str);
    let fail = &mut o.failures;
    for k in ["load_enter", "load_return"] {
        if count(k) == 0 {
            fail.push(format!("no {k} events"));
        }
    }
    if attach("kvm_tdp_mmu_alloc_root") == "kprobe" && count("alloc_root") == 0 {
        fail.push("no alloc_root events".into());
    }
    if count("zap_all_fast") != w.churns {
        fail.push(format!(
            "{} zap events for {} memslot deletions",
            count("zap_all_fast"),
            w.churns
        ));
    }
    if attach("kvm_mmu_zap_all_fast") == "kprobe"
        && events
            .iter()
            .filter(|e| e["kind"] == "zap_all_fast")
            .any(|e| e["probe"] != "kvm_mmu_zap_all_fast")
    {
        fail.push("zap events did not come from the kprobe".into());
    }
    if o.entries == 0 {
        fail.push("the kvm_entry gate counted no guest entry".into());
    }
    if summary.is_none_or(|s| s["dropped"] != 0) {
        fail.push("ring-buffer drops, or no summary".into());
    }
    if let Some(bad) = events.iter().find_map(|e| bad_value(e, has_mirror)) {
        fail.push(bad);
    }
    let findings = records.iter().filter(|r| r["record"] == "finding").count();
    if findings != 0 {
        fail.push(format!("{findings} finding(s) on a healthy non-TDX VM"));
    }
    events.len()
}

/// A value no healthy default VM can show.
fn bad_value(e: &Value, has_mirror: bool) -> Option<String> {
    let invalid = "0xffffffffffffffff";
    if e["vm_type"].is_number() && e["vm_type"] != 0 {
        return Some(format!("vm_type {} on a default VM", e["vm_type"]));
    }
    if e["kind"] == "load_return" && e["ret"] == 0 && e["root_hpa"] == invalid {
        return Some("invalid root.hpa after a successful load".into());
    }
    if has_mirror && e["vcpu"].is_string() && e["mirror_root_hpa"] != invalid {
        return Some(format!(
            "mirror_root_hpa {} on a non-TDX VM",
            e["mirror_root_hpa"]
        ));
    }
    if !has_mirror && !e["mirror_root_hpa"].is_null() {
        return Some("mirror_root_hpa read on a kernel without the field".into());
    }
    None
}

/// The log recorded inside the VM replays to the same result on the host.
fn check_replay(
    blocks: &BTreeMap<String, String>,
    marks: &BTreeMap<String, String>,
    n_events: usize,
    host_tracer: &Path,
    work: &Path,
    fail: &mut Vec<String>,
) {
    let in_vm = marks.get("replay-exit").cloned().unwrap_or_default();
    if in_vm != "0" {
        fail.push(format!("replay inside the VM exited {in_vm:?}"));
    }
    let log = work.join("log");
    let _ = std::fs::remove_dir_all(&log);
    let _ = std::fs::create_dir_all(&log);
    let _ = std::fs::write(
        log.join("events-vm-000000.jsonl"),
        blocks.get("log").cloned().unwrap_or_default(),
    );
    match Command::new(host_tracer).arg("replay").arg(&log).output() {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let want = format!("replayed {n_events} event(s)");
            if out.status.code() != Some(0) || !err.contains(&want) {
                fail.push(format!(
                    "host replay of the VM's log differs ({want}?): {err}"
                ));
            }
        }
        Err(e) => fail.push(format!("host replay failed to start: {e}")),
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the daemon made of the injected fault: on kernels with mirror roots
/// and VM types, exactly one `mirror_root_invalid_at_entry` (and, where
/// injected, one `mirror_root_stale_at_entry`) per vCPU, naming the right
/// VM, vCPU and VMM pid, in the log, as incident files and in the findings
/// counter; nothing before the injection or after the restore. Elsewhere,
/// nothing at all.
fn check_injection(
    serial: &str,
    r: Option<&inject::Report>,
    host_tracer: &Path,
    work: &Path,
    fail: &mut Vec<String>,
) {
    let (blocks, marks) = sections(serial);
    let Some(r) = r else {
        fail.push("the guest never got to the injection (no inject-ready)".into());
        return;
    };
    for e in &r.errors {
        fail.push(format!("injection: {e}"));
    }
    if r.applicable && !r.restored {
        fail.push("injection: the kernel memory was not restored".into());
    }
    if marks.get("inject-host").map(String::as_str) != Some("done") {
        fail.push(format!(
            "the guest did not hear 'done' from the host: {:?}",
            marks.get("inject-host")
        ));
    }
    if marks.get("run-exit").map(String::as_str) != Some("0") {
        fail.push(format!(
            "tracer run exited {:?}: {}",
            marks.get("run-exit"),
            blocks.get("run-err").cloned().unwrap_or_default()
        ));
    }
    if r.stale_too_early != 0 {
        fail.push(format!(
            "{} mirror_root_stale_at_entry raised while the mirror roots were valid",
            r.stale_too_early
        ));
    }
    if r.findings_before != 0 || r.findings_after_restore != 0 {
        fail.push(format!(
            "findings before the injection: {}, after the restore: {}",
            r.findings_before, r.findings_after_restore
        ));
    }
    let findings: Vec<Value> = blocks
        .get("inject-log")
        .map(|l| {
            l.lines()
                .filter_map(|x| serde_json::from_str::<Value>(x).ok())
                .filter(|x| x["record"] == "finding")
                .collect()
        })
        .unwrap_or_default();
    let mut want: Vec<(&str, usize)> = Vec::new();
    if r.applicable {
        want.push(("mirror_root_invalid_at_entry", r.vcpus.len()));
        if r.stale_injected {
            want.push(("mirror_root_stale_at_entry", r.vcpus.len()));
        }
    }
    let total: usize = want.iter().map(|(_, n)| n).sum();
    if findings.len() != total {
        let kinds: Vec<&str> = findings.iter().filter_map(|f| f["kind"].as_str()).collect();
        fail.push(format!(
            "the log holds {} finding(s) {kinds:?}, want {total} ({want:?})",
            findings.len()
        ));
    }
    let metrics = blocks.get("inject-metrics").cloned().unwrap_or_default();
    let incidents = blocks.get("incidents").cloned().unwrap_or_default();
    for (kind, n) in &want {
        check_kind(r, &findings, kind, *n, (&metrics, &incidents), fail);
    }
    check_host_replay(&blocks, total, host_tracer, work, fail);
}

/// One kind of injected fault: once per vCPU, naming the VM, the vCPU and
/// the VMM, in the counter and as an incident file.
fn check_kind(
    r: &inject::Report,
    findings: &[Value],
    kind: &str,
    n: usize,
    (metrics, incidents): (&str, &str),
    fail: &mut Vec<String>,
) {
    let of_kind: Vec<&Value> = findings.iter().filter(|f| f["kind"] == kind).collect();
    let mut vcpus: Vec<&str> = of_kind.iter().filter_map(|f| f["vcpu"].as_str()).collect();
    vcpus.sort_unstable();
    vcpus.dedup();
    let mut want_vcpus: Vec<&str> = r.vcpus.iter().map(String::as_str).collect();
    want_vcpus.sort_unstable();
    if of_kind.len() != n || vcpus != want_vcpus {
        fail.push(format!(
            "{kind}: {} finding(s) on vCPUs {vcpus:?}, want one on each of {want_vcpus:?}",
            of_kind.len()
        ));
    }
    for f in &of_kind {
        if f["kvm"].as_str() != Some(r.kvm.as_str())
            || f["userspace_pid"].as_i64() != Some(r.vmm_pid)
            || f["severity"] != "critical"
        {
            fail.push(format!(
                "{kind} names kvm {} pid {}, severity {}; want {} pid {} critical",
                f["kvm"], f["userspace_pid"], f["severity"], r.kvm, r.vmm_pid
            ));
        }
    }
    let counter =
        format!("kvm_root_tracer_findings_total{{kind=\"{kind}\",severity=\"critical\"}} {n}");
    if !metrics.contains(&counter) {
        fail.push(format!("the metrics lack `{counter}`"));
    }
    let incident = format!("-{kind}-vmm{}", r.vmm_pid);
    if !incidents.lines().any(|l| l.contains(&incident)) {
        fail.push(format!("no incident file *{incident}*: {incidents:?}"));
    }
}

/// The daemon's log replays on the host to the same findings.
fn check_host_replay(
    blocks: &BTreeMap<String, String>,
    total: usize,
    host_tracer: &Path,
    work: &Path,
    fail: &mut Vec<String>,
) {
    let log = work.join("inject-log");
    let _ = std::fs::remove_dir_all(&log);
    let _ = std::fs::create_dir_all(&log);
    let _ = std::fs::write(
        log.join("events-vm-000000.jsonl"),
        blocks.get("inject-log").cloned().unwrap_or_default(),
    );
    match Command::new(host_tracer)
        .args(["replay", "--json"])
        .arg(&log)
        .output()
    {
        Ok(out) => {
            let n = String::from_utf8_lossy(&out.stdout).lines().count();
            if n != total {
                fail.push(format!(
                    "host replay of the daemon's log: {n} finding(s), want {total}"
                ));
            }
        }
        Err(e) => fail.push(format!("host replay failed to start: {e}")),
    }
}

/// The table's injection column.
fn injection_cell(r: Option<&inject::Report>) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "MISSED".into(), |v| format!("{v:.0} ms"));
    match r {
        None => "-".into(),
        Some(r) if r.applicable => format!(
            "invalid {}, stale {}",
            ms(r.invalid_latency_ms),
            if r.stale_injected {
                ms(r.stale_latency_ms)
            } else {
                "not injected".into()
            }
        ),
        Some(_) => "n/a (no mirror roots): 0 findings".into(),
    }
}

/// Boots one kernel and checks it.
fn boot(
    root: &Path,
    apt: &Path,
    cache: &Path,
    pkg: &str,
    release: &str,
    timeout: Duration,
    w: Workload,
) -> Result<Outcome> {
    let kernel_dir = fetch(apt, cache, pkg, release)?;
    let work = root.join("target/vm-test/runs").join(format!(
        "{release}{}",
        if w.baseline { "-bench" } else { "" }
    ));
    std::fs::create_dir_all(&work)?;
    let modules = kvm_modules(&kernel_dir, release)?;
    // The static binary, as shipped: no library copied for it.
    let tracer = crate::dist::build_static(root)?;
    let workload = root.join("target/release/examples/kvm_workload");
    let initrd = work.join("initramfs.cpio");
    build_initramfs(&initrd, &modules, &tracer, &workload, w)?;
    let vmlinuz = vmlinuz(&kernel_dir, release)
        .with_context(|| format!("no vmlinuz in {}", kernel_dir.display()))?;
    let serial = work.join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let gdb_port = free_port()?;
    let ctl = work.join("ctl.sock");
    let _ = std::fs::remove_file(&ctl);
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        // nokaslr: the direct map starts where the injection expects it.
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3 nokaslr"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        // ttyS1: the host tells the guest when the injection is over.
        .arg("-chardev")
        .arg(format!(
            "socket,id=ctl,path={},server=on,wait=off",
            ctl.display()
        ))
        .args(["-serial", "chardev:ctl"])
        .arg("-gdb")
        .arg(format!("tcp:127.0.0.1:{gdb_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start qemu-system-x86_64")?;
    let mut timed_out = false;
    let mut injection = None;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        if w.inject && injection.is_none() {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if let Some(at) = text.find("@@VMTEST inject-ready") {
                let line = text[at..].lines().next().unwrap_or_default().to_owned();
                let (blocks, _) = sections(&text);
                let doctor: Value = blocks
                    .get("doctor")
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or(Value::Null);
                eprintln!("vm-test: {release}: {line}");
                let r = inject::run(&serial, at, &line, &doctor, gdb_port, &ctl);
                eprintln!(
                    "vm-test: {release}: injection: invalid {:?} ms, stale {:?} ms, restored {}, errors {:?}",
                    r.invalid_latency_ms, r.stale_latency_ms, r.restored, r.errors
                );
                injection = Some(r);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot_s = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let mut o = check(release, &text, &tracer, &work, w);
    o.boot_s = boot_s;
    if w.inject {
        check_injection(&text, injection.as_ref(), &tracer, &work, &mut o.failures);
        o.injection = injection;
    }
    if timed_out {
        o.failures
            .insert(0, format!("timed out after {} s", timeout.as_secs()));
    }
    Ok(o)
}

/// `cargo xtask vm-test`.
pub fn vm_test(root: &Path, kernels: &[String], timeout: Duration) -> Result<()> {
    ensure_host_tools()?;
    let base = root.join("target/vm-test");
    let apt = base.join("apt");
    let cache = base.join("cache");
    std::fs::create_dir_all(&cache)?;
    let series: Vec<&str> = if kernels.is_empty() {
        MATRIX.iter().map(|(s, _)| *s).collect()
    } else {
        kernels.iter().map(String::as_str).collect()
    };
    let resolved = resolve(&apt, &series)?;
    let mut outcomes = Vec::new();
    let mut skipped = Vec::new();
    for (series, r) in &resolved {
        let (pkg, release) = match r {
            Ok(v) => v,
            Err(why) => {
                eprintln!("vm-test: {series}: SKIPPED, can't be tested here: {why}");
                skipped.push((series.clone(), why.clone()));
                continue;
            }
        };
        eprintln!("vm-test: {release}: booting");
        let o = boot(root, &apt, &cache, pkg, release, timeout, CHECK)?;
        eprintln!(
            "vm-test: {release}: {} in {:.1} s; events {:?}; kvm_entry {}",
            if o.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            },
            o.boot_s,
            o.events,
            o.entries
        );
        for f in &o.failures {
            eprintln!("vm-test: {release}:   {f}");
        }
        if !o.failures.is_empty() {
            let text = std::fs::read_to_string(&o.serial_log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "vm-test: {release}: serial log {} (last lines):\n{}",
                o.serial_log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        outcomes.push(o);
    }
    let json: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "kernel": o.release,
                "ok": o.failures.is_empty(),
                "boot_and_test_s": o.boot_s,
                "plan": o.plan.iter().cloned().collect::<BTreeMap<_, _>>(),
                "events": o.events,
                "kvm_entry_entries": o.entries,
                "injection": o.injection.as_ref().map(inject::Report::to_json),
                "failures": o.failures,
            })
        })
        .collect();
    let json: Vec<Value> = json
        .into_iter()
        .chain(skipped.iter().map(
            |(series, why)| serde_json::json!({ "kernel": series, "ok": null, "skipped": why }),
        ))
        .collect();
    let results = base.join("results.json");
    std::fs::write(&results, serde_json::to_string_pretty(&json)?)?;
    println!(
        "{:<24} {:>6} {:>8}  {:<36} events",
        "kernel", "result", "time", "injection (fault -> finding)"
    );
    for o in &outcomes {
        let inj = injection_cell(o.injection.as_ref());
        println!(
            "{:<24} {:>6} {:>7.1}s  {inj:<36} {}",
            o.release,
            if o.failures.is_empty() { "ok" } else { "FAIL" },
            o.boot_s,
            o.events
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for (series, why) in &skipped {
        println!("{series:<24} {:>6}  {why}", "SKIP");
    }
    eprintln!("vm-test: results in {}", results.display());
    let failed = outcomes.iter().filter(|o| !o.failures.is_empty()).count();
    if failed > 0 {
        bail!("{failed} kernel(s) failed");
    }
    Ok(())
}

/// Boots one kernel of the matrix with workload `w`, for `cargo xtask
/// bench`: the same checks, and the summary's in-kernel costs.
pub fn boot_one(root: &Path, series: &str, timeout: Duration, w: Workload) -> Result<Outcome> {
    ensure_host_tools()?;
    let base = root.join("target/vm-test");
    let apt = base.join("apt");
    let cache = base.join("cache");
    std::fs::create_dir_all(&cache)?;
    let resolved = resolve(&apt, &[series])?;
    let (_, r) = resolved
        .into_iter()
        .next()
        .context("the kernel series resolved to nothing")?;
    let (pkg, release) = r.map_err(|why| anyhow::anyhow!("{series}: {why}"))?;
    boot(root, &apt, &cache, &pkg, &release, timeout, w)
}
