//! The segment files of an event log: creating them privately, opening
//! only our own, compressing closed ones, and listing a folder's segments
//! (oldest first, ignoring what isn't ours).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter},
    path::{Path, PathBuf},
};

use super::{SEGMENT_PREFIX, writer::Compression};

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

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and can't fail.
    unsafe { libc::geteuid() }
}

/// Why a folder entry (its metadata, symlinks not followed) is not one of
/// the daemon's files: not a regular file, or owned by neither this user
/// nor root. `None`: it is.
pub(super) fn not_ours(meta: &fs::Metadata) -> Option<String> {
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
pub(super) fn free_bytes(c: &std::ffi::CStr) -> Option<u64> {
    // SAFETY: statvfs fills the zeroed struct we pass for a NUL-terminated
    // path; the result is checked.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ret = unsafe { libc::statvfs(c.as_ptr(), &raw mut st) };
    (ret == 0).then(|| st.f_bavail * st.f_frsize)
}
