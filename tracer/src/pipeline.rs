//! What happens to each decoded event, live or simulated: the detector, the
//! stdout stream, the event log, and the flight recorder. No eBPF here, so
//! `watch`, `run` and `simulate --record` share it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{self, Write as _},
    time::Duration,
};

use crate::{
    detector::{Detector, DetectorConfig, Finding, FindingKind},
    event::{Event, Kind},
    log::{
        Header, Loss,
        sink::{Incident, LogSink},
        writer::{RecorderStats, utc_compact},
    },
};

/// What the stream saw, for the summary.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub by_kind: BTreeMap<Kind, u64>,
    pub decode_errors: u64,
    pub findings: BTreeMap<FindingKind, u64>,
    pub lost: u64,
    pub incidents: u64,
    /// (probe, kind) → events, for the metrics.
    pub by_probe_kind: BTreeMap<(std::borrow::Cow<'static, str>, Kind), u64>,
}

/// The stdout stream: readable lines or JSON lines.
pub struct Output {
    out: io::BufWriter<io::Stdout>,
    json: bool,
    /// Reused for each JSON line: streaming allocates nothing per event.
    line: Vec<u8>,
    /// stdout was closed (e.g. `| head`): stop writing, keep counting.
    pub closed: bool,
    /// Findings below this are not printed (they are still counted,
    /// recorded and alerted on as configured).
    pub min_severity: crate::detector::Severity,
    /// How a person sees it (readable lines only).
    pub style: crate::human::Style,
    /// The clock pair that maps event times to wall time.
    pub clock: Option<crate::log::ClockPair>,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self {
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            json,
            line: Vec::with_capacity(1024),
            closed: false,
            min_severity: crate::detector::Severity::Info,
            style: crate::human::Style::default(),
            clock: None,
        }
    }

    /// JSON output begins with the log's header record, so that it
    /// replays like a log segment; readable output with a column header.
    pub fn header(&mut self, h: &crate::log::Header) {
        self.clock = Some(h.clock);
        if self.json {
            self.write(&(h.to_json_record() + "\n"));
        } else {
            let line = self.style.header() + "\n";
            self.write(&line);
        }
    }

    fn write(&mut self, s: &str) {
        if !self.closed && self.out.write_all(s.as_bytes()).is_err() {
            self.closed = true;
        }
    }

    fn event(&mut self, ev: &Event) {
        if self.closed {
            return;
        }
        if self.json {
            let mut line = std::mem::take(&mut self.line);
            line.clear();
            ev.write_json_record(&mut line);
            line.push(b'\n');
            if self.out.write_all(&line).is_err() {
                self.closed = true;
            }
            self.line = line;
        } else {
            let line = self.style.event_row(ev, self.clock);
            self.write(&line);
            self.write("\n");
        }
    }

    fn finding(&mut self, f: &Finding) {
        if f.severity < self.min_severity {
            return;
        }
        if self.json {
            self.write(&(f.to_json_record() + "\n"));
        } else {
            let text = self.style.finding(f, self.clock);
            self.write(&text);
        }
    }

    fn loss(&mut self, l: &Loss) {
        if self.json {
            self.write(&(l.to_json_record() + "\n"));
        } else {
            self.write(&format!(
                "LOSS {} events lost by {} between {} and {} ns: {}\n",
                l.lost, l.probe, l.from_ns, l.to_ns, l.reason
            ));
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    pub fn write_raw(&mut self, s: &str) {
        self.write(s);
    }

    pub fn flush(&mut self) {
        if !self.closed && self.out.flush().is_err() {
            self.closed = true;
        }
    }
}

/// The last events of each VM, written to an incident file beside the log
/// when a finding fires, ready to attach to a bug report.
pub struct FlightRecorder {
    per_vm: usize,
    rings: HashMap<u64, VecDeque<Event>>,
    /// Incident files written; capped so a flood of findings can't fill
    /// the disk.
    written: u64,
    max_files: u64,
    /// When each (VM, kind) last got an incident file: at most one per
    /// `quiet_ns` (event time).
    last_incident: HashMap<(u64, FindingKind), u64>,
    quiet_ns: u64,
    /// Findings that got no file (rate limit or cap).
    pub suppressed: u64,
    header: Header,
}

impl FlightRecorder {
    /// (VM, kind) pairs remembered for the rate limit; beyond, it starts
    /// over (the file cap still holds).
    const MAX_QUIET: usize = 16_384;

    pub fn new(per_vm: usize, header: Header) -> Self {
        Self {
            per_vm,
            rings: HashMap::new(),
            written: 0,
            max_files: 1000,
            last_incident: HashMap::new(),
            quiet_ns: 600_000_000_000,
            suppressed: 0,
            header,
        }
    }

    /// Keeps `ev` in its VM's ring. The detector's VM table (seen after
    /// `ev`) says which VMs exist: a ring lives as long as its VM is tracked
    /// there, so the rings share its cap and its eviction.
    fn event(&mut self, ev: &Event, detector: &Detector) {
        let Some(kvm) = ev.kvm else {
            return;
        };
        if !detector.knows_vm(kvm) {
            self.rings.remove(&kvm);
            return;
        }
        if self.rings.len() > detector.tracked_vms() {
            // The detector dropped VMs (evicted, or a reused pointer): so
            // the rings never outnumber its VMs by more than this one.
            self.rings.retain(|k, _| detector.knows_vm(*k));
        }
        if self.per_vm == 0 {
            return;
        }
        let ring = self.rings.entry(kvm).or_default();
        if ring.len() == self.per_vm {
            ring.pop_front();
        }
        ring.push_back(ev.clone());
    }

    /// The incident file for `f` (`incident-<time>-<n>-<kind>-vmm<pid>.jsonl`,
    /// written by the log's thread), unless rate-limited or capped.
    fn incident(&mut self, f: &Finding) -> Option<Incident> {
        if f.severity < crate::detector::Severity::Warning {
            return None;
        }
        let key = (f.kvm, f.kind);
        let recent = self
            .last_incident
            .get(&key)
            .is_some_and(|&t| f.ts_ns < t + self.quiet_ns);
        if recent || self.written >= self.max_files {
            self.suppressed += 1;
            return None;
        }
        if self.last_incident.len() >= Self::MAX_QUIET {
            self.last_incident.clear();
        }
        self.last_incident.insert(key, f.ts_ns);
        let clock = self.header.clock;
        let when = utc_compact(clock.to_realtime(f.ts_ns) / 1_000_000_000);
        let mut body = self.header.to_json_record();
        body.push('\n');
        if let Some(ring) = self.rings.get(&f.kvm) {
            for ev in ring {
                body.push_str(&ev.to_json_record());
                body.push('\n');
            }
        }
        body.push_str(&f.to_json_record());
        body.push('\n');
        self.written += 1;
        Some(Incident {
            stem: format!("incident-{when}"),
            suffix: format!(
                "-{}-vmm{}.jsonl",
                f.kind.name(),
                f.userspace_pid.unwrap_or(-1)
            ),
            body,
            label: format!("{} {}", f.severity.name(), f.kind.name()),
        })
    }
}

/// The pipeline.
pub struct Pipeline {
    detector: Detector,
    findings: Vec<Finding>,
    pub tally: Tally,
    pub out: Option<Output>,
    pub recorder: Option<LogSink>,
    pub flight: Option<FlightRecorder>,
    /// Findings to Alertmanager.
    pub alerts: Option<crate::alerts::AlertSink>,
    /// Findings as JSON lines (`--findings-out`).
    pub findings_out: Option<Box<dyn io::Write + Send>>,
    /// Live: VMMs' names, read from `/proc` at first sight and recorded.
    pub names: Option<crate::vmid::VmNames>,
}

impl Pipeline {
    pub fn new(
        out: Option<Output>,
        recorder: Option<LogSink>,
        flight: Option<FlightRecorder>,
    ) -> Self {
        Self {
            detector: Detector::new(DetectorConfig::default()),
            findings: Vec::new(),
            tally: Tally::default(),
            out,
            recorder,
            flight,
            alerts: None,
            findings_out: None,
            names: None,
        }
    }

    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// stdout is gone: a streaming command should stop.
    pub fn stdout_closed(&self) -> bool {
        self.out.as_ref().is_some_and(|o| o.closed)
    }

    pub fn event(&mut self, ev: &Event) {
        *self.tally.by_kind.entry(ev.kind).or_default() += 1;
        *self
            .tally
            .by_probe_kind
            .entry((ev.probe.clone(), ev.kind))
            .or_default() += 1;
        if let Some(o) = self.out.as_mut() {
            o.event(ev);
        }
        // A VMM's names go in the log before its first event.
        if let (Some(names), Some(pid)) = (self.names.as_mut(), ev.userspace_pid)
            && let Some(rec) = names.observe(pid, ev.ts_ns)
            && let Some(r) = self.recorder.as_mut()
        {
            r.vm(&rec);
        }
        if let Some(r) = self.recorder.as_mut() {
            r.event(ev);
        }
        self.detector.observe(ev, &mut self.findings);
        if let Some(f) = self.flight.as_mut() {
            f.event(ev, &self.detector);
        }
        for mut f in std::mem::take(&mut self.findings) {
            if let Some(names) = self.names.as_ref() {
                f.vm = names.get(f.userspace_pid).cloned();
            }
            *self.tally.findings.entry(f.kind).or_default() += 1;
            if let Some(o) = self.out.as_mut() {
                o.finding(&f);
            }
            if let Some(r) = self.recorder.as_mut() {
                r.finding(&f);
            }
            if let Some(a) = self.alerts.as_ref() {
                a.send(&f);
            }
            if let Some(w) = self.findings_out.as_mut()
                && writeln!(w, "{}", f.to_json_record())
                    .and_then(|()| w.flush())
                    .is_err()
            {
                eprintln!("tracer: warning: writing findings output failed; it is now off");
                self.findings_out = None;
            }
            if let Some(inc) = self.flight.as_mut().and_then(|fr| fr.incident(&f))
                && let Some(r) = self.recorder.as_mut()
            {
                r.incident(inc);
            }
        }
    }

    pub fn loss(&mut self, l: &Loss) {
        self.tally.lost += l.lost;
        // Events the probes lost never reached the detector: a teardown may
        // be among them. (The recorder's own drops are lost to the log only.)
        if l.lost > 0 && l.probe != "recorder" {
            self.detector.boundary(crate::detector::Boundary::Gap);
        }
        if let Some(o) = self.out.as_mut() {
            o.loss(l);
        }
        if let Some(r) = self.recorder.as_mut() {
            r.loss(l);
        }
    }

    /// Ends a batch: flushes stdout and hands the batch to the log's
    /// thread (which never fails here: write errors degrade the log there).
    pub fn end_batch(&mut self, now_mono_ns: u64) {
        if let Some(o) = self.out.as_mut() {
            o.flush();
        }
        if let Some(r) = self.recorder.as_mut() {
            r.end_batch(now_mono_ns);
        }
    }

    /// Ends the last batch and closes the log, waiting at most `limit` for
    /// its writer (a frozen filesystem must not hold a stopping daemon
    /// forever); returns its statistics.
    pub fn finish(&mut self, now_mono_ns: u64, limit: Option<Duration>) -> Option<RecorderStats> {
        if let Some(o) = self.out.as_mut() {
            o.flush();
        }
        let stats = self.recorder.take().map(|r| r.close(now_mono_ns, limit));
        if let Some(s) = stats {
            self.tally.incidents = s.incidents;
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn ev(kind: Kind, ts: u64, kvm: u64) -> Event {
        let mut e = Event::bare(kind, ts);
        e.kvm = Some(kvm);
        e.userspace_pid = Some(7);
        e
    }

    /// The rings have no table of their own: a VM torn down or evicted by
    /// the detector loses its ring, so they share the detector's cap.
    #[test]
    fn the_flight_rings_follow_the_detectors_vms() {
        let header = Header::for_this_host("test".into(), "test".into(), vec![]);
        let mut fr = FlightRecorder::new(4, header);
        let mut det = Detector::new(DetectorConfig {
            max_vms: 8,
            ..DetectorConfig::default()
        });
        let mut out = Vec::new();
        for i in 0..100u64 {
            let e = ev(Kind::ZapAllFast, i, 0x1000 + i);
            det.observe(&e, &mut out);
            fr.event(&e, &det);
            assert!(
                fr.rings.len() <= det.tracked_vms() + 1,
                "{}",
                fr.rings.len()
            );
        }
        assert!(det.stats().vms_evicted > 0);
        let known: Vec<u64> = fr
            .rings
            .keys()
            .copied()
            .filter(|&k| det.knows_vm(k))
            .collect();
        assert!(known.contains(&(0x1000 + 99)));
        assert!(fr.rings.len() <= known.len() + 1);

        let e = ev(Kind::VmDestroy, 200, 0x1000 + 99);
        det.observe(&e, &mut out);
        fr.event(&e, &det);
        assert!(!fr.rings.contains_key(&(0x1000 + 99)));
        // A late event of the torn-down VM doesn't bring its ring back.
        let e = ev(Kind::ZapAllFast, 201, 0x1000 + 99);
        det.observe(&e, &mut out);
        fr.event(&e, &det);
        assert!(!fr.rings.contains_key(&(0x1000 + 99)));
    }
}
