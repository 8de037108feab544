//! Dirty-page logging for live migration (vhost-user "Migration",
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD): while the frontend has VHOST_F_LOG_ALL
//! acked, every guest page the daemon writes gets its bit set in the log
//! the frontend mapped us with SET_LOG_BASE, so that the migration copies
//! it again. One bit per 4 KiB page of guest physical address: bit
//! `page % 8` of byte `page / 8`, set with an atomic `fetch_or` since the
//! frontend clears bits concurrently (QEMU swaps whole 64-bit words out, so
//! bytes and words see the same bits on a little-endian host).
//!
//! What is marked (docs/design.md, "Dirty logging"): the data that reads
//! and GET_ID bring into guest buffers (after the engine completed, before
//! the request is published), status bytes, and the used ring at the guest
//! address SET_VRING_ADDR gave for logging. All of it before the used index
//! is published, so GET_VRING_BASE (which waits for publication) is a point
//! behind which every write of the stopped ring is in the log.
//!
//! Locks: the mapping sits behind a `RwLock`: workers hold it for reading
//! while they mark (under the virtqueue's lock: each ring knows its
//! connection's log, `VirtqueueState::log_*`); SET_LOG_BASE and turning
//! logging off take it for writing, so once they return no worker writes
//! to the old log. With logging off a mark costs one atomic load, and the
//! marking code is out of line (docs/benchmarks.md, "Dirty logging").

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use thiserror::Error;

use super::truncation_guard::{self, Registration};
use crate::virtio::request::{BlkRequest, RequestType};

/// Guest bytes per log bit (the spec's fixed 4 KiB, whatever the host's
/// page size).
pub const LOG_PAGE_SHIFT: u32 = 12;

/// The largest log accepted: it covers 2^48 bytes of guest physical
/// address space, more than any guest has; a larger size is a hostile or
/// broken frontend.
pub const MAX_LOG_BYTES: u64 = 1 << (48 - LOG_PAGE_SHIFT - 3);

/// Bytes of a split used ring of `size` entries: flags, idx, the
/// elements, avail_event.
pub fn used_ring_len(size: u16) -> u64 {
    4 + 8 * u64::from(size) + 2
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error("SET_LOG_BASE: log of {size:#x} bytes at offset {offset:#x}: {why}")]
    BadArea { size: u64, offset: u64, why: String },
    #[error(
        "SET_LOG_BASE: log of {size:#x} bytes at offset {offset:#x} does not fit in its file \
         of {file_len:#x} bytes"
    )]
    PastFileEnd {
        size: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("SET_LOG_BASE: mapping the log of {size:#x} bytes at offset {offset:#x}: {source}")]
    Map {
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The log's mapping: `len` bytes at `base`, inside a shared mapping of
/// the frontend's file that is unmapped when this is dropped.
struct LogMap {
    map: *mut libc::c_void,
    map_len: usize,
    base: *const AtomicU8,
    len: u64,
    registration: Option<Registration>,
}

// SAFETY: the mapping is plain shared memory only ever accessed through
// atomics; the pointers are not tied to a thread.
unsafe impl Send for LogMap {}
// SAFETY: as above.
unsafe impl Sync for LogMap {}

impl Drop for LogMap {
    fn drop(&mut self) {
        // Unregister from the SIGBUS guard before the pages go away.
        self.registration = None;
        // SAFETY: our own mapping, no reference into it outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

impl LogMap {
    /// Maps `size` bytes of `file` from `offset`, after checking that they
    /// are in the file: a page past its end would raise SIGBUS.
    fn new(file: &File, size: u64, offset: u64) -> Result<LogMap, LogError> {
        let bad = |why: &str| LogError::BadArea {
            size,
            offset,
            why: why.to_owned(),
        };
        if size == 0 {
            return Err(bad("empty"));
        }
        if size > MAX_LOG_BYTES {
            return Err(bad(&format!(
                "larger than {MAX_LOG_BYTES:#x} bytes (a log for 2^48 bytes of guest memory)"
            )));
        }
        let end = offset
            .checked_add(size)
            .ok_or_else(|| bad("offset wraps"))?;
        let meta = file.metadata().map_err(|e| bad(&format!("fstat: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file or memfd"));
        }
        if end > meta.len() {
            return Err(LogError::PastFileEnd {
                size,
                offset,
                file_len: meta.len(),
            });
        }
        // mmap wants a page-aligned offset: map from the page the log
        // starts in.
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let skip = offset % page;
        let (Ok(map_len), Ok(file_off)) = (
            usize::try_from(size + skip),
            libc::off_t::try_from(offset - skip),
        ) else {
            return Err(bad("does not fit the address space"));
        };
        // SAFETY: a new shared mapping of a file we hold open; no existing
        // memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_off,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(LogError::Map {
                size,
                offset,
                source: std::io::Error::last_os_error(),
            });
        }
        let registration = truncation_guard::register(map.cast::<u8>(), map_len);
        Ok(LogMap {
            map,
            map_len,
            // SAFETY: skip < page <= map_len, inside the mapping.
            base: unsafe { map.cast::<u8>().add(crate::units::to_usize(skip)) }.cast(),
            len: size,
            registration,
        })
    }

    /// Sets the bits of every page of `[gpa, gpa + len)`. Returns false,
    /// marking nothing, when the range is not covered by the log.
    fn mark(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = gpa.checked_add(len - 1) else {
            return false;
        };
        let (first, last) = (gpa >> LOG_PAGE_SHIFT, last >> LOG_PAGE_SHIFT);
        if (last >> 3) >= self.len {
            return false;
        }
        for byte in (first >> 3)..=(last >> 3) {
            // The bits of this byte's pages that the range covers.
            let lo = if byte == first >> 3 { first & 7 } else { 0 };
            let hi = if byte == last >> 3 { last & 7 } else { 7 };
            let bits = (0xffu8 << lo) & (0xffu8 >> (7 - hi));
            // SAFETY: byte <= last >> 3 < len, inside the mapping.
            let cell = unsafe { &*self.base.add(crate::units::to_usize(byte)) };
            cell.fetch_or(bits, Ordering::Relaxed);
        }
        true
    }
}

