//! In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) through the
//! daemon's socket: a daemon killed with requests in flight is restarted,
//! the frontend hands the in-flight area back, and those requests are
//! resubmitted and completed exactly once; hostile in-flight areas are
//! refused with a log line, and the daemon goes on serving
//! (docs/design.md, "In-flight tracking").

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::daemon::Image;
use common::daemon::{Daemon, Peer, ServeOptions};
use common::disk_model::{make_cow, SECTOR};
use common::vhost_frontend::*;
use common::Rng;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vhost_user_cow::units::to_usize;

const SECTORS: u64 = 16384;
const QUEUE_SIZE: u16 = 256;

/// Reads the whole disk in 1 MiB requests (a request's segment limit).
fn read_all(dev: &mut VhostUserBlk) -> Vec<u8> {
    let mut all = Vec::new();
    for s in (0..SECTORS).step_by(2048) {
        all.extend(dev.read(0, s, 2048 * SECTOR).ok("read the disk"));
    }
    all
}

/// Bytes of one queue's region (the daemon's layout: a 16-byte header and
/// 16 bytes per descriptor, rounded up to 64).
fn region_size(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).div_ceil(64) * 64
}

/// A write submitted and not yet completed: its request, sector and data.
type Submitted = (Pending, u64, Vec<u8>);

const WRITE_LEN: usize = 64 * 1024;

/// `n` writes of 64 KiB of random data, alternating between two queues.
fn submit_writes(dev: &mut VhostUserBlk, rng: &mut Rng, n: u64) -> Vec<Submitted> {
    (0..n)
        .map(|i| {
            let data = rng.bytes(WRITE_LEN);
            let sector = i * (WRITE_LEN / SECTOR) as u64;
            (
                dev.submit_write(to_usize(i % 2), sector, &data),
                sector,
                data,
            )
        })
        .collect()
}

/// Spins until the area shows a request in flight (at most 10 s).
fn wait_marked(area: &File, layout: &VhostUserInflight) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while marked(area, layout).iter().all(Vec::is_empty) && Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// A new daemon on the same disk, the frontend reconnected to it: every
/// write of `batch` completes with OK (into `model`), and, after a
/// moment, no used element beyond the requests made (none twice).
fn restart_and_finish(
    dir: &std::path::Path,
    image: &Image,
    opts: &ServeOptions,
    dev: &mut VhostUserBlk,
    batch: Vec<Submitted>,
    model: &mut common::disk_model::Model,
) -> Daemon {
    let d = Daemon::start(Peer::Ours, dir, image, opts);
    dev.set_daemon_log(&d.log_path());
    dev.reconnect(d.socket())
        .unwrap_or_else(|e| panic!("reconnect: {e}\n{}", d.log_text()));
    for (p, sector, data) in batch {
        dev.complete(p, "a write across the restart")
            .expect_status(S_OK, "a write across the restart");
        model.write(sector, &data);
    }
    std::thread::sleep(Duration::from_millis(300));
    for q in 0..dev.num_queues() {
        let used = dev.mem().load_u16_acquire(dev.queue(q).used_gpa + 2);
        assert_eq!(
            used,
            dev.queue(q).avail_idx(),
            "queue {q}: used index vs avail index"
        );
    }
    d
}

/// The heads marked in flight in each queue's region.
fn marked(file: &File, layout: &VhostUserInflight) -> Vec<Vec<u16>> {
    let mut buf = vec![0u8; to_usize(layout.mmap_size)];
    file.read_exact_at(&mut buf, layout.mmap_offset).unwrap();
    let per = to_usize(region_size(layout.queue_size));
    (0..usize::from(layout.num_queues))
        .map(|q| {
            (0..layout.queue_size)
                .filter(|&h| buf[q * per + 16 + 16 * usize::from(h)] == 1)
                .collect()
        })
        .collect()
}

fn poke(file: &File, at: u64, bytes: &[u8]) {
    file.write_all_at(bytes, at).unwrap();
}

fn opts_slow_writes(num_queues: u16) -> ServeOptions {
    // O_DSYNC writes on the thread pool, two at a time per thread: requests
    // stay in flight long enough to be caught there.
    ServeOptions {
        num_queues,
        extra_args: ["--sync", "--io-engine", "threads", "--queue-depth", "2"]
            .map(String::from)
            .to_vec(),
        ..ServeOptions::default()
    }
}

