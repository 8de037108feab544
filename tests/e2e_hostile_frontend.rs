//! A hostile frontend: malformed vhost-user *messages* (the request-level
//! catalogue is `e2e_malformed.rs`), a ring whose avail index runs away, a
//! read-only disk whose frontend ignores VIRTIO_BLK_F_RO, a frontend that
//! hangs up with requests in flight, and memory truncated under the
//! daemon's feet.
//!
//! For each bad message: the daemon must refuse it (a NACK with
//! REPLY_ACK; ours then ends the connection) or accept it harmlessly, stay
//! alive, log it once, and serve the next connection (a canary write and
//! read). qemu-storage-daemon 10.0's answer is recorded in the table.
//!
//! Run with `--nocapture` to see what each peer answered.

mod common;

use vhost_user_cow::units::to_usize;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Peer, ServeOptions};
use common::disk_model::{make_cow, Model, SECTOR};
use common::vhost_frontend::raw::{
    code, peer_closed, vring_fd_body, vring_state, RawReply, NEED_REPLY,
};
use common::vhost_frontend::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SECTORS: u64 = 4096;

crate::per_peer!(
    message_catalogue,
    avail_index_overrun,
    read_only_without_ro_ack,
    disconnect_with_requests_in_flight,
);

/// What the backend did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Acked (or answered) and the connection goes on.
    Accepted,
    /// Refused with a failure reply (a NACK, or GET_CONFIG's empty answer);
    /// `closed`: the backend then ended the connection.
    Refused { closed: bool },
    /// The connection ended without an answer.
    HungUp,
    /// The backend process died (qsd: an assertion); it is restarted.
    Died,
}

const REFUSED_CLOSED: Answer = Answer::Refused { closed: true };
const REFUSED_OPEN: Answer = Answer::Refused { closed: false };

struct MsgCase {
    name: &'static str,
    send: fn(&mut VhostUserBlk) -> Result<(), String>,
    /// qemu-storage-daemon 10.0's answer (the reference).
    qsd: Answer,
    /// What ours may answer.
    ours: &'static [Answer],
    /// For ours: a text exactly one new log line must contain (None: no
    /// new line may say "refused").
    ours_log: Option<&'static str>,
    why: &'static str,
}

/// Guest physical address for extra regions the cases add: far above the
/// frontend's own memory.
const FAR_GPA: u64 = 1 << 40;

fn memfd(size: u64) -> std::fs::File {
    // SAFETY: valid NUL-terminated name, plain flags.
    let raw = unsafe { libc::memfd_create(c"vuc-e2e-evil".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we now own.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    f.set_len(size).unwrap();
    f
}

fn region(gpa: u64, size: u64, user: u64, fd: i32) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: user,
        mmap_offset: 0,
        mmap_handle: fd,
    }
}

/// The ack of a hand-made message with NEED_REPLY: Ok for 0, the
/// frontend's NACK error otherwise (the same text the vhost crate gives).
fn raw_acked(dev: &mut VhostUserBlk, code: u32, body: &[u8], fds: &[i32]) -> Result<(), String> {
    match dev.raw_message(code, NEED_REPLY, body, fds, true)? {
        RawReply::Body(b) if b.len() == 8 && b == [0; 8] => Ok(()),
        RawReply::Body(b) if b.len() == 8 => Err(format!("BackendInternalError (ack {b:?})")),
        other => Err(format!("{other:?}")),
    }
}

/// Queue 1 of the 2-queue daemon, never set up by the frontend (which
/// starts only queue 0): size 256, base 0, ring addresses `addr`.
fn setup_queue1(dev: &mut VhostUserBlk, addr: VringConfigData) -> Result<(), String> {
    dev.message("SET_VRING_NUM", |fe| fe.set_vring_num(1, addr.queue_size))?;
    dev.message("SET_VRING_BASE", |fe| fe.set_vring_base(1, 0))?;
    dev.message("SET_VRING_ADDR", |fe| fe.set_vring_addr(1, &addr))
}

