//! SIGHUP: the daemon reopens its files (the event log's active segment,
//! `--findings-out`) so logrotate can move them, and reloads its config.
//! What can change live does ([alertmanager], [findings], the metrics web
//! config); what can't is named in a warning, and the running value stays.

use std::sync::Arc;

use crate::{alerts::Prepared, config::Config, web::WebServer};

/// A config read again, with what it names loaded.
pub struct Reloaded {
    pub config: Config,
    pub web: Option<WebServer>,
    pub alertmanager: Option<Prepared>,
    /// The `host` label.
    pub host: String,
}

/// Reads the config again (the file, then the flags on top).
#[derive(Clone)]
pub struct Reloader(pub Arc<dyn Fn() -> Result<Reloaded, String> + Send + Sync>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// The keys that differ between `old` and `new` but only take effect at
/// start-up.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let (a, b) = (&old.log, &new.log);
    for (key, changed) in [
        ("log.dir", a.dir != b.dir),
        ("log.segment_size", a.segment_size != b.segment_size),
        ("log.segment_age", a.segment_age != b.segment_age),
        ("log.max_files", a.max_files != b.max_files),
        ("log.max_total_size", a.max_total_size != b.max_total_size),
        ("log.min_free", a.min_free != b.min_free),
        ("log.fsync", a.fsync != b.fsync),
        ("log.compress", a.compress != b.compress),
        ("log.compression", a.compression != b.compression),
        ("log.flight_events", a.flight_events != b.flight_events),
        ("probes", old.probes != new.probes),
        ("metrics.listen", old.metrics.listen != new.metrics.listen),
    ] {
        if changed {
            keys.push(key);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_needs_a_restart_is_named() {
        let old = Config::default();
        let mut new = old.clone();
        new.alertmanager.urls = vec!["http://am:9093".into()];
        new.findings.output = "/var/log/kvm-root-tracer/findings.jsonl".into();
        assert!(needs_restart(&old, &new).is_empty());
        new.log.segment_size *= 2;
        new.probes.ringbuf_size *= 2;
        new.metrics.listen = "127.0.0.1:1".into();
        assert_eq!(
            needs_restart(&old, &new),
            ["log.segment_size", "probes", "metrics.listen"]
        );
    }
}
