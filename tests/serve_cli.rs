//! The daemon's command line and life cycle as a user meets them: the
//! socket's permissions, refusing a second daemon, socket activation,
//! capabilities, and clear errors.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-cow"))
}

fn disk(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.img");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let cow = dir.join("disk.cow");
    let st = bin()
        .arg("create")
        .arg(&cow)
        .arg("--backing")
        .arg(&base)
        .status()
        .unwrap();
    assert!(st.success());
    cow
}

fn wait_listening(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited early: {st}");
        }
        assert!(Instant::now() < deadline, "daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(sock: &Path, cow: &Path, extra: &[&str]) -> Child {
    let _guard = common::fork_guard();
    bin()
        .arg("serve")
        .arg("--socket-path")
        .arg(sock)
        .arg("--disk")
        .arg(cow)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) -> Output {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn run(args: &[&str], sock: &Path, cow: &Path) -> Output {
    common::output(
        bin()
            .arg("serve")
            .arg("--socket-path")
            .arg(sock)
            .arg("--disk")
            .arg(cow)
            .args(args),
    )
}

#[test]
fn socket_is_private_and_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let cow = disk(dir.path());
    let sock = dir.path().join("s.sock");
    let mut d = serve(&sock, &cow, &[]);
    wait_listening(&sock, &mut d);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = stop(d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists(), "socket left behind");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("serving"), "no startup line: {log}");
    assert!(
        log.contains("write path counters"),
        "no counters at exit: {log}"
    );

    let mut d = serve(&sock, &cow, &["--socket-mode", "660"]);
    wait_listening(&sock, &mut d);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert!(stop(d).status.success());
}

#[test]
fn second_daemon_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cow = disk(dir.path());
    let sock = dir.path().join("s.sock");
    let mut d = serve(&sock, &cow, &[]);
    wait_listening(&sock, &mut d);

    // Same COW file, other socket: the lock names the first daemon.
    let other = run(&[], &dir.path().join("other.sock"), &cow);
    assert!(!other.status.success());
    let msg = String::from_utf8_lossy(&other.stderr);
    assert!(
        msg.contains(&format!("in use by process {}", d.id())) && msg.contains("disk.cow"),
        "{msg}"
    );
    assert!(!dir.path().join("other.sock").exists());

    // Same socket, other disk: the live socket is not taken over.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let same = run(&[], &sock, &raw);
    assert!(!same.status.success());
    let msg = String::from_utf8_lossy(&same.stderr);
    assert!(
        msg.contains("already listening") && msg.contains("s.sock"),
        "{msg}"
    );

    assert!(stop(d).status.success());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cow = disk(dir.path());
    let sock = dir.path().join("s.sock");
    drop(UnixListener::bind(&sock).unwrap()); // nobody listens on it now
    let mut d = serve(&sock, &cow, &[]);
    wait_listening(&sock, &mut d);
    assert!(stop(d).status.success());
}

