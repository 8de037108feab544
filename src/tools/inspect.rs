//! Inspection of a disk file for `info` and `check`.
//!
//! Inspection never refuses a COW file because its backing file is missing
//! or changed: that is exactly what a user running `info` or `check` wants
//! to see. So the header and bitmap are read directly (no `Disk::open`, no
//! locks, the file opened read-only) and the backing file is only
//! `stat`ed.

use std::fs::{File, Metadata};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde::Serialize;

use crate::format::error::{DiskError, Result};
use crate::format::header::{has_cow_magic, CowHeader, Geometry};
use crate::format::open::{
    absolute_backing_path, check_usable, file_size, read_full_at, read_header,
    resolve_header_backing,
};
use crate::fsutil::data_ranges::data_ranges;
use crate::fsutil::files::{file_kind, mtime32, usable};
use crate::units::to_usize;

/// The backing file as the header names it and as it is on disk now.
#[derive(Debug, Clone, Serialize)]
pub struct BackingInfo {
    /// The name stored in the header (lossily converted to UTF-8).
    pub header_path: String,
    /// The file actually examined: the header's name (relative names taken
    /// against the COW file's directory) or the one given with --backing.
    pub path: String,
    pub overridden: bool,
    pub exists: bool,
    /// Why the backing file cannot be used, if it cannot (missing, not a
    /// regular file, ...). Size/mtime mismatches are reported below.
    pub error: Option<String>,
    pub recorded_size: u64,
    pub actual_size: Option<u64>,
    pub size_matches: Option<bool>,
    pub recorded_mtime: u32,
    pub actual_mtime: Option<u32>,
    /// None where mtime is not compared (block devices, missing file).
    pub mtime_matches: Option<bool>,
    /// The backing file exists and passes every check `open` makes.
    pub matches: bool,
}

impl BackingInfo {
    /// Compares the backing file (the header's, or `override_path`) with
    /// what the header records, the way `Disk::open` does, but reports
    /// instead of failing.
    pub fn examine(cow_path: &Path, header: &CowHeader, override_path: Option<&Path>) -> Self {
        let path = match override_path {
            Some(p) => absolute_backing_path(p).unwrap_or_else(|_| p.to_owned()),
            None => resolve_header_backing(cow_path, header),
        };
        let mut info = BackingInfo {
            header_path: header.backing_path().to_string_lossy().into_owned(),
            path: path.to_string_lossy().into_owned(),
            overridden: override_path.is_some(),
            exists: false,
            error: None,
            recorded_size: header.size,
            actual_size: None,
            size_matches: None,
            recorded_mtime: header.mtime,
            actual_mtime: None,
            mtime_matches: None,
            matches: false,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                info.error = Some(e.to_string());
                return info;
            }
        };
        info.exists = true;
        if !usable(meta.file_type()) {
            info.error = Some(format!(
                "{}, not a regular file or block device",
                file_kind(meta.file_type())
            ));
            return info;
        }
        let size = if meta.file_type().is_block_device() {
            File::open(&path)
                .map_err(DiskError::io(&path, "open"))
                .and_then(|f| file_size(&f, &path))
        } else {
            Ok(meta.len())
        };
        match size {
            Ok(s) => {
                info.actual_size = Some(s);
                info.size_matches = Some(s == header.size);
            }
            Err(e) => info.error = Some(e.to_string()),
        }
        if meta.file_type().is_file() {
            let m = mtime32(&meta);
            info.actual_mtime = Some(m);
            info.mtime_matches = Some(m == header.mtime);
        }
        info.matches = info.error.is_none()
            && info.size_matches == Some(true)
            && info.mtime_matches != Some(false);
        info
    }
}

/// What the bitmap area of a COW file holds, scanned in bounded pieces so
/// that a huge (possibly hostile) bitmap is never allocated at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BitmapScan {
    /// Set bits of real chunks.
    pub allocated_chunks: u64,
    /// Whether the last chunk's bit is set (it may cover less than a chunk).
    pub last_chunk_set: bool,
    /// Set bits between the last chunk and the data offset (the tail of
    /// the last bitmap byte and the alignment padding).
    pub stray_bits: u64,
    /// Allocated chunks whose data would lie (partly) past `file_len`.
    pub allocated_beyond_eof: u64,
}

/// Scans every bitmap byte from the bitmap offset up to the data offset
/// that is not in a hole of the file (holes read as zeros: nothing to
/// count). Bits of chunks that fit there count as allocated (as the
/// daemon reads them), everything after the last chunk is stray.
pub fn scan_bitmap(
    file: &File,
    path: &Path,
    g: &Geometry,
    size: u64,
    file_len: u64,
) -> Result<BitmapScan> {
    const PIECE: u64 = 1 << 20;
    // First chunk whose data is not wholly inside the file (the last chunk
    // ends at `size`, not at a chunk boundary).
    let first_short = if file_len >= g.data_offset + size {
        u64::MAX
    } else {
        file_len.saturating_sub(g.data_offset) / g.sectorsize
    };
    let mut scan = BitmapScan::default();
    let region = g.data_offset - g.bitmap_offset;
    let mut buf = vec![0u8; to_usize(PIECE.min(region))];
    for data in data_ranges(file, g.bitmap_offset..g.data_offset) {
        let data = data.map_err(DiskError::io(path, "find the data of the bitmap"))?;
        let mut done = data.start - g.bitmap_offset;
        let end = data.end - g.bitmap_offset;
        while done < end {
            let n = to_usize(PIECE.min(end - done));
            read_full_at(file, &mut buf[..n], g.bitmap_offset + done, path)?;
            scan_piece(&mut scan, &buf[..n], done * 8, g.chunks, first_short);
            done += n as u64;
        }
    }
    Ok(scan)
}

/// Counts the set bits of bitmap bytes whose first bit is chunk `base`.
fn scan_piece(scan: &mut BitmapScan, bytes: &[u8], base: u64, chunks: u64, first_short: u64) {
    for (i, &byte) in bytes.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        let base = base + i as u64 * 8;
        for bit in 0..8 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            let chunk = base + bit;
            if chunk >= chunks {
                scan.stray_bits += 1;
                continue;
            }
            scan.allocated_chunks += 1;
            if chunk + 1 == chunks {
                scan.last_chunk_set = true;
            }
            if chunk >= first_short {
                scan.allocated_beyond_eof += 1;
            }
        }
    }
}

/// A disk file opened read-only for `info` and `check`.
pub struct Inspected {
    pub file: File,
    pub meta: Metadata,
    pub len: u64,
    /// None for a raw image (no COW magic, as ubd decides).
    pub header: Option<CowHeader>,
}

/// Opens a disk file read-only for inspection, refusing FIFOs and
/// directories before open(2) could block on them, and empty files (no
/// disk at all, as for `open`); parses the header of a COW file.
pub fn open_for_inspection(path: &Path) -> Result<Inspected> {
    check_usable(path)?;
    let file = File::open(path).map_err(DiskError::io(path, "open"))?;
    let meta = file.metadata().map_err(DiskError::io(path, "stat"))?;
    let len = file_size(&file, path)?;
    if len == 0 {
        return Err(DiskError::EmptyImage {
            path: path.to_owned(),
        });
    }
    let mut magic = [0u8; 4];
    read_full_at(&file, &mut magic, 0, path)?;
    let header = if len >= 4 && has_cow_magic(&magic) {
        Some(read_header(&file, path)?)
    } else {
        None
    };
    Ok(Inspected {
        file,
        meta,
        len,
        header,
    })
}