fn frontend(num_queues: u16) -> FrontendOptions {
    FrontendOptions {
        num_queues,
        queue_size: QUEUE_SIZE,
        mem_size: 64 << 20,
        inflight: true,
        timeout: Duration::from_secs(30),
        ..FrontendOptions::default()
    }
}

fn check_cow(image: &Image) {
    let Image::Cow { cow, .. } = image else {
        return;
    };
    let o = common::output(
        std::process::Command::new(common::bin())
            .arg("check")
            .arg(cow),
    );
    assert!(
        o.status.success(),
        "check {}: {}{}",
        cow.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The number in the daemon's "found N requests in flight" lines, summed.
fn found_in_flight(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("requests in flight at the restart"))
        .filter_map(|l| {
            l.split("found ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Writes on two queues; the daemon is stopped (SIGSTOP) the moment the
/// area shows requests in flight, then killed (SIGKILL). A new daemon on
/// the same COW file gets the area back: the requests that were in flight
/// are resubmitted first, every write completes exactly once (no head
/// twice, the used index ends equal to the avail index), the disk holds
/// every write, and the COW file checks clean.
#[test]
fn killed_daemon_resubmits_requests_in_flight_exactly_once() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-inflight-restart-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0x1f1);
    let opts = opts_slow_writes(2);
    let mut d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    let mut dev = d.connect_with(frontend(2));
    assert!(
        dev.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD not offered: {:?}",
        dev.offered_protocol
    );
    let (layout, area) = {
        let (l, f) = dev.inflight.as_ref().expect("GET_INFLIGHT_FD");
        (*l, f.try_clone().unwrap())
    };
    let mut rng = Rng::new(0x1f1);
    let mut at_kill = Vec::new();
    let mut batch = Vec::new();
    for attempt in 0..30 {
        batch = submit_writes(&mut dev, &mut rng, 48);
        // Stop the daemon as soon as the area shows something in flight.
        wait_marked(&area, &layout);
        // Every thread stopped before the marks are read: a worker still
        // running would take (and mark) more.
        d.stop_threads();
        at_kill = marked(&area, &layout);
        if at_kill.iter().any(|q| !q.is_empty()) {
            eprintln!("attempt {attempt}: in flight at the kill: {at_kill:?}");
            break;
        }
        d.signal(libc::SIGCONT);
        for (p, sector, data) in batch.drain(..) {
            dev.complete(p, "a write before the kill")
                .expect_status(S_OK, "a write before the kill");
            model.write(sector, &data);
        }
    }
    let in_flight: usize = at_kill.iter().map(Vec::len).sum();
    assert!(in_flight > 0, "never caught a request in flight");
    d.signal(libc::SIGKILL);
    drop(d);

    let d = restart_and_finish(dir.path(), &image, &opts, &mut dev, batch, &mut model);
    let log = d.log_text();
    let found = found_in_flight(&log);
    assert!(
        found >= 1 && found <= in_flight as u64,
        "the daemon found {found} requests in flight ({in_flight} marked at the kill):\n{log}"
    );
    assert!(
        log.contains("resubmitted the"),
        "no resubmission logged:\n{log}"
    );
    eprintln!("{in_flight} marked at the kill, {found} resubmitted");
    let all = read_all(&mut dev);
    model.check(0, &all, "after the restart");
    drop(dev);
    let st = d.terminate();
    assert!(st.status.success(), "exit {}:\n{}", st.status, st.log);
    check_cow(&image);
}

/// A daemon restarted with nothing in flight: the area is taken back, no
/// request is resubmitted, and the ring goes on where it was.
#[test]
fn restart_with_nothing_in_flight_resubmits_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-inflight-idle-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0x1f2);
    let opts = ServeOptions::default();
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    let mut dev = d.connect_with(frontend(1));
    let data = vec![0x5a; 4096];
    dev.write(0, 64, &data).ok("write");
    model.write(64, &data);
    drop(d); // killed
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    dev.set_daemon_log(&d.log_path());
    dev.reconnect(d.socket()).expect("reconnect");
    let data = vec![0xa5; 4096];
    dev.write(0, 72, &data).ok("write after the restart");
    model.write(72, &data);
    let all = read_all(&mut dev);
    model.check(0, &all, "after the restart");
    assert_eq!(found_in_flight(&d.log_text()), 0, "{}", d.log_text());
}

/// One hostile in-flight area: what is done to it, the message it is
/// refused at, and the text of the daemon's one log line.
struct HostileCase {
    name: &'static str,
    /// Returns the area (layout and file) to hand over.
    make: fn(&VhostUserInflight, &File) -> (VhostUserInflight, File),
    /// Refused at SET_INFLIGHT_FD (else at the ring's start).
    at_set: bool,
    log: &'static str,
}

fn sealed_memfd(size: u64, seal: bool) -> File {
    // SAFETY: valid NUL-terminated name, plain flags.
    let raw = unsafe {
        libc::memfd_create(
            c"vuc-e2e-evil-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we now own.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    f.set_len(size).unwrap();
    if seal {
        // SAFETY: F_ADD_SEALS on our own memfd.
        let r = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(r, 0);
    }
    f
}

/// The daemon's own area, with queue 0's region in use (version 1, 256
/// descriptors) and `bytes` written at `at` in it.
fn own_area_with(
    l: &VhostUserInflight,
    f: &File,
    at: u64,
    bytes: &[u8],
) -> (VhostUserInflight, File) {
    poke(f, 8, &1u16.to_le_bytes());
    poke(f, 10, &QUEUE_SIZE.to_le_bytes());
    poke(f, at, bytes);
    (*l, f.try_clone().unwrap())
}

fn hostile_cases() -> Vec<HostileCase> {
    vec![
        HostileCase {
            name: "unsealed memfd",
            make: |l, _| (*l, sealed_memfd(l.mmap_size, false)),
            at_set: true,
            log: "not a memfd sealed against shrinking",
        },
        HostileCase {
            name: "too small for its queues",
            make: |l, f| {
                let mut l = *l;
                l.mmap_size -= 1;
                (l, f.try_clone().unwrap())
            },
            at_set: true,
            log: "need",
        },
        HostileCase {
            name: "offset past the end of the file",
            make: |l, f| {
                let mut l = *l;
                l.mmap_offset = 1 << 20;
                (l, f.try_clone().unwrap())
            },
            at_set: true,
            log: "past the end of its file",
        },
        HostileCase {
            name: "a file smaller than it says",
            make: |l, _| (*l, sealed_memfd(4096, true)),
            at_set: true,
            log: "past the end of its file",
        },
        HostileCase {
            name: "more queues than the device",
            make: |_, _| {
                let l = VhostUserInflight::new(40 * region_size(QUEUE_SIZE), 0, 40, QUEUE_SIZE);
                (l, sealed_memfd(l.mmap_size, true))
            },
            at_set: true,
            log: "40 queues",
        },
        HostileCase {
            name: "queue size not a power of two",
            make: |l, f| {
                let mut l = *l;
                l.queue_size = 100;
                (l, f.try_clone().unwrap())
            },
            at_set: true,
            log: "queue size 100",
        },
        HostileCase {
            name: "garbage descriptor state",
            make: |l, f| own_area_with(l, f, 16 + 16 * 7, &[0x80]),
            at_set: true,
            log: "descriptor 7 is 128",
        },
        HostileCase {
            name: "descriptor count mismatch",
            make: |l, f| own_area_with(l, f, 10, &128u16.to_le_bytes()),
            at_set: true,
            log: "is for 128 descriptors",
        },
        HostileCase {
            name: "unknown version",
            make: |l, f| own_area_with(l, f, 8, &9u16.to_le_bytes()),
            at_set: true,
            log: "version 9",
        },
        HostileCase {
            name: "last batch head out of range",
            make: |l, f| own_area_with(l, f, 12, &999u16.to_le_bytes()),
            at_set: true,
            log: "last batch head 999",
        },
        HostileCase {
            name: "more marked in flight than made available",
            make: |l, f| {
                let (l, f) = own_area_with(l, f, 16 + 16 * 3, &[1]);
                poke(&f, 16 + 16 * 4, &[1]);
                // The region's used index equals the ring's: nothing to repair.
                (l, f)
            },
            at_set: false,
            log: "2 requests marked in flight",
        },
        HostileCase {
            name: "a region for another ring size",
            make: |_, _| {
                let l = VhostUserInflight::new(region_size(128), 0, 1, 128);
                (l, sealed_memfd(l.mmap_size, true))
            },
            at_set: false,
            log: "the ring has 256 entries, its in-flight region 128",
        },
    ]
}

/// Each hostile area is refused (a NACK) with one log line naming the
/// problem, at SET_INFLIGHT_FD or at the ring's start; the daemon stays up
/// and the next connection writes and reads.
#[test]
fn hostile_inflight_areas_are_refused() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-inflight-hostile-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), 4096, 0x1f3);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let mut d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    for (i, case) in hostile_cases().into_iter().enumerate() {
        let before = d.log_text().lines().count();
        let mut dev = d.connect_with(frontend(1));
        // Stop the ring (GET_VRING_BASE), as a frontend does before it
        // hands over an area.
        dev.stop().expect("GET_VRING_BASE");
        let (own, file) = dev.inflight.take().expect("GET_INFLIGHT_FD");
        let (layout, evil) = (case.make)(&own, &file);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&evil);
        let set = dev.message("SET_INFLIGHT_FD", |fe| fe.set_inflight_fd(&layout, fd));
        let start = if set.is_ok() {
            let q = dev.queue(0);
            let (kick, call) = (q.kick.try_clone().unwrap(), q.call.try_clone().unwrap());
            dev.message("SET_VRING_KICK", |fe| fe.set_vring_kick(0, &kick))
                .and_then(|_| dev.message("SET_VRING_CALL", |fe| fe.set_vring_call(0, &call)))
                .and_then(|_| dev.message("SET_VRING_ENABLE", |fe| fe.set_vring_enable(0, true)))
        } else {
            Ok(())
        };
        let refused_at_set = set.is_err();
        assert_eq!(
            refused_at_set, case.at_set,
            "{}: SET_INFLIGHT_FD answered {set:?}, the ring start {start:?}",
            case.name
        );
        assert!(
            set.is_err() || start.is_err(),
            "{}: accepted\n{}",
            case.name,
            d.log_text()
        );
        drop(dev);
        assert!(
            d.running(),
            "{}: the daemon died:\n{}",
            case.name,
            d.log_text()
        );
        let log = d.log_text();
        let lines: Vec<&str> = log
            .lines()
            .skip(before)
            .filter(|l| l.contains("refused") && l.contains(case.log))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: wanted one log line with {:?}:\n{}",
            case.name,
            case.log,
            log.lines().skip(before).collect::<Vec<_>>().join("\n")
        );
        // The next connection (without in-flight tracking) works.
        let mut dev = d.connect_with(FrontendOptions {
            num_queues: 1,
            ..FrontendOptions::default()
        });
        let byte = 0x40 + u8::try_from(i).unwrap();
        let data = vec![byte; SECTOR];
        dev.write(0, 8 + i as u64, &data).ok("canary write");
        model.write(8 + i as u64, &data);
        let got = dev.read(0, 8 + i as u64, SECTOR).ok("canary read");
        assert_eq!(got, data, "{}: canary", case.name);
        drop(dev);
        // The rate limit lets one line per cause a second through.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let mut dev = d.connect();
    let all = dev.read(0, 0, 4096 * SECTOR).ok("whole disk");
    model.check(0, &all, "at the end");
    drop(dev);
    let st = d.terminate();
    assert!(st.status.success(), "exit {}:\n{}", st.status, st.log);
}

