//! The libblkio side: connecting and configuring the device, and the queue
//! threads that keep `--iodepth` requests in flight each.

use std::mem::MaybeUninit;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::args::Args;
use crate::convert::to_usize;
use crate::report::{self, QueueResult, Report, RunInfo};
use crate::workload::{self, Rng, Workload};

/// A backend that completes nothing for this long is reported as stalled.
const STALL_SECS: u64 = 10;

fn berr(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// What one queue thread needs.
struct QueueJob {
    index: usize,
    queue: Blkioq,
    /// This queue's buffers: `iodepth` slots of `bs` bytes each.
    buf: *mut u8,
    bs: u64,
    iodepth: usize,
    workload: Workload,
    /// Largest data segment the device accepts (0 = no limit).
    max_segment: u64,
    poll: bool,
    stamp: Option<u64>,
    check: Option<u64>,
}

// SAFETY: `buf` points into a shared memory region that lives as long as the
// Blkio instance, which outlives all queue threads (they are joined first),
// and each thread has its own disjoint slice of it.
unsafe impl Send for QueueJob {}

impl QueueJob {
    /// The buffer of `slot`.
    ///
    /// # Safety
    /// No request using the slot may be in flight while the slice is used.
    unsafe fn slot_buf(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: slot < iodepth and the region holds iodepth * bs bytes
        // for this queue; the caller keeps the device off it.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buf.add(slot * to_usize(self.bs)),
                to_usize(self.bs),
            )
        }
    }
}

struct Slot {
    start: Instant,
    is_write: bool,
    offset: u64,
    /// Kept alive while the request is in flight (segmented requests).
    iov: Vec<libc::iovec>,
}

struct Clock {
    measure_start: Instant,
    measure_end: Instant,
}

/// Issues the workload's next request into `slot`; false when the
/// workload is done.
fn submit(job: &mut QueueJob, slot: usize, slots: &mut [Slot]) -> bool {
    let Some(req) = job.workload.next_request() else {
        return false;
    };
    let (offset, is_write) = (req.offset, req.is_write);
    if let (true, Some(tag)) = (is_write, job.stamp) {
        // SAFETY: the slot is free: its last request completed.
        workload::stamp(unsafe { job.slot_buf(slot) }, offset, tag);
    }
    // SAFETY: slot < iodepth, and the region holds iodepth * bs bytes.
    let buf = unsafe { job.buf.add(slot * to_usize(job.bs)) };
    let s = &mut slots[slot];
    s.is_write = is_write;
    s.offset = offset;
    s.start = Instant::now();
    if job.max_segment == 0 || job.bs <= job.max_segment {
        if is_write {
            job.queue
                .write(offset, buf, to_usize(job.bs), slot, ReqFlags::empty());
        } else {
            job.queue
                .read(offset, buf, to_usize(job.bs), slot, ReqFlags::empty());
        }
    } else {
        s.iov.clear();
        let mut done = 0u64;
        while done < job.bs {
            let n = job.max_segment.min(job.bs - done);
            s.iov.push(libc::iovec {
                // SAFETY: within this slot's buffer.
                iov_base: unsafe { buf.add(to_usize(done)) } as *mut libc::c_void,
                iov_len: to_usize(n),
            });
            done += n;
        }
        // Bounded: at most max-segments (an i32) segments, checked in `run`.
        #[allow(clippy::cast_possible_truncation)]
        let (iov, cnt) = (s.iov.as_ptr(), s.iov.len() as u32);
        if is_write {
            job.queue.writev(offset, iov, cnt, slot, ReqFlags::empty());
        } else {
            job.queue.readv(offset, iov, cnt, slot, ReqFlags::empty());
        }
    }
    true
}

