//! Typed errors of the disk layer. Every variant names the file it concerns,
//! so a message shown to the user always says which file and what is wrong.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::fsutil::escape::escape_path;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path}: COW header truncated: file has {len} bytes, the {layout} header needs {need}"
    )]
    TruncatedHeader {
        path: PathBuf,
        len: u64,
        need: u64,
        layout: &'static str,
    },

    #[error("{path}: not a COW file (magic {found:#010x}, expected 0x4f4f4f4d)")]
    BadMagic { path: PathBuf, found: u32 },

    #[error("{path}: unknown COW version {version} (versions 1, 2 and 3 are supported)")]
    UnknownVersion { path: PathBuf, version: u32 },

    #[error("{path}: invalid sector size {sectorsize} (must be a power of two from 512 to 65536)")]
    BadSectorSize { path: PathBuf, sectorsize: u64 },

    #[error("{path}: invalid alignment {alignment} (must be a non-zero power of two up to 1 MiB)")]
    BadAlignment { path: PathBuf, alignment: u64 },

    #[error("{path}: invalid disk size {size} in header ({why})")]
    BadSize {
        path: PathBuf,
        size: u64,
        why: &'static str,
    },

    #[error("{path}: file is {len} bytes, shorter than its header and bitmap ({need} bytes)")]
    ShorterThanBitmap { path: PathBuf, len: u64, need: u64 },

    #[error("{path}: the backing file name in the COW header is empty")]
    BackingPathEmpty { path: PathBuf },

    #[error("{path}: the backing file name in the COW header is not NUL-terminated")]
    BackingPathUnterminated { path: PathBuf },

    #[error(
        "{path}: backing file name is too long ({len} bytes, at most {max} fit in the header)"
    )]
    BackingPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },

    #[error("{cow}: backing file {}: {source}", escape_path(.backing))]
    BackingOpen {
        cow: PathBuf,
        backing: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{cow}: backing file {} is {kind}, not a regular file or block device", escape_path(.backing))]
    BackingNotRegular {
        cow: PathBuf,
        backing: PathBuf,
        kind: &'static str,
    },

    #[error(
        "{cow}: backing file {} has size {actual}, but the COW header records {recorded}", escape_path(.backing)
    )]
    SizeMismatch {
        cow: PathBuf,
        backing: PathBuf,
        recorded: u64,
        actual: u64,
    },

    #[error(
        "{cow}: backing file {} has mtime {actual}, but the COW header records {recorded} \
         (the backing file changed since the COW file was made); {}",
        escape_path(.backing),
        mtime_hint(.cow, .backing)
    )]
    MtimeMismatch {
        cow: PathBuf,
        backing: PathBuf,
        recorded: u32,
        actual: u32,
    },

    #[error("{path}: in use by process {pid} (it holds a conflicting lock)")]
    Locked { path: PathBuf, pid: i32 },

    #[error("{path}: {kind}, not a regular file or block device")]
    NotRegular { path: PathBuf, kind: &'static str },

    #[error("{path}: already exists (use --force to overwrite)")]
    AlreadyExists { path: PathBuf },

    #[error("{path}: empty image (size 0)")]
    EmptyImage { path: PathBuf },

    #[error(
        "{path}: sector range {sector}+{count} is beyond the end of the disk ({sectors} sectors)"
    )]
    OutOfRange {
        path: PathBuf,
        sector: u64,
        count: u64,
        sectors: u64,
    },

    #[error("{path}: not supported: {what}")]
    Unsupported { path: PathBuf, what: &'static str },

    #[error("{path}: read-only disk")]
    ReadOnly { path: PathBuf },
}

impl DiskError {
    /// Wraps an I/O error with the file and the operation that failed.
    pub fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(io::Error) -> DiskError {
        let path = path.into();
        move |source| DiskError::Io { path, op, source }
    }

    /// Wraps the error of moving a finished new file to `path`
    /// ([`crate::fsutil::files::NewFile::persist`]): an existing file there
    /// is [`DiskError::AlreadyExists`].
    pub fn persist(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> DiskError {
        let path = path.into();
        move |e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                DiskError::AlreadyExists { path }
            } else {
                DiskError::io(path, "move into place")(e)
            }
        }
    }
}

/// How to proceed after a backing file's mtime changed, for every tool
/// that reports it.
pub fn mtime_hint(cow: &Path, backing: &Path) -> String {
    format!(
        "if its data is still what the COW file was made over (copied or touched, not \
         written), record the new mtime with `vhost-user-cow rebase {} --backing {} --unsafe`; \
         if it was written to, the COW file no longer fits it: use the original backing \
         file (--backing FILE)",
        escape_path(cow),
        escape_path(backing)
    )
}

pub type Result<T, E = DiskError> = std::result::Result<T, E>;
