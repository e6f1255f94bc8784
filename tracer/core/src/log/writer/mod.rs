//! Writing the event log: the recorder (batches, rotation, retention and
//! the disk guard). The segment files themselves are `segments`; times are
//! `crate::time`.
//!
//! Crash safety: records are appended whole and flushed to the kernel after
//! every batch (`flush`), so a `kill -9` loses at most the batch being
//! written; a torn last line is detected by the reader. `fsync` is a policy:
//! never, every interval (the default, 1 s), or after every batch.

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

mod rotation;

pub use super::segments::{
    Ignored, Segments, compress_segment, compress_segment_with, create_private, list_segments,
    scan_segments,
};
use super::segments::{euid, free_bytes};
use super::{Header, Loss};
pub use crate::time::{Stamp, parse_time, utc_compact, utc_rfc3339, utc_rfc3339_millis};
use crate::{detector::Finding, event::Event};

/// When the log reaches stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// Leave it to the kernel's writeback.
    Never,
    /// At most once per interval, after a batch.
    Interval(Duration),
    /// After every batch.
    Always,
}

/// Rotation and retention. The defaults keep at most ~1 GiB of compressed
/// history (months of a quiet host) and never fill a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordConfig {
    /// Rotate when a segment reaches this size.
    pub max_segment_bytes: u64,
    /// Rotate when a segment is this old.
    pub max_segment_age: Duration,
    /// Keep at most this many segments (the active one included).
    pub max_files: usize,
    /// Keep at most this many bytes of segments.
    pub max_total_bytes: u64,
    /// Stop writing (and count the loss) when the filesystem has less free
    /// space than this; old segments are pruned first.
    pub min_free_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Compress closed segments.
    pub compress: bool,
    /// With zstd (smaller, faster) or gzip (what Vector, Fluent Bit and
    /// most shippers read).
    pub compression: Compression,
}

/// How closed segments are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
}

impl Compression {
    /// The suffix a compressed segment gets.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Zstd => ".zst",
            Self::Gzip => ".gz",
        }
    }
}

/// What the writer did, for the summary and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecorderStats {
    pub records: u64,
    pub bytes: u64,
    pub segments_opened: u64,
    pub segments_compressed: u64,
    pub segments_pruned: u64,
    /// Records not written: disk guard or write errors.
    pub dropped: u64,
    /// Times writing failed (disk full, read-only, folder removed): the log
    /// degraded to counting, and retried.
    pub write_errors: u64,
    /// Incident files written.
    pub incidents: u64,
    /// Incident files not written (write error, or the writer's queue was
    /// full).
    pub incidents_lost: u64,
}

struct Segment {
    out: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
    opened: Instant,
}

/// The event log writer.
pub struct Recorder {
    dir: PathBuf,
    cfg: RecordConfig,
    header: Header,
    current: Option<Segment>,
    last_fsync: Instant,
    stats: RecorderStats,
    /// Records dropped since the last loss record, and since when.
    pending_loss: Option<(u64, u64)>,
    /// Background compressions still running.
    compressors: Vec<std::thread::JoinHandle<()>>,
    line: Vec<u8>,
    /// A record with its stamp, reused.
    stamped: Vec<u8>,
    /// Time and host of each record (the current segment's clocks).
    stamp: Stamp,
    /// `dir` for statvfs, built once: the per-batch space check allocates
    /// nothing.
    dir_c: Option<std::ffi::CString>,
    /// Re-read the clocks for each segment's header (live recording); a
    /// simulation keeps the header's fixed model clock.
    live_clock: bool,
    /// Records appended since the last successful flush: lost if it fails.
    unflushed: u64,
    /// Why the log can't be written now, while it can't.
    failing: Option<String>,
}

/// Compressions running at once.
const MAX_COMPRESSORS: usize = 2;

pub(super) fn io_err(path: &Path, what: &str, e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The log folder: created 0750 when missing; when it exists, it must be a
/// real folder (not a symlink), owned by this user, and not writable by
/// group or others, since whoever can write it can plant names there.
pub fn check_log_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let refuse = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "log folder {}: {why}; refusing to record there",
                dir.display()
            ),
        )
    };
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            Err(refuse("is a symlink (give the real folder's path)".into()))
        }
        Ok(m) if !m.is_dir() => Err(refuse("is not a folder".into())),
        Ok(m) => {
            let me = euid();
            if m.uid() != me {
                Err(refuse(format!(
                    "is owned by uid {}, not by uid {me}",
                    m.uid()
                )))
            } else if m.mode() & 0o022 != 0 {
                Err(refuse(format!(
                    "is writable by group or others (mode {:o}; chmod go-w it)",
                    m.mode() & 0o7777
                )))
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| io_err(dir, "can't create log folder", &e))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
                .map_err(|e| io_err(dir, "can't set the mode of log folder", &e))
        }
        Err(e) => Err(io_err(dir, "can't inspect log folder", &e)),
    }
}

