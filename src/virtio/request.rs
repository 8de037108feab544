//! One virtio-blk request (virtio 1.2 §5.2.6) as the device sees it once
//! parsed: its type, its data as host segments of guest memory, its
//! ranges, where its status goes; and why a chain was refused.
//! Parsing is `framing.rs` (header / data / status) then `decode.rs`.

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::units::SECTOR_SHIFT;

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const HEADER_SIZE: usize = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_SIZE: usize = 16;
/// Length of the GET_ID serial string buffer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Hard cap on descriptors per chain, whatever the queue size or indirect
/// table length; same value as QEMU's VIRTQUEUE_MAX_SIZE. Bounds per-request
/// memory; `seg_max` must be set below this (minus header and status).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Guest-visible status byte values (virtio_bindings has them as u32;
/// checked against it below).
pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;
const _: () = assert!(
    STATUS_OK as u32 == VIRTIO_BLK_S_OK
        && STATUS_IOERR as u32 == VIRTIO_BLK_S_IOERR
        && STATUS_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP
);

/// The limits requests are validated against (the same values are advertised
/// in the config space, see [`crate::virtio::config::BlkConfig::from_limits`]).
///
/// `seg_max` and `size_max` of 0 mean "no limit" (set them to 0 when the
/// driver did not ack VIRTIO_BLK_F_SEG_MAX / SIZE_MAX). `max_discard_seg` /
/// `max_write_zeroes_seg` of 0 mean the command is not supported (UNSUPP),
/// e.g. when VIRTIO_BLK_F_DISCARD / WRITE_ZEROES was not negotiated. The
/// parser allocates up to `16 * max_*_seg` bytes per request, so keep those
/// modest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Max data descriptors per IN/OUT request (0 = unlimited).
    pub seg_max: u32,
    /// Max bytes per data descriptor (0 = unlimited).
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub read_only: bool,
}

impl Limits {
    /// Sensible defaults for a writable disk of `capacity_sectors`:
    /// seg_max 126 (a 128-entry queue minus header and status, what Linux
    /// and QEMU use), size_max 1 MiB, 1 GiB and 32 segments per discard /
    /// write-zeroes request.
    pub fn new(capacity_sectors: u64) -> Self {
        Limits {
            capacity_sectors,
            seg_max: 126,
            size_max: 1 << 20,
            max_discard_sectors: 1 << 21,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 21,
            max_write_zeroes_seg: 32,
            read_only: false,
        }
    }
}

/// The request type from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// Anything else, including SCSI, legacy BARRIER-flagged types, secure
    /// erase and zoned commands (none are offered).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// One host-contiguous piece of a data buffer.
///
/// The pointer stays valid only while the guest memory mapping it came from
/// is alive: keep the `DescriptorChain` (whose `M` holds the memory guard)
/// or another clone of that guard until the I/O using it has completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    pub(super) guest_addr: GuestAddress,
}

// SAFETY: a Segment is only an address/length pair; it never dereferences
// the pointer itself. Whoever does (the I/O engine) must uphold the lifetime
// rule documented on the type, which does not depend on the thread.
unsafe impl Send for Segment {}
// SAFETY: as above, shared references expose only plain values.
unsafe impl Sync for Segment {}

impl Segment {
    /// Host virtual address of the first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: zero-length pieces are never produced.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Guest physical address of the first byte.
    pub fn guest_addr(&self) -> GuestAddress {
        self.guest_addr
    }
    /// A segment over daemon memory standing in for guest memory at
    /// `guest_addr` (a checked copy of guest data).
    ///
    /// # Safety
    /// `ptr` must point to `len` bytes that stay valid for as long as the
    /// segment is used.
    pub unsafe fn from_host(ptr: *mut u8, len: usize, guest_addr: GuestAddress) -> Segment {
        Segment {
            ptr,
            len,
            guest_addr,
        }
    }

    /// The segments that remain of `segments` after its first `n` bytes.
    pub fn skip(segments: &[Segment], mut n: usize) -> Vec<Segment> {
        let mut out = Vec::with_capacity(segments.len());
        for s in segments {
            if n >= s.len {
                n -= s.len;
                continue;
            }
            out.push(Segment {
                // SAFETY: n < len, so the pointer stays inside the segment.
                ptr: unsafe { s.ptr.add(n) },
                len: s.len - n,
                guest_addr: GuestAddress(s.guest_addr.raw_value().wrapping_add(n as u64)),
            });
            n = 0;
        }
        out
    }

