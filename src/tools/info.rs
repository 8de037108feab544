//! `info`: what a disk file is and how it relates to its backing file.
//!
//! Inspection never refuses a COW file because its backing file is missing
//! or changed: that is exactly what a user running `info` wants to see. So
//! the header and bitmap are read directly (no `Disk::open`, no locks, the
//! file opened read-only) and the backing file is only `stat`ed.

use std::fmt;
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::Serialize;

use crate::format::disk::{
    absolute_backing_path, check_usable, file_kind, file_size, mtime32, read_full_at, read_header,
    resolve_header_backing, usable,
};
use crate::format::error::{DiskError, Result};
use crate::format::header::{has_cow_magic, CowHeader, Geometry, SECTOR_SIZE};

/// Everything `info` reports; serialized as-is for `--json`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum Info {
    Raw(RawInfo),
    Cow(Box<CowInfo>),
}

#[derive(Debug, Clone, Serialize)]
pub struct RawInfo {
    pub path: String,
    /// File (or block device) size in bytes.
    pub size: u64,
    /// Bytes the host file system has allocated (st_blocks * 512).
    pub host_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CowInfo {
    pub path: String,
    pub version: u32,
    /// "v1", "v2", "v3" or "v3 (broken 64-bit layout)".
    pub layout: String,
    /// Size of the disk as the header records it (the backing file's size).
    pub virtual_size: u64,
    /// Bytes covered by one bitmap bit (the header's "sectorsize").
    pub sector_size: u32,
    /// Alignment of the bitmap and data area (v1/v2: the sector size).
    pub alignment: u64,
    pub cow_format: u32,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
    /// Length of the COW file; UML makes it data_offset + virtual_size.
    pub file_size: u64,
    pub chunks: u64,
    pub allocated_chunks: u64,
    /// 512-byte sectors held in the COW file.
    pub allocated_sectors: u64,
    pub allocated_bytes: u64,
    /// allocated_sectors as a percentage of the disk's sectors.
    pub allocated_percent: f64,
    pub host_bytes: u64,
    pub backing: BackingInfo,
}

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

/// Scans every bitmap byte from the bitmap offset up to the data offset.
/// Bits of chunks that fit there count as allocated (as `read_bitmap`
/// reads them), everything after the last chunk is stray.
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
    let mut buf = vec![0u8; PIECE.min(region) as usize];
    let mut done = 0u64;
    while done < region {
        let n = PIECE.min(region - done) as usize;
        read_full_at(file, &mut buf[..n], g.bitmap_offset + done, path)?;
        for (i, &byte) in buf[..n].iter().enumerate() {
            if byte == 0 {
                continue;
            }
            let base = (done + i as u64) * 8;
            for bit in 0..8 {
                if byte & (1 << bit) == 0 {
                    continue;
                }
                let chunk = base + bit;
                if chunk >= g.chunks {
                    scan.stray_bits += 1;
                    continue;
                }
                scan.allocated_chunks += 1;
                if chunk + 1 == g.chunks {
                    scan.last_chunk_set = true;
                }
                if chunk >= first_short {
                    scan.allocated_beyond_eof += 1;
                }
            }
        }
        done += n as u64;
    }
    Ok(scan)
}

