//! Giving back the memory that set-up used and freed. Many daemons run
//! side by side, one per VM (docs/benchmarks.md "Many VMs on one golden
//! image"), so what one keeps resident without using it counts N times:
//! glibc keeps freed heap memory below its trim threshold (128 KiB per
//! arena) and a thread's stack keeps every page it ever touched. Start-up
//! (argument parsing, opening and checking the files, the confinement)
//! and a frontend's set-up messages (memory tables, rings, logs) free
//! most of what they allocate; once they are done, [`trim`] returns it.
//! Nothing on the request path calls it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes below the stack pointer left alone: the frames of the call that
/// trims, and whatever a signal handler run on this stack needs.
const STACK_MARGIN: usize = 16 << 10;

/// The lowest address of the main thread's stack mapping, if known.
static MAIN_STACK_LOW: AtomicUsize = AtomicUsize::new(0);

/// Remembers where the main thread's stack mapping ends, from
/// `/proc/self/maps` (read before the sandbox hides `/proc`). Call on the
/// main thread, after the deepest part of start-up has run: the mapping
/// grows down as the stack is used and never shrinks.
pub fn note_main_stack() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let low = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|l| l.split('-').next())
        .and_then(|a| usize::from_str_radix(a, 16).ok());
    if let Some(low) = low {
        MAIN_STACK_LOW.store(low, Ordering::Relaxed);
    }
}

/// Returns freed heap memory of every malloc arena, and the main thread's
/// stack pages below the current frame (after [`note_main_stack`]), to the
/// system. Call on the main thread.
pub fn trim() {
    trim_heap();
    trim_main_stack();
}

/// Returns freed heap memory of every malloc arena to the system; from
/// any thread.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn trim_main_stack() {
    let low = MAIN_STACK_LOW.load(Ordering::Relaxed);
    if low == 0 {
        return;
    }
    let marker = 0u8;
    let sp = std::ptr::addr_of!(marker) as usize;
    let page = 4096;
    let high = sp.saturating_sub(STACK_MARGIN) & !(page - 1);
    if high <= low {
        return;
    }
    // SAFETY: the range lies in the main thread's stack mapping, below
    // the current frame and a margin: no live data is there (the stack
    // grows down), so discarding the pages only makes them read as zeros
    // the next time a call goes that deep.
    unsafe {
        libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED);
    }
}
