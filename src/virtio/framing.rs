//! Framing of a virtio-blk request (virtio 1.2 §5.2.6), as QEMU's
//! virtio-blk handler does it: the chain is a device-readable part followed
//! by a device-writable part; the 16-byte header is the first 16 bytes of
//! the readable part (it may be split over descriptors or share one with
//! data) and the status is the last byte of the writable part. Everything
//! in between is the data, still as guest ranges ([`Piece`]s); the
//! per-type decoding in `decode.rs` gives it meaning.

use smallvec::SmallVec;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::chain::Chain;
use super::host_ranges::HostRanges;
use super::request::{RequestError, RequestFailure, StatusPtr, HEADER_SIZE, MAX_CHAIN_DESCRIPTORS};

/// A byte range of one descriptor, used for the header/data/status split.
/// 32 bytes: a request's pieces are held inline and walked per request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub addr: GuestAddress,
    pub len: u64,
    /// The whole descriptor, for error messages.
    desc_addr: u64,
    desc_len: u32,
    /// Position in the chain (< MAX_CHAIN_DESCRIPTORS).
    position: u32,
}

impl Piece {
    pub fn position(&self) -> usize {
        self.position as usize
    }

    pub fn out_of_memory(&self) -> RequestError {
        RequestError::DescriptorOutOfMemory {
            position: self.position(),
            addr: self.desc_addr,
            len: self.desc_len,
        }
    }
}

/// Pieces of one side of a chain. A request has a few descriptors (header,
/// data, status): held inline, with no allocation per request.
pub(super) type Pieces = SmallVec<[Piece; 4]>;

/// A framed request: its header, its data as guest ranges on either side,
/// and where its status byte goes.
pub(super) struct Frame {
    pub header: [u8; HEADER_SIZE],
    /// Device-readable data after the header (empty pieces dropped).
    pub readable: Pieces,
    /// Device-writable data before the status byte (empty pieces dropped).
    pub writable: Pieces,
    pub status_addr: GuestAddress,
    pub status_ptr: StatusPtr,
}

impl Frame {
    pub fn new() -> Frame {
        Frame {
            header: [0; HEADER_SIZE],
            readable: Pieces::new(),
            writable: Pieces::new(),
            status_addr: GuestAddress(0),
            status_ptr: StatusPtr::UNRESOLVED,
        }
    }
}

