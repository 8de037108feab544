//! Opening a disk: a raw image, or a COW file over its backing file and
//! its bitmap (every page on file read at open, or none, for the daemon's
//! lazy loading); the checks of the backing file against the header, and
//! the locks that keep two users off the same files.
//!
//! The daemon's asynchronous write path takes the open disk apart
//! (`daemon::device`); the tools use the synchronous API in `sectors.rs`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::bitmap::{Bitmap, Pinned};
use super::error::{DiskError, Result};
use super::header::{has_cow_magic, CowHeader, Geometry, HeaderLayout, MAX_HEADER_LEN};
use super::lock::{lock_file, LockKind};
use crate::fsutil::data_ranges::data_ranges;
use crate::fsutil::files::{file_kind, mtime32, size_of, usable};
use crate::fsutil::range_set::RangeSet;
use crate::units::{to_usize, SECTOR_BYTES};

/// The on-disk format of a served file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A plain image: every sector lives in the file itself.
    Raw,
    /// A UML COW file over a backing file.
    Cow,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Cow => "cow",
        }
    }
}

/// How to open a disk.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    pub read_only: bool,
    /// Use this backing file instead of the one named in the header.
    pub backing: Option<PathBuf>,
    /// The format the user named; `None` guesses it from the COW magic
    /// (see `Disk::format_guessed` for what that costs the guest).
    pub format: Option<DiskFormat>,
    /// Extra open(2) flags for the data files (O_DIRECT, O_DSYNC).
    pub custom_flags: i32,
    /// Skip the fcntl locks (for read-only inspection by `info`/`check`).
    pub no_lock: bool,
    /// `None`: read every bitmap page on file at open and keep them (the
    /// tools). `Some(cap)`: read none; the user loads pages on demand and
    /// keeps at most `cap` bytes of unpinned ones (the daemon).
    pub bitmap_cache: Option<u64>,
}

/// The COW side of a disk.
#[derive(Debug)]
pub struct CowParts {
    pub header: CowHeader,
    pub geometry: Geometry,
    pub backing_path: PathBuf,
    pub backing: File,
    pub bitmap: Bitmap,
    /// Bits beyond this cannot be stored in the file (old v1/v2 files whose
    /// bitmap formula under-counts): those chunks are never written.
    pub storable_chunks: u64,
}

#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    /// The COW file, or the raw image, opened with the requested flags.
    pub file: File,
    /// With O_DIRECT or O_DSYNC, `file` is a second open of the file; this
    /// first one holds the lock (and served the unaligned header reads).
    pub lock_holder: Option<File>,
    pub cow: Option<CowParts>,
    /// Device size in bytes: the backing (or raw) size rounded up to 512.
    pub size: u64,
    pub read_only: bool,
    /// The format was guessed from the file's first bytes, not named by
    /// the user. A guessed raw image must never be given the COW magic by
    /// its guest, or the next start would read a guest-written header and
    /// open whatever host file it names (docs/design.md, trust model).
    pub format_guessed: bool,
}

/// Size of a regular file or block device, errors naming `path`.
pub fn file_size(file: &File, path: &Path) -> Result<u64> {
    size_of(file).map_err(DiskError::io(path, "stat"))
}

/// [`crate::fsutil::files::read_full_at`], errors naming `path`.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    crate::fsutil::files::read_full_at(file, buf, offset).map_err(DiskError::io(path, "read"))
}

/// An absolute path as `uml_mkcow` records it: the directory resolved, the
/// last component kept (a symlink to the image stays a symlink).
pub fn absolute_backing_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| DiskError::BackingOpen {
            cow: PathBuf::new(),
            backing: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?
        .to_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = parent
        .canonicalize()
        .map_err(DiskError::io(&parent, "resolve directory"))?;
    Ok(dir.join(name))
}

