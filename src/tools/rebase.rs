//! `rebase --unsafe`: record another backing file (or the same one after
//! its mtime changed) in a COW header, as `qemu-img rebase -u` does. Only
//! the header's backing name and mtime are rewritten; no sector is read or
//! copied, so the result is only right when the new backing file holds the
//! data the COW file was made over. The recorded size must match: a
//! different size is a different disk.
//!
//! Without `--unsafe`, [`plan`] says what would change and nothing is
//! written (a safe rebase, copying the sectors where two backing files
//! differ into the COW file, is not implemented).

use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::format::error::DiskError;
use crate::format::header::has_cow_magic;
use crate::format::header::{CowHeader, HeaderLayout};
use crate::format::lock::{lock_file, LockKind};
use crate::format::open::{
    absolute_backing_path, check_usable, file_size, read_header, resolve_header_backing,
};
use crate::fsutil::escape::escape_path;
use crate::fsutil::files::{file_kind, mtime32, usable};

#[derive(Debug, Error)]
pub enum RebaseError {
    #[error(transparent)]
    Disk(#[from] DiskError),

    #[error("{path}: raw image, not a COW file: it has no backing file to rebase")]
    NotCow { path: PathBuf },

    #[error(
        "{path}: {layout} header: only v3 headers are rewritten (rewriting an old layout as v3 \
         would move its bitmap); `merge --into` makes a raw image of it instead"
    )]
    NotV3 { path: PathBuf, layout: &'static str },
}

/// What a rebase changes in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebasePlan {
    pub cow: PathBuf,
    /// The backing file the header names now (resolved like `open` does).
    pub old_backing: PathBuf,
    pub old_mtime: u32,
    /// The absolute name recorded from now on (as `create` records it).
    pub new_backing: PathBuf,
    pub new_mtime: u32,
    pub size: u64,
}

impl std::fmt::Display for RebasePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "COW file:      {}", escape_path(&self.cow))?;
        writeln!(
            f,
            "backing file:  {} -> {}",
            escape_path(&self.old_backing),
            escape_path(&self.new_backing)
        )?;
        writeln!(f, "mtime:         {} -> {}", self.old_mtime, self.new_mtime)?;
        writeln!(f, "size:          {} (unchanged)", self.size)
    }
}

/// What `rebase --unsafe` prints before it writes.
pub const UNSAFE_WARNING: &str = "\
warning: rebase --unsafe only rewrites the backing file's name and mtime in the header. \
Every sector the COW file has not written is read from the new backing file from now on: \
if its contents differ from the file the COW file was made over, the disk's contents are \
silently wrong. Use it only when the new file holds the same data (a copy, a move, a \
touched mtime).";

/// The COW file opened for the header rewrite, and its header.
struct Opened {
    file: File,
    header: CowHeader,
}

fn open_cow(cow: &Path, write: bool) -> Result<Opened, RebaseError> {
    check_usable(cow)?;
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(cow)
        .map_err(DiskError::io(cow, "open"))?;
    // A daemon serving it, a merge or a UML instance holds a lock: the
    // header must not change under them.
    lock_file(
        &file,
        cow,
        if write {
            LockKind::Write
        } else {
            LockKind::Read
        },
    )?;
    let mut head = [0u8; 4];
    crate::format::open::read_full_at(&file, &mut head, 0, cow)?;
    if !has_cow_magic(&head) {
        return Err(RebaseError::NotCow {
            path: cow.to_owned(),
        });
    }
    let header = read_header(&file, cow)?;
    if header.layout != HeaderLayout::V3 {
        return Err(RebaseError::NotV3 {
            path: cow.to_owned(),
            layout: header.layout.name(),
        });
    }
    Ok(Opened { file, header })
}

/// Checks the new backing file and returns what a rebase would record.
fn plan_for(cow: &Path, header: &CowHeader, backing: &Path) -> Result<RebasePlan, RebaseError> {
    let abs = absolute_backing_path(backing)?;
    let open_err = |source| DiskError::BackingOpen {
        cow: cow.to_owned(),
        backing: abs.clone(),
        source,
    };
    let meta = std::fs::metadata(&abs).map_err(open_err)?;
    if !usable(meta.file_type()) {
        return Err(DiskError::BackingNotRegular {
            cow: cow.to_owned(),
            backing: abs,
            kind: file_kind(meta.file_type()),
        }
        .into());
    }
    let bf = File::open(&abs).map_err(open_err)?;
    let size = file_size(&bf, &abs)?;
    if size != header.size {
        return Err(DiskError::SizeMismatch {
            cow: cow.to_owned(),
            backing: abs,
            recorded: header.size,
            actual: size,
        }
        .into());
    }
    Ok(RebasePlan {
        cow: cow.to_owned(),
        old_backing: resolve_header_backing(cow, header),
        old_mtime: header.mtime,
        new_backing: abs,
        new_mtime: mtime32(&meta),
        size,
    })
}

/// What `rebase` would change, without writing anything.
pub fn plan(cow: &Path, backing: &Path) -> Result<RebasePlan, RebaseError> {
    let o = open_cow(cow, false)?;
    plan_for(cow, &o.header, backing)
}

/// Rewrites the header of `cow` to name `backing` with its current mtime.
pub fn rebase_unsafe(cow: &Path, backing: &Path) -> Result<RebasePlan, RebaseError> {
    let o = open_cow(cow, true)?;
    let plan = plan_for(cow, &o.header, backing)?;
    let mut header = o.header;
    header.backing_file = plan.new_backing.as_os_str().as_bytes().to_vec();
    header.mtime = plan.new_mtime;
    let bytes = header.to_v3_bytes(cow)?;
    o.file
        .write_all_at(&bytes, 0)
        .and_then(|_| o.file.sync_data())
        .map_err(DiskError::io(cow, "rewrite header"))?;
    Ok(plan)
}
