//! What live migration needs of the daemon, over its real socket with the
//! test frontend: dirty logging (SET_LOG_BASE, VHOST_F_LOG_ALL, the log's
//! bits for every kind of guest write, hostile log areas refused), and a
//! second connection for the same disk while the first is open, of which
//! exactly one is served (docs/design.md, "Dirty logging" and "Two
//! connections, one active"). The VM tests migrate a real guest
//! (`scripts/qemu/vm-tests.sh`, `migrate`).

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{Daemon, Image, Peer, ServeOptions};
use common::disk_model::{make_cow, Model, SECTOR};
use common::vhost_frontend::*;
use common::Rng;
use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vhost_user_cow::units::to_usize;

const SECTORS: u64 = 8192;
const PAGE: u64 = 4096;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vuc-e2e-migration-")
        .tempdir()
        .unwrap()
}

fn memfd(len: u64) -> File {
    // SAFETY: creates a new anonymous file; the name is a C string.
    let fd = unsafe { libc::memfd_create(c"vuc-test-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the fd was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The 4 KiB pages `[gpa, gpa + len)` touches.
fn pages(gpa: u64, len: u64) -> BTreeSet<u64> {
    (gpa / PAGE..=(gpa + len - 1) / PAGE).collect()
}

fn log_opts() -> FrontendOptions {
    FrontendOptions {
        log_shmfd: true,
        timeout: Duration::from_secs(10),
        ..FrontendOptions::default()
    }
}

/// A dirty log as the frontend keeps it: a memfd of one bit per page of
/// guest memory.
struct DirtyLog {
    file: File,
    len: u64,
}

impl DirtyLog {
    fn for_guest(dev: &VhostUserBlk) -> DirtyLog {
        let len = dev.mem().end().div_ceil(PAGE * 8);
        DirtyLog {
            file: memfd(len),
            len,
        }
    }

    /// The pages whose bits are set; clears them all.
    fn take(&self) -> BTreeSet<u64> {
        let mut bytes = vec![0u8; to_usize(self.len)];
        self.file.read_exact_at(&mut bytes, 0).unwrap();
        self.file.write_all_at(&vec![0u8; bytes.len()], 0).unwrap();
        let mut set = BTreeSet::new();
        for (i, b) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    set.insert(i as u64 * 8 + bit);
                }
            }
        }
        set
    }

    /// SET_LOG_BASE with this log.
    fn set_base(&self, dev: &mut VhostUserBlk) -> Result<(), String> {
        let region = VhostUserDirtyLogRegion {
            mmap_size: self.len,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        dev.message("SET_LOG_BASE", |fe| fe.set_log_base(0, Some(region)))
    }
}

/// What QEMU does when a migration starts: SET_LOG_BASE, SET_FEATURES
/// with VHOST_F_LOG_ALL, then SET_VRING_ADDR with VHOST_VRING_F_LOG on
/// each running ring, its used ring logged at `log_addr[i]`.
fn start_logging(dev: &mut VhostUserBlk, log: &DirtyLog, log_addr: &[u64]) {
    log.set_base(dev).expect("SET_LOG_BASE");
    set_log_all(dev, true);
    for (i, &a) in log_addr.iter().enumerate() {
        let addr = VringConfigData {
            flags: VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
            log_addr: Some(a),
            ..dev.vring_addr(i)
        };
        dev.message("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &addr))
            .expect("SET_VRING_ADDR on a running ring, with logging");
    }
}

fn set_log_all(dev: &mut VhostUserBlk, on: bool) {
    let mut features = dev.features;
    if on {
        features |= VhostUserVirtioFeatures::LOG_ALL.bits();
    }
    dev.message("SET_FEATURES", |fe| fe.set_features(features))
        .expect("SET_FEATURES");
}

/// The pages a finished request's log bits must be: its writable data,
/// its status byte and the used ring at its log address.
fn request_pages(p: &Pending, used_log: &BTreeSet<u64>) -> BTreeSet<u64> {
    let mut want = used_log.clone();
    for &(gpa, len) in p.data_in() {
        want.extend(pages(gpa, u64::from(len)));
    }
    want.extend(pages(p.status_gpa().expect("a status byte"), 1));
    want
}

#[test]
fn dirty_log_marks_what_the_daemon_writes() {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0xd1);
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &ServeOptions::default());
    let mut dev = d.connect_with(log_opts());
    assert!(
        dev.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD not offered: {:?}",
        dev.offered_protocol
    );
    assert!(
        dev.offered_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0,
        "VHOST_F_LOG_ALL not offered"
    );
    let mut rng = Rng::new(0xd1);
    let log = DirtyLog::for_guest(&dev);
    // The used ring is logged where SET_VRING_ADDR says, not where it is:
    // a log address far from the ring and every buffer tells them apart.
    let used_log_gpa = dev.mem().main_end() - 3 * PAGE - 100;
    let used_log = pages(used_log_gpa, 4 + 8 * u64::from(dev.queue(0).size) + 2);
    assert!(pages(dev.queue(0).used_gpa, 1).is_disjoint(&used_log));
    start_logging(&mut dev, &log, &[used_log_gpa]);
    log.take();

    // A write: the device only reads its data.
    let data = rng.bytes(16 * SECTOR);
    let p = dev.submit_write(0, 100, &data);
    let want = request_pages(&p, &used_log);
    dev.complete(p, "write").ok("write");
    model.write(100, &data);
    assert_eq!(log.take(), want, "a write: its status and the used ring");

    // A read of 3 segments' worth: every page it filled.
    let len = 3 * dev.seg_bytes() - 2 * SECTOR;
    let p = dev.submit_read(0, 90, len);
    let want = request_pages(&p, &used_log);
    assert!(want.len() > 3 * 16, "a read over many pages: {want:?}");
    let got = dev.complete(p, "read").ok("read");
    model.check(90, &got, "read while logging");
    assert_eq!(log.take(), want, "a read: its buffers, status, used ring");

    // GET_ID fills its buffer too; a flush only its status.
    let p = dev.submit_get_id(0, 20);
    let want = request_pages(&p, &used_log);
    dev.complete(p, "GET_ID").ok("GET_ID");
    assert_eq!(log.take(), want, "GET_ID");
    let p = dev.submit_flush(0);
    let want = request_pages(&p, &used_log);
    dev.complete(p, "flush").ok("flush");
    assert_eq!(log.take(), want, "flush");

    // A refused request: its status.
    let p = dev.chain().header(0x7777, 0).status().submit(0);
    let want = request_pages(&p, &used_log);
    dev.complete(p, "unsupported type")
        .expect_status(S_UNSUPP, "unsupported type");
    assert_eq!(log.take(), want, "a refused request");

    // Logging off: the ring keeps running, nothing is marked any more.
    set_log_all(&mut dev, false);
    // The worker may have swept the ring (and marked the used ring) after
    // the last take; once SET_FEATURES is answered the log is given up.
    log.take();
    let got = dev.read(0, 0, 64 * SECTOR).ok("read, logging off");
    model.check(0, &got, "read after logging was turned off");
    let data = rng.bytes(8 * SECTOR);
    dev.write(0, 4000, &data).ok("write, logging off");
    model.write(4000, &data);
    assert_eq!(log.take(), BTreeSet::new(), "logging off marks nothing");

    // And on again with a new log (as for a second migration).
    let log2 = DirtyLog::for_guest(&dev);
    let used_gpa = dev.queue(0).used_gpa;
    start_logging(&mut dev, &log2, &[used_gpa]);
    let p = dev.submit_read(0, 4000, 8 * SECTOR);
    let used = pages(used_gpa, 2054);
    let want = request_pages(&p, &used);
    dev.complete(p, "read, second log").ok("read, second log");
    assert_eq!(log2.take(), want, "the second log");
    assert_eq!(log.take(), BTreeSet::new(), "the first log, given up");

    let want = dev.avail_indices();
    assert_eq!(dev.disconnect().expect("GET_VRING_BASE"), want);
    finish(d, &model);
}

