//! Writing the event log: segments, rotation, compression, retention, and
//! the disk guard.
//!
//! Crash safety: records are appended whole and flushed to the kernel after
//! every batch (`flush`), so a `kill -9` loses at most the batch being
//! written; a torn last line is detected by the reader. `fsync` is a policy:
//! never, every interval (the default, 1 s), or after every batch.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Header, Loss, SEGMENT_PREFIX};
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

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            max_segment_bytes: 64 << 20,
            max_segment_age: Duration::from_hours(1),
            max_files: 200,
            max_total_bytes: 1 << 30,
            min_free_bytes: 512 << 20,
            fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
            compress: true,
            compression: Compression::Zstd,
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

fn io_err(path: &Path, what: &str, e: &io::Error) -> io::Error {
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

    /// Compresses a closed segment on a helper thread: at most
    /// `MAX_COMPRESSORS` at once (the oldest is waited for beyond that), and
    /// inline when no thread can be made.
    fn compress_in_background(&mut self, path: &Path) {
        self.compressors.retain(|h| !h.is_finished());
        while self.compressors.len() >= MAX_COMPRESSORS {
            let _ = self.compressors.remove(0).join();
        }
        let job = path.to_path_buf();
        let codec = self.cfg.compression;
        let spawned = std::thread::Builder::new()
            .name("compress".into())
            .spawn(move || {
                if let Err(e) = compress_segment_with(&job, codec) {
                    eprintln!("tracer: warning: compressing {}: {e}", job.display());
                }
            });
        match spawned {
            Ok(h) => self.compressors.push(h),
            Err(_) => {
                if let Err(e) = compress_segment_with(path, codec) {
                    eprintln!("tracer: warning: compressing {}: {e}", path.display());
                }
            }
        }
    }

    /// What a crash left: temp files of a compression are removed, and
    /// closed segments left uncompressed are compressed (only this user's
    /// regular files, as everywhere).
    fn recover_leftovers(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let tmp = e.file_name().to_str().is_some_and(|n| {
                    n.starts_with(SEGMENT_PREFIX)
                        && (n.ends_with(".jsonl.zst.tmp") || n.ends_with(".jsonl.gz.tmp"))
                });
                if tmp && e.metadata().is_ok_and(|m| not_ours(&m).is_none()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if !self.cfg.compress {
            return;
        }
        let Ok((segs, _)) = scan_segments(&self.dir) else {
            return;
        };
        for (path, _) in segs {
            if path.to_string_lossy().ends_with(".jsonl") {
                self.compress_in_background(&path);
            }
        }
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

    fn open_segment(&mut self) -> io::Result<()> {
        self.enforce_retention(1);
        if !self.has_room() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "less than {} MiB free in {}; not opening a new log segment",
                    self.cfg.min_free_bytes >> 20,
                    self.dir.display()
                ),
            ));
        }
        let now = super::ClockPair::now();
        let secs = now.realtime_ns / 1_000_000_000;
        // A name that exists already (planted, or left by another run) is
        // never opened: the next sequence number is tried instead.
        let mut tries = 0;
        let (path, file) = loop {
            let name = format!(
                "{SEGMENT_PREFIX}{}-{:06}.jsonl",
                utc_compact(secs),
                self.header.segment
            );
            let path = self.dir.join(name);
            match create_private(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 1000 => {
                    tries += 1;
                    self.header.segment += 1;
                }
                Err(e) => return Err(io_err(&path, "can't create log segment", &e)),
            }
        };
        if self.live_clock {
            self.header.clock = now;
            self.stamp.clock = now;
        }
        let mut seg = Segment {
            out: BufWriter::with_capacity(256 * 1024, file),
            path,
            bytes: 0,
            opened: Instant::now(),
        };
        let line = self.header.to_json_record();
        seg.out.write_all(line.as_bytes())?;
        seg.out.write_all(b"\n")?;
        seg.bytes += line.len() as u64 + 1;
        seg.out.flush()?;
        self.header.segment += 1;
        self.current = Some(seg);
        self.stats.segments_opened += 1;
        Ok(())
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

    /// Closes the active segment (compressing it) and opens a new one.
    pub fn rotate(&mut self) -> io::Result<()> {
        let r = self.close_current().and_then(|()| {
            if !self.dir.exists() {
                check_log_dir(&self.dir)?;
            }
            self.open_segment()
        });
        if let Err(e) = r {
            self.degrade(0, &e);
        }
        Ok(())
    }

    /// Reopens the log (SIGHUP): a new segment, the old one closed.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.rotate()
    }

    fn close_current(&mut self) -> io::Result<()> {
        let Some(mut seg) = self.current.take() else {
            return Ok(());
        };
        seg.out.flush()?;
        seg.out.get_ref().sync_data()?;
        drop(seg.out);
        if self.cfg.compress {
            self.compress_in_background(&seg.path);
            self.stats.segments_compressed += 1;
        }
        Ok(())
    }

    /// Deletes the oldest segments beyond the count and size limits,
    /// leaving room for `reserve` more files.
    fn enforce_retention(&mut self, reserve: usize) {
        let Ok(mut segs) = list_segments(&self.dir) else {
            return;
        };
        let active = self.current.as_ref().map(|s| s.path.clone());
        segs.retain(|(p, _)| Some(p) != active.as_ref());
        let mut total: u64 = segs.iter().map(|(_, len)| len).sum();
        let mut count = segs.len() + usize::from(active.is_some()) + reserve;
        for (path, len) in &segs {
            let over =
                count > self.cfg.max_files || total > self.cfg.max_total_bytes || !self.has_room();
            if !over {
                break;
            }
            if fs::remove_file(path).is_ok() {
                self.stats.segments_pruned += 1;
                total -= len;
                count -= 1;
            }
        }
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

/// Creates `path` for writing. Never an existing file or symlink
/// (`O_CREAT|O_EXCL`, `O_NOFOLLOW`: a link planted at a predictable name is
/// refused, its target untouched), and mode 0640 whatever the umask (the
/// files hold kernel addresses).
pub fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o640))?;
    Ok(file)
}

