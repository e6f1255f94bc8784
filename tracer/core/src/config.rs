//! The daemon's configuration: a TOML file (`tracer run --config`), every
//! option also a flag (flags win), with documented embedded defaults, so
//! `tracer run` starts with no config at all. Errors name the file, the key
//! and the reason, and are reported before anything attaches.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::log::writer::{FsyncPolicy, RecordConfig};

/// The built-in defaults of the settings that are also flags, written as
/// the flags take them: `--help` shows these strings, the config's defaults
/// are parsed from them, and `dist/config.toml` is tested equal. They exist
/// nowhere else.
pub mod defaults {
    pub const LOG_DIR: &str = "/var/lib/kvm-root-tracer/log";
    pub const SEGMENT_SIZE: &str = "64M";
    pub const SEGMENT_AGE: &str = "1h";
    pub const MAX_FILES: &str = "200";
    pub const MAX_TOTAL_SIZE: &str = "1G";
    pub const MIN_FREE: &str = "512M";
    pub const FSYNC: &str = "1s";
    pub const COMPRESSION: &str = "zstd";
    pub const FLIGHT_EVENTS: &str = "64";
    pub const RINGBUF_SIZE: &str = "4194304";
    /// 64 KiB: about 450 events per wakeup at most.
    pub const WAKEUP_BYTES: &str = "65536";
    /// The longest an event waits below the wakeup threshold.
    pub const POLL_INTERVAL: &str = "100ms";
}

/// A default of [`defaults`], parsed.
fn default_of<T>(parse: impl FnOnce(&str) -> Result<T, String>, text: &str) -> T {
    parse(text).unwrap_or_else(|e| panic!("built-in default {text:?}: {e}"))
}

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

/// The whole file. Unknown keys are errors, so a typo is caught.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log: LogConfig,
    pub probes: ProbesConfig,
    pub metrics: MetricsConfig,
    pub alertmanager: AlertmanagerConfig,
    pub findings: FindingsConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Folder of the event log.
    pub dir: PathBuf,
    #[serde(deserialize_with = "de_size")]
    pub segment_size: u64,
    #[serde(deserialize_with = "de_duration")]
    pub segment_age: Duration,
    pub max_files: usize,
    #[serde(deserialize_with = "de_size")]
    pub max_total_size: u64,
    #[serde(deserialize_with = "de_size")]
    pub min_free: u64,
    #[serde(deserialize_with = "de_fsync")]
    pub fsync: FsyncPolicy,
    pub compress: bool,
    /// `zstd` or `gzip` (what common log shippers read).
    pub compression: crate::log::writer::Compression,
    pub flight_events: usize,
}

impl Default for RecordConfig {
    fn default() -> Self {
        use defaults as d;
        Self {
            max_segment_bytes: default_of(parse_size, d::SEGMENT_SIZE),
            max_segment_age: default_of(parse_duration, d::SEGMENT_AGE),
            max_files: default_of(number, d::MAX_FILES),
            max_total_bytes: default_of(parse_size, d::MAX_TOTAL_SIZE),
            min_free_bytes: default_of(parse_size, d::MIN_FREE),
            fsync: default_of(parse_fsync, d::FSYNC),
            compress: true,
            compression: default_of(parse_compression, d::COMPRESSION),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        let r = RecordConfig::default();
        Self {
            dir: PathBuf::from(defaults::LOG_DIR),
            segment_size: r.max_segment_bytes,
            segment_age: r.max_segment_age,
            max_files: r.max_files,
            max_total_size: r.max_total_bytes,
            min_free: r.min_free_bytes,
            fsync: r.fsync,
            compress: r.compress,
            compression: r.compression,
            flight_events: default_of(number, defaults::FLIGHT_EVENTS),
        }
    }
}

impl LogConfig {
    pub fn record_config(&self) -> RecordConfig {
        RecordConfig {
            max_segment_bytes: self.segment_size,
            max_segment_age: self.segment_age,
            max_files: self.max_files,
            max_total_bytes: self.max_total_size,
            min_free_bytes: self.min_free,
            fsync: self.fsync,
            compress: self.compress,
            compression: self.compression,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Ring buffer bytes: a power of two, at least 4096.
    pub ringbuf_size: u32,
    /// Wake the daemon once this many bytes wait in the ring buffer; 0 wakes
    /// it for every event.
    pub wakeup_bytes: u32,
    /// Drain the ring buffer at least this often.
    #[serde(deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    pub entry_transitions: bool,
    /// Try the kvm_entry gate as a BTF-enabled tracepoint (tp_btf) before
    /// the raw tracepoint.
    pub entry_gate_btf: bool,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            ringbuf_size: default_of(number, defaults::RINGBUF_SIZE),
            wakeup_bytes: default_of(number, defaults::WAKEUP_BYTES),
            poll_interval: default_of(parse_duration, defaults::POLL_INTERVAL),
            entry_transitions: true,
            entry_gate_btf: true,
        }
    }
}

/// The default metrics address: loopback, on a port no common exporter
/// uses (9100–9999 is the Prometheus exporters' range, all allocated; 9464
/// is OpenTelemetry's Prometheus exporter).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:10464";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`/metrics`); empty disables it.
    pub listen: String,
    /// An exporter-toolkit `web.config` file (TLS, basic auth); empty:
    /// plain HTTP, no auth.
    pub web_config_file: PathBuf,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN.into(),
            web_config_file: PathBuf::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertmanagerConfig {
    /// One base URL (`http[s]://host:port[/prefix]`); empty: none. Kept
    /// beside `urls` for configs written before there were several.
    pub url: String,
    /// Base URLs: every alert goes to each (an HA cluster's replicas).
    pub urls: Vec<String>,
    /// CA certificates (PEM) for `https://` URLs; empty: the system's.
    pub ca_file: PathBuf,
    /// `{ username = "…", password_file = "…" }`.
    pub basic_auth: Option<BasicAuthConfig>,
    /// A file whose first line is a bearer token.
    pub bearer_token_file: PathBuf,
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Attempts per alert batch before it is counted as failed.
    pub attempts: u32,
    /// Alerts waiting to be sent at most, per URL; more are dropped and
    /// counted.
    pub queue: usize,
    /// The `host` label; empty: this machine's hostname.
    pub host: String,
    /// Findings below this severity are not pushed (`info` ones are noise
    /// to a pager: a memslot loop's `zap_storm`).
    pub min_severity: crate::detector::Severity,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    pub username: String,
    pub password_file: PathBuf,
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            urls: Vec::new(),
            ca_file: PathBuf::new(),
            basic_auth: None,
            bearer_token_file: PathBuf::new(),
            timeout: Duration::from_secs(5),
            attempts: 4,
            queue: 1024,
            host: String::new(),
            min_severity: crate::detector::Severity::Warning,
        }
    }
}

