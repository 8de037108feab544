//! fcntl locks on the disk files: a write lock on a writable COW or raw
//! file, a read lock on the backing file, as UML takes them.
//!
//! Open-file-description locks are used: they conflict with UML's and
//! qemu's locks, and unlike classic POSIX locks they also conflict within
//! one process and are not dropped when some other descriptor of the same
//! file is closed.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::format::error::{DiskError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
}

/// A value for a `c_short` field of `struct flock`: the lock types and
/// whence are `c_int` constants of libc, all small (0 to 2).
fn short(v: libc::c_int) -> libc::c_short {
    libc::c_short::try_from(v).expect("fcntl lock constants fit a c_short")
}

fn flock_for(kind: LockKind) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = short(match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
    });
    fl.l_whence = short(libc::SEEK_SET);
    // l_start = 0, l_len = 0: the whole file, however it grows.
    fl
}

/// How long a lock held by no process is waited for: a daemon that just
/// died leaves its files registered with an io_uring that the kernel
/// tears down in the background, locks and all.
const ORPHAN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the lock, or says which process holds a conflicting one.
pub fn lock_file(file: &File, path: &Path, kind: LockKind) -> Result<()> {
    let fl = flock_for(kind);
    let deadline = std::time::Instant::now() + ORPHAN_LOCK_WAIT;
    loop {
        // SAFETY: valid fd and a valid flock struct.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => match lock_holder(file, kind) {
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                holder => {
                    return Err(DiskError::Locked {
                        path: path.to_owned(),
                        pid: holder.unwrap_or(-1),
                    })
                }
            },
            _ => return Err(DiskError::io(path, "lock")(err)),
        }
    }
}

/// The process holding a lock that conflicts with `kind`, if it can be found.
pub fn lock_holder(file: &File, kind: LockKind) -> Option<i32> {
    let mut fl = flock_for(kind);
    // SAFETY: valid fd and flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) } == 0
        && fl.l_type != short(libc::F_UNLCK)
        && fl.l_pid > 0
    {
        return Some(fl.l_pid);
    }
    // OFD locks report pid -1 through fcntl; /proc/locks names the process
    // that took them.
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let me = std::process::id() as i32;
    let mut fallback = None;
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: OFDLCK ADVISORY WRITE 1234 fd:01:5678 0 EOF"
        if f.len() >= 6 && !line.contains("->") && f[5] == want {
            if let Ok(pid) = f[4].parse::<i32>() {
                // Newer kernels show OFD locks with pid -1 here.
                if pid <= 0 {
                    continue;
                }
                if pid != me {
                    return Some(pid);
                }
                fallback = Some(pid);
            }
        }
    }
    fallback.or_else(|| fdinfo_holder(&want, kind, me))
}

/// Finds the holder of an OFD lock through /proc/PID/fdinfo, which lists
/// the locks of each open file description ("lock:\t1: OFDLCK ADVISORY
/// READ -1 fe:00:1234 0 EOF"). Another process is preferred to this one.
fn fdinfo_holder(want: &str, kind: LockKind, me: i32) -> Option<i32> {
    let mut mine = false;
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let conflicts = text.lines().any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // ["lock:", "1:", "OFDLCK", "ADVISORY", "READ", "-1", "fe:00:1234", ...]
                f.len() >= 7
                    && f[0] == "lock:"
                    && f[6] == want
                    && (kind == LockKind::Write || f[4] == "WRITE")
            });
            if conflicts {
                if pid != me {
                    return Some(pid);
                }
                mine = true;
            }
        }
    }
    mine.then_some(me)
}
