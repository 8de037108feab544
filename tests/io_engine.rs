//! Behaviour tests run against both I/O engines, alone and behind
//! `InlineWrites`, through one shared body.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use vhost_user_cow::io_engine::{
    new_engine, Completion, EngineError, EngineKind, InlineWrites, IoEngine, IoOp, IoVecs,
    SubmitError, ThreadsEngine, UringEngine,
};
use vhost_user_cow::units::to_usize;

type Maker = fn(usize) -> Option<Box<dyn IoEngine>>;

fn make_uring(qd: usize) -> Option<Box<dyn IoEngine>> {
    match UringEngine::new(qd) {
        Ok(e) => Some(Box::new(e)),
        // Sandboxes without io_uring: there is nothing to test here, but
        // say so loudly instead of passing silently.
        Err(EngineError::Uring(e))
            if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) =>
        {
            eprintln!("SKIPPED: io_uring not available here: {e}");
            None
        }
        Err(e) => panic!("io_uring engine setup failed: {e}"),
    }
}

fn make_threads(qd: usize) -> Option<Box<dyn IoEngine>> {
    Some(Box::new(ThreadsEngine::new(qd, 3).expect("thread engine")))
}

fn make_uring_inline(qd: usize) -> Option<Box<dyn IoEngine>> {
    Some(Box::new(InlineWrites::new(make_uring(qd)?)))
}

fn make_threads_inline(qd: usize) -> Option<Box<dyn IoEngine>> {
    Some(Box::new(InlineWrites::new(make_threads(qd)?)))
}

fn tmpfile(len: u64) -> File {
    let f = tempfile::tempfile().expect("tempfile");
    f.set_len(len).expect("set_len");
    f
}

/// Splits `buf` into segments at the given cut points.
fn iovecs(buf: &mut [u8], cuts: &[usize]) -> IoVecs {
    let mut v = IoVecs::new();
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&buf.len())) {
        v.push(buf[start..c].as_mut_ptr(), c - start);
        start = c;
    }
    v
}

/// Submits one op, waits for it and returns its completion.
fn run(e: &mut dyn IoEngine, op: IoOp, user_data: u64) -> Completion {
    // SAFETY: the caller's buffers outlive this call, which waits for the
    // completion.
    unsafe { e.submit(op, user_data) }.expect("submit");
    e.flush().expect("flush");
    e.wait(1).expect("wait");
    let mut out = Vec::new();
    e.reap(&mut out);
    assert_eq!(out.len(), 1, "exactly one completion: {out:?}");
    assert_eq!(out[0].user_data, user_data);
    assert_eq!(e.in_flight(), 0);
    out[0]
}

fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
    r == 1 && p.revents & libc::POLLIN != 0
}

fn roundtrip_multi_iovec(mk: Maker) {
    let Some(mut e) = mk(8) else { return };
    let f = tmpfile(0);
    let fd = f.as_raw_fd();
    let mut data: Vec<u8> = (0..4096u32).map(|i| ((i * 7 + 3) & 0xff) as u8).collect();
    let iov = iovecs(&mut data, &[512, 1512]);
    let c = run(
        &mut *e,
        IoOp::Writev {
            fd,
            offset: 8192,
            iov,
        },
        1,
    );
    assert_eq!(c.result, Ok(4096));
    // Single segment write (plain WRITE opcode path).
    let mut one = vec![0x5au8; 100];
    let c = run(
        &mut *e,
        IoOp::Writev {
            fd,
            offset: 100,
            iov: iovecs(&mut one, &[]),
        },
        2,
    );
    assert_eq!(c.result, Ok(100));

    // Read back with a different split, more segments than stored inline.
    let mut back = vec![0u8; 4096];
    let iov = iovecs(&mut back, &[1, 2, 3, 1000, 4000]);
    assert_eq!(iov.len(), 6);
    let c = run(
        &mut *e,
        IoOp::Readv {
            fd,
            offset: 8192,
            iov,
        },
        3,
    );
    assert_eq!(c.result, Ok(4096));
    assert_eq!(back, data);

    let mut single = vec![0u8; 300];
    let c = run(
        &mut *e,
        IoOp::Readv {
            fd,
            offset: 0,
            iov: iovecs(&mut single, &[]),
        },
        4,
    );
    assert_eq!(c.result, Ok(300));
    assert!(single[..100].iter().all(|&b| b == 0));
    assert!(single[100..200].iter().all(|&b| b == 0x5a));
    assert!(single[200..].iter().all(|&b| b == 0));

    // Cross-check through the ordinary file API.
    let mut check = vec![0u8; 4096];
    f.read_exact_at(&mut check, 8192).expect("read");
    assert_eq!(check, data);
}

