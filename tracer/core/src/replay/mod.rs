//! `tracer replay`: runs the same detector as `watch` over recorded events
//! (log folders of rotated, compressed segments; files; stdin) and prints
//! the findings, optionally filtered by VM, vCPU and time. `--timeline`
//! prints one vCPU's root history instead.
//!
//! Exit code 1 when there are findings, 0 when there are none. Filters
//! select what is shown: the detector always sees every event, so its
//! state, and therefore its findings, match the live run's.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::anyhow;

use crate::{
    Failure,
    detector::{Detector, DetectorConfig, Finding},
    event::Event,
    log::{
        ClockPair,
        reader::{self, ReadStats, Record},
    },
};

mod order;
mod timeline;

pub use order::{REORDER_WINDOW_NS, Read, Sequencer, Step, read_ordered};
use timeline::Timeline;

/// Exit code when findings were found.
pub const EXIT_FINDINGS: u8 = 1;

/// Problems printed per file before they are only counted.
const PROBLEMS_SHOWN: usize = 10;

/// What to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pid: Option<i32>,
    pub kvm: Option<u64>,
    pub vcpu_id: Option<i32>,
    /// Wall-clock bounds, ns since the epoch.
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    /// Findings below this are neither shown nor counted (nor exit 1).
    pub min_severity: crate::detector::Severity,
    /// `--since 10m`, `--until 2h`: counted back from the log's end;
    /// resolved into `since_ns`/`until_ns` before the replay.
    pub since_ago: Option<std::time::Duration>,
    pub until_ago: Option<std::time::Duration>,
}

impl Filter {
    fn time_ok(&self, wall_ns: Option<u64>) -> bool {
        match wall_ns {
            Some(t) => self.since_ns.is_none_or(|s| t >= s) && self.until_ns.is_none_or(|u| t <= u),
            None => self.since_ns.is_none() && self.until_ns.is_none(),
        }
    }

    fn vm_ok(&self, kvm: Option<u64>, pid: Option<i32>) -> bool {
        self.kvm.is_none_or(|k| kvm == Some(k)) && self.pid.is_none_or(|p| pid == Some(p))
    }

    /// Whether any event filter is set (not `--min-severity`).
    pub fn selects_events(&self) -> bool {
        self.pid.is_some()
            || self.kvm.is_some()
            || self.vcpu_id.is_some()
            || self.since_ns.is_some()
            || self.until_ns.is_some()
    }

    /// The event filters, as flags.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.pid {
            parts.push(format!("--pid {p}"));
        }
        if let Some(k) = self.kvm {
            parts.push(format!("--kvm {k:#x}"));
        }
        if let Some(v) = self.vcpu_id {
            parts.push(format!("--vcpu {v}"));
        }
        if let Some(s) = self.since_ns {
            parts.push(format!("--since {}", crate::log::writer::utc_rfc3339(s)));
        }
        if let Some(u) = self.until_ns {
            parts.push(format!("--until {}", crate::log::writer::utc_rfc3339(u)));
        }
        parts.join(" ")
    }

    pub fn finding(&self, f: &Finding, clock: Option<ClockPair>) -> bool {
        f.severity >= self.min_severity
            && self.vm_ok(Some(f.kvm), f.userspace_pid)
            && self.vcpu_id.is_none_or(|v| f.vcpu_id == Some(v))
            && self.time_ok(clock.map(|c| c.to_realtime(f.ts_ns)))
    }

    /// VM-level events (no vCPU) pass the vCPU filter: a vCPU's history
    /// includes what happened to its VM.
    pub fn event(&self, e: &Event, clock: Option<ClockPair>) -> bool {
        self.vm_ok(e.kvm, e.userspace_pid)
            && (e.vcpu_id.is_none() || self.vcpu_id.is_none_or(|v| e.vcpu_id == Some(v)))
            && self.time_ok(clock.map(|c| c.to_realtime(e.ts_ns)))
    }
}

/// Options of `tracer replay`.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    pub inputs: Vec<PathBuf>,
    pub json: bool,
    pub timeline: bool,
    pub filter: Filter,
    /// Times, width and colour of the human output.
    pub style: crate::human::Style,
}

