//! Creating a COW file over a backing file, as `uml_mkcow` does.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::{DiskError, Result};
use super::header::{CowHeader, DEFAULT_ALIGNMENT, DEFAULT_SECTORSIZE};
use super::open::{absolute_backing_path, file_size};
use crate::fsutil::files::{file_kind, mtime32, usable, NewFile};

/// Options of `create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub sectorsize: u32,
    pub alignment: u32,
    pub force: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            sectorsize: DEFAULT_SECTORSIZE,
            alignment: DEFAULT_ALIGNMENT,
            force: false,
        }
    }
}

/// Creates a COW file over `backing`, byte for byte as `uml_mkcow` does:
/// the v3 header, then a sparse file of full length. It is written under a
/// temporary name and renamed into place, so a crash never leaves a
/// half-made COW file, and an existing file is replaced only with `force`.
pub fn create_cow(cow: &Path, backing: &Path, opts: &CreateOptions) -> Result<CowHeader> {
    let abs = absolute_backing_path(backing)?;
    let meta = std::fs::metadata(&abs).map_err(|source| DiskError::BackingOpen {
        cow: cow.to_owned(),
        backing: abs.clone(),
        source,
    })?;
    if !usable(meta.file_type()) {
        return Err(DiskError::BackingNotRegular {
            cow: cow.to_owned(),
            backing: abs,
            kind: file_kind(meta.file_type()),
        });
    }
    let bf = File::open(&abs).map_err(|source| DiskError::BackingOpen {
        cow: cow.to_owned(),
        backing: abs.clone(),
        source,
    })?;
    let size = file_size(&bf, &abs)?;
    if size == 0 {
        return Err(DiskError::EmptyImage { path: abs });
    }
    if !opts.force && std::fs::symlink_metadata(cow).is_ok() {
        return Err(DiskError::AlreadyExists {
            path: cow.to_owned(),
        });
    }
    let header = CowHeader::new_v3(
        abs.as_os_str().as_bytes().to_vec(),
        mtime32(&meta),
        size,
        opts.sectorsize,
        opts.alignment,
    );
    let geometry = header.geometry(cow)?;
    let bytes = header.to_v3_bytes(cow)?;

    let new = NewFile::create(cow).map_err(DiskError::io(cow, "create"))?;
    let mut f = new.file();
    f.write_all(&bytes)
        .and_then(|_| f.set_len(geometry.data_offset + size))
        .map_err(DiskError::io(new.tmp_path(), "write"))?;
    new.persist(opts.force).map_err(DiskError::persist(cow))?;
    Ok(header)
}
