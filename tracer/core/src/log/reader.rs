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
        let Some((source, reader)) =
            open_input(path, stats, &mut |s| on_record(s, Record::Skipped))
        else {
            continue;
        };
        read_one(&source, reader, stats, &mut on_record);
    }
}

/// Opens one input for reading (decompressing `.gz` and `.zst`), or says
/// why it can't be read (counted in `stats`, one `Skipped` record).
pub(super) fn open_input(
    path: &Path,
    stats: &mut ReadStats,
    skipped: &mut impl FnMut(&str),
) -> Option<(String, BufReader<Box<dyn Read + Send>>)> {
    stats.files += 1;
    let source = if path == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        path.display().to_string()
    };
    let mut fail = |stats: &mut ReadStats, message: String| {
        stats.problem(Problem {
            source: source.clone(),
            line: None,
            kind: ProblemKind::BadFile,
            message,
        });
        skipped(&source);
    };
    // Only regular files: a device (/dev/zero) or a FIFO would feed or
    // block the reader forever.
    if path != Path::new("-")
        && let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        fail(
            stats,
            "not a regular file (a device, FIFO or socket); skipped".into(),
        );
        return None;
    }
    let reader: Box<dyn Read + Send> = if path == Path::new("-") {
        Box::new(io::stdin())
    } else {
        match std::fs::File::open(path) {
            Ok(f) if path.extension().is_some_and(|e| e == "gz") => {
                Box::new(flate2::read::MultiGzDecoder::new(f))
            }
            Ok(f) if path.extension().is_some_and(|e| e == "zst") => match zstd::Decoder::new(f) {
                Ok(d) => Box::new(d),
                Err(e) => {
                    fail(stats, format!("not zstd data: {e}"));
                    return None;
                }
            },
            Ok(f) => Box::new(f),
            Err(e) => {
                fail(stats, format!("can't open: {e}"));
                return None;
            }
        }
    };
    Some((source, BufReader::with_capacity(256 * 1024, reader)))
}

/// One line as the line source read it.
#[derive(Clone, Copy, Debug)]
pub(super) struct LineInfo {
    pub(super) lineno: u64,
    /// It ended in a newline (a last line without one may be torn).
    pub(super) complete: bool,
    /// Longer than [`MAX_LINE`]: its bytes were not kept.
    pub(super) overlong: bool,
}

/// What reading the next line gave.
pub(super) enum Next {
    Line(LineInfo),
    /// The read failed (corrupt or truncated compressed data).
    Failed(LineInfo, io::Error),
    End,
}

/// Reads the next line of `reader` into `buf` (cleared first), up to
/// [`MAX_LINE`] bytes; the rest of an overlong line is skipped unkept.
pub(super) fn next_line(reader: &mut impl BufRead, buf: &mut Vec<u8>, lineno: u64) -> Next {
    buf.clear();
    let info = |complete, overlong| LineInfo {
        lineno: lineno + 1,
        complete,
        overlong,
    };
    match (&mut *reader).take(MAX_LINE + 1).read_until(b'\n', buf) {
        Ok(0) => Next::End,
        Ok(n) => {
            let complete = buf.last() == Some(&b'\n');
            let overlong = n as u64 > MAX_LINE;
            if !complete && overlong {
                skip_line(reader);
            }
            Next::Line(info(complete, overlong))
        }
        Err(e) => Next::Failed(info(false, false), e),
    }
}

/// What one line holds, judged alone: pure, so lines can be parsed on
/// several threads and judged in order afterwards.
pub(super) enum Parsed {
    Blank,
    NotUtf8,
    Overlong,
    Record(Result<Record, String>),
}

pub(super) fn parse_line(bytes: &[u8], overlong: bool) -> Parsed {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Parsed::NotUtf8;
    };
    if overlong {
        return Parsed::Overlong;
    }
    let text = text.trim_end();
    if text.is_empty() {
        return Parsed::Blank;
    }
    Parsed::Record(parse(text))
}

/// One file's lines judged in order: statistics, problems with their line
/// numbers, the first record's checks, and a torn last line.
pub(super) struct FileState {
    source: String,
    lines: u64,
    records: u64,
    /// A problem on the last line read: a torn line if no line follows.
    pending: Option<(u64, Problem)>,
    /// The file's schema is not ours: the rest of it is not read, and its
    /// end is not judged.
    stopped: bool,
}

