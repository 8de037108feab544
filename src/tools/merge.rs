//! `merge`: what `uml_moo` does. Every sector of a COW disk (COW data where
//! its bit is set, backing data elsewhere) goes into a new raw image, or
//! the COW sectors are written into the backing file itself.
//!
//! One deliberate difference from `uml_moo`: for a backing file whose size
//! is not a multiple of 512, `uml_moo` writes only floor(size / 512)
//! sectors, dropping the partial last sector. We keep the whole size: the
//! new image is exactly as long as the backing file, and an in-place merge
//! never changes the backing file's length. For 512-multiple sizes the
//! results are byte-identical.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use thiserror::Error;

use crate::format::error::DiskError;
use crate::format::lock::{lock_file, LockKind};
use crate::format::open::{check_usable, read_full_at, CowParts, Disk, DiskOptions};
use crate::fsutil::files::NewFile;
use crate::units::{to_usize, SECTOR_BYTES};

/// Bytes moved per read: large enough that syscalls do not dominate.
const STEP: u64 = 4 << 20;
/// Granularity of holes left in a new image.
const HOLE_BLOCK: usize = 4096;

#[derive(Debug, Error)]
pub enum MergeError {
    #[error(transparent)]
    Disk(#[from] DiskError),

    #[error("{path}: raw image, not a COW file: there is nothing to merge")]
    NotCow { path: PathBuf },

    #[error("{target}: is the {what} of the merge ({path}); choose another output file")]
    SameFile {
        target: PathBuf,
        what: &'static str,
        path: PathBuf,
    },

    #[error("{path}: the backing file to write changed while it was being opened")]
    BackingChanged { path: PathBuf },
}

#[derive(Debug, Clone)]
pub enum MergeTarget {
    /// A new raw image at this path.
    Into(PathBuf),
    /// Write the COW sectors into the backing file.
    InPlace,
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub target: MergeTarget,
    /// Use this backing file instead of the header's (`uml_moo -b`).
    pub backing: Option<PathBuf>,
    /// Replace an existing output file.
    pub force: bool,
    pub progress: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    /// The file written: the new image or the backing file.
    pub output: PathBuf,
    /// Length of the result (the backing file's size).
    pub size: u64,
    /// Bytes that came from the COW file.
    pub cow_bytes: u64,
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} merging [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Merges the COW file at `cow` as `opts` says.
pub fn merge(cow: &Path, opts: &MergeOptions) -> Result<MergeSummary, MergeError> {
    match &opts.target {
        MergeTarget::Into(out) => merge_into(cow, out, opts),
        MergeTarget::InPlace => merge_in_place(cow, opts),
    }
}

fn open_cow(cow: &Path, opts: &MergeOptions, no_lock: bool) -> Result<Disk, MergeError> {
    let disk = Disk::open(
        cow,
        &DiskOptions {
            read_only: true,
            backing: opts.backing.clone(),
            no_lock,
            ..Default::default()
        },
    )?;
    if disk.cow.is_none() {
        return Err(MergeError::NotCow {
            path: cow.to_owned(),
        });
    }
    Ok(disk)
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn merge_into(cow: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeSummary, MergeError> {
    let disk = open_cow(cow, opts, false)?;
    let parts = disk.cow.as_ref().expect("checked in open_cow");
    // Replacing the COW or backing file by the merge result would destroy
    // the input (and with it the only copy of the data if the merge failed).
    if let Ok(out_meta) = std::fs::metadata(out) {
        let inputs = [
            ("COW file", &disk.file, &disk.path),
            ("backing file", &parts.backing, &parts.backing_path),
        ];
        for (what, f, p) in inputs {
            let m = f.metadata().map_err(DiskError::io(p, "stat"))?;
            if same_file(&m, &out_meta) {
                return Err(MergeError::SameFile {
                    target: out.to_owned(),
                    what,
                    path: p.clone(),
                });
            }
        }
        if !opts.force {
            return Err(DiskError::AlreadyExists {
                path: out.to_owned(),
            }
            .into());
        }
    }

    let size = parts.header.size;
    let new = NewFile::create(out).map_err(DiskError::io(out, "create"))?;
    let tmp = new.tmp_path().to_owned();
    let f = new.file();
    let cow_bytes = copy_all(&disk, f, &tmp, size, opts.progress)?;
    // The length is set explicitly: trailing holes are never written.
    f.set_len(size).map_err(DiskError::io(&tmp, "set length"))?;
    new.persist(opts.force).map_err(DiskError::persist(out))?;
    Ok(MergeSummary {
        output: out.to_owned(),
        size,
        cow_bytes,
    })
}

/// Copies the whole disk into the new file `f`, in large steps read
/// through the extent mapping, leaving all-zero 4 KiB blocks as holes.
/// Returns the bytes that came from the COW file.
fn copy_all(
    disk: &Disk,
    f: &File,
    path: &Path,
    size: u64,
    progress: bool,
) -> Result<u64, DiskError> {
    let parts = disk.cow.as_ref().expect("a COW disk");
    let bar = progress_bar(progress, size);
    let mut buf = vec![0u8; to_usize(STEP)];
    let mut cow_bytes = 0;
    let mut pos = 0u64;
    while pos < size {
        let len = STEP.min(disk.size - pos);
        let sector = pos / SECTOR_BYTES;
        disk.read_sectors(sector, &mut buf[..to_usize(len)])?;
        cow_bytes += parts
            .bitmap
            .map(sector, len / SECTOR_BYTES)
            .filter(|e| e.in_cow)
            .map(|e| ((e.sector + e.count) * SECTOR_BYTES).min(size) - e.sector * SECTOR_BYTES)
            .sum::<u64>();
        // The device is rounded up to whole sectors; the image is not.
        let keep = to_usize(len.min(size - pos));
        write_nonzero(f, path, &buf[..keep], pos)?;
        pos += len;
        bar.set_position(pos.min(size));
    }
    bar.finish_and_clear();
    Ok(cow_bytes)
}

/// Writes the runs of `data` that are not whole all-zero blocks.
fn write_nonzero(f: &File, path: &Path, data: &[u8], offset: u64) -> Result<(), DiskError> {
    let mut run_start = None;
    let mut i = 0;
    while i <= data.len() {
        let end = (i + HOLE_BLOCK).min(data.len());
        let zero = i == data.len() || data[i..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                f.write_all_at(&data[s..i], offset + s as u64)
                    .map_err(DiskError::io(path, "write"))?;
                run_start = None;
            }
            _ => {}
        }
        if i == data.len() {
            break;
        }
        i = end;
    }
    Ok(())
}

fn merge_in_place(cow: &Path, opts: &MergeOptions) -> Result<MergeSummary, MergeError> {
    // The locks are taken here rather than by `Disk::open`: its read lock on
    // the backing file would conflict with our own write lock (OFD locks
    // conflict even within one process).
    let disk = open_cow(cow, opts, true)?;
    lock_file(&disk.file, &disk.path, LockKind::Read)?;
    let parts = disk.cow.as_ref().expect("checked in open_cow");
    let bpath = &parts.backing_path;
    check_usable(bpath)?;
    let target = OpenOptions::new()
        .read(true)
        .write(true)
        .open(bpath)
        .map_err(DiskError::io(bpath, "open for writing"))?;
    // The name might have been replaced since it was checked.
    let checked = parts
        .backing
        .metadata()
        .map_err(DiskError::io(bpath, "stat"))?;
    let opened = target.metadata().map_err(DiskError::io(bpath, "stat"))?;
    if !same_file(&checked, &opened) {
        return Err(MergeError::BackingChanged {
            path: bpath.clone(),
        });
    }
    lock_file(&target, bpath, LockKind::Write)?;

    let size = parts.header.size;
    let cow_bytes = copy_cow_extents(&disk, parts, &target, size, opts.progress)?;
    target.sync_all().map_err(DiskError::io(bpath, "fsync"))?;
    Ok(MergeSummary {
        output: bpath.clone(),
        size,
        cow_bytes,
    })
}

/// Writes every COW extent into `target` at its own offset, never past
/// `size` (the backing file keeps its length).
fn copy_cow_extents(
    disk: &Disk,
    parts: &CowParts,
    target: &File,
    size: u64,
    progress: bool,
) -> Result<u64, DiskError> {
    let total: u64 = parts.bitmap.count_ones() * parts.geometry.sectorsize;
    let bar = progress_bar(progress, total.min(size));
    let mut buf = vec![0u8; to_usize(STEP)];
    let mut written = 0u64;
    for e in parts.bitmap.map(0, disk.sectors()).filter(|e| e.in_cow) {
        let start = e.sector * SECTOR_BYTES;
        let end = ((e.sector + e.count) * SECTOR_BYTES).min(size);
        let mut pos = start;
        while pos < end {
            let n = to_usize(STEP.min(end - pos));
            read_full_at(
                &disk.file,
                &mut buf[..n],
                parts.geometry.data_offset + pos,
                &disk.path,
            )?;
            target
                .write_all_at(&buf[..n], pos)
                .map_err(DiskError::io(&parts.backing_path, "write"))?;
            pos += n as u64;
            written += n as u64;
            bar.set_position(written);
        }
    }
    bar.finish_and_clear();
    Ok(written)
}