/// The outcome of a replay, for the CLI and tests.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The first `FINDINGS_KEPT` findings (all of them go to `on_finding`).
    pub findings: Vec<Finding>,
    pub findings_total: u64,
    /// The first `FINDINGS_KEPT` findings recorded in the log (by the live
    /// run), their evidence cut to `EVIDENCE_KEPT` events.
    pub recorded_findings: Vec<Finding>,
    pub recorded_findings_total: u64,
    pub losses: u64,
    /// Events more than the reorder window out of order.
    pub late_events: u64,
    pub stats: ReadStats,
    /// Events read, and those the event filters let through.
    pub events: u64,
    pub events_matched: u64,
    /// The VMMs' names from the log's `vm` records.
    pub names: crate::vmid::VmNames,
}

/// Findings a replay keeps in memory at most; the rest are only counted
/// (and streamed to `on_finding`): a hostile log can't take gigabytes.
pub const FINDINGS_KEPT: usize = 10_000;
/// Evidence events kept per recorded finding.
const EVIDENCE_KEPT: usize = 16;

/// Reads the inputs and runs the detector over every event, in timestamp
/// order within the default reorder window.
pub fn replay(
    inputs: &[PathBuf],
    filter: &Filter,
    on_event: impl FnMut(&Event, Option<ClockPair>),
) -> Result<Replayed, reader::InputError> {
    replay_with(inputs, filter, REORDER_WINDOW_NS, on_event, |_, _| {})
}

/// [`replay`] with a reorder window of `window_ns`, handing every finding
/// that passes the filter to `on_finding` as it is found (after the event
/// that raised it went to `on_event`).
pub fn replay_with(
    inputs: &[PathBuf],
    filter: &Filter,
    window_ns: u64,
    mut on_event: impl FnMut(&Event, Option<ClockPair>),
    mut on_finding: impl FnMut(&Finding, Option<ClockPair>),
) -> Result<Replayed, reader::InputError> {
    let files = reader::expand_inputs(inputs)?;
    let mut detector = Detector::new(DetectorConfig::default());
    let mut out = Replayed::default();
    let mut found = Vec::new();
    let mut stats = ReadStats::default();
    let mut recorded = Vec::new();
    let mut recorded_total = 0;
    let mut losses = 0;
    let mut names = crate::vmid::VmNames::default();
    let late = read_ordered(&files, &mut stats, window_ns, |read| match read {
        Read::Step(Step::Boundary(b)) => detector.boundary(b),
        Read::Step(Step::Event(ev, clock)) => {
            out.events += 1;
            if filter.event(ev, clock) {
                out.events_matched += 1;
            }
            on_event(ev, clock);
            detector.observe(ev, &mut found);
            for mut f in found.drain(..) {
                f.vm = names.get(f.userspace_pid).cloned();
                if filter.finding(&f, clock) {
                    on_finding(&f, clock);
                    out.findings_total += 1;
                    if out.findings.len() < FINDINGS_KEPT {
                        out.findings.push(f);
                    }
                }
            }
        }
        Read::Finding(mut f, clock) => {
            if filter.finding(&f, clock) {
                recorded_total += 1;
                if recorded.len() < FINDINGS_KEPT {
                    f.evidence.truncate(EVIDENCE_KEPT);
                    f.evidence.shrink_to_fit();
                    recorded.push(*f);
                }
            }
        }
        Read::Lost(n) => losses += n,
        Read::Vm(v) => names.insert(&v),
        Read::Header(_) => {}
    });
    out.recorded_findings = recorded;
    out.recorded_findings_total = recorded_total;
    out.losses = losses;
    out.late_events = late;
    out.stats = stats;
    out.names = names;
    Ok(out)
}

