//! Booting one kernel in QEMU (TCG, `-cpu max`, a hard timeout) with its
//! serial console captured, a second serial port for the host's answers, and
//! the gdbstub the fault injection writes through.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::{
    Workload,
    checks::{Outcome, check, check_injection, sections},
    initramfs::build_initramfs,
    kernels::{fetch, kvm_modules, vmlinuz},
};
use crate::{free_port, inject};

/// Boots one kernel and checks it.
pub(super) fn boot(
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
