//! I/O limits through the real socket: requests over a limit are delayed,
//! never failed, the daemon sleeps rather than spins while they wait, and
//! the control socket changes the limits of a serving daemon.
//!
//! The lower bounds on elapsed time below are the limits' own arithmetic
//! (a token bucket cannot admit faster than its rate), not performance
//! targets: a slow machine only makes them easier to meet.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user_cow::control::client::Client;
use vhost_user_cow::control::wire::ErrorClass;

use common::daemon::{Daemon, Peer, ServeOptions};
use common::disk_model::{make_cow, SECTOR};
use common::vhost_frontend::VhostUserBlk;

const SECTORS: u64 = 4096;

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    control: PathBuf,
}

fn start(args: &[&str]) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("vuc-throttle-")
        .tempdir()
        .unwrap();
    let (image, _) = make_cow(dir.path(), SECTORS, 5);
    let control = dir.path().join("control.sock");
    let mut extra_args = vec!["--control-socket".into(), control.display().to_string()];
    extra_args.extend(args.iter().map(|s| s.to_string()));
    let daemon = Daemon::start(
        Peer::Ours,
        dir.path(),
        &image,
        &ServeOptions {
            extra_args,
            ..ServeOptions::default()
        },
    );
    Setup {
        _dir: dir,
        daemon,
        control,
    }
}

/// `n` reads of `len` bytes, `depth` in flight at a time; all must succeed.
fn reads(dev: &mut VhostUserBlk, n: u64, len: usize, depth: usize) {
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        pending.push_back(dev.submit_read(0, (i * 8) % SECTORS, len));
        if pending.len() >= depth {
            let p = pending.pop_front().unwrap();
            dev.complete(p, "throttled read").ok("throttled read");
        }
    }
    for p in pending {
        dev.complete(p, "throttled read").ok("throttled read");
    }
}

/// User + system CPU time of a process.
fn cpu_time(pid: libc::pid_t) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

#[test]
fn requests_over_an_iops_limit_wait_and_the_daemon_sleeps_meanwhile() {
    let s = start(&["--throttle-iops", "50:5"]);
    let mut dev = s.daemon.connect();
    let cpu0 = cpu_time(s.daemon.pid());
    let t0 = Instant::now();
    // 5 at once (the burst), one more into debt, then 50 per second.
    reads(&mut dev, 100, SECTOR, 16);
    let elapsed = t0.elapsed();
    let cpu = cpu_time(s.daemon.pid()) - cpu0;
    assert!(
        elapsed >= Duration::from_millis(1800),
        "100 reads at 50 IOPS (burst 5) took only {elapsed:?}"
    );
    // It sleeps until the next request is due: well under 5% of a core.
    assert!(
        cpu.as_secs_f64() < 0.05 * elapsed.as_secs_f64(),
        "the throttled daemon used {cpu:?} of CPU in {elapsed:?}"
    );
    let mut c = Client::connect(&s.control, Some(Duration::from_secs(20))).unwrap();
    let stats = c.execute("query-stats", Value::Null).unwrap().unwrap();
    assert_eq!(stats["total"]["reads"], 100);
    assert_eq!(stats["total"]["errors"], 0);
}

#[test]
fn query_stats_counts_requests_held_back_by_a_limit_as_in_flight() {
    let s = start(&["--throttle-iops", "1:1"]);
    let mut dev = s.daemon.connect();
    let mut c = Client::connect(&s.control, Some(Duration::from_secs(20))).unwrap();
    let in_flight = |c: &mut Client| -> u64 {
        let stats = c.execute("query-stats", Value::Null).unwrap().unwrap();
        stats["total"]["in_flight"].as_u64().unwrap()
    };
    assert_eq!(in_flight(&mut c), 0, "before any request");
    // Six reads at 1 IOPS: the first goes at once, the others wait taken
    // (at most one more per second is admitted).
    let mut pending: Vec<_> = (0..6).map(|i| dev.submit_read(0, i * 8, SECTOR)).collect();
    let first = pending.remove(0);
    dev.complete(first, "first read").ok("first read");
    let held = in_flight(&mut c);
    assert!(
        (1..=5).contains(&held),
        "{held} requests in flight, 1 to 5 expected"
    );
    c.execute("set-throttle", json!({})).unwrap().unwrap();
    for p in pending {
        dev.complete(p, "read").ok("read");
    }
    let stats = c.execute("query-stats", Value::Null).unwrap().unwrap();
    assert_eq!(stats["total"]["in_flight"], 0, "{stats}");
    assert_eq!(stats["total"]["reads"], 6, "{stats}");
    assert_eq!(stats["queues"][0]["in_flight"], 0, "{stats}");
}

