//! Zeroed, page-aligned byte buffers: what O_DIRECT needs for the in-memory
//! bitmap and for copy-up bounce buffers.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

pub const PAGE: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Mapped from the kernel (`mapped_zeroed`) rather than allocated.
    mapped: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: as for Vec<u8>: shared references only read through `&self`
// methods; writing needs `&mut self` or an unsafe raw pointer whose user
// must rule out races.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes (rounded up to whole pages, at least one).
    pub fn zeroed(len: usize) -> AlignedBuf {
        Self::try_zeroed(len).unwrap_or_else(|| {
            alloc::handle_alloc_error(Layout::from_size_align(len.max(1), PAGE).unwrap())
        })
    }

    /// As `zeroed`, or None when that much memory cannot be had.
    pub fn try_zeroed(len: usize) -> Option<AlignedBuf> {
        let len = len.checked_next_multiple_of(PAGE)?.max(PAGE);
        let layout = Layout::from_size_align(len, PAGE).ok()?;
        // SAFETY: layout has non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf {
            ptr,
            len,
            mapped: false,
        })
    }

    /// `len` zero bytes (whole pages) mapped from the kernel: its pages
    /// become resident only when written, where the allocator's aligned
    /// zeroed allocation writes every byte. For large blocks used a page at
    /// a time (the bitmap's page pool); None when the mapping fails.
    pub fn mapped_zeroed(len: usize) -> Option<AlignedBuf> {
        let len = len.checked_next_multiple_of(PAGE)?.max(PAGE);
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(AlignedBuf {
            ptr: NonNull::new(p.cast())?,
            len,
            mapped: true,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        // Allocated, even for a mapped original: clones are the model
        // checks' copies of a whole scheduler, made at every step.
        let mut b = AlignedBuf::zeroed(self.len);
        b.as_mut_slice().copy_from_slice(self.as_slice());
        b
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `mapped_zeroed` with this length, not used
            // after this.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            }
            return;
        }
        // SAFETY: allocated in `try_zeroed` with this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align(self.len, PAGE).unwrap(),
            )
        }
    }
}
