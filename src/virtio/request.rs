//! Parsing and validation of one virtio-blk request (virtio 1.2 §5.2.6)
//! from a split-virtqueue descriptor chain.
//!
//! Framing is handled generically, as QEMU's virtio-blk handler does: the
//! chain is a device-readable part followed by a device-writable part; the
//! 16-byte header is the first 16 bytes of the readable part (it may be split
//! over descriptors or share one with data) and the status is the last byte
//! of the writable part. Everything in between is the data.
//!
//! [`parse_request`] returns either a [`Request`] whose data buffers are
//! resolved to host pointers and verified to lie inside guest memory, or a
//! [`RequestFailure`] that says which status (if any) to write and where.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes per virtio-blk sector (always 512, whatever the logical block size).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
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

/// Guest-visible status byte values.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

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
    ptr: *mut u8,
    len: usize,
    guest_addr: GuestAddress,
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

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub req_type: RequestType,
    /// Header sector (meaningful for IN/OUT).
    pub sector: u64,
    /// Data buffers in order: device-writable for IN and GET_ID (GET_ID is
    /// truncated to the first 20 bytes), device-readable for OUT; empty for
    /// FLUSH, DISCARD and WRITE_ZEROES.
    pub data: Vec<Segment>,
    /// Sum of `data` lengths.
    pub data_len: u64,
    /// DISCARD / WRITE_ZEROES ranges; empty otherwise.
    pub ranges: Vec<DiscardRange>,
    /// Where the 1-byte status goes (verified writable and in guest memory).
    pub status_addr: GuestAddress,
    /// Used length on success: bytes of guest-writable buffers written,
    /// status byte included (IN: data + 1, GET_ID: min(buf, 20) + 1, else 1).
    pub writable_len: u32,
}

impl Request {
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

/// A byte range of one descriptor, used for the header/data/status split.
#[derive(Debug, Clone, Copy)]
struct Piece {
    position: usize,
    addr: GuestAddress,
    len: u64,
    /// The whole descriptor, for error messages.
    desc_addr: u64,
    desc_len: u32,
}

impl Piece {
    fn out_of_memory(&self) -> RequestError {
        RequestError::DescriptorOutOfMemory {
            position: self.position,
            addr: self.desc_addr,
            len: self.desc_len,
        }
    }
}

/// Parse and validate the request in `chain`.
///
/// The chain is walked on a clone, so the caller keeps `chain` (and with it
/// the memory guard that keeps the returned host pointers valid) and its
/// `head_index()` for completing the request.
pub fn parse_request<M>(
    chain: &DescriptorChain<M>,
    limits: &Limits,
) -> Result<Request, RequestFailure>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let no_status = |error| RequestFailure {
        error,
        status_addr: None,
    };

    // Walk the whole chain (virtio-queue bounds the walk by the queue size /
    // indirect table length), keeping at most MAX_CHAIN_DESCRIPTORS.
    let mut descs: Vec<Descriptor> = Vec::with_capacity(4);
    let mut count = 0usize;
    let mut last = None;
    for d in chain.clone() {
        if descs.len() < MAX_CHAIN_DESCRIPTORS {
            descs.push(d);
        }
        count += 1;
        last = Some(d);
    }
    let Some(last) = last else {
        return Err(no_status(RequestError::EmptyChain));
    };
    // The iterator just stops on loops (TTL), out-of-table `next`, bad
    // indirect tables and unreadable descriptors. In every such case the
    // last descriptor it yielded still has NEXT set, whereas a well-formed
    // chain always ends in a descriptor without NEXT.
    if last.has_next() {
        return Err(no_status(RequestError::MalformedChain {
            count,
            last_addr: last.addr().raw_value(),
            next: last.next(),
        }));
    }

    let status_addr = find_status(mem, &last, count - 1).map_err(no_status)?;
    let fail = |error| RequestFailure {
        error,
        status_addr: Some(status_addr),
    };

    if count > MAX_CHAIN_DESCRIPTORS {
        return Err(fail(RequestError::TooManyDescriptors {
            count,
            max: MAX_CHAIN_DESCRIPTORS,
        }));
    }

    // Split into the readable prefix and the writable suffix.
    let first_writable = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    if let Some(p) = descs[first_writable..]
        .iter()
        .position(|d| !d.is_write_only())
    {
        let position = first_writable + p;
        return Err(fail(RequestError::ReadableAfterWritable {
            position,
            addr: descs[position].addr().raw_value(),
        }));
    }
    if first_writable == 0 {
        return Err(fail(RequestError::HeaderWriteOnly {
            addr: descs[0].addr().raw_value(),
            len: descs[0].len(),
        }));
    }

    let mut readable: Vec<Piece> = descs[..first_writable]
        .iter()
        .enumerate()
        .map(|(i, d)| piece(i, d))
        .collect();
    let mut writable: Vec<Piece> = descs[first_writable..]
        .iter()
        .enumerate()
        .map(|(i, d)| piece(first_writable + i, d))
        .collect();
    // The status byte is the last byte of the writable part.
    if let Some(w) = writable.last_mut() {
        w.len -= 1; // len >= 1 was checked by find_status
    }

    let readable_len: u64 = readable.iter().map(|p| p.len).sum();
    if readable_len < HEADER_SIZE as u64 {
        return Err(fail(RequestError::HeaderTooShort { len: readable_len }));
    }
    let mut header = [0u8; HEADER_SIZE];
    let readable_data = split_off_front(&mut readable, HEADER_SIZE as u64);
    copy_from_guest(mem, &readable, &mut header).map_err(fail)?;
    let writable_data = {
        writable.retain(|p| p.len > 0);
        writable
    };
    let readable_data: Vec<Piece> = readable_data.into_iter().filter(|p| p.len > 0).collect();

    let raw_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let req_type = RequestType::from(raw_type);

    let mut req = Request {
        req_type,
        sector,
        data: Vec::new(),
        data_len: 0,
        ranges: Vec::new(),
        status_addr,
        writable_len: 1,
    };

    let wrong_direction = |pieces: &[Piece]| match pieces.first() {
        Some(p) => Err(fail(RequestError::WrongDirection {
            req_type,
            position: p.position,
            len: pieces.iter().map(|p| p.len).sum(),
        })),
        None => Ok(()),
    };

