//! Stress of the whole write path through the real daemon, with the
//! io_uring engine and with the thread-pool fallback: several client
//! threads (libblkio, one virtqueue each, served by different daemon
//! threads) issue random reads and small, unaligned writes whose bitmap
//! bytes overlap across threads, with a tiny engine queue so that "queue
//! full" happens all the time. Afterwards the COW file must equal a model,
//! read through our mapping and merged by `uml_moo`.

mod common;

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use common::daemon::{Daemon, Image, Peer, ServeOptions};
use common::Rng;
use vhost_user_cow::format::{Disk, DiskOptions};
use vhost_user_cow::units::to_usize;

const SECTORS: u64 = 16 * 1024; // 8 MiB
const THREADS: usize = 4;
/// A thread owns the sectors of every THREADS-th block of this many
/// sectors: its writes never overlap another thread's data, but share
/// bitmap bytes (8 sectors a byte) with them all the time.
const BLOCK: u64 = 3;
const DEPTH: usize = 8;
const RUN_FOR: Duration = Duration::from_secs(3);

fn backing_sector(s: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(s * 1000 + i as u64).to_le_bytes());
    }
    b
}

fn tagged_sector(tag: u64, s: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    for c in b.chunks_mut(16) {
        c[..8].copy_from_slice(&tag.to_le_bytes());
        c[8..].copy_from_slice(&s.to_le_bytes());
    }
    b
}

/// What one client thread wrote: sector -> tag of its last completed write.
type Model = Vec<(u64, u64)>;

enum Pending {
    /// `writes_issued` at submission: a read is only checked against
    /// sectors no write touched while it was in flight.
    Read {
        sector: u64,
        count: u64,
        slot: usize,
        issued_then: u64,
        busy_then: Vec<u64>,
    },
    Write {
        block: u64,
        sector: u64,
        count: u64,
        tag: u64,
    },
}

fn client(mut q: Blkioq, mem: *mut u8, t: usize, seed: u64) -> Model {
    let mut rng = Rng::new(seed);
    let mut latest: std::collections::HashMap<u64, u64> = Default::default();
    let mut busy_blocks = std::collections::HashSet::new();
    // Per block: the count of writes issued to it, and the count when the
    // last one was issued.
    let mut last_write_issue: std::collections::HashMap<u64, u64> = Default::default();
    let mut writes_issued = 0u64;
    let mut pending: std::collections::HashMap<usize, Pending> = Default::default();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut tag = (t as u64) << 48;
    let deadline = Instant::now() + RUN_FOR;
    let blocks = SECTORS / BLOCK;
    let slot_buf = |slot: usize| {
        // SAFETY: each slot owns 16 KiB of the thread's mapped region.
        unsafe { mem.add(slot * 16384) }
    };
    loop {
        let running = Instant::now() < deadline;
        while running && !free.is_empty() {
            let slot = free.pop().unwrap();
            let buf = slot_buf(slot);
            if rng.below(2) == 0 {
                // A write of 1..=3 sectors inside one of our blocks.
                let block = (rng.below(blocks / THREADS as u64)) * THREADS as u64 + t as u64;
                if !busy_blocks.insert(block) {
                    free.push(slot);
                    break;
                }
                let first = block * BLOCK + rng.below(BLOCK);
                let count = 1 + rng.below(block * BLOCK + BLOCK - first);
                tag += 1;
                writes_issued += 1;
                last_write_issue.insert(block, writes_issued);
                for i in 0..count {
                    let data = tagged_sector(tag, first + i);
                    // SAFETY: within the slot's 16 KiB.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            buf.add(to_usize(i) * 512),
                            512,
                        )
                    };
                }
                q.write(
                    first * 512,
                    buf,
                    to_usize(count * 512),
                    slot,
                    ReqFlags::empty(),
                );
                pending.insert(
                    slot,
                    Pending::Write {
                        block,
                        sector: first,
                        count,
                        tag,
                    },
                );
            } else {
                // A read anywhere, up to 32 sectors, across everyone's data.
                let count = 1 + rng.below(32);
                let sector = rng.below(SECTORS - count);
                q.read(
                    sector * 512,
                    buf,
                    to_usize(count * 512),
                    slot,
                    ReqFlags::empty(),
                );
                let busy_then = (sector / BLOCK..=(sector + count) / BLOCK)
                    .filter(|b| busy_blocks.contains(b))
                    .collect();
                pending.insert(
                    slot,
                    Pending::Read {
                        sector,
                        count,
                        slot,
                        issued_then: writes_issued,
                        busy_then,
                    },
                );
            }
        }
        if pending.is_empty() {
            break;
        }
        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "thread {t}: request failed");
            match pending.remove(&c.user_data).expect("unknown completion") {
                Pending::Write {
                    block,
                    sector,
                    count,
                    tag,
                } => {
                    for s in sector..sector + count {
                        latest.insert(s, tag);
                    }
                    busy_blocks.remove(&block);
                }
                Pending::Read {
                    sector,
                    count,
                    slot,
                    issued_then,
                    busy_then,
                } => {
                    let buf = slot_buf(slot);
                    for i in 0..count {
                        let s = sector + i;
                        // Only our own sectors that no write touched while
                        // the read was in flight are known exactly.
                        let own = (s / BLOCK) % THREADS as u64 == t as u64;
                        let raced = busy_blocks.contains(&(s / BLOCK))
                            || busy_then.contains(&(s / BLOCK))
                            || last_write_issue
                                .get(&(s / BLOCK))
                                .is_some_and(|&w| w > issued_then);
                        if !own || raced {
                            continue;
                        }
                        let want = match latest.get(&s) {
                            Some(&tag) => tagged_sector(tag, s),
                            None => backing_sector(s),
                        };
                        // SAFETY: within the slot's 16 KiB.
                        let got =
                            unsafe { std::slice::from_raw_parts(buf.add(to_usize(i) * 512), 512) };
                        assert_eq!(got, &want[..], "thread {t}: sector {s} read back wrong");
                    }
                }
            }
            free.push(c.user_data);
        }
    }
    latest.into_iter().collect()
}

