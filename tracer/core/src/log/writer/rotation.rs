//! The event log's segments over time: opening one (with its header),
//! rotating and reopening, compressing closed ones in the background,
//! recovering what a crash left, and retention.

use std::{
    fs,
    io::{self, BufWriter, Write as _},
    path::Path,
    time::Instant,
};

use super::{
    MAX_COMPRESSORS, Recorder, Segment, check_log_dir, compress_segment_with, create_private,
    io_err, list_segments, scan_segments, utc_compact,
};
use crate::log::{SEGMENT_PREFIX, segments::not_ours};

impl Recorder {
    /// Compresses a closed segment on a helper thread: at most
    /// `MAX_COMPRESSORS` at once (the oldest is waited for beyond that), and
    /// inline when no thread can be made.
    pub(super) fn compress_in_background(&mut self, path: &Path) {
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
    pub(super) fn recover_leftovers(&mut self) {
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

    pub(super) fn open_segment(&mut self) -> io::Result<()> {
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
        let now = crate::log::ClockPair::now();
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

    pub(super) fn close_current(&mut self) -> io::Result<()> {
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
    pub(super) fn enforce_retention(&mut self, reserve: usize) {
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
}