impl Recorder {
    /// Opens `dir` (created if missing) and the first segment. With
    /// `live_clock`, each segment's header carries the clocks read when it
    /// opens; otherwise the given header's clock is kept.
    pub fn open(
        dir: &Path,
        cfg: RecordConfig,
        header: Header,
        live_clock: bool,
    ) -> io::Result<Self> {
        check_log_dir(dir)?;
        let stamp = Stamp::new(header.clock, &header.hostname);
        let mut r = Self {
            dir: dir.to_path_buf(),
            cfg,
            header,
            stamp,
            stamped: Vec::with_capacity(1024),
            current: None,
            last_fsync: Instant::now(),
            stats: RecorderStats::default(),
            pending_loss: None,
            compressors: Vec::new(),
            line: Vec::with_capacity(1024),
            dir_c: {
                use std::os::unix::ffi::OsStrExt as _;
                std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()
            },
            live_clock,
            unflushed: 0,
            failing: None,
        };
        r.recover_leftovers();
        // A full or read-only disk is no reason not to trace: the log
        // starts degraded and retries at every batch.
        if let Err(e) = r.open_segment() {
            r.degrade(0, &e);
        }
        Ok(r)
    }

    /// Why the log can't be written now, if it can't.
    pub fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    /// Writing failed: the records not yet on disk are counted as lost (and
    /// a `loss` record says so once writing works again), the segment is
    /// dropped, and the next batches retry. Detection never stops for it.
    fn degrade(&mut self, now_ns: u64, e: &io::Error) {
        self.stats.write_errors += 1;
        if self.failing.is_none() {
            eprintln!(
                "tracer: warning: the event log can't be written: {e}; detection, metrics and \
                 alerts go on, lost records are counted, and writing is retried"
            );
        }
        self.failing = Some(e.to_string());
        if let Some(seg) = self.current.take() {
            // Discard what the failed write left buffered.
            let _ = seg.out.into_parts();
        }
        let lost = std::mem::take(&mut self.unflushed);
        if lost > 0 {
            self.stats.records = self.stats.records.saturating_sub(lost);
            self.stats.dropped += lost;
            let (n, from) = self.pending_loss.unwrap_or((0, now_ns));
            self.pending_loss = Some((n + lost, from));
        }
    }

    pub fn stats(&self) -> RecorderStats {
        self.stats
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The active segment's path.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|s| s.path.as_path())
    }

    fn has_room(&self) -> bool {
        self.dir_c
            .as_deref()
            .and_then(free_bytes)
            .is_none_or(|free| free >= self.cfg.min_free_bytes)
    }

    /// Appends one record line (without newline).
    fn append(&mut self, ts_ns: u64, line: &[u8]) {
        let mut stamped = std::mem::take(&mut self.stamped);
        stamped.clear();
        stamped.extend_from_slice(line);
        self.stamp.apply(&mut stamped, ts_ns);
        self.append_stamped(ts_ns, &stamped);
        self.stamped = stamped;
    }

    fn append_stamped(&mut self, ts_ns: u64, line: &[u8]) {
        let Some(seg) = self.current.as_mut() else {
            self.drop_record(ts_ns);
            return;
        };
        let ok = seg
            .out
            .write_all(line)
            .and_then(|()| seg.out.write_all(b"\n"));
        if ok.is_ok() {
            seg.bytes += line.len() as u64 + 1;
            self.unflushed += 1;
            self.stats.records += 1;
            self.stats.bytes += line.len() as u64 + 1;
        } else {
            self.drop_record(ts_ns);
        }
    }

    fn drop_record(&mut self, ts_ns: u64) {
        self.drop_records(ts_ns, 1);
    }

    fn drop_records(&mut self, ts_ns: u64, lost: u64) {
        self.stats.dropped += lost;
        let (n, from) = self.pending_loss.unwrap_or((0, ts_ns));
        self.pending_loss = Some((n + lost, from));
    }

    /// Appends `n` whole record lines (each ending in a newline) as one
    /// write; `first_ts_ns` dates them if they are lost.
    pub fn lines(&mut self, first_ts_ns: u64, n: u64, buf: &[u8]) {
        if n == 0 {
            return;
        }
        let Some(seg) = self.current.as_mut() else {
            self.drop_records(first_ts_ns, n);
            return;
        };
        match seg.out.write_all(buf) {
            Ok(()) => {
                seg.bytes += buf.len() as u64;
                self.unflushed += n;
                self.stats.records += n;
                self.stats.bytes += buf.len() as u64;
            }
            Err(e) => {
                // A batch larger than the buffer goes straight to the file:
                // its error is this one, not the next flush's.
                self.drop_records(first_ts_ns, n);
                self.degrade(first_ts_ns, &e);
            }
        }
    }

    /// An incident file was written (or could not be).
    pub fn count_incident(&mut self, written: bool) {
        if written {
            self.stats.incidents += 1;
        } else {
            self.stats.incidents_lost += 1;
        }
    }

    /// The stamp of records written now (the current segment's clocks).
    pub fn stamp(&self) -> Stamp {
        self.stamp.clone()
    }