fn fdatasync_completes(mk: Maker) {
    let Some(mut e) = mk(4) else { return };
    let mut f = tmpfile(0);
    f.write_all(b"hello").expect("write");
    let c = run(&mut *e, IoOp::Fdatasync { fd: f.as_raw_fd() }, 9);
    assert_eq!(c.result, Ok(0));
}

fn punch_hole_reads_zeros(mk: Maker) {
    let Some(mut e) = mk(4) else { return };
    let mut f = tmpfile(0);
    f.write_all(&vec![0xaau8; 16384]).expect("write");
    let fd = f.as_raw_fd();
    let c = run(
        &mut *e,
        IoOp::Fallocate {
            fd,
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset: 4096,
            len: 4096,
        },
        5,
    );
    if c.result == Err(libc::EOPNOTSUPP) {
        eprintln!("SKIPPED: temp file system cannot punch holes");
        return;
    }
    assert_eq!(c.result, Ok(0));
    let mut back = vec![0x11u8; 16384];
    let c = run(
        &mut *e,
        IoOp::Readv {
            fd,
            offset: 0,
            iov: iovecs(&mut back, &[6000]),
        },
        6,
    );
    assert_eq!(c.result, Ok(16384));
    assert!(back[..4096].iter().all(|&b| b == 0xaa));
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert!(back[8192..].iter().all(|&b| b == 0xaa));
    assert_eq!(f.seek(SeekFrom::End(0)).expect("seek"), 16384);
}

fn short_read_at_eof(mk: Maker) {
    let Some(mut e) = mk(4) else { return };
    let mut f = tmpfile(0);
    f.write_all(&vec![0x33u8; 1000]).expect("write");
    let fd = f.as_raw_fd();
    let mut buf = vec![0xffu8; 4096];
    let c = run(
        &mut *e,
        IoOp::Readv {
            fd,
            offset: 0,
            iov: iovecs(&mut buf, &[700]),
        },
        1,
    );
    assert_eq!(c.result, Ok(1000));
    assert!(buf[..1000].iter().all(|&b| b == 0x33));
    assert!(buf[1000..].iter().all(|&b| b == 0xff), "tail untouched");
    let c = run(
        &mut *e,
        IoOp::Readv {
            fd,
            offset: 5000,
            iov: iovecs(&mut buf, &[]),
        },
        2,
    );
    assert_eq!(c.result, Ok(0));
}

fn full_at_capacity_then_recovers(mk: Maker) {
    let Some(mut e) = mk(4) else { return };
    assert_eq!(e.capacity(), 4);
    let f = tmpfile(4096);
    let fd = f.as_raw_fd();
    for i in 0..4 {
        // SAFETY: no memory involved.
        unsafe { e.submit(IoOp::Fdatasync { fd }, i) }.expect("room");
    }
    assert_eq!(e.in_flight(), 4);
    // SAFETY: no memory involved.
    match unsafe { e.submit(IoOp::Fdatasync { fd }, 99) } {
        Err(SubmitError::Full(IoOp::Fdatasync { fd: back })) => assert_eq!(back, fd),
        other => panic!("expected Full, got {other:?}"),
    }
    e.flush().expect("flush");
    // Still full until completions are reaped, even once they finished.
    e.wait(4).expect("wait");
    // SAFETY: no memory involved.
    let r = unsafe { e.submit(IoOp::Fdatasync { fd }, 99) };
    assert!(matches!(r, Err(SubmitError::Full(_))));
    let mut out = Vec::new();
    e.reap(&mut out);
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|c| c.result == Ok(0)));
    let mut ids: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert_eq!(e.in_flight(), 0);
    let c = run(&mut *e, IoOp::Fdatasync { fd }, 99);
    assert_eq!(c.result, Ok(0));
}

