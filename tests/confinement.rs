//! The daemon confines itself once started (docs/design.md, "Trust
//! model"): a seccomp allow-list, no capabilities, no_new_privs, and a
//! sandbox in which host paths are gone. Each test here fails without the
//! part it is about.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::vhost_frontend::{FrontendOptions, VhostUserBlk};

const TIMEOUT: Duration = Duration::from_secs(20);

struct Served {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most TIMEOUT) until the log holds `text`; the log so far.
    fn wait_log(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.contains(text) || start.elapsed() > TIMEOUT {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit (at most TIMEOUT).
    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "daemon did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    disk
}

/// Starts `serve` on a raw image in `dir` with `args` and `env`, as `uid`
/// if given, and waits until it listens or exits.
fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)], uid: Option<u32>) -> Served {
    let socket = dir.join("s.sock");
    let log = dir.join("daemon.log");
    let mut cmd = Command::new(common::bin());
    cmd.arg("serve")
        .arg("--socket-path")
        .arg(&socket)
        .arg("--disk")
        .arg(dir.join("disk.img"))
        .args(["--format", "raw", "--num-queues", "1"])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let child = {
        let _g = common::fork_guard();
        cmd.spawn().unwrap()
    };
    let mut s = Served { child, socket, log };
    // The startup line comes once the daemon is confined (the socket
    // listens before that).
    let start = Instant::now();
    while !s.log().contains("serving ") || UnixStream::connect(&s.socket).is_err() {
        if s.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "daemon not serving:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    s
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e} (the daemon exited?)"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vuc-confine-")
        .tempdir()
        .unwrap()
}

#[test]
fn a_serving_daemon_has_the_filter_no_capabilities_and_no_new_privs() {
    let dir = tempdir();
    raw_disk(dir.path());
    let mut d = serve(dir.path(), &[], &[], None);
    let pid = d.pid();
    assert_eq!(status_field(pid, "Seccomp"), "2", "{}", d.log());
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for caps in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    // It serves all the same.
    let mut dev = VhostUserBlk::connect(&d.socket, FrontendOptions::default()).unwrap();
    dev.write(0, 8, &[7u8; 512]).ok("write under confinement");
    assert_eq!(
        dev.read(0, 8, 512).ok("read under confinement"),
        vec![7u8; 512]
    );
    drop(dev);
    assert!(d.terminate().success(), "{}", d.log());
    assert!(!d.socket.exists(), "socket left behind");

    // Without confinement the same fields say so: the check above can fail.
    let mut d = serve(
        dir.path(),
        &["--seccomp", "off", "--sandbox", "none"],
        &[],
        None,
    );
    assert_eq!(status_field(d.pid(), "Seccomp"), "0");
    assert!(d.terminate().success(), "{}", d.log());
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs --features test-hooks")]
fn a_blocked_system_call_ends_the_daemon_with_one_line_naming_it() {
    let dir = tempdir();
    raw_disk(dir.path());
    // The hook opens a file once confined: openat is not on the list.
    let mut d = serve(dir.path(), &[], &[("VUC_TEST_OPEN", "/etc/passwd")], None);
    let st = d.wait();
    assert_eq!(st.code(), Some(128 + libc::SIGSYS), "{st:?}\n{}", d.log());
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("seccomp:")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("blocked system call openat"), "{log}");

    // --seccomp log lets it through.
    let mut d = serve(
        dir.path(),
        &["--seccomp", "log", "--sandbox", "none"],
        &[("VUC_TEST_OPEN", "/etc/passwd")],
        None,
    );
    let log = d.wait_log("test hook: opened /etc/passwd");
    assert!(log.contains("test hook: opened /etc/passwd"), "{log}");
    assert!(d.terminate().success());
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs --features test-hooks")]
fn the_namespace_sandbox_hides_host_paths() {
    let dir = tempdir();
    raw_disk(dir.path());
    let hook = [("VUC_TEST_OPEN", "/etc/passwd")];
    let mut d = serve(
        dir.path(),
        &["--seccomp", "off", "--sandbox", "namespace"],
        &hook,
        None,
    );
    let log = d.wait_log("test hook: open /etc/passwd");
    assert!(
        log.contains("test hook: open /etc/passwd: No such file or directory"),
        "{log}"
    );
    assert!(d.terminate().success(), "{}", d.log());
    assert!(
        !d.socket.exists(),
        "socket left behind (removed through a directory fd)"
    );
    // Without the sandbox the same hook opens it: the check can fail.
    let mut d = serve(
        dir.path(),
        &["--seccomp", "off", "--sandbox", "none"],
        &hook,
        None,
    );
    let log = d.wait_log("test hook: opened /etc/passwd");
    assert!(log.contains("test hook: opened /etc/passwd"), "{log}");
    assert!(d.terminate().success());
}

/// As an ordinary user who owns the files and the socket directory, with
/// the default confinement (a user namespace makes the mount namespace).
#[test]
fn serves_as_an_unprivileged_user() {
    let dir = tempdir();
    raw_disk(dir.path());
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let uid = if root {
        let nobody = 65534;
        for p in [dir.path().to_owned(), dir.path().join("disk.img")] {
            std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Some(nobody)
    } else {
        None
    };
    let mut d = serve(dir.path(), &[], &[], uid);
    assert!(d.log().contains("sandbox namespace"), "{}", d.log());
    assert_eq!(status_field(d.pid(), "Seccomp"), "2");
    // The test (root) connects to the user's socket.
    let mut dev = VhostUserBlk::connect(&d.socket, FrontendOptions::default()).unwrap();
    dev.write(0, 0, &[9u8; 512]).ok("write as an ordinary user");
    assert_eq!(dev.read(0, 0, 512).ok("read back"), vec![9u8; 512]);
    drop(dev);
    assert!(d.terminate().success(), "{}", d.log());
    assert!(!d.socket.exists(), "socket left behind");
    // chroot needs root: an ordinary user is refused, naming the way out.
    if root {
        let mut d = serve(dir.path(), &["--sandbox", "chroot"], &[], uid);
        let st = d.wait();
        assert_eq!(st.code(), Some(1), "{}", d.log());
        assert!(d.log().contains("--sandbox none"), "{}", d.log());
        assert!(!d.socket.exists(), "socket left behind");
    }
}

#[test]
fn the_chroot_sandbox_serves_as_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: --sandbox chroot needs root");
        return;
    }
    let dir = tempdir();
    raw_disk(dir.path());
    let mut d = serve(dir.path(), &["--sandbox", "chroot"], &[], None);
    assert!(d.log().contains("sandbox chroot"), "{}", d.log());
    let root = std::fs::read_link(format!("/proc/{}/root", d.pid())).unwrap();
    assert!(
        root.to_string_lossy().contains("(deleted)"),
        "root is {}",
        root.display()
    );
    let mut dev = VhostUserBlk::connect(&d.socket, FrontendOptions::default()).unwrap();
    dev.write(0, 3, &[5u8; 512]).ok("write in the chroot");
    drop(dev);
    assert!(d.terminate().success(), "{}", d.log());
    assert!(!d.socket.exists(), "socket left behind");
}
