//! One process serving several disks (`serve --export`, docs/design.md
//! "Several disks in one process"): each export keeps its own data,
//! sockets and frontends; a frontend misbehaving on one costs only its own
//! connection; the command line refuses what it cannot serve, naming why.

mod common;

use std::path::{Path, PathBuf};

use common::daemon::{Daemon, Image, Peer, ServeOptions};
use common::vhost_frontend::*;

struct Two {
    d: Daemon,
    a: PathBuf,
    b: PathBuf,
    b_sock: PathBuf,
    b_ctl: PathBuf,
}

/// A daemon serving raw image `a.img` (its --disk) and COW file `b.cow`
/// over `base.img` (an --export with a control socket).
fn two(dir: &Path) -> Two {
    let a = dir.join("a.img");
    std::fs::write(&a, vec![0x11u8; 1 << 20]).unwrap();
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x22u8; 1 << 20]).unwrap();
    let b = dir.join("b.cow");
    common::disk_model::create_cow(&b, &base, 512);
    let (b_sock, b_ctl) = (dir.join("b.sock"), dir.join("b.ctl"));
    let opts = ServeOptions {
        extra_args: vec![
            "--export".into(),
            format!(
                "disk={},socket={},format=cow,control={}",
                b.display(),
                b_sock.display(),
                b_ctl.display()
            ),
        ],
        ..ServeOptions::default()
    };
    let d = Daemon::start(Peer::Ours, dir, &Image::Raw(a.clone()), &opts);
    Two {
        d,
        a,
        b,
        b_sock,
        b_ctl,
    }
}

fn connect_b(t: &Two) -> VhostUserBlk {
    let mut dev = VhostUserBlk::connect(&t.b_sock, FrontendOptions::default())
        .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", t.b_sock.display(), t.d.log_text()));
    dev.set_daemon_log(&t.d.log_path());
    dev
}

#[test]
fn each_export_serves_its_own_disk_and_all_leave_cleanly() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-multi-")
        .tempdir()
        .unwrap();
    let t = two(dir.path());
    let mut a = t.d.connect();
    let mut b = connect_b(&t);
    assert_eq!(a.read(0, 0, 512).ok("read a"), vec![0x11u8; 512]);
    assert_eq!(b.read(0, 0, 512).ok("read b"), vec![0x22u8; 512]);
    a.write(0, 8, &[0xaau8; 4096]).ok("write a");
    b.write(0, 8, &[0xbbu8; 4096]).ok("write b");
    assert_eq!(a.read(0, 8, 4096).ok("read a back"), vec![0xaau8; 4096]);
    assert_eq!(b.read(0, 8, 4096).ok("read b back"), vec![0xbbu8; 4096]);
    // Both frontends at once, on their own queue threads.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..50u8 {
                a.write(0, 64 + u64::from(i) * 8, &[i; 4096])
                    .ok("a in parallel");
            }
        });
        s.spawn(|| {
            for i in 0..50u8 {
                b.write(0, 64 + u64::from(i) * 8, &[!i; 4096])
                    .ok("b in parallel");
            }
        });
    });
    for i in 0..50u8 {
        assert_eq!(
            a.read(0, 64 + u64::from(i) * 8, 4096).ok("a"),
            vec![i; 4096]
        );
        assert_eq!(
            b.read(0, 64 + u64::from(i) * 8, 4096).ok("b"),
            vec![!i; 4096]
        );
    }
    // The control socket is b's.
    let out = common::output(
        std::process::Command::new(common::bin())
            .arg("ctl")
            .arg(&t.b_ctl)
            .arg("query-disk")
            .arg("--json"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("b.cow") && !text.contains("a.img"), "{text}");
    drop((a, b));

    let log = t.d.log_text();
    assert!(log.contains("a.img: serving "), "{log}");
    assert!(log.contains("b.cow: serving "), "{log}");
    let (a_path, b_path, b_sock, b_ctl) = (t.a.clone(), t.b.clone(), t.b_sock, t.b_ctl);
    let a_sock = t.d.socket().to_owned();
    let st = t.d.terminate_ok();
    for s in [&a_sock, &b_sock, &b_ctl] {
        assert!(!s.exists(), "{} left behind", s.display());
    }
    // The raw image holds a's writes; b's went to its COW file, checked
    // clean, and its backing file kept its bytes.
    let raw = std::fs::read(&a_path).unwrap();
    assert_eq!(&raw[8 * 512..9 * 512], &[0xaau8; 512][..]);
    assert_eq!(&raw[0..512], &[0x11u8; 512][..]);
    assert_eq!(
        std::fs::read(dir.path().join("base.img")).unwrap(),
        vec![0x22u8; 1 << 20]
    );
    let out = common::output(
        std::process::Command::new(common::bin())
            .arg("check")
            .arg(&b_path),
    );
    assert!(out.status.success(), "check {}: {out:?}", b_path.display());
    assert!(st.log.contains("a.img: write path counters"), "{}", st.log);
    assert!(st.log.contains("b.cow: write path counters"), "{}", st.log);
}