    match req_type {
        RequestType::Unsupported(t) => return Err(fail(RequestError::UnsupportedType(t))),
        RequestType::Discard if limits.max_discard_seg == 0 => {
            return Err(fail(RequestError::UnsupportedType(raw_type)))
        }
        RequestType::WriteZeroes if limits.max_write_zeroes_seg == 0 => {
            return Err(fail(RequestError::UnsupportedType(raw_type)))
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes if limits.read_only => {
            // Like QEMU: refused before any other validation.
            return Err(fail(RequestError::ReadOnly { req_type }));
        }
        _ => {}
    }

    match req_type {
        RequestType::In | RequestType::Out => {
            let (data, wrong, perm) = if req_type == RequestType::In {
                (&writable_data, &readable_data, Permissions::Write)
            } else {
                (&readable_data, &writable_data, Permissions::Read)
            };
            wrong_direction(wrong)?;
            check_data_segments(data, limits).map_err(fail)?;
            let len: u64 = data.iter().map(|p| p.len).sum();
            if len % SECTOR_SIZE != 0 {
                return Err(fail(RequestError::UnalignedLength { len }));
            }
            // Zero-length IN/OUT: the spec is silent; QEMU's virtio-blk
            // handler (qemu-storage-daemon) accepts it as a no-op with
            // status OK provided sector <= capacity, and so do we.
            let sectors = len >> SECTOR_SHIFT;
            let cap = limits.capacity_sectors;
            if sector > cap || sectors > cap - sector {
                return Err(fail(RequestError::OutOfRange {
                    sector,
                    sectors,
                    capacity: cap,
                }));
            }
            req.data = resolve(mem, data, perm).map_err(fail)?;
            req.data_len = len;
            if req_type == RequestType::In {
                req.writable_len = clamp_u32(len + 1);
            }
        }
        RequestType::Flush => {
            // Data descriptors on FLUSH are ignored (as QEMU does).
        }
        RequestType::GetId => {
            // Any writable buffer size works: we fill min(len, 20) bytes.
            // A GET_ID with no data buffer at all is, like in QEMU, answered
            // OK with nothing but the status written. Readable extras are
            // ignored (QEMU ignores them too).
            let mut data = writable_data;
            let len = truncate_pieces(&mut data, ID_BYTES as u64);
            req.data = resolve(mem, &data, Permissions::Write).map_err(fail)?;
            req.data_len = len;
            req.writable_len = clamp_u32(len + 1);
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            wrong_direction(&writable_data)?;
            req.ranges = parse_ranges(mem, &readable_data, req_type, limits).map_err(fail)?;
        }
        RequestType::Unsupported(_) => {} // handled above
    }
    Ok(req)
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn piece(position: usize, d: &Descriptor) -> Piece {
    Piece {
        position,
        addr: d.addr(),
        len: d.len() as u64,
        desc_addr: d.addr().raw_value(),
        desc_len: d.len(),
    }
}

/// Checks the status byte of the last descriptor and returns its address.
fn find_status<G: GuestMemory + ?Sized>(
    mem: &G,
    last: &Descriptor,
    position: usize,
) -> Result<GuestAddress, RequestError> {
    let addr = last.addr().raw_value();
    let len = last.len();
    if !last.is_write_only() {
        return Err(RequestError::StatusNotWritable {
            position,
            addr,
            len,
        });
    }
    if len == 0 {
        return Err(RequestError::StatusEmpty { position, addr });
    }
    let oom = RequestError::StatusOutOfMemory {
        position,
        addr,
        len,
    };
    let status = addr.checked_add(len as u64 - 1).ok_or(oom.clone())?;
    let status = GuestAddress(status);
    if !mem.check_range(status, 1, Permissions::Write) {
        return Err(oom);
    }
    Ok(status)
}

/// Removes the first `n` bytes from `pieces` (which keeps them) and returns
/// the remainder. The caller guarantees `pieces` holds at least `n` bytes.
fn split_off_front(pieces: &mut Vec<Piece>, n: u64) -> Vec<Piece> {
    let mut rest = Vec::new();
    let mut left = n;
    let mut keep = 0;
    for (i, p) in pieces.iter_mut().enumerate() {
        if left == 0 {
            rest.push(*p);
            continue;
        }
        keep = i + 1;
        if p.len > left {
            let mut tail = *p;
            // Saturating: an address that would wrap is never guest RAM and
            // is rejected when resolved.
            tail.addr = GuestAddress(p.addr.raw_value().saturating_add(left));
            tail.len = p.len - left;
            p.len = left;
            rest.push(tail);
            left = 0;
        } else {
            left -= p.len;
        }
    }
    pieces.truncate(keep);
    rest
}

/// Keeps at most `n` bytes of `pieces`; returns the kept length.
fn truncate_pieces(pieces: &mut Vec<Piece>, n: u64) -> u64 {
    let mut total = 0;
    let mut keep = 0;
    for p in pieces.iter_mut() {
        if total == n {
            break;
        }
        p.len = p.len.min(n - total);
        total += p.len;
        keep += 1;
    }
    pieces.truncate(keep);
    total
}

fn check_data_segments(data: &[Piece], limits: &Limits) -> Result<(), RequestError> {
    if limits.seg_max != 0 && data.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments {
            count: data.len(),
            max: limits.seg_max,
        });
    }
    if limits.size_max != 0 {
        if let Some(p) = data.iter().find(|p| p.len > limits.size_max as u64) {
            return Err(RequestError::SegmentTooLarge {
                position: p.position,
                len: p.len,
                max: limits.size_max,
            });
        }
    }
    Ok(())
}

/// Resolves guest ranges to host segments, splitting at memory-region
/// boundaries; any byte outside guest memory is an error.
fn resolve<G: GuestMemory + ?Sized>(
    mem: &G,
    pieces: &[Piece],
    perm: Permissions,
) -> Result<Vec<Segment>, RequestError> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        let len = usize::try_from(p.len).map_err(|_| p.out_of_memory())?;
        // Reject ranges that wrap the address space before asking vm-memory.
        p.addr
            .raw_value()
            .checked_add(p.len)
            .ok_or_else(|| p.out_of_memory())?;
        let slices = mem
            .get_slices(p.addr, len, perm)
            .map_err(|_| p.out_of_memory())?;
        let mut guest = p.addr;
        let mut got = 0usize;
        for s in slices {
            let s = s.map_err(|_| p.out_of_memory())?;
            if s.is_empty() {
                continue;
            }
            out.push(Segment {
                ptr: s.ptr_guard_mut().as_ptr(),
                len: s.len(),
                guest_addr: guest,
            });
            got += s.len();
            guest = GuestAddress(guest.raw_value().wrapping_add(s.len() as u64));
        }
        if got != len {
            return Err(p.out_of_memory());
        }
    }
    Ok(out)
}

