//! The control socket through its real unix socket: every command, the
//! event stream, malformed and hostile clients, many clients at once, and
//! the `ctl` client's output.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vhost_user_cow::control::client::Client;
use vhost_user_cow::control::wire::ErrorClass;

use common::daemon::{Daemon, Peer, ServeOptions};
use common::disk_model::{make_cow, SECTOR};

/// How long any answer or event may take.
const TIMEOUT: Duration = Duration::from_secs(20);
const SECTORS: u64 = 4096;

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    control: PathBuf,
}

fn start(num_queues: u16) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("vuc-control-")
        .tempdir()
        .unwrap();
    let (image, _) = make_cow(dir.path(), SECTORS, 3);
    let control = dir.path().join("control.sock");
    let daemon = Daemon::start(
        Peer::Ours,
        dir.path(),
        &image,
        &ServeOptions {
            num_queues,
            extra_args: vec!["--control-socket".into(), control.display().to_string()],
            ..ServeOptions::default()
        },
    );
    Setup {
        _dir: dir,
        daemon,
        control,
    }
}

fn client(s: &Setup) -> Client {
    Client::connect(&s.control, Some(TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.daemon.log_text()))
}

fn run(c: &mut Client, name: &str) -> Value {
    c.execute(name, Value::Null)
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

#[test]
fn query_commands_lists_every_command() {
    let s = start(1);
    let mut c = client(&s);
    assert_eq!(c.greeting["capabilities"], json!(["events"]));
    let list = run(&mut c, "query-commands");
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "query-commands",
        "query-connection",
        "query-disk",
        "query-stats",
        "subscribe-events",
        "backup",
        "query-jobs",
        "cancel-job",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for c in list.as_array().unwrap() {
        assert!(!c["help"].as_str().unwrap().is_empty(), "{c}");
    }
}

#[test]
fn query_disk_and_stats_follow_the_guests_io() {
    let s = start(2);
    let mut c = client(&s);
    let disk = run(&mut c, "query-disk");
    assert_eq!(disk["format"], "cow");
    assert_eq!(disk["sectors"], SECTORS);
    assert_eq!(disk["virtual_size"], SECTORS * 512);
    assert_eq!(disk["cow"]["version"], "v3");
    assert_eq!(disk["cow"]["chunk_size"], 512);
    assert_eq!(disk["cow"]["chunks"], SECTORS);
    assert_eq!(disk["cow"]["allocated_chunks"], 0);
    assert_eq!(disk["cow"]["backing"]["size_matches"], true);
    assert_eq!(disk["cow"]["backing"]["mtime_checked"], true);
    let backing = disk["cow"]["backing"]["path"].as_str().unwrap();
    assert!(backing.ends_with("backing.img"), "{backing}");

    let mut dev = s.daemon.connect();
    let data = vec![0xa5u8; 8 * SECTOR];
    for i in 0..5 {
        dev.write(0, 100 + 8 * i, &data).ok("write on queue 0");
    }
    dev.read(1, 100, 8 * SECTOR).ok("read on queue 1");
    dev.read(1, 2000, 4 * SECTOR).ok("read on queue 1");
    dev.flush(0).ok("flush");

    let disk = run(&mut c, "query-disk");
    assert_eq!(disk["cow"]["allocated_chunks"], 40);
    assert_eq!(disk["cow"]["allocated_bytes"], 40 * 512);
    let stats = run(&mut c, "query-stats");
    let total = &stats["total"];
    assert_eq!(total["writes"], 5, "{stats:#}");
    assert_eq!(total["reads"], 2);
    assert_eq!(total["flushes"], 1);
    assert_eq!(total["bytes_written"], 5 * 8 * 512);
    assert_eq!(total["bytes_read"], 12 * 512);
    assert_eq!(total["errors"], 0);
    assert_eq!(total["write_latency"]["count"], 5);
    assert_eq!(total["read_latency"]["count"], 2);
    let p50 = total["write_latency"]["p50_us"].as_f64().unwrap();
    let max = total["write_latency"]["max_us"].as_f64().unwrap();
    assert!(p50 <= max, "{stats:#}");
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2, "{stats:#}");
    assert_eq!(
        (&queues[0]["queue"], &queues[0]["writes"]),
        (&json!(0), &json!(5))
    );
    assert_eq!(
        (&queues[1]["queue"], &queues[1]["reads"]),
        (&json!(1), &json!(2))
    );
    assert_eq!(stats["write_path"]["writes"], 5);
    // The read of written sectors went off the scheduler's lock, the one
    // of backing data through the scheduler.
    assert_eq!(stats["write_path"]["reads"], 1, "{stats:#}");
    assert_eq!(stats["locks"]["off_lock_reads"], 1, "{stats:#}");
    assert_eq!(stats["locks"]["view_read_locks"], 2, "{stats:#}");
    assert!(stats["locks"]["sched_locks"].as_u64().unwrap() > 0);
    assert_eq!(stats["metadata_failure"], Value::Null);
    drop(dev);
}

