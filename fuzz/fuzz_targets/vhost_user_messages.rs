//! The backend's handling of a fuzzed stream of vhost-user frontend
//! messages, against an in-process backend as `src/daemon/serve.rs` drives
//! it: a `FrontendHandler` per input behind `BackendReqHandler`, fed through
//! one end of a `UnixStream::pair()`; `handle_request()` until it errors or
//! the input is consumed, then `disconnect()`.
//!
//! Input: one control byte, then the message stream.
//! * bit 0: "with fds": the stream is cut into messages by their headers
//!   (12 bytes: request, flags, size; then `size` payload bytes, at most 64
//!   messages) and each is sent with its own sendmsg, carrying the file
//!   descriptors its request wants: memfds sized as the regions ask (at most
//!   4 MiB each) for SET_MEM_TABLE and ADD_MEM_REG, an eventfd for
//!   SET_VRING_KICK / CALL / ERR unless the payload says "no fd", a small
//!   memfd for SET_LOG_BASE, SET_INFLIGHT_FD and SET_DEVICE_STATE_FD.
//!   Each message is handled before the next is sent. Two pseudo-messages
//!   are the guest's doing, not sent: request 0x7f00_0000 writes its
//!   payload after a u32 offset (mod 1 MiB) into the memfd of the last
//!   memory region sent, 0x7f00_0001 kicks the queue of its first payload
//!   byte (writes the last kick eventfd sent for it), so that started rings
//!   carry real requests to the worker.
//!   Without bit 0 the bytes are written as they are, and messages that need
//!   fds get none (which exercises the refusals).
//! * bit 1: the read-only device instead of the writable one;
//! * bits 2-3: number of queues offered (1 + value).
//!
//! The writer end is non-blocking and shut down after writing, so the
//! backend's reads end with EOF; replies are drained after every request.
//! `FUZZ_TRACE=1` prints each `handle_request()` result.
//! One device (a small raw image) and worker pool per access mode, started
//! once per process, with one thread and the `threads` engine.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use vhost_user_cow::daemon::device::{CacheMode, Device, DeviceOptions};
use vhost_user_cow::daemon::protocol::{FrontendHandler, ProtocolOptions};
use vhost_user_cow::daemon::worker_thread::{WorkerOptions, WorkerPool};
use vhost_user_cow::format::DiskFormat;
use vhost_user_cow::io_engine::EngineKind;

const MAX_INPUT: usize = 64 * 1024;
const MAX_MESSAGES: usize = 64;
const MAX_MEMFD: u64 = 4 << 20;

struct Backend {
    dev: Arc<Device>,
    pool: Arc<WorkerPool>,
}

static BACKENDS: OnceLock<[Backend; 2]> = OnceLock::new();

fn backend(read_only: bool) -> &'static Backend {
    let b = BACKENDS.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fuzz-vhost-user-")
            .tempdir()
            .expect("temp dir");
        let mk = |name: &str, read_only: bool| {
            let path = dir.path().join(name);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            let dev = Arc::new(
                Device::open(
                    &DeviceOptions {
                        disk: path,
                        backing: None,
                        format: Some(DiskFormat::Raw),
                        read_only,
                        cache: CacheMode::Buffered,
                        serial: Some("fuzz".into()),
                        throttle: Vec::new(),
                        bitmap_cache: vhost_user_cow::daemon::device::DEFAULT_BITMAP_CACHE,
                    },
                    1,
                )
                .expect("open the device"),
            );
            let pool = Arc::new(
                WorkerPool::start(
                    dev.clone(),
                    &WorkerOptions {
                        threads: 1,
                        engine: EngineKind::Threads,
                        queue_depth: 16,
                        poll: Duration::ZERO,
                        inline_writes: false,
                    },
                    Arc::new(vhost_user_cow::daemon::request_stats::RequestStats::new(1)),
                )
                .expect("start the workers"),
            );
            Backend { dev, pool }
        };
        let b = [mk("rw.img", false), mk("ro.img", true)];
        // The files stay open; their names are not needed any more.
        drop(dir);
        b
    });
    &b[usize::from(read_only)]
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just created and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fd is a valid memfd.
    unsafe { libc::ftruncate(fd.as_raw_fd(), len.min(MAX_MEMFD) as libc::off_t) };
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: a plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd was just created and is ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A region's (memory_size, mmap_offset) at `off` of a payload.
fn region_len(payload: &[u8], off: usize) -> u64 {
    let size = u64_at(payload, off + 8).unwrap_or(0);
    let offset = u64_at(payload, off + 24).unwrap_or(0);
    size.saturating_add(offset)
}

