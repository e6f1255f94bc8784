//! The command line: clap's definition of every subcommand and its flags,
//! and their value parsers; `settings` holds the flags that are also config
//! keys and how they make a `Config`. `main.rs` dispatches; the man pages
//! and completions are generated from this definition (`tracer generate`).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracer::{
    config::{defaults, parse_duration},
    log::writer::parse_time,
};

mod settings;

pub(crate) use settings::{LogArgs, RunArgs, WatchArgs};

#[derive(Parser)]
#[command(
    name = "tracer",
    version = tracer::LONG_VERSION,
    about = "Trace KVM MMU root lifecycles with eBPF and catch vCPUs running with an invalid TDX mirror root",
    term_width = 80,
    max_term_width = 80,
    after_help = "Example:\n  sudo tracer doctor && sudo tracer watch --utc\n\n\
                  Exit codes:\n  0 ok\n  1 findings (replay)\n  2 usage or runtime error\n  \
                  3 unsupported environment (missing CAP_BPF/CAP_PERFMON, no BTF, no KVM)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Inspect this kernel and print the attach plan: probes, attach kinds,
    /// struct offsets, and which features are on or off and why. Loads
    /// nothing.
    #[command(after_help = "Example:\n  tracer doctor --json | jq '.features'")]
    Doctor(DoctorArgs),
    /// Attach the probes and stream root events and findings until Ctrl-C
    /// or --duration, then detach and print a summary with drop counts
    /// (needs root). --record also writes the event log.
    #[command(
        after_help = "Example:\n  sudo tracer watch --utc --min-severity warning --record /tmp/log"
    )]
    Watch(WatchArgs),
    /// The daemon: attach, detect, and record the event log until SIGTERM
    /// or SIGINT; SIGHUP reopens the log and reloads the config (needs
    /// CAP_BPF and CAP_PERFMON).
    #[command(
        after_help = "Example:\n  tracer run --check-config --config /etc/kvm-root-tracer/config.toml"
    )]
    Run(Box<RunArgs>),
    /// Run the detector over recorded events (log folders, segment files,
    /// or `-` for stdin) and print the findings. Exits 1 when there are
    /// findings, 0 when there are none.
    #[command(
        after_help = "Example:\n  tracer replay --since 10m --min-severity warning /var/lib/kvm-root-tracer/log"
    )]
    Replay(ReplayArgs),
    /// Generate the events of a model of KVM's root lifecycle, with a
    /// chosen kernel behaviour, as an event log on stdout (or --record
    /// DIR). Pipe it into `tracer replay -` to see what the detector finds,
    /// or into your alert routing, without a TDX host.
    #[command(
        after_help = "Example:\n  tracer simulate --kernel mirror-freed-by-zap --scenario churn \\\n    | tracer replay -"
    )]
    Simulate(SimulateArgs),
    /// A full-screen live view: VMs (type, vCPUs, load and zap rates,
    /// findings), the selected VM's vCPUs with their direct and mirror roots,
    /// and the latest findings. Keys: q quit, arrows select, s sort, r
    /// reverse, / filter; with --replay, space pauses and +/- change speed.
    #[command(
        after_help = "Example:\n  tracer top --replay /var/lib/kvm-root-tracer/log --speed 100"
    )]
    Top(TopArgs),
    /// Man pages and shell completions, from this CLI's definition (used
    /// by `cargo xtask dist` for the Debian package).
    #[command(hide = true, subcommand)]
    Generate(Generate),
}