#[test]
fn a_bytes_per_second_limit_on_writes_leaves_reads_alone() {
    let s = start(&["--throttle-bps", "write=128K:16K"]);
    let mut dev = s.daemon.connect();
    // Reads are not limited: 200 of them at once go straight through (no
    // lower bound to check; they must simply all succeed).
    reads(&mut dev, 200, 4 * SECTOR, 32);
    let data = vec![0x3cu8; 16 << 10];
    let t0 = Instant::now();
    let pending: Vec<_> = (0..10)
        .map(|i| dev.submit_write(0, 64 * i, &data))
        .collect();
    for p in pending {
        dev.complete(p, "throttled write").ok("throttled write");
    }
    let elapsed = t0.elapsed();
    // 160 KiB at 128 KiB/s with 16 KiB of burst, the first two free.
    assert!(
        elapsed >= Duration::from_millis(900),
        "160 KiB of writes at 128 KiB/s took only {elapsed:?}"
    );
    for i in 0..10 {
        assert_eq!(dev.read(0, 64 * i, 16 << 10).ok("read back"), data);
    }
}

#[test]
fn set_throttle_changes_the_limits_of_a_serving_daemon() {
    let s = start(&[]);
    let mut c = Client::connect(&s.control, Some(Duration::from_secs(20))).unwrap();
    let none = c.execute("query-throttle", Value::Null).unwrap().unwrap();
    assert_eq!(none, json!({ "limits": [] }));
    let set = c
        .execute(
            "set-throttle",
            json!({ "iops-total": { "rate": 20, "burst": 1 }, "bps-read": "1M" }),
        )
        .unwrap()
        .unwrap();
    let limits = set["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 2, "{set}");
    let q = c.execute("query-throttle", Value::Null).unwrap().unwrap();
    assert_eq!(q, set);
    let mut dev = s.daemon.connect();
    let t0 = Instant::now();
    reads(&mut dev, 21, SECTOR, 8);
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "21 reads at 20 IOPS (burst 1) took only {elapsed:?}"
    );
    // No arguments: no limits.
    let off = c.execute("set-throttle", json!({})).unwrap().unwrap();
    assert_eq!(off, json!({ "limits": [] }));
    reads(&mut dev, 200, SECTOR, 32);

    for bad in [
        json!({ "iops": 5 }),
        json!({ "iops-read": 0 }),
        json!({ "iops-read": -3 }),
        json!({ "iops-read": "fast" }),
        json!({ "iops-read": { "rate": 5, "burst": 0 } }),
        json!({ "iops-read": { "rate": 5, "extra": 1 } }),
        json!({ "bps-write": [1] }),
    ] {
        let e = c.execute("set-throttle", bad.clone()).unwrap().unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidParameter, "{bad}: {}", e.desc);
    }
    // A refused change leaves the limits as they were.
    let q = c.execute("query-throttle", Value::Null).unwrap().unwrap();
    assert_eq!(q, json!({ "limits": [] }));
}

#[test]
fn bad_limits_on_the_command_line_are_usage_errors() {
    for args in [
        &["--throttle-iops", "lots"][..],
        &["--throttle-iops", "sideways=5"],
        &["--throttle-bps", "read=5:0"],
        &["--throttle-iops", "read=5", "--throttle-iops", "read=6"],
    ] {
        let out = common::output(
            Command::new(common::bin())
                .args([
                    "serve",
                    "--disk",
                    "/nonexistent",
                    "--socket-path",
                    "/nonexistent.sock",
                ])
                .args(args),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("throttle") || err.contains("limit"),
            "{args:?}: {err}"
        );
    }
}