/// Queue 1's kick and call and SET_VRING_ENABLE 1 (the eventfds leak to
/// the end of the test: the backend has its own copies anyway).
fn start_queue1(dev: &mut VhostUserBlk) -> Result<(), String> {
    let kick = Box::leak(Box::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let call = Box::leak(Box::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.message("SET_VRING_KICK", |fe| fe.set_vring_kick(1, &*kick))?;
    dev.message("SET_VRING_CALL", |fe| fe.set_vring_call(1, &*call))?;
    dev.message("SET_VRING_ENABLE", |fe| fe.set_vring_enable(1, true))?;
    kick.write(1).unwrap();
    Ok(())
}

/// Fresh ring memory for queue 1 in the buffer arena: three pages.
fn queue1_addr(dev: &mut VhostUserBlk) -> VringConfigData {
    let base = dev.place_zeroed(5 * 4096).div_ceil(4096) * 4096;
    let m = dev.mem();
    VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: m.user_addr(base),
        avail_ring_addr: m.user_addr(base + 4096),
        used_ring_addr: m.user_addr(base + 2 * 4096),
        log_addr: None,
    }
}

fn catalogue() -> Vec<MsgCase> {
    vec![
        MsgCase {
            name: "SET_VRING_NUM 0",
            send: |d| d.message("SET_VRING_NUM", |fe| fe.set_vring_num(1, 0)),
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("size 0"),
            why: "virtio 1.2 §2.7: the queue size is a power of two; qsd accepts it; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_NUM 3 (not a power of two)",
            send: |d| d.message("SET_VRING_NUM", |fe| fe.set_vring_num(1, 3)),
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("size 3"),
            why: "virtio 1.2 §2.7 (split rings: a power of two); qsd accepts it; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_NUM 2048 (above the maximum)",
            send: |d| d.message("SET_VRING_NUM", |fe| fe.set_vring_num(1, 2048)),
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("size 2048"),
            why: "ours offers at most 1024 (--queue-size); qsd accepts it; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_NUM on a started ring",
            send: |d| d.message("SET_VRING_NUM", |fe| fe.set_vring_num(0, 128)),
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("SET_VRING_NUM on a started ring"),
            why: "vhost-user: ring setup is for a stopped ring; qsd accepts it; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_ADDR: descriptor table outside guest memory",
            send: |d| {
                let mut a = queue1_addr(d);
                a.desc_table_addr = 0x1000;
                setup_queue1(d, a)
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("descriptor table: no memory region"),
            why: "the address is in no region; qsd: vu_panic (invalid vring_addr), hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_ADDR: used ring outside guest memory",
            send: |d| {
                let mut a = queue1_addr(d);
                a.used_ring_addr = u64::MAX - 0xfff;
                setup_queue1(d, a)
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("used ring: no memory region"),
            why: "qsd: vu_panic, hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_ADDR: unaligned descriptor table",
            send: |d| {
                let mut a = queue1_addr(d);
                a.desc_table_addr += 8;
                setup_queue1(d, a)
            },
            qsd: Answer::Accepted,
            ours: &[Answer::HungUp, REFUSED_CLOSED],
            ours_log: Some("frontend connection ended: invalid message"),
            why: "virtio 1.2 §2.7: the table is 16-byte aligned; qsd accepts it; ours (the vhost crate checks the alignment): invalid message, ends the connection without a NACK",
        },
        MsgCase {
            name: "rings running past the end of guest memory",
            send: |d| {
                let r = &d.mem().regions()[0];
                let end = r.host_base() + r.size;
                let mut a = queue1_addr(d);
                a.used_ring_addr = end - 16;
                setup_queue1(d, a)?;
                start_queue1(d)
            },
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("not inside guest memory"),
            why: "the used ring's first bytes are memory, the rest is not; qsd accepts it; ours: NACK at SET_VRING_KICK (the ring would start), ends the connection",
        },
        MsgCase {
            name: "rings overlapping each other",
            send: |d| {
                let mut a = queue1_addr(d);
                a.avail_ring_addr = a.desc_table_addr;
                a.used_ring_addr = a.desc_table_addr;
                setup_queue1(d, a)?;
                start_queue1(d)
            },
            qsd: Answer::Accepted,
            ours: &[Answer::Accepted, REFUSED_CLOSED],
            ours_log: None,
            why: "the spec does not forbid it (it is the guest's own memory); both accept it and serve queue 0 on",
        },
        MsgCase {
            name: "kick on a queue never set up",
            send: |d| {
                let kick = Box::leak(Box::new(EventFd::new(EFD_NONBLOCK).unwrap()));
                d.message("SET_VRING_KICK", |fe| fe.set_vring_kick(1, &*kick))?;
                for _ in 0..10 {
                    kick.write(1).unwrap();
                }
                Ok(())
            },
            qsd: Answer::Accepted,
            ours: &[Answer::Accepted],
            ours_log: None,
            why: "queue 1 has no size, addresses nor enable; both accept the fd and ignore its kicks",
        },
        MsgCase {
            name: "SET_VRING_ENABLE on a queue with a kick but no rings",
            send: |d| {
                let kick = Box::leak(Box::new(EventFd::new(EFD_NONBLOCK).unwrap()));
                d.message("SET_VRING_KICK", |fe| fe.set_vring_kick(1, &*kick))?;
                d.message("SET_VRING_ENABLE", |fe| fe.set_vring_enable(1, true))?;
                kick.write(1).unwrap();
                Ok(())
            },
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("not inside guest memory"),
            why: "qsd accepts it (and ignores the ring); ours: NACK (its rings are not in guest memory), ends the connection",
        },
        MsgCase {
            name: "SET_VRING_KICK for a queue past num_queues",
            send: |d| {
                let kick = EventFd::new(EFD_NONBLOCK).unwrap();
                raw_acked(d, code::SET_VRING_KICK, &vring_fd_body(2, false), &[kick.as_raw_fd()])
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("queue 2 does not exist"),
            why: "GET_QUEUE_NUM said 2; qsd: vu_panic (invalid queue index), hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_CALL for a queue past num_queues",
            send: |d| {
                let call = EventFd::new(EFD_NONBLOCK).unwrap();
                raw_acked(d, code::SET_VRING_CALL, &vring_fd_body(200, false), &[call.as_raw_fd()])
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("queue 200 does not exist"),
            why: "qsd: vu_panic, hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_ENABLE for a queue past num_queues",
            send: |d| raw_acked(d, code::SET_VRING_ENABLE, &vring_state(2, 1), &[]),
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("queue 2 does not exist"),
            why: "qsd: vu_panic, hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_VRING_NUM for a queue past num_queues",
            send: |d| raw_acked(d, code::SET_VRING_NUM, &vring_state(7, 256), &[]),
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("queue 7 does not exist"),
            why: "qsd acks it (index 7 < its 8 possible queues?); ours: NACK, ends the connection",
        },
        MsgCase {
            name: "GET_VRING_BASE for a queue past num_queues",
            send: |d| match d.raw_message(code::GET_VRING_BASE, 0, &vring_state(2, 0), &[], true)? {
                RawReply::Body(b) if b.len() == 8 => Ok(()),
                other => Err(format!("{other:?}")),
            },
            qsd: Answer::Died,
            ours: &[Answer::HungUp],
            ours_log: Some("queue 2 does not exist"),
            why: "no NACK exists for a message with its own reply; qsd dies (libvhost-user assertion qidx < dev->max_queues in vu_get_queue); ours: ends the connection without a reply",
        },
        MsgCase {
            name: "SET_VRING_NUM with a 4-byte body",
            send: |d| raw_acked(d, code::SET_VRING_NUM, &1u32.to_le_bytes(), &[]),
            qsd: Answer::Accepted,
            ours: &[Answer::HungUp],
            ours_log: Some("frontend connection ended"),
            why: "a body shorter than its type; qsd acks it; ours (the vhost crate): invalid message, ends the connection",
        },
        MsgCase {
            name: "unknown request code",
            send: |d| raw_acked(d, 99, &[], &[]),
            qsd: Answer::HungUp,
            ours: &[Answer::HungUp, REFUSED_CLOSED],
            ours_log: Some("frontend connection ended"),
            why: "vhost-user: unknown requests are an error; qsd: hangs up; ours (the vhost crate): ends the connection",
        },
        MsgCase {
            name: "SET_FEATURES with a bit never offered",
            send: |d| d.message("SET_FEATURES", |fe| fe.set_features(d_features() | 1 << 63)),
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("were not offered"),
            why: "virtio 1.2 §3.1.1: the driver acks only offered bits; qsd accepts it; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_MEM_TABLE with overlapping regions",
            send: |d| {
                let r0 = &d.mem().regions()[0];
                let (user, fd, size) = (r0.host_base(), r0.fd(), r0.size);
                let table = [region(GUEST_BASE, size, user, fd), region(GUEST_BASE + 0x1000, 0x10_0000, user, fd)];
                d.message("SET_MEM_TABLE", |fe| fe.set_mem_table(&table)).map(|_| ())
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("memory regions overlap"),
            why: "two regions over the same guest addresses; qsd: hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "ADD_MEM_REGION overlapping a region",
            send: |d| {
                let f = memfd(0x10_0000);
                let user = d.mem().host_base();
                let r = region(GUEST_BASE + 0x1000, 0x10_0000, user + 0x1000, f.as_raw_fd());
                d.message("ADD_MEM_REGION", |fe| fe.add_mem_region(&r)).map(|_| ())
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("memory regions overlap"),
            why: "qsd: hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_MEM_TABLE with a region past its memfd's end",
            send: |d| {
                let short = memfd(0x10_0000);
                let mut table: Vec<_> = d
                    .mem()
                    .regions()
                    .iter()
                    .map(|r| region(r.gpa, r.size, r.host_base(), r.fd()))
                    .collect();
                table.push(region(FAR_GPA, 0x20_0000, 1 << 46, short.as_raw_fd()));
                d.message("SET_MEM_TABLE", |fe| fe.set_mem_table(&table)).map(|_| ())
            },
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("do not fit in its file"),
            why: "2 MiB declared over a 1 MiB memfd (touching the rest would SIGBUS); qsd maps it and accepts; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "ADD_MEM_REGION past its memfd's end",
            send: |d| {
                let short = memfd(0x10_0000);
                let r = region(FAR_GPA, 0x20_0000, 1 << 46, short.as_raw_fd());
                d.message("ADD_MEM_REGION", |fe| fe.add_mem_region(&r)).map(|_| ())
            },
            qsd: Answer::Accepted,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("do not fit in its file"),
            why: "qsd maps it and accepts; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "REM_MEM_REG of a region that does not exist",
            send: |d| {
                let r = region(FAR_GPA, 0x10_0000, 1 << 46, d.mem().fd());
                d.message("REM_MEM_REG", |fe| fe.remove_mem_region(&r))
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("no memory region at guest address"),
            why: "qsd: hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "GET_CONFIG past the config space (256 bytes)",
            send: |d| {
                d.message("GET_CONFIG", |fe| {
                    fe.get_config(0, 256, VhostUserConfigFlags::empty(), &[0; 256])
                })
                .map(|_| ())
            },
            qsd: Answer::HungUp,
            ours: &[Answer::Accepted, REFUSED_OPEN],
            ours_log: None,
            why: "vhost-user: GET_CONFIG answers size 0 on failure; qsd never answers (the frontend gives up after 5 s); ours: answers, the bytes past the 60 of the config space read as 0",
        },
        MsgCase {
            name: "GET_CONFIG straddling the end of the config space",
            send: |d| {
                d.message("GET_CONFIG", |fe| {
                    fe.get_config(56, 8, VhostUserConfigFlags::empty(), &[0; 8])
                })
                .map(|_| ())
            },
            qsd: Answer::Accepted,
            ours: &[Answer::Accepted, REFUSED_OPEN],
            ours_log: None,
            why: "qsd and ours answer; ours: the 4 bytes past the end read as 0",
        },
        MsgCase {
            name: "SET_CONFIG on the capacity",
            send: |d| {
                d.message("SET_CONFIG", |fe| {
                    fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[0xff; 8])
                })
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("SET_CONFIG"),
            why: "virtio 1.2 §5.2.4: only writeback is writable; qsd: hangs up; ours: NACK, ends the connection",
        },
        MsgCase {
            name: "SET_CONFIG on writeback and the byte after",
            send: |d| {
                d.message("SET_CONFIG", |fe| {
                    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1, 1])
                })
            },
            qsd: Answer::HungUp,
            ours: &[REFUSED_CLOSED],
            ours_log: Some("SET_CONFIG"),
            why: "qsd: hangs up; ours: NACK, ends the connection",
        },
    ]
}

/// The features the frontend acks (what SET_FEATURES normally sends).
fn d_features() -> u64 {
    common::vhost_frontend::handshake::wanted_features(false)
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn frontend_opts() -> FrontendOptions {
    FrontendOptions {
        timeout: Duration::from_secs(5),
        reply_timeout: Duration::from_secs(5),
        ..FrontendOptions::default()
    }
}

/// A one-sector write and read-back on a fresh connection.
fn canary(d: &Daemon, model: &mut Model, sector: u64, byte: u8) -> Result<(), String> {
    let mut dev = d.try_connect_with(frontend_opts())?;
    let data = vec![byte; SECTOR];
    let w = dev.submit_write(0, sector, &data);
    let c = dev.wait(&w).map_err(|e| format!("canary write: {e}"))?;
    if c.status != Some(S_OK) {
        return Err(format!("canary write: {c:?}"));
    }
    model.write(sector, &data);
    let r = dev.submit_read(0, sector, SECTOR);
    let c = dev.wait(&r).map_err(|e| format!("canary read: {e}"))?;
    if c.status != Some(S_OK) || c.data != data {
        return Err(format!("canary read: status {:?}, data differs", c.status));
    }
    Ok(())
}

fn lines_with(log: &str, from: usize, what: &str) -> usize {
    log.lines().skip(from).filter(|l| l.contains(what)).count()
}

/// A fresh connection reads the whole disk as the model says; then the
/// daemon exits cleanly on SIGTERM.
fn check_whole_disk_and_stop(d: Daemon, model: &Model, what: &str) {
    let mut dev = d.connect_with(frontend_opts());
    let all = dev.read(0, 0, to_usize(SECTORS) * SECTOR).ok(what);
    model.check(0, &all, what);
    drop(dev);
    d.terminate_ok();
}

fn message_catalogue(peer: Peer) {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-hostile-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0xe71);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let mut d = Daemon::start(peer, dir.path(), &image, &opts);
    let files: Vec<PathBuf> = [d.writable_files(), d.read_only_files()].concat();
    let mut failures = Vec::new();
    let mut table = String::new();
    // Refusals are logged at most once a second per cause: space the
    // cases that expect a line so each gets its own.
    let mut last_logged: Option<std::time::Instant> = None;
    for (i, case) in catalogue().iter().enumerate() {
        if peer == Peer::Ours && case.ours_log.is_some() {
            if let Some(t) = last_logged {
                let gap = Duration::from_millis(1050);
                if let Some(left) = gap.checked_sub(t.elapsed()) {
                    std::thread::sleep(left);
                }
            }
        }
        let log_from = d.log_text().lines().count();
        let before = snapshot(&files);
        let mut dev = d.connect_with(frontend_opts());
        let r = (case.send)(&mut dev);
        let closed = peer_closed(dev.socket_fd(), Duration::from_millis(500));
        let died = closed && {
            std::thread::sleep(Duration::from_millis(100));
            !d.running()
        };
        let got = match &r {
            _ if died => Answer::Died,
            Ok(()) if !closed => Answer::Accepted,
            Ok(()) => Answer::HungUp,
            Err(e) if e.contains("BackendInternalError") => Answer::Refused { closed },
            Err(_) if closed => Answer::HungUp,
            Err(e) => {
                failures.push(format!("{}: {e} (connection still open)", case.name));
                Answer::Refused { closed }
            }
        };
        table.push_str(&format!(
            "{:<55} {got:?}  {}\n",
            case.name,
            r.err().unwrap_or_default()
        ));
        let ok = match peer {
            Peer::Ours => case.ours.contains(&got),
            Peer::Qsd => case.qsd == got,
        };
        if !ok {
            let want = match peer {
                Peer::Ours => format!("{:?}", case.ours),
                Peer::Qsd => format!("{:?}", case.qsd),
            };
            failures.push(format!(
                "{}: got {got:?}, want {want} ({})",
                case.name, case.why
            ));
        }
        // An accepted message leaves a connection that still serves queue 0.
        if got == Answer::Accepted {
            let data = dev.read(0, 0, SECTOR);
            if data.status != Some(S_OK) {
                failures.push(format!("{}: same connection, read: {data:?}", case.name));
            }
        }
        drop(dev);
        if !d.running() {
            if peer == Peer::Ours {
                failures.push(format!("{}: the daemon died:\n{}", case.name, d.log_text()));
                break;
            }
            // The reference died: record it and go on with a new one
            // (it serves the same file).
            drop(d);
            d = Daemon::start(peer, dir.path(), &image, &opts);
        }
        if let Err(e) = canary(
            &d,
            &mut model,
            64 + 8 * i as u64,
            u8::try_from(i + 1).unwrap(),
        ) {
            failures.push(format!("{}: the next connection: {e}", case.name));
        }
        let after = snapshot(&files);
        if after[1..] != before[1..] {
            failures.push(format!("{}: a read-only file changed", case.name));
        }
        if peer == Peer::Ours {
            // Let the daemon log the connection's end before counting.
            std::thread::sleep(Duration::from_millis(50));
            if case.ours_log.is_some() {
                // Its line is logged by now: the next one waits from here.
                last_logged = Some(std::time::Instant::now());
            }
            let log = d.log_text();
            match case.ours_log {
                Some(what) => {
                    // The handler's own line (the connection's end repeats
                    // it: "frontend connection ended: ...").
                    let n = log
                        .lines()
                        .skip(log_from)
                        .filter(|l| l.contains(what))
                        .filter(|l| {
                            l.contains("frontend message refused")
                                || what.starts_with("frontend connection ended")
                        })
                        .count();
                    if n != 1 {
                        failures.push(format!(
                            "{}: {n} new log lines mention {what:?}, want 1:\n{}",
                            case.name,
                            log.lines().skip(log_from).collect::<Vec<_>>().join("\n")
                        ));
                    }
                }
                None => {
                    let n = lines_with(&log, log_from, "refused");
                    if n != 0 {
                        failures.push(format!("{}: {n} new log lines say refused", case.name));
                    }
                }
            }
        }
    }
    eprintln!("{peer:?} answers:\n{table}");
    check_whole_disk_and_stop(d, &model, "whole disk after the message catalogue");
    assert!(
        failures.is_empty(),
        "{peer:?}:\n{}\n\nall answers:\n{table}",
        failures.join("\n")
    );
}

/// Makes the avail index of queue 0 run 300 entries ahead of a 256-entry
/// ring (virtio 1.2 §2.7.13.3: it may be at most the queue size ahead),
/// then kicks 100 times.
///
/// Ours: the ring is marked broken with one log line however many kicks
/// follow, queue 1 and the connection keep working, and once the frontend
/// sets the ring up again it serves again. qsd: vu_panic ("Guest moved
/// avail index"), it hangs up; the next connection works.
fn avail_index_overrun(peer: Peer) {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-overrun-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0x0e1);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let mut d = Daemon::start(peer, dir.path(), &image, &opts);
    let mut dev = d.connect_with(FrontendOptions {
        num_queues: 2,
        ..frontend_opts()
    });
    dev.read(0, 0, SECTOR).ok("read before");
    let log_from = d.log_text().lines().count();
    let idx = dev.queue(0).avail_idx().wrapping_add(300);
    dev.publish_avail_idx(0, idx);
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(2));
        dev.kick(0);
    }
    let closed = peer_closed(dev.socket_fd(), Duration::from_millis(500));
    eprintln!("{peer:?}: after the overrun and 100 kicks, connection closed: {closed}");
    assert!(d.running(), "{peer:?} died:\n{}", d.log_text());
    match peer {
        Peer::Qsd => {
            // Recorded, not required: qsd logs vu_panic and stops the
            // device; whether the socket closes is its business.
            eprintln!("qsd log:\n{}", d.log_text());
            drop(dev);
        }
        Peer::Ours => {
            assert!(!closed, "ours hung up:\n{}", d.log_text());
            let log = d.log_text();
            let n = lines_with(
                &log,
                log_from,
                "not served until the frontend sets it up again",
            );
            assert_eq!(
                n,
                1,
                "log lines about the broken ring after 100 kicks:\n{}",
                log.lines().skip(log_from).collect::<Vec<_>>().join("\n")
            );
            // The other queue and the connection go on.
            let data = vec![0x5a; SECTOR];
            dev.write(1, 10, &data).ok("write on queue 1");
            model.write(10, &data);
            assert_eq!(dev.read(1, 10, SECTOR).ok("read on queue 1"), data);
            dev.message("GET_CONFIG", |fe| {
                fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0; 60])
            })
            .expect("GET_CONFIG after the overrun");
            // Set up again (QEMU's sequence for a ring): it serves again.
            dev.reset_queue(0, true).expect("setting queue 0 up again");
            let data = vec![0xa5; SECTOR];
            dev.write(0, 11, &data)
                .ok("write on queue 0 after the reset");
            model.write(11, &data);
            assert_eq!(
                dev.read(0, 11, SECTOR)
                    .ok("read on queue 0 after the reset"),
                data
            );
            assert_eq!(
                lines_with(&d.log_text(), log_from, "not served until"),
                1,
                "more broken-ring lines after the reset"
            );
            dev.disconnect().expect("clean disconnect");
        }
    }
    canary(&d, &mut model, 20, 0x77).expect("the next connection");
    check_whole_disk_and_stop(d, &model, "whole disk after the overrun");
}

/// Ours only: NUM/BASE/ADDR alone (no new kick fd nor SET_VRING_ENABLE)
/// after an overrun set the broken ring up again; it is served at its
/// next kick.
#[test]
fn ours_overrun_then_num_base_addr_only() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-overrun2-")
        .tempdir()
        .unwrap();
    let (image, _model) = make_cow(dir.path(), SECTORS, 0x0e2);
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &ServeOptions::default());
    let mut dev = d.connect_with(frontend_opts());
    let idx = dev.queue(0).avail_idx().wrapping_add(300);
    dev.publish_avail_idx(0, idx);
    std::thread::sleep(Duration::from_millis(200));
    dev.reset_queue(0, false).expect("NUM/BASE/ADDR");
    let p = dev.submit_read(0, 0, SECTOR);
    let r = dev.wait_timeout(&p, Duration::from_secs(2));
    assert!(
        r.is_ok(),
        "not served after NUM/BASE/ADDR: {r:?}\n{}",
        d.log_text()
    );
}