/// A frontend that truncates its guest memory ends its own connection;
/// the other export's frontend is not disturbed.
#[test]
fn a_truncation_ends_only_the_connection_that_made_it() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-multi-trunc-")
        .tempdir()
        .unwrap();
    let mut t = two(dir.path());
    let mut a = t.d.connect();
    let mut b = connect_b(&t);
    a.write(0, 0, &[1u8; 512]).ok("a before");
    b.write(0, 0, &[2u8; 512]).ok("b before");
    a.read_over_truncated_memory();
    std::mem::forget(a); // its mapping is partly gone: do not touch it again
    assert!(t.d.running(), "the daemon died:\n{}", t.d.log_text());
    t.d.wait_log_count("ending its connection", 1);
    // b's connection is the same one as before and still served.
    assert_eq!(b.read(0, 0, 512).ok("b after"), vec![2u8; 512]);
    b.write(0, 8, &[3u8; 512]).ok("b writes after");
    let log = t.d.log_text();
    assert!(
        log.contains("a.img: a frontend truncated a guest memory file"),
        "{log}"
    );
    // b's lines are counted apart from a's (none held back by a's).
    assert!(log.contains("b.cow: frontend connected"), "{log}");
    assert!(!log.contains("b.cow: frontend disconnected"), "{log}");
    // a's next frontend is served.
    let mut a = t.d.connect();
    assert_eq!(a.read(0, 0, 512).ok("a after reconnecting"), vec![1u8; 512]);
    drop((a, b));
    t.d.terminate_ok();
}

fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let out = common::output(
        std::process::Command::new(common::bin())
            .arg("serve")
            .args(args)
            .current_dir(dir),
    );
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} was served:\n{msg}");
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{args:?} left sockets {left:?}:\n{msg}");
    msg
}

#[test]
fn the_command_line_refuses_what_it_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("b.img"), vec![0u8; 1 << 20]).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--export", "disk=a.img"], "socket=PATH is missing"),
        (&["--export", "socket=a.sock"], "disk=FILE is missing"),
        (
            &["--export", "disk=a.img,socket=a.sock,size=1"],
            "unknown key \"size\"",
        ),
        (
            &["--export", "disk=a.img,socket=a.sock,disk=b.img"],
            "disk given twice",
        ),
        (
            &["--export", "disk=a.img,socket=a.sock,format=qcow2"],
            "format=qcow2: cow or raw",
        ),
        (
            &["--export", "disk=a.img,socket=a.sock", "--serial", "x"],
            "--serial belongs to --disk",
        ),
        (
            &[
                "--export",
                "disk=a.img,socket=a.sock,format=raw",
                "--export",
                "disk=b.img,socket=a.sock,format=raw",
            ],
            "a daemon is already listening on this socket",
        ),
        (
            &[
                "--export",
                "disk=a.img,socket=a.sock,format=raw",
                "--export",
                "disk=a.img,socket=b.sock,format=raw",
            ],
            "a.img",
        ),
        (
            &[
                "--export",
                "disk=a.img,socket=a.sock,format=raw",
                "--export",
                "disk=missing.img,socket=b.sock,format=raw",
            ],
            "missing.img",
        ),
    ];
    for (args, want) in cases {
        let msg = serve_fails(d, args);
        assert!(msg.contains(want), "{args:?}: want {want:?} in:\n{msg}");
    }
}