/// The file descriptors a message would come with.
fn fds_for(request: u32, payload: &[u8]) -> Vec<OwnedFd> {
    match request {
        // SET_MEM_TABLE: num_regions, padding, then 32-byte regions.
        5 => {
            let n = u32_at(payload, 0).unwrap_or(0).min(8) as usize;
            (0..n)
                .map(|i| memfd(region_len(payload, 8 + 32 * i)))
                .collect()
        }
        // ADD_MEM_REG: padding, then one region.
        37 => vec![memfd(region_len(payload, 8))],
        // SET_VRING_KICK / CALL / ERR: bit 8 says "no fd".
        12..=14 if u64_at(payload, 0).unwrap_or(0) & 0x100 == 0 => vec![eventfd()],
        // SET_LOG_BASE, SET_INFLIGHT_FD, SET_DEVICE_STATE_FD.
        6 | 32 | 42 => vec![memfd(4096)],
        _ => Vec::new(),
    }
}

/// Pseudo-messages of the "with fds" mode, acted on by the harness as the
/// guest (never sent): write guest memory, kick a queue.
const FUZZ_WRITE_MEMORY: u32 = 0x7f00_0000;
const FUZZ_KICK: u32 = 0x7f00_0001;

/// What the "frontend" keeps of the fds it sent: the memfd of the last
/// memory region it sent, and per queue the last kick eventfd.
#[derive(Default)]
struct Guest {
    memory: Option<OwnedFd>,
    /// The last region sent: (user address, size, mmap offset).
    region: (u64, u64, u64),
    kicks: Vec<(u8, OwnedFd)>,
    /// Per queue, the avail and used rings' user addresses.
    rings: Vec<(u8, u64, u64)>,
}

impl Guest {
    fn act(&mut self, request: u32, payload: &[u8]) {
        match request {
            FUZZ_WRITE_MEMORY => {
                let (Some(fd), Some(off)) = (&self.memory, u32_at(payload, 0)) else {
                    return;
                };
                let bytes = &payload[4..];
                // SAFETY: plain pwrite from a live buffer to an fd we own.
                unsafe {
                    libc::pwrite(
                        fd.as_raw_fd(),
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        libc::off_t::from(off % (1 << 20)),
                    )
                };
            }
            FUZZ_KICK => {
                let q = payload.first().copied().unwrap_or(0);
                if let Some((_, fd)) = self.kicks.iter().rev().find(|(i, _)| *i == q) {
                    let one = 1u64.to_ne_bytes();
                    // SAFETY: an 8-byte write to an eventfd we own.
                    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
                    self.wait_for_worker(q);
                }
            }
            _ => {}
        }
    }

    /// A u16 of guest memory at a frontend (user) address, if it is in
    /// the last region sent.
    fn read_u16(&self, user: u64) -> Option<u16> {
        let fd = self.memory.as_ref()?;
        let (base, size, offset) = self.region;
        let off = user.checked_sub(base).filter(|o| o + 2 <= size)? + offset;
        let mut b = [0u8; 2];
        // SAFETY: pread into a live buffer from an fd we own.
        let n =
            unsafe { libc::pread(fd.as_raw_fd(), b.as_mut_ptr().cast(), 2, off as libc::off_t) };
        (n == 2).then(|| u16::from_le_bytes(b))
    }

    /// After a kick: waits (at most 5 ms) until the worker has published
    /// every request made available, so that the next message (which may
    /// stop the ring) does not race with it and the run is repeatable.
    fn wait_for_worker(&self, q: u8) {
        let Some(&(_, avail, used)) = self.rings.iter().rev().find(|r| r.0 == q) else {
            return;
        };
        let deadline = std::time::Instant::now() + Duration::from_millis(5);
        while std::time::Instant::now() < deadline {
            match (self.read_u16(avail + 2), self.read_u16(used + 2)) {
                (Some(a), Some(u)) if a != u => std::thread::sleep(Duration::from_micros(20)),
                _ => return,
            }
        }
    }

