//! virtio-blk feature bits and the config space as a driver reads it
//! (virtio 1.2 §5.2.3, §5.2.4), written out here rather than taken from
//! the crate under test.

/// Feature bit numbers.
pub mod feature {
    pub const BLK_SIZE_MAX: u32 = 1;
    pub const BLK_SEG_MAX: u32 = 2;
    pub const BLK_RO: u32 = 5;
    pub const BLK_BLK_SIZE: u32 = 6;
    pub const BLK_FLUSH: u32 = 9;
    pub const BLK_TOPOLOGY: u32 = 10;
    pub const BLK_CONFIG_WCE: u32 = 11;
    pub const BLK_MQ: u32 = 12;
    pub const BLK_DISCARD: u32 = 13;
    pub const BLK_WRITE_ZEROES: u32 = 14;
    pub const INDIRECT_DESC: u32 = 28;
    pub const EVENT_IDX: u32 = 29;
    pub const VERSION_1: u32 = 32;
}

/// Bytes of config space read: the virtio 1.2 layout up to `unused1`.
pub const CONFIG_LEN: usize = 60;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfigSpace {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfigSpace {
    pub fn parse(b: &[u8]) -> BlkConfigSpace {
        assert!(b.len() >= CONFIG_LEN, "config space of {} bytes", b.len());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        BlkConfigSpace {
            capacity: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            writeback: b[32],
            num_queues: u16::from_le_bytes([b[34], b[35]]),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        }
    }
}
