//! The virtio-blk device configuration space and feature bits.
//!
//! The layout follows `struct virtio_blk_config` of virtio 1.2 §5.2.4 up to
//! and including `unused1[3]`: 60 bytes. The secure-erase (bytes 60..72) and
//! zoned (72..96) fields are deliberately omitted because we never offer
//! `VIRTIO_BLK_F_SECURE_ERASE` or `VIRTIO_BLK_F_ZONED`; a frontend that reads
//! past byte 60 (QEMU sizes its read from the negotiated features, Linux
//! headers may be larger) gets zeroes, which is what those fields must read
//! as when the features are absent.
//!
//! All multi-byte fields are little-endian (we only offer VIRTIO_F_VERSION_1).

use thiserror::Error;
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::virtio::request::Limits;

/// Size in bytes of the config space we expose (virtio 1.2 layout up to `unused1`).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// Byte offsets of the config-space fields (virtio 1.2 §5.2.4).
pub mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const GEOMETRY_CYLINDERS: usize = 16;
    pub const GEOMETRY_HEADS: usize = 18;
    pub const GEOMETRY_SECTORS: usize = 19;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const UNUSED0: usize = 33;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    pub const UNUSED1: usize = 57;
}

/// Errors from [`BlkConfig::write_config`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// Only the 1-byte `writeback` field (offset 32) is driver-writable.
    #[error("config write of {len} bytes at offset {offset} is not allowed (only the writeback byte at offset 32 is writable)")]
    ReadOnlyField { offset: u32, len: usize },
    /// `writeback` only takes 0 (writethrough) or 1 (writeback).
    #[error("invalid writeback value {0} (must be 0 or 1)")]
    InvalidWriteback(u8),
}

/// The device configuration space, kept as host-endian fields and
/// serialized on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    /// Logical block size in bytes.
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    /// 1 = writeback cache (flush needed), 0 = writethrough. Driver-writable.
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Build the config space from the request limits the device enforces,
    /// so the guest is told exactly what the parser will accept.
    ///
    /// `blk_size` is the logical block size in bytes (512 for our disks);
    /// `discard_sector_alignment` is set to one logical block.
    pub fn from_limits(limits: &Limits, num_queues: u16, blk_size: u32, writeback: bool) -> Self {
        let blk_sectors = (blk_size / 512).max(1);
        BlkConfig {
            capacity: limits.capacity_sectors,
            size_max: limits.size_max,
            seg_max: limits.seg_max,
            cylinders: 0,
            heads: 0,
            sectors: 0,
            blk_size,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: u8::from(writeback),
            num_queues,
            max_discard_sectors: limits.max_discard_sectors,
            max_discard_seg: limits.max_discard_seg,
            discard_sector_alignment: blk_sectors,
            max_write_zeroes_sectors: limits.max_write_zeroes_sectors,
            max_write_zeroes_seg: limits.max_write_zeroes_seg,
            write_zeroes_may_unmap: 0,
        }
    }

    /// Serialize to the little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        use offset as o;
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        fn put(b: &mut [u8], at: usize, v: &[u8]) {
            b[at..at + v.len()].copy_from_slice(v);
        }
        put(&mut b, o::CAPACITY, &self.capacity.to_le_bytes());
        put(&mut b, o::SIZE_MAX, &self.size_max.to_le_bytes());
        put(&mut b, o::SEG_MAX, &self.seg_max.to_le_bytes());
        put(&mut b, o::GEOMETRY_CYLINDERS, &self.cylinders.to_le_bytes());
        b[o::GEOMETRY_HEADS] = self.heads;
        b[o::GEOMETRY_SECTORS] = self.sectors;
        put(&mut b, o::BLK_SIZE, &self.blk_size.to_le_bytes());
        b[o::PHYSICAL_BLOCK_EXP] = self.physical_block_exp;
        b[o::ALIGNMENT_OFFSET] = self.alignment_offset;
        put(&mut b, o::MIN_IO_SIZE, &self.min_io_size.to_le_bytes());
        put(&mut b, o::OPT_IO_SIZE, &self.opt_io_size.to_le_bytes());
        b[o::WRITEBACK] = self.writeback;
        put(&mut b, o::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(
            &mut b,
            o::MAX_DISCARD_SECTORS,
            &self.max_discard_sectors.to_le_bytes(),
        );
        put(
            &mut b,
            o::MAX_DISCARD_SEG,
            &self.max_discard_seg.to_le_bytes(),
        );
        put(
            &mut b,
            o::DISCARD_SECTOR_ALIGNMENT,
            &self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            &mut b,
            o::MAX_WRITE_ZEROES_SECTORS,
            &self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            &mut b,
            o::MAX_WRITE_ZEROES_SEG,
            &self.max_write_zeroes_seg.to_le_bytes(),
        );
        b[o::WRITE_ZEROES_MAY_UNMAP] = self.write_zeroes_may_unmap;
        b
    }

    /// Exactly `size` bytes of the config space starting at `offset`; bytes
    /// past the end of the config space read as zero. Never panics: offsets
    /// and `offset + size` are handled without overflow. (The vhost crate
    /// already bounds `offset + size` to 4096 for GET_CONFIG, so `size` is
    /// small in practice.)
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let size = size as usize;
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if start < bytes.len() {
            let n = (bytes.len() - start).min(size);
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }

    /// Apply a driver write. Only the `writeback` byte is writable (the
    /// driver toggles the cache mode when VIRTIO_BLK_F_CONFIG_WCE is
    /// negotiated); everything else is read-only.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        if offset as usize != offset::WRITEBACK || data.len() != 1 {
            return Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            });
        }
        match data[0] {
            v @ (0 | 1) => {
                self.writeback = v;
                Ok(())
            }
            v => Err(ConfigError::InvalidWriteback(v)),
        }
    }
}