    /// Keeps what it will need of the fds sent with `request`.
    fn keep(&mut self, request: u32, payload: &[u8], fds: &[OwnedFd]) {
        // SET_VRING_ADDR: index, flags, descriptor, used, available, log.
        if request == 9 {
            if let (Some(i), Some(used), Some(avail)) =
                (u32_at(payload, 0), u64_at(payload, 16), u64_at(payload, 24))
            {
                self.rings.push((i as u8, avail, used));
            }
        }
        let Some(first) = fds.first() else {
            return;
        };
        let dup = || first.try_clone().ok();
        match request {
            5 | 37 => {
                self.memory = dup();
                // The (first) region follows 8 bytes in both messages.
                let r = 8;
                self.region = (
                    u64_at(payload, r + 16).unwrap_or(0),
                    u64_at(payload, r + 8).unwrap_or(0),
                    u64_at(payload, r + 24).unwrap_or(0),
                );
            }
            12 => {
                if let Some(fd) = dup() {
                    self.kicks.push((payload.first().copied().unwrap_or(0), fd));
                }
            }
            _ => {}
        }
    }
}

/// The "with fds" mode: message by message, each sent with its fds and
/// handled before the next, pseudo-messages acted on in between.
fn run_with_fds<S: vhost::vhost_user::VhostUserBackendReqHandler>(
    frontend: &mut UnixStream,
    req: &mut BackendReqHandler<S>,
    mut stream: &[u8],
) {
    let mut guest = Guest::default();
    for _ in 0..MAX_MESSAGES {
        if stream.is_empty() {
            break;
        }
        let (request, size) = match (u32_at(stream, 0), u32_at(stream, 8)) {
            (Some(r), Some(s)) => (r, s as usize),
            _ => (0, 0),
        };
        let len = 12usize.saturating_add(size).min(stream.len());
        let (msg, rest) = stream.split_at(len);
        stream = rest;
        let payload = msg.get(12..).unwrap_or(&[]);
        if matches!(request, FUZZ_WRITE_MEMORY | FUZZ_KICK) {
            guest.act(request, payload);
            continue;
        }
        let fds = fds_for(request, payload);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        match frontend.send_with_fds(&[msg], &raw) {
            Ok(n) if n == msg.len() => {}
            _ => break,
        }
        guest.keep(request, payload, &fds);
        if stream.is_empty() || msg.len() < 12 + size {
            // The last message: the backend must see EOF, not wait.
            frontend.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let r = req.handle_request();
        if trace() {
            eprintln!("handle_request {request}: {r:?}");
            for &(q, avail, used) in &guest.rings {
                eprintln!(
                    "  queue {q}: avail idx {:?}, used idx {:?}",
                    guest.read_u16(avail + 2),
                    guest.read_u16(used + 2)
                );
            }
        }
        drain(frontend);
        if r.is_err() {
            return;
        }
    }
}

/// FUZZ_TRACE=1 prints what each request did (to check seeds by hand).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fn drain(sock: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let stream = &stream[..stream.len().min(MAX_INPUT)];
    let b = backend(control & 2 != 0);
    let opts = ProtocolOptions {
        num_queues: 1 + u16::from((control >> 2) & 3),
        max_queue_size: 256,
    };
    let handler = FrontendHandler::new(b.dev.clone(), b.pool.clone(), opts).expect("handler");
    let handler = Arc::new(Mutex::new(handler));

    let (mut frontend, backend_end) = UnixStream::pair().expect("socketpair");
    frontend.set_nonblocking(true).unwrap();
    let mut req = BackendReqHandler::from_stream(backend_end, handler.clone());
    if control & 1 != 0 {
        run_with_fds(&mut frontend, &mut req, stream);
    } else {
        let _ = frontend.write(stream);
        frontend.shutdown(std::net::Shutdown::Write).unwrap();
        // Each request consumes at least a header; the bound only guards
        // against a handler that would consume nothing.
        for _ in 0..=stream.len() / 12 + 1 {
            let r = req.handle_request();
            if trace() {
                eprintln!("handle_request: {r:?}");
            }
            drain(&mut frontend);
            if r.is_err() {
                break;
            }
        }
    }
    drop(req);
    handler.lock().unwrap().disconnect();
    // The connection's I/O has finished: nothing is left in the write path.
    {
        let sched = b.dev.sched();
        assert!(
            sched.is_idle(),
            "scheduler busy after disconnect: {sched:?}"
        );
        assert_eq!(sched.copy_up_records(), 0);
    }
    if trace() {
        eprintln!("write path: {:?}", b.dev.sched().stats());
    }
});
