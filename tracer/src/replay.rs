//! `tracer replay`: runs the same detector as `watch` over recorded events
//! (log folders of rotated, compressed segments; files; stdin) and prints
//! the findings, optionally filtered by VM, vCPU and time. `--timeline`
//! prints one vCPU's root history instead.
//!
//! Exit code 1 when there are findings, 0 when there are none. Filters
//! select what is shown: the detector always sees every event, so its
//! state, and therefore its findings, match the live run's.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    path::PathBuf,
};

use anyhow::anyhow;

use crate::{
    Failure,
    detector::{Detector, DetectorConfig, Finding},
    event::{Event, Kind, hpa},
    log::{
        ClockPair,
        reader::{self, ReadStats, Record},
        writer::utc_rfc3339,
    },
};

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

    pub fn finding(&self, f: &Finding, clock: Option<ClockPair>) -> bool {
        self.vm_ok(Some(f.kvm), f.userspace_pid)
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
}

/// The outcome of a replay, for the CLI and tests.
#[derive(Debug, Default)]
pub struct Replayed {
    pub findings: Vec<Finding>,
    /// Findings that were recorded in the log (by the live run).
    pub recorded_findings: Vec<Finding>,
    pub losses: u64,
    pub stats: ReadStats,
}

/// Reads the inputs and runs the detector over every event.
pub fn replay(
    inputs: &[PathBuf],
    filter: &Filter,
    mut on_event: impl FnMut(&Event, Option<ClockPair>),
) -> Result<Replayed, reader::InputError> {
    let files = reader::expand_inputs(inputs)?;
    let mut detector = Detector::new(DetectorConfig::default());
    let mut out = Replayed::default();
    let mut clock: Option<ClockPair> = None;
    let mut found = Vec::new();
    let mut stats = ReadStats::default();
    reader::read_all(&files, &mut stats, |_, record| match record {
        Record::Header(h) => clock = Some(h.clock),
        Record::Event(ev) => {
            on_event(&ev, clock);
            detector.observe(&ev, &mut found);
            for f in found.drain(..) {
                if filter.finding(&f, clock) {
                    out.findings.push(f);
                }
            }
        }
        Record::Finding(f) => {
            if filter.finding(&f, clock) {
                out.recorded_findings.push(*f);
            }
        }
        Record::Loss(l) => out.losses += l.lost,
        Record::Summary => {}
    });
    out.stats = stats;
    Ok(out)
}

/// `tracer replay`.
pub fn run(opts: &ReplayOptions) -> Result<u8, Failure> {
    let inputs = if opts.inputs.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        opts.inputs.clone()
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut timeline = Timeline::default();
    let replayed = replay(&inputs, &opts.filter, |ev, clock| {
        if opts.timeline && opts.filter.event(ev, clock) {
            timeline.push(ev, clock);
        }
    })
    .map_err(|e| Failure::from(anyhow!(e)))?;

    let write = |out: &mut io::BufWriter<io::StdoutLock<'_>>, s: &str| {
        out.write_all(s.as_bytes())
            .map_err(|e| Failure::from(anyhow!("writing output: {e}")))
    };
    if opts.timeline {
        write(&mut out, &timeline.render(&replayed.findings, opts.json))?;
    } else {
        for f in &replayed.findings {
            let line = if opts.json {
                f.to_json_record() + "\n"
            } else {
                f.to_text() + "\n"
            };
            write(&mut out, &line)?;
        }
    }
    out.flush()
        .map_err(|e| Failure::from(anyhow!("writing output: {e}")))?;
    report(&replayed);
    Ok(if replayed.findings.is_empty() {
        0
    } else {
        EXIT_FINDINGS
    })
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
        s.events,
        s.files,
        r.findings.len(),
        s.skipped_lines,
        s.torn_lines,
        r.losses
    );
}

/// One vCPU's root history.
#[derive(Default)]
struct Timeline {
    rows: Vec<(Event, Option<ClockPair>)>,
}

impl Timeline {
    fn push(&mut self, ev: &Event, clock: Option<ClockPair>) {
        if ev.vcpu.is_some() || matches!(ev.kind, Kind::ZapAllFast | Kind::InvalidateRoots) {
            self.rows.push((ev.clone(), clock));
        }
    }

    fn render(&self, findings: &[Finding], json: bool) -> String {
        let mut s = String::new();
        let mut last: Option<(Option<u64>, Option<u64>)> = None;
        let mut fi = findings.iter().peekable();
        for (ev, clock) in &self.rows {
            while let Some(f) = fi.next_if(|f| f.ts_ns < ev.ts_ns) {
                s.push_str(&timeline_finding(f, json));
            }
            if json {
                s.push_str(&ev.to_json_record());
                s.push('\n');
                continue;
            }
            let when = clock.map_or_else(
                || {
                    format!(
                        "{:>8}.{:06}s",
                        ev.ts_ns / 1_000_000_000,
                        (ev.ts_ns % 1_000_000_000) / 1000
                    )
                },
                |c| utc_rfc3339(c.to_realtime(ev.ts_ns)),
            );
            let roots = (ev.root_hpa, ev.mirror_root_hpa);
            let change = match last {
                Some(prev) if prev != roots && ev.vcpu.is_some() => "  <- roots changed",
                _ => "",
            };
            if ev.vcpu.is_some() {
                last = Some(roots);
            }
            let fmt = |v: Option<u64>| v.map_or_else(|| "-".into(), hpa);
            let what = match ev.kind {
                Kind::LoadReturn => format!("load_return ret={}", ev.ret.unwrap_or(0)),
                Kind::AllocRoot => format!(
                    "alloc_root mirror={} before={}",
                    ev.arg.unwrap_or(0),
                    fmt(ev.before_hpa)
                ),
                Kind::InvalidateRoots => {
                    format!("invalidate_roots types={:#x}", ev.arg.unwrap_or(0))
                }
                Kind::ZapAllFast => format!("zap_all_fast gen={}", ev.mmu_valid_gen.unwrap_or(0)),
                k => k.name().to_owned(),
            };
            if ev.vcpu.is_some() {
                let line = format!(
                    "{when}  vcpu {:<4} {what:<34} root={:<18} mirror={:<18}{change}",
                    ev.vcpu_id.map_or_else(|| "?".into(), |v| v.to_string()),
                    fmt(ev.root_hpa),
                    fmt(ev.mirror_root_hpa)
                );
                let _ = writeln!(s, "{}", line.trim_end());
            } else {
                let _ = writeln!(s, "{when}  vm        {what}");
            }
        }
        for f in fi {
            s.push_str(&timeline_finding(f, json));
        }
        if self.rows.is_empty() {
            s.push_str("(no events match the filters)\n");
        }
        s
    }
}

fn timeline_finding(f: &Finding, json: bool) -> String {
    if json {
        f.to_json_record() + "\n"
    } else {
        format!(
            "{:>27}  !! {} {}\n",
            "",
            f.severity.name().to_uppercase(),
            f.kind.name()
        )
    }
}
