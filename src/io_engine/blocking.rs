//! Blocking system calls for one operation: the thread pool's workers
//! run them, and so does the queue thread for inline writes.

use std::io;

use super::{Completion, IoOp, OpState, Step};

/// Runs `state` to its end (short transfers continued, EINTR/EAGAIN
/// retried as the engines do) and returns its completion.
pub(super) fn run(mut state: OpState) -> Completion {
    let result = loop {
        match state.on_result(execute(&state.op)) {
            Step::Complete(r) => break r,
            Step::Reissue => continue,
        }
    };
    state.into_completion(result)
}

/// Runs one attempt of `op`, returning bytes done or `-errno`.
fn execute(op: &IoOp) -> i64 {
    let ret: i64 = match op {
        IoOp::Readv { fd, offset, iov } | IoOp::Writev { fd, offset, iov } => {
            let Ok(off) = libc::off_t::try_from(*offset) else {
                return -i64::from(libc::EINVAL);
            };
            // `validate` caps the count at IOV_MAX, so it fits in c_int.
            let Ok(cnt) = libc::c_int::try_from(iov.len()) else {
                return -i64::from(libc::EINVAL);
            };
            if matches!(op, IoOp::Readv { .. }) {
                // SAFETY: the iovec array is owned by `op` and valid for the
                // call; the memory it points to is valid and writable until
                // completion per the `IoEngine::submit` contract.
                unsafe { libc::preadv(*fd, iov.as_slice().as_ptr(), cnt, off) as i64 }
            } else {
                // SAFETY: as above; the memory is only read.
                unsafe { libc::pwritev(*fd, iov.as_slice().as_ptr(), cnt, off) as i64 }
            }
        }
        // SAFETY: plain syscall on an integer fd, no memory involved.
        IoOp::Fdatasync { fd } => unsafe { libc::fdatasync(*fd) as i64 },
        IoOp::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => {
            let (Ok(off), Ok(len)) = (libc::off_t::try_from(*offset), libc::off_t::try_from(*len))
            else {
                return -i64::from(libc::EINVAL);
            };
            // SAFETY: plain syscall on an integer fd, no memory involved.
            unsafe { libc::fallocate(*fd, *mode, off, len) as i64 }
        }
    };
    if ret < 0 {
        -i64::from(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        ret
    }
}