#[test]
fn hostile_log_areas_are_refused() {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0xd2);
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &ServeOptions::default());
    let (pipe_r, _pipe_w) = {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two fds for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are new and ours.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    };
    let small = memfd(8192);
    // Empty and wrapping areas the vhost crate refuses before us ("invalid
    // message"); the rest is ours to refuse.
    let cases: [(&str, u64, u64, &File, &str); 6] = [
        ("empty", 0, 0, &small, "ended: invalid message"),
        (
            "offset wraps",
            16,
            u64::MAX - 8,
            &small,
            "ended: invalid message",
        ),
        (
            "past the end of its file",
            8193,
            0,
            &small,
            "does not fit in its file of 0x2000 bytes",
        ),
        (
            "offset past the end",
            4096,
            4097,
            &small,
            "does not fit in its file of 0x2000 bytes",
        ),
        (
            "too large",
            1 << 40,
            0,
            &small,
            "larger than 0x200000000 bytes",
        ),
        ("a pipe", 8, 0, &pipe_r, "not a regular file or memfd"),
    ];
    for (what, size, offset, file, why) in cases {
        let seen = d.log_text().matches(why).count();
        let mut dev = d.connect_with(log_opts());
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        };
        let r = dev.message("SET_LOG_BASE", |fe| fe.set_log_base(0, Some(region)));
        assert!(r.is_err(), "{what}: SET_LOG_BASE accepted");
        assert!(
            common::vhost_frontend::raw::peer_closed(dev.socket_fd(), Duration::from_secs(5)),
            "{what}: the connection stayed open"
        );
        d.wait_log_count(why, seen + 1);
        // Refusals are logged once a second per cause: let the next one
        // be seen.
        std::thread::sleep(Duration::from_millis(1050));
        // The refused connection is gone; the daemon serves the next one.
        drop(dev);
        let mut dev = d.connect_with(log_opts());
        let data = vec![0x5a; 4 * SECTOR];
        dev.write(0, 8, &data).ok(what);
        model.write(8, &data);
        dev.disconnect().expect("GET_VRING_BASE");
    }
    finish(d, &model);
}

