//! The daemon's system-call allow-list (seccomp-BPF, built with
//! `seccompiler`), installed on every thread once the daemon has opened
//! its files, bound its socket, started its workers and set up its
//! io_uring rings, and before it reads anything a frontend sends.
//!
//! What serving needs: reading and writing the open files (through the
//! thread pool or inline: preadv/pwritev, fdatasync, fallocate; through
//! io_uring: io_uring_enter), the socket (accept4, recvmsg, sendmsg),
//! mapping guest memory the frontend hands over (mmap, munmap), epoll and
//! eventfds, futexes, the log (write), removing the socket at exit
//! (unlinkat), and what the Rust runtime needs to allocate, panic and exit.
//! Nothing that opens a path (open/openat), creates a process or a thread,
//! or makes a socket is on the list.
//!
//! `kill` (the default) traps a blocked call: a SIGSYS handler writes one
//! line naming it and ends the process. `log` lets it through and has the
//! kernel log it (SECCOMP_RET_LOG: the audit log or dmesg). `off`
//! installs nothing.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// What a system call outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// One line naming the call, then the process ends.
    #[default]
    Kill,
    /// The call goes through and the kernel logs it.
    Log,
    /// No filter.
    Off,
}

impl SeccompMode {
    pub fn name(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        }
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The calls allowed whatever their arguments.
fn allowed() -> Vec<libc::c_long> {
    let mut v = vec![
        // Files that are already open.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_close,
        libc::SYS_io_uring_enter,
        // The rings are restricted (io_engine/uring.rs): the only register
        // call they accept is dropping their files at the end.
        libc::SYS_io_uring_register,
        // The socket and the frontend's file descriptors.
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        // Guest memory and the inflight area come as fds to map.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_memfd_create,
        // Waiting and waking.
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        // Signals: the handlers, their return, panics that abort.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_tgkill,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_restart_syscall,
        // Removing the socket at exit (through a directory fd).
        libc::SYS_unlinkat,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getrandom,
        libc::SYS_rseq,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_epoll_wait,
        libc::SYS_poll,
        libc::SYS_accept,
        libc::SYS_unlink,
    ]);
    v
}

/// Builds the filter for `mode` (None for `Off`).
pub fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let blocked = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed().into_iter().map(|nr| (nr, Vec::new())).collect();
    // fcntl only to read or set descriptor and status flags (std's
    // set_nonblocking, the vhost crate's CLOEXEC handling), and to seal the
    // in-flight memfd, read its seals and hand the frontend a duplicate.
    let fcntl_cmds = [
        libc::F_DUPFD_CLOEXEC,
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_ADD_SEALS,
        libc::F_GET_SEALS,
    ];
    rules.insert(
        libc::SYS_fcntl,
        fcntl_cmds
            .iter()
            .map(|&cmd| {
                SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    cmd as u64,
                )?])
            })
            .collect::<Result<_, _>>()?,
    );
    // ioctl only for FIONBIO (set_nonblocking on some paths).
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::FIONBIO,
        )?])?],
    );
    // setsockopt only for SO_RCVTIMEO: a frontend's partial message must
    // not hold up the message thread that serves the other connection
    // (serve.rs, MESSAGE_TIMEOUT).
    rules.insert(
        libc::SYS_setsockopt,
        vec![SeccompRule::new(vec![
            SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::SOL_SOCKET as u64,
            )?,
            SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::SO_RCVTIMEO as u64,
            )?,
        ])?],
    );
    let f = SeccompFilter::new(rules, blocked, SeccompAction::Allow, ARCH)?;
    Ok(Some(f.try_into()?))
}

/// Installs the filter on every thread of the process (TSYNC) and, for
/// `kill`, the SIGSYS handler that names a blocked call.
pub fn install(mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(prog) = filter(mode)? else {
        return Ok(());
    };
    if mode == SeccompMode::Kill {
        install_sigsys_handler()?;
    }
    // glibc's malloc, when it returns a thread's arena memory to the
    // kernel at thread exit, first reads /proc/sys/vm/overcommit_memory
    // (an openat the filter refuses). Never trimming arenas avoids it;
    // the daemon frees little, and its memory is bounded anyway.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a malloc tunable.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
    seccompiler::apply_filter_all_threads(&prog)?;
    Ok(())
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid start; the handler only uses
    // async-signal-safe calls (write, _exit).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The exit status after a blocked system call (128 + SIGSYS, as if the
/// signal had killed the process).
pub const BLOCKED_EXIT: i32 = 128 + libc::SIGSYS;

/// The siginfo of a seccomp SIGSYS (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    #[cfg(target_pointer_width = "64")]
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for a seccomp trap the kernel fills the _sigsys member,
    // laid out as SigsysInfo.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let name = usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name());
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut put = |b: &[u8]| {
        let n = b.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&b[..n]);
        len += n;
    };
    put(b"vhost-user-cow: seccomp: blocked system call ");
    put(name.as_bytes());
    put(b" (");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b"); the daemon ends (--seccomp log lets it through and logs it)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(BLOCKED_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_for_every_mode() {
        assert!(filter(SeccompMode::Off).unwrap().is_none());
        assert!(!filter(SeccompMode::Kill).unwrap().unwrap().is_empty());
        assert!(!filter(SeccompMode::Log).unwrap().unwrap().is_empty());
    }

    #[test]
    fn no_call_that_opens_a_path_or_makes_a_process_is_allowed() {
        let list = allowed();
        for nr in [
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ptrace,
        ] {
            assert!(!list.contains(&nr), "syscall {nr} allowed");
        }
    }
}