#[test]
fn query_connection_shows_the_frontend_and_its_queues() {
    let s = start(2);
    let mut c = client(&s);
    // The harness probed the data socket: that connection may still be
    // being handled now, but is over once a frontend got through the
    // handshake (connections are served one after another).
    let served = run(&mut c, "query-connection")["connections_served"]
        .as_u64()
        .unwrap();
    let mut dev = s.daemon.connect();
    dev.read(0, 0, SECTOR).ok("read");
    let conn = run(&mut c, "query-connection");
    assert_eq!(conn["connected"], true, "{conn:#}");
    assert!(
        conn["connections_served"].as_u64().unwrap() > served,
        "{conn:#}"
    );
    let features: Vec<&str> = conn["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in ["version-1", "flush", "mq", "protocol-features"] {
        assert!(features.contains(&f), "{f} not in {features:?}");
    }
    let queues = conn["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2, "{conn:#}");
    assert_eq!(queues[0]["started"], true);
    assert_eq!(queues[0]["next_used"], 1);
    assert!(conn["memory_regions"].as_u64().unwrap() >= 1);
    drop(dev);
    wait_disconnected(&mut c);
}

/// Waits until no frontend is connected (a disconnect is handled on the
/// daemon's message thread, after the frontend has gone).
fn wait_disconnected(c: &mut Client) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let conn = run(c, "query-connection");
        if conn["connected"] == false {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still connected: {conn:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn events_tell_of_connects_and_disconnects() {
    let s = start(1);
    let mut c = client(&s);
    assert_eq!(run(&mut c, "subscribe-events"), json!({}));
    let mut other = client(&s);
    let mut dev = s.daemon.connect();
    dev.read(0, 0, SECTOR).ok("read");
    // The harness probed the data socket before: its events may come
    // first. Events name the connection query-connection shows.
    let number = run(&mut other, "query-connection")["connection"].clone();
    let next_of = |c: &mut Client, want: &str| loop {
        let (name, data) = c.next_event().unwrap();
        if data["connection"] == number {
            assert_eq!(name, want, "{data}");
            return;
        }
        assert!(
            data["connection"].as_u64() < number.as_u64(),
            "{name} {data}"
        );
    };
    next_of(&mut c, "FRONTEND_CONNECTED");
    drop(dev);
    next_of(&mut c, "FRONTEND_DISCONNECTED");
    // A client that did not subscribe got only its answers.
    let _dev = s.daemon.connect();
    assert_eq!(run(&mut other, "query-disk")["format"], "cow");
    let (name, data) = c.next_event().unwrap();
    assert_eq!(name, "FRONTEND_CONNECTED");
    assert_eq!(data["connection"].as_u64(), number.as_u64().map(|n| n + 1));
}

/// Sends `line` and returns the error's class and the echoed id.
fn error_of(c: &mut Client, line: &[u8]) -> (ErrorClass, Option<Value>, String) {
    c.send_raw(line).unwrap();
    let (answer, id) = c.read_answer().unwrap();
    let e = answer.expect_err("an error answer");
    (e.class, id, e.desc)
}

#[test]
fn malformed_requests_get_error_objects_and_the_client_goes_on() {
    let s = start(1);
    let mut c = client(&s);
    for (line, class, id) in [
        (&b"this is not json\n"[..], ErrorClass::InvalidRequest, None),
        (b"[1, 2]\n", ErrorClass::InvalidRequest, None),
        (
            b"{\"execute\": 5, \"id\": 9}\n",
            ErrorClass::InvalidRequest,
            Some(json!(9)),
        ),
        (
            b"{\"id\": \"x\"}\n",
            ErrorClass::InvalidRequest,
            Some(json!("x")),
        ),
        (
            b"{\"execute\": \"query-disk\", \"arguments\": 3, \"id\": 1}\n",
            ErrorClass::InvalidRequest,
            Some(json!(1)),
        ),
        (
            b"{\"execute\": \"query-disk\", \"surprise\": 1}\n",
            ErrorClass::InvalidRequest,
            None,
        ),
        (b"\xff\xfe\xfd\n", ErrorClass::InvalidRequest, None),
        (
            b"{\"execute\": \"no-such-thing\", \"id\": [1]}\n",
            ErrorClass::CommandNotFound,
            Some(json!([1])),
        ),
        (
            b"{\"execute\": \"query-disk\", \"arguments\": {\"x\": 1}, \"id\": 2}\n",
            ErrorClass::InvalidParameter,
            Some(json!(2)),
        ),
    ] {
        let (got, got_id, desc) = error_of(&mut c, line);
        assert_eq!(got, class, "{}: {desc}", String::from_utf8_lossy(line));
        assert_eq!(got_id, id, "{}", String::from_utf8_lossy(line));
        assert!(!desc.is_empty());
    }
    // Empty lines are ignored; the connection still works.
    c.send_raw(b"\n \n").unwrap();
    assert_eq!(run(&mut c, "query-disk")["format"], "cow");
    // Two requests in one write, answered in order.
    c.send_raw(b"{\"execute\":\"query-disk\",\"id\":1}\n{\"execute\":\"query-stats\",\"id\":2}\n")
        .unwrap();
    assert_eq!(c.read_answer().unwrap().1, Some(json!(1)));
    assert_eq!(c.read_answer().unwrap().1, Some(json!(2)));
}

#[test]
fn an_overlong_line_is_refused_and_the_client_disconnected() {
    let s = start(1);
    let mut c = client(&s);
    let long = vec![b'x'; 100 * 1024];
    // The daemon may close before reading all of it.
    let _ = c.send_raw(&long);
    let (answer, _) = c.read_answer().unwrap();
    let e = answer.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest);
    assert!(e.desc.contains("longer than"), "{}", e.desc);
    assert!(
        c.read_answer().is_err(),
        "still connected after an overlong line"
    );
    let mut other = client(&s);
    assert_eq!(run(&mut other, "query-disk")["format"], "cow");
}

#[test]
fn clients_that_leave_mid_request_do_not_disturb_the_daemon() {
    let s = start(1);
    let mut keep = client(&s);
    let served = run(&mut keep, "query-connection")["connections_served"]
        .as_u64()
        .unwrap();
    for i in 0..20 {
        let mut raw = UnixStream::connect(&s.control).unwrap();
        match i % 3 {
            // Half a request, then gone.
            0 => raw.write_all(b"{\"execute\": \"query-di").unwrap(),
            // A whole request, gone before the answer.
            1 => raw.write_all(b"{\"execute\": \"query-stats\"}\n").unwrap(),
            // Gone without a word, even before the greeting was read.
            _ => {}
        }
        drop(raw);
    }
    // A subscriber that never reads does not block anyone either.
    let mut silent = UnixStream::connect(&s.control).unwrap();
    silent
        .write_all(b"{\"execute\": \"subscribe-events\"}\n")
        .unwrap();
    for _ in 0..3 {
        let _dev = s.daemon.connect();
    }
    assert_eq!(run(&mut keep, "query-disk")["format"], "cow");
    let mut fresh = client(&s);
    let now = run(&mut fresh, "query-connection")["connections_served"]
        .as_u64()
        .unwrap();
    assert!(now >= served + 3, "{served} then {now}");
    let mut greeting = String::new();
    silent.set_read_timeout(Some(TIMEOUT)).unwrap();
    BufReader::new(&mut silent)
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.contains("vhost-user-cow"), "{greeting}");
}

#[test]
fn a_hundred_clients_at_once() {
    let s = start(1);
    let clients: Vec<Client> = (0..100).map(|_| client(&s)).collect();
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                for round in 0..5 {
                    let name = ["query-disk", "query-stats", "query-connection"][(i + round) % 3];
                    let v = c
                        .execute(name, Value::Null)
                        .unwrap_or_else(|e| panic!("client {i}: {e}"))
                        .unwrap_or_else(|e| panic!("client {i}: {e:?}"));
                    assert!(v.is_object(), "client {i}: {v}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut c = client(&s);
    assert_eq!(run(&mut c, "query-disk")["format"], "cow");
}

#[test]
fn the_control_socket_is_private_and_removed_at_exit() {
    let s = start(1);
    let mode = std::fs::metadata(&s.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let control = s.control.clone();
    let Setup { _dir, daemon, .. } = s;
    let stopped = daemon.terminate();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(!control.exists(), "control socket left behind");
}

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::bin());
    cmd.arg("ctl").arg(socket).args(args);
    common::output(&mut cmd)
}

#[test]
fn the_ctl_client_prints_readable_text_or_json() {
    let s = start(1);
    let out = ctl(&s.control, &["query-disk"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("format: cow\n"), "{text}");
    assert!(text.contains("  chunk_size: 512\n"), "{text}");

    let out = ctl(&s.control, &["query-stats", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"]["writes"], 0);

    let out = ctl(&s.control, &["query-commands"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("query-disk ")), "{text}");

    let out = ctl(&s.control, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such command: frobnicate"), "{err}");

    let out = ctl(&s.control, &["query-disk", "notkeyvalue"]);
    assert_eq!(out.status.code(), Some(1));

    let missing = s.control.with_file_name("nobody.sock");
    let out = ctl(&missing, &["query-disk"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nobody.sock") && err.contains("--control-socket"),
        "{err}"
    );
}

#[test]
fn ctl_events_prints_events_as_they_happen() {
    let s = start(1);
    let mut child = Command::new(common::bin())
        .arg("ctl")
        .arg(&s.control)
        .args(["events", "--json", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing shows when the client has subscribed: connect frontends
    // until two events reached it.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        out
    });
    let deadline = std::time::Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "ctl events did not end"
        );
        let mut dev = s.daemon.connect();
        dev.read(0, 0, SECTOR).ok("read");
        drop(dev);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.wait().unwrap().success());
    let out = reader.join().unwrap();
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    // The subscription may land between a connect and its disconnect:
    // the two events are one of each, in either order.
    let mut names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["FRONTEND_CONNECTED", "FRONTEND_DISCONNECTED"],
        "{out}"
    );
}
