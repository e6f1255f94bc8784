//! Fault injection into a running guest kernel, for `cargo xtask vm-test`:
//! a small client of QEMU's gdbstub (the gdb remote serial protocol over
//! TCP; no gdb binary needed) and the injection steps.
//!
//! The forbidden state is made in real kernel memory, under a real L2 guest
//! that keeps exiting on `hlt` and re-entering:
//! 1. `kvm->arch.vm_type = 5` (KVM_X86_TDX_VM) on a default VM: its vCPUs
//!    now enter as "TDX" vCPUs with a valid `root.hpa` and an INVALID
//!    `mirror_root_hpa`;
//! 2. where the kernel shows `vmemmap_base`: each vCPU's `mirror_root_hpa`
//!    set to its own (valid) direct root, then `role.invalid` set on that
//!    root's `struct kvm_mmu_page`: a stale mirror root;
//! 3. everything restored, in one halt, before the VM is torn down (always,
//!    even when a check failed).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A connection to QEMU's gdbstub.
pub struct Gdb {
    s: TcpStream,
}

impl Gdb {
    pub fn connect(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to QEMU's gdbstub on port {port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Self { s })
    }

    /// Sends one packet and returns the stub's answer (acknowledged). A
    /// late stop reply (`T…`/`S…`) is not the answer: it is skipped.
    fn packet(&mut self, body: &str) -> Result<String> {
        let sum = body.bytes().fold(0u8, u8::wrapping_add);
        self.s.write_all(format!("${body}#{sum:02x}").as_bytes())?;
        loop {
            let a = self.answer()?;
            if !(a.starts_with('T') || a.starts_with('S')) || a.len() < 3 {
                return Ok(a);
            }
        }
    }

