//! Guest memory for the test frontend: one memfd (or a few, one per
//! region), mapped shared into this process and handed to the backend
//! with SET_MEM_TABLE / ADD_MEM_REGION.
//! Guest physical addresses start at [`GUEST_BASE`] (not 0, so that small
//! addresses are "outside guest memory" too). A bump allocator hands out
//! buffers; it is reset when no request is in flight.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vhost_user_cow::units::to_usize;

/// Guest physical address of the first byte of guest memory.
pub const GUEST_BASE: u64 = 0x10_0000;

/// One memfd mapped shared: a region of guest memory.
pub struct Region {
    fd: OwnedFd,
    ptr: *mut u8,
    /// Guest physical address of its first byte.
    pub gpa: u64,
    pub size: u64,
}

impl Region {
    /// A zero-filled memfd of `size` bytes (a multiple of the page size)
    /// mapped at guest physical `gpa`.
    pub fn new(gpa: u64, size: u64) -> Region {
        assert!(size > 0 && size % 4096 == 0, "guest memory size {size}");
        // SAFETY: valid NUL-terminated name, plain flags.
        let raw = unsafe { libc::memfd_create(c"vuc-e2e-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: memfd_create returned a fresh fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is a valid memfd.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: mapping a file we own, shared, read-write, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                to_usize(size),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Region {
            fd,
            ptr: ptr.cast(),
            gpa,
            size,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Address of the mapping in this process.
    pub fn host_base(&self) -> u64 {
        self.ptr as u64
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Shrinks (or grows) the memfd under the mapping: pages past the new
    /// end raise SIGBUS when touched, by us or by the backend.
    pub fn truncate_file(&self, len: u64) {
        // SAFETY: fd is a valid memfd we own.
        let r = unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), to_usize(self.size)) };
    }
}

/// The guest memory: a main region at [`GUEST_BASE`] (rings and buffers)
/// and optionally more regions above it (adjacent or after a hole).
pub struct GuestMemory {
    regions: Vec<Region>,
}

// SAFETY: the mappings are owned by this value and only accessed through
// methods that bounds-check; sharing with the backend process is the point.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; all accesses go through bounds-checked copies/atomics.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// One zero-filled memfd region of `size` bytes at [`GUEST_BASE`].
    pub fn new(size: u64) -> GuestMemory {
        GuestMemory::with_extra(size, &[])
    }

    /// The main region plus `extra` regions, each `(gap, size)`: `gap`
    /// bytes after the end of the previous one (0: adjacent).
    pub fn with_extra(size: u64, extra: &[(u64, u64)]) -> GuestMemory {
        let mut regions = vec![Region::new(GUEST_BASE, size)];
        for &(gap, size) in extra {
            let at = regions.last().unwrap().end() + gap;
            regions.push(Region::new(at, size));
        }
        GuestMemory { regions }
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Size of the main region (rings and buffers live there).
    pub fn size(&self) -> u64 {
        self.regions[0].size
    }

    /// One past the last guest physical address of the main region.
    pub fn main_end(&self) -> u64 {
        self.regions[0].end()
    }

    /// One past the last guest physical address of any region.
    pub fn end(&self) -> u64 {
        self.regions.iter().map(Region::end).max().unwrap()
    }

    pub fn fd(&self) -> RawFd {
        self.regions[0].fd()
    }

    /// Address of the main mapping in this process (the "user address"
    /// that vhost-user ring addresses are expressed in).
    pub fn host_base(&self) -> u64 {
        self.regions[0].host_base()
    }

    /// Host (user) address of a guest physical address.
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.check(gpa, 0) as u64
    }

    fn region_of(&self, gpa: u64) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
    }

    /// The host pointer of `gpa..gpa+len`, which must lie in one region.
    fn check(&self, gpa: u64, len: usize) -> *mut u8 {
        let r = self
            .region_of(gpa)
            .or_else(|| self.regions.iter().find(|r| len == 0 && gpa == r.end()))
            .unwrap_or_else(|| panic!("gpa {gpa:#x} outside guest memory"));
        let off = gpa - r.gpa;
        assert!(
            off.checked_add(len as u64).is_some_and(|e| e <= r.size),
            "gpa {gpa:#x}+{len} outside one region of guest memory"
        );
        // SAFETY: off <= size: inside (or one past) the mapping.
        unsafe { r.ptr.add(to_usize(off)) }
    }

    /// Splits `gpa..gpa+len` at region boundaries (adjacent regions only).
    fn pieces(&self, mut gpa: u64, mut len: usize) -> Vec<(*mut u8, usize)> {
        let mut out = Vec::new();
        while len > 0 {
            let r = self
                .region_of(gpa)
                .unwrap_or_else(|| panic!("gpa {gpa:#x} outside guest memory"));
            let n = len.min(to_usize(r.end() - gpa));
            out.push((self.check(gpa, n), n));
            gpa += n as u64;
            len -= n;
        }
        out
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let mut at = 0;
        for (p, n) in self.pieces(gpa, data.len()) {
            // SAFETY: bounds checked; the backend may access the same bytes
            // concurrently only for buffers it owns at that time (virtio rules).
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), p, n) };
            at += n;
        }
    }

    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        let mut at = 0;
        for (p, n) in self.pieces(gpa, out.len()) {
            // SAFETY: bounds checked.
            unsafe { std::ptr::copy_nonoverlapping(p, out[at..].as_mut_ptr(), n) };
            at += n;
        }
    }

    pub fn read_vec(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v);
        v
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        for (p, n) in self.pieces(gpa, len) {
            // SAFETY: bounds checked.
            unsafe { std::ptr::write_bytes(p, byte, n) };
        }
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn write_u32(&self, gpa: u64, v: u32) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b);
        u32::from_le_bytes(b)
    }

    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert_eq!(gpa % 2, 0, "unaligned ring index at {gpa:#x}");
        let p = self.check(gpa, 2);
        // SAFETY: in bounds, 2-byte aligned (page-aligned mapping), and the
        // shared ring indices are exactly what atomics are for.
        unsafe { &*p.cast::<AtomicU16>() }
    }

    /// Ring index read with acquire ordering (x86 and ARM: the device's
    /// writes before its index update are visible after this).
    pub fn load_u16_acquire(&self, gpa: u64) -> u16 {
        u16::from_le(self.atomic_u16(gpa).load(Ordering::Acquire))
    }

    /// Ring index publish: everything written before is visible first.
    pub fn store_u16_release(&self, gpa: u64, v: u16) {
        fence(Ordering::SeqCst);
        self.atomic_u16(gpa).store(v.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
    }
}

/// A bump allocator over a guest-physical range.
#[derive(Debug)]
pub struct Arena {
    start: u64,
    next: u64,
    end: u64,
}

impl Arena {
    pub fn new(start: u64, end: u64) -> Arena {
        Arena {
            start,
            next: start,
            end,
        }
    }

    /// `len` bytes (at least 1) aligned to `align`; panics when full with
    /// a message saying so (a test asking for too much, not a device bug).
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = self.next.div_ceil(align) * align;
        let end = at + len.max(1);
        assert!(
            end <= self.end,
            "guest buffer arena full: {len} bytes wanted, {} free; raise FrontendOptions::mem_size",
            self.end.saturating_sub(at)
        );
        self.next = end;
        at
    }

    pub fn reset(&mut self) {
        self.next = self.start;
    }

    pub fn start(&self) -> u64 {
        self.start
    }
}
