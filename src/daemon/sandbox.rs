//! Confining the daemon's view of the filesystem and its privileges, in
//! virtiofsd's manner. Entered once the disk files are open and the socket
//! is bound, while the process is still single-threaded (a user namespace
//! cannot be entered by a multi-threaded process); the seccomp filter
//! (`seccomp.rs`) comes after the threads exist.
//!
//! - `namespace` (the default): a new mount namespace (and, for an
//!   ordinary user, a user namespace first, mapping the user to itself)
//!   whose root is an empty read-only tmpfs: no host path can be opened,
//!   the open files keep working.
//! - `chroot`: root only; the root becomes an empty directory that is
//!   removed at once, so nothing can be created in it either.
//! - `none`: the filesystem stays visible.
//!
//! Whatever the mode: `no_new_privs`, and every capability dropped
//! (bounding, ambient, inheritable, permitted, effective) once the
//! namespace is set up: serving needs none.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    #[default]
    Namespace,
    Chroot,
    None,
}

impl SandboxMode {
    pub fn name(self) -> &'static str {
        match self {
            SandboxMode::Namespace => "namespace",
            SandboxMode::Chroot => "chroot",
            SandboxMode::None => "none",
        }
    }
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("cannot set up the {mode} sandbox: {step}: {source} (start with --sandbox none to serve without it)")]
    Setup {
        mode: &'static str,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot drop privileges: {0}")]
    Privileges(String),
}

/// The socket's directory, kept open so the socket can be removed at exit
/// when its path is no longer visible.
pub struct SocketDir {
    dir: OwnedFd,
    name: CString,
}

impl SocketDir {
    pub fn open(socket: &Path) -> io::Result<SocketDir> {
        let parent = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir = File::open(&parent)?;
        let name = socket.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name")
        })?;
        Ok(SocketDir {
            dir: dir.into(),
            name: CString::new(name.as_bytes())?,
        })
    }

    /// Removes the socket (through the directory fd).
    pub fn remove(&self) {
        // SAFETY: a valid directory fd and NUL-terminated name.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

fn setup_err(mode: SandboxMode, step: &'static str) -> impl FnOnce(io::Error) -> SandboxError {
    move |source| SandboxError::Setup {
        mode: mode.name(),
        step,
        source,
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a constant")
}

/// Enters `mode`. Must run before any thread is started.
pub fn enter(mode: SandboxMode) -> Result<(), SandboxError> {
    match mode {
        SandboxMode::None => Ok(()),
        SandboxMode::Namespace => enter_namespace(mode),
        SandboxMode::Chroot => enter_chroot(mode),
    }
}

fn write_proc(path: &str, text: &str) -> io::Result<()> {
    std::fs::write(path, text)
}

fn enter_namespace(mode: SandboxMode) -> Result<(), SandboxError> {
    // SAFETY: plain system calls on our own process.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        // SAFETY: as above.
        check(unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) })
            .map_err(setup_err(mode, "unshare(user and mount namespaces)"))?;
        write_proc("/proc/self/setgroups", "deny")
            .map_err(setup_err(mode, "write /proc/self/setgroups"))?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))
            .map_err(setup_err(mode, "write /proc/self/uid_map"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))
            .map_err(setup_err(mode, "write /proc/self/gid_map"))?;
    } else {
        // SAFETY: as above.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })
            .map_err(setup_err(mode, "unshare(mount namespace)"))?;
    }
    let none = std::ptr::null();
    // Nothing we do below may propagate back to the host.
    // SAFETY: valid NUL-terminated strings or nulls, as mount(2) wants.
    check(unsafe {
        libc::mount(
            none,
            cstr("/").as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
    .map_err(setup_err(mode, "make / private"))?;
    // An empty tmpfs over /tmp (any existing directory would do) becomes
    // the new root.
    let new_root = cstr("/tmp");
    // SAFETY: as above.
    check(unsafe {
        libc::mount(
            cstr("vhost-user-cow").as_ptr(),
            new_root.as_ptr(),
            cstr("tmpfs").as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            cstr("size=16k,mode=0755").as_ptr().cast(),
        )
    })
    .map_err(setup_err(mode, "mount an empty tmpfs"))?;
    std::fs::create_dir("/tmp/old").map_err(setup_err(mode, "mkdir the old root's mount point"))?;
    // SAFETY: pivot_root has no libc wrapper; both paths are valid.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pivot_root,
            new_root.as_ptr(),
            cstr("/tmp/old").as_ptr(),
        )
    };
    check(if rc == 0 { 0 } else { -1 }).map_err(setup_err(mode, "pivot_root"))?;
    std::env::set_current_dir("/").map_err(setup_err(mode, "chdir /"))?;
    // SAFETY: as above.
    check(unsafe { libc::umount2(cstr("/old").as_ptr(), libc::MNT_DETACH) })
        .map_err(setup_err(mode, "unmount the old root"))?;
    std::fs::remove_dir("/old").map_err(setup_err(mode, "remove the old root's mount point"))?;
    // SAFETY: as above; remounting our own tmpfs read-only.
    check(unsafe {
        libc::mount(
            none,
            cstr("/").as_ptr(),
            none,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })
    .map_err(setup_err(mode, "make the new root read-only"))?;
    Ok(())
}

fn enter_chroot(mode: SandboxMode) -> Result<(), SandboxError> {
    let tmp = File::open("/tmp").map_err(setup_err(mode, "open /tmp"))?;
    let mut template = cstr("/tmp/vhost-user-cow-root.XXXXXX").into_bytes_with_nul();
    // SAFETY: a writable NUL-terminated template, as mkdtemp wants.
    if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
        return Err(setup_err(mode, "make an empty directory")(
            io::Error::last_os_error(),
        ));
    }
    template.pop();
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&template));
    let name = CString::new(dir.file_name().unwrap_or_default().as_bytes())
        .expect("mkdtemp names have no NUL");
    let entered = (|| {
        std::env::set_current_dir(&dir).map_err(setup_err(mode, "chdir into it"))?;
        // SAFETY: chroot to the current directory.
        check(unsafe { libc::chroot(cstr(".").as_ptr()) })
            .map_err(setup_err(mode, "chroot (needs root)"))?;
        std::env::set_current_dir("/").map_err(setup_err(mode, "chdir /"))
    })();
    // Removed through the fd of /tmp (its path is not visible from inside
    // any more): the root stays, deleted, so nothing can be created in it.
    // SAFETY: a valid directory fd and NUL-terminated name.
    unsafe { libc::unlinkat(tmp.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
    entered
}

/// `no_new_privs` and every capability dropped.
pub fn drop_privileges() -> Result<(), SandboxError> {
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Privileges(format!(
            "no_new_privs: {}",
            io::Error::last_os_error()
        )));
    }
    use caps::{CapSet, Capability};
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // the clears below take away.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in caps::all() {
            let _ = caps::drop(None, CapSet::Bounding, c);
        }
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set)
            .map_err(|e| SandboxError::Privileges(format!("clear {set:?} capabilities: {e}")))?;
    }
    Ok(())
}