fn run_queue(mut job: QueueJob, clock: Arc<OnceLock<Clock>>, barrier: Arc<Barrier>) -> QueueResult {
    let mut res = QueueResult::new();
    let mut slots: Vec<Slot> = (0..job.iodepth)
        .map(|_| Slot {
            start: Instant::now(),
            is_write: false,
            offset: 0,
            iov: Vec::new(),
        })
        .collect();
    let mut in_flight = 0usize;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..job.iodepth).map(|_| MaybeUninit::uninit()).collect();

    barrier.wait();
    // Set by the main thread before it passed the barrier.
    let clock = clock.get().expect("clock set before start");
    for slot in 0..job.iodepth {
        if submit(&mut job, slot, &mut slots) {
            in_flight += 1;
        }
    }
    let mut stopping = false;
    let mut last_completion = Instant::now();
    while in_flight > 0 {
        let min = if job.poll { 0 } else { 1 };
        // Wake up now and then to notice a backend that stopped answering.
        let mut timeout = Duration::from_millis(500);
        let n = match job
            .queue
            .do_io(&mut completions, min, Some(&mut timeout), None)
        {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => {
                res.error(|| format!("queue {}: do_io: {e}", job.index));
                break;
            }
        };
        if n == 0 {
            if last_completion.elapsed() > Duration::from_secs(STALL_SECS) {
                res.error(|| {
                    format!(
                        "queue {}: stalled: no completion for {STALL_SECS} s with {in_flight} \
                         requests in flight",
                        job.index
                    )
                });
                break;
            }
            if job.poll {
                std::hint::spin_loop();
            }
            continue;
        }
        let now = Instant::now();
        last_completion = now;
        if now >= clock.measure_end {
            stopping = true;
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            in_flight -= 1;
            let (is_write, offset, start) = {
                let s = &slots[slot];
                (s.is_write, s.offset, s.start)
            };
            if c.ret != 0 {
                res.error(|| {
                    let msg = if c.error_msg.is_null() {
                        String::new()
                    } else {
                        // SAFETY: libblkio hands out NUL-terminated static strings.
                        unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                            .to_string_lossy()
                            .into_owned()
                    };
                    format!(
                        "queue {}: {} failed: {} {msg}",
                        job.index,
                        if is_write { "write" } else { "read" },
                        std::io::Error::from_raw_os_error(-c.ret)
                    )
                });
            } else if let Some(msg) = (!is_write)
                .then_some(job.check)
                .flatten()
                // SAFETY: the slot's read completed; nothing is in flight on it.
                .and_then(|tag| workload::check_stamps(unsafe { job.slot_buf(slot) }, offset, tag))
            {
                res.error(|| format!("queue {}: {msg}", job.index));
            } else if start >= clock.measure_start && now <= clock.measure_end {
                let ns = u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
                let lat = if is_write {
                    res.writes += 1;
                    &mut res.write_lat
                } else {
                    res.reads += 1;
                    &mut res.read_lat
                };
                lat.as_mut().unwrap().saturating_record(ns.max(1));
                res.bytes += job.bs;
            }
            if !stopping && submit(&mut job, slot, &mut slots) {
                in_flight += 1;
            }
        }
        if res.errors > 0 && res.first_error.is_some() && !stopping {
            // Keep going but stop issuing after errors: drain what is in flight.
            stopping = true;
        }
    }
    let end = Instant::now().min(clock.measure_end);
    res.measured = end
        .saturating_duration_since(clock.measure_start)
        .as_secs_f64();
    res
}