/// Opens the backing file and checks it against the header.
fn open_backing(
    cow_path: &Path,
    backing: &Path,
    header: &CowHeader,
    lock: bool,
) -> Result<(File, u64)> {
    let backing_err = |source| DiskError::BackingOpen {
        cow: cow_path.to_owned(),
        backing: backing.to_owned(),
        source,
    };
    let meta = std::fs::metadata(backing).map_err(backing_err)?;
    if !usable(meta.file_type()) {
        return Err(DiskError::BackingNotRegular {
            cow: cow_path.to_owned(),
            backing: backing.to_owned(),
            kind: file_kind(meta.file_type()),
        });
    }
    let file = File::open(backing).map_err(backing_err)?;
    let size = file_size(&file, backing)?;
    if size != header.size {
        return Err(DiskError::SizeMismatch {
            cow: cow_path.to_owned(),
            backing: backing.to_owned(),
            recorded: header.size,
            actual: size,
        });
    }
    let actual = mtime32(&meta);
    // Block devices have no meaningful mtime to compare.
    if meta.file_type().is_file() && actual != header.mtime {
        return Err(DiskError::MtimeMismatch {
            cow: cow_path.to_owned(),
            backing: backing.to_owned(),
            recorded: header.mtime,
            actual,
        });
    }
    if lock {
        lock_file(&file, backing, LockKind::Read)?;
    }
    Ok((file, size))
}

/// Reads the first bytes of a file (up to the largest header).
fn read_head(file: &File, path: &Path) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HEADER_LEN];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DiskError::io(path, "read header")(e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Parses the header of a COW file without opening its backing file.
pub fn read_header(file: &File, path: &Path) -> Result<CowHeader> {
    let len = file_size(file, path)?;
    let head = read_head(file, path)?;
    CowHeader::parse(&head, len, path)
}

/// The bitmap of a COW file with no page read yet: pages of the bitmap
/// area that are holes of the file (SEEK_DATA) are known zero.
///
/// Every byte between the bitmap offset and the data offset that holds
/// bits of real chunks is the bitmap's. For v1/v2 this is one byte more
/// than the header's (under-counting) bitmap length when the chunk count
/// is not a multiple of 8: those last bits are stored there by writers
/// (and by `write_sectors`), so they must be read back too.
pub fn lazy_bitmap(file: &File, path: &Path, geometry: &Geometry) -> Result<Bitmap> {
    let bitmap = Bitmap::new(geometry.chunks, geometry.sectorsize);
    let room = geometry.data_offset - geometry.bitmap_offset;
    let stored = room.min(bitmap.byte_len() as u64);
    let page = bitmap.page_bytes() as u64;
    let mut on_file = RangeSet::new();
    let area = geometry.bitmap_offset..geometry.bitmap_offset + stored;
    for r in data_ranges(file, area) {
        let r = r.map_err(DiskError::io(path, "find the data of the bitmap"))?;
        let (a, b) = (
            r.start - geometry.bitmap_offset,
            r.end - geometry.bitmap_offset,
        );
        on_file.insert(a / page..(b - 1) / page + 1);
    }
    Ok(bitmap.with_stored_bytes(stored).with_on_file(on_file))
}

/// Reads every page of `bitmap` that is on file (the tools' whole bitmap;
/// holes stay unallocated).
pub fn load_all_pages(
    bitmap: &mut Bitmap,
    file: &File,
    path: &Path,
    bitmap_offset: u64,
) -> Result<()> {
    let ranges: Vec<_> = bitmap.pages_on_file().collect();
    for page in ranges.into_iter().flatten() {
        if bitmap.pin(page) == Pinned::NeedsLoad {
            let (start, len) = bitmap.load_span(page);
            let read = read_full_at(
                file,
                &mut bitmap.load_buf(page)[..to_usize(len)],
                bitmap_offset + start,
                path,
            );
            if let Err(e) = read {
                bitmap.unpin(page);
                return Err(e);
            }
            bitmap.load_done(page);
        }
        bitmap.unpin(page);
    }
    Ok(())
}

/// Where the header's backing path points: relative names are taken
/// against the COW file's directory.
pub fn resolve_header_backing(cow_path: &Path, header: &CowHeader) -> PathBuf {
    let p = header.backing_path();
    if p.is_absolute() {
        p.to_owned()
    } else {
        cow_path
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_owned())
    }
}