fn errors_come_back_as_errno(mk: Maker) {
    let Some(mut e) = mk(4) else { return };
    let mut buf = vec![0u8; 512];
    let c = run(
        &mut *e,
        IoOp::Readv {
            fd: -1,
            offset: 0,
            iov: iovecs(&mut buf, &[]),
        },
        1,
    );
    assert_eq!(c.result, Err(libc::EBADF));
    let c = run(&mut *e, IoOp::Fdatasync { fd: -1 }, 2);
    assert_eq!(c.result, Err(libc::EBADF));
    // Writing to a read-only descriptor.
    let f = tempfile::NamedTempFile::new().expect("tmp");
    let ro = File::open(f.path()).expect("open ro");
    let c = run(
        &mut *e,
        IoOp::Writev {
            fd: ro.as_raw_fd(),
            offset: 0,
            iov: iovecs(&mut buf, &[100]),
        },
        3,
    );
    assert_eq!(c.result, Err(libc::EBADF));
    // Invalid ops are refused at submission, not queued.
    let mut iov = IoVecs::new();
    for _ in 0..1025 {
        iov.push(buf.as_mut_ptr(), 1);
    }
    // SAFETY: refused before anything is queued.
    let r = unsafe {
        e.submit(
            IoOp::Readv {
                fd: ro.as_raw_fd(),
                offset: 0,
                iov,
            },
            4,
        )
    };
    assert!(matches!(r, Err(SubmitError::Invalid(_))), "{r:?}");
    assert_eq!(e.in_flight(), 0);
}

fn event_fd_signals_completion(mk: Maker) {
    let mut buf = vec![0u8; 4096];
    let Some(mut e) = mk(4) else { return };
    let efd = e.event_fd();
    assert!(!readable(efd, 0));
    let f = tmpfile(8192);
    let op = IoOp::Readv {
        fd: f.as_raw_fd(),
        offset: 0,
        iov: iovecs(&mut buf, &[]),
    };
    // SAFETY: `buf` outlives `e`, whose drop waits for in-flight ops.
    unsafe { e.submit(op, 42) }.expect("submit");
    e.flush().expect("flush");
    assert!(readable(efd, 10_000), "eventfd not signalled within 10 s");
    let mut out = Vec::new();
    e.reap(&mut out);
    assert_eq!(
        out,
        vec![Completion {
            user_data: 42,
            result: Ok(4096)
        }]
    );
    assert!(!readable(efd, 0), "reap must clear the eventfd");
}

fn drop_with_ops_in_flight(mk: Maker) {
    let f = tmpfile(1 << 20);
    let fd = f.as_raw_fd();
    let mut bufs: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i; 32768]).collect();
    {
        let Some(mut e) = mk(32) else { return };
        for (i, b) in bufs.iter_mut().enumerate() {
            let op = IoOp::Writev {
                fd,
                offset: i as u64 * 32768,
                iov: iovecs(b, &[1000]),
            };
            // SAFETY: `bufs` outlives the engine, whose drop waits for
            // in-flight operations.
            unsafe { e.submit(op, i as u64) }.expect("submit");
        }
        e.flush().expect("flush");
        // Dropped here with everything in flight: must neither hang nor
        // leave the kernel/pool writing into freed memory.
    }
    drop(bufs);
}

/// Tiny deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Pending {
    write: bool,
    offset: usize,
    buf: Vec<u8>,
}

