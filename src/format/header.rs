//! The UML ubd COW header: parsing of versions 1, 2, 3 and the "broken"
//! 64-bit v3 layout, writing of v3, and the geometry (bitmap offset, bitmap
//! length, data offset) with the kernel's exact formulas.

use std::path::Path;

use crate::format::error::{DiskError, Result};
use crate::units::SECTOR_BYTES;

pub const COW_MAGIC: u32 = 0x4f4f4f4d;
pub const COW_VERSION: u32 = 3;
/// The header's `sectorsize` is the chunk one bitmap bit covers (guest
/// sectors are always [`SECTOR_BYTES`]); this is what `create` writes by
/// default, as UML does.
pub const DEFAULT_SECTORSIZE: u32 = 512;
/// The largest `sectorsize` accepted (the smallest is one sector).
pub const MAX_SECTORSIZE: u64 = 65536;
/// Alignments beyond this are not something any writer produces; refusing
/// them keeps hostile headers from pushing the data offset out of reach.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
pub const DEFAULT_ALIGNMENT: u32 = 4096;

const V1_BACKING_LEN: usize = 256;
const V2_BACKING_LEN: usize = 4096;
pub const V1_HEADER_LEN: usize = 280;
pub const V2_HEADER_LEN: usize = 4120;
pub const V3_HEADER_LEN: usize = 4128;
pub const V3_BROKEN_HEADER_LEN: usize = 4136;
/// Enough bytes to parse any layout.
pub const MAX_HEADER_LEN: usize = V3_BROKEN_HEADER_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HeaderLayout {
    V1,
    V2,
    V3,
    /// v3 as written by old 64-bit tools that did not pack the struct: an
    /// 8-byte mtime shifts every later field by 4 (or 8) bytes.
    V3Broken,
}

impl HeaderLayout {
    pub fn name(self) -> &'static str {
        match self {
            HeaderLayout::V1 => "v1",
            HeaderLayout::V2 => "v2",
            HeaderLayout::V3 => "v3",
            HeaderLayout::V3Broken => "v3 (broken 64-bit layout)",
        }
    }

    pub fn header_len(self) -> usize {
        match self {
            HeaderLayout::V1 => V1_HEADER_LEN,
            HeaderLayout::V2 => V2_HEADER_LEN,
            HeaderLayout::V3 => V3_HEADER_LEN,
            HeaderLayout::V3Broken => V3_BROKEN_HEADER_LEN,
        }
    }

    pub fn version(self) -> u32 {
        match self {
            HeaderLayout::V1 => 1,
            HeaderLayout::V2 => 2,
            HeaderLayout::V3 | HeaderLayout::V3Broken => 3,
        }
    }
}

/// A parsed, validated COW header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowHeader {
    pub layout: HeaderLayout,
    /// The backing file name exactly as stored (without the NUL).
    pub backing_file: Vec<u8>,
    pub mtime: u32,
    /// Size of the backing file in bytes.
    pub size: u64,
    /// Bytes covered by one bitmap bit.
    pub sectorsize: u32,
    /// v3 only; v1/v2 align to the sector size.
    pub alignment: u32,
    pub cow_format: u32,
}

/// Where things live in a COW file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub bitmap_offset: u64,
    /// Bitmap bytes as the header's version defines them (v1/v2 under-count).
    pub bitmap_len: u64,
    pub data_offset: u64,
    /// Number of chunks (bits) needed to cover the disk.
    pub chunks: u64,
    pub sectorsize: u64,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// Whether the first bytes of a file carry the COW magic in either byte
/// order (v1 is host-endian, later versions big-endian).
pub fn has_cow_magic(buf: &[u8]) -> bool {
    buf.len() >= 4 && (be32(buf, 0) == COW_MAGIC || le32(buf, 0) == COW_MAGIC)
}

fn backing_name(field: &[u8], path: &Path) -> Result<Vec<u8>> {
    let end =
        field
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DiskError::BackingPathUnterminated {
                path: path.to_owned(),
            })?;
    if end == 0 {
        return Err(DiskError::BackingPathEmpty {
            path: path.to_owned(),
        });
    }
    Ok(field[..end].to_vec())
}

