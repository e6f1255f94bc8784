//! The event log's own thread. The thread that drains the ring buffer and
//! serves metrics never writes a file: it serializes records into a batch and
//! hands the batch to a writer thread through a bounded queue. A slow or
//! frozen log filesystem (`fsfreeze`, a hung NFS server) then stalls only
//! the writer; detection, metrics and alerts go on. When the queue is full
//! a batch is dropped, counted, and a `loss` record says so once the writer
//! takes batches again. Incident files are written by the same thread.

use std::{
    io,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use super::{
    Loss,
    writer::{Recorder, RecorderStats, create_private},
};
use crate::{detector::Finding, event::Event};

/// Batches waiting for the writer, at most.
const MAX_QUEUED_JOBS: usize = 1024;
/// Bytes waiting for the writer, at most: the memory a stalled log can take.
const MAX_QUEUED_BYTES: u64 = 16 << 20;
/// Batch buffers kept for reuse (each kept at most 1 MiB).
const FREE_BUFFERS: usize = 4;

/// An incident file to write: `<stem>-<n><suffix>` in the log folder, the
/// first free `n` from the writer's counter.
pub struct Incident {
    pub stem: String,
    pub suffix: String,
    pub body: String,
    /// "critical mirror_root_invalid_at_entry", for the message.
    pub label: String,
}

enum Job {
    /// Record lines (each ending in a newline), then a flush.
    Batch {
        lines: Vec<u8>,
        records: u64,
        first_ts_ns: u64,
        now_ns: u64,
    },
    Incident(Incident),
    /// SIGHUP: a new segment.
    Reopen,
}

impl Job {
    fn bytes(&self) -> u64 {
        match self {
            Job::Batch { lines, .. } => lines.len() as u64,
            Job::Incident(i) => i.body.len() as u64,
            Job::Reopen => 0,
        }
    }

    fn records(&self) -> u64 {
        match self {
            Job::Batch { records, .. } => *records,
            _ => 0,
        }
    }
}

/// What the writer thread publishes after each job.
#[derive(Default)]
struct Shared {
    stats: RecorderStats,
    failing: Option<String>,
    /// Since when the writer is on its current job.
    busy_since: Option<Instant>,
}

/// A job taking longer than this makes the log "failing" (stalled).
const STALLED_AFTER: Duration = Duration::from_secs(5);

/// The writing end as the pipeline sees it.
pub struct LogSink {
    tx: Option<SyncSender<Job>>,
    /// Batch buffers the writer is done with, to fill again: the steady
    /// state allocates nothing.
    free: Receiver<Vec<u8>>,
    done: Receiver<RecorderStats>,
    shared: Arc<Mutex<Shared>>,
    queued_bytes: Arc<AtomicU64>,
    queued_records: Arc<AtomicU64>,
    /// Block when the queue is full (simulation: nothing may be lost)
    /// instead of dropping (live: the ring buffer must be drained).
    block: bool,
    batch: Vec<u8>,
    batch_records: u64,
    batch_first_ts: Option<u64>,
    /// Time and host of each record; the clocks are read again for each
    /// batch, so wall time follows NTP's steps.
    stamp: crate::log::writer::Stamp,
    /// Re-read the clocks (live); a simulation keeps its model clock.
    live_clock: bool,
    /// Records the queue could not take, not yet in a loss record: (count,
    /// since).
    pending_loss: Option<(u64, u64)>,
    /// Records the queue could not take, in all.
    dropped: u64,
    /// Incident files not queued.
    incidents_lost: u64,
    /// Batch buffers made.
    buffers: usize,
}

impl LogSink {
    /// Moves `recorder` to a thread of its own. `block`: wait for room in
    /// the queue instead of dropping.
    pub fn spawn(recorder: Recorder, block: bool) -> io::Result<Self> {
        let stamp = recorder.stamp();
        let (tx, rx) = mpsc::sync_channel(MAX_QUEUED_JOBS);
        let (done_tx, done) = mpsc::sync_channel(1);
        let (free_tx, free) = mpsc::sync_channel(FREE_BUFFERS);
        let shared = Arc::new(Mutex::new(Shared {
            stats: recorder.stats(),
            failing: recorder.failing().map(str::to_owned),
            busy_since: None,
        }));
        let queued_bytes = Arc::new(AtomicU64::new(0));
        let queued_records = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            recorder,
            shared: shared.clone(),
            queued_bytes: queued_bytes.clone(),
            queued_records: queued_records.clone(),
            next_incident: 0,
            free: free_tx,
        };
        std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || {
                let stats = worker.run(&rx);
                let _ = done_tx.send(stats);
            })?;
        Ok(Self {
            tx: Some(tx),
            free,
            done,
            shared,
            queued_bytes,
            queued_records,
            block,
            batch: Vec::with_capacity(64 * 1024),
            batch_records: 0,
            batch_first_ts: None,
            stamp,
            live_clock: !block,
            pending_loss: None,
            dropped: 0,
            incidents_lost: 0,
            buffers: 1,
        })
    }

    /// Before a record: a new batch reads the clocks again (live).
    fn begin(&mut self) {
        if self.live_clock && self.batch_records == 0 {
            self.stamp.clock = crate::log::ClockPair::now();
        }
    }

    fn push(&mut self, ts_ns: u64) {
        self.stamp.apply(&mut self.batch, ts_ns);
        self.batch.push(b'\n');
        self.batch_records += 1;
        self.batch_first_ts.get_or_insert(ts_ns);
    }

    pub fn event(&mut self, ev: &Event) {
        self.begin();
        ev.write_json_record(&mut self.batch);
        self.push(ev.ts_ns);
    }

    pub fn finding(&mut self, f: &Finding) {
        self.begin();
        self.batch.extend_from_slice(f.to_json_record().as_bytes());
        self.push(f.ts_ns);
    }

    pub fn vm(&mut self, v: &crate::vmid::VmRecord) {
        self.begin();
        self.batch.extend_from_slice(v.to_json_record().as_bytes());
        self.push(v.ts_ns);
    }

    pub fn loss(&mut self, l: &Loss) {
        self.begin();
        self.batch.extend_from_slice(l.to_json_record().as_bytes());
        self.push(l.to_ns);
    }

    /// Queues an incident file; `false` if the queue had no room.
    pub fn incident(&mut self, inc: Incident) -> bool {
        let ok = self.send(Job::Incident(inc));
        if !ok {
            self.incidents_lost += 1;
        }
        ok
    }

    /// Queues `job`: waits for room when blocking, else gives up when the
    /// queue is full (jobs or bytes). `true` if queued.
    fn send(&mut self, job: Job) -> bool {
        let Some(tx) = self.tx.as_ref() else {
            return false;
        };
        let (bytes, records) = (job.bytes(), job.records());
        if !self.block && self.queued_bytes.load(Ordering::Acquire) + bytes > MAX_QUEUED_BYTES {
            return false;
        }
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.queued_records.fetch_add(records, Ordering::AcqRel);
        let sent = if self.block {
            tx.send(job).is_ok()
        } else {
            match tx.try_send(job) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            }
        };
        if !sent {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.queued_records.fetch_sub(records, Ordering::AcqRel);
        }
        sent
    }

    /// An empty batch buffer: one the writer gave back, else a new one.
    /// Blocking, at most `FREE_BUFFERS` exist and the writer's next one is
    /// waited for, so the steady state allocates nothing.
    fn free_buffer(&mut self) -> Vec<u8> {
        if let Ok(b) = self.free.try_recv() {
            return b;
        }
        if self.block && self.buffers >= FREE_BUFFERS {
            // Polled, not `recv`: a channel's first blocking wait allocates
            // its thread's waiter.
            loop {
                match self.free.try_recv() {
                    Ok(b) => return b,
                    Err(mpsc::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
        }
        self.buffers += 1;
        Vec::with_capacity(64 * 1024)
    }

    /// Ends a batch: hands it to the writer, which writes, flushes, fsyncs
    /// and rotates per policy. Never blocks on the disk.
    pub fn end_batch(&mut self, now_ns: u64) {
        if self.batch_records == 0 && self.pending_loss.is_none() {
            // Nothing to write: still let the writer rotate by age, fsync
            // and retry a failed log, unless it has work queued anyway.
            if self.queued_records.load(Ordering::Acquire) == 0
                && self.queued_bytes.load(Ordering::Acquire) == 0
            {
                self.send(Job::Batch {
                    lines: Vec::new(),
                    records: 0,
                    first_ts_ns: now_ns,
                    now_ns,
                });
            }
            return;
        }
        let next = self.free_buffer();
        let mut lines = std::mem::replace(&mut self.batch, next);
        let mut records = std::mem::take(&mut self.batch_records);
        let first_ts_ns = self.batch_first_ts.take().unwrap_or(now_ns);
        if let Some((n, from)) = self.pending_loss {
            let loss = Loss {
                probe: "recorder".into(),
                from_ns: from,
                to_ns: now_ns,
                lost: n,
                reason: "the log writer fell behind (a slow or frozen log filesystem)".into(),
            };
            let mut with_loss = loss.to_json_record().into_bytes();
            with_loss.push(b'\n');
            with_loss.extend_from_slice(&lines);
            lines = with_loss;
            records += 1;
        }
        let job = Job::Batch {
            lines,
            records,
            first_ts_ns,
            now_ns,
        };
        if self.send(job) {
            self.pending_loss = None;
        } else {
            let lost = records - u64::from(self.pending_loss.is_some());
            self.dropped += lost;
            let (n, from) = self.pending_loss.unwrap_or((0, first_ts_ns));
            self.pending_loss = Some((n + lost, from));
        }
    }

    /// SIGHUP: the writer opens a new segment.
    pub fn reopen(&mut self) {
        if !self.send(Job::Reopen) {
            eprintln!("tracer: warning: the event log writer is busy; not reopened");
        }
    }

    /// What was written and lost: the writer's figures and the records the
    /// queue could not take.
    pub fn stats(&self) -> RecorderStats {
        let mut s = self.shared.lock().map(|s| s.stats).unwrap_or_default();
        s.dropped += self.dropped;
        s.incidents_lost += self.incidents_lost;
        s
    }

    /// Why the log can't be written now, if it can't: the writer's own
    /// reason, or a writer that has not taken a batch for a while.
    pub fn failing(&self) -> Option<String> {
        let s = self.shared.lock().ok()?;
        match s.busy_since {
            Some(t) if t.elapsed() >= STALLED_AFTER => Some(format!(
                "the log writer has been stuck for {} s (a frozen or hung log filesystem?)",
                t.elapsed().as_secs()
            )),
            _ => s.failing.clone(),
        }
    }

    /// Hands over the last batch and waits (at most `limit`, when given)
    /// for the writer to close the log. A writer stuck on a frozen
    /// filesystem is left behind with a warning, and what it still held is
    /// counted as lost.
    pub fn close(mut self, now_ns: u64, limit: Option<Duration>) -> RecorderStats {
        let deadline = limit.map(|l| Instant::now() + l);
        self.end_batch(now_ns);
        // The last batch found the queue full: its records are counted;
        // wait (bounded) for room for the loss record that says so.
        while self.pending_loss.is_some() && deadline.is_some_and(|d| Instant::now() < d) {
            std::thread::sleep(Duration::from_millis(20));
            self.end_batch(now_ns);
        }
        drop(self.tx.take());
        let got = match deadline {
            None => self.done.recv().ok(),
            Some(d) => self
                .done
                .recv_timeout(d.saturating_duration_since(Instant::now()))
                .ok(),
        };
        if let Some(mut s) = got {
            s.dropped += self.dropped;
            s.incidents_lost += self.incidents_lost;
            return s;
        }
        let mut s = self.stats();
        let stuck = self.queued_records.load(Ordering::Acquire);
        s.dropped += stuck;
        eprintln!(
            "tracer: warning: the event log writer did not finish in time (a frozen or hung log \
             filesystem?); {stuck} queued record(s) are lost"
        );
        s
    }
}

struct Worker {
    recorder: Recorder,
    shared: Arc<Mutex<Shared>>,
    queued_bytes: Arc<AtomicU64>,
    queued_records: Arc<AtomicU64>,
    /// The number in the next incident file's name.
    next_incident: u64,
    free: SyncSender<Vec<u8>>,
}

impl Worker {
    fn run(mut self, rx: &Receiver<Job>) -> RecorderStats {
        while let Ok(job) = rx.recv() {
            let (bytes, records) = (job.bytes(), job.records());
            if let Ok(mut s) = self.shared.lock() {
                s.busy_since = Some(Instant::now());
            }
            match job {
                Job::Batch {
                    lines,
                    records,
                    first_ts_ns,
                    now_ns,
                } => {
                    self.recorder.lines(first_ts_ns, records, &lines);
                    let _ = self.recorder.flush(now_ns);
                    if lines.capacity() > 0 {
                        let mut lines = lines;
                        lines.clear();
                        lines.shrink_to(1 << 20);
                        let _ = self.free.try_send(lines);
                    }
                }
                Job::Incident(inc) => match self.incident(&inc) {
                    Ok(path) => {
                        eprintln!("tracer: {}: incident file {}", inc.label, path.display());
                        self.recorder.count_incident(true);
                    }
                    Err(e) => {
                        eprintln!("tracer: warning: writing the incident file: {e}");
                        self.recorder.count_incident(false);
                    }
                },
                Job::Reopen => {
                    let _ = self.recorder.reopen();
                    eprintln!("tracer: SIGHUP: reopened the event log");
                }
            }
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.queued_records.fetch_sub(records, Ordering::AcqRel);
            if let Ok(mut s) = self.shared.lock() {
                s.stats = self.recorder.stats();
                s.failing = self.recorder.failing().map(str::to_owned);
                s.busy_since = None;
            }
        }
        let stats = match self.recorder.close() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tracer: warning: closing the event log: {e}");
                self.shared.lock().map(|s| s.stats).unwrap_or_default()
            }
        };
        if let Ok(mut s) = self.shared.lock() {
            s.stats = stats;
        }
        stats
    }

    /// Never through a planted symlink or over an existing file: the next
    /// number is taken instead.
    fn incident(&mut self, inc: &Incident) -> io::Result<PathBuf> {
        let dir = self.recorder.dir().to_path_buf();
        let mut n = self.next_incident;
        let (path, mut file) = loop {
            let path = dir.join(format!("{}-{n}{}", inc.stem, inc.suffix));
            match create_private(&path) {
                Ok(f) => break (path, f),
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && n < self.next_incident + 1000 =>
                {
                    n += 1;
                }
                Err(e) => return Err(e),
            }
        };
        self.next_incident = n + 1;
        if let Err(e) = io::Write::write_all(&mut file, inc.body.as_bytes()) {
            // No half incident file: it would read as a torn one.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }
}