/// The virtio (device) feature bits this backend offers, including the
/// vhost-user PROTOCOL_FEATURES bit (bit 30) that vhost-user requires.
///
/// VIRTIO_BLK_F_RO is added for read-only devices. DISCARD / WRITE_ZEROES are
/// offered regardless; on a read-only device such requests fail with IOERR.
pub fn virtio_features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    let mut features = bits.iter().fold(0u64, |acc, &b| acc | (1u64 << b));
    if read_only {
        features |= 1u64 << VIRTIO_BLK_F_RO;
    }
    features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The names of the feature bits set in `features` ("bit N" for bits
/// this backend does not know), for people reading `query-connection`.
pub fn feature_names(features: u64) -> Vec<String> {
    let known: [(u32, &str); 15] = [
        (VIRTIO_BLK_F_SIZE_MAX, "size-max"),
        (VIRTIO_BLK_F_SEG_MAX, "seg-max"),
        (VIRTIO_BLK_F_RO, "ro"),
        (VIRTIO_BLK_F_BLK_SIZE, "blk-size"),
        (VIRTIO_BLK_F_FLUSH, "flush"),
        (VIRTIO_BLK_F_TOPOLOGY, "topology"),
        (VIRTIO_BLK_F_CONFIG_WCE, "config-wce"),
        (VIRTIO_BLK_F_MQ, "mq"),
        (VIRTIO_BLK_F_DISCARD, "discard"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "write-zeroes"),
        (VIRTIO_RING_F_INDIRECT_DESC, "indirect-desc"),
        (VIRTIO_RING_F_EVENT_IDX, "event-idx"),
        (VIRTIO_F_VERSION_1, "version-1"),
        (30, "protocol-features"),
        (26, "log-all"),
    ];
    (0..64)
        .filter(|b| features & (1u64 << b) != 0)
        .map(|b| {
            known
                .iter()
                .find(|(k, _)| *k == b)
                .map_or_else(|| format!("bit {b}"), |(_, n)| (*n).to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn feature_names_name_known_bits_and_number_the_rest() {
        let names = feature_names((1 << VIRTIO_BLK_F_FLUSH) | (1 << 30) | (1 << 50));
        assert_eq!(names, ["flush", "protocol-features", "bit 50"]);
        assert!(feature_names(0).is_empty());
    }

    fn sample() -> BlkConfig {
        let mut limits = Limits::new(0x0102_0304_0506_0708);
        limits.size_max = 0x1111_2222;
        limits.seg_max = 0x3333_4444;
        limits.max_discard_sectors = 0x5555_6666;
        limits.max_discard_seg = 0x7777_8888;
        limits.max_write_zeroes_sectors = 0x9999_aaaa;
        limits.max_write_zeroes_seg = 0xbbbb_cccc;
        let mut c = BlkConfig::from_limits(&limits, 0x0d0e, 4096, true);
        c.cylinders = 0xa1a2;
        c.heads = 0xa3;
        c.sectors = 0xa4;
        c.physical_block_exp = 0xb1;
        c.alignment_offset = 0xb2;
        c.min_io_size = 0xb3b4;
        c.opt_io_size = 0xc1c2_c3c4;
        c.write_zeroes_may_unmap = 1;
        c
    }

    fn le(b: &[u8], at: usize, n: usize) -> u64 {
        b[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | x as u64)
    }

    /// The serialised bytes at the literal offsets of `struct
    /// virtio_blk_config` in virtio 1.2 §5.2.4, written as numbers (not
    /// through `offset::`, which this checks), every byte of the 60 covered.
    #[test]
    fn layout_matches_spec() {
        let c = sample();
        let b = c.to_bytes();
        assert_eq!(b.len(), 60);
        assert_eq!(le(&b, 0, 8), 0x0102_0304_0506_0708);
        assert_eq!(le(&b, 8, 4), 0x1111_2222);
        assert_eq!(le(&b, 12, 4), 0x3333_4444);
        assert_eq!(le(&b, 16, 2), 0xa1a2);
        assert_eq!(b[18], 0xa3);
        assert_eq!(b[19], 0xa4);
        assert_eq!(le(&b, 20, 4), 4096);
        assert_eq!(b[24], 0xb1);
        assert_eq!(b[25], 0xb2);
        assert_eq!(le(&b, 26, 2), 0xb3b4);
        assert_eq!(le(&b, 28, 4), 0xc1c2_c3c4);
        assert_eq!(b[32], 1);
        assert_eq!(b[33], 0);
        assert_eq!(le(&b, 34, 2), 0x0d0e);
        assert_eq!(le(&b, 36, 4), 0x5555_6666);
        assert_eq!(le(&b, 40, 4), 0x7777_8888);
        assert_eq!(le(&b, 44, 4), 8); // one 4096-byte block = 8 sectors
        assert_eq!(le(&b, 48, 4), 0x9999_aaaa);
        assert_eq!(le(&b, 52, 4), 0xbbbb_cccc);
        assert_eq!(b[56], 1);
        assert_eq!(&b[57..60], &[0, 0, 0]);
    }

    #[test]
    fn offsets_match_linux_struct() {
        // Cross-check against the kernel header's struct (virtio-bindings).
        use std::mem::offset_of;
        type C = virtio_blk_config;
        assert_eq!(offset_of!(C, capacity), offset::CAPACITY);
        assert_eq!(offset_of!(C, size_max), offset::SIZE_MAX);
        assert_eq!(offset_of!(C, seg_max), offset::SEG_MAX);
        assert_eq!(offset_of!(C, geometry), offset::GEOMETRY_CYLINDERS);
        assert_eq!(offset_of!(C, blk_size), offset::BLK_SIZE);
        assert_eq!(
            offset_of!(C, physical_block_exp),
            offset::PHYSICAL_BLOCK_EXP
        );
        assert_eq!(offset_of!(C, alignment_offset), offset::ALIGNMENT_OFFSET);
        assert_eq!(offset_of!(C, min_io_size), offset::MIN_IO_SIZE);
        assert_eq!(offset_of!(C, opt_io_size), offset::OPT_IO_SIZE);
        assert_eq!(offset_of!(C, wce), offset::WRITEBACK);
        assert_eq!(offset_of!(C, unused), offset::UNUSED0);
        assert_eq!(offset_of!(C, num_queues), offset::NUM_QUEUES);
        assert_eq!(
            offset_of!(C, max_discard_sectors),
            offset::MAX_DISCARD_SECTORS
        );
        assert_eq!(offset_of!(C, max_discard_seg), offset::MAX_DISCARD_SEG);
        assert_eq!(
            offset_of!(C, discard_sector_alignment),
            offset::DISCARD_SECTOR_ALIGNMENT
        );
        assert_eq!(
            offset_of!(C, max_write_zeroes_sectors),
            offset::MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            offset_of!(C, max_write_zeroes_seg),
            offset::MAX_WRITE_ZEROES_SEG
        );
        assert_eq!(
            offset_of!(C, write_zeroes_may_unmap),
            offset::WRITE_ZEROES_MAY_UNMAP
        );
        assert_eq!(offset_of!(C, unused1), offset::UNUSED1);
        assert_eq!(offset_of!(C, max_secure_erase_sectors), CONFIG_SPACE_SIZE);
    }

    #[test]
    fn partial_reads_at_every_offset() {
        let c = sample();
        let full = c.to_bytes();
        for off in 0..80u32 {
            for size in 0..80u32 {
                let r = c.read_config(off, size);
                assert_eq!(r.len(), size as usize);
                for (i, &byte) in r.iter().enumerate() {
                    let pos = off as usize + i;
                    let want = if pos < full.len() { full[pos] } else { 0 };
                    assert_eq!(byte, want, "offset {off} size {size} byte {i}");
                }
            }
        }
    }

    #[test]
    fn reads_with_extreme_offsets_do_not_panic() {
        let c = sample();
        assert_eq!(c.read_config(u32::MAX, 16), vec![0; 16]);
        assert_eq!(c.read_config(u32::MAX - 3, 8), vec![0; 8]);
        assert_eq!(c.read_config(59, 4096).len(), 4096);
        assert!(c.read_config(u32::MAX, 0).is_empty());
        // QEMU reads the whole space from offset 0.
        assert_eq!(&c.read_config(0, 60)[..], &c.to_bytes()[..]);
    }

    #[test]
    fn write_config_rules() {
        let mut c = sample();
        assert_eq!(c.write_config(32, &[0]), Ok(()));
        assert_eq!(c.writeback, 0);
        assert_eq!(c.read_config(32, 1), vec![0]);
        assert_eq!(c.write_config(32, &[1]), Ok(()));
        assert_eq!(c.writeback, 1);
        assert_eq!(
            c.write_config(32, &[2]),
            Err(ConfigError::InvalidWriteback(2))
        );
        assert_eq!(c.writeback, 1);
        let before = c.clone();
        for (off, data) in [
            (0u32, &[0u8][..]),
            (31, &[0]),
            (33, &[0]),
            (32, &[0, 0]),
            (32, &[]),
            (u32::MAX, &[1]),
            (0, &[0; 60]),
        ] {
            assert_eq!(
                c.write_config(off, data),
                Err(ConfigError::ReadOnlyField {
                    offset: off,
                    len: data.len()
                })
            );
        }
        assert_eq!(c, before);
    }

    #[test]
    fn feature_mask() {
        let f = virtio_features(false);
        for bit in [32, 29, 28, 1, 2, 6, 10, 9, 11, 12, 13, 14, 30] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = virtio_features(true);
        assert_eq!(ro, f | (1 << 5));
        // Nothing we do not implement (GEOMETRY, SCSI, BARRIER, SECURE_ERASE, ZONED).
        for bit in [0, 4, 7, 16, 17] {
            assert_eq!(ro & (1 << bit), 0, "bit {bit}");
        }
    }
}