    /// Reads one `$…#xx` packet, skipping acks, and acknowledges it.
    fn answer(&mut self) -> Result<String> {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        let mut started = false;
        loop {
            self.s
                .read_exact(&mut byte)
                .context("reading from the gdbstub")?;
            match byte[0] {
                b'$' if !started => started = true,
                b'#' if started => {
                    let mut sum = [0u8; 2];
                    self.s.read_exact(&mut sum)?;
                    self.s.write_all(b"+")?;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                b if started => out.push(b),
                _ => {}
            }
        }
    }

    /// Stops every vCPU of the guest.
    pub fn halt(&mut self) -> Result<()> {
        self.s.write_all(&[0x03])?;
        // A late answer to an earlier request may come first: skip it.
        for _ in 0..4 {
            let stop = self.answer()?;
            if stop.starts_with('T') || stop.starts_with('S') {
                return Ok(());
            }
        }
        bail!("the gdbstub never answered a halt with a stop reply")
    }

    /// Lets the guest run again (no answer until it stops).
    pub fn resume(&mut self) -> Result<()> {
        let sum = b'c';
        self.s.write_all(format!("$c#{sum:02x}").as_bytes())?;
        Ok(())
    }

    fn mode(&mut self, physical: bool) -> Result<()> {
        let a = self.packet(&format!("Qqemu.PhyMemMode:{}", u8::from(physical)))?;
        if a != "OK" {
            bail!("Qqemu.PhyMemMode answered {a:?}");
        }
        Ok(())
    }

    fn read(&mut self, addr: u64, len: usize, physical: bool) -> Result<Vec<u8>> {
        self.mode(physical)?;
        let a = self.packet(&format!("m{addr:x},{len:x}"))?;
        if a.len() != len * 2 || a.starts_with('E') {
            bail!("reading {len} bytes at {addr:#x} (physical: {physical}): {a:?}");
        }
        (0..len)
            .map(|i| u8::from_str_radix(&a[i * 2..i * 2 + 2], 16).context("hex"))
            .collect()
    }

    fn write(&mut self, addr: u64, bytes: &[u8], physical: bool) -> Result<()> {
        self.mode(physical)?;
        let hex = bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        let a = self.packet(&format!("M{addr:x},{:x}:{hex}", bytes.len()))?;
        if a != "OK" {
            bail!("writing {} bytes at {addr:#x}: {a:?}", bytes.len());
        }
        Ok(())
    }

    pub fn read_u64(&mut self, addr: u64, physical: bool) -> Result<u64> {
        let b = self.read(addr, 8, physical)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    pub fn read_u32(&mut self, addr: u64, physical: bool) -> Result<u32> {
        let b = self.read(addr, 4, physical)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn read_u8(&mut self, addr: u64, physical: bool) -> Result<u8> {
        Ok(self.read(addr, 1, physical)?[0])
    }

    pub fn write_u64(&mut self, addr: u64, v: u64, physical: bool) -> Result<()> {
        self.write(addr, &v.to_le_bytes(), physical)
    }

    pub fn write_u32(&mut self, addr: u64, v: u32, physical: bool) -> Result<()> {
        self.write(addr, &v.to_le_bytes(), physical)
    }

    pub fn write_u8(&mut self, addr: u64, v: u8, physical: bool) -> Result<()> {
        self.write(addr, &[v], physical)
    }
}

/// The start of the kernel's direct map, from a pointer into it: with
/// `nokaslr`, 0xff11000000000000 under 5-level paging (QEMU's `-cpu max`
/// offers LA57) and 0xffff888000000000 under 4-level.
pub fn direct_map_base(ptr: u64) -> Option<u64> {
    match ptr >> 48 {
        0xff11 => Some(0xff11_0000_0000_0000),
        0xffff if (0xffff_8880_0000_0000..0xffff_c880_0000_0000).contains(&ptr) => {
            Some(0xffff_8880_0000_0000)
        }
        _ => None,
    }
}

/// `__START_KERNEL_map`: the kernel image's mapping of physical 0.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Kernel virtual → guest physical, walked in physical mode through the
/// kernel's own page tables (`init_top_pgt`), so nothing depends on which
/// page tables the halted CPU was using (it may be running the nested
/// guest). `struct kvm` is vmalloc'ed on some kernels, `struct page` lives
/// in vmemmap: neither is in the direct map.
#[derive(Clone, Copy, Debug)]
pub struct Walker {
    /// Physical address of the top-level table.
    top: u64,
    /// 5 (LA57) or 4.
    levels: u32,
    /// Where the direct map starts (a shortcut for its addresses).
    direct_base: u64,
    phys_base: u64,
}

impl Walker {
    /// From the kernel's `init_top_pgt` and `phys_base` and a pointer into
    /// the direct map.
    pub fn new(g: &mut Gdb, ksyms: &[(String, u64)], direct_ptr: u64) -> Result<Self> {
        let sym = |n: &str| ksyms.iter().find(|(k, _)| k == n).map(|(_, a)| *a);
        let direct_base =
            direct_map_base(direct_ptr).context("a vCPU pointer is not in the direct map")?;
        let levels = if direct_base == 0xff11_0000_0000_0000 {
            5
        } else {
            4
        };
        let phys_base = match sym("phys_base") {
            Some(a) => g.read_u64(a - START_KERNEL_MAP, true)?,
            None => 0,
        };
        let top = sym("init_top_pgt").context("init_top_pgt is not in kallsyms")?
            - START_KERNEL_MAP
            + phys_base;
        Ok(Self {
            top,
            levels,
            direct_base,
            phys_base,
        })
    }

    /// Reads the u64 at kernel virtual address `virt`.
    pub fn read_u64(&self, g: &mut Gdb, virt: u64) -> Result<u64> {
        let pa = self.phys(g, virt)?;
        g.read_u64(pa, true)
    }

    pub fn phys(&self, g: &mut Gdb, virt: u64) -> Result<u64> {
        if direct_map_base(virt) == Some(self.direct_base) {
            return Ok(virt - self.direct_base);
        }
        if virt >= START_KERNEL_MAP {
            return Ok(virt - START_KERNEL_MAP + self.phys_base);
        }
        let mut table = self.top;
        for level in (0..self.levels).rev() {
            let shift = 12 + 9 * level;
            let idx = (virt >> shift) & 0x1ff;
            let entry = g.read_u64(table + idx * 8, true)?;
            if entry & 1 == 0 {
                bail!(
                    "{virt:#x} is not mapped (level {} entry {entry:#x})",
                    level + 1
                );
            }
            let frame = entry & 0x000f_ffff_ffff_f000;
            // A huge page at the 1 GiB or 2 MiB level.
            if (level == 1 || level == 2) && entry & (1 << 7) != 0 {
                let size = 1u64 << shift;
                return Ok((frame & !(size - 1)) | (virt & (size - 1)));
            }
            table = frame;
        }
        Ok(table | (virt & 0xfff))
    }
}

/// Offsets the injection needs, from `doctor --json` inside the guest.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub vm_type: u64,
    pub arch_mmu: u64,
    pub root_hpa: u64,
    pub mirror_root_hpa: u64,
    /// For the stale root: `sizeof(struct page)`, `page.private`,
    /// `kvm_mmu_page.role`, the `invalid` bit, and `vmemmap_base`'s address.
    pub stale: Option<(u64, u64, u64, u32, u64)>,
}

/// What was changed (physical address, old value), so it can be put back.
#[derive(Default, Debug)]
pub struct Changes {
    pub vm_type: Option<(u64, u8)>,
    pub mirrors: Vec<(u64, u64)>,
    pub role: Option<(u64, u32)>,
}

/// Runs `f` with the guest halted, and lets it run again whatever `f` did.
fn halted<T>(g: &mut Gdb, f: impl FnOnce(&mut Gdb) -> Result<T>) -> Result<T> {
    g.halt()?;
    let r = f(g);
    g.resume()?;
    r
}

/// Step 1: the VM becomes "TDX" (its mirror roots are INVALID_PAGE).
pub fn make_tdx(g: &mut Gdb, w: &Walker, l: &Layout, kvm: u64, c: &mut Changes) -> Result<()> {
    halted(g, |g| {
        let pa = w.phys(g, kvm + l.vm_type)?;
        let old = g.read_u8(pa, true)?;
        if old != 0 {
            bail!("kvm->arch.vm_type reads {old}, not 0 (KVM_X86_DEFAULT_VM)");
        }
        g.write_u8(pa, 5, true)?;
        c.vm_type = Some((pa, old));
        let back = g.read_u8(pa, true)?;
        if back != 5 {
            bail!("kvm->arch.vm_type reads {back} after writing 5");
        }
        Ok(())
    })
}

/// Step 2a: each vCPU's mirror root points at its direct root (a valid
/// root: the state is legal). Returns the physical address of that root's
/// `kvm_mmu_page.role`.
pub fn give_mirror_roots(
    g: &mut Gdb,
    w: &Walker,
    l: &Layout,
    vcpus: &[u64],
    c: &mut Changes,
) -> Result<Option<u64>> {
    let Some((page_size, private, role, _, vmemmap_sym)) = l.stale else {
        return Ok(None);
    };
    halted(g, |g| {
        let vmemmap = w.read_u64(g, vmemmap_sym)?;
        let mut role_pa = None;
        for &v in vcpus {
            let mmu = w.read_u64(g, v + l.arch_mmu)?;
            let root = w.read_u64(g, mmu + l.root_hpa)?;
            let mirror_pa = w.phys(g, mmu + l.mirror_root_hpa)?;
            let old = g.read_u64(mirror_pa, true)?;
            if old != u64::MAX || root == u64::MAX {
                bail!("vCPU {v:#x}: root {root:#x}, mirror {old:#x}: not (valid, INVALID)");
            }
            let page = vmemmap + (root >> 12) * page_size;
            let sp = w.read_u64(g, page + private)?;
            role_pa = Some(w.phys(g, sp + role)?);
            g.write_u64(mirror_pa, root, true)?;
            c.mirrors.push((mirror_pa, old));
        }
        Ok(role_pa)
    })
}

/// Step 2b: `role.invalid` on that root page: the mirror roots are stale.
pub fn invalidate_root(g: &mut Gdb, l: &Layout, role_pa: u64, c: &mut Changes) -> Result<()> {
    let Some((_, _, _, bit, _)) = l.stale else {
        bail!("no layout for the stale root");
    };
    halted(g, |g| {
        let old = g.read_u32(role_pa, true)?;
        if old & (1 << bit) != 0 {
            bail!("the root page's role {old:#x} is already invalid");
        }
        g.write_u32(role_pa, old | (1 << bit), true)?;
        c.role = Some((role_pa, old));
        Ok(())
    })
}

/// Step 3: everything back, in one halt.
pub fn restore(g: &mut Gdb, c: &mut Changes) -> Result<()> {
    halted(g, |g| {
        if let Some((pa, old)) = c.vm_type.take() {
            g.write_u8(pa, old, true)?;
        }
        if let Some((pa, old)) = c.role.take() {
            g.write_u32(pa, old, true)?;
        }
        for (pa, old) in c.mirrors.drain(..) {
            g.write_u64(pa, old, true)?;
        }
        Ok(())
    })
}

/// Waits until `count(serial)` reaches `n`, or `limit` passes; returns the
/// time it took.
pub fn wait_for(
    serial: &std::path::Path,
    limit: Duration,
    n: usize,
    count: impl Fn(&str) -> usize,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if count(&text) >= n {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// What the injection did, for the checks, the table and results.json.
#[derive(Debug, Default)]
pub struct Report {
    /// Whether the kernel has what the injection needs (mirror roots and
    /// VM types); where not, nothing is injected and nothing may be raised.
    pub applicable: bool,
    pub kvm: String,
    pub vmm_pid: i64,
    pub vcpus: Vec<String>,
    /// Injection → the daemon's `mirror_root_invalid_at_entry` for every
    /// vCPU, on the console.
    pub invalid_latency_ms: Option<f64>,
    /// Whether the stale mirror root was injected (needs `vmemmap_base` in
    /// kallsyms), and → `mirror_root_stale_at_entry` for every vCPU.
    pub stale_injected: bool,
    pub stale_latency_ms: Option<f64>,
    /// Stale findings raised while the mirror roots were valid (before
    /// `role.invalid` was set): must be 0.
    pub stale_too_early: usize,
    pub restored: bool,
    /// Findings on the console before the injection, and after the restore.
    pub findings_before: usize,
    pub findings_after_restore: usize,
    pub errors: Vec<String>,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "applicable": self.applicable,
            "kvm": self.kvm,
            "vmm_pid": self.vmm_pid,
            "vcpus": self.vcpus,
            "invalid_latency_ms": self.invalid_latency_ms,
            "stale_injected": self.stale_injected,
            "stale_latency_ms": self.stale_latency_ms,
            "stale_too_early": self.stale_too_early,
            "restored": self.restored,
            "findings_before": self.findings_before,
            "findings_after_restore": self.findings_after_restore,
            "errors": self.errors,
        })
    }
}

/// Findings of `kind` the daemon printed (JSON lines on the console) after
/// offset `from` of the serial log.
pub fn console_findings(serial: &str, from: usize, kind: Option<&str>) -> usize {
    serial
        .get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains(r#""record":"finding""#))
        .filter(|l| kind.is_none_or(|k| l.contains(&format!(r#""kind":"{k}""#))))
        .count()
}

/// The injection's target, from the guest's `@@VMTEST inject-ready` line.
fn parse_ready(ready: &str, r: &mut Report) {
    for word in ready.split_whitespace() {
        match word.split_once('=') {
            Some(("kvm", v)) => v.clone_into(&mut r.kvm),
            Some(("pid", v)) => r.vmm_pid = v.parse().unwrap_or(-1),
            Some(("vcpus", v)) => {
                r.vcpus = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            _ => {}
        }
    }
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The guest's `@@VMTEST ksym` line: kernel symbols and their addresses.
fn ksyms(serial: &str) -> Vec<(String, u64)> {
    let line = serial
        .lines()
        .find_map(|l| l.strip_prefix("@@VMTEST ksym "))
        .unwrap_or_default();
    line.split_whitespace()
        .collect::<Vec<_>>()
        .chunks(3)
        .filter_map(|c| Some((c.get(2)?.to_string(), hex(c.first()?)?)))
        .collect()
}

/// The offsets from `doctor --json`, and `vmemmap_base` from the guest's
/// kallsyms line; `None` where the kernel lacks mirror roots or VM types.
fn layout(doctor: &serde_json::Value, serial: &str) -> Option<Layout> {
    let field = |name: &str| {
        doctor["fields"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == name))
            .and_then(|f| f["offset"].as_u64())
    };
    let vmemmap = ksyms(serial)
        .into_iter()
        .find(|(n, _)| n == "vmemmap_base")
        .map(|(_, a)| a);
    let stale = (|| {
        Some((
            field("page (sizeof)")?,
            field("page.private")?,
            field("kvm_mmu_page.role")?,
            u32::try_from(field("kvm_mmu_page_role.invalid (bit)")?).ok()?,
            vmemmap?,
        ))
    })();
    Some(Layout {
        vm_type: field("kvm.arch.vm_type")?,
        arch_mmu: field("kvm_vcpu.arch.mmu")?,
        root_hpa: field("kvm_mmu.root.hpa")?,
        mirror_root_hpa: field("kvm_mmu.mirror_root_hpa")?,
        stale,
    })
}

/// The steps, each awaited on the console; the caller restores.
fn inject(
    gdb: &mut Gdb,
    (layout, kvm, vcpus, ksyms): (&Layout, u64, &[u64], &[(String, u64)]),
    (serial, at): (&std::path::Path, usize),
    report: &mut Report,
    changes: &mut Changes,
) -> Result<()> {
    let vcpu_count = vcpus.len();
    let first = *vcpus.first().context("no vCPU to inject into")?;
    // The stub answers memory requests only while the guest is halted.
    let walker = halted(gdb, |g| Walker::new(g, ksyms, first))?;
    make_tdx(gdb, &walker, layout, kvm, changes)?;
    report.invalid_latency_ms = wait_for(serial, Duration::from_secs(90), vcpu_count, |t| {
        console_findings(t, at, Some("mirror_root_invalid_at_entry"))
    })
    .map(|d| d.as_secs_f64() * 1e3);
    if report.invalid_latency_ms.is_none() {
        bail!("no mirror_root_invalid_at_entry for {vcpu_count} vCPU(s) within 90 s");
    }
    if let Some(role_pa) = give_mirror_roots(gdb, &walker, layout, vcpus, changes)? {
        // Let the gate see the legal (valid, valid) pair first: nothing may
        // be raised for it.
        std::thread::sleep(Duration::from_secs(3));
        report.stale_too_early = console_findings(
            &std::fs::read_to_string(serial).unwrap_or_default(),
            at,
            Some("mirror_root_stale_at_entry"),
        );
        invalidate_root(gdb, layout, role_pa, changes)?;
        report.stale_injected = true;
        report.stale_latency_ms = wait_for(serial, Duration::from_secs(90), vcpu_count, |t| {
            console_findings(t, at, Some("mirror_root_stale_at_entry"))
        })
        .map(|d| d.as_secs_f64() * 1e3);
        if report.stale_latency_ms.is_none() {
            bail!("no mirror_root_stale_at_entry for {vcpu_count} vCPU(s) within 90 s");
        }
    }
    Ok(())
}

/// Runs the injection once the guest printed `@@VMTEST inject-ready …`
/// (at byte `at` of the serial log), then tells the guest (on ttyS1,
/// the socket `ctl`) to finish.
pub fn run(
    serial: &std::path::Path,
    at: usize,
    ready: &str,
    doctor: &serde_json::Value,
    port: u16,
    ctl: &std::path::Path,
) -> Report {
    let mut report = Report::default();
    parse_ready(ready, &mut report);
    let text = || std::fs::read_to_string(serial).unwrap_or_default();
    let feature = |name: &str| {
        doctor["features"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == name))
            .is_some_and(|f| f["enabled"] == true)
    };
    report.findings_before = console_findings(&text(), 0, None);
    report.applicable = feature("mirror-root-tracking") && feature("tdx-vm-detection");
    let target = layout(doctor, &text()).zip(hex(&report.kvm));
    match (report.applicable, target) {
        (false, _) => {}
        (true, None) => report.errors.push(format!(
            "can't inject: no layout or kvm pointer ({ready:?})"
        )),
        (true, Some((l, kvm))) => match Gdb::connect(port) {
            Ok(mut g) => {
                let vcpus: Vec<u64> = report.vcpus.iter().filter_map(|v| hex(v)).collect();
                let mut changes = Changes::default();
                let ksyms = ksyms(&text());
                let target = (&l, kvm, vcpus.as_slice(), ksyms.as_slice());
                if let Err(e) = inject(&mut g, target, (serial, at), &mut report, &mut changes) {
                    report.errors.push(format!("{e:#}"));
                }
                // Always put back what was changed, before the VM goes.
                match restore(&mut g, &mut changes) {
                    Ok(()) => report.restored = true,
                    Err(e) => report.errors.push(format!("restoring: {e:#}")),
                }
            }
            Err(e) => report.errors.push(format!("{e:#}")),
        },
    }
    let before_end = console_findings(&text(), 0, None);
    // Nothing may be raised once the state is legal again.
    std::thread::sleep(Duration::from_secs(3));
    report.findings_after_restore = console_findings(&text(), 0, None) - before_end;
    match std::os::unix::net::UnixStream::connect(ctl) {
        Ok(mut s) => {
            let answer: &[u8] = if report.restored || !report.applicable {
                b"done\n"
            } else {
                b"failed\n"
            };
            let _ = s.write_all(answer);
        }
        Err(e) => report
            .errors
            .push(format!("telling the guest to finish: {e}")),
    }
    report
}
