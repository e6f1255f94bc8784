//! Reading event logs: files, folders of rotated segments (in order),
//! zstd-compressed segments, and stdin. Bad input never stops the read:
//! each problem is reported with its file and line, the valid records
//! around it are still delivered, and the skipped lines are counted.

use std::{
    io::{self, BufRead, BufReader, Read},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{Header, Loss, SCHEMA_VERSION, writer::scan_segments};
use crate::{detector::Finding, event::Event};

/// Longest line accepted; longer ones (binary data) are skipped.
const MAX_LINE: u64 = 1 << 20;

/// One record of the log.
#[derive(Debug)]
pub enum Record {
    Header(Box<Header>),
    Event(Box<Event>),
    Finding(Box<Finding>),
    Loss(Loss),
    /// A VMM's names (QEMU `-name`, `-uuid`, the libvirt domain).
    Vm(Box<crate::vmid::VmRecord>),
    /// `watch --json` summaries: not part of the log's content.
    Summary,
    /// Not in the file: a line (or a whole file) here could not be read, so
    /// whatever it recorded is missing. A gap, as a `loss` record is.
    Skipped,
}

/// What went wrong where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// A line that is not a valid record; skipped.
    BadLine,
    /// The last line stops mid-record: the writer was stopped mid-write.
    TornLine,
    /// A line that is not UTF-8 text (or too long to be a record).
    Binary,
    /// The header names a schema this build can't read; file skipped.
    WrongSchema,
    /// The file does not start with a header; read as the current schema.
    NoHeader,
    /// The file has no records.
    Empty,
    /// The file can't be opened or decompressed.
    BadFile,
}

#[derive(Clone, Debug)]
pub struct Problem {
    pub source: String,
    pub line: Option<u64>,
    pub kind: ProblemKind,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

/// Totals of a read.
#[derive(Clone, Debug, Default)]
pub struct ReadStats {
    pub files: u64,
    pub records: u64,
    pub events: u64,
    /// Lines skipped (bad, binary, torn).
    pub skipped_lines: u64,
    pub torn_lines: u64,
    /// The first [`PROBLEMS_KEPT`] problems; the rest are only counted.
    pub problems: Vec<Problem>,
    pub problems_not_kept: u64,
}

/// Problems kept for the report: a file of millions of bad lines must not
/// take memory for each.
pub const PROBLEMS_KEPT: usize = 1000;

impl ReadStats {
    pub fn problem(&mut self, p: Problem) {
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(p);
        } else {
            self.problems_not_kept += 1;
        }
    }
}

/// Why the inputs can't be read at all.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}: no such file or folder")]
    Missing(PathBuf),
    #[error("{0}: not a regular file or folder (a device, FIFO or socket); not read")]
    NotRegular(PathBuf),
    #[error(
        "{0}: no event logs in this folder (looked for events-*.jsonl, .jsonl.zst and .jsonl.gz)"
    )]
    EmptyDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Files to read, in order: folders expand to their segments, oldest first;
/// `-` is stdin.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut out = Vec::new();
    for input in inputs {
        if input == Path::new("-") {
            out.push(input.clone());
        } else if input.is_dir() {
            let (segs, ignored) = scan_segments(input).map_err(|source| InputError::Io {
                path: input.clone(),
                source,
            })?;
            for (path, why) in ignored {
                eprintln!("tracer: warning: {}: ignored: {why}", path.display());
            }
            if segs.is_empty() {
                return Err(InputError::EmptyDir(input.clone()));
            }
            out.extend(segs.into_iter().map(|(p, _)| p));
        } else if input.is_file() {
            out.push(input.clone());
        } else if input.exists() {
            // A device (/dev/zero) or a FIFO would feed or block the reader
            // forever.
            return Err(InputError::NotRegular(input.clone()));
        } else {
            return Err(InputError::Missing(input.clone()));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(borrow)]
    record: Option<std::borrow::Cow<'a, str>>,
}