#[derive(Subcommand)]
pub(crate) enum Generate {
    /// Write tracer.1 and tracer-COMMAND.1 into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the completion script for SHELL.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
pub(crate) struct TopArgs {
    /// Show a recorded log (file, folder of segments, or `-`) instead of
    /// attaching to this kernel; no root needed.
    #[arg(long, value_name = "LOG", num_args = 1..)]
    pub(crate) replay: Vec<PathBuf>,
    /// Replay speed: log seconds per wall second (0.125 to 1048576).
    #[arg(long, default_value_t = 1.0, value_parser = parse_speed)]
    pub(crate) speed: f64,
    /// Size of the event ring buffer in bytes (live): a power of two, at
    /// least 4096.
    #[arg(long, value_name = "BYTES", default_value = defaults::RINGBUF_SIZE, value_parser = parse_ringbuf)]
    pub(crate) ringbuf_size: u32,
    /// With --replay: print the screen of this size (COLSxROWS) at the log's
    /// end as text, without a terminal (for bug reports and docs).
    #[arg(long, value_name = "COLSxROWS", requires = "replay", value_parser = parse_screen)]
    pub(crate) snapshot: Option<(u16, u16)>,
}

pub(crate) fn parse_screen(s: &str) -> Result<(u16, u16), String> {
    let parse = |v: &str| v.parse::<u16>().ok().filter(|n| (16..=1000).contains(n));
    s.split_once('x')
        .and_then(|(w, h)| Some((parse(w)?, parse(h)?)))
        .ok_or_else(|| format!("`{s}` is not COLSxROWS with each from 16 to 1000, e.g. 110x34"))
}

pub(crate) fn parse_speed(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (tracer::top::MIN_SPEED..=tracer::top::MAX_SPEED).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside {}..={}",
            tracer::top::MIN_SPEED,
            tracer::top::MAX_SPEED
        ))
    }
}

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// Print the plan as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also load every eBPF program, without attaching it, so this kernel's
    /// verifier checks each one (needs root).
    #[arg(long)]
    pub(crate) verify: bool,
    /// Inspect the kernel files below this directory instead of `/` (for
    /// captured kernels; see tracer/tests/data/kernels).
    #[arg(long, value_name = "DIR", hide = true)]
    pub(crate) root: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ReplayArgs {
    /// Event logs to read, in order: folders (their segments, oldest
    /// first), segment files (`.jsonl`, `.jsonl.zst`, `.jsonl.gz`), or `-`
    /// for stdin (the default when stdin is a pipe).
    #[arg(value_name = "FILE|DIR")]
    pub(crate) inputs: Vec<PathBuf>,
    /// Print findings (or the timeline) as JSON lines.
    #[arg(long)]
    pub(crate) json: bool,
    /// Print the root history of the selected vCPU(s) instead of findings.
    #[arg(long)]
    pub(crate) timeline: bool,
    /// Only the VM created by this VMM thread (`kvm->userspace_pid`).
    #[arg(long)]
    pub(crate) pid: Option<i32>,
    /// Only the VM with this `struct kvm` pointer (hex).
    #[arg(long, value_parser = parse_hex)]
    pub(crate) kvm: Option<u64>,
    /// Only this vCPU id.
    #[arg(long)]
    pub(crate) vcpu: Option<i32>,
    /// From this time: RFC 3339 (2026-11-28T04:14:21Z,
    /// 2026-11-28T05:14:21+01:00), a date (2026-11-28), epoch seconds, or a
    /// duration back from the log's last event (10m, 2h).
    #[arg(long, value_name = "TIME", value_parser = parse_when)]
    pub(crate) since: Option<When>,
    /// Until this time (same forms).
    #[arg(long, value_name = "TIME", value_parser = parse_when)]
    pub(crate) until: Option<When>,
    /// Show and count only findings of at least this severity (info,
    /// warning, error, critical); exit 1 only for those. Default: info
    /// (every finding), so a script that pages on exit 1 should say
    /// `--min-severity warning` to skip a memslot loop's zap_storm.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = tracer::detector::Severity::parse)]
    pub(crate) min_severity: tracer::detector::Severity,
    #[command(flatten)]
    pub(crate) human: HumanArgs,
}

/// How readable output looks.
#[derive(Args, Clone, Copy)]
#[command(next_help_heading = "Output")]
pub(crate) struct HumanArgs {
    /// Times in UTC (RFC 3339) instead of the local time zone.
    #[arg(long, conflicts_with = "mono")]
    pub(crate) utc: bool,
    /// Times as monotonic seconds since boot, as the kernel stamps them.
    #[arg(long)]
    pub(crate) mono: bool,
    /// Every field of each event (task, kvm pointer, roles, arguments).
    #[arg(long)]
    pub(crate) wide: bool,
    /// Colour: auto (a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, value_name = "WHEN", value_enum, default_value = "auto")]
    pub(crate) color: tracer::human::ColorChoice,
}

impl HumanArgs {
    pub(crate) fn style(self) -> tracer::human::Style {
        use tracer::human::TimeStyle;
        tracer::human::Style {
            time: if self.mono {
                TimeStyle::Mono
            } else if self.utc {
                TimeStyle::Utc
            } else {
                TimeStyle::Local
            },
            wide: self.wide,
            color: self.color.enabled(),
        }
    }
}

/// A `--since`/`--until` value: a wall-clock time, or a duration back from
/// the log's end.
#[derive(Clone, Copy, Debug)]
pub(crate) enum When {
    At(u64),
    Ago(Duration),
}

impl When {
    pub(crate) fn at(self) -> Option<u64> {
        match self {
            Self::At(t) => Some(t),
            Self::Ago(_) => None,
        }
    }

    pub(crate) fn ago(self) -> Option<Duration> {
        match self {
            Self::Ago(d) => Some(d),
            Self::At(_) => None,
        }
    }
}

pub(crate) fn parse_when(s: &str) -> Result<When, String> {
    // "10m", "2h", "90s": a duration; a bare number stays epoch seconds.
    if s.ends_with(|c: char| c.is_ascii_alphabetic())
        && !s.ends_with('Z')
        && let Ok(d) = parse_duration(s)
    {
        return Ok(When::Ago(d));
    }
    parse_time(s).map(When::At)
}

#[derive(Args)]
pub(crate) struct SimulateArgs {
    /// The kernel behaviour to model.
    #[arg(long, value_enum, default_value = "mainline")]
    pub(crate) kernel: tracer::model::Behaviour,
    /// The workload.
    #[arg(long, value_enum, default_value = "steady")]
    pub(crate) scenario: tracer::model::Scenario,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub(crate) vcpus: u16,
    /// Rounds of the workload.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) rounds: u32,
    /// Seed: the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Record through the same pipeline as `watch --record` (detector,
    /// event log, incident files) instead of printing the events.
    #[arg(long, value_name = "DIR")]
    pub(crate) record: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) log: LogArgs,
}

pub(crate) fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{s:?} is not a hex pointer like 0xffff888100000000"))
}

pub(crate) fn parse_ringbuf(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringbuf_size_must_be_power_of_two() {
        assert_eq!(parse_ringbuf("4096"), Ok(4096));
        assert!(parse_ringbuf("4095").is_err());
        assert!(parse_ringbuf("6000").is_err());
        assert!(parse_ringbuf("2048").is_err());
    }
}
