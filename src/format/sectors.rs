//! The synchronous sector API of an open disk, for the image tools and the
//! tests: map a range to backing and COW extents, read and write whole
//! sectors. A write follows the write path's order (data with copy-up,
//! then bits, then bitmap bytes); the daemon's asynchronous write path
//! goes through `daemon::scheduler` instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::bitmap::Extent;
use super::error::{DiskError, Result};
use super::open::{read_full_at, Disk};
use crate::units::{to_usize, SECTOR_BYTES};

impl Disk {
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_BYTES
    }

    fn check_range(&self, sector: u64, count: u64) -> Result<()> {
        match sector.checked_add(count) {
            Some(end) if end <= self.sectors() => Ok(()),
            _ => Err(DiskError::OutOfRange {
                path: self.path.clone(),
                sector,
                count,
                sectors: self.sectors(),
            }),
        }
    }

    /// Splits a sector range into backing and COW runs (a raw image is one
    /// "COW" run: all sectors live in the served file).
    pub fn extents(&self, sector: u64, count: u64) -> Vec<Extent> {
        match &self.cow {
            Some(c) => c.bitmap.map(sector, count).collect(),
            None => vec![Extent {
                sector,
                count,
                in_cow: true,
            }],
        }
    }

    /// Reads whole sectors synchronously (tools and tests).
    pub fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let count = buf.len() as u64 / SECTOR_BYTES;
        assert_eq!(buf.len() as u64 % SECTOR_BYTES, 0);
        self.check_range(sector, count)?;
        let mut done = 0usize;
        for e in self.extents(sector, count) {
            let len = to_usize(e.count * SECTOR_BYTES);
            let dst = &mut buf[done..done + len];
            let (file, path, off) = self.locate(e);
            read_full_at(file, dst, off, path)?;
            done += len;
        }
        Ok(())
    }

    /// Where an extent's bytes are: file, its path, byte offset.
    pub fn locate(&self, e: Extent) -> (&File, &Path, u64) {
        match &self.cow {
            Some(c) if e.in_cow => (
                &self.file,
                &self.path,
                c.geometry.data_offset + e.sector * SECTOR_BYTES,
            ),
            Some(c) => (&c.backing, &c.backing_path, e.sector * SECTOR_BYTES),
            None => (&self.file, &self.path, e.sector * SECTOR_BYTES),
        }
    }

    /// Writes whole sectors synchronously, in the order the write path
    /// uses: data (with copy-up of partial chunks), then bits, then the
    /// bitmap bytes.
    pub fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<()> {
        let count = buf.len() as u64 / SECTOR_BYTES;
        assert_eq!(buf.len() as u64 % SECTOR_BYTES, 0);
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_range(sector, count)?;
        let Some(cow) = &mut self.cow else {
            return self
                .file
                .write_all_at(buf, sector * SECTOR_BYTES)
                .map_err(DiskError::io(&self.path, "write"));
        };
        let spc = cow.bitmap.sectors_per_chunk();
        let (first, nchunks) = cow.bitmap.chunk_range(sector, count);
        if first + nchunks > cow.storable_chunks {
            return Err(DiskError::OutOfRange {
                path: self.path.clone(),
                sector,
                count,
                sectors: cow.storable_chunks * spc,
            });
        }
        // Copy-up: an unset chunk only partly covered gets the rest of its
        // sectors from the backing file first.
        let mut chunk_buf = vec![0u8; to_usize(spc * SECTOR_BYTES)];
        for chunk in first..first + nchunks {
            let c_start = chunk * spc;
            let c_end = c_start + spc;
            let covered = sector <= c_start && sector + count >= c_end;
            if covered || cow.bitmap.get(chunk) {
                continue;
            }
            read_full_at(
                &cow.backing,
                &mut chunk_buf,
                c_start * SECTOR_BYTES,
                &cow.backing_path,
            )?;
            self.file
                .write_all_at(
                    &chunk_buf,
                    cow.geometry.data_offset + c_start * SECTOR_BYTES,
                )
                .map_err(DiskError::io(&self.path, "copy-up write"))?;
        }
        self.file
            .write_all_at(buf, cow.geometry.data_offset + sector * SECTOR_BYTES)
            .map_err(DiskError::io(&self.path, "write"))?;
        if cow.bitmap.next_change(first, first + nchunks, true) == first + nchunks {
            return Ok(());
        }
        cow.bitmap.set_range(first, nchunks);
        let b0 = (first / 8) as usize;
        let b1 = to_usize((first + nchunks).div_ceil(8));
        self.file
            .write_all_at(
                &cow.bitmap.bytes(b0 as u64..b1 as u64),
                cow.geometry.bitmap_offset + b0 as u64,
            )
            .map_err(DiskError::io(&self.path, "bitmap write"))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(DiskError::io(&self.path, "fdatasync"))
    }
}