/// Reads every input in order, handing each record to `on_record`.
pub fn read_all(
    inputs: &[PathBuf],
    stats: &mut ReadStats,
    mut on_record: impl FnMut(&str, Record),
) {
    for path in inputs {
        stats.files += 1;
        let source = if path == Path::new("-") {
            "<stdin>".to_owned()
        } else {
            path.display().to_string()
        };
        let problem = |kind, message: String| Problem {
            source: source.clone(),
            line: None,
            kind,
            message,
        };
        // Only regular files: a device (/dev/zero) or a FIFO would feed or
        // block the reader forever.
        if path != Path::new("-")
            && let Ok(meta) = std::fs::metadata(path)
            && !meta.is_file()
        {
            stats.problem(problem(
                ProblemKind::BadFile,
                "not a regular file (a device, FIFO or socket); skipped".into(),
            ));
            on_record(&source, Record::Skipped);
            continue;
        }
        let reader: Box<dyn Read> = if path == Path::new("-") {
            Box::new(io::stdin().lock())
        } else {
            match std::fs::File::open(path) {
                Ok(f) if path.extension().is_some_and(|e| e == "gz") => {
                    Box::new(flate2::read::MultiGzDecoder::new(f))
                }
                Ok(f) if path.extension().is_some_and(|e| e == "zst") => {
                    match zstd::Decoder::new(f) {
                        Ok(d) => Box::new(d),
                        Err(e) => {
                            stats
                                .problems
                                .push(problem(ProblemKind::BadFile, format!("not zstd data: {e}")));
                            on_record(&source, Record::Skipped);
                            continue;
                        }
                    }
                }
                Ok(f) => Box::new(f),
                Err(e) => {
                    stats
                        .problems
                        .push(problem(ProblemKind::BadFile, format!("can't open: {e}")));
                    on_record(&source, Record::Skipped);
                    continue;
                }
            }
        };
        read_one(
            &source,
            BufReader::with_capacity(256 * 1024, reader),
            stats,
            &mut on_record,
        );
    }
}

/// [`read_all`] with the reading (decompression, line splitting, JSON
/// parsing: most of a replay's work) on a thread of its own, handing the
/// records over in order, in batches, to `on_record` on this thread.
pub fn read_all_pipelined(
    inputs: &[PathBuf],
    stats: &mut ReadStats,
    mut on_record: impl FnMut(Record),
) {
    /// Events per hand-over (a finding counts its evidence), and
    /// hand-overs in flight at most: what the reader runs ahead by stays
    /// bounded even when each line is a finding with thousands of events.
    const BATCH: usize = 1024;
    const IN_FLIGHT: usize = 4;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Record>>(IN_FLIGHT);
        let reader = scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let mut weight = 0;
            read_all(inputs, stats, |_, record| {
                weight += match &record {
                    Record::Finding(f) => 1 + f.evidence.len(),
                    _ => 1,
                };
                batch.push(record);
                if weight >= BATCH {
                    weight = 0;
                    // The receiver only goes away if it panicked.
                    let _ = tx.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
                }
            });
            let _ = tx.send(batch);
        });
        for batch in rx {
            for record in batch {
                on_record(record);
            }
        }
        if let Err(panic) = reader.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Reads one file's lines.
pub fn read_one(
    source: &str,
    mut reader: impl BufRead,
    stats: &mut ReadStats,
    on_record: &mut impl FnMut(&str, Record),
) {
    let mut buf = Vec::with_capacity(1024);
    let mut lineno = 0u64;
    let mut records_here = 0u64;
    let mut pending: Option<(u64, Problem)> = None;
    loop {
        buf.clear();
        let n = match (&mut reader).take(MAX_LINE + 1).read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                stats.problem(Problem {
                    source: source.to_owned(),
                    line: Some(lineno + 1),
                    kind: ProblemKind::BadFile,
                    message: format!("read failed (corrupt or truncated compressed data?): {e}"),
                });
                on_record(source, Record::Skipped);
                break;
            }
        };
        if n == 0 {
            break;
        }
        lineno += 1;
        // A problem on the line before this one was not the last line after
        // all: it is a bad line, not a torn one.
        if let Some((_, p)) = pending.take() {
            stats.problem(p);
        }
        let complete = buf.last() == Some(&b'\n');
        if !complete && n as u64 > MAX_LINE {
            // Skip the rest of an overlong line without keeping it.
            skip_line(&mut reader);
        }
        let bad = |kind, message: String| Problem {
            source: source.to_owned(),
            line: Some(lineno),
            kind,
            message,
        };
        let Ok(text) = std::str::from_utf8(&buf) else {
            stats.skipped_lines += 1;
            stats.problem(bad(
                ProblemKind::Binary,
                "not UTF-8 text (binary data?); skipped".into(),
            ));
            on_record(source, Record::Skipped);
            continue;
        };
        if n as u64 > MAX_LINE {
            stats.skipped_lines += 1;
            stats.problem(bad(
                ProblemKind::Binary,
                format!("line longer than {MAX_LINE} bytes; skipped"),
            ));
            on_record(source, Record::Skipped);
            continue;
        }
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        match parse(text) {
            Ok(record) => {
                if records_here == 0
                    && let Some(p) = first_record_problem(&record)
                {
                    let fatal = p.0 == ProblemKind::WrongSchema;
                    stats.problem(bad(p.0, p.1));
                    if fatal {
                        return;
                    }
                }
                records_here += 1;
                stats.records += 1;
                if matches!(record, Record::Event(_)) {
                    stats.events += 1;
                }
                on_record(source, record);
            }
            Err(e) => {
                stats.skipped_lines += 1;
                let p = bad(ProblemKind::BadLine, format!("{e}; skipped"));
                on_record(source, Record::Skipped);
                if complete {
                    stats.problem(p);
                } else {
                    // No newline: maybe the torn last line of a crash.
                    pending = Some((lineno, p));
                }
            }
        }
    }
    finish_file(source, lineno, pending, stats);
}