fn stress(daemon_args: &[&str]) {
    stress_chunked(daemon_args, 512)
}

/// `chunk`: bytes one bitmap bit covers (the COW header's sectorsize).
fn stress_chunked(daemon_args: &[&str], chunk: u32) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let cow = dir.path().join("disk.cow");
    let mut image = Vec::with_capacity(to_usize(SECTORS * 512));
    for s in 0..SECTORS {
        image.extend_from_slice(&backing_sector(s));
    }
    std::fs::write(&base, &image).unwrap();
    let opts = vhost_user_cow::format::CreateOptions {
        sectorsize: chunk,
        ..Default::default()
    };
    vhost_user_cow::format::create_cow(&cow, &base, &opts).unwrap();

    let opts = ServeOptions {
        num_queues: u16::try_from(THREADS).unwrap(),
        extra_args: ["--threads", "2", "--queue-depth", "4"]
            .iter()
            .chain(daemon_args)
            .map(|a| a.to_string())
            .collect(),
        ..ServeOptions::default()
    };
    let image_files = Image::Cow {
        cow: cow.clone(),
        backing: base.clone(),
    };
    let daemon = Daemon::start(Peer::Ours, dir.path(), &image_files, &opts);
    let sock = daemon.socket().to_owned();
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", i32::try_from(THREADS).unwrap())
        .unwrap();
    let out = b.start().unwrap();
    let region = b.alloc_mem_region(THREADS * DEPTH * 16384).unwrap();
    b.map_mem_region(&region).unwrap();
    let handles: Vec<_> = out
        .queues
        .into_iter()
        .enumerate()
        .map(|(t, q)| {
            let mem = region.addr + t * DEPTH * 16384;
            std::thread::spawn(move || client(q, mem as *mut u8, t, 0x5eed + t as u64))
        })
        .collect();
    let mut written = 0;
    for h in handles {
        for (s, tag) in h.join().expect("client thread panicked") {
            image[to_usize(s * 512)..to_usize(s * 512 + 512)]
                .copy_from_slice(&tagged_sector(tag, s));
            written += 1;
        }
    }
    assert!(written > 100, "only {written} sectors written");
    drop(b);
    let stopped = daemon.terminate();
    assert!(stopped.status.success(), "daemon: {}", stopped.log);

    // Our mapping, the tools' view, and the model agree.
    let disk = Disk::open(
        &cow,
        &DiskOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut ours = vec![0u8; image.len()];
    disk.read_sectors(0, &mut ours).unwrap();
    drop(disk);
    assert!(ours == image, "COW disk differs from the model");
    let check = Command::new(env!("CARGO_BIN_EXE_vhost-user-cow"))
        .arg("check")
        .arg(&cow)
        .status()
        .unwrap();
    assert!(check.success(), "check found problems");
    if let Some(moo) = common::uml_tool("uml_moo") {
        let merged: PathBuf = dir.path().join("merged.img");
        let st = Command::new(moo).arg(&cow).arg(&merged).output().unwrap();
        assert!(st.status.success(), "uml_moo failed: {st:?}");
        assert!(
            std::fs::read(&merged).unwrap() == image,
            "uml_moo's merge differs from the model"
        );
    }
}

