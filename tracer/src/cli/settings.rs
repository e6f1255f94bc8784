//! The flags that are also config keys, and how each command builds its
//! `Config` from them: `run` over its file (or the defaults), `watch` and
//! `simulate` over the defaults; one validator for all, its errors named by
//! flag and key.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use tracer::{
    Failure,
    config::{
        Config, Invalid, defaults, parse_compression, parse_duration, parse_fsync, parse_size,
    },
    daemon::RecordOptions,
    log::writer::FsyncPolicy,
};

use super::{HumanArgs, parse_ringbuf};

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
    /// Attach the kvm_entry gate as a raw tracepoint even where the kernel
    /// allows a BTF-enabled tracepoint (tp_btf), which reads the roots with
    /// direct loads.
    #[arg(long)]
    pub(crate) no_entry_gate_btf: bool,
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
#[expect(
    clippy::struct_excessive_bools,
    reason = "clap flags: each bool is one switch on the command line"
)]
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
    /// [probes] entry_gate_btf = false.
    #[arg(long)]
    pub(crate) no_entry_gate_btf: bool,
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
        if self.no_entry_gate_btf {
            c.probes.entry_gate_btf = false;
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
        Ok(RecordOptions::new(dir, &c.log))
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
        c.probes.entry_gate_btf = !self.probes.no_entry_gate_btf;
        c.validate().map_err(flag_error)?;
        Ok(c)
    }
}

/// A setting the validator refused, named by its flag (and its key, for
/// a config over which the flags went).
pub(super) fn flag_error(Invalid { key, reason }: Invalid) -> Failure {
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

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
}
