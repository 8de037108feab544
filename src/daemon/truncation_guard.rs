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
//! zeros, writing nowhere that matters), records it, and wakes the
//! message thread, which ends the connection: the truncation costs the
//! frontend its connection, not the daemon its life. A SIGBUS anywhere
//! else keeps its default action.
//!
//! The handler may only touch async-signal-safe state: the registry is a
//! fixed array of atomics, the wake-up a write(2) to an eventfd.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Once;

/// Room for every region of two connections (509 slots each).
const SLOTS: usize = 1024;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};

static REGIONS: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Set by the handler; taken by [`take_truncated`].
static TRUNCATED: AtomicBool = AtomicBool::new(false);
/// The eventfd the handler writes to (-1: none).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

/// A registered region; unregistered when dropped.
pub struct Registration(usize);

impl Drop for Registration {
    fn drop(&mut self) {
        REGIONS[self.0].len.store(0, Ordering::Release);
        REGIONS[self.0].start.store(0, Ordering::Release);
    }
}

/// Registers the host mapping `[start, start + len)` of a guest region.
/// Returns None when the registry is full (the region is then not
/// protected; a truncation of it would end the daemon as before).
pub fn register(start: *const u8, len: usize) -> Option<Registration> {
    install();
    for (i, s) in REGIONS.iter().enumerate() {
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

/// Sets the eventfd the handler signals (the message thread polls it).
pub fn set_wake_fd(fd: i32) {
    WAKE_FD.store(fd, Ordering::Release);
}

/// Whether a region was found truncated since the last call.
pub fn take_truncated() -> bool {
    TRUNCATED.swap(false, Ordering::AcqRel)
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
    for s in REGIONS.iter() {
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
            TRUNCATED.store(true, Ordering::Release);
            let fd = WAKE_FD.load(Ordering::Acquire);
            if fd >= 0 {
                let one: u64 = 1;
                // SAFETY: writing 8 bytes from a u64 to an eventfd.
                unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
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