#[test]
fn stress_io_uring() {
    stress(&["--io-engine", "io_uring"]);
}

#[test]
fn stress_threads() {
    stress(&["--io-engine", "threads"]);
}

/// Buffered writes through the ring (io-wq) instead of on the queue
/// thread: completions then arrive in any order.
#[test]
fn stress_io_uring_queued_writes() {
    stress(&["--io-engine", "io_uring", "--no-inline-writes"]);
}

/// O_DIRECT: bitmap writes widened to 512-byte blocks of the aligned
/// in-memory bitmap.
#[test]
fn stress_io_uring_direct() {
    stress(&["--io-engine", "io_uring", "--direct"]);
}

#[test]
fn stress_threads_sync() {
    stress(&["--io-engine", "threads", "--sync"]);
}

/// Chunks of 4 KiB: most writes here cover part of a chunk and need a
/// copy-up (rule 9), racing with neighbours in the same chunk.
#[test]
fn stress_io_uring_4k_chunks() {
    stress_chunked(&["--io-engine", "io_uring"], 4096);
}

#[test]
fn stress_io_uring_4k_chunks_queued_writes() {
    stress_chunked(&["--io-engine", "io_uring", "--no-inline-writes"], 4096);
}

#[test]
fn stress_threads_4k_chunks() {
    stress_chunked(&["--io-engine", "threads"], 4096);
}

