//! `tracer replay`: runs the detector over recorded events (JSON lines, as
//! `watch --json` and `simulate` write them, from files or stdin) and prints
//! the findings. Exit code 1 when there are findings, 0 when there are none.

use std::{
    io::{self, BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use serde::Deserialize;

use crate::{
    Failure,
    detector::{Detector, DetectorConfig, Finding},
    event::Event,
};

/// Exit code when findings were found.
pub const EXIT_FINDINGS: u8 = 1;

/// Where a bad line was, and why.
#[derive(Debug)]
pub struct BadLine {
    pub source: String,
    pub line: u64,
    pub error: String,
}

/// What reading the inputs gave.
#[derive(Debug, Default)]
pub struct ReplayOutcome {
    pub events: u64,
    pub findings: Vec<Finding>,
    pub bad_lines: Vec<BadLine>,
    /// Records that are not events (summaries, findings, headers).
    pub other_records: u64,
}

#[derive(Deserialize)]
struct RecordTag<'a> {
    #[serde(borrow)]
    record: Option<std::borrow::Cow<'a, str>>,
}

/// Feeds every event of `reader` to `detector`.
pub fn replay_reader(
    source: &str,
    reader: impl BufRead,
    detector: &mut Detector,
    outcome: &mut ReplayOutcome,
) -> io::Result<()> {
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        let lineno = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |error: String| BadLine {
            source: source.to_owned(),
            line: lineno,
            error,
        };
        let tag: RecordTag<'_> = match serde_json::from_str(&line) {
            Ok(t) => t,
            Err(e) => {
                outcome
                    .bad_lines
                    .push(bad(format!("not a JSON record: {e}")));
                continue;
            }
        };
        match tag.record.as_deref() {
            Some("event") => match serde_json::from_str::<Event>(&line) {
                Ok(ev) => {
                    outcome.events += 1;
                    detector.observe(&ev, &mut outcome.findings);
                }
                Err(e) => outcome.bad_lines.push(bad(format!("bad event: {e}"))),
            },
            Some("summary" | "finding" | "header" | "loss") => outcome.other_records += 1,
            Some(other) => outcome
                .bad_lines
                .push(bad(format!("unknown record type {other:?}"))),
            None => outcome
                .bad_lines
                .push(bad("no \"record\" field".to_owned())),
        }
    }
    Ok(())
}

/// `tracer replay`.
pub fn run(inputs: &[PathBuf], json: bool) -> Result<u8, Failure> {
    let mut detector = Detector::new(DetectorConfig::default());
    let mut outcome = ReplayOutcome::default();
    let stdin = [PathBuf::from("-")];
    let inputs = if inputs.is_empty() {
        &stdin[..]
    } else {
        inputs
    };
    for path in inputs {
        if path == Path::new("-") {
            replay_reader("<stdin>", io::stdin().lock(), &mut detector, &mut outcome)
                .context("reading stdin")?;
        } else {
            let file = std::fs::File::open(path)
                .with_context(|| format!("can't open {}", path.display()))?;
            replay_reader(
                &path.display().to_string(),
                BufReader::new(file),
                &mut detector,
                &mut outcome,
            )
            .with_context(|| format!("reading {}", path.display()))?;
        }
    }
    let mut out = io::stdout().lock();
    for f in &outcome.findings {
        let r = if json {
            writeln!(out, "{}", f.to_json_record())
        } else {
            writeln!(out, "{}", f.to_text())
        };
        r.map_err(|e| anyhow!("writing findings: {e}"))?;
    }
    for b in &outcome.bad_lines {
        eprintln!("tracer: {}:{}: skipped: {}", b.source, b.line, b.error);
    }
    let stats = detector.stats();
    eprintln!(
        "tracer: replayed {} event(s): {} finding(s), {} bad line(s) skipped, {} other record(s); \
         state evicted by caps: {} VM(s), {} vCPU(s)",
        outcome.events,
        outcome.findings.len(),
        outcome.bad_lines.len(),
        outcome.other_records,
        stats.vms_evicted,
        stats.vcpus_evicted
    );
    Ok(if outcome.findings.is_empty() {
        0
    } else {
        EXIT_FINDINGS
    })
}