/// One connection's dirty log: the mapping SET_LOG_BASE gave and whether
/// VHOST_F_LOG_ALL is acked.
#[derive(Default)]
pub struct DirtyLog {
    /// LOG_ALL acked and a log mapped: the one thing a worker reads when
    /// logging is off.
    on: AtomicBool,
    logging: AtomicBool,
    map: RwLock<Option<LogMap>>,
}

/// A worker's hold on the log for one batch of writes.
pub struct LogWriter<'a>(RwLockReadGuard<'a, Option<LogMap>>);

impl LogWriter<'_> {
    /// Marks the pages of `[gpa, gpa + len)`; a range the log does not
    /// cover (the frontend sized it too small) is reported, not written.
    #[inline(never)]
    pub fn mark(&self, gpa: u64, len: u64) {
        let covered = self.0.as_ref().is_some_and(|m| m.mark(gpa, len));
        if !covered {
            crate::log_limited!(
                log::Level::Warn,
                "write outside the dirty log",
                "guest write at {gpa:#x} ({len} bytes) is outside the dirty log of {} bytes: \
                 not logged",
                self.0.as_ref().map_or(0, |m| m.len)
            );
        }
    }
}

impl LogWriter<'_> {
    /// What a finished request wrote into guest memory: its device-writable
    /// data (IN, GET_ID: filled by the engine or by us, whatever the
    /// status, since a failed read may have written part) and its status
    /// byte.
    #[inline(never)]
    pub fn mark_request(&self, req: &BlkRequest) {
        if matches!(req.req_type, RequestType::In | RequestType::GetId) {
            for s in &req.data {
                self.mark(s.guest_addr().0, s.len() as u64);
            }
        }
        self.mark(req.status_addr.0, 1);
    }

    /// The used ring of `size` entries whose guest address for logging is
    /// `log_addr` (SET_VRING_ADDR with VHOST_VRING_F_LOG; None: the
    /// frontend asked for no used-ring logging). Marked whole: every write
    /// to it (elements, index, flags, avail_event) is covered.
    #[inline(never)]
    pub fn mark_used_ring(&self, log_addr: Option<u64>, size: u16) {
        if let Some(addr) = log_addr {
            self.mark(addr, used_ring_len(size));
        }
    }
}