/// A read racing the first write of its sectors returns the old data or
/// the new, never zeros (nor anything else); a sector read while its own
/// write is being copied into the page cache may show words of both, as
/// on any buffered file. Reads of allocated chunks go
/// straight to the engine, off the scheduler's lock (docs/design.md,
/// "Reads off the scheduler's lock"): a bit seen set must mean its data
/// is in the COW file (rule 1), and a partial first write's copy-up
/// (rule 9) must never show its chunk half-copied.
fn read_racing_first_writes(daemon_args: &[&str], chunk: u32) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const TAG: u64 = 0x7a6;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let cow = dir.path().join("disk.cow");
    let image: Vec<u8> = (0..SECTORS).flat_map(backing_sector).collect();
    std::fs::write(&base, &image).unwrap();
    let create = vhost_user_cow::format::CreateOptions {
        sectorsize: chunk,
        ..Default::default()
    };
    vhost_user_cow::format::create_cow(&cow, &base, &create).unwrap();
    let opts = ServeOptions {
        num_queues: 2,
        extra_args: ["--threads", "2", "--queue-depth", "4"]
            .iter()
            .chain(daemon_args)
            .map(|a| a.to_string())
            .collect(),
        ..ServeOptions::default()
    };
    let files = Image::Cow {
        cow: cow.clone(),
        backing: base.clone(),
    };
    let daemon = Daemon::start(Peer::Ours, dir.path(), &files, &opts);
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", daemon.socket().to_str().unwrap())
        .unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 2).unwrap();
    let out = b.start().unwrap();
    let region = b.alloc_mem_region(2 * DEPTH * 16384).unwrap();
    b.map_mem_region(&region).unwrap();
    let mut queues = out.queues.into_iter();
    let (mut wq, mut rq) = (queues.next().unwrap(), queues.next().unwrap());
    let front = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + RUN_FOR;

    // Queue 0: every sector written once, in order, a few at a time.
    let wmem = region.addr;
    let (wfront, wfinished) = (front.clone(), finished.clone());
    let writer = std::thread::spawn(move || {
        let mut rng = Rng::new(7);
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
        let mut free: Vec<usize> = (0..DEPTH).collect();
        let mut next = 0u64;
        let mut in_flight = 0;
        while (next < SECTORS && Instant::now() < deadline) || in_flight > 0 {
            while next < SECTORS && Instant::now() < deadline && !free.is_empty() {
                let slot = free.pop().unwrap();
                let count = (1 + rng.below(3)).min(SECTORS - next);
                let buf = (wmem + slot * 16384) as *mut u8;
                for i in 0..count {
                    let data = tagged_sector(TAG, next + i);
                    // SAFETY: within the slot's 16 KiB of the mapped region.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            buf.add(to_usize(i) * 512),
                            512,
                        )
                    };
                }
                wfront.store(next, Ordering::Relaxed);
                wq.write(
                    next * 512,
                    buf,
                    to_usize(count * 512),
                    slot,
                    ReqFlags::empty(),
                );
                next += count;
                in_flight += 1;
            }
            let n = wq.do_io(&mut comps, 1, None, None).expect("do_io");
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                assert_eq!(c.ret, 0, "write failed");
                free.push(c.user_data);
                in_flight -= 1;
            }
        }
        wfinished.store(true, Ordering::Relaxed);
        next
    });

    // Queue 1: reads around the writer's front, checked sector by sector.
    let rmem = region.addr + DEPTH * 16384;
    let reader = std::thread::spawn(move || {
        let mut rng = Rng::new(11);
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
        let mut pending: std::collections::HashMap<usize, (u64, u64)> = Default::default();
        let mut free: Vec<usize> = (0..DEPTH).collect();
        let (mut reads, mut saw_new, mut saw_old, mut torn) = (0u64, 0u64, 0u64, 0u64);
        loop {
            let running = !finished.load(Ordering::Relaxed);
            while running && !free.is_empty() {
                let slot = free.pop().unwrap();
                let count = 1 + rng.below(16);
                let sector = front
                    .load(Ordering::Relaxed)
                    .saturating_sub(rng.below(24))
                    .min(SECTORS - count);
                let buf = (rmem + slot * 16384) as *mut u8;
                rq.read(
                    sector * 512,
                    buf,
                    to_usize(count * 512),
                    slot,
                    ReqFlags::empty(),
                );
                pending.insert(slot, (sector, count));
            }
            if pending.is_empty() {
                break;
            }
            let n = rq.do_io(&mut comps, 1, None, None).expect("do_io");
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                assert_eq!(c.ret, 0, "read failed");
                let (sector, count) = pending.remove(&c.user_data).unwrap();
                let buf = (rmem + c.user_data * 16384) as *const u8;
                for i in 0..count {
                    let s = sector + i;
                    // SAFETY: within the slot's 16 KiB of the mapped region.
                    let got =
                        unsafe { std::slice::from_raw_parts(buf.add(to_usize(i) * 512), 512) };
                    let (old, new) = (backing_sector(s), tagged_sector(TAG, s));
                    if got == new {
                        saw_new += 1;
                        continue;
                    }
                    if got == old {
                        saw_old += 1;
                        continue;
                    }
                    // Read while its own write was being copied in: the
                    // page cache copies without a lock, so words of both.
                    let kinds: String = (0..64)
                        .map(|w| {
                            let r = w * 8..w * 8 + 8;
                            if got[r.clone()] == new[r.clone()] {
                                'N'
                            } else if got[r.clone()] == old[r.clone()] {
                                'O'
                            } else if got[r].iter().all(|&x| x == 0) {
                                'Z'
                            } else {
                                '?'
                            }
                        })
                        .collect();
                    assert!(
                        !kinds.contains(['Z', '?']),
                        "sector {s}: neither old nor new data, by word: {kinds}"
                    );
                    torn += 1;
                }
                reads += 1;
                free.push(c.user_data);
            }
        }
        (reads, saw_new, saw_old, torn)
    });
    let written = writer.join().expect("writer panicked");
    let (reads, saw_new, saw_old, torn) = reader.join().expect("reader panicked");
    assert!(written > 1000, "only {written} sectors written");
    assert!(reads > 100, "only {reads} reads");
    assert!(
        saw_new > 0 && saw_old > 0,
        "no race: {saw_new} new, {saw_old} old sectors"
    );
    drop(b);
    let stopped = daemon.terminate();
    assert!(stopped.status.success(), "daemon: {}", stopped.log);
    // Some of those reads really went off the lock.
    let counters = stopped
        .log
        .lines()
        .find_map(|l| l.split_once("lock counters: ").map(|(_, j)| j.to_owned()))
        .expect("no lock counters in the log");
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let off_lock = counters["off_lock_reads"].as_u64().unwrap();
    assert!(off_lock > 0, "no read went off the lock: {counters}");
    eprintln!(
        "{reads} reads ({saw_new} new, {saw_old} old, {torn} mixed sectors), {written} sectors written; {counters}"
    );
}

#[test]
fn read_racing_first_writes_sees_old_or_new_data() {
    read_racing_first_writes(&["--io-engine", "io_uring"], 512);
}

#[test]
fn read_racing_first_writes_sees_old_or_new_data_4k_chunks() {
    read_racing_first_writes(&["--io-engine", "io_uring", "--no-inline-writes"], 4096);
}

#[test]
fn read_racing_first_writes_sees_old_or_new_data_threads() {
    read_racing_first_writes(&["--io-engine", "threads"], 4096);
}
