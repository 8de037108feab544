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
/// in the config space, see [`crate::blk_config::BlkConfig::from_limits`]).
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