fn random_stress_matches_model(mk: Maker) {
    const SIZE: usize = 256 * 1024;
    // Not a multiple of the ring engine's slot blocks: the last block is partly used.
    const QD: usize = 40;
    let seed: u64 = std::env::var("IO_ENGINE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001);
    // Outlives `e`, so a panic mid-round never frees buffers in flight.
    let mut pending: Vec<Pending> = Vec::new();
    let Some(mut e) = mk(QD) else { return };
    let mut file = tmpfile(SIZE as u64);
    let fd = file.as_raw_fd();
    let mut model = vec![0u8; SIZE];
    let mut rng = Rng(seed | 1); // xorshift must not start at 0
    let mut out = Vec::new();

    for round in 0..150 {
        // Non-overlapping ranges within a round, so the outcome does not
        // depend on completion order; more ops than QD to exercise Full.
        let nops = 1 + to_usize(rng.below(QD as u64 * 2));
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        pending.clear();
        for _ in 0..nops {
            let len = 1 + to_usize(rng.below(12000));
            let off = to_usize(rng.below((SIZE - len) as u64));
            if ranges.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            ranges.push((off, len));
            let write = rng.below(2) == 0;
            let buf = if write {
                (0..len).map(|_| (rng.next() & 0xff) as u8).collect()
            } else {
                vec![0xeeu8; len]
            };
            pending.push(Pending {
                write,
                offset: off,
                buf,
            });
        }
        let mut completed = vec![false; pending.len()];
        for (i, p) in pending.iter_mut().enumerate() {
            let mut cuts: Vec<usize> = (0..rng.below(6))
                .map(|_| to_usize(rng.below(p.buf.len() as u64)))
                .collect();
            cuts.sort_unstable();
            let iov = iovecs(&mut p.buf, &cuts);
            let mut op = if p.write {
                IoOp::Writev {
                    fd,
                    offset: p.offset as u64,
                    iov,
                }
            } else {
                IoOp::Readv {
                    fd,
                    offset: p.offset as u64,
                    iov,
                }
            };
            loop {
                // SAFETY: `pending` buffers are not touched or freed until
                // every completion of the round has been reaped, and
                // `pending` outlives `e`.
                match unsafe { e.submit(op, i as u64) } {
                    Ok(()) => break,
                    Err(SubmitError::Full(back)) => {
                        op = back;
                        e.flush().expect("flush");
                        e.wait(1).expect("wait");
                        e.reap(&mut out);
                    }
                    Err(err) => panic!("submit: {err}"),
                }
            }
        }
        e.flush().expect("flush");
        e.wait(usize::MAX).expect("wait");
        e.reap(&mut out);
        assert_eq!(e.in_flight(), 0);
        for c in out.drain(..) {
            let i = to_usize(c.user_data);
            assert!(!completed[i], "round {round}: op {i} completed twice");
            completed[i] = true;
            assert_eq!(
                c.result,
                Ok(pending[i].buf.len() as u64),
                "round {round} op {i}"
            );
        }
        assert!(
            completed.iter().all(|&d| d),
            "round {round}: lost completion"
        );
        for p in &pending {
            let range = p.offset..p.offset + p.buf.len();
            if p.write {
                model[range].copy_from_slice(&p.buf);
            } else {
                assert!(
                    model[range] == p.buf[..],
                    "round {round}: read at {} differs",
                    p.offset
                );
            }
        }
    }
    let mut whole = Vec::new();
    file.rewind().expect("rewind");
    file.read_to_end(&mut whole).expect("read");
    assert!(whole == model, "file differs from model (seed {seed:#x})");
}

macro_rules! for_both_engines {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name(super::make_uring) } )*
        }
        mod threads {
            $( #[test] fn $name() { super::$name(super::make_threads) } )*
        }
        mod uring_inline {
            $( #[test] fn $name() { super::$name(super::make_uring_inline) } )*
        }
        mod threads_inline {
            $( #[test] fn $name() { super::$name(super::make_threads_inline) } )*
        }
    };
}

for_both_engines!(
    roundtrip_multi_iovec,
    fdatasync_completes,
    punch_hole_reads_zeros,
    short_read_at_eof,
    full_at_capacity_then_recovers,
    errors_come_back_as_errno,
    event_fd_signals_completion,
    drop_with_ops_in_flight,
    random_stress_matches_model,
);

#[test]
fn new_engine_builds_requested_or_fallback() {
    let t = new_engine(EngineKind::Threads, 8, None).expect("threads");
    assert_eq!(t.name(), "threads");
    assert_eq!(t.capacity(), 8);
    let u = new_engine(EngineKind::IoUring, 8, None).expect("engine");
    assert!(u.name() == "io_uring" || u.name() == "threads");
    assert_eq!(u.capacity(), 8);
}

/// A pipe hands out whatever is buffered, so a read bigger than the data
/// comes back short; the io_uring engine must reissue the remainder (into
/// the advanced iovecs) instead of completing. io_uring only: `preadv` on a
/// pipe is ESPIPE, and the pool's retry loop is the same `OpState` logic
/// that the unit tests cover.
#[test]
fn uring_continues_short_reads() {
    // Buffers are declared before the engine so that, on a panic, the
    // engine (whose drop waits for in-flight ops) goes first.
    let mut buf = vec![0u8; 300];
    let Some(mut e) = make_uring(4) else { return };
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    let (rd, mut wr) = unsafe {
        use std::os::unix::io::FromRawFd;
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    };
    let op = IoOp::Readv {
        fd: rd.as_raw_fd(),
        offset: 0,
        iov: iovecs(&mut buf, &[50]),
    };
    // SAFETY: `buf` outlives `e`, whose drop waits for in-flight ops.
    unsafe { e.submit(op, 7) }.expect("submit");
    e.flush().expect("flush");
    let data: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    wr.write_all(&data[..100]).expect("write");
    assert!(readable(e.event_fd(), 10_000), "no CQE for the short read");
    let mut out = Vec::new();
    e.reap(&mut out);
    assert!(out.is_empty(), "short read completed early: {out:?}");
    assert_eq!(e.in_flight(), 1);
    wr.write_all(&data[100..]).expect("write");
    for _ in 0..100 {
        if !out.is_empty() {
            break;
        }
        assert!(readable(e.event_fd(), 10_000), "no CQE for the remainder");
        e.reap(&mut out);
    }
    assert_eq!(
        out,
        vec![Completion {
            user_data: 7,
            result: Ok(300)
        }]
    );
    assert_eq!(buf, data);
    drop(e);
    drop(rd);
}

/// A restricted ring (the daemon's) serves its registered files and
/// refuses any other descriptor before it reaches the kernel; the kernel
/// holds it to the engine's opcodes and fixed files besides.
#[test]
fn restricted_ring_serves_only_its_files() {
    use std::os::unix::io::AsRawFd;
    let ours = tmpfile(1 << 16);
    let other = tmpfile(1 << 16);
    let mut e = match UringEngine::restricted(8, &[ours.as_raw_fd()]) {
        Ok(e) => e,
        Err(EngineError::Uring(err))
            if matches!(err.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) =>
        {
            eprintln!("SKIPPED: io_uring not available here: {err}");
            return;
        }
        Err(err) => panic!("restricted ring: {err}"),
    };
    assert!(e.is_restricted());
    let mut data = vec![0x5au8; 4096];
    let c = run(
        &mut e,
        IoOp::Writev {
            fd: ours.as_raw_fd(),
            offset: 4096,
            iov: IoVecs::single(data.as_mut_ptr(), data.len()),
        },
        1,
    );
    assert_eq!(c.result, Ok(4096), "write through a registered file");
    let c = run(
        &mut e,
        IoOp::Fdatasync {
            fd: ours.as_raw_fd(),
        },
        2,
    );
    assert_eq!(c.result, Ok(0));
    let mut back = vec![0u8; 4096];
    let c = run(
        &mut e,
        IoOp::Readv {
            fd: ours.as_raw_fd(),
            offset: 4096,
            iov: IoVecs::single(back.as_mut_ptr(), back.len()),
        },
        3,
    );
    assert_eq!(c.result, Ok(4096));
    assert_eq!(back, data);
    // SAFETY: the buffer outlives the (refused) operation.
    let refused = unsafe {
        e.submit(
            IoOp::Readv {
                fd: other.as_raw_fd(),
                offset: 0,
                iov: IoVecs::single(back.as_mut_ptr(), back.len()),
            },
            4,
        )
    };
    assert!(
        matches!(refused, Err(SubmitError::Invalid(_))),
        "an unregistered fd: {refused:?}"
    );
}