/// A read-only disk whose frontend did not ack VIRTIO_BLK_F_RO (a driver
/// that ignores it): every write is still refused with IOERR, and no
/// file changes.
fn read_only_without_ro_ack(peer: Peer) {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-ro-noack-")
        .tempdir()
        .unwrap();
    let (image, model) = make_cow(dir.path(), SECTORS, 0x0e3);
    let opts = ServeOptions {
        read_only: true,
        ..ServeOptions::default()
    };
    let mut d = Daemon::start(peer, dir.path(), &image, &opts);
    let files: Vec<PathBuf> = [d.writable_files(), d.read_only_files()].concat();
    let before = snapshot(&files);
    let mut dev = d.connect_with(FrontendOptions {
        refuse_features: 1 << feature::BLK_RO,
        ..frontend_opts()
    });
    assert!(
        dev.offered_features & (1 << feature::BLK_RO) != 0,
        "{peer:?} does not offer RO on a read-only disk"
    );
    assert!(!dev.has_feature(feature::BLK_RO));
    let mut answers = Vec::new();
    let w = dev.write(0, 8, &[0x99; 4096]);
    answers.push(("OUT", w.status));
    let dz = dev.discard(0, &[(8, 8, 0)]);
    answers.push(("DISCARD", dz.status));
    let wz = dev.write_zeroes(0, &[(8, 8)], false);
    answers.push(("WRITE_ZEROES", wz.status));
    let wzu = dev.write_zeroes(0, &[(16, 8)], true);
    answers.push(("WRITE_ZEROES unmap", wzu.status));
    eprintln!("{peer:?} answers: {answers:?}");
    for (what, st) in &answers {
        assert_eq!(*st, Some(S_IOERR), "{peer:?}: {what} on a read-only disk");
    }
    let all = dev.read(0, 0, to_usize(SECTORS) * SECTOR).ok("whole disk");
    model.check(0, &all, "read-only disk after refused writes");
    drop(dev);
    assert!(d.running(), "{peer:?} died:\n{}", d.log_text());
    assert!(
        snapshot(&files) == before,
        "{peer:?}: a file of the read-only disk changed"
    );
    let st = d.terminate();
    assert!(
        st.status.success(),
        "exit status {}:\n{}",
        st.status,
        st.log
    );
}