    /// As an iovec for preadv/pwritev/io_uring.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }
}

/// One validated discard / write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (write zeroes only; the device may
    /// deallocate instead of writing zeroes).
    pub unmap: bool,
}

/// A request's data buffers.
pub type Segments = smallvec::SmallVec<[Segment; 1]>;

/// The host address of a request's status byte: inside guest memory and
/// writable when the chain was parsed, mapped as long as the memory guard
/// the request was parsed with is held (as `Segment`s are). Null when not
/// resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPtr(*mut u8);

// SAFETY: an address only, as `Segment`.
unsafe impl Send for StatusPtr {}
// SAFETY: as above.
unsafe impl Sync for StatusPtr {}

impl StatusPtr {
    pub const UNRESOLVED: StatusPtr = StatusPtr(std::ptr::null_mut());

    pub(super) fn new(ptr: *mut u8) -> StatusPtr {
        StatusPtr(ptr)
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    pub req_type: RequestType,
    /// Header sector (meaningful for IN/OUT).
    pub sector: u64,
    /// Data buffers in order: device-writable for IN and GET_ID (GET_ID is
    /// truncated to the first 20 bytes), device-readable for OUT; empty for
    /// FLUSH, DISCARD and WRITE_ZEROES. Most requests have one buffer:
    /// held inline, no allocation per request.
    pub data: Segments,
    /// Sum of `data` lengths.
    pub data_len: u64,
    /// DISCARD / WRITE_ZEROES ranges; empty otherwise (boxed: it is rare,
    /// and a request in flight stays small).
    pub ranges: Box<[DiscardRange]>,
    /// Where the 1-byte status goes (verified writable and in guest memory).
    pub status_addr: GuestAddress,
    /// The same byte in host memory, resolved when the chain was parsed.
    pub status_ptr: StatusPtr,
    /// Used length on success: bytes of guest-writable buffers written,
    /// status byte included (IN: data + 1, GET_ID: min(buf, 20) + 1, else 1).
    pub writable_len: u32,
}

impl BlkRequest {
    /// The used length to put in the used ring once `status` is written.
    /// On failure only the status byte is known to be written; reporting
    /// less than was written is allowed (the driver must not rely on more).
    pub fn used_len(&self, status: u8) -> u32 {
        if status == STATUS_OK {
            self.writable_len
        } else {
            1
        }
    }

    /// IN/OUT length in sectors.
    pub fn num_sectors(&self) -> u64 {
        self.data_len >> SECTOR_SHIFT
    }
}

/// Why a chain was rejected. Positions are 0-based positions in the chain
/// (as walked, indirect tables flattened), since the split-queue iterator
/// does not expose table indices.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("descriptor chain is empty or its head descriptor is unreadable")]
    EmptyChain,
    #[error("descriptor chain ends abnormally after {count} descriptors: the last one (addr {last_addr:#x}) has NEXT set to {next} but no further descriptor could be read (loop, bad index or bad indirect table)")]
    MalformedChain {
        count: usize,
        last_addr: u64,
        next: u16,
    },
    #[error("last descriptor #{position} (addr {addr:#x}, len {len}) is device-readable, so there is nowhere to put the status")]
    StatusNotWritable {
        position: usize,
        addr: u64,
        len: u32,
    },
    #[error(
        "last descriptor #{position} (addr {addr:#x}) has length 0, so there is no status byte"
    )]
    StatusEmpty { position: usize, addr: u64 },
    #[error(
        "status byte of descriptor #{position} (addr {addr:#x}, len {len}) is outside guest memory"
    )]
    StatusOutOfMemory {
        position: usize,
        addr: u64,
        len: u32,
    },
    #[error("descriptor chain has {count} descriptors, more than the limit {max}")]
    TooManyDescriptors { count: usize, max: usize },
    #[error(
        "device-readable descriptor #{position} (addr {addr:#x}) follows a device-writable one"
    )]
    ReadableAfterWritable { position: usize, addr: u64 },
    #[error("request header must be device-readable but descriptor #0 (addr {addr:#x}, len {len}) is write-only")]
    HeaderWriteOnly { addr: u64, len: u32 },
    #[error("request header has only {len} readable bytes, 16 are needed")]
    HeaderTooShort { len: u64 },
    #[error("descriptor #{position} (addr {addr:#x}, len {len}) is outside guest memory")]
    DescriptorOutOfMemory {
        position: usize,
        addr: u64,
        len: u32,
    },
    #[error("unsupported request type {0:#x}")]
    UnsupportedType(u32),
    #[error("{req_type:?} request on a read-only device")]
    ReadOnly { req_type: RequestType },
    #[error(
        "{req_type:?} request carries {len} bytes in descriptor #{position} of the wrong direction"
    )]
    WrongDirection {
        req_type: RequestType,
        position: usize,
        len: u64,
    },
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength { len: u64 },
    #[error("request at sector {sector} of {sectors} sectors exceeds capacity {capacity}")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("{count} data descriptors exceed seg_max {max}")]
    TooManySegments { count: usize, max: u32 },
    #[error("data descriptor #{position} has {len} bytes, more than size_max {max}")]
    SegmentTooLarge { position: usize, len: u64, max: u32 },
    #[error("{req_type:?} payload of {len} bytes is not a non-zero multiple of 16")]
    BadDiscardPayload { req_type: RequestType, len: u64 },
    #[error("{req_type:?} request has {count} segments, more than the limit {max}")]
    TooManyDiscardSegments {
        req_type: RequestType,
        count: u64,
        max: u32,
    },
    #[error("{req_type:?} segment {index} has unsupported flags {flags:#x}")]
    UnsupportedFlags {
        req_type: RequestType,
        index: usize,
        flags: u32,
    },
    #[error("{req_type:?} segment {index} has {num_sectors} sectors, more than {max}")]
    DiscardTooLarge {
        req_type: RequestType,
        index: usize,
        num_sectors: u32,
        max: u32,
    },
    #[error("{req_type:?} segment {index} (sector {sector}, {num_sectors} sectors) exceeds capacity {capacity}")]
    DiscardOutOfRange {
        req_type: RequestType,
        index: usize,
        sector: u64,
        num_sectors: u32,
        capacity: u64,
    },
}

