//! The command line: clap's definition of every subcommand and its flags,
//! their value parsers, and how `run`'s flags merge over its config file.
//! `main.rs` dispatches; the man pages and completions are generated from
//! this definition (`tracer generate`).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracer::{
    Failure,
    config::{
        Config, Invalid, defaults, parse_compression, parse_duration, parse_fsync, parse_size,
    },
    daemon::RecordOptions,
    log::writer::{FsyncPolicy, parse_time},
};

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
    #[cfg(feature = "top")]
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

#[cfg(feature = "top")]
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

#[cfg(feature = "top")]
pub(crate) fn parse_screen(s: &str) -> Result<(u16, u16), String> {
    let parse = |v: &str| v.parse::<u16>().ok().filter(|n| (16..=1000).contains(n));
    s.split_once('x')
        .and_then(|(w, h)| Some((parse(w)?, parse(h)?)))
        .ok_or_else(|| format!("`{s}` is not COLSxROWS with each from 16 to 1000, e.g. 110x34"))
}

#[cfg(feature = "top")]
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
pub(crate) struct ProbeArgs {
    /// Size of the event ring buffer in bytes: a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", default_value = defaults::RINGBUF_SIZE, value_parser = parse_ringbuf)]
    pub(crate) ringbuf_size: u32,
    /// Wake the reader only once this many bytes wait in the ring buffer
    /// (0: on every event); the forbidden TDX state always wakes it.
    #[arg(long, value_name = "BYTES", default_value = defaults::WAKEUP_BYTES)]
    pub(crate) wakeup_bytes: u32,
    /// Drain the ring buffer at least this often (1ms to 10s).
    #[arg(long, value_name = "TIME", default_value = defaults::POLL_INTERVAL, value_parser = parse_duration)]
    pub(crate) poll_interval: Duration,
    /// Don't report each vCPU's first guest entry with new roots; the
    /// kvm_entry gate then only reports the forbidden TDX state.
    #[arg(long)]
    pub(crate) no_entry_transitions: bool,
    /// Also attach an empty program beside each probe, on the same hook, and
    /// report each probe's in-kernel cost per hit against it at exit.
    #[arg(long)]
    pub(crate) baseline: bool,
}

#[derive(Args)]
pub(crate) struct WatchArgs {
    /// Print events as JSON lines instead of readable lines.
    #[arg(long)]
    pub(crate) json: bool,
    /// Stop after this long, e.g. 30s, 500ms, 5m.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Also record the event log in this folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) record: Option<PathBuf>,
    /// Print only findings of at least this severity (info, warning, error,
    /// critical); the log records every one.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = tracer::detector::Severity::parse)]
    pub(crate) min_severity: tracer::detector::Severity,
    #[command(flatten)]
    pub(crate) human: HumanArgs,
    #[command(flatten)]
    pub(crate) probes: ProbeArgs,
    #[command(flatten)]
    pub(crate) log: LogArgs,
}