impl FileState {
    pub(super) fn new(source: String) -> Self {
        Self {
            source,
            lines: 0,
            records: 0,
            pending: None,
            stopped: false,
        }
    }

    fn problem_at(&self, line: u64, kind: ProblemKind, message: String) -> Problem {
        Problem {
            source: self.source.clone(),
            line: Some(line),
            kind,
            message,
        }
    }

    /// Judges one line; records go to `on_record`.
    pub(super) fn line(
        &mut self,
        info: LineInfo,
        parsed: Parsed,
        stats: &mut ReadStats,
        on_record: &mut impl FnMut(&str, Record),
    ) {
        if self.stopped {
            return;
        }
        self.lines = info.lineno;
        // A problem on the line before this one was not the last line after
        // all: it is a bad line, not a torn one.
        if let Some((_, p)) = self.pending.take() {
            stats.problem(p);
        }
        let line = info.lineno;
        let record = match parsed {
            Parsed::Blank => return,
            Parsed::NotUtf8 => {
                stats.skipped_lines += 1;
                stats.problem(self.problem_at(
                    line,
                    ProblemKind::Binary,
                    "not UTF-8 text (binary data?); skipped".into(),
                ));
                on_record(&self.source, Record::Skipped);
                return;
            }
            Parsed::Overlong => {
                stats.skipped_lines += 1;
                stats.problem(self.problem_at(
                    line,
                    ProblemKind::Binary,
                    format!("line longer than {MAX_LINE} bytes; skipped"),
                ));
                on_record(&self.source, Record::Skipped);
                return;
            }
            Parsed::Record(Err(e)) => {
                stats.skipped_lines += 1;
                let p = self.problem_at(line, ProblemKind::BadLine, format!("{e}; skipped"));
                on_record(&self.source, Record::Skipped);
                if info.complete {
                    stats.problem(p);
                } else {
                    // No newline: maybe the torn last line of a crash.
                    self.pending = Some((line, p));
                }
                return;
            }
            Parsed::Record(Ok(record)) => record,
        };
        if self.records == 0
            && let Some((kind, message)) = first_record_problem(&record)
        {
            let fatal = kind == ProblemKind::WrongSchema;
            stats.problem(self.problem_at(line, kind, message));
            if fatal {
                self.stopped = true;
                return;
            }
        }
        self.records += 1;
        stats.records += 1;
        if matches!(record, Record::Event(_)) {
            stats.events += 1;
        }
        on_record(&self.source, record);
    }

    /// The read failed at `info`: the rest of the file is lost.
    pub(super) fn failed(
        &mut self,
        info: LineInfo,
        e: &io::Error,
        stats: &mut ReadStats,
        on_record: &mut impl FnMut(&str, Record),
    ) {
        stats.problem(self.problem_at(
            info.lineno,
            ProblemKind::BadFile,
            format!("read failed (corrupt or truncated compressed data?): {e}"),
        ));
        on_record(&self.source, Record::Skipped);
    }

    /// The file's end: a torn last line, or an empty file (not for a file
    /// whose schema stopped the read).
    pub(super) fn finish(self, stats: &mut ReadStats) {
        if !self.stopped {
            finish_file(&self.source, self.lines, self.pending, stats);
        }
    }
}

/// Reads one file's lines.
pub fn read_one(
    source: &str,
    mut reader: impl BufRead,
    stats: &mut ReadStats,
    on_record: &mut impl FnMut(&str, Record),
) {
    let mut buf = Vec::with_capacity(1024);
    let mut file = FileState::new(source.to_owned());
    let mut lineno = 0;
    loop {
        match next_line(&mut reader, &mut buf, lineno) {
            Next::End => break,
            Next::Failed(info, e) => {
                file.failed(info, &e, stats, on_record);
                break;
            }
            Next::Line(info) => {
                lineno = info.lineno;
                file.line(info, parse_line(&buf, info.overlong), stats, on_record);
                if file.stopped {
                    return;
                }
            }
        }
    }
    file.finish(stats);
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