impl DirtyLog {
    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Option<LogMap>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, map: &Option<LogMap>) {
        let on = self.logging.load(Ordering::Acquire) && map.is_some();
        self.on.store(on, Ordering::Release);
    }

    /// SET_LOG_BASE: maps the new log in place of the old one. When this
    /// returns, no worker writes to the old log any more.
    pub fn set_base(&self, file: &File, size: u64, offset: u64) -> Result<(), LogError> {
        let new = LogMap::new(file, size, offset)?;
        let mut map = self.lock();
        *map = Some(new);
        self.update(&map);
        Ok(())
    }

    /// SET_FEATURES with or without VHOST_F_LOG_ALL. Turning it off also
    /// unmaps the log (QEMU frees it then and sends a new one with the next
    /// SET_LOG_BASE): when this returns nothing is logged any more.
    pub fn set_logging(&self, on: bool) {
        let was = self.logging.swap(on, Ordering::AcqRel);
        let mut map = self.lock();
        if was && !on {
            *map = None;
        }
        self.update(&map);
    }

    /// Whether a frontend truncated the log's file under its mapping.
    pub fn truncated(&self) -> bool {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.as_ref()
            .and_then(|m| m.registration.as_ref())
            .is_some_and(|r| r.truncated())
    }

    /// Whether pages are being logged: the one check on the request path
    /// (an atomic load); the marking below is out of line, so that the
    /// path with logging off compiles as it did without logging.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Marks `[gpa, gpa + len)` if logging is on.
    #[inline(never)]
    pub fn mark(&self, gpa: u64, len: u64) {
        if let Some(w) = self.writer() {
            w.mark(gpa, len);
        }
    }

    /// A published request: [`LogWriter::mark_request`] and
    /// [`LogWriter::mark_used_ring`], if logging is on.
    #[inline(never)]
    pub fn mark_published(&self, req: &BlkRequest, used_log_addr: Option<u64>, size: u16) {
        if let Some(w) = self.writer() {
            w.mark_request(req);
            w.mark_used_ring(used_log_addr, size);
        }
    }

    /// [`LogWriter::mark_used_ring`] if logging is on.
    #[inline(never)]
    pub fn mark_used_ring(&self, log_addr: Option<u64>, size: u16) {
        if let Some(w) = self.writer() {
            w.mark_used_ring(log_addr, size);
        }
    }

    /// The log to mark writes in, or None when logging is off.
    pub fn writer(&self) -> Option<LogWriter<'_>> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        let guard = self.map.read().unwrap_or_else(|p| p.into_inner());
        guard.is_some().then_some(LogWriter(guard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::GuestAddress;

    /// A memfd-backed log of `len` bytes, and a second mapping of it to
    /// read the bits back as the frontend would.
    fn memfd(len: u64) -> File {
        // SAFETY: a new anonymous file; the name is a C string.
        let fd = unsafe { libc::memfd_create(c"test-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: the fd is new and ours.
        let f = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn bits(f: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; crate::units::to_usize(f.metadata().unwrap().len())];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    fn set_pages(f: &File) -> Vec<u64> {
        let mut pages = Vec::new();
        for (i, b) in bits(f).iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.push(i as u64 * 8 + bit);
                }
            }
        }
        pages
    }

    fn logging(len: u64) -> (DirtyLog, File) {
        let f = memfd(len);
        let log = DirtyLog::default();
        log.set_base(&f, len, 0).unwrap();
        log.set_logging(true);
        (log, f)
    }

    #[test]
    fn marks_every_page_a_range_touches() {
        let (log, f) = logging(64);
        let w = log.writer().expect("logging is on");
        // One byte in page 3; 2 bytes straddling pages 9/10; pages 16..=40.
        w.mark(3 * 4096 + 100, 1);
        w.mark(10 * 4096 - 1, 2);
        w.mark(16 * 4096, 25 * 4096);
        drop(w);
        let mut want = vec![3, 9, 10];
        want.extend(16..=40);
        assert_eq!(set_pages(&f), want);
    }

    #[test]
    fn keeps_bits_already_set() {
        let f = memfd(8);
        (&f).write_all(&[0b1000_0001]).unwrap();
        let log = DirtyLog::default();
        log.set_base(&f, 8, 0).unwrap();
        log.set_logging(true);
        log.writer().unwrap().mark(4096, 1);
        assert_eq!(bits(&f)[0], 0b1000_0011);
    }

    #[test]
    fn off_marks_nothing_and_unmaps() {
        let (log, f) = logging(8);
        log.set_logging(false);
        assert!(log.writer().is_none());
        assert!(!log.is_on());
        // Turned on again without a new SET_LOG_BASE: still nothing (the
        // old log was given up).
        log.set_logging(true);
        assert!(log.writer().is_none());
        assert_eq!(set_pages(&f), Vec::<u64>::new());
    }

    #[test]
    fn log_all_before_the_base_starts_logging_at_the_base() {
        let f = memfd(8);
        let log = DirtyLog::default();
        log.set_logging(true);
        assert!(log.writer().is_none());
        log.set_base(&f, 8, 0).unwrap();
        log.writer().unwrap().mark(0, 1);
        assert_eq!(set_pages(&f), vec![0]);
    }

    #[test]
    fn a_new_base_replaces_the_old_one() {
        let (log, old) = logging(8);
        let new = memfd(8);
        log.set_base(&new, 8, 0).unwrap();
        log.writer().unwrap().mark(5 * 4096, 1);
        assert_eq!(set_pages(&old), Vec::<u64>::new());
        assert_eq!(set_pages(&new), vec![5]);
    }

    #[test]
    fn an_offset_into_the_file_is_honoured_aligned_or_not() {
        for offset in [4096u64, 100] {
            let f = memfd(8192);
            let log = DirtyLog::default();
            log.set_base(&f, 16, offset).unwrap();
            log.set_logging(true);
            log.writer().unwrap().mark(0, 1);
            log.writer().unwrap().mark(127 * 4096, 1);
            let b = bits(&f);
            let o = crate::units::to_usize(offset);
            assert_eq!((b[o], b[o + 15]), (1, 0x80), "offset {offset}");
            assert_eq!(b.iter().map(|&x| x.count_ones()).sum::<u32>(), 2);
        }
    }

    #[test]
    fn writes_outside_the_log_are_not_written() {
        let (log, f) = logging(8);
        let w = log.writer().unwrap();
        w.mark(64 * 4096, 1); // first page past the log
        w.mark(63 * 4096, 4097); // straddles its end: refused whole
        w.mark(u64::MAX - 10, 100); // wraps
        w.mark(u64::MAX, 1);
        drop(w);
        assert_eq!(set_pages(&f), Vec::<u64>::new());
    }

    #[test]
    fn hostile_areas_are_refused() {
        let f = memfd(8192);
        let log = DirtyLog::default();
        for (size, offset) in [
            (0, 0),
            (8193, 0),
            (4096, 4097),
            (16, u64::MAX - 8),
            (MAX_LOG_BYTES + 1, 0),
            (u64::MAX, 0),
        ] {
            let e = log.set_base(&f, size, offset).unwrap_err();
            assert!(e.to_string().contains("SET_LOG_BASE"), "{e}");
        }
        let dir = File::open("/").unwrap();
        assert!(log.set_base(&dir, 8, 0).is_err());
        log.set_logging(true);
        assert!(log.writer().is_none(), "no log was mapped");
    }

    #[test]
    fn used_ring_length() {
        assert_eq!(used_ring_len(256), 2054);
    }

    fn request(req_type: RequestType, data: &[(u64, usize)], status: u64) -> BlkRequest {
        let mut buf = vec![0u8; 1];
        let data: crate::virtio::request::Segments = data
            .iter()
            // SAFETY: the segments are never dereferenced (marking only
            // reads their guest addresses).
            .map(|&(gpa, len)| unsafe {
                crate::virtio::request::Segment::from_host(buf.as_mut_ptr(), len, GuestAddress(gpa))
            })
            .collect();
        BlkRequest {
            req_type,
            sector: 0,
            data_len: data.iter().map(|s| s.len() as u64).sum(),
            data,
            ranges: Box::default(),
            status_addr: GuestAddress(status),
            status_ptr: crate::virtio::request::StatusPtr::UNRESOLVED,
            writable_len: 1,
        }
    }

    #[test]
    fn a_read_marks_its_buffers_and_its_status() {
        let (log, f) = logging(64);
        // Two buffers: 8 KiB from the middle of page 2, 512 bytes in page 20;
        // status in page 30.
        let r = request(
            RequestType::In,
            &[(2 * 4096 + 2048, 8192), (20 * 4096, 512)],
            30 * 4096 + 7,
        );
        log.writer().unwrap().mark_request(&r);
        assert_eq!(set_pages(&f), vec![2, 3, 4, 20, 30]);
    }

    #[test]
    fn get_id_marks_its_buffer() {
        let (log, f) = logging(8);
        let r = request(RequestType::GetId, &[(7 * 4096 + 4090, 20)], 9 * 4096);
        log.writer().unwrap().mark_request(&r);
        assert_eq!(set_pages(&f), vec![7, 8, 9]);
    }

    #[test]
    fn writes_flushes_and_discards_mark_only_their_status() {
        // The device only reads an OUT request's buffers.
        for t in [
            RequestType::Out,
            RequestType::Flush,
            RequestType::Discard,
            RequestType::WriteZeroes,
            RequestType::Unsupported(99),
        ] {
            let (log, f) = logging(8);
            let r = request(t, &[(4096, 4096)], 5 * 4096);
            log.writer().unwrap().mark_request(&r);
            assert_eq!(set_pages(&f), vec![5], "{t:?}");
        }
    }

    #[test]
    fn the_used_ring_is_marked_at_its_log_address() {
        let (log, f) = logging(64);
        // A 256-entry used ring is 2054 bytes: from 1 KiB before the end
        // of page 40 it reaches into page 41.
        let w = log.writer().unwrap();
        w.mark_used_ring(Some(41 * 4096 - 1024), 256);
        // No log address given: nothing to mark.
        w.mark_used_ring(None, 256);
        drop(w);
        assert_eq!(set_pages(&f), vec![40, 41]);
    }
}