#[derive(Args, Clone)]
pub(crate) struct RunArgs {
    /// TOML config file (dist/config.toml documents every key and its
    /// default); every key is also a flag below, and flags win. SIGHUP
    /// reads it again: [alertmanager], [findings] and the metrics web
    /// config change live; other keys are named in a warning.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Check the config (and the files it names: web config, CA file,
    /// secrets), print a summary and exit: 0 if it is valid, 2 if not.
    #[arg(long)]
    pub(crate) check_config: bool,
    /// Stop after this long (for tests); by default run until signalled.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Feed the events of these recorded logs into the live pipeline after
    /// attaching, e.g. a `tracer simulate` log, to try alert routing.
    #[arg(long, value_name = "FILE|DIR")]
    pub(crate) inject: Vec<PathBuf>,
    /// [log] dir: folder of the event log.
    #[arg(long, value_name = "DIR")]
    pub(crate) log_dir: Option<PathBuf>,
    /// [log] segment_size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) segment_size: Option<u64>,
    /// [log] segment_age.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub(crate) segment_age: Option<Duration>,
    /// [log] max_files.
    #[arg(long, value_name = "N")]
    pub(crate) max_files: Option<usize>,
    /// [log] max_total_size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) max_total_size: Option<u64>,
    /// [log] min_free.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) min_free: Option<u64>,
    /// [log] fsync: never, always, or an interval.
    #[arg(long, value_name = "POLICY", value_parser = parse_fsync)]
    pub(crate) fsync: Option<FsyncPolicy>,
    /// [log] compress = false.
    #[arg(long)]
    pub(crate) no_compress: bool,
    /// [log] compression: zstd or gzip.
    #[arg(long, value_name = "CODEC", value_parser = parse_compression)]
    pub(crate) compression: Option<tracer::log::writer::Compression>,
    /// [log] flight_events.
    #[arg(long, value_name = "N")]
    pub(crate) flight_events: Option<usize>,
    /// [probes] ringbuf_size.
    #[arg(long, value_name = "BYTES")]
    pub(crate) ringbuf_size: Option<u32>,
    /// [probes] wakeup_bytes.
    #[arg(long, value_name = "BYTES")]
    pub(crate) wakeup_bytes: Option<u32>,
    /// [probes] poll_interval.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub(crate) poll_interval: Option<Duration>,
    /// [probes] entry_transitions = false.
    #[arg(long)]
    pub(crate) no_entry_transitions: bool,
    /// [metrics] listen: address of GET /metrics ("" disables).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,
    /// [metrics] web_config_file: exporter-toolkit web config (TLS, basic
    /// auth) of the metrics endpoint.
    #[arg(long, value_name = "FILE")]
    pub(crate) web_config_file: Option<PathBuf>,
    /// [alertmanager] urls: http[s]://host:port; repeat for each replica of
    /// an HA cluster (every alert goes to each).
    #[arg(long, value_name = "URL")]
    pub(crate) alertmanager_url: Vec<String>,
    /// [alertmanager] ca_file: CA certificates (PEM) for https:// URLs.
    #[arg(long, value_name = "FILE")]
    pub(crate) alertmanager_ca_file: Option<PathBuf>,
    /// [alertmanager] bearer_token_file.
    #[arg(long, value_name = "FILE")]
    pub(crate) alertmanager_bearer_token_file: Option<PathBuf>,
    /// [alertmanager] timeout.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub(crate) alertmanager_timeout: Option<Duration>,
    /// [alertmanager] attempts.
    #[arg(long, value_name = "N")]
    pub(crate) alertmanager_attempts: Option<u32>,
    /// [alertmanager] queue.
    #[arg(long, value_name = "N")]
    pub(crate) alertmanager_queue: Option<usize>,
    /// [alertmanager] host: the `host` label.
    #[arg(long, value_name = "NAME")]
    pub(crate) alert_host: Option<String>,
    /// [findings] output: `-` (stdout) or a file, JSON lines.
    #[arg(long, value_name = "FILE")]
    pub(crate) findings_out: Option<String>,
}