/// Refuses paths that are not a regular file or block device, naming them.
pub fn check_usable(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(DiskError::io(path, "open"))?;
    if !usable(meta.file_type()) {
        return Err(DiskError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(meta.file_type()),
        });
    }
    Ok(())
}

/// The file to do I/O through: `file` itself, or a second open with the
/// extra flags while `file` keeps holding the lock.
fn with_flags(
    file: File,
    flags: i32,
    open: impl Fn(i32) -> Result<File>,
) -> Result<(File, Option<File>)> {
    if flags == 0 {
        Ok((file, None))
    } else {
        Ok((open(flags)?, Some(file)))
    }
}

impl Disk {
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Disk> {
        check_usable(path)?;
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(flags)
                .open(path)
                .map_err(DiskError::io(path, "open"))
        };
        let file = open(0)?;
        if !opts.no_lock {
            let kind = if opts.read_only {
                LockKind::Read
            } else {
                LockKind::Write
            };
            lock_file(&file, path, kind)?;
        }
        let head = read_head(&file, path)?;
        let format = opts.format.unwrap_or(if has_cow_magic(&head) {
            DiskFormat::Cow
        } else {
            DiskFormat::Raw
        });
        let format_guessed = opts.format.is_none();
        if format == DiskFormat::Raw {
            let len = file_size(&file, path)?;
            if len == 0 {
                return Err(DiskError::EmptyImage {
                    path: path.to_owned(),
                });
            }
            let (file, lock_holder) = with_flags(file, opts.custom_flags, open)?;
            return Ok(Disk {
                path: path.to_owned(),
                file,
                lock_holder,
                cow: None,
                size: len.div_ceil(SECTOR_BYTES) * SECTOR_BYTES,
                read_only: opts.read_only,
                format_guessed,
            });
        }
        let file_len = file_size(&file, path)?;
        let mut header = CowHeader::parse(&head, file_len, path)?;
        let geometry = header.geometry(path)?;
        let backing_path = match &opts.backing {
            Some(b) => absolute_backing_path(b)?,
            None => resolve_header_backing(path, &header),
        };
        let (backing, size) = open_backing(path, &backing_path, &header, !opts.no_lock)?;

        // A user-given backing file replaces the header's name, as UML does,
        // but only once it passed the checks and only in a header we write
        // ourselves (rewriting an old layout as v3 would move the bitmap).
        if opts.backing.is_some()
            && !opts.read_only
            && backing_path.as_os_str().as_bytes() != header.backing_file.as_slice()
        {
            if header.layout == HeaderLayout::V3 {
                header.backing_file = backing_path.as_os_str().as_bytes().to_vec();
                let bytes = header.to_v3_bytes(path)?;
                file.write_all_at(&bytes, 0)
                    .and_then(|_| file.sync_data())
                    .map_err(DiskError::io(path, "rewrite header"))?;
                log::info!(
                    "{}: backing file name changed to {}",
                    path.display(),
                    backing_path.display()
                );
            } else {
                log::warn!(
                    "{}: using backing file {} for this session; the {} header is not rewritten",
                    path.display(),
                    backing_path.display(),
                    header.layout.name()
                );
            }
        }

        let mut bitmap = lazy_bitmap(&file, path, &geometry)?;
        match opts.bitmap_cache {
            None => load_all_pages(&mut bitmap, &file, path, geometry.bitmap_offset)?,
            Some(cap) => bitmap = bitmap.with_cap_bytes(cap),
        }
        let storable_chunks =
            ((geometry.data_offset - geometry.bitmap_offset) * 8).min(geometry.chunks);
        let (file, lock_holder) = with_flags(file, opts.custom_flags, open)?;
        Ok(Disk {
            path: path.to_owned(),
            file,
            lock_holder,
            size: size.div_ceil(SECTOR_BYTES) * SECTOR_BYTES,
            read_only: opts.read_only,
            format_guessed,
            cow: Some(CowParts {
                header,
                geometry,
                backing_path,
                backing,
                bitmap,
                storable_chunks,
            }),
        })
    }
}

impl AsRawFd for Disk {
    fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}