/// `tracer replay`.
pub fn run(opts: &ReplayOptions) -> Result<u8, Failure> {
    let inputs = if opts.inputs.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        opts.inputs.clone()
    };
    let mut opts = opts.clone();
    if opts.filter.since_ago.is_some() || opts.filter.until_ago.is_some() {
        let end = log_end_ns(&inputs).map_err(|e| Failure::from(anyhow!(e)))?;
        let back = |d: std::time::Duration| {
            end.saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        if let Some(d) = opts.filter.since_ago {
            opts.filter.since_ns = Some(back(d));
        }
        if let Some(d) = opts.filter.until_ago {
            opts.filter.until_ns = Some(back(d));
        }
    }
    let opts = &opts;
    let mut out = Output {
        w: io::BufWriter::new(io::stdout().lock()),
        failed: None,
    };
    let timeline = std::cell::RefCell::new(Timeline::default());
    let json = opts.json;
    // Streamed as found, in judging order: nothing is held for the end.
    let replayed = {
        let out = std::cell::RefCell::new(&mut out);
        replay_with(
            &inputs,
            &opts.filter,
            REORDER_WINDOW_NS,
            |ev, clock| {
                if opts.timeline
                    && opts.filter.event(ev, clock)
                    && let Some(row) = timeline.borrow_mut().row(ev, clock, json, opts.style)
                {
                    out.borrow_mut().write(&row);
                }
            },
            |f, clock| {
                let text = if opts.timeline {
                    timeline.borrow_mut().finding(f, json)
                } else if json {
                    Some(f.to_json_record() + "\n")
                } else {
                    Some(opts.style.finding(f, clock) + "\n")
                };
                if let Some(text) = text {
                    out.borrow_mut().write(&text);
                }
            },
        )
    }
    .map_err(|e| Failure::from(anyhow!(e)))?;
    let timeline = timeline.into_inner();
    if opts.timeline && !json {
        out.write(&timeline.render(&replayed.names));
    }
    if opts.timeline && timeline.rows == 0 {
        out.write("(no events match the filters)\n");
    }
    if let Err(e) = out.w.flush() {
        out.failed.get_or_insert(e);
    }
    if let Some(e) = out.failed {
        return Err(anyhow!("writing output: {e}").into());
    }
    report(&replayed);
    // A filter that matches nothing says so, rather than a silent exit 0.
    if opts.filter.selects_events() && replayed.events > 0 && replayed.events_matched == 0 {
        eprintln!(
            "tracer: no event of the {} read matches {}: check the pid, kvm, vCPU or times \
             (`tracer replay --timeline` without filters lists what the log holds)",
            replayed.events,
            opts.filter.describe()
        );
    }
    Ok(if replayed.findings_total == 0 {
        0
    } else {
        EXIT_FINDINGS
    })
}

/// The wall-clock time of the newest event in the inputs (the newest
/// segment is read): what `--since 10m` counts back from.
pub fn log_end_ns(inputs: &[PathBuf]) -> Result<u64, String> {
    if inputs.iter().any(|p| p == Path::new("-")) {
        return Err(
            "a relative --since/--until counts back from the log's end: give log \
                    files or folders, not stdin"
                .into(),
        );
    }
    let files = reader::expand_inputs(inputs).map_err(|e| e.to_string())?;
    let mut newest = None;
    for file in files.iter().rev() {
        let mut stats = ReadStats::default();
        let mut clock = None;
        reader::read_all(std::slice::from_ref(file), &mut stats, |_, r| match r {
            Record::Header(h) => clock = Some(h.clock),
            Record::Event(ev) => {
                if let Some(c) = clock {
                    let t = c.to_realtime(ev.ts_ns);
                    newest = Some(newest.map_or(t, |n: u64| n.max(t)));
                }
            }
            _ => {}
        });
        if newest.is_some() {
            break;
        }
    }
    newest.ok_or_else(|| "no timed event in the inputs to count --since/--until back from".into())
}

/// stdout, which stops being written after its first error.
struct Output<'a> {
    w: io::BufWriter<io::StdoutLock<'a>>,
    failed: Option<io::Error>,
}

impl Output<'_> {
    fn write(&mut self, s: &str) {
        if self.failed.is_none()
            && let Err(e) = self.w.write_all(s.as_bytes())
        {
            self.failed = Some(e);
        }
    }
}

/// The read report, on stderr.
fn report(r: &Replayed) {
    let s = &r.stats;
    let mut shown: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for p in &s.problems {
        let n = shown.entry(p.source.as_str()).or_default();
        *n += 1;
        if *n <= PROBLEMS_SHOWN {
            eprintln!("tracer: {p}");
        }
    }
    if s.problems_not_kept > 0 {
        eprintln!(
            "tracer: … and {} more problem(s) not kept",
            s.problems_not_kept
        );
    }
    for (source, n) in &shown {
        if *n > PROBLEMS_SHOWN {
            eprintln!(
                "tracer: {source}: … and {} more problem(s)",
                n - PROBLEMS_SHOWN
            );
        }
    }
    eprintln!(
        "tracer: replayed {} event(s) from {} file(s): {} finding(s); {} line(s) skipped \
         ({} torn); {} event(s) recorded as lost by the probes",
        s.events, s.files, r.findings_total, s.skipped_lines, s.torn_lines, r.losses
    );
    if r.late_events > 0 {
        eprintln!(
            "tracer: {} event(s) arrived more than {} s out of timestamp order and were judged \
             where they arrived",
            r.late_events,
            REORDER_WINDOW_NS / 1_000_000_000
        );
    }
}