impl RunArgs {
    /// The config file (or the defaults), with the flags applied on top.
    pub(crate) fn config(&self) -> Result<Config, Failure> {
        let mut c = match &self.config {
            Some(path) => Config::load(path).map_err(|e| Failure::from(anyhow::Error::new(e)))?,
            None => Config::default(),
        };
        macro_rules! set {
            ($field:expr, $flag:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(c.log.dir, self.log_dir);
        set!(c.log.segment_size, self.segment_size);
        set!(c.log.segment_age, self.segment_age);
        set!(c.log.max_files, self.max_files);
        set!(c.log.max_total_size, self.max_total_size);
        set!(c.log.min_free, self.min_free);
        set!(c.log.fsync, self.fsync);
        set!(c.log.flight_events, self.flight_events);
        set!(c.probes.ringbuf_size, self.ringbuf_size);
        set!(c.probes.wakeup_bytes, self.wakeup_bytes);
        set!(c.probes.poll_interval, self.poll_interval);
        set!(c.metrics.listen, self.metrics_listen);
        set!(c.metrics.web_config_file, self.web_config_file);
        if !self.alertmanager_url.is_empty() {
            c.alertmanager.url.clear();
            c.alertmanager.urls.clone_from(&self.alertmanager_url);
        }
        set!(c.alertmanager.ca_file, self.alertmanager_ca_file);
        set!(
            c.alertmanager.bearer_token_file,
            self.alertmanager_bearer_token_file
        );
        set!(c.alertmanager.timeout, self.alertmanager_timeout);
        set!(c.alertmanager.attempts, self.alertmanager_attempts);
        set!(c.alertmanager.queue, self.alertmanager_queue);
        set!(c.alertmanager.host, self.alert_host);
        set!(c.findings.output, self.findings_out);
        set!(c.log.compression, self.compression);
        if self.no_compress {
            c.log.compress = false;
        }
        if self.no_entry_transitions {
            c.probes.entry_transitions = false;
        }
        c.validate().map_err(flag_error)?;
        Ok(c)
    }
}

#[derive(Args)]
#[command(next_help_heading = "Event log")]
pub(crate) struct LogArgs {
    /// Rotate a segment when it reaches this size (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = defaults::SEGMENT_SIZE, value_parser = parse_size)]
    pub(crate) segment_size: u64,
    /// Rotate a segment when it is this old.
    #[arg(long, value_name = "TIME", default_value = defaults::SEGMENT_AGE, value_parser = parse_duration)]
    pub(crate) segment_age: Duration,
    /// Keep at most this many segments.
    #[arg(long, value_name = "N", default_value = defaults::MAX_FILES, value_parser = clap::value_parser!(u32).range(2..))]
    pub(crate) max_files: u32,
    /// Keep at most this many bytes of segments (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = defaults::MAX_TOTAL_SIZE, value_parser = parse_size)]
    pub(crate) max_total_size: u64,
    /// Stop recording (counting what is lost) below this much free disk.
    #[arg(long, value_name = "SIZE", default_value = defaults::MIN_FREE, value_parser = parse_size)]
    pub(crate) min_free: u64,
    /// When to fsync: `never`, `always` (every batch), or an interval such
    /// as `1s`.
    #[arg(long, value_name = "POLICY", default_value = defaults::FSYNC, value_parser = parse_fsync)]
    pub(crate) fsync: FsyncPolicy,
    /// Keep closed segments uncompressed.
    #[arg(long)]
    pub(crate) no_compress: bool,
    /// Compress closed segments with zstd, or gzip (what log shippers read).
    #[arg(long, value_name = "CODEC", default_value = defaults::COMPRESSION, value_parser = parse_compression)]
    pub(crate) compression: tracer::log::writer::Compression,
    /// Events kept per VM for incident files written when a finding fires
    /// (0: no incident files).
    #[arg(long, value_name = "N", default_value = defaults::FLIGHT_EVENTS)]
    pub(crate) flight_events: usize,
}

impl LogArgs {
    /// These flags over `c.log`.
    fn apply(&self, c: &mut tracer::config::LogConfig) {
        c.segment_size = self.segment_size;
        c.segment_age = self.segment_age;
        c.max_files = self.max_files as usize;
        c.max_total_size = self.max_total_size;
        c.min_free = self.min_free;
        c.fsync = self.fsync;
        c.compress = !self.no_compress;
        c.compression = self.compression;
        c.flight_events = self.flight_events;
    }

    /// The event log's options with these flags, checked by the config's
    /// validator.
    pub(crate) fn options(&self, dir: PathBuf) -> Result<RecordOptions, Failure> {
        let mut c = Config::default();
        self.apply(&mut c.log);
        c.validate().map_err(flag_error)?;
        Ok(RecordOptions {
            dir,
            config: c.log.record_config(),
            flight_events: c.log.flight_events,
        })
    }
}

impl WatchArgs {
    /// The defaults with `watch`'s flags over them, checked by the
    /// config's validator like `run`'s.
    pub(crate) fn config(&self) -> Result<Config, Failure> {
        let mut c = Config::default();
        self.log.apply(&mut c.log);
        c.probes.ringbuf_size = self.probes.ringbuf_size;
        c.probes.wakeup_bytes = self.probes.wakeup_bytes;
        c.probes.poll_interval = self.probes.poll_interval;
        c.probes.entry_transitions = !self.probes.no_entry_transitions;
        c.validate().map_err(flag_error)?;
        Ok(c)
    }
}

/// A setting the validator refused, named by its flag (and its key, for
/// a config over which the flags went).
fn flag_error(Invalid { key, reason }: Invalid) -> Failure {
    let (section, name) = key.split_once('.').unwrap_or(("", key));
    let flag = match (section, name) {
        ("log", "dir") => "log-dir".to_owned(),
        ("alertmanager", "urls") => "alertmanager-url".to_owned(),
        ("alertmanager", "host") => "alert-host".to_owned(),
        ("alertmanager", n) => format!("alertmanager-{}", n.replace('_', "-")),
        ("metrics", "listen") => "metrics-listen".to_owned(),
        ("findings", "output") => "findings-out".to_owned(),
        (_, n) => n.replace('_', "-"),
    };
    Failure::from(anyhow::anyhow!("flag `--{flag}` (key `{key}`): {reason}"))
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

    fn watch(flags: &[&str]) -> WatchArgs {
        let argv = ["tracer", "watch"].iter().chain(flags);
        let Cli {
            command: Command::Watch(parsed),
        } = Cli::try_parse_from(argv).unwrap()
        else {
            panic!("not watch")
        };
        parsed
    }

    /// `watch`'s flags default to what `tracer run` (its config's
    /// defaults, which `dist/config.toml` is tested equal to) does.
    #[test]
    fn watch_flags_default_to_the_configs_defaults() {
        let args = watch(&[]);
        let c = Config::default();
        assert_eq!(args.config().unwrap(), c);
        let record = args.log.options(PathBuf::from("/log")).unwrap();
        assert_eq!(record.config, c.log.record_config());
        assert_eq!(record.flight_events, c.log.flight_events);
        assert_eq!(args.probes.ringbuf_size, c.probes.ringbuf_size);
        assert_eq!(args.probes.wakeup_bytes, c.probes.wakeup_bytes);
        assert_eq!(args.probes.poll_interval, c.probes.poll_interval);
        assert_eq!(
            !args.probes.no_entry_transitions,
            c.probes.entry_transitions
        );
    }

    /// `watch`'s and `simulate`'s log flags go through the config's one
    /// validator: before, `watch --segment-size 1` was taken (a segment
    /// per record) while the same value in a config file was refused.
    #[test]
    fn watch_flags_are_checked_by_the_configs_validator() {
        for (flags, flag, key) in [
            (
                &["--segment-size", "1"][..],
                "--segment-size",
                "log.segment_size",
            ),
            (
                &["--segment-age", "1ms"],
                "--segment-age",
                "log.segment_age",
            ),
            (
                &["--flight-events", "1000000"],
                "--flight-events",
                "log.flight_events",
            ),
            (
                &["--wakeup-bytes", "4194304"],
                "--wakeup-bytes",
                "probes.wakeup_bytes",
            ),
        ] {
            let args = watch(flags);
            let e = format!("{:#}", args.config().unwrap_err().error);
            assert!(
                e.contains(&format!("flag `{flag}` (key `{key}`)")),
                "{flags:?}: {e}"
            );
        }
        let args = watch(&["--segment-size", "1"]);
        assert!(args.log.options(PathBuf::from("/log")).is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!(parse_fsync("never"), Ok(FsyncPolicy::Never));
        assert_eq!(parse_fsync("always"), Ok(FsyncPolicy::Always));
        assert_eq!(
            parse_fsync("250ms"),
            Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
        );
        assert!(parse_fsync("sometimes").is_err());
    }

    #[test]
    fn ringbuf_size_must_be_power_of_two() {
        assert_eq!(parse_ringbuf("4096"), Ok(4096));
        assert!(parse_ringbuf("4095").is_err());
        assert!(parse_ringbuf("6000").is_err());
        assert!(parse_ringbuf("2048").is_err());
    }
}