impl CowHeader {
    /// Parses the header at the start of `buf` (the first bytes of the file
    /// at `path`, which is only used in error messages). `file_len` is the
    /// length of the whole file, checked against the bitmap.
    pub fn parse(buf: &[u8], file_len: u64, path: &Path) -> Result<CowHeader> {
        let truncated = |need: usize, layout: &'static str| DiskError::TruncatedHeader {
            path: path.to_owned(),
            len: buf.len() as u64,
            need: need as u64,
            layout,
        };
        if buf.len() < 8 {
            return Err(truncated(8, "COW"));
        }
        // v1 was written in host byte order (little-endian on the machines
        // this daemon runs on); v2 and v3 in network order.
        let (little, version) = if be32(buf, 0) == COW_MAGIC {
            (false, be32(buf, 4))
        } else if le32(buf, 0) == COW_MAGIC {
            (true, le32(buf, 4))
        } else {
            return Err(DiskError::BadMagic {
                path: path.to_owned(),
                found: be32(buf, 0),
            });
        };
        let r32 = |off: usize| {
            if little {
                le32(buf, off)
            } else {
                be32(buf, off)
            }
        };
        let r64 = |off: usize| {
            if little {
                le64(buf, off)
            } else {
                be64(buf, off)
            }
        };

        let header = match version {
            1 => {
                if buf.len() < V1_HEADER_LEN {
                    return Err(truncated(V1_HEADER_LEN, "v1"));
                }
                CowHeader {
                    layout: HeaderLayout::V1,
                    backing_file: backing_name(&buf[8..8 + V1_BACKING_LEN], path)?,
                    mtime: r32(264),
                    size: r64(268),
                    sectorsize: r32(276),
                    alignment: 0,
                    cow_format: 0,
                }
            }
            2 => {
                if buf.len() < V2_HEADER_LEN {
                    return Err(truncated(V2_HEADER_LEN, "v2"));
                }
                CowHeader {
                    layout: HeaderLayout::V2,
                    backing_file: backing_name(&buf[8..8 + V2_BACKING_LEN], path)?,
                    mtime: r32(4104),
                    size: r64(4108),
                    sectorsize: r32(4116),
                    alignment: 0,
                    cow_format: 0,
                }
            }
            3 => {
                if buf.len() < V3_HEADER_LEN {
                    return Err(truncated(V3_HEADER_LEN, "v3"));
                }
                // A real v3 header has the (absolute) backing path at 32;
                // zero there means the unpacked 64-bit layout.
                if be32(buf, 32) != 0 {
                    CowHeader {
                        layout: HeaderLayout::V3,
                        backing_file: backing_name(&buf[32..32 + V2_BACKING_LEN], path)?,
                        mtime: be32(buf, 8),
                        size: be64(buf, 12),
                        sectorsize: be32(buf, 20),
                        alignment: be32(buf, 24),
                        cow_format: be32(buf, 28),
                    }
                } else {
                    if buf.len() < V3_BROKEN_HEADER_LEN {
                        return Err(truncated(V3_BROKEN_HEADER_LEN, "broken v3"));
                    }
                    CowHeader {
                        layout: HeaderLayout::V3Broken,
                        backing_file: backing_name(&buf[36..36 + V2_BACKING_LEN], path)?,
                        mtime: be32(buf, 8),
                        size: be64(buf, 16),
                        sectorsize: be32(buf, 24),
                        alignment: be32(buf, 28),
                        cow_format: be32(buf, 32),
                    }
                }
            }
            version => {
                return Err(DiskError::UnknownVersion {
                    path: path.to_owned(),
                    version,
                })
            }
        };
        let geometry = header.geometry(path)?;
        let need = geometry.bitmap_offset + geometry.bitmap_len;
        if file_len < need {
            return Err(DiskError::ShorterThanBitmap {
                path: path.to_owned(),
                len: file_len,
                need,
            });
        }
        Ok(header)
    }

    /// A fresh v3 header, as `uml_mkcow` writes it.
    pub fn new_v3(
        backing_file: Vec<u8>,
        mtime: u32,
        size: u64,
        sectorsize: u32,
        alignment: u32,
    ) -> CowHeader {
        CowHeader {
            layout: HeaderLayout::V3,
            backing_file,
            mtime,
            size,
            sectorsize,
            alignment,
            cow_format: 0,
        }
    }

    /// The on-disk v3 header (4128 bytes, big-endian).
    pub fn to_v3_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        if self.backing_file.is_empty() {
            return Err(DiskError::BackingPathEmpty {
                path: path.to_owned(),
            });
        }
        // The field must keep a terminating NUL.
        if self.backing_file.len() >= V2_BACKING_LEN {
            return Err(DiskError::BackingPathTooLong {
                path: path.to_owned(),
                len: self.backing_file.len(),
                max: V2_BACKING_LEN - 1,
            });
        }
        let mut b = vec![0u8; V3_HEADER_LEN];
        b[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&COW_VERSION.to_be_bytes());
        b[8..12].copy_from_slice(&self.mtime.to_be_bytes());
        b[12..20].copy_from_slice(&self.size.to_be_bytes());
        b[20..24].copy_from_slice(&self.sectorsize.to_be_bytes());
        b[24..28].copy_from_slice(&self.alignment.to_be_bytes());
        b[28..32].copy_from_slice(&self.cow_format.to_be_bytes());
        b[32..32 + self.backing_file.len()].copy_from_slice(&self.backing_file);
        Ok(b)
    }

    /// Validates the numeric fields and computes the file geometry with the
    /// kernel's formulas for this version.
    pub fn geometry(&self, path: &Path) -> Result<Geometry> {
        let ss = u64::from(self.sectorsize);
        if !ss.is_power_of_two() || !(SECTOR_BYTES..=MAX_SECTORSIZE).contains(&ss) {
            return Err(DiskError::BadSectorSize {
                path: path.to_owned(),
                sectorsize: ss,
            });
        }
        let bad_size = |why| DiskError::BadSize {
            path: path.to_owned(),
            size: self.size,
            why,
        };
        if self.size == 0 {
            return Err(bad_size("zero"));
        }
        // Every offset below must stay representable even for the last
        // byte of the data area, and as an off_t.
        let limit = i64::MAX as u64;
        let chunks = self.size.div_ceil(ss);
        let (bitmap_offset, bitmap_len, data_offset) = match self.layout {
            HeaderLayout::V1 | HeaderLayout::V2 => {
                let bitmap_offset = self.layout.header_len() as u64;
                // The old formula under-counts by up to one byte; it is what
                // old writers used, so it is kept bit-exact.
                let bitmap_len = (self
                    .size
                    .checked_add(ss - 1)
                    .ok_or_else(|| bad_size("overflows"))?)
                    / (8 * ss);
                let data_offset = round_up(bitmap_offset + bitmap_len, ss)
                    .ok_or_else(|| bad_size("overflows"))?;
                (bitmap_offset, bitmap_len, data_offset)
            }
            HeaderLayout::V3 | HeaderLayout::V3Broken => {
                let align = u64::from(self.alignment);
                if !align.is_power_of_two() || align > MAX_ALIGNMENT {
                    return Err(DiskError::BadAlignment {
                        path: path.to_owned(),
                        alignment: align,
                    });
                }
                let bitmap_offset = round_up(self.layout.header_len() as u64, align)
                    .ok_or_else(|| bad_size("overflows"))?;
                let bitmap_len = chunks.div_ceil(8);
                let data_offset = round_up(bitmap_offset + bitmap_len, align)
                    .ok_or_else(|| bad_size("overflows"))?;
                (bitmap_offset, bitmap_len, data_offset)
            }
        };
        match data_offset.checked_add(self.size) {
            Some(end) if end <= limit => {}
            _ => {
                return Err(bad_size(
                    "data area would end beyond the largest file offset",
                ))
            }
        }
        Ok(Geometry {
            bitmap_offset,
            bitmap_len,
            data_offset,
            chunks,
            sectorsize: ss,
        })
    }

    /// The backing file name as a path (bytes as stored; Linux paths are
    /// arbitrary bytes).
    pub fn backing_path(&self) -> &Path {
        use std::os::unix::ffi::OsStrExt;
        Path::new(std::ffi::OsStr::from_bytes(&self.backing_file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.cow")
    }

    #[test]
    fn v3_geometry_matches_uml_mkcow() {
        // 10,000,000-byte backing file: what uml_mkcow produced on this machine.
        let h = CowHeader::new_v3(b"/tmp/base.img".to_vec(), 1, 10_000_000, 512, 4096);
        let g = h.geometry(p()).unwrap();
        assert_eq!(g.bitmap_offset, 8192);
        assert_eq!(g.bitmap_len, 2442);
        assert_eq!(g.data_offset, 12288);
        assert_eq!(g.chunks, 19532);
    }

    #[test]
    fn v1_v2_keep_old_rounding() {
        let mut h = CowHeader::new_v3(b"/b".to_vec(), 1, 1001 * 512, 512, 0);
        h.layout = HeaderLayout::V1;
        let g = h.geometry(p()).unwrap();
        // (512512 + 511) / 4096 = 125: one sector short of a bit.
        assert_eq!(
            (g.bitmap_offset, g.bitmap_len, g.data_offset),
            (280, 125, 512)
        );
        h.layout = HeaderLayout::V2;
        let g = h.geometry(p()).unwrap();
        assert_eq!(
            (g.bitmap_offset, g.bitmap_len, g.data_offset),
            (4120, 125, 4608)
        );
    }

    #[test]
    fn v3_round_trip() {
        let h = CowHeader::new_v3(b"/a/b c".to_vec(), 0xdead_beef, 1 << 40, 4096, 65536);
        let bytes = h.to_v3_bytes(p()).unwrap();
        let parsed = CowHeader::parse(&bytes, u64::MAX / 2, p()).unwrap();
        assert_eq!(parsed, h);
    }
}
