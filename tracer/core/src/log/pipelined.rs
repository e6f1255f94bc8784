//! [`read_all`](super::reader::read_all) on several threads, for replay: one
//! thread reads (decompression, line splitting), workers parse the lines
//! (most of a replay's work), and the caller's thread judges them in order
//! with the serial reader's own bookkeeping (`FileState`: line numbers,
//! problems, torn lines, schema checks) and gets the records in order.
//! What runs ahead of the caller is bounded by a fixed number of chunks.

use std::{
    collections::BTreeMap,
    io,
    ops::Range,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
};

use super::reader::{
    FileState, LineInfo, Next, Parsed, ReadStats, Record, next_line, open_input, parse_line,
};

/// A chunk is handed on at this many lines or bytes, whichever comes first.
const CHUNK_LINES: usize = 2048;
const CHUNK_BYTES: usize = 512 << 10;
/// Chunks read and not yet judged, at most (the parsed form of a chunk of
/// findings with all their evidence is a few times its bytes).
const AHEAD: usize = 4;

/// What the reading thread found, in order.
enum Item {
    /// The next file: opened (`source`), or not (its problem in `stats`).
    File {
        stats: ReadStats,
        source: Option<String>,
    },
    /// A line of the current file; its bytes in the chunk's buffer.
    Line(LineInfo, Range<usize>),
    /// The read failed there: the rest of the file is lost.
    Failed(LineInfo, io::Error),
    /// The current file ended.
    End,
}

struct Chunk {
    seq: u64,
    buf: Vec<u8>,
    items: Vec<Item>,
    /// One per `Line` item, filled by a worker.
    parsed: Vec<Parsed>,
}

impl Chunk {
    fn new(seq: u64, buf: Vec<u8>) -> Self {
        Self {
            seq,
            buf,
            items: Vec::with_capacity(CHUNK_LINES + 2),
            parsed: Vec::new(),
        }
    }

    fn full(&self) -> bool {
        self.items.len() >= CHUNK_LINES || self.buf.len() >= CHUNK_BYTES
    }
}