impl RequestError {
    /// The status to report to the guest, or `None` when no status byte can
    /// be written (the chain is then completed with used length 0).
    pub fn status(&self) -> Option<u8> {
        use RequestError::*;
        match self {
            EmptyChain
            | MalformedChain { .. }
            | StatusNotWritable { .. }
            | StatusEmpty { .. }
            | StatusOutOfMemory { .. } => None,
            UnsupportedType(_) | UnsupportedFlags { .. } => Some(STATUS_UNSUPP),
            TooManyDescriptors { .. }
            | ReadableAfterWritable { .. }
            | HeaderWriteOnly { .. }
            | HeaderTooShort { .. }
            | DescriptorOutOfMemory { .. }
            | ReadOnly { .. }
            | WrongDirection { .. }
            | UnalignedLength { .. }
            | OutOfRange { .. }
            | TooManySegments { .. }
            | SegmentTooLarge { .. }
            | BadDiscardPayload { .. }
            | TooManyDiscardSegments { .. }
            | DiscardTooLarge { .. }
            | DiscardOutOfRange { .. } => Some(STATUS_IOERR),
        }
    }
}

/// A rejected request: the error plus where to write its status.
/// `status_addr` is `Some` exactly when `error.status()` is `Some`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{error}")]
pub struct RequestFailure {
    pub error: RequestError,
    pub status_addr: Option<GuestAddress>,
}

impl RequestFailure {
    /// Status byte and its address, if one can be written.
    pub fn status(&self) -> Option<(GuestAddress, u8)> {
        Some((self.status_addr?, self.error.status()?))
    }

    /// Used length: 1 if a status byte is written, else 0.
    pub fn used_len(&self) -> u32 {
        u32::from(self.status().is_some())
    }
}

/// Write the status byte. Returns false if the address is not writable
/// guest memory (only possible if the memory map changed since parsing).
pub fn write_status<G: GuestMemory + ?Sized>(mem: &G, addr: GuestAddress, status: u8) -> bool {
    mem.write_slice(&[status], addr).is_ok()
}

impl BlkRequest {
    /// Writes the request's status byte (through its resolved host
    /// address, without a guest memory lookup when there is one).
    ///
    /// # Safety
    /// `mem` is the memory guard the request was parsed with, still held.
    pub unsafe fn write_status<G: GuestMemory + ?Sized>(&self, mem: &G, status: u8) {
        if self.status_ptr.0.is_null() {
            write_status(mem, self.status_addr, status);
        } else {
            // SAFETY: checked writable guest memory when parsed, mapped by
            // `mem` (the caller's promise); a volatile write, as the guest
            // may look at it.
            unsafe { std::ptr::write_volatile(self.status_ptr.0, status) };
        }
    }
}