/// SIGTERM with writes in flight: the daemon completes and publishes
/// every request it took before it disconnects, so the area ends with
/// nothing marked, and a frontend that rewinds to the used index and
/// reconnects without handing the area back (as to a daemon without
/// in-flight tracking: a downgrade) gets every write done exactly once.
#[test]
fn sigterm_publishes_every_request_taken() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-inflight-sigterm-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0x1f4);
    let opts = opts_slow_writes(2);
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    let mut dev = d.connect_with(frontend(2));
    let (layout, area) = {
        let (l, f) = dev.inflight.as_ref().expect("GET_INFLIGHT_FD");
        (*l, f.try_clone().unwrap())
    };
    let mut rng = Rng::new(0x1f4);
    let batch = submit_writes(&mut dev, &mut rng, 48);
    wait_marked(&area, &layout);
    let st = d.terminate();
    assert!(st.status.success(), "exit {}:\n{}", st.status, st.log);
    assert!(
        st.log.contains("published before disconnecting"),
        "no drain logged:\n{}",
        st.log
    );
    let left = marked(&area, &layout);
    assert!(
        left.iter().all(Vec::is_empty),
        "marked in flight after SIGTERM: {left:?}"
    );
    dev.inflight = None; // the next daemon is not given the area
    let d = restart_and_finish(dir.path(), &image, &opts, &mut dev, batch, &mut model);
    let all = read_all(&mut dev);
    model.check(0, &all, "after the SIGTERM and restart");
    drop(dev);
    let st = d.terminate();
    assert!(st.status.success(), "exit {}:\n{}", st.status, st.log);
    check_cow(&image);
}
