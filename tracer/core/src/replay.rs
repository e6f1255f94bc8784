//! `tracer replay`: runs the same detector as `watch` over recorded events
//! (log folders of rotated, compressed segments; files; stdin) and prints
//! the findings, optionally filtered by VM, vCPU and time. `--timeline`
//! prints one vCPU's root history instead.
//!
//! Exit code 1 when there are findings, 0 when there are none. Filters
//! select what is shown: the detector always sees every event, so its
//! state, and therefore its findings, match the live run's.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fmt::Write as _,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::anyhow;

use crate::{
    Failure,
    detector::{Boundary, Detector, DetectorConfig, Finding},
    event::{Event, Kind, hpa},
    log::{
        ClockPair, Header,
        reader::{self, ReadStats, Record},
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

/// What [`read_ordered`] hands on.
pub enum Read<'a> {
    /// A header, as it is read (its boundary follows as a step).
    Header(&'a Header),
    /// A finding the live run recorded, as it is read, with the clock of
    /// the header in effect.
    Finding(Box<Finding>, Option<ClockPair>),
    /// A `loss` record's count, as it is read (its gap follows as a step).
    Lost(u64),
    /// A VMM's names, as they are read (before its events are judged).
    Vm(Box<crate::vmid::VmRecord>),
    /// The next event or boundary, in judging order.
    Step(Step<'a>),
}

/// Reads `files` and hands on what they hold, events and boundaries in the
/// order the detector judges them (see [`Sequencer`]); returns how many
/// events came too late to be put in order. `replay` and `top --replay`
/// both read through it.
pub fn read_ordered(
    files: &[PathBuf],
    stats: &mut ReadStats,
    window_ns: u64,
    mut on: impl FnMut(Read<'_>),
) -> u64 {
    let mut seq = Sequencer::new(window_ns);
    reader::read_all_pipelined(files, stats, |record| match record {
        Record::Finding(f) => on(Read::Finding(f, seq.clock())),
        Record::Vm(v) => on(Read::Vm(v)),
        Record::Header(ref h) => {
            on(Read::Header(h));
            seq.push(record, &mut |s| on(Read::Step(s)));
        }
        Record::Loss(ref l) => {
            on(Read::Lost(l.lost));
            seq.push(record, &mut |s| on(Read::Step(s)));
        }
        other => seq.push(other, &mut |s| on(Read::Step(s))),
    });
    seq.finish(&mut |s| on(Read::Step(s)));
    seq.late
}

/// How far out of timestamp order events may arrive and still be judged in
/// order (merged captures, several inputs, per-CPU ring-buffer interleave).
pub const REORDER_WINDOW_NS: u64 = 5_000_000_000;

/// Events held for reordering at most; beyond it the oldest is judged.
const REORDER_CAP: usize = 100_000;

/// What the sequencer hands the detector, in order.
pub enum Step<'a> {
    Event(&'a Event, Option<ClockPair>),
    Boundary(Boundary),
}

enum Item {
    Event(Box<Event>),
    Gap,
}

/// One held item; ordered by (timestamp, arrival).
struct Held {
    ts: u64,
    seq: u64,
    clock: Option<ClockPair>,
    item: Item,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.ts, self.seq) == (o.ts, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.ts, self.seq).cmp(&(o.ts, o.seq))
    }
}

/// Puts log records into the order the detector judges them in: events by
/// timestamp within a bounded window, gaps (`loss` records, unreadable
/// lines) where they happened, and headers as boundaries: a new boot resets
/// the detector, a new recording on the same boot means vCPUs may be first
/// seen mid-run.
pub struct Sequencer {
    window_ns: u64,
    /// Held items that arrived in order (the common case), oldest first:
    /// pushed and popped in O(1).
    in_order: std::collections::VecDeque<Held>,
    /// Held items that arrived out of order.
    heap: BinaryHeap<Reverse<Held>>,
    seq: u64,
    header: Option<Box<Header>>,
    /// Newest timestamp pushed, and newest judged.
    newest: u64,
    judged: u64,
    /// Events that arrived after later ones were already judged (more than
    /// the window out of order); judged at once, counted.
    pub late: u64,
}

impl Sequencer {
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            in_order: std::collections::VecDeque::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            header: None,
            newest: 0,
            judged: 0,
            late: 0,
        }
    }

    /// The clock pair of the header in effect.
    pub fn clock(&self) -> Option<ClockPair> {
        self.header.as_ref().map(|h| h.clock)
    }

    pub fn push(&mut self, record: Record, judge: &mut impl FnMut(Step<'_>)) {
        match record {
            Record::Header(h) => {
                let boundary = self.header.as_ref().and_then(|prev| {
                    if prev.boot_id != h.boot_id {
                        Some(Boundary::NewBoot)
                    } else if continues(prev, &h) {
                        None
                    } else {
                        Some(Boundary::NewRecording)
                    }
                });
                if let Some(b) = boundary {
                    self.drain(None, judge);
                    judge(Step::Boundary(b));
                    self.newest = 0;
                    self.judged = 0;
                }
                self.header = Some(h);
            }
            Record::Event(ev) => {
                let ts = ev.ts_ns;
                self.hold(ts, Item::Event(ev), judge);
            }
            Record::Loss(l) if l.lost > 0 => self.hold(l.from_ns, Item::Gap, judge),
            Record::Skipped => self.hold(self.newest, Item::Gap, judge),
            Record::Loss(_) | Record::Finding(_) | Record::Vm(_) | Record::Summary => {}
        }
    }

    fn hold(&mut self, ts: u64, item: Item, judge: &mut impl FnMut(Step<'_>)) {
        let clock = self.clock();
        if ts < self.judged {
            self.late += 1;
            Self::judge_one(clock, item, judge);
            return;
        }
        self.seq += 1;
        let held = Held {
            ts,
            seq: self.seq,
            clock,
            item,
        };
        // Arrival numbers only grow: a timestamp no older than the newest
        // in order keeps that queue sorted by (timestamp, arrival).
        if self.in_order.back().is_none_or(|b| b.ts <= ts) {
            self.in_order.push_back(held);
        } else {
            self.heap.push(Reverse(held));
        }
        self.newest = self.newest.max(ts);
        if let Some(horizon) = self.newest.checked_sub(self.window_ns) {
            self.drain(Some(horizon), judge);
        }
        while self.in_order.len() + self.heap.len() > REORDER_CAP {
            self.pop(judge);
        }
    }

    /// The (timestamp, arrival) of the oldest held item, and whether it is
    /// in the heap.
    fn oldest(&self) -> Option<(u64, bool)> {
        let q = self.in_order.front().map(|h| (h.ts, h.seq));
        let h = self.heap.peek().map(|Reverse(h)| (h.ts, h.seq));
        match (q, h) {
            (Some(q), Some(h)) if h < q => Some((h.0, true)),
            (Some(q), _) => Some((q.0, false)),
            (None, Some(h)) => Some((h.0, true)),
            (None, None) => None,
        }
    }

    /// Judges everything older than `horizon` (`None`: everything).
    fn drain(&mut self, horizon: Option<u64>, judge: &mut impl FnMut(Step<'_>)) {
        while self
            .oldest()
            .is_some_and(|(ts, _)| horizon.is_none_or(|t| ts < t))
        {
            self.pop(judge);
        }
    }

    fn pop(&mut self, judge: &mut impl FnMut(Step<'_>)) {
        let held = match self.oldest() {
            Some((_, true)) => self.heap.pop().map(|Reverse(h)| h),
            Some((_, false)) => self.in_order.pop_front(),
            None => None,
        };
        if let Some(h) = held {
            self.judged = self.judged.max(h.ts);
            Self::judge_one(h.clock, h.item, judge);
        }
    }

    fn judge_one(clock: Option<ClockPair>, item: Item, judge: &mut impl FnMut(Step<'_>)) {
        match item {
            Item::Event(ev) => judge(Step::Event(&ev, clock)),
            Item::Gap => judge(Step::Boundary(Boundary::Gap)),
        }
    }

    /// Judges what is still held.
    pub fn finish(&mut self, judge: &mut impl FnMut(Step<'_>)) {
        self.drain(None, judge);
    }
}

/// Whether header `next` continues the recording of `prev` (the next
/// segment of the same daemon run), rather than starting a new one.
fn continues(prev: &Header, next: &Header) -> bool {
    match (&prev.recording, &next.recording) {
        (Some(a), Some(b)) => a == b,
        _ => next.segment == prev.segment + 1 && next.command_line == prev.command_line,
    }
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

/// Rows a text timeline holds at most before it is printed; beyond them
/// rows are counted and the output says so (narrow with filters).
const TIMELINE_ROWS_KEPT: u64 = 1_000_000;

/// One VM's part of the timeline.
struct VmGroup {
    head: String,
    /// The VMM's pid, to name the VM from the log's `vm` records.
    pid: Option<i32>,
    /// The guest's name, from a finding that carries it.
    name: Option<String>,
    /// (vCPU id, time) → row; `None` is the VM's own events (zaps,
    /// invalidations), shown in each vCPU's history at their time.
    rows: Vec<(Option<i32>, u64, String)>,
}

/// The root history: JSON rows stream as judged; text rows are grouped by
/// VM (named at the group's head) and by vCPU, each row compared with the
/// same vCPU's previous roots.
#[derive(Default)]
struct Timeline {
    /// The roots each vCPU (kvm, vCPU id) had at its last row.
    last: std::collections::HashMap<(u64, i32), (Option<u64>, Option<u64>)>,
    vms: Vec<VmGroup>,
    index: std::collections::HashMap<u64, usize>,
    rows: u64,
    not_kept: u64,
}

impl Timeline {
    fn group(&mut self, kvm: u64, pid: Option<i32>, vm_type: Option<u8>) -> &mut VmGroup {
        let i = *self.index.entry(kvm).or_insert_with(|| {
            self.vms.push(VmGroup {
                head: format!(
                    "VM vmm={} type={} kvm={kvm:#x}",
                    pid.map_or_else(|| "?".into(), |p| p.to_string()),
                    vm_type.map_or("?", crate::event::vm_type_name),
                ),
                pid,
                name: None,
                rows: Vec::new(),
            });
            self.vms.len() - 1
        });
        &mut self.vms[i]
    }

    fn keep(&mut self) -> bool {
        self.rows += 1;
        if self.rows > TIMELINE_ROWS_KEPT {
            self.not_kept += 1;
            return false;
        }
        true
    }

    /// The row for `ev`, if it makes one (vCPU events, zaps, invalidations):
    /// returned at once in JSON, held for grouping in text.
    fn row(
        &mut self,
        ev: &Event,
        clock: Option<ClockPair>,
        json: bool,
        style: crate::human::Style,
    ) -> Option<String> {
        if ev.vcpu.is_none() && !matches!(ev.kind, Kind::ZapAllFast | Kind::InvalidateRoots) {
            return None;
        }
        if json {
            self.rows += 1;
            return Some(ev.to_json_record() + "\n");
        }
        let kvm = ev.kvm.unwrap_or(0);
        let roots = (ev.root_hpa, ev.mirror_root_hpa);
        let vcpu = ev.vcpu.and(ev.vcpu_id);
        let change = match vcpu.and_then(|v| self.last.insert((kvm, v), roots)) {
            Some(prev) if prev != roots => "  <- roots changed",
            _ => "",
        };
        if !self.keep() {
            return None;
        }
        let when = style.time(ev.ts_ns, clock);
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
        let text = if ev.vcpu.is_some() {
            let line = format!(
                "    {when}  vcpu {:<4} {what:<34} root={:<18} mirror={:<18}{change}",
                ev.vcpu_id.map_or_else(|| "?".into(), |v| v.to_string()),
                fmt(ev.root_hpa),
                fmt(ev.mirror_root_hpa)
            );
            line.trim_end().to_owned()
        } else {
            format!("    {when}  vm        {what}")
        };
        self.group(kvm, ev.userspace_pid, ev.vm_type)
            .rows
            .push((vcpu, ev.ts_ns, text));
        None
    }

    /// A finding, under its VM and vCPU (text), or at once (JSON).
    fn finding(&mut self, f: &Finding, json: bool) -> Option<String> {
        if json {
            return Some(f.to_json_record() + "\n");
        }
        if !self.keep() {
            return None;
        }
        let text = format!(
            "    {:>27}  !! {} {}",
            "",
            f.severity.name().to_uppercase(),
            f.kind.name()
        );
        let name = f.vm.as_ref().and_then(|v| v.display_name());
        let g = self.group(f.kvm, f.userspace_pid, None);
        if g.name.is_none() {
            g.name = name.map(str::to_owned);
        }
        g.rows.push((f.vcpu_id, f.ts_ns, text));
        None
    }

    /// The grouped text: each VM's head, then each vCPU's history (with
    /// the VM's own events at their time), in the order they were judged.
    fn render(&self, names: &crate::vmid::VmNames) -> String {
        let mut s = String::new();
        for g in &self.vms {
            let name = g
                .name
                .as_deref()
                .or_else(|| names.get(g.pid)?.display_name());
            let _ = match name {
                Some(n) => writeln!(s, "{} name={n}", g.head),
                None => writeln!(s, "{}", g.head),
            };
            let mut vcpus: Vec<i32> = g.rows.iter().filter_map(|r| r.0).collect();
            vcpus.sort_unstable();
            vcpus.dedup();
            if vcpus.is_empty() {
                for (_, _, row) in &g.rows {
                    let _ = writeln!(s, "{row}");
                }
            }
            for v in vcpus {
                let _ = writeln!(s, "  vCPU {v}");
                for (_, _, row) in g.rows.iter().filter(|r| r.0.is_none_or(|x| x == v)) {
                    let _ = writeln!(s, "{row}");
                }
            }
        }
        if self.not_kept > 0 {
            let _ = writeln!(
                s,
                "(timeline: {} row(s) beyond the first {TIMELINE_ROWS_KEPT} not shown; narrow it \
                 with --pid, --vcpu or --since)",
                self.not_kept
            );
        }
        s
    }
}