/// Waits `ms` and says whether `p` completed meanwhile.
fn completes_within(dev: &mut VhostUserBlk, p: &Pending, ms: u64) -> bool {
    dev.wait_timeout(p, Duration::from_millis(ms)).is_ok()
}

#[test]
fn two_connections_one_served() {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0xd3);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    let cow = match &image {
        Image::Cow { cow, .. } => cow.clone(),
        Image::Raw(_) => unreachable!("make_cow makes a COW image"),
    };
    let mut rng = Rng::new(0xd3);
    let fopts = FrontendOptions {
        num_queues: 2,
        ..log_opts()
    };
    // A, the source: active from its first ring.
    let mut a = d.connect_with(fopts.clone());
    let first = rng.bytes(24 * SECTOR);
    a.write(1, 300, &first).ok("A: write");
    model.write(300, &first);

    // B, the destination, sets everything up and starts its rings while
    // A runs: none of its requests is taken, nothing is written.
    let mut b = d.connect_with(fopts.clone());
    d.wait_log_count("waits, connection", 1);
    let before = std::fs::read(&cow).unwrap();
    let second = rng.bytes(16 * SECTOR);
    let bw = b.submit_write(0, 300, &second);
    let br = b.submit_read(1, 300, 24 * SECTOR);
    assert!(!completes_within(&mut b, &bw, 1500), "B's write was served");
    assert!(!completes_within(&mut b, &br, 10), "B's read was served");
    assert_eq!(
        std::fs::read(&cow).unwrap(),
        before,
        "the COW file changed while B waited"
    );
    // A goes on meanwhile.
    let more = rng.bytes(8 * SECTOR);
    a.write(0, 2000, &more).ok("A: write while B waits");
    model.write(2000, &more);
    // A third connection is not served at all.
    assert!(
        d.try_connect_with(fopts.clone()).is_err(),
        "a third connection was accepted"
    );
    d.wait_log_count("refused a frontend connection: 2 are open already", 1);

    // A stops its rings (the source's vhost_dev_stop): B takes over where
    // A left the disk, bitmap and all. B's read was queued behind its
    // write on another ring, so it sees A's data or B's.
    let want = a.avail_indices();
    assert_eq!(a.stop().expect("A: GET_VRING_BASE"), want);
    b.complete(bw, "B: write after A stopped").ok("B: write");
    let got = b.complete(br, "B: read after A stopped").ok("B: read");
    let span = 300 * SECTOR..324 * SECTOR;
    let mut merged = model.clone();
    merged.write(300, &second);
    assert!(
        got[..] == model.data[span.clone()] || got[..] == merged.data[span],
        "B read neither A's data nor its own"
    );
    model.write(300, &second);
    let got = b.read(0, 2000, 8 * SECTOR).ok("B: A's last write");
    assert_eq!(got, more, "B reads what A wrote last");

    // A starts its ring again while B is active: A now waits.
    a.reset_queue(0, true).expect("A: ring set up again");
    let aw = a.submit_write(0, 5000, &rng.bytes(4 * SECTOR));
    assert!(
        !completes_within(&mut a, &aw, 1000),
        "A was served while B is active"
    );
    // B goes away without stopping its rings (a destination killed): A's
    // waiting ring starts.
    drop(b);
    let c = a.complete(aw, "A: write after B left");
    assert_eq!(c.status, Some(S_OK));
    // The data of `aw` is known only to the frontend buffers; read it back
    // into the model.
    let got = a.read(0, 5000, 4 * SECTOR).ok("A: read back");
    model.write(5000, &got);
    let whole = a.read(0, 0, to_usize(SECTORS) * SECTOR / 4).ok("A: read");
    model.check(0, &whole, "A after B left");
    drop(a);
    finish(d, &model);
}

/// SIGTERM, exit 0, `check` clean and `uml_moo` merges to the model.
fn finish(d: Daemon, model: &Model) {
    let st = d.terminate_ok();
    st.assert_check_clean();
    let dir: PathBuf = st.socket.parent().map(Path::to_path_buf).unwrap();
    if let Some(img) = st.image(&dir) {
        model.check(0, &img, "final image (uml_moo)");
    }
}