/// Opens a file the daemon wrote, for reading: never through a symlink.
fn open_own(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// `X.jsonl` → `X.jsonl.zst`, atomically (temp file, fsync, rename).
pub fn compress_segment(path: &Path) -> io::Result<()> {
    compress_segment_with(path, Compression::Zstd)
}

/// `X.jsonl` → `X.jsonl.zst` or `X.jsonl.gz`, atomically (temp file,
/// fsync, rename).
pub fn compress_segment_with(path: &Path, codec: Compression) -> io::Result<()> {
    let mut zst = path.as_os_str().to_owned();
    zst.push(codec.suffix());
    let zst = PathBuf::from(zst);
    let mut tmp = zst.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let input = open_own(path)?;
        let output = match create_private(&tmp) {
            // Left by a crash, or planted: the entry goes (a symlink is
            // removed, not followed), then the file is made anew.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create_private(&tmp)?
            }
            other => other?,
        };
        let mut input = io::BufReader::new(input);
        let out = match codec {
            Compression::Zstd => {
                let mut enc = zstd::Encoder::new(BufWriter::new(output), 3)?;
                io::copy(&mut input, &mut enc)?;
                enc.finish()?
            }
            Compression::Gzip => {
                let mut enc = flate2::write::GzEncoder::new(
                    BufWriter::new(output),
                    flate2::Compression::default(),
                );
                io::copy(&mut input, &mut enc)?;
                enc.finish()?
            }
        };
        out.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()?;
    }
    fs::rename(&tmp, &zst)?;
    fs::remove_file(path)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and can't fail.
    unsafe { libc::geteuid() }
}

/// Why a folder entry (its metadata, symlinks not followed) is not one of
/// the daemon's files: not a regular file, or owned by neither this user
/// nor root. `None`: it is.
fn not_ours(meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    if !meta.file_type().is_file() {
        Some("not a regular file".into())
    } else if meta.uid() != euid() && meta.uid() != 0 {
        Some(format!(
            "owned by uid {}, not by this user or root",
            meta.uid()
        ))
    } else {
        None
    }
}

/// Segment paths and sizes.
pub type Segments = Vec<(PathBuf, u64)>;
/// Entries that are not the daemon's segments, and why.
pub type Ignored = Vec<(PathBuf, String)>;

/// Segments in `dir`, oldest first, with their sizes (see
/// [`scan_segments`]).
pub fn list_segments(dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    Ok(scan_segments(dir)?.0)
}