/// Connects, runs the load and reports.
pub fn run(args: &Args) -> Result<Report, String> {
    args.validate()?;
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(berr("blkio"))?;
    b.set_str("path", &args.socket.to_string_lossy())
        .map_err(berr("path"))?;
    b.connect()
        .map_err(berr(&format!("connect to {}", args.socket.display())))?;
    let max_queues = b.get_i32("max-queues").map_err(berr("max-queues"))?;
    let queues = i32::try_from(args.queues).ok().filter(|&q| q <= max_queues);
    let Some(queues) = queues else {
        return Err(format!(
            "{} queues asked, the device offers {max_queues}",
            args.queues
        ));
    };
    let capacity = b.get_u64("capacity").map_err(berr("capacity"))?;
    let max_segment = b
        .get_i32("max-segment-len")
        .map_err(berr("max-segment-len"))? as u64;
    let max_segments = b
        .get_i32("max-segments")
        .map_err(berr("max-segments"))?
        .max(1) as u64;
    let segs = if max_segment == 0 {
        1
    } else {
        args.bs.div_ceil(max_segment)
    };
    if segs > max_segments {
        return Err(format!(
            "--bs {} needs {segs} segments of {max_segment} bytes; the device takes {max_segments}",
            args.bs
        ));
    }
    let qsize = args.queue_size.unwrap_or_else(|| {
        let need = (args.iodepth as u64 * (segs + 2)).next_power_of_two();
        need.clamp(256, 1024) as u32
    });
    b.set_i32("queue-size", qsize as i32)
        .map_err(berr("queue-size"))?;
    if args.poll {
        b.set_i32("num-queues", 0).map_err(berr("num-queues"))?;
        b.set_i32("num-poll-queues", queues)
            .map_err(berr("num-poll-queues"))?;
    } else {
        b.set_i32("num-queues", queues)
            .map_err(berr("num-queues"))?;
    }
    let area = args.size.unwrap_or(capacity).min(capacity);
    let blocks = area / args.bs;
    if blocks == 0 {
        return Err(format!(
            "the disk ({capacity} bytes, area {area}) is smaller than one block"
        ));
    }

    // The driver maps memory regions only once started.
    let outcome = b.start().map_err(berr("start"))?;
    // Buffers must live in memory the backend can see: allocate and map
    // one shared region for all queues.
    let align = to_usize(
        b.get_u64("mem-region-alignment")
            .map_err(berr("mem-region-alignment"))?
            .max(4096),
    );
    let per_queue = args.iodepth * to_usize(args.bs);
    let len = (per_queue * args.queues).div_ceil(align) * align;
    let region = b.alloc_mem_region(len).map_err(berr("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(berr("map_mem_region"))?;
    let base = region.addr as *mut u8;
    // Non-zero, non-repeating data for writes.
    {
        let mut rng = Rng::new(args.seed.wrapping_add(77));
        // SAFETY: the region is `len` bytes of mapped, writable memory.
        let words = unsafe { std::slice::from_raw_parts_mut(base as *mut u64, len / 8) };
        for w in words {
            *w = rng.next();
        }
    }

    let queues = if args.poll {
        outcome.poll_queues
    } else {
        outcome.queues
    };

    let ramp = Duration::from_secs_f64(args.ramp.max(0.0));
    let runtime = Duration::from_secs_f64(args.runtime.max(0.001));
    let barrier = Arc::new(Barrier::new(args.queues + 1));
    let clock = Arc::new(OnceLock::new());
    let mut handles = Vec::new();
    for (i, (queue, share)) in queues
        .into_iter()
        .zip(workload::plan(args, blocks))
        .enumerate()
    {
        let job = QueueJob {
            index: i,
            queue,
            // SAFETY: inside the region (per_queue * queues <= len).
            buf: unsafe { base.add(i * per_queue) },
            bs: args.bs,
            iodepth: args.iodepth,
            workload: Workload::new(share, args.seed ^ ((i as u64 + 1) << 32)),
            max_segment,
            poll: args.poll,
            stamp: args.stamp,
            check: args.check,
        };
        let (c, bar) = (Arc::clone(&clock), Arc::clone(&barrier));
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-q{i}"))
                .spawn(move || run_queue(job, c, bar))
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    let cpu0 = report::self_cpu();
    // The clock starts when every queue thread is ready to submit.
    let t0 = Instant::now();
    let clock = clock.get_or_init(|| Clock {
        measure_start: t0 + ramp,
        measure_end: t0 + ramp + runtime,
    });
    barrier.wait();
    // Sample the daemon at the window's edges (or when every queue is done,
    // with --io-limit).
    let wait_until = |t: Instant| loop {
        let now = Instant::now();
        if now >= t || handles.iter().all(|h| h.is_finished()) {
            break;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(10)));
    };
    wait_until(clock.measure_start);
    let daemon_before = args.pid.map(report::sample_proc).transpose()?;
    wait_until(clock.measure_end);
    let daemon_after = args.pid.map(report::sample_proc).transpose()?;
    let results: Vec<QueueResult> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    let load_cpu_s = report::self_cpu() - cpu0;
    drop(b);
    let info = RunInfo {
        disk_bytes: capacity,
        area_bytes: area,
        load_cpu_s,
        daemon: daemon_before.zip(daemon_after),
    };
    Report::new(args, info, &results)
}