/// Consumes input up to and including the next newline, storing nothing.
fn skip_line(reader: &mut impl BufRead) {
    loop {
        let (done, used) = match reader.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(used);
        if done {
            return;
        }
    }
}

/// The end of a file: a pending bad last line is a torn one; no line at
/// all is an empty file.
fn finish_file(source: &str, lines: u64, pending: Option<(u64, Problem)>, stats: &mut ReadStats) {
    if let Some((line, mut p)) = pending {
        stats.torn_lines += 1;
        p.kind = ProblemKind::TornLine;
        p.message = format!(
            "the last line (line {line}) stops mid-record: the writer was stopped while \
             writing; the records before it are intact"
        );
        stats.problem(p);
    }
    if lines == 0 {
        stats.problem(Problem {
            source: source.to_owned(),
            line: None,
            kind: ProblemKind::Empty,
            message: "file is empty".into(),
        });
    }
}

/// What is wrong with a file's first record, if anything.
fn first_record_problem(record: &Record) -> Option<(ProblemKind, String)> {
    match record {
        Record::Header(h) if h.schema != SCHEMA_VERSION => Some((
            ProblemKind::WrongSchema,
            format!(
                "schema version {}, but this tracer reads version {SCHEMA_VERSION}; file skipped",
                h.schema
            ),
        )),
        Record::Header(_) => None,
        _ => Some((
            ProblemKind::NoHeader,
            format!(
                "the first record is not a header; reading the file as schema {SCHEMA_VERSION}"
            ),
        )),
    }
}

/// Parses one record line.
pub fn parse(text: &str) -> Result<Record, String> {
    // The writer puts the record type first: read it without parsing the
    // line twice (any other line goes through the full tag parse).
    let fast = text
        .strip_prefix("{\"record\":\"")
        .and_then(|rest| rest.split_once('"'))
        .map(|(kind, _)| kind)
        .filter(|k| matches!(*k, "event" | "finding" | "loss" | "vm"));
    let tag;
    let kind = if let Some(k) = fast {
        k
    } else {
        tag = serde_json::from_str::<Tag<'_>>(text)
            .map_err(|e| format!("not a JSON record ({e})"))?;
        tag.record
            .as_deref()
            .ok_or_else(|| "no \"record\" field".to_owned())?
    };
    // A line that is not JSON at all reads as such, whichever way its type
    // was found (the full tag parse stops at the same place).
    let bad = |what: &str, e: serde_json::Error| {
        if e.is_syntax() || e.is_eof() {
            format!("not a JSON record ({e})")
        } else {
            format!("bad {what} record ({e})")
        }
    };
    Ok(match kind {
        "event" => Record::Event(Box::new(match crate::event_json::parse_event(text) {
            Some(ev) => ev,
            None => serde_json::from_str(text).map_err(|e| bad("event", e))?,
        })),
        "finding" => Record::Finding(Box::new(
            serde_json::from_str(text).map_err(|e| bad("finding", e))?,
        )),
        "loss" => Record::Loss(serde_json::from_str(text).map_err(|e| bad("loss", e))?),
        "header" => Record::Header(Box::new(
            serde_json::from_str(text).map_err(|e| bad("header", e))?,
        )),
        "vm" => Record::Vm(Box::new(
            serde_json::from_str(text).map_err(|e| bad("vm", e))?,
        )),
        "summary" => Record::Summary,
        other => return Err(format!("unknown record type {other:?}")),
    })
}