/// Copies exactly `buf.len()` bytes from the start of `pieces`.
fn copy_from_guest<G: GuestMemory + ?Sized>(
    mem: &G,
    pieces: &[Piece],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut off = 0usize;
    for p in pieces {
        if off == buf.len() {
            break;
        }
        let n = (buf.len() - off).min(usize::try_from(p.len).unwrap_or(usize::MAX));
        if n == 0 {
            continue; // empty descriptors may carry any address
        }
        p.addr
            .raw_value()
            .checked_add(n as u64)
            .ok_or_else(|| p.out_of_memory())?;
        mem.read_slice(&mut buf[off..off + n], p.addr)
            .map_err(|_| p.out_of_memory())?;
        off += n;
    }
    if off == buf.len() {
        Ok(())
    } else {
        // Unreachable given the callers' length checks; fail safe anyway.
        Err(RequestError::HeaderTooShort { len: off as u64 })
    }
}

fn parse_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    payload: &[Piece],
    req_type: RequestType,
    limits: &Limits,
) -> Result<Vec<DiscardRange>, RequestError> {
    let (max_seg, max_sectors) = if req_type == RequestType::Discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let len: u64 = payload.iter().map(|p| p.len).sum();
    if len == 0 || len % DISCARD_SEGMENT_SIZE as u64 != 0 {
        return Err(RequestError::BadDiscardPayload { req_type, len });
    }
    let count = len / DISCARD_SEGMENT_SIZE as u64;
    // Checked before reading so the guest cannot make us allocate more than
    // 16 * max_seg bytes.
    if count > max_seg as u64 {
        return Err(RequestError::TooManyDiscardSegments {
            req_type,
            count,
            max: max_seg,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    copy_from_guest(mem, payload, &mut bytes)?;

    let mut ranges = Vec::with_capacity(count as usize);
    for seg in bytes.chunks_exact(DISCARD_SEGMENT_SIZE) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&seg[0..8]);
        let mut n = [0u8; 4];
        n.copy_from_slice(&seg[8..12]);
        let mut f = [0u8; 4];
        f.copy_from_slice(&seg[12..16]);
        ranges.push((
            u64::from_le_bytes(s),
            u32::from_le_bytes(n),
            u32::from_le_bytes(f),
        ));
    }

    // Flags first, over all segments: the spec says the device MUST answer
    // UNSUPP for unknown flags (and for UNMAP on discard), so that outranks
    // the range errors, for which the spec leaves the status open (IOERR).
    let allowed = if req_type == RequestType::WriteZeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    for (index, &(_, _, flags)) in ranges.iter().enumerate() {
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags {
                req_type,
                index,
                flags,
            });
        }
    }

    let cap = limits.capacity_sectors;
    let mut out = Vec::with_capacity(ranges.len());
    for (index, &(sector, num_sectors, flags)) in ranges.iter().enumerate() {
        if num_sectors > max_sectors {
            return Err(RequestError::DiscardTooLarge {
                req_type,
                index,
                num_sectors,
                max: max_sectors,
            });
        }
        // num_sectors == 0 is accepted as a no-op, as QEMU does.
        if sector > cap || num_sectors as u64 > cap - sector {
            return Err(RequestError::DiscardOutOfRange {
                req_type,
                index,
                sector,
                num_sectors,
                capacity: cap,
            });
        }
        out.push(DiscardRange {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    type Mem = GuestMemoryMmap<()>;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const R: bool = false;
    const W: bool = true;

    // Own ring layout (not MockSplitQueue's): descriptor table at 0 (at most
    // 256 entries), avail ring at 0x1000, used ring at 0x2000, indirect
    // tables from 0x4000, buffers from 0x10000. Two adjacent but separately
    // mapped regions, then a hole from 0x20_0000.
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const ITABLE: u64 = 0x4000;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const REGION_B: u64 = 0x10_0000;
    const MEM_END: u64 = 0x20_0000;
    const CAP: u64 = 1000;

    fn mem() -> Mem {
        Mem::from_ranges(&[
            (GuestAddress(0), REGION_B as usize),
            (GuestAddress(REGION_B), (MEM_END - REGION_B) as usize),
        ])
        .unwrap()
    }

    fn limits() -> Limits {
        Limits::new(CAP)
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Writes `table` as the descriptor table of a `qsize` queue, makes
    /// `head` available and pops it.
    fn chain_raw<'a>(
        m: &'a Mem,
        qsize: u16,
        table: &[RawDescriptor],
        head: u16,
    ) -> DescriptorChain<&'a Mem> {
        for (i, d) in table.iter().enumerate() {
            m.write_obj(*d, GuestAddress(16 * i as u64)).unwrap();
        }
        m.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        m.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(head.to_le(), GuestAddress(AVAIL + 4)).unwrap();
        let mut q = Queue::new(qsize).unwrap();
        q.set_size(qsize);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let mut it = q.iter(m).unwrap();
        it.next().unwrap()
    }

    fn linked(descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, w))| {
                let mut f = if w { WRITE } else { 0 };
                if i + 1 < descs.len() {
                    f |= NEXT;
                }
                raw(a, l, f, i as u16 + 1)
            })
            .collect()
    }

    fn chain<'a>(m: &'a Mem, descs: &[(u64, u32, bool)]) -> DescriptorChain<&'a Mem> {
        chain_raw(m, 32, &linked(descs), 0)
    }

    fn header(m: &Mem, addr: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // ioprio: ignored
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn parse(m: &Mem, descs: &[(u64, u32, bool)], l: &Limits) -> Result<Request, RequestFailure> {
        parse_request(&chain(m, descs), l)
    }

    fn host(m: &Mem, addr: u64) -> *mut u8 {
        m.get_host_address(GuestAddress(addr)).unwrap()
    }

    /// Asserts the failure, its status and that a status address exists
    /// exactly when a status is reported.
    fn expect_err(r: Result<Request, RequestFailure>, err: RequestError, status: Option<u8>) {
        let f = r.expect_err("request should fail");
        assert_eq!(f.error, err);
        assert_eq!(f.error.status(), status);
        assert_eq!(f.status_addr.is_some(), status.is_some());
        assert_eq!(f.used_len(), u32::from(status.is_some()));
        // Display must work for every error.
        assert!(!f.to_string().is_empty());
    }

    fn expect_status_err(r: Result<Request, RequestFailure>, err: RequestError, status: u8) {
        let f = r.clone().expect_err("request should fail");
        assert_eq!(f.status(), Some((GuestAddress(STATUS), status)));
        expect_err(r, err, Some(status));
    }

    const T_IN: u32 = VIRTIO_BLK_T_IN;
    const T_OUT: u32 = VIRTIO_BLK_T_OUT;
    const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
    const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
    const T_DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
    const T_WZ: u32 = VIRTIO_BLK_T_WRITE_ZEROES;

    // ---- valid requests ----

    #[test]
    fn in_single_data_descriptor() {
        let m = mem();
        header(&m, HDR, T_IN, 8);
        let r = parse(
            &m,
            &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.req_type, RequestType::In);
        assert_eq!(r.sector, 8);
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.num_sectors(), 8);
        assert_eq!(r.status_addr, GuestAddress(STATUS));
        assert_eq!(r.writable_len, 4097);
        assert_eq!(r.used_len(STATUS_OK), 4097);
        assert_eq!(r.used_len(STATUS_IOERR), 1);
        assert_eq!(r.data.len(), 1);
        assert_eq!(r.data[0].ptr(), host(&m, DATA));
        assert_eq!(r.data[0].len(), 4096);
        assert!(!r.data[0].is_empty());
        assert_eq!(r.data[0].guest_addr(), GuestAddress(DATA));
        assert_eq!(r.data[0].iovec().iov_len, 4096);
        assert!(r.ranges.is_empty());
    }

    #[test]
    fn in_several_data_descriptors() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        let r = parse(
            &m,
            &[
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA + 0x1000, 1024, W),
                (DATA + 0x3000, 512, W),
                (STATUS, 1, W),
            ],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.data_len, 2048);
        assert_eq!(r.writable_len, 2049);
        let segs: Vec<_> = r.data.iter().map(|s| (s.guest_addr().0, s.len())).collect();
        assert_eq!(
            segs,
            vec![(DATA, 512), (DATA + 0x1000, 1024), (DATA + 0x3000, 512)]
        );
        assert_eq!(r.data[2].ptr(), host(&m, DATA + 0x3000));
    }

    #[test]
    fn out_single_and_several() {
        let m = mem();
        header(&m, HDR, T_OUT, 3);
        let r = parse(
            &m,
            &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.req_type, RequestType::Out);
        assert_eq!((r.sector, r.data_len, r.writable_len), (3, 512, 1));
        assert_eq!(r.used_len(STATUS_OK), 1);
        let r = parse(
            &m,
            &[
                (HDR, 16, R),
                (DATA, 512, R),
                (DATA + 0x1000, 4096, R),
                (STATUS, 1, W),
            ],
            &limits(),
        )
        .unwrap();
        assert_eq!((r.data.len(), r.data_len, r.writable_len), (2, 4608, 1));
    }

    #[test]
    fn flush_with_and_without_data() {
        let m = mem();
        header(&m, HDR, T_FLUSH, 0);
        let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()).unwrap();
        assert_eq!(r.req_type, RequestType::Flush);
        assert_eq!((r.data_len, r.writable_len), (0, 1));
        // Data is ignored, even if it is nonsense.
        let r = parse(
            &m,
            &[(HDR, 16, R), (MEM_END + 0x1000, 3, R), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.req_type, RequestType::Flush);
        assert!(r.data.is_empty());
    }

    #[test]
    fn get_id_buffer_sizes() {
        let m = mem();
        header(&m, HDR, T_GET_ID, 0);
        for (buf, want) in [(20u32, 20u64), (100, 20), (1, 1), (7, 7)] {
            let r = parse(
                &m,
                &[(HDR, 16, R), (DATA, buf, W), (STATUS, 1, W)],
                &limits(),
            )
            .unwrap();
            assert_eq!(r.req_type, RequestType::GetId);
            assert_eq!(r.data_len, want, "buf {buf}");
            assert_eq!(r.writable_len as u64, want + 1);
            assert_eq!(r.data.iter().map(|s| s.len() as u64).sum::<u64>(), want);
        }
        // Split over two descriptors, truncated to 20 bytes in total.
        let r = parse(
            &m,
            &[
                (HDR, 16, R),
                (DATA, 10, W),
                (DATA + 0x100, 15, W),
                (STATUS, 1, W),
            ],
            &limits(),
        )
        .unwrap();
        let segs: Vec<_> = r.data.iter().map(|s| (s.guest_addr().0, s.len())).collect();
        assert_eq!(segs, vec![(DATA, 10), (DATA + 0x100, 10)]);
        assert_eq!(r.writable_len, 21);
        // No buffer at all: QEMU answers OK, writing only the status.
        let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()).unwrap();
        assert_eq!((r.data_len, r.writable_len), (0, 1));
        // Buffer and status sharing one descriptor.
        let r = parse(&m, &[(HDR, 16, R), (DATA, 21, W)], &limits()).unwrap();
        assert_eq!((r.data_len, r.status_addr), (20, GuestAddress(DATA + 20)));
    }

    fn discard_seg(m: &Mem, addr: u64, sector: u64, n: u32, flags: u32) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&b, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_valid() {
        let m = mem();
        header(&m, HDR, T_DISCARD, 0);
        discard_seg(&m, DATA, 10, 20, 0);
        let r = parse(
            &m,
            &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.req_type, RequestType::Discard);
        assert_eq!(
            r.ranges,
            vec![DiscardRange {
                sector: 10,
                num_sectors: 20,
                unmap: false
            }]
        );
        assert_eq!((r.data_len, r.writable_len), (0, 1));

        // Three segments, the payload split mid-segment over descriptors.
        discard_seg(&m, DATA + 16, 100, 1, 0);
        discard_seg(&m, DATA + 32, 990, 10, 0);
        let r = parse(
            &m,
            &[
                (HDR, 16, R),
                (DATA, 24, R),
                (DATA + 24, 24, R),
                (STATUS, 1, W),
            ],
            &limits(),
        )
        .unwrap();
        let got: Vec<_> = r.ranges.iter().map(|x| (x.sector, x.num_sectors)).collect();
        assert_eq!(got, vec![(10, 20), (100, 1), (990, 10)]);

        header(&m, HDR, T_WZ, 0);
        discard_seg(&m, DATA, 5, 6, 1);
        discard_seg(&m, DATA + 16, 7, 0, 0);
        let r = parse(
            &m,
            &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.req_type, RequestType::WriteZeroes);
        assert_eq!(
            r.ranges,
            vec![
                DiscardRange {
                    sector: 5,
                    num_sectors: 6,
                    unmap: true
                },
                DiscardRange {
                    sector: 7,
                    num_sectors: 0,
                    unmap: false
                }
            ]
        );
    }

    // ---- framing ----

    #[test]
    fn header_split_across_two_descriptors() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        header(&m, HDR + 0x100, 0, 42); // only its sector half is used
        let r = parse(
            &m,
            &[
                (HDR, 8, R),
                (HDR + 0x108, 8, R),
                (DATA, 512, W),
                (STATUS, 1, W),
            ],
            &limits(),
        )
        .unwrap();
        assert_eq!((r.req_type, r.sector), (RequestType::In, 42));
        // Sixteen 1-byte header descriptors.
        header(&m, HDR, T_OUT, 7);
        let mut d: Vec<_> = (0..16).map(|i| (HDR + i, 1, R)).collect();
        d.push((DATA, 512, R));
        d.push((STATUS, 1, W));
        let r = parse(&m, &d, &limits()).unwrap();
        assert_eq!(
            (r.req_type, r.sector, r.data_len),
            (RequestType::Out, 7, 512)
        );
    }

    #[test]
    fn header_and_data_share_descriptors() {
        let m = mem();
        header(&m, HDR, T_OUT, 1);
        let r = parse(&m, &[(HDR, 16 + 1024, R), (STATUS, 1, W)], &limits()).unwrap();
        assert_eq!(r.data.len(), 1);
        assert_eq!(r.data[0].guest_addr(), GuestAddress(HDR + 16));
        assert_eq!(r.data[0].ptr(), host(&m, HDR + 16));
        assert_eq!(r.data_len, 1024);
        // IN: data and status in one writable descriptor.
        header(&m, HDR, T_IN, 1);
        let r = parse(&m, &[(HDR, 16, R), (DATA, 4097, W)], &limits()).unwrap();
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.status_addr, GuestAddress(DATA + 4096));
        assert_eq!(r.writable_len, 4097);
    }

    #[test]
    fn header_too_short() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        expect_status_err(
            parse(&m, &[(HDR, 8, R), (STATUS, 1, W)], &limits()),
            RequestError::HeaderTooShort { len: 8 },
            STATUS_IOERR,
        );
        expect_status_err(
            parse(
                &m,
                &[(HDR, 8, R), (HDR + 8, 7, R), (DATA, 512, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::HeaderTooShort { len: 15 },
            STATUS_IOERR,
        );
    }

    #[test]
    fn header_in_write_only_descriptor() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::HeaderWriteOnly { addr: HDR, len: 16 },
            STATUS_IOERR,
        );
    }

    #[test]
    fn missing_or_read_only_status() {
        let m = mem();
        header(&m, HDR, T_OUT, 0);
        expect_err(
            parse(&m, &[(HDR, 16, R)], &limits()),
            RequestError::StatusNotWritable {
                position: 0,
                addr: HDR,
                len: 16,
            },
            None,
        );
        expect_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)],
                &limits(),
            ),
            RequestError::StatusNotWritable {
                position: 2,
                addr: STATUS,
                len: 1,
            },
            None,
        );
        expect_err(
            parse(&m, &[(HDR, 16, R), (STATUS, 0, W)], &limits()),
            RequestError::StatusEmpty {
                position: 1,
                addr: STATUS,
            },
            None,
        );
        expect_err(
            parse(&m, &[(HDR, 16, R), (MEM_END, 1, W)], &limits()),
            RequestError::StatusOutOfMemory {
                position: 1,
                addr: MEM_END,
                len: 1,
            },
            None,
        );
        expect_err(
            parse(&m, &[(HDR, 16, R), (u64::MAX, 2, W)], &limits()),
            RequestError::StatusOutOfMemory {
                position: 1,
                addr: u64::MAX,
                len: 2,
            },
            None,
        );
    }

    #[test]
    fn readable_after_writable() {
        let m = mem();
        header(&m, HDR, T_OUT, 0);
        expect_status_err(
            parse(
                &m,
                &[
                    (HDR, 16, R),
                    (DATA, 512, W),
                    (DATA + 512, 512, R),
                    (STATUS, 1, W),
                ],
                &limits(),
            ),
            RequestError::ReadableAfterWritable {
                position: 2,
                addr: DATA + 512,
            },
            STATUS_IOERR,
        );
    }

    #[test]
    fn wrong_data_direction() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::WrongDirection {
                req_type: RequestType::In,
                position: 1,
                len: 512,
            },
            STATUS_IOERR,
        );
        header(&m, HDR, T_OUT, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::WrongDirection {
                req_type: RequestType::Out,
                position: 1,
                len: 512,
            },
            STATUS_IOERR,
        );
        header(&m, HDR, T_DISCARD, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 16, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::WrongDirection {
                req_type: RequestType::Discard,
                position: 1,
                len: 16,
            },
            STATUS_IOERR,
        );
    }

    // ---- data length and range ----

    #[test]
    fn zero_length_data_follows_qemu() {
        let m = mem();
        for t in [T_IN, T_OUT] {
            header(&m, HDR, t, CAP);
            let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()).unwrap();
            assert_eq!((r.data_len, r.writable_len), (0, 1));
            assert!(r.data.is_empty());
            header(&m, HDR, t, CAP + 1);
            expect_status_err(
                parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()),
                RequestError::OutOfRange {
                    sector: CAP + 1,
                    sectors: 0,
                    capacity: CAP,
                },
                STATUS_IOERR,
            );
        }
        // Zero-length descriptors between data ones are skipped, not counted.
        header(&m, HDR, T_IN, 0);
        let mut l = limits();
        l.seg_max = 1;
        let r = parse(
            &m,
            &[(HDR, 16, R), (DATA, 0, W), (DATA, 512, W), (STATUS, 1, W)],
            &l,
        )
        .unwrap();
        assert_eq!((r.data.len(), r.data_len), (1, 512));
    }

    #[test]
    fn length_not_multiple_of_512() {
        let m = mem();
        for (t, w) in [(T_IN, W), (T_OUT, R)] {
            header(&m, HDR, t, 0);
            expect_status_err(
                parse(
                    &m,
                    &[(HDR, 16, R), (DATA, 513, w), (STATUS, 1, W)],
                    &limits(),
                ),
                RequestError::UnalignedLength { len: 513 },
                STATUS_IOERR,
            );
            expect_status_err(
                parse(
                    &m,
                    &[
                        (HDR, 16, R),
                        (DATA, 256, w),
                        (DATA + 0x1000, 512, w),
                        (STATUS, 1, W),
                    ],
                    &limits(),
                ),
                RequestError::UnalignedLength { len: 768 },
                STATUS_IOERR,
            );
        }
    }

    #[test]
    fn sector_beyond_capacity() {
        let m = mem();
        header(&m, HDR, T_IN, CAP - 2);
        assert!(parse(
            &m,
            &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)],
            &limits()
        )
        .is_ok());
        header(&m, HDR, T_IN, CAP - 1);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::OutOfRange {
                sector: CAP - 1,
                sectors: 2,
                capacity: CAP,
            },
            STATUS_IOERR,
        );
    }

    #[test]
    fn sector_plus_length_overflows_u64() {
        let m = mem();
        let mut l = limits();
        l.capacity_sectors = u64::MAX;
        for sector in [u64::MAX, u64::MAX - 1] {
            header(&m, HDR, T_OUT, sector);
            expect_status_err(
                parse(&m, &[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)], &l),
                RequestError::OutOfRange {
                    sector,
                    sectors: 2,
                    capacity: u64::MAX,
                },
                STATUS_IOERR,
            );
        }
    }

    #[test]
    fn descriptor_outside_guest_memory() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        for (addr, len) in [
            (MEM_END, 512),
            (MEM_END - 256, 512),
            (u64::MAX - 255, 512),
            (u64::MAX, 512),
        ] {
            expect_status_err(
                parse(
                    &m,
                    &[(HDR, 16, R), (addr, len, W), (STATUS, 1, W)],
                    &limits(),
                ),
                RequestError::DescriptorOutOfMemory {
                    position: 1,
                    addr,
                    len,
                },
                STATUS_IOERR,
            );
        }
        // Header outside memory.
        expect_status_err(
            parse(&m, &[(MEM_END + 64, 16, R), (STATUS, 1, W)], &limits()),
            RequestError::DescriptorOutOfMemory {
                position: 0,
                addr: MEM_END + 64,
                len: 16,
            },
            STATUS_IOERR,
        );
        // OUT data outside memory.
        header(&m, HDR, T_OUT, 0);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (MEM_END, 512, R), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::DescriptorOutOfMemory {
                position: 1,
                addr: MEM_END,
                len: 512,
            },
            STATUS_IOERR,
        );
    }

    #[test]
    fn data_spanning_two_regions_is_split() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        let r = parse(
            &m,
            &[(HDR, 16, R), (REGION_B - 256, 512, W), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.data.len(), 2);
        assert_eq!(r.data[0].ptr(), host(&m, REGION_B - 256));
        assert_eq!(r.data[0].len(), 256);
        assert_eq!(r.data[1].ptr(), host(&m, REGION_B));
        assert_eq!(r.data[1].guest_addr(), GuestAddress(REGION_B));
        assert_eq!(r.data[1].len(), 256);
        assert_eq!(r.data_len, 512);
    }

    // ---- malformed chains ----

    #[test]
    fn descriptor_loop() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        let table = [raw(HDR, 16, NEXT, 1), raw(DATA, 512, WRITE | NEXT, 0)];
        expect_err(
            parse_request(&chain_raw(&m, 16, &table, 0), &limits()),
            RequestError::MalformedChain {
                count: 16,
                last_addr: DATA,
                next: 0,
            },
            None,
        );
        // Self loop on the status descriptor.
        let table = [raw(HDR, 16, NEXT, 1), raw(STATUS, 1, WRITE | NEXT, 1)];
        let f = parse_request(&chain_raw(&m, 16, &table, 0), &limits()).unwrap_err();
        assert!(matches!(f.error, RequestError::MalformedChain { .. }));
    }

    #[test]
    fn next_index_out_of_table() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        let table = [raw(HDR, 16, NEXT, 200)];
        expect_err(
            parse_request(&chain_raw(&m, 16, &table, 0), &limits()),
            RequestError::MalformedChain {
                count: 1,
                last_addr: HDR,
                next: 200,
            },
            None,
        );
    }

    #[test]
    fn indirect_tables() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        for (i, d) in linked(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
            .iter()
            .enumerate()
        {
            m.write_obj(*d, GuestAddress(ITABLE + 16 * i as u64))
                .unwrap();
        }
        // A good indirect table.
        let r = parse_request(
            &chain_raw(&m, 16, &[raw(ITABLE, 48, INDIRECT, 0)], 0),
            &limits(),
        )
        .unwrap();
        assert_eq!((r.req_type, r.data_len), (RequestType::In, 512));
        // Bad table length as the head: nothing can be read at all.
        expect_err(
            parse_request(
                &chain_raw(&m, 16, &[raw(ITABLE, 47, INDIRECT, 0)], 0),
                &limits(),
            ),
            RequestError::EmptyChain,
            None,
        );
        // Bad table length after a direct descriptor.
        let table = [raw(HDR, 16, NEXT, 1), raw(ITABLE, 40, INDIRECT, 0)];
        expect_err(
            parse_request(&chain_raw(&m, 16, &table, 0), &limits()),
            RequestError::MalformedChain {
                count: 1,
                last_addr: HDR,
                next: 1,
            },
            None,
        );
        // Table too short for the chain it holds (last entry has NEXT).
        let f = parse_request(
            &chain_raw(&m, 16, &[raw(ITABLE, 32, INDIRECT, 0)], 0),
            &limits(),
        )
        .unwrap_err();
        assert!(matches!(
            f.error,
            RequestError::MalformedChain { count: 2, .. }
        ));
        // Table outside guest memory.
        expect_err(
            parse_request(
                &chain_raw(&m, 16, &[raw(MEM_END, 48, INDIRECT, 0)], 0),
                &limits(),
            ),
            RequestError::EmptyChain,
            None,
        );
    }

    #[test]
    fn too_many_descriptors() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        let n = MAX_CHAIN_DESCRIPTORS + 6;
        let mut d = vec![(HDR, 16, R)];
        d.extend((0..n - 2).map(|_| (DATA, 512, W)));
        d.push((STATUS, 1, W));
        for (i, x) in linked(&d).iter().enumerate() {
            m.write_obj(*x, GuestAddress(ITABLE + 16 * i as u64))
                .unwrap();
        }
        let mut l = limits();
        l.seg_max = 0;
        l.capacity_sectors = u64::MAX;
        expect_status_err(
            parse_request(
                &chain_raw(&m, 16, &[raw(ITABLE, 16 * n as u32, INDIRECT, 0)], 0),
                &l,
            ),
            RequestError::TooManyDescriptors {
                count: n,
                max: MAX_CHAIN_DESCRIPTORS,
            },
            STATUS_IOERR,
        );
    }

    #[test]
    fn more_segments_than_seg_max() {
        let m = mem();
        let mut l = limits();
        l.seg_max = 4;
        for (t, w) in [(T_IN, W), (T_OUT, R)] {
            header(&m, HDR, t, 0);
            let mut d = vec![(HDR, 16, R)];
            d.extend((0..4).map(|i| (DATA + 0x1000 * i, 512, w)));
            d.push((STATUS, 1, W));
            assert_eq!(parse(&m, &d, &l).unwrap().data.len(), 4);
            d.insert(1, (DATA + 0x8000, 512, w));
            expect_status_err(
                parse(&m, &d, &l),
                RequestError::TooManySegments { count: 5, max: 4 },
                STATUS_IOERR,
            );
        }
    }

    #[test]
    fn segment_larger_than_size_max() {
        let m = mem();
        let mut l = limits();
        l.size_max = 4096;
        header(&m, HDR, T_IN, 0);
        assert!(parse(&m, &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)], &l).is_ok());
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (DATA, 8192, W), (STATUS, 1, W)], &l),
            RequestError::SegmentTooLarge {
                position: 1,
                len: 8192,
                max: 4096,
            },
            STATUS_IOERR,
        );
    }

    // ---- discard / write zeroes ----

    #[test]
    fn discard_flags() {
        let m = mem();
        header(&m, HDR, T_DISCARD, 0);
        for flags in [1u32, 2, 0x8000_0000] {
            discard_seg(&m, DATA, 0, 1, 0);
            discard_seg(&m, DATA + 16, 0, 1, flags);
            expect_status_err(
                parse(
                    &m,
                    &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)],
                    &limits(),
                ),
                RequestError::UnsupportedFlags {
                    req_type: RequestType::Discard,
                    index: 1,
                    flags,
                },
                STATUS_UNSUPP,
            );
        }
        header(&m, HDR, T_WZ, 0);
        discard_seg(&m, DATA, 0, 1, 3);
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::UnsupportedFlags {
                req_type: RequestType::WriteZeroes,
                index: 0,
                flags: 3,
            },
            STATUS_UNSUPP,
        );
        // Bad flags outrank a bad range (spec: MUST answer UNSUPP).
        discard_seg(&m, DATA, u64::MAX, 1, 4);
        let f = parse(
            &m,
            &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap_err();
        assert_eq!(f.error.status(), Some(STATUS_UNSUPP));
    }

    #[test]
    fn discard_ranges() {
        let m = mem();
        for (t, rt) in [
            (T_DISCARD, RequestType::Discard),
            (T_WZ, RequestType::WriteZeroes),
        ] {
            header(&m, HDR, t, 0);
            let descs = [(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
            discard_seg(&m, DATA, CAP - 10, 10, 0);
            assert!(parse(&m, &descs, &limits()).is_ok());
            for sector in [CAP - 9, CAP + 1, u64::MAX] {
                discard_seg(&m, DATA, sector, 10, 0);
                expect_status_err(
                    parse(&m, &descs, &limits()),
                    RequestError::DiscardOutOfRange {
                        req_type: rt,
                        index: 0,
                        sector,
                        num_sectors: 10,
                        capacity: CAP,
                    },
                    STATUS_IOERR,
                );
            }
            let mut l = limits();
            l.capacity_sectors = u64::MAX;
            l.max_discard_sectors = 100;
            l.max_write_zeroes_sectors = 100;
            discard_seg(&m, DATA, 0, 101, 0);
            expect_status_err(
                parse(&m, &descs, &l),
                RequestError::DiscardTooLarge {
                    req_type: rt,
                    index: 0,
                    num_sectors: 101,
                    max: 100,
                },
                STATUS_IOERR,
            );
        }
    }

    #[test]
    fn discard_payload_shape() {
        let m = mem();
        header(&m, HDR, T_DISCARD, 0);
        let rt = RequestType::Discard;
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 24, R), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::BadDiscardPayload {
                req_type: rt,
                len: 24,
            },
            STATUS_IOERR,
        );
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (STATUS, 1, W)], &limits()),
            RequestError::BadDiscardPayload {
                req_type: rt,
                len: 0,
            },
            STATUS_IOERR,
        );
        let mut l = limits();
        l.max_discard_seg = 2;
        for i in 0..3 {
            discard_seg(&m, DATA + 16 * i, 0, 1, 0);
        }
        expect_status_err(
            parse(&m, &[(HDR, 16, R), (DATA, 48, R), (STATUS, 1, W)], &l),
            RequestError::TooManyDiscardSegments {
                req_type: rt,
                count: 3,
                max: 2,
            },
            STATUS_IOERR,
        );
        // Huge payload claims are refused before anything is read.
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (DATA, 0x8000_0000, R), (STATUS, 1, W)],
                &l,
            ),
            RequestError::TooManyDiscardSegments {
                req_type: rt,
                count: 0x800_0000,
                max: 2,
            },
            STATUS_IOERR,
        );
        // Payload outside memory.
        expect_status_err(
            parse(
                &m,
                &[(HDR, 16, R), (MEM_END, 16, R), (STATUS, 1, W)],
                &limits(),
            ),
            RequestError::DescriptorOutOfMemory {
                position: 1,
                addr: MEM_END,
                len: 16,
            },
            STATUS_IOERR,
        );
    }

    #[test]
    fn discard_not_offered_is_unsupported() {
        let m = mem();
        let mut l = limits();
        l.max_discard_seg = 0;
        l.max_write_zeroes_seg = 0;
        discard_seg(&m, DATA, 0, 1, 0);
        for t in [T_DISCARD, T_WZ] {
            header(&m, HDR, t, 0);
            expect_status_err(
                parse(&m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)], &l),
                RequestError::UnsupportedType(t),
                STATUS_UNSUPP,
            );
        }
    }

    // ---- type and device state ----

    #[test]
    fn unknown_request_types() {
        let m = mem();
        for t in [2u32, 3, 14, 16, 99, VIRTIO_BLK_T_IN | 0x8000_0000, u32::MAX] {
            header(&m, HDR, t, 0);
            expect_status_err(
                parse(
                    &m,
                    &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
                    &limits(),
                ),
                RequestError::UnsupportedType(t),
                STATUS_UNSUPP,
            );
        }
    }

    #[test]
    fn writes_on_read_only_device() {
        let m = mem();
        let mut l = limits();
        l.read_only = true;
        discard_seg(&m, DATA, 0, 1, 0);
        for (t, rt) in [
            (T_OUT, RequestType::Out),
            (T_DISCARD, RequestType::Discard),
            (T_WZ, RequestType::WriteZeroes),
        ] {
            header(&m, HDR, t, 0);
            expect_status_err(
                parse(&m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], &l),
                RequestError::ReadOnly { req_type: rt },
                STATUS_IOERR,
            );
        }
        for (t, w) in [(T_IN, W), (T_FLUSH, W), (T_GET_ID, W)] {
            header(&m, HDR, t, 0);
            assert!(parse(&m, &[(HDR, 16, R), (DATA, 512, w), (STATUS, 1, W)], &l).is_ok());
        }
    }

    #[test]
    fn write_status_helper() {
        let m = mem();
        header(&m, HDR, T_IN, 0);
        let f = parse(
            &m,
            &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap_err();
        let (addr, status) = f.status().unwrap();
        assert!(write_status(&m, addr, status));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            STATUS_IOERR
        );
        assert!(!write_status(&m, GuestAddress(MEM_END), STATUS_OK));
    }

    #[test]
    fn request_type_mapping() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Discard);
        assert_eq!(RequestType::from(13), RequestType::WriteZeroes);
        assert_eq!(RequestType::from(5), RequestType::Unsupported(5));
    }

    // ---- random chains ----

    fn arb_addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..0x100).prop_map(|o| HDR + o),
            (0u64..0x2000).prop_map(|o| DATA + o),
            Just(STATUS),
            Just(ITABLE),
            (0u64..0x200).prop_map(|o| REGION_B - 0x100 + o),
            (0u64..0x200).prop_map(|o| MEM_END - 0x100 + o),
            (0u64..0x20).prop_map(|o| u64::MAX - o),
            any::<u64>(),
        ]
    }

    fn arb_len() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(8),
            Just(16),
            Just(17),
            Just(32),
            Just(48),
            Just(512),
            Just(513),
            Just(4096),
            Just(4097),
            0u32..0x3000,
            any::<u32>(),
        ]
    }

    fn arb_desc() -> impl Strategy<Value = RawDescriptor> {
        (
            arb_addr(),
            arb_len(),
            prop_oneof![
                Just(NEXT),
                Just(NEXT | WRITE),
                Just(WRITE),
                Just(0),
                Just(INDIRECT),
                any::<u16>()
            ],
            prop_oneof![0u16..8, any::<u16>()],
        )
            .prop_map(|(a, l, f, n)| raw(a, l, f, n))
    }

    /// A segment must lie within one region and its host pointer must be
    /// that region's mapping of its guest address.
    fn check_segment(m: &Mem, s: &Segment) {
        assert!(!s.is_empty());
        let region = m
            .find_region(s.guest_addr())
            .expect("segment start in memory");
        let last = s.guest_addr().0 + s.len() as u64 - 1;
        assert!(last <= region.last_addr().0, "segment crosses region end");
        assert_eq!(s.ptr(), m.get_host_address(s.guest_addr()).unwrap());
    }

    fn check_outcome(m: &Mem, res: Result<Request, RequestFailure>, cap: u64) -> bool {
        match res {
            Ok(r) => {
                let sum: u64 = r.data.iter().map(|s| s.len() as u64).sum();
                assert_eq!(sum, r.data_len);
                for s in &r.data {
                    check_segment(m, s);
                }
                assert!(GuestMemoryBackend::check_range(m, r.status_addr, 1));
                assert!(r.writable_len >= 1);
                if matches!(r.req_type, RequestType::In | RequestType::Out) {
                    assert_eq!(r.data_len % 512, 0);
                    assert!(r.sector + r.num_sectors() <= cap);
                }
                for x in &r.ranges {
                    assert!(x.sector + x.num_sectors as u64 <= cap);
                }
                assert!(!matches!(r.req_type, RequestType::Unsupported(_)));
                true
            }
            Err(f) => {
                assert_eq!(f.status_addr.is_some(), f.error.status().is_some());
                if let Some(a) = f.status_addr {
                    assert!(GuestMemoryBackend::check_range(m, a, 1));
                }
                assert!(!f.to_string().is_empty());
                false
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Well-framed chains (readable header first, writable status
        /// last) with random data descriptors, so the Ok paths and the
        /// address resolution get exercised too.
        #[test]
        fn random_framed_chains(
            data in proptest::collection::vec((arb_addr(), 0u32..0x1400, any::<bool>()), 0..5),
            status in prop_oneof![Just(STATUS), arb_addr()],
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13)],
            sector in prop_oneof![0u64..64, any::<u64>()],
            seg_max in 0u32..6,
        ) {
            let m = mem();
            header(&m, HDR, t, sector);
            let mut d = vec![(HDR, 16, R)];
            d.extend(data.iter().map(|&(a, l, w)| (a, l & !0x1ff, w)));
            d.push((status, 1, W));
            let mut l = Limits::new(4096);
            l.seg_max = seg_max;
            check_outcome(&m, parse(&m, &d, &l), 4096);
        }

        #[test]
        fn random_chains_never_panic(
            table in proptest::collection::vec(arb_desc(), 1..12),
            itable in proptest::collection::vec(arb_desc(), 0..6),
            head in 0u16..12,
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..64, any::<u64>()],
            payload in proptest::collection::vec(any::<u8>(), 64),
            seg_max in 0u32..6,
            size_max in prop_oneof![Just(0u32), 1u32..8192],
            read_only in any::<bool>(),
        ) {
            let m = mem();
            header(&m, HDR, t, sector);
            m.write_slice(&payload, GuestAddress(DATA)).unwrap();
            for (i, d) in itable.iter().enumerate() {
                m.write_obj(*d, GuestAddress(ITABLE + 16 * i as u64)).unwrap();
            }
            let head = head % table.len() as u16;
            let c = chain_raw(&m, 16, &table, head);
            let mut l = Limits::new(4096);
            l.seg_max = seg_max;
            l.size_max = size_max;
            l.read_only = read_only;
            l.max_discard_seg = 2;
            l.max_write_zeroes_seg = 2;
            check_outcome(&m, parse_request(&c, &l), 4096);
        }
    }
}