/// Walks `chain` once (on a clone: the caller keeps it for completing the
/// request) and splits it into header, data and status, filling `f` (a
/// fresh [`Frame::new`]) in place: the pieces are pushed where they stay,
/// never collected and moved.
#[inline]
pub(super) fn frame<C: Chain>(
    chain: &C,
    f: &mut Frame,
    host: &mut HostRanges<'_, C::Mem>,
) -> Result<(), RequestFailure> {
    let mem = chain.memory();
    let no_status = |error| RequestFailure {
        error,
        status_addr: None,
    };
    // Walk the whole chain (virtio-queue bounds the walk by the queue size /
    // indirect table length), keeping at most MAX_CHAIN_DESCRIPTORS. The
    // readable prefix goes to `readable`, the writable rest to `writable`;
    // the first readable descriptor after a writable one is remembered.
    let mut count = 0usize;
    let mut last = None;
    let mut readable_after = None;
    // A zero-length descriptor was kept (its piece is dropped below).
    let mut empty = false;
    for d in chain.clone() {
        if count < MAX_CHAIN_DESCRIPTORS {
            empty |= d.len() == 0;
            let piece = piece(count, &d);
            if d.is_write_only() {
                f.writable.push(piece);
            } else if f.writable.is_empty() {
                f.readable.push(piece);
            } else if readable_after.is_none() {
                readable_after = Some((count, d.addr().raw_value()));
            }
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

    let (status_addr, status_ptr) = find_status(mem, host, &last, count - 1).map_err(no_status)?;
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
    if let Some((position, addr)) = readable_after {
        return Err(fail(RequestError::ReadableAfterWritable { position, addr }));
    }
    if f.readable.is_empty() {
        // The first descriptor is writable (a chain has at least one).
        let first = &f.writable[0];
        return Err(fail(RequestError::HeaderWriteOnly {
            addr: first.desc_addr,
            len: first.desc_len,
        }));
    }
    // The status byte is the last byte of the writable part.
    if let Some(w) = f.writable.last_mut() {
        w.len -= 1; // len >= 1 was checked by find_status
        if w.len == 0 {
            f.writable.pop(); // the status had its own descriptor
        }
    }

    let readable_len: u64 = f.readable.iter().map(|p| p.len).sum();
    if readable_len < HEADER_SIZE as u64 {
        return Err(fail(RequestError::HeaderTooShort { len: readable_len }));
    }
    copy_from_guest(mem, host, &f.readable, &mut f.header).map_err(fail)?;
    // What follows the header is the readable data, split in place (the
    // header mostly has a descriptor of its own).
    if f.readable[0].len == HEADER_SIZE as u64 {
        f.readable.remove(0);
    } else {
        drop_front(&mut f.readable, HEADER_SIZE as u64);
    }
    if empty {
        f.readable.retain(|p| p.len > 0);
        f.writable.retain(|p| p.len > 0);
    }
    f.status_addr = status_addr;
    f.status_ptr = status_ptr;
    Ok(())
}

#[allow(clippy::cast_possible_truncation)] // position < MAX_CHAIN_DESCRIPTORS (1024)
fn piece(position: usize, d: &Descriptor) -> Piece {
    Piece {
        addr: d.addr(),
        len: d.len() as u64,
        desc_addr: d.addr().raw_value(),
        desc_len: d.len(),
        position: position as u32,
    }
}

/// Checks the status byte of the last descriptor and returns its guest
/// and host addresses.
fn find_status<G: GuestMemory + ?Sized>(
    mem: &G,
    host: &mut HostRanges<'_, G>,
    last: &Descriptor,
    position: usize,
) -> Result<(GuestAddress, StatusPtr), RequestError> {
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
    if let Some(ptr) = host.get(status, 1) {
        return Ok((status, StatusPtr::new(ptr)));
    }
    let slice = mem
        .get_slices(status, 1, Permissions::Write)
        .map_err(|_| oom.clone())?
        .next()
        .and_then(|s| s.ok())
        .filter(|s| s.len() == 1)
        .ok_or(oom)?;
    Ok((status, StatusPtr::new(slice.ptr_guard_mut().as_ptr())))
}

/// Removes the first `n` bytes from `pieces`: whole pieces, and the
/// start of the piece the boundary falls in. The caller guarantees
/// `pieces` holds at least `n` bytes.
pub(super) fn drop_front(pieces: &mut Pieces, n: u64) {
    let mut left = n;
    let mut whole = 0;
    for p in pieces.iter_mut() {
        if left == 0 {
            break;
        }
        if p.len > left {
            // Saturating: an address that would wrap is never guest RAM and
            // is rejected when resolved.
            p.addr = GuestAddress(p.addr.raw_value().saturating_add(left));
            p.len -= left;
            left = 0;
        } else {
            left -= p.len;
            whole += 1;
        }
    }
    pieces.drain(..whole);
}

/// Keeps at most `n` bytes of `pieces`; returns the kept length.
pub(super) fn truncate_pieces(pieces: &mut Pieces, n: u64) -> u64 {
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

/// Copies exactly `buf.len()` bytes from the start of `pieces`.
pub(super) fn copy_from_guest<G: GuestMemory + ?Sized>(
    mem: &G,
    host: &mut HostRanges<'_, G>,
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
        let to = &mut buf[off..off + n];
        match host.get(p.addr, n as u64) {
            // SAFETY: `from` maps n bytes of guest memory (`HostRanges`),
            // never our buffer; the guest may change them meanwhile: they
            // are read once, into our own buffer, and checked there.
            Some(from) => unsafe { copy_volatile(from, to) },
            None => mem.read_slice(to, p.addr).map_err(|_| p.out_of_memory())?,
        }
        off += n;
    }
    if off == buf.len() {
        Ok(())
    } else {
        // Unreachable given the callers' length checks; fail safe anyway.
        Err(RequestError::HeaderTooShort { len: off as u64 })
    }
}

/// Copies `to.len()` bytes from `from`, as vm-memory copies out of guest
/// memory: more than 8 bytes (a header) with one plain copy, a shorter
/// piece byte by byte with volatile reads.
///
/// # Safety
/// `from` must be valid for reads of `to.len()` bytes, and not overlap
/// `to`.
unsafe fn copy_volatile(from: *const u8, to: &mut [u8]) {
    if to.len() > 8 {
        // SAFETY: readable for to.len() bytes, apart from `to` (the caller).
        unsafe { std::ptr::copy_nonoverlapping(from, to.as_mut_ptr(), to.len()) };
        return;
    }
    for (i, b) in to.iter_mut().enumerate() {
        // SAFETY: i < to.len(), readable (the caller).
        *b = unsafe { std::ptr::read_volatile(from.add(i)) };
    }
}
