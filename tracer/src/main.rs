//! `tracer`: watch KVM's MMU root lifecycle with eBPF.
//!
//! Exit codes (the contract scripts rely on):
//! - 0: success (for `replay`: no findings);
//! - 1: `replay` found findings;
//! - 2: usage error (bad flags) or runtime error;
//! - 3: unsupported environment (no CAP_BPF/CAP_PERFMON, no BTF, no KVM, or
//!   a kernel that refuses eBPF: lockdown, an LSM, seccomp), with what is
//!   missing.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;
use cli::{Cli, Command, Generate, RunArgs, SimulateArgs, When};
use tracer::{
    Failure,
    config::Config,
    daemon::{self, RecordOptions},
    doctor,
    replay::{Filter, ReplayOptions},
};

/// `tracer run`: the config (file, then flags), checked; then the daemon.
fn run_daemon(args: &RunArgs, launched: std::time::Instant) -> Result<(), Failure> {
    let c = args.config()?;
    let (web, alertmanager) = services(&c)?;
    if args.check_config {
        println!("{}", check_summary(&c, web.as_ref(), alertmanager.as_ref()));
        return Ok(());
    }
    let host = alert_host(&c);
    let reload = args.config.is_some().then(|| {
        let args = args.clone();
        tracer::reload::Reloader(std::sync::Arc::new(move || {
            let c = args.config().map_err(|f| format!("{:#}", f.error))?;
            let (web, alertmanager) = services(&c).map_err(|f| format!("{:#}", f.error))?;
            Ok(tracer::reload::Reloaded {
                host: alert_host(&c),
                config: c,
                web,
                alertmanager,
            })
        }))
    });
    daemon::run(&daemon::WatchOptions {
        duration: args.duration,
        service: daemon::ServiceOptions {
            metrics_listen: (!c.metrics.listen.is_empty())
                .then(|| c.metrics.listen.parse().expect("validated")),
            web,
            alertmanager,
            host,
            findings_out: (!c.findings.output.is_empty()).then(|| c.findings.output.clone()),
            inject: args.inject.clone(),
            config: Some(c.clone()),
            reload,
        },
        ..live_options(launched, &c, Some(c.log.dir.clone()))
    })
}

/// What `run` and `watch` take from their config (the file or the
/// defaults, then the flags): the probes' settings and the event log's.
fn live_options(
    launched: std::time::Instant,
    c: &Config,
    record: Option<std::path::PathBuf>,
) -> daemon::WatchOptions {
    daemon::WatchOptions {
        launched,
        stream: daemon::Stream::Off,
        duration: None,
        ringbuf_bytes: c.probes.ringbuf_size,
        wakeup_bytes: c.probes.wakeup_bytes,
        poll_interval: c.probes.poll_interval,
        baseline: false,
        entry_transitions: c.probes.entry_transitions,
        entry_gate_btf: c.probes.entry_gate_btf,
        min_severity: tracer::detector::Severity::Info,
        style: tracer::human::Style::default(),
        record: record.map(|dir| RecordOptions::new(dir, &c.log)),
        service: daemon::ServiceOptions::default(),
    }
}

/// The `host` label: the config's, or this machine's hostname.
fn alert_host(c: &Config) -> String {
    if c.alertmanager.host.is_empty() {
        tracer::log::hostname()
    } else {
        c.alertmanager.host.clone()
    }
}