impl AlertmanagerConfig {
    /// `url` and `urls` together.
    pub fn all_urls(&self) -> Vec<String> {
        std::iter::once(&self.url)
            .filter(|u| !u.is_empty())
            .chain(&self.urls)
            .cloned()
            .collect()
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FindingsConfig {
    /// Also write findings as JSON lines here: `-` for stdout, or a file
    /// (appended). Empty: off.
    pub output: String,
}

/// A config error: file, and toml's message (line, key and reason).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("can't read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Parses a config file's text; `path` is for messages.
    pub fn parse(path: &std::path::Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.validate().map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Reads a config file: a regular file of at most [`CONFIG_MAX`] bytes
    /// (not a device that never ends, not a FIFO that never answers).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() || meta.len() > CONFIG_MAX {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a regular file of at most {} KiB", CONFIG_MAX >> 10),
            )));
        }
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(CONFIG_MAX).read_to_string(&mut text))
            .map_err(read_err)?;
        Self::parse(path, &text)
    }

    /// The one validator, for a file, `run`'s flags over it, and `watch`'s
    /// flags over the defaults: every setting within its bounds, and the
    /// checks that hold across keys. An absurd value (a queue of 2^64, a
    /// segment rotated every nanosecond) is refused with its key, not left
    /// to panic or wipe the log's history.
    pub fn validate(&self) -> Result<(), Invalid> {
        let (l, p, a) = (&self.log, &self.probes, &self.alertmanager);
        let rb = p.ringbuf_size;
        let listen_ok = self.metrics.listen.is_empty()
            || self.metrics.listen.parse::<std::net::SocketAddr>().is_ok();
        let bad_url = a
            .all_urls()
            .into_iter()
            .find(|u| !u.starts_with("http://") && !u.starts_with("https://"));
        let checks: [(&'static str, bool, &dyn Fn() -> String); 13] = [
            (
                "probes.ringbuf_size",
                rb >= 4096 && rb.is_power_of_two(),
                &|| format!("{rb} is not a power of two of at least 4096"),
            ),
            ("probes.wakeup_bytes", p.wakeup_bytes <= rb / 2, &|| {
                format!(
                    "{} is more than half the ring buffer ({rb} bytes); events would be \
                     dropped before the reader wakes",
                    p.wakeup_bytes
                )
            }),
            (
                "probes.poll_interval",
                (Duration::from_millis(1)..=Duration::from_secs(10)).contains(&p.poll_interval),
                &|| format!("{:?} is outside 1ms..=10s", p.poll_interval),
            ),
            ("log.max_files", l.max_files >= 2, &|| {
                "must be at least 2".into()
            }),
            ("metrics.listen", listen_ok, &|| {
                format!(
                    "{:?} is not an address like 127.0.0.1:10464",
                    self.metrics.listen
                )
            }),
            ("alertmanager.urls", bad_url.is_none(), &|| {
                format!(
                    "{:?} must start with http:// or https://",
                    bad_url.clone().unwrap_or_default()
                )
            }),
            (
                "alertmanager.attempts",
                (1..=100).contains(&a.attempts),
                &|| "must be between 1 and 100".into(),
            ),
            (
                "log.segment_size",
                (16 << 10..=1 << 40).contains(&l.segment_size),
                &|| "must be between 16K and 1024G".into(),
            ),
            (
                "log.segment_age",
                (Duration::from_secs(1)..=Duration::from_hours(7 * 24)).contains(&l.segment_age),
                &|| "must be between 1s and 7d".into(),
            ),
            ("log.max_files", l.max_files <= 1_000_000, &|| {
                "must be at most 1000000".into()
            }),
            ("log.flight_events", l.flight_events <= 100_000, &|| {
                "must be at most 100000".into()
            }),
            (
                "alertmanager.queue",
                (1..=100_000).contains(&a.queue),
                &|| "must be between 1 and 100000".into(),
            ),
            (
                "alertmanager.timeout",
                (Duration::from_millis(10)..=Duration::from_mins(10)).contains(&a.timeout),
                &|| "must be between 10ms and 10m".into(),
            ),
        ];
        match checks.iter().find(|(_, ok, _)| !ok) {
            Some((key, _, why)) => Err(Invalid { key, reason: why() }),
            None => Ok(()),
        }
    }
}

