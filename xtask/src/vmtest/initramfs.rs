//! The guest's initramfs: a newc cpio made in memory holding busybox, the
//! kernel's KVM modules, `tracer` (with its libraries when dynamic), the
//! workload, and the init script that runs the checks inside the VM.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use super::Workload;
use crate::run;

/// A newc cpio archive, built in memory.
#[derive(Default)]
pub(super) struct Cpio {
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
pub(super) fn init_script(modules: &[(String, Vec<u8>)], w: Workload) -> String {
    let Workload {
        vcpus,
        churns,
        extra_runs,
        baseline,
        entry_gate_btf,
        inject: _,
    } = w;
    let baseline = match (baseline, entry_gate_btf) {
        (true, true) => " --baseline",
        (true, false) => " --baseline --no-entry-gate-btf",
        (false, true) => "",
        (false, false) => " --no-entry-gate-btf",
    };
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
pub(super) const INJECT_PHASE: &str = r#"
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
pub(super) fn libs(bin: &Path) -> Result<Vec<PathBuf>> {
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

pub(super) fn build_initramfs(
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