fn host_bytes(meta: &Metadata) -> u64 {
    meta.blocks() * 512
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

/// Collects the information `info` shows. Fails only if the file itself
/// cannot be opened or its header cannot be parsed.
pub fn inspect(path: &Path, backing: Option<&Path>) -> Result<Info> {
    let Inspected {
        file,
        meta,
        len,
        header,
    } = open_for_inspection(path)?;
    let Some(header) = header else {
        return Ok(Info::Raw(RawInfo {
            path: path.to_string_lossy().into_owned(),
            size: len,
            host_bytes: host_bytes(&meta),
        }));
    };
    let g = header.geometry(path)?;
    let scan = scan_bitmap(&file, path, &g, header.size, len)?;
    let disk_sectors = header.size.div_ceil(SECTOR_SIZE);
    let spc = g.sectorsize / SECTOR_SIZE;
    // The last chunk may reach past the end of the disk; those sectors are
    // not part of the disk and are not counted.
    let overhang = g.chunks * spc - disk_sectors;
    let allocated_sectors =
        scan.allocated_chunks * spc - if scan.last_chunk_set { overhang } else { 0 };
    let alignment = match header.layout.version() {
        3 => u64::from(header.alignment),
        _ => u64::from(header.sectorsize),
    };
    Ok(Info::Cow(Box::new(CowInfo {
        path: path.to_string_lossy().into_owned(),
        version: header.layout.version(),
        layout: header.layout.name().to_owned(),
        virtual_size: header.size,
        sector_size: header.sectorsize,
        alignment,
        cow_format: header.cow_format,
        bitmap_offset: g.bitmap_offset,
        bitmap_len: g.bitmap_len,
        data_offset: g.data_offset,
        file_size: len,
        chunks: g.chunks,
        allocated_chunks: scan.allocated_chunks,
        allocated_sectors,
        allocated_bytes: allocated_sectors * SECTOR_SIZE,
        allocated_percent: allocated_sectors as f64 * 100.0 / disk_sectors as f64,
        host_bytes: host_bytes(&meta),
        backing: BackingInfo::examine(path, &header, backing),
    })))
}

/// Bytes with a binary-unit figure for people.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} bytes", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        write!(f, "{} bytes ({v:.1} {})", self.0, UNITS[unit])
    }
}

fn verdict(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "matches",
        Some(false) => "MISMATCH",
        None => "not compared",
    }
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Info::Raw(r) => {
                writeln!(f, "file:            {}", r.path)?;
                writeln!(f, "format:          raw image")?;
                writeln!(f, "size:            {}", Bytes(r.size))?;
                writeln!(f, "host bytes used: {}", Bytes(r.host_bytes))
            }
            Info::Cow(c) => {
                writeln!(f, "file:            {}", c.path)?;
                writeln!(f, "format:          UML COW, layout {}", c.layout)?;
                writeln!(f, "virtual size:    {}", Bytes(c.virtual_size))?;
                writeln!(f, "sector size:     {}", c.sector_size)?;
                writeln!(f, "alignment:       {}", c.alignment)?;
                if c.cow_format != 0 {
                    writeln!(f, "cow_format:      {} (expected 0)", c.cow_format)?;
                }
                writeln!(
                    f,
                    "bitmap:          offset {}, {} bytes",
                    c.bitmap_offset, c.bitmap_len
                )?;
                writeln!(f, "data offset:     {}", c.data_offset)?;
                writeln!(f, "file size:       {}", Bytes(c.file_size))?;
                writeln!(
                    f,
                    "allocated:       {} of {} chunks, {} sectors, {} ({:.2}%)",
                    c.allocated_chunks,
                    c.chunks,
                    c.allocated_sectors,
                    Bytes(c.allocated_bytes),
                    c.allocated_percent
                )?;
                writeln!(f, "host bytes used: {}", Bytes(c.host_bytes))?;
                let b = &c.backing;
                let origin = if b.overridden {
                    format!("given with --backing; header says {}", b.header_path)
                } else {
                    "from the header".to_owned()
                };
                writeln!(f, "backing file:    {} ({origin})", b.path)?;
                if let Some(e) = &b.error {
                    writeln!(f, "  problem:       {e}")?;
                }
                let actual = |v: Option<String>| v.unwrap_or_else(|| "unknown".to_owned());
                writeln!(
                    f,
                    "  size:          recorded {}, actual {}: {}",
                    b.recorded_size,
                    actual(b.actual_size.map(|v| v.to_string())),
                    verdict(b.size_matches)
                )?;
                writeln!(
                    f,
                    "  mtime:         recorded {}, actual {}: {}",
                    b.recorded_mtime,
                    actual(b.actual_mtime.map(|v| v.to_string())),
                    verdict(b.mtime_matches)
                )?;
                if b.matches {
                    writeln!(f, "  status:        usable")
                } else {
                    writeln!(
                        f,
                        "  status:        NOT usable as is (the disk cannot be opened over it)"
                    )
                }
            }
        }
    }
}