/// A frontend that hangs up (no GET_VRING_BASE) with 64 writes in flight
/// on two queues: the daemon stays up, the next connection works, and
/// every sector reads either its old or its new contents, stably.
fn disconnect_with_requests_in_flight(peer: Peer) {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-inflight-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0x0e4);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let mut d = Daemon::start(peer, dir.path(), &image, &opts);
    let old = {
        let mut dev = d.connect_with(frontend_opts());
        dev.read(0, 0, to_usize(SECTORS) * SECTOR).ok("before")
    };
    let mut dev = d.connect_with(FrontendOptions {
        num_queues: 2,
        ..frontend_opts()
    });
    const N: u64 = 64;
    const LEN: u64 = 8; // sectors per write
    for i in 0..N {
        let data = vec![0x80 | i.to_le_bytes()[0]; to_usize(LEN * SECTOR as u64)];
        let _ = dev.submit_write((i % 2) as usize, 128 + i * LEN, &data);
    }
    drop(dev);
    assert!(d.running(), "{peer:?} died:\n{}", d.log_text());
    let start = Instant::now();
    let mut dev = loop {
        match d.try_connect_with(frontend_opts()) {
            Ok(dev) => break dev,
            // qemu-storage-daemon 10.0 sometimes dies here (an assertion in
            // vhost_user_server_inc_in_flight): the reference's answer, not
            // ours to fail on.
            Err(e) if peer == Peer::Qsd && !d.running() => {
                eprintln!("Qsd died after the hang-up ({e}):\n{}", d.log_text());
                return;
            }
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("reconnect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!(
                "{peer:?}: no connection after the hang-up: {e}\n{}",
                d.log_text()
            ),
        }
    };
    let now = dev
        .read(0, 0, to_usize(SECTORS) * SECTOR)
        .ok("after the hang-up");
    let mut new_sectors = 0;
    for s in 0..SECTORS {
        let r = to_usize(s * SECTOR as u64)..to_usize((s + 1) * SECTOR as u64);
        let got = &now[r.clone()];
        let in_write = (128..128 + N * LEN).contains(&s);
        let new = vec![0x80 | ((s - 128.min(s)) / LEN).to_le_bytes()[0]; SECTOR];
        if got == &old[r.clone()] {
            continue;
        }
        assert!(
            in_write && got == &new[..],
            "{peer:?}: sector {s} is neither its old nor its new contents"
        );
        new_sectors += 1;
        model.write(s, got);
    }
    eprintln!(
        "{peer:?}: {new_sectors} of {} sectors written before the hang-up took effect",
        N * LEN
    );
    std::thread::sleep(Duration::from_millis(200));
    let again = dev.read(0, 0, to_usize(SECTORS) * SECTOR).ok("again");
    assert!(
        again == now,
        "{peer:?}: the disk changed after the next connection read it"
    );
    drop(dev);
    canary(&d, &mut model, 8, 0x42).expect("a write and read afterwards");
    check_whole_disk_and_stop(d, &model, "whole disk at the end");
}