#[test]
fn serves_an_inherited_listening_socket() {
    let dir = tempfile::tempdir().unwrap();
    let cow = disk(dir.path());
    let sock = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.into_raw_fd();
    // Let the child inherit it, as systemd would.
    // SAFETY: fcntl on our own fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let mut d = {
        let _guard = common::fork_guard();
        bin()
            .args(["serve", "--fd", &fd.to_string(), "--disk"])
            .arg(&cow)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // SAFETY: the child has its copy; ours is closed.
    unsafe { libc::close(fd) };
    // The socket listens from the start; the startup line says the daemon
    // itself is ready.
    let stderr = d.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    while !log.contains("serving") {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no startup line: {log}"));
        log.push_str(&line);
    }
    assert!(log.contains(&format!("fd {fd}")), "{log}");
    drop(UnixStream::connect(&sock).unwrap());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let st = d.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn capabilities_and_usage_errors() {
    let out = bin()
        .args(["serve", "--print-capabilities"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "block");
    assert!(v["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "read-only"));

    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["serve", "--disk"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    // Usage errors exit 2, as the README promises.
    assert_eq!(out.status.code(), Some(2), "serve without a socket");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket-path"));
    for args in [
        &["serve", "--socket-path", "/tmp/x.sock"][..],
        &[
            "serve",
            "--socket-path",
            "/tmp/x.sock",
            "--disk",
            "d",
            "--num-queues",
            "0",
        ][..],
        &[
            "serve",
            "--socket-path",
            "/tmp/x.sock",
            "--disk",
            "d",
            "--queue-size",
            "1000",
        ][..],
    ] {
        let out = bin().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let missing = run(
        &[],
        &dir.path().join("s.sock"),
        &dir.path().join("missing.cow"),
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("missing.cow"));
}

#[test]
fn create_at_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let cow = dir.path().join("new.cow");
    let sock = dir.path().join("s.sock");
    let mut d = serve(
        &sock,
        &cow,
        &["--create", "--backing", base.to_str().unwrap()],
    );
    wait_listening(&sock, &mut d);
    assert!(stop(d).status.success());
    let st = bin().arg("check").arg(&cow).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
}

#[test]
fn format_option_is_checked_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    // A raw image named as COW is refused, naming the file and the problem.
    let o = run(&["--format", "cow"], &sock, &raw);
    assert_eq!(o.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        msg.contains("raw.img") && msg.contains("not a COW file"),
        "{msg}"
    );
    assert!(!sock.exists());
    // --raw is --format raw: naming both is a usage error.
    let o = run(&["--format", "cow", "--raw"], &sock, &raw);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A COW file named as COW starts, and says nothing of guessing.
    let cow = disk(dir.path());
    let mut d = serve(&sock, &cow, &["--format", "cow"]);
    wait_listening(&sock, &mut d);
    let out = stop(d);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("format guessed"), "{log}");
}

/// Whatever makes `serve` fail after it has started (here: running out of
/// file descriptors at every point of its start-up in turn), it never
/// leaves its socket behind and says why. (The socket used to stay when
/// the per-connection engines could not be made after the bind.)
#[test]
fn a_failing_start_leaves_no_socket() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let cow = disk(dir.path());
    let mut failed = 0;
    for limit in 8..48u64 {
        let sock = dir.path().join(format!("s{limit}.sock"));
        let mut cmd = bin();
        cmd.args([
            "serve",
            "--threads",
            "2",
            "--num-queues",
            "2",
            "--socket-path",
        ])
        .arg(&sock)
        .arg("--disk")
        .arg(&cow)
        .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; it runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        let mut child = {
            let _guard = common::fork_guard();
            cmd.spawn().unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if UnixStream::connect(&sock).is_ok() {
                break None;
            }
            assert!(
                Instant::now() < deadline,
                "fd limit {limit}: neither listening nor exited"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        match exited {
            Some(st) => {
                let out = child.wait_with_output().unwrap();
                let msg = String::from_utf8_lossy(&out.stderr);
                assert!(!st.success(), "fd limit {limit}: exit 0 without serving");
                assert!(
                    !sock.exists(),
                    "fd limit {limit}: failed ({st}) and left its socket behind:\n{msg}"
                );
                assert!(msg.contains("vhost-user-cow: "), "fd limit {limit}: {msg}");
                failed += 1;
            }
            None => {
                // Listening; our probe connection may already have made it
                // run out (accept fails), which ends it with a message.
                let out = stop(child);
                let msg = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success() || msg.contains("vhost-user-cow: "),
                    "fd limit {limit}: {:?}\n{msg}",
                    out.status
                );
                assert!(
                    !sock.exists(),
                    "fd limit {limit}: socket left behind:\n{msg}"
                );
            }
        }
    }
    assert!(
        failed > 0,
        "no fd limit made serve fail: the test proves nothing"
    );
}
