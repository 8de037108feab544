//! The test harness's own time limits: a backend that dies or stops
//! answering must fail the waiting test, quickly and saying what it waited
//! for, never hang it. Our daemon is the backend; SIGKILL makes it die
//! mid-request, SIGSTOP makes it alive but silent.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Peer, ServeOptions};
use common::disk_model::make_raw;
use common::vhost_frontend::handshake::connect_unix;
use common::vhost_frontend::*;

/// Short limits, so the timeouts are reached in a test's time.
const LIMIT: Duration = Duration::from_secs(2);
/// What a failure may take beyond its limit (a loaded 2-core machine).
const SLACK: Duration = Duration::from_secs(3);

fn opts() -> FrontendOptions {
    FrontendOptions {
        timeout: LIMIT,
        reply_timeout: LIMIT,
        ..FrontendOptions::default()
    }
}

fn start(dir: &std::path::Path) -> Daemon {
    let (image, _) = make_raw(dir, 2048, 7);
    Daemon::start(Peer::Ours, dir, &image, &ServeOptions::default())
}

/// SIGSTOP, then waits until every thread of the daemon is stopped, so
/// nothing it was sent afterwards can be answered.
fn stop_process(d: &mut Daemon) {
    d.stop_threads();
}

fn panic_text(r: Box<dyn std::any::Any + Send>) -> String {
    r.downcast_ref::<String>()
        .cloned()
        .or_else(|| r.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn killed_daemon_fails_the_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    // The default (long) limits: the hang-up alone must end the waits.
    let mut dev = d.connect();
    // Stopped first, so the read cannot complete before the kill.
    stop_process(&mut d);
    let p = dev.submit_read(0, 0, 4096);
    d.signal(libc::SIGKILL);

    let t = Instant::now();
    let r = dev.wait(&p);
    assert!(
        matches!(r, Err(WaitError::Disconnected { queue: 0 })),
        "{r:?}"
    );
    assert!(
        t.elapsed() < SLACK,
        "hang-up noticed after {:?}",
        t.elapsed()
    );

    // `complete` fails the test with what it waited for and the log.
    let p = dev.submit_read(0, 8, 512);
    let t = Instant::now();
    let msg = panic_text(
        catch_unwind(AssertUnwindSafe(|| dev.complete(p, "the canary read"))).unwrap_err(),
    );
    assert!(
        t.elapsed() < SLACK,
        "complete failed after {:?}",
        t.elapsed()
    );
    for want in ["the canary read", "closed the connection", "--- daemon log"] {
        assert!(msg.contains(want), "{want:?} not in: {msg}");
    }

    let t = Instant::now();
    let e = dev.stop().unwrap_err();
    assert!(
        t.elapsed() < SLACK,
        "GET_VRING_BASE failed after {:?}",
        t.elapsed()
    );
    assert!(e.contains("GET_VRING_BASE 0"), "{e}");
}

#[test]
fn stopped_daemon_times_out_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let mut dev = d.connect_with(opts());
    stop_process(&mut d);

    // A request the daemon never sees.
    let p = dev.submit_read(0, 0, 4096);
    let t = Instant::now();
    let r = dev.wait(&p);
    let took = t.elapsed();
    assert!(
        matches!(r, Err(WaitError::Timeout { queue: 0, .. })),
        "{r:?}"
    );
    assert!(
        took >= LIMIT && took < LIMIT + SLACK,
        "timed out after {took:?}"
    );
    let msg = panic_text(
        catch_unwind(AssertUnwindSafe(|| dev.complete(p, "the stuck read"))).unwrap_err(),
    );
    for want in [
        "the stuck read",
        "no completion on queue 0",
        "--- daemon log",
    ] {
        assert!(msg.contains(want), "{want:?} not in: {msg}");
    }

    // A vhost-user message it never answers.
    let t = Instant::now();
    let e = dev.stop().unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= LIMIT && took < LIMIT + SLACK,
        "GET_VRING_BASE gave up after {took:?}"
    );
    assert!(e.contains("GET_VRING_BASE 0: no reply"), "{e}");
    assert!(e.contains("--- daemon log"), "{e}");

    // A new connection: the kernel accepts it, the handshake's first
    // question goes unanswered.
    let t = Instant::now();
    let e = d
        .try_connect_with(opts())
        .err()
        .expect("handshake with a stopped daemon");
    let took = t.elapsed();
    assert!(
        took >= LIMIT && took < LIMIT + SLACK,
        "handshake gave up after {took:?}"
    );
    assert!(e.contains("GET_FEATURES: no reply"), "{e}");
    // Dropping `d` kills it (SIGKILL ends a stopped process too).
}

#[test]
fn connect_gives_up_on_a_full_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never-accepts.sock");
    let l = UnixListener::bind(&path).unwrap();
    // Shrink the backlog so a few connections fill it; nothing accepts.
    // SAFETY: listen on a socket we own.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let mut pending = Vec::new();
    for _ in 0..8 {
        let t = Instant::now();
        match connect_unix(&path, LIMIT) {
            Ok(s) => pending.push(s),
            Err(e) => {
                let took = t.elapsed();
                assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                assert!(
                    took >= LIMIT && took < LIMIT + SLACK,
                    "gave up after {took:?}"
                );
                assert!(!pending.is_empty(), "the first connect must fit");
                return;
            }
        }
    }
    panic!("{} connections fit in a backlog of 0", pending.len());
}