/// A setting [`Config::validate`] refused: its key (`section.name`) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {reason}")]
pub struct Invalid {
    pub key: &'static str,
    pub reason: String,
}

/// The largest config file read.
pub const CONFIG_MAX: u64 = 1 << 20;

/// `64M`, `1G`, `4096`…
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 64K, 64M or 1G"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} must be a positive size"))
}

/// `30s`, `500ms`, `5m`, `1h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 500ms or 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}; use ms, s, m, h or d"
            ));
        }
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `zstd` or `gzip`.
pub fn parse_compression(s: &str) -> Result<crate::log::writer::Compression, String> {
    match s {
        "zstd" => Ok(crate::log::writer::Compression::Zstd),
        "gzip" => Ok(crate::log::writer::Compression::Gzip),
        _ => Err(format!("{s:?} is not zstd or gzip")),
    }
}

/// `never`, `always`, or an interval.
pub fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "never" => Ok(FsyncPolicy::Never),
        "always" => Ok(FsyncPolicy::Always),
        other => parse_duration(other)
            .map(FsyncPolicy::Interval)
            .map_err(|_| format!("{s:?} is not `never`, `always` or an interval like 1s")),
    }
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(n) if n > 0 => Ok(n),
        Size::N(_) => Err(serde::de::Error::custom("must be a positive size")),
        Size::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_fsync<'de, D: serde::Deserializer<'de>>(d: D) -> Result<FsyncPolicy, D::Error> {
    let s = String::deserialize(d)?;
    parse_fsync(&s).map_err(serde::de::Error::custom)
}

/// The documented defaults, as a file (`dist/config.toml` is this text).
pub const EXAMPLE: &str = include_str!("../../../dist/config.toml");

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_shipped_example_is_the_defaults() {
        let cfg = Config::parse(Path::new("dist/config.toml"), EXAMPLE).unwrap();
        let mut want = Config::default();
        // The example turns nothing on that the defaults leave off.
        want.alertmanager.urls.clone_from(&cfg.alertmanager.urls);
        assert_eq!(cfg, want);
    }

    #[test]
    fn absurd_values_are_refused_with_their_key() {
        for (text, key) in [
            (
                "[alertmanager]\nqueue = 18446744073709551615\n",
                "alertmanager.queue",
            ),
            (
                "[log]\nsegment_age = \"0.0000000001s\"\n",
                "log.segment_age",
            ),
            ("[log]\nsegment_size = 1\n", "log.segment_size"),
            ("[log]\nflight_events = 1000000000\n", "log.flight_events"),
            (
                "[alertmanager]\nattempts = 4000000000\n",
                "alertmanager.attempts",
            ),
        ] {
            let e = Config::parse(Path::new("t.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("key `{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(
            Config::parse(Path::new("x"), "").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_reason() {
        let e = Config::parse(Path::new("/etc/t.toml"), "[log]\nmax_filez = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config /etc/t.toml: "), "{e}");
        assert!(e.contains("unknown field `max_filez`"), "{e}");
        assert!(e.contains("line 2"), "{e}");

        let e = Config::parse(Path::new("t.toml"), "[log]\nsegment_size = \"64Q\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("segment_size") && e.contains("not a size"),
            "{e}"
        );

        let e = Config::parse(Path::new("t.toml"), "[probes]\nringbuf_size = 5000\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `probes.ringbuf_size`"), "{e}");

        let e = Config::parse(Path::new("t.toml"), "[alertmanager]\nurl = \"ftp://am\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `alertmanager.urls`"), "{e}");

        let e = Config::parse(Path::new("t.toml"), "[metrics]\nlisten = \"everywhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `metrics.listen`"), "{e}");
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
}