/// What `tracer run --check-config` prints for a valid config.
fn check_summary(
    c: &Config,
    web: Option<&tracer::web::WebServer>,
    am: Option<&tracer::alerts::Prepared>,
) -> String {
    let metrics = if c.metrics.listen.is_empty() {
        "off".to_owned()
    } else {
        format!(
            "{}{}{}",
            c.metrics.listen,
            if web.is_some_and(|w| w.tls.is_some()) {
                ", TLS"
            } else {
                ""
            },
            if web.is_some_and(|w| w.auth.is_some()) {
                ", basic auth"
            } else {
                ""
            },
        )
    };
    let alerts = am.map_or("off".to_owned(), |a| {
        a.targets
            .iter()
            .map(|t| t.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    });
    format!(
        "config ok: event log {} (segments of {} bytes, {} kept at most); metrics {metrics}; \
         Alertmanager {alerts} (from {} up)",
        c.log.dir.display(),
        c.log.segment_size,
        c.log.max_files,
        c.alertmanager.min_severity.name()
    )
}

/// The metrics web config and the Alertmanager senders, loaded (files read,
/// certificates parsed) before anything attaches: a mistake is exit 2, not a
/// daemon that runs without its TLS.
fn services(
    c: &Config,
) -> Result<
    (
        Option<tracer::web::WebServer>,
        Option<tracer::alerts::Prepared>,
    ),
    Failure,
> {
    let bad = |e: String| Failure::from(anyhow::anyhow!("{e}"));
    let web = if c.metrics.web_config_file.as_os_str().is_empty() {
        None
    } else {
        Some(tracer::web::WebConfigFile::load(&c.metrics.web_config_file).map_err(bad)?)
    };
    let am = if c.alertmanager.all_urls().is_empty() {
        None
    } else {
        Some(
            tracer::alerts::Prepared::new(&c.alertmanager)
                .map_err(|e| bad(format!("alertmanager: {e}")))?,
        )
    };
    Ok((web, am))
}

/// Event-log rotation and retention.
fn main() -> ExitCode {
    let launched = std::time::Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(args.root.as_deref(), args.json, args.verify),
        Command::Replay(args) => {
            use std::io::IsTerminal as _;
            if args.inputs.is_empty() && std::io::stdin().is_terminal() {
                eprintln!(
                    "tracer: replay: no input: name a log folder or segment files, or pipe \
                     records in (`tracer simulate | tracer replay -`)\n\n\
                     Usage: tracer replay [OPTIONS] [FILE|DIR]...\n\n\
                     For more information, try 'tracer replay --help'."
                );
                return ExitCode::from(2);
            }
            let opts = ReplayOptions {
                inputs: args.inputs,
                json: args.json,
                timeline: args.timeline,
                style: args.human.style(),
                filter: Filter {
                    pid: args.pid,
                    kvm: args.kvm,
                    vcpu_id: args.vcpu,
                    since_ns: args.since.and_then(When::at),
                    until_ns: args.until.and_then(When::at),
                    since_ago: args.since.and_then(When::ago),
                    until_ago: args.until.and_then(When::ago),
                    min_severity: args.min_severity,
                },
            };
            match tracer::replay::run(&opts) {
                Ok(code) => return ExitCode::from(code),
                Err(e) => Err(e),
            }
        }
        Command::Simulate(args) => simulate(&args),
        Command::Top(args) => tracer::top::run(&tracer::top::TopOptions {
            replay: args.replay,
            speed: args.speed,
            ringbuf_bytes: args.ringbuf_size,
            snapshot: args.snapshot,
        }),
        Command::Watch(args) => args.config().and_then(|c| {
            daemon::run(&daemon::WatchOptions {
                stream: if args.json {
                    daemon::Stream::Json
                } else {
                    daemon::Stream::Readable
                },
                duration: args.duration,
                baseline: args.probes.baseline,
                min_severity: args.min_severity,
                style: args.human.style(),
                ..live_options(launched, &c, args.record.clone())
            })
        }),
        Command::Run(args) => run_daemon(&args, launched),
        Command::Generate(what) => generate(what),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("tracer: error: {error:#}");
            ExitCode::from(code)
        }
    }
}

fn generate(what: Generate) -> Result<(), Failure> {
    use clap::CommandFactory as _;
    match what {
        Generate::Man { dir } => {
            for page in tracer::manual::man_pages(Cli::command(), &dir)? {
                println!("{}", dir.join(page).display());
            }
        }
        Generate::Completion { shell } => {
            tracer::manual::completion(Cli::command(), shell, &mut std::io::stdout().lock());
        }
    }
    Ok(())
}

fn simulate(args: &SimulateArgs) -> Result<(), Failure> {
    let tracer::model::Simulation { header, events } = tracer::model::simulate(
        args.kernel,
        args.scenario,
        usize::from(args.vcpus),
        args.rounds as usize,
        args.seed,
    );
    let Some(dir) = &args.record else {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let _ = writeln!(out, "{}", header.to_json_record());
        for ev in events {
            if writeln!(out, "{}", ev.to_json_record()).is_err() {
                // stdout closed (e.g. `| head`): nothing more to do.
                return Ok(());
            }
        }
        let _ = out.flush();
        return Ok(());
    };
    let record = args.log.options(dir.clone())?;
    let mut p = daemon::build_pipeline(daemon::Stream::Off, Some(&record), header, false)?;
    for (i, ev) in events.iter().enumerate() {
        p.event(ev);
        if i % 1024 == 1023 {
            p.end_batch(ev.ts_ns);
        }
    }
    let last = events.last().map_or(0, |e| e.ts_ns);
    let stats = p.finish(last, None).unwrap_or_default();
    let findings: u64 = p.tally.findings.values().sum();
    eprintln!(
        "tracer: recorded {} event(s) and {findings} finding(s) in {}: {} record(s), {} bytes, \
         {} segment(s), {} incident file(s)",
        events.len(),
        dir.display(),
        stats.records,
        stats.bytes,
        stats.segments_opened,
        p.tally.incidents
    );
    Ok(())
}