/// Reads `inputs` as [`read_all`](super::reader::read_all) does, giving
/// `on_record` the same records in the same order, with the same problems
/// and counts in `stats`.
pub fn read_all_pipelined(
    inputs: &[PathBuf],
    stats: &mut ReadStats,
    mut on_record: impl FnMut(Record),
) {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
    std::thread::scope(|scope| {
        let (work_tx, work_rx) = mpsc::sync_channel::<Chunk>(AHEAD);
        let (done_tx, done_rx) = mpsc::sync_channel::<Chunk>(AHEAD);
        // One token per chunk allowed ahead of the caller: the buffer the
        // chunk's lines are read into, handed back once they are judged (so
        // the buffers are made once, not per chunk).
        let (token_tx, token_rx) = mpsc::sync_channel::<Vec<u8>>(AHEAD);
        for _ in 0..AHEAD {
            let _ = token_tx.send(Vec::new());
        }
        scope.spawn(move || read(inputs, &work_tx, &token_rx));
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..workers {
            let (work_rx, done_tx) = (Arc::clone(&work_rx), done_tx.clone());
            scope.spawn(move || {
                loop {
                    let next = work_rx
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .recv();
                    let Ok(mut chunk) = next else {
                        return;
                    };
                    parse(&mut chunk);
                    if done_tx.send(chunk).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        judge(&done_rx, &token_tx, stats, &mut on_record);
    });
}

/// The reading thread: files opened in order, lines into chunks.
fn read(inputs: &[PathBuf], work: &mpsc::SyncSender<Chunk>, tokens: &mpsc::Receiver<Vec<u8>>) {
    let mut seq = 0;
    let Ok(buf) = tokens.recv() else {
        return;
    };
    let mut chunk = Chunk::new(seq, buf);
    // Hands the chunk on and starts the next in a buffer handed back.
    let mut flush = |chunk: &mut Chunk| -> bool {
        seq += 1;
        let Ok(mut buf) = tokens.recv() else {
            return false;
        };
        buf.clear();
        let full = std::mem::replace(chunk, Chunk::new(seq, buf));
        work.send(full).is_ok()
    };
    for path in inputs {
        let mut stats = ReadStats::default();
        let opened = open_input(path, &mut stats, &mut |_| {});
        let (source, mut reader) = match opened {
            Some((source, reader)) => (Some(source), Some(reader)),
            None => (None, None),
        };
        chunk.items.push(Item::File { stats, source });
        let Some(reader) = reader.as_mut() else {
            continue;
        };
        let mut line = Vec::with_capacity(1024);
        let mut lineno = 0;
        loop {
            match next_line(reader, &mut line, lineno) {
                Next::End => break,
                Next::Failed(info, e) => {
                    chunk.items.push(Item::Failed(info, e));
                    break;
                }
                Next::Line(info) => {
                    lineno = info.lineno;
                    let start = chunk.buf.len();
                    if !info.overlong {
                        chunk.buf.extend_from_slice(&line);
                    }
                    chunk.items.push(Item::Line(info, start..chunk.buf.len()));
                }
            }
            if chunk.full() && !flush(&mut chunk) {
                return;
            }
        }
        chunk.items.push(Item::End);
    }
    flush(&mut chunk);
}

/// A worker's part: every line of the chunk parsed.
fn parse(chunk: &mut Chunk) {
    chunk.parsed = chunk
        .items
        .iter()
        .filter_map(|item| match item {
            Item::Line(info, range) => Some(parse_line(&chunk.buf[range.clone()], info.overlong)),
            _ => None,
        })
        .collect();
}

/// The caller's thread: chunks put back in order and judged line by line.
fn judge(
    done: &mpsc::Receiver<Chunk>,
    tokens: &mpsc::SyncSender<Vec<u8>>,
    stats: &mut ReadStats,
    on_record: &mut impl FnMut(Record),
) {
    let mut waiting = BTreeMap::new();
    let mut next = 0;
    let mut file: Option<FileState> = None;
    let mut deliver = |_: &str, r: Record| on_record(r);
    for chunk in done {
        waiting.insert(chunk.seq, chunk);
        while let Some(chunk) = waiting.remove(&next) {
            next += 1;
            let mut parsed = chunk.parsed.into_iter();
            // The buffer goes back (a token) once the lines are judged.
            let buf = chunk.buf;
            for item in chunk.items {
                match item {
                    Item::File {
                        stats: opened,
                        source,
                    } => {
                        stats.files += opened.files;
                        for p in opened.problems {
                            stats.problem(p);
                        }
                        match source {
                            Some(s) => file = Some(FileState::new(s)),
                            None => deliver("", Record::Skipped),
                        }
                    }
                    Item::Line(info, _) => {
                        let p = parsed.next().expect("a parse per line");
                        if let Some(f) = file.as_mut() {
                            f.line(info, p, stats, &mut deliver);
                        }
                    }
                    Item::Failed(info, e) => {
                        if let Some(f) = file.as_mut() {
                            f.failed(info, &e, stats, &mut deliver);
                        }
                    }
                    Item::End => {
                        if let Some(f) = file.take() {
                            f.finish(stats);
                        }
                    }
                }
            }
            let _ = tokens.send(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::log::reader::read_all;

    fn both(inputs: &[PathBuf]) -> [(Vec<String>, String); 2] {
        let show = |stats: &ReadStats| {
            let problems: Vec<String> = stats.problems.iter().map(ToString::to_string).collect();
            format!(
                "files {} records {} events {} skipped {} torn {} problems {problems:#?}",
                stats.files, stats.records, stats.events, stats.skipped_lines, stats.torn_lines
            )
        };
        let mut serial = (Vec::new(), ReadStats::default());
        read_all(inputs, &mut serial.1, |_, r| {
            serial.0.push(format!("{r:?}"));
        });
        let mut piped = (Vec::new(), ReadStats::default());
        read_all_pipelined(inputs, &mut piped.1, |r| {
            piped.0.push(format!("{r:?}"));
        });
        [(serial.0, show(&serial.1)), (piped.0, show(&piped.1))]
    }

    /// The pipelined reader gives what the serial one gives, record for
    /// record and problem for problem, across chunk boundaries and on every
    /// kind of bad input.
    #[test]
    fn the_pipelined_reader_reads_what_the_serial_one_reads() {
        let dir = tempfile::tempdir().unwrap();
        let sim = crate::model::simulate(
            crate::model::Behaviour::MirrorFreedByZap,
            crate::model::Scenario::Churn,
            16,
            150,
            3,
        );
        let header = sim.header.to_json_record();
        let mut good = format!("{header}\n");
        for (i, ev) in sim.events.iter().enumerate() {
            good.push_str(&ev.to_json_record());
            good.push('\n');
            match i % 997 {
                1 => good.push_str("{not json\n"),
                2 => good.push('\n'),
                3 => good.push_str("{\"record\":\"loss\",\"probe\":\"x\",\"from_ns\":1,\"to_ns\":2,\"lost\":3,\"reason\":\"r\"}\n"),
                _ => {}
            }
        }
        assert!(sim.events.len() > 3 * CHUNK_LINES, "{}", sim.events.len());
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
            p
        };
        let mut torn = good.clone().into_bytes();
        torn.truncate(torn.len() - 40);
        let mut binary = format!("{header}\n").into_bytes();
        binary.extend_from_slice(b"\xff\xfe\x00garbage\n");
        let long = format!("{header}\n{}\n", "a".repeat((1 << 20) + 10));
        let zst = zstd::encode_all(good.as_bytes(), 1).unwrap();
        let inputs = vec![
            write("good.jsonl", good.as_bytes()),
            write("torn.jsonl", &torn),
            write("empty.jsonl", b""),
            dir.path().join("missing.jsonl"),
            write("binary.jsonl", &binary),
            write("long.jsonl", long.as_bytes()),
            write(
                "schema.jsonl",
                header.replace("\"schema\":1", "\"schema\":99").as_bytes(),
            ),
            write("noheader.jsonl", sim.events[0].to_json_record().as_bytes()),
            write("bad.jsonl.zst", b"not zstd at all"),
            write("good.jsonl.zst", &zst),
            write("cut.jsonl.zst", &zst[..zst.len() / 2]),
        ];
        let [serial, piped] = both(&inputs);
        assert!(serial.0.len() > 2 * sim.events.len(), "{}", serial.0.len());
        assert!(serial.1.contains("torn 1"), "{}", serial.1);
        assert_eq!(serial.1, piped.1);
        assert!(serial.0 == piped.0, "the records differ");
    }
}