/// Segments in `dir`, oldest first, with their sizes; and the entries that
/// look like segments but are not the daemon's, with the reason: only
/// regular files (no symlinks, FIFOs, devices) owned by this user or root
/// count, so a file another user planted can neither be replayed as ours
/// nor make retention delete the real log.
#[expect(
    clippy::case_sensitive_file_extension_comparisons,
    reason = "the writer names segments itself, in lower case"
)]
pub fn scan_segments(dir: &Path) -> io::Result<(Segments, Ignored)> {
    let mut out = Vec::new();
    let mut ignored = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            if name
                .as_encoded_bytes()
                .starts_with(SEGMENT_PREFIX.as_bytes())
            {
                ignored.push((entry.path(), "its name is not UTF-8".into()));
            }
            continue;
        };
        if !(name.starts_with(SEGMENT_PREFIX)
            && (name.ends_with(".jsonl")
                || name.ends_with(".jsonl.zst")
                || name.ends_with(".jsonl.gz")))
        {
            continue;
        }
        // entry.metadata() does not follow symlinks.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        match not_ours(&meta) {
            Some(why) => ignored.push((entry.path(), why)),
            None => out.push((entry.path(), meta.len())),
        }
    }
    out.sort();
    ignored.sort();
    Ok((out, ignored))
}

