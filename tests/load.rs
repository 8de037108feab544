//! The daemon under the load generator (libblkio's vhost-user driver, no
//! VM): backpressure with more requests in flight than the daemon takes,
//! and a stamped data check of first writes on two queues across a daemon
//! restart.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "../load/test-support/clients.rs"]
mod clients;
mod common;

use common::daemon::{Daemon, Image, Peer, ServeOptions};
use vhost_user_cow::units::to_usize;

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-user-cow");

fn serve(dir: &Path, image: &Image, num_queues: u16, extra: &[&str]) -> Daemon {
    let opts = ServeOptions {
        num_queues,
        extra_args: extra.iter().map(|a| a.to_string()).collect(),
        ..ServeOptions::default()
    };
    Daemon::start(Peer::Ours, dir, image, &opts)
}

/// SIGTERM; returns the daemon's log after checking it exited 0 and
/// removed its socket.
fn stop(d: Daemon) -> String {
    let st = d.terminate();
    assert!(
        st.status.success(),
        "daemon exit {:?}: {}",
        st.status,
        st.log
    );
    assert!(!st.socket.exists(), "socket left behind");
    st.log
}

/// Runs the load generator with `--json` and returns its report.
fn load(sock: &Path, args: &[&str]) -> serde_json::Value {
    let child = Command::new(clients::client_bin("vhost-user-cow-load"))
        .arg("--socket")
        .arg(sock)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn load generator");
    // The generator reports a backend that completes nothing for 10 s as
    // stalled and exits; this bounds the rest (a hung handshake).
    let out = clients::wait_output(child, Duration::from_secs(60), "load generator")
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load generator {args:?}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("JSON report")
}

fn image(path: &Path, size: u64, seed: u64) {
    let mut data = vec![0u8; to_usize(size)];
    let mut x = seed | 1;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    std::fs::write(path, data).unwrap();
}

/// The tests run the load generator of the current sources, never one left
/// in the target directory by an earlier build.
#[test]
fn load_generator_is_built_from_current_sources() {
    let bin = clients::client_bin("vhost-user-cow-load");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("load/src");
    for module in ["main.rs", "driver.rs", "workload.rs"] {
        clients::assert_built_from(&bin, &src.join(module));
    }
}

/// More requests in flight than the daemon takes off the ring
/// (2 x --queue-depth): the rest must stay in the avail ring and be taken
/// as completions free room, not forgotten (this used to hang).
#[test]
fn backpressure_does_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("raw.img");
    image(&img, 8 << 20, 3);
    for engine in ["io_uring", "threads"] {
        let d = serve(
            dir.path(),
            &Image::Raw(img.clone()),
            2,
            &["--queue-depth", "2", "--io-engine", engine],
        );
        let sock = d.socket().to_owned();
        for pattern in ["randread", "randwrite"] {
            let r = load(
                &sock,
                &[
                    "--pattern",
                    pattern,
                    "--iodepth",
                    "32",
                    "--queues",
                    "2",
                    "--runtime",
                    "0.3",
                ],
            );
            assert_eq!(r["errors"], 0, "{engine} {pattern}: {r}");
            assert!(r["ios"].as_u64().unwrap() > 1000, "{engine} {pattern}: {r}");
        }
        stop(d);
    }
}

/// Stamped 1 KiB first writes in random order on two queues (requests
/// share bitmap bytes, so bitmap writes wait on each other), a fresh daemon
/// reads every sector back, and `check` finds the file clean.
#[test]
fn cow_first_writes_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let cow = dir.path().join("disk.cow");
    image(&base, 4 << 20, 5);
    let st = Command::new(DAEMON)
        .args(["create", cow.to_str().unwrap(), "--backing"])
        .arg(&base)
        .status()
        .unwrap();
    assert!(st.success());
    let files = Image::Cow {
        cow: cow.clone(),
        backing: base.clone(),
    };
    let d = serve(dir.path(), &files, 2, &[]);
    let sock = d.socket().to_owned();
    let r = load(
        &sock,
        &[
            "--pattern",
            "randwrite",
            "--bs",
            "1k",
            "--iodepth",
            "32",
            "--queues",
            "2",
            "--random-map",
            "--once",
            "--stamp",
            "77",
            "--runtime",
            "30",
        ],
    );
    assert_eq!(r["errors"], 0, "{r}");
    let log = stop(d);
    assert!(log.contains("\"bitmap_writes_issued\""), "{log}");

    let d = serve(dir.path(), &files, 2, &[]);
    let sock = d.socket().to_owned();
    for args in [
        &[
            "--pattern",
            "read",
            "--bs",
            "64k",
            "--once",
            "--iodepth",
            "4",
        ][..],
        &["--pattern", "randread", "--bs", "4k", "--runtime", "0.2"][..],
    ] {
        let mut a = args.to_vec();
        a.extend(["--queues", "2", "--check", "77"]);
        let r = load(&sock, &a);
        assert_eq!(r["errors"], 0, "{args:?}: {r}");
        assert!(r["ios"].as_u64().unwrap() > 0);
    }
    stop(d);
    let out = Command::new(DAEMON)
        .arg("check")
        .arg(&cow)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
