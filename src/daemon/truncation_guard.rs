//! Survives a frontend that truncates a guest-memory file after handing
//! it over.
//!
//! Guest memory is mapped from the frontend's files (memfds). A region is
//! checked against its file's size when it is added, but the frontend can
//! still shrink the file afterwards; the daemon's next access to a page
//! past the new end of file then raises SIGBUS, which would kill it.
//! (The kernel's own copies, io_uring and preadv into guest buffers, get
//! EFAULT instead, which becomes an I/O error for the guest.)
//!
//! So every guest region is registered here, and a SIGBUS handler that
//! finds the faulting address inside a registered region replaces that
//! region with anonymous zero pages (the access then completes, reading
//! zeros, writing nowhere that matters), marks that region truncated, and
//! wakes the message threads; the one whose connection mapped the region
//! ends that connection: the truncation costs the frontend its
//! connection, not the daemon its life nor another export its frontend.
//! A SIGBUS anywhere else keeps its default action.
//!
//! The handler may only touch async-signal-safe state: the registry is a
//! fixed array of atomics, the wake-up a write(2) to an eventfd.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use crate::fsutil::aligned::AlignedBuf;

/// Registry slots per frontend connection: a frontend maps at most 509
/// regions (the vhost-user limit), plus a dirty log.
const SLOTS_PER_CONNECTION: usize = 512;
/// Message threads that can be woken (one per export).
pub const WAKERS: usize = 64;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    /// Set by the handler when it replaced this region.
    truncated: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            truncated: AtomicBool::new(false),
        }
    }
}

/// Sized once, before the first region is registered ([`reserve`]); the
/// handler only reads it. Mapped zeroed from the kernel (never unmapped):
/// the slots are taken lowest first and a frontend maps a handful of
/// regions, so only the first page of the 512 slots per connection
/// becomes resident (a filled array would be 24 KiB per connection).
static REGIONS: OnceLock<&'static [Slot]> = OnceLock::new();
#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array
const NO_FD: AtomicI32 = AtomicI32::new(-1);
/// The eventfds the handler writes to (-1: free).
static WAKE_FDS: [AtomicI32; WAKERS] = [NO_FD; WAKERS];
static INSTALL: Once = Once::new();

/// Makes room for the regions of `connections` frontend connections at
/// once (two per export). Call before any region is registered; without
/// it the registry holds two connections' worth.
pub fn reserve(connections: usize) {
    regions_or_init(connections.max(2));
}

fn regions_or_init(connections: usize) -> &'static [Slot] {
    REGIONS.get_or_init(|| {
        let n = connections * SLOTS_PER_CONNECTION;
        match AlignedBuf::mapped_zeroed(n * std::mem::size_of::<Slot>()) {
            Some(buf) => {
                let p = buf.as_ptr().cast::<Slot>();
                // The registry lives as long as the process.
                std::mem::forget(buf);
                // SAFETY: `n` slots of page-aligned zeroed memory, never
                // unmapped; all zeroes is a valid free slot (atomics of 0).
                unsafe { std::slice::from_raw_parts(p, n) }
            }
            // Without a mapping, filled slots from the allocator.
            None => Box::leak((0..n).map(|_| Slot::new()).collect()),
        }
    })
}

/// A registered region; unregistered when dropped.
pub struct Registration(usize);

impl Registration {
    /// Whether the handler found this region truncated and replaced it.
    pub fn truncated(&self) -> bool {
        regions_or_init(2)[self.0].truncated.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &regions_or_init(2)[self.0];
        s.len.store(0, Ordering::Release);
        s.truncated.store(false, Ordering::Release);
        s.start.store(0, Ordering::Release);
    }
}

/// Registers the host mapping `[start, start + len)` of a guest region.
/// Returns None when the registry is full (the region is then not
/// protected; a truncation of it would end the daemon as before).
pub fn register(start: *const u8, len: usize) -> Option<Registration> {
    install();
    for (i, s) in regions_or_init(2).iter().enumerate() {
        if s.start
            .compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.len.store(len, Ordering::Release);
            return Some(Registration(i));
        }
    }
    log::error!("guest memory registry full: a region is not guarded against truncation");
    None
}

/// An eventfd the handler signals after a truncation (a message thread
/// polls it, then asks its connections whether it was theirs); removed
/// when dropped.
pub struct Waker(usize);

impl Drop for Waker {
    fn drop(&mut self) {
        WAKE_FDS[self.0].store(-1, Ordering::Release);
    }
}

/// Adds `fd` to the eventfds the handler signals. None when every place
/// is taken (more message threads than exports can be).
pub fn add_wake_fd(fd: i32) -> Option<Waker> {
    WAKE_FDS
        .iter()
        .position(|w| {
            w.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
        .map(Waker)
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the
        // handler only uses async-signal-safe operations.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                log::error!(
                    "cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    // Not yet sized: nothing was registered, so the fault is not ours.
    for s in REGIONS.get().map_or(&[][..], |r| &r[..]) {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: the range is a guest mapping of ours; replacing it with
        // private anonymous memory keeps it mapped for every access still
        // in flight. mmap and write are async-signal-safe in practice on
        // Linux (they are plain system calls).
        let ok = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            ) != libc::MAP_FAILED
        };
        if ok {
            s.truncated.store(true, Ordering::Release);
            for w in &WAKE_FDS {
                let fd = w.load(Ordering::Acquire);
                if fd >= 0 {
                    let one: u64 = 1;
                    // SAFETY: writing 8 bytes from a u64 to an eventfd.
                    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                }
            }
            return;
        }
        break;
    }
    // Not ours (or the remap failed): the default action, on return the
    // faulting access repeats and ends the process as it would have.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