/// Free bytes for unprivileged users on the filesystem of `dir`.
fn free_bytes(c: &std::ffi::CStr) -> Option<u64> {
    // SAFETY: statvfs fills the zeroed struct we pass for a NUL-terminated
    // path; the result is checked.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ret = unsafe { libc::statvfs(c.as_ptr(), &raw mut st) };
    (ret == 0).then(|| st.f_bavail * st.f_frsize)
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the epoch (UTC).
pub fn utc_compact(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// RFC 3339 UTC with microseconds for nanoseconds since the epoch.
/// What every record line of the log carries besides its own fields: its
/// wall-clock time (RFC 3339, UTC, to the millisecond, from `ts_ns` and the
/// clock pair) and the host, so that a line shipped alone (Vector, Fluent
/// Bit) still says when and where. Allocation-free: the date and time of
/// the current second are formatted once per second.
#[derive(Clone, Debug)]
pub struct Stamp {
    pub clock: super::ClockPair,
    /// The hostname as a JSON string, quotes included.
    host: String,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    prefix: [u8; 19],
    second: Option<u64>,
}

/// Writes `n` as `buf.len()` decimal digits.
fn digits(buf: &mut [u8], mut n: u64) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

impl Stamp {
    pub fn new(clock: super::ClockPair, host: &str) -> Self {
        Self {
            clock,
            host: serde_json::to_string(host).expect("a string serializes"),
            prefix: *b"0000-00-00T00:00:00",
            second: None,
        }
    }

    /// Adds `"time"` and `"host"` to the JSON object that ends `line`.
    pub fn apply(&mut self, line: &mut Vec<u8>, ts_ns: u64) {
        if line.last() != Some(&b'}') {
            return;
        }
        line.pop();
        let ns = self.clock.to_realtime(ts_ns);
        let second = ns / 1_000_000_000;
        if self.second != Some(second) {
            let (year, month, day, hour, minute, sec) = civil(second);
            let p = &mut self.prefix;
            digits(&mut p[0..4], year as u64);
            digits(&mut p[5..7], u64::from(month));
            digits(&mut p[8..10], u64::from(day));
            digits(&mut p[11..13], u64::from(hour));
            digits(&mut p[14..16], u64::from(minute));
            digits(&mut p[17..19], u64::from(sec));
            self.second = Some(second);
        }
        let mut ms = *b".000Z\"";
        digits(&mut ms[1..4], (ns % 1_000_000_000) / 1_000_000);
        line.extend_from_slice(b",\"time\":\"");
        line.extend_from_slice(&self.prefix);
        line.extend_from_slice(&ms);
        line.extend_from_slice(b",\"host\":");
        line.extend_from_slice(self.host.as_bytes());
        line.push(b'}');
    }
}

/// As [`utc_rfc3339`], to the millisecond: what a log line's `time` needs
/// (`ts_ns` keeps the nanoseconds), at a third less entropy to compress.
pub fn utc_rfc3339_millis(ns: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ns / 1_000_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        (ns % 1_000_000_000) / 1_000_000
    )
}

pub fn utc_rfc3339(ns: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ns / 1_000_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        (ns % 1_000_000_000) / 1000
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)` (UTC) or seconds
/// since the epoch, into nanoseconds since the epoch.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(secs) = text.parse::<f64>()
        && secs >= 0.0
        && secs.is_finite()
    {
        return Ok((secs * 1e9) as u64);
    }
    let err = || {
        format!(
            "{text:?} is not a time like 2026-11-28T04:14:21Z, 2026-11-28T05:14:21+01:00, \
             2026-11-28 or seconds since the epoch"
        )
    };
    // A plain date: its midnight, UTC.
    if text.len() == 10 && !text.contains(['T', ' ']) {
        return parse_time(&format!("{text}T00:00:00Z"));
    }
    // The zone: Z, or an offset ±HH:MM (±HHMM) east of UTC.
    let (utc, offset_s): (&str, i64) = if let Some(t) = text.strip_suffix('Z') {
        (t, 0)
    } else {
        let at = text.rfind(['+', '-']).filter(|&i| i > 10).ok_or_else(err)?;
        let (t, zone) = text.split_at(at);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let hm = zone[1..].replace(':', "");
        if hm.len() != 4 || !hm.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let (h, m): (i64, i64) = (
            hm[..2].parse().map_err(|_| err())?,
            hm[2..].parse().map_err(|_| err())?,
        );
        if h > 23 || m > 59 {
            return Err(err());
        }
        (t, sign * (h * 3600 + m * 60))
    };
    let (date, clock) = utc.split_once(['T', ' ']).ok_or_else(err)?;
    let mut parts = date.split('-').map(str::parse::<i64>);
    let (Some(Ok(year)), Some(Ok(month)), Some(Ok(day)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err());
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut parts = hms.split(':').map(str::parse::<u64>);
    let (Some(Ok(hour)), Some(Ok(minute)), Some(Ok(second)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err());
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(err());
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let value: u64 = digits.parse().map_err(|_| err())?;
        value * 10u64.pow(9 - digits.len() as u32)
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset_s;
    let secs = u64::try_from(secs).map_err(|_| err())?;
    Ok(secs * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Calendar fields of a UTC time (Howard Hinnant's civil_from_days).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_offsets_and_plain_dates() {
        let z = parse_time("2026-11-28T04:14:21Z").unwrap();
        assert_eq!(parse_time("2026-11-28T05:14:21+01:00").unwrap(), z);
        assert_eq!(parse_time("2026-11-27T23:14:21-05:00").unwrap(), z);
        assert_eq!(parse_time("2026-11-28T04:14:21+0000").unwrap(), z);
        assert_eq!(
            parse_time("2026-11-28").unwrap(),
            parse_time("2026-11-28T00:00:00Z").unwrap()
        );
        assert_eq!(
            parse_time("2026-11-28T04:14:21.5Z").unwrap(),
            z + 500_000_000
        );
        for bad in [
            "2026-11-28T04:14:21",
            "2026-11-28T04:14:21+25:00",
            "yesterday",
            "2026-13-01",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stamps_match_the_rfc3339_formatter_across_seconds() {
        let clock = crate::log::ClockPair {
            monotonic_ns: 1_000,
            realtime_ns: 1_795_894_160_999_000_000,
        };
        let mut stamp = Stamp::new(clock, "hv\"1");
        for ts in [1_000, 1_500_000, 2_000_000, 86_400_000_000_000, 1_000] {
            let mut line = b"{\"a\":1}".to_vec();
            stamp.apply(&mut line, ts);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["time"], utc_rfc3339_millis(clock.to_realtime(ts)), "{ts}");
            assert_eq!(v["host"], "hv\"1");
            assert_eq!(v["a"], 1);
        }
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(utc_compact(0), "19700101T000000Z");
        // 2026-11-28T04:14:21Z
        assert_eq!(utc_compact(1_795_839_261), "20261128T041421Z");
        assert_eq!(
            utc_rfc3339(1_795_839_261_123_456_789),
            "2026-11-28T04:14:21.123456Z"
        );
        // A leap day.
        assert_eq!(utc_compact(1_709_164_800), "20240229T000000Z");
    }

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

    #[test]
    fn time_parsing_round_trips() {
        for ns in [0, 1_709_164_800_000_000_000, 1_795_839_261_123_456_000] {
            assert_eq!(parse_time(&utc_rfc3339(ns)), Ok(ns));
        }
        assert_eq!(
            parse_time("2026-11-28T04:14:21Z"),
            Ok(1_795_839_261_000_000_000)
        );
        assert_eq!(parse_time("1795839261.5"), Ok(1_795_839_261_500_000_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
    }
}