    pub fn event(&mut self, ev: &Event) {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        ev.write_json_record(&mut line);
        self.append(ev.ts_ns, &line);
        self.line = line;
    }

    pub fn finding(&mut self, f: &Finding) {
        self.append(f.ts_ns, f.to_json_record().as_bytes());
    }

    pub fn loss(&mut self, l: &Loss) {
        self.append(l.to_ns, l.to_json_record().as_bytes());
    }

    /// Ends a batch: hands the data to the kernel, fsyncs per policy,
    /// rotates when due, and writes a loss record for anything dropped. A
    /// write error degrades the log (see `degrade`); it is never returned.
    pub fn flush(&mut self, now_ns: u64) -> io::Result<()> {
        match self.try_flush(now_ns) {
            Ok(()) if self.current.is_some() => {
                self.unflushed = 0;
                if let Some(why) = self.failing.take() {
                    eprintln!("tracer: the event log is written again (it failed: {why})");
                }
            }
            Ok(()) => {}
            Err(e) => self.degrade(now_ns, &e),
        }
        Ok(())
    }

    fn try_flush(&mut self, now_ns: u64) -> io::Result<()> {
        // The folder removed under us: records would go to an unlinked file.
        if self.current.is_some() && !self.dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the log folder {} was removed", self.dir.display()),
            ));
        }
        if let Some((n, from)) = self.pending_loss
            && self.current.is_some()
            && self.has_room()
        {
            self.pending_loss = None;
            self.loss(&Loss {
                probe: "recorder".into(),
                from_ns: from,
                to_ns: now_ns,
                lost: n,
                reason: "the log could not be written (disk full or write error)".into(),
            });
        }
        let Some(seg) = self.current.as_mut() else {
            // Try again: space may have come back, the folder may be back.
            if !self.dir.exists() || self.has_room() {
                check_log_dir(&self.dir)?;
                self.open_segment()?;
            }
            return Ok(());
        };
        seg.out.flush()?;
        let sync = match self.cfg.fsync {
            FsyncPolicy::Never => false,
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(d) => self.last_fsync.elapsed() >= d,
        };
        if sync {
            seg.out.get_ref().sync_data()?;
            self.last_fsync = Instant::now();
        }
        let due = seg.bytes >= self.cfg.max_segment_bytes
            || seg.opened.elapsed() >= self.cfg.max_segment_age;
        if due {
            self.rotate()?;
        } else if !self.has_room() {
            // The disk filled up under us: prune, else stop writing.
            self.enforce_retention(0);
            if !self.has_room() {
                self.close_current()?;
            }
        }
        Ok(())
    }

    /// Flushes, fsyncs and closes; waits for compressions.
    pub fn close(mut self) -> io::Result<RecorderStats> {
        if let Err(e) = self.close_current() {
            self.degrade(0, &e);
        }
        for h in self.compressors.drain(..) {
            let _ = h.join();
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header::for_this_host("test".into(), "test".into(), vec![])
    }

    fn names(dir: &Path) -> Vec<String> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn segments_rotate_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig {
            max_segment_age: Duration::from_millis(20),
            min_free_bytes: 0,
            compress: false,
            ..RecordConfig::default()
        };
        let mut r = Recorder::open(dir.path(), cfg, header(), true).unwrap();
        r.flush(0).unwrap();
        assert_eq!(names(dir.path()).len(), 1);
        std::thread::sleep(Duration::from_millis(30));
        r.flush(0).unwrap();
        let names = names(dir.path());
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[1].ends_with("-000001.jsonl"), "{names:?}");
        assert_eq!(r.close().unwrap().segments_opened, 2);
    }

    #[test]
    fn a_full_disk_stops_recording_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig {
            min_free_bytes: u64::MAX,
            ..RecordConfig::default()
        };
        // Issue 13: no room is no reason not to start; the log degrades.
        let mut r = Recorder::open(dir.path(), cfg, header(), true).expect("a degraded start");
        let why = r.failing().expect("it says why").to_owned();
        assert!(why.contains("not opening a new log segment"), "{why}");
        r.drop_record(5);
        r.flush(10).unwrap();
        assert_eq!(r.close().unwrap().dropped, 1);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn dropped_records_become_a_loss_record() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig {
            min_free_bytes: 0,
            compress: false,
            ..RecordConfig::default()
        };
        let mut r = Recorder::open(dir.path(), cfg, header(), true).unwrap();
        // Nowhere to write: the records are counted, not lost silently.
        r.close_current().unwrap();
        r.drop_record(10);
        r.drop_record(20);
        r.flush(30).unwrap();
        // flush reopened a segment; the next flush writes the loss record.
        r.flush(40).unwrap();
        let stats = r.close().unwrap();
        assert_eq!(stats.dropped, 2);
        let text: String = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|(p, _)| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(
            text.contains(r#"{"record":"loss","probe":"recorder","from_ns":10,"to_ns":"#),
            "{text}"
        );
        assert!(text.contains(r#""lost":2"#), "{text}");
    }
}
