//! `info`: what a disk file is and how it relates to its backing file,
//! from the inspection `check` shares (`inspect.rs`).

use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use super::inspect::{open_for_inspection, scan_bitmap, BackingInfo, Inspected};
use crate::format::error::{mtime_hint, Result};
use crate::fsutil::escape::Escaped;
use crate::units::SECTOR_BYTES;

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

fn host_bytes(meta: &Metadata) -> u64 {
    meta.blocks() * 512
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
    let disk_sectors = header.size.div_ceil(SECTOR_BYTES);
    let spc = g.sectorsize / SECTOR_BYTES;
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
        allocated_bytes: allocated_sectors * SECTOR_BYTES,
        allocated_percent: allocated_sectors as f64 * 100.0 / disk_sectors as f64,
        host_bytes: host_bytes(&meta),
        backing: BackingInfo::examine(path, &header, backing),
    })))
}

/// Bytes with a binary-unit figure for people, and more in the same
/// parentheses: "33554432 bytes (32.0 MiB, 3.13%)".
struct Bytes(u64, Option<String>);

fn bytes(n: u64) -> Bytes {
    Bytes(n, None)
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        write!(f, "{} bytes", self.0)?;
        let human = (self.0 >= 1024).then(|| {
            let mut v = self.0 as f64 / 1024.0;
            let mut unit = 0;
            while v >= 1024.0 && unit + 1 < UNITS.len() {
                v /= 1024.0;
                unit += 1;
            }
            format!("{v:.1} {}", UNITS[unit])
        });
        match (human, &self.1) {
            (Some(h), Some(more)) => write!(f, " ({h}, {more})"),
            (Some(h), None) => write!(f, " ({h})"),
            (None, Some(more)) => write!(f, " ({more})"),
            (None, None) => Ok(()),
        }
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
                writeln!(f, "size:            {}", bytes(r.size))?;
                writeln!(f, "host bytes used: {}", bytes(r.host_bytes))
            }
            Info::Cow(c) => {
                writeln!(f, "file:            {}", c.path)?;
                writeln!(f, "format:          UML COW, layout {}", c.layout)?;
                writeln!(f, "virtual size:    {}", bytes(c.virtual_size))?;
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
                writeln!(f, "file size:       {}", bytes(c.file_size))?;
                writeln!(
                    f,
                    "allocated:       {} of {} chunks, {} sectors, {}",
                    c.allocated_chunks,
                    c.chunks,
                    c.allocated_sectors,
                    Bytes(
                        c.allocated_bytes,
                        Some(format!("{:.2}%", c.allocated_percent))
                    ),
                )?;
                writeln!(f, "host bytes used: {}", bytes(c.host_bytes))?;
                let b = &c.backing;
                let origin = if b.overridden {
                    format!(
                        "given with --backing; header says {}",
                        Escaped(&b.header_path)
                    )
                } else {
                    "from the header".to_owned()
                };
                writeln!(f, "backing file:    {} ({origin})", Escaped(&b.path))?;
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
                if b.mtime_matches == Some(false) {
                    writeln!(
                        f,
                        "  to proceed:    {}",
                        mtime_hint(Path::new(&c.path), Path::new(&b.path))
                    )?;
                }
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
