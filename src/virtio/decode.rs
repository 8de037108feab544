//! Per-type decoding of a framed virtio-blk request: IN/OUT data checked
//! against the limits and resolved to host memory, GET_ID's buffer,
//! DISCARD / WRITE_ZEROES ranges. [`parse_request`] is the entry point:
//! it returns either a [`BlkRequest`] whose data buffers are resolved to host
//! pointers and verified to lie inside guest memory, or a
//! [`RequestFailure`] that says which status (if any) to write and where.

use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

use super::chain::Chain;
use super::framing::{copy_from_guest, truncate_pieces, Frame, Piece, Pieces};
use super::host_ranges::HostRanges;
use super::request::*;
use crate::units::{to_usize, SECTOR_BYTES, SECTOR_SHIFT};

/// Parse and validate the request in `chain`.
///
/// The chain is walked on a clone, so the caller keeps `chain` (and with it
/// the memory guard that keeps the returned host pointers valid) and its
/// `head_index()` for completing the request.
pub fn parse_request<C: Chain>(chain: &C, limits: &Limits) -> Result<BlkRequest, RequestFailure> {
    parse_request_in(chain, limits, &mut HostRanges::new(chain.memory()))
}

/// [`parse_request`] with the guest ranges mapped through `host`, kept by
/// the caller over the requests of one pass (one region lookup per pass).
pub fn parse_request_in<C: Chain>(
    chain: &C,
    limits: &Limits,
    host: &mut HostRanges<'_, C::Mem>,
) -> Result<BlkRequest, RequestFailure> {
    let mut frame = Frame::new();
    super::framing::frame(chain, &mut frame, host)?;
    let status_addr = frame.status_addr;
    decode(chain.memory(), host, &frame, limits).map_err(|error| RequestFailure {
        error,
        status_addr: Some(status_addr),
    })
}

/// Gives a framed request its meaning by type.
#[inline]
fn decode<G: GuestMemory + ?Sized>(
    mem: &G,
    host: &mut HostRanges<'_, G>,
    frame: &Frame,
    limits: &Limits,
) -> Result<BlkRequest, RequestError> {
    let h = &frame.header;
    let raw_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let req_type = RequestType::from(raw_type);
    check_type(req_type, raw_type, limits)?;
    let mut req = BlkRequest {
        req_type,
        sector,
        data: Segments::new(),
        data_len: 0,
        ranges: Box::default(),
        status_addr: frame.status_addr,
        status_ptr: frame.status_ptr,
        writable_len: 1,
    };
    match req_type {
        RequestType::In => {
            no_data(req_type, &frame.readable)?;
            decode_data(
                mem,
                host,
                &mut req,
                &frame.writable,
                Permissions::Write,
                limits,
            )?;
            req.writable_len = clamp_u32(req.data_len + 1);
        }
        RequestType::Out => {
            no_data(req_type, &frame.writable)?;
            decode_data(
                mem,
                host,
                &mut req,
                &frame.readable,
                Permissions::Read,
                limits,
            )?;
        }
        // Data descriptors on FLUSH are ignored (as QEMU does).
        RequestType::Flush => {}
        RequestType::GetId => decode_get_id(mem, host, &mut req, &frame.writable)?,
        RequestType::Discard | RequestType::WriteZeroes => {
            no_data(req_type, &frame.writable)?;
            req.ranges =
                parse_ranges(mem, host, &frame.readable, req_type, limits)?.into_boxed_slice();
        }
        RequestType::Unsupported(t) => return Err(RequestError::UnsupportedType(t)),
    }
    Ok(req)
}

/// Refuses request types the device does not offer, and, like QEMU, any
/// write to a read-only disk before any other validation.
#[inline]
fn check_type(req_type: RequestType, raw_type: u32, limits: &Limits) -> Result<(), RequestError> {
    match req_type {
        RequestType::Unsupported(t) => Err(RequestError::UnsupportedType(t)),
        RequestType::Discard if limits.max_discard_seg == 0 => {
            Err(RequestError::UnsupportedType(raw_type))
        }
        RequestType::WriteZeroes if limits.max_write_zeroes_seg == 0 => {
            Err(RequestError::UnsupportedType(raw_type))
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes if limits.read_only => {
            Err(RequestError::ReadOnly { req_type })
        }
        _ => Ok(()),
    }
}

/// Data in the direction a request type does not use is an error.
#[inline]
fn no_data(req_type: RequestType, pieces: &[Piece]) -> Result<(), RequestError> {
    match pieces.first() {
        Some(p) => Err(RequestError::WrongDirection {
            req_type,
            position: p.position(),
            len: pieces.iter().map(|p| p.len).sum(),
        }),
        None => Ok(()),
    }
}

/// IN/OUT data: within the segment limits, whole sectors, inside the disk,
/// inside guest memory.
#[inline]
fn decode_data<G: GuestMemory + ?Sized>(
    mem: &G,
    host: &mut HostRanges<'_, G>,
    req: &mut BlkRequest,
    data: &[Piece],
    perm: Permissions,
    limits: &Limits,
) -> Result<(), RequestError> {
    check_data_segments(data, limits)?;
    let len: u64 = data.iter().map(|p| p.len).sum();
    if len % SECTOR_BYTES != 0 {
        return Err(RequestError::UnalignedLength { len });
    }
    // Zero-length IN/OUT: the spec is silent; QEMU's virtio-blk handler
    // (qemu-storage-daemon) accepts it as a no-op with status OK provided
    // sector <= capacity, and so do we.
    let sectors = len >> SECTOR_SHIFT;
    let cap = limits.capacity_sectors;
    if req.sector > cap || sectors > cap - req.sector {
        return Err(RequestError::OutOfRange {
            sector: req.sector,
            sectors,
            capacity: cap,
        });
    }
    req.data = resolve(mem, host, data, perm)?;
    req.data_len = len;
    Ok(())
}

/// GET_ID: any writable buffer size works, we fill min(len, 20) bytes. A
/// GET_ID without a data buffer is, as in QEMU, answered OK with only the
/// status written; readable extras are ignored (QEMU ignores them too).
#[inline]
fn decode_get_id<G: GuestMemory + ?Sized>(
    mem: &G,
    host: &mut HostRanges<'_, G>,
    req: &mut BlkRequest,
    data: &Pieces,
) -> Result<(), RequestError> {
    let mut data = data.clone();
    let len = truncate_pieces(&mut data, ID_BYTES as u64);
    req.data = resolve(mem, host, &data, Permissions::Write)?;
    req.data_len = len;
    req.writable_len = clamp_u32(len + 1);
    Ok(())
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
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
                position: p.position(),
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
    host: &mut HostRanges<'_, G>,
    pieces: &[Piece],
    perm: Permissions,
) -> Result<Segments, RequestError> {
    let mut out = Segments::with_capacity(pieces.len());
    for p in pieces {
        let len = usize::try_from(p.len).map_err(|_| p.out_of_memory())?;
        // Reject ranges that wrap the address space before asking vm-memory.
        p.addr
            .raw_value()
            .checked_add(p.len)
            .ok_or_else(|| p.out_of_memory())?;
        if let Some(ptr) = host.get(p.addr, p.len).filter(|_| len > 0) {
            out.push(Segment {
                ptr,
                len,
                guest_addr: p.addr,
            });
            continue;
        }
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

fn parse_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    host: &mut HostRanges<'_, G>,
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
    let mut bytes = vec![0u8; to_usize(len)];
    copy_from_guest(mem, host, payload, &mut bytes)?;

    let mut ranges = Vec::with_capacity(to_usize(count));
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
#[path = "request_tests.rs"]
mod tests;
