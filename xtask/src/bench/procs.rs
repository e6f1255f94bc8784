//! Processes the bench starts and measures: a tracer daemon with its
//! stderr captured, its CPU time, RSS and peak, the kernel's per-program BPF
//! run time, and a scrape of its metrics.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// A tracer (or bpftrace) process with its stderr in a file.
pub(super) struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    pub(super) fn spawn(cmd: &mut Command, stdout: Stdio, stderr: &Path) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(stderr)?)
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        Ok(Self {
            child,
            stderr: stderr.to_path_buf(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `file` contains `needle` (or the process exits).
    pub(super) fn wait_for(&mut self, file: &Path, needle: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if std::fs::read_to_string(file).is_ok_and(|s| s.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "exited ({status}) before {needle:?}:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            if started.elapsed() > timeout {
                bail!("no {needle:?} after {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(super) fn wait_attached(&mut self) -> Result<()> {
        let stderr = self.stderr.clone();
        self.wait_for(&stderr, "probe(s) in", Duration::from_mins(1))
    }

    /// Sends `signal`, waits (at most `timeout`), returns stderr.
    pub(super) fn stop_within(mut self, signal: i32, timeout: Duration) -> Result<String> {
        let pid = i32::try_from(self.pid()).context("pid")?;
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(pid, signal) };
        let started = Instant::now();
        let status = wait_timeout(&mut self.child, timeout)
            .with_context(|| format!("{} after the signal", self.stderr.display()))?;
        eprintln!(
            "bench: pid {pid} exited {:.1} s after signal {signal}",
            started.elapsed().as_secs_f64()
        );
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if !status.success() {
            bail!("exited with {status}:\n{err}");
        }
        Ok(err)
    }

    pub(super) fn stop(self, signal: i32) -> Result<String> {
        self.stop_within(signal, Duration::from_secs(30))
    }

    /// User + system CPU seconds so far.
    pub(super) fn cpu_s(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }
}

impl Drop for Proc {
    /// A section that failed half-way leaves nothing running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(super) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            bail!("did not exit within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// utime + stime of a live process, from /proc/PID/stat.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may hold spaces.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// VmRSS and VmHWM of a process, in KiB.
pub(super) fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get = |key: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("bad status line")?
            .parse()?)
    };
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}

/// Total run time (ns) and run count of the BPF programs a process holds,
/// from /proc/PID/fdinfo (the kernel's BPF stats must be on).
pub(super) fn bpf_run_time(pid: u32) -> Result<(u64, u64)> {
    let (mut ns, mut runs) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        for line in info.lines() {
            if let Some(v) = line.strip_prefix("run_time_ns:") {
                ns += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("run_cnt:") {
                runs += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((ns, runs))
}

/// The last JSON line of `text` with `"record":"summary"`.
pub(super) fn summary(text: &str) -> Result<Value> {
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["record"] == "summary")
        .context("no summary record")
}

pub(super) fn tracer_cmd(tracer: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(tracer);
    c.args(args);
    c
}

/// `tracer simulate ARGS --record DIR` into a fresh `dir`.
pub(super) fn simulate(tracer: &Path, dir: &Path, args: &[&str]) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    crate::run(
        tracer_cmd(tracer, &["simulate"])
            .args(args)
            .arg("--record")
            .arg(dir)
            .stdout(Stdio::null()),
    )?;
    Ok(())
}

/// `tracer run` with its log in a fresh `work/NAME` and its stderr in
/// `work/NAME.err`, plus `args`; returns once every probe is attached.
pub(super) fn daemon(tracer: &Path, work: &Path, name: &str, args: &[&str]) -> Result<Proc> {
    let log = work.join(name);
    let _ = std::fs::remove_dir_all(&log);
    let mut t = Proc::spawn(
        tracer_cmd(tracer, &["run", "--log-dir"])
            .arg(&log)
            .args(args),
        Stdio::null(),
        &work.join(format!("{name}.err")),
    )?;
    t.wait_attached()?;
    Ok(t)
}

/// One metric's value from the daemon's /metrics.
pub(super) fn scrape(port: u16, metric: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| {
        l.strip_prefix(metric)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