/// The memfd under the request buffers is truncated after the daemon
/// mapped it (the check at SET_MEM_TABLE passed): its next access to them
/// must not kill it.
#[test]
fn ours_survives_memfd_truncated_after_mapping() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-e2e-sigbus-")
        .tempdir()
        .unwrap();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 0x0e5);
    let mut d = Daemon::start(Peer::Ours, dir.path(), &image, &ServeOptions::default());
    let mut dev = d.connect_with(frontend_opts());
    dev.read(0, 0, SECTOR).ok("read before");
    // Stop the ring, make a request available, cut the memfd after the
    // rings (3 pages: the buffers go), start the ring again.
    dev.message("SET_VRING_ENABLE 0", |fe| fe.set_vring_enable(0, false))
        .expect("SET_VRING_ENABLE 0");
    let _p = dev.submit_read(0, 0, SECTOR);
    let rings_end = dev.queue(0).used_gpa + 4096 - GUEST_BASE;
    dev.mem().regions()[0].truncate_file(rings_end);
    let r = dev.message("SET_VRING_ENABLE 1", |fe| fe.set_vring_enable(0, true));
    std::thread::sleep(Duration::from_millis(500));
    let alive = d.running();
    let log = d.log_text();
    // Never touch the truncated buffers from here on: forget the mapping.
    std::mem::forget(dev);
    if !alive {
        let st = d.terminate();
        panic!(
            "the daemon died after the truncation ({}; SET_VRING_ENABLE: {r:?}):\n{log}",
            st.status
        );
    }
    canary(&d, &mut model, 30, 0x31).expect("the next connection");
    let st = d.terminate();
    assert!(
        st.status.success(),
        "exit status {}:\n{}",
        st.status,
        st.log
    );
}
