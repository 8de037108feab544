//! A load generator for vhost-user-blk sockets: drives any vhost-user-blk
//! backend (this crate's daemon, `qemu-storage-daemon`, ...) from the host,
//! without a VM, through libblkio's `virtio-blk-vhost-user` driver.
//!
//! One thread per virtqueue, each keeping `--iodepth` requests in flight and
//! waiting on its own completion eventfd (or busy-polling with `--poll`).
//! Reports IOPS, MB/s, latency percentiles and, given `--pid`, the daemon's
//! CPU time per I/O and its memory use.

use std::fmt;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Pattern {
    /// Uniformly random aligned reads.
    Randread,
    /// Uniformly random aligned writes.
    Randwrite,
    /// Sequential reads (each queue walks its own slice of the disk).
    Read,
    /// Sequential writes (each queue walks its own slice of the disk).
    Write,
    /// Random mix of reads and writes (`--rwmixread` percent reads).
    Randrw,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.to_possible_value().unwrap();
        f.write_str(s.get_name())
    }
}

/// Drive a vhost-user-blk socket with a fixed-duration I/O load.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-cow-load", version, args_override_self = true)]
struct Args {
    /// The vhost-user-blk unix socket.
    #[arg(long, alias = "socket-path", value_name = "PATH")]
    socket: PathBuf,
    /// Access pattern.
    #[arg(long, short = 'p', value_enum, default_value_t = Pattern::Randread)]
    pattern: Pattern,
    /// Block size (suffixes k, m: 4k, 1m).
    #[arg(long, short = 'b', default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, short = 'd', alias = "qd", default_value_t = 1)]
    iodepth: usize,
    /// Virtqueues (one thread each).
    #[arg(long, short = 'q', default_value_t = 1)]
    queues: usize,
    /// Measured run time in seconds.
    #[arg(long, short = 't', default_value_t = 10.0)]
    runtime: f64,
    /// Warm-up seconds before measuring (I/O runs, nothing is counted).
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Percentage of reads for --pattern randrw.
    #[arg(long, default_value_t = 70)]
    rwmixread: u32,
    /// Only touch the first SIZE bytes of the disk (default: all of it).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Stop after this many bytes per queue, or at --runtime.
    #[arg(long, value_parser = parse_size)]
    io_limit: Option<u64>,
    /// Random patterns visit every block once, in a random order, before
    /// any block repeats (like fio's random map): each queue walks a
    /// permutation of its own share of the blocks.
    #[arg(long)]
    random_map: bool,
    /// Stop when each queue has covered its share of the disk once
    /// (sequential patterns, or random ones with --random-map).
    #[arg(long)]
    once: bool,
    /// The daemon's pid: sample its CPU time and memory.
    #[arg(long)]
    pid: Option<i32>,
    /// Busy-poll for completions (poll queues) instead of sleeping on the
    /// completion eventfd.
    #[arg(long)]
    poll: bool,
    /// Virtqueue size (default: enough for --iodepth, at least 256).
    #[arg(long)]
    queue_size: Option<u32>,
    /// Data check: writes put a 16-byte stamp (the sector's byte offset and
    /// this value) at the start of every 512-byte sector ...
    #[arg(long, value_name = "TAG")]
    stamp: Option<u64>,
    /// ... and reads check that every sector carries the stamp for its own
    /// offset and this tag (a mismatch counts as an error).
    #[arg(long, value_name = "TAG")]
    check: Option<u64>,
    /// Seed for the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the result as JSON (one object) instead of text.
    #[arg(long)]
    json: bool,
    /// A label copied into the result.
    #[arg(long)]
    label: Option<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 1m)"))
}

/// xorshift64*: fast, good enough to spread offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A pseudo-random bijection of [0, n): an invertible mixing function on
/// the smallest power of two >= n, walked until it lands inside [0, n).
struct Permutation {
    n: u64,
    bits: u32,
    mask: u64,
    keys: [u64; 3],
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        let mut r = Rng::new(seed ^ 0x5EED);
        Permutation {
            n,
            bits,
            mask,
            keys: [r.next(), r.next() | 1, r.next() | 1],
        }
    }
    fn mix(&self, mut x: u64) -> u64 {
        let m = self.mask;
        let sh = self.bits / 2 + 1;
        // Each step is a bijection on `bits`-bit values.
        x = (x ^ self.keys[0]) & m;
        x ^= x >> sh;
        x = x.wrapping_mul(self.keys[1]) & m;
        x ^= x >> sh;
        x = x.wrapping_mul(self.keys[2]) & m;
        x ^= x >> sh;
        x
    }
    fn get(&self, i: u64) -> u64 {
        let mut x = self.mix(i);
        while x >= self.n {
            x = self.mix(x);
        }
        x
    }
}

/// A backend that completes nothing for this long is reported as stalled.
const STALL_SECS: u64 = 10;

/// What one queue thread needs.
struct QueueJob {
    index: usize,
    queue: Blkioq,
    /// This queue's buffers: `iodepth` slots of `bs` bytes each.
    buf: *mut u8,
    pattern: Pattern,
    bs: u64,
    iodepth: usize,
    rwmixread: u32,
    /// Offsets are drawn from [area_start, area_end) (sequential patterns
    /// walk it and wrap).
    area_start: u64,
    area_end: u64,
    /// Random patterns draw block indexes from the whole span.
    blocks: u64,
    /// With --random-map: the permutation and this queue's share of it.
    perm: Option<Arc<Permutation>>,
    perm_range: (u64, u64),
    /// Largest data segment the device accepts (0 = no limit).
    max_segment: u64,
    io_limit: Option<u64>,
    seed: u64,
    poll: bool,
    stamp: Option<u64>,
    check: Option<u64>,
}

// SAFETY: `buf` points into a shared memory region that lives as long as the
// Blkio instance, which outlives all queue threads (they are joined first),
// and each thread has its own disjoint slice of it.
unsafe impl Send for QueueJob {}

#[derive(Default)]
struct QueueResult {
    reads: u64,
    writes: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    read_lat: Option<Histogram<u64>>,
    write_lat: Option<Histogram<u64>>,
    /// Seconds this queue spent in the measured window.
    measured: f64,
    /// Gave up waiting for completions (requests were left in flight).
    stalled: bool,
}

struct Slot {
    start: Instant,
    is_write: bool,
    offset: u64,
    /// Kept alive while the request is in flight (segmented requests).
    iov: Vec<libc::iovec>,
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

struct Clock {
    measure_start: Instant,
    measure_end: Instant,
}

fn run_queue(mut job: QueueJob, clock: Arc<OnceLock<Clock>>, barrier: Arc<Barrier>) -> QueueResult {
    let mut rng = Rng::new(job.seed ^ ((job.index as u64 + 1) << 32));
    let mut res = QueueResult {
        read_lat: Some(new_hist()),
        write_lat: Some(new_hist()),
        ..Default::default()
    };
    let mut slots: Vec<Slot> = (0..job.iodepth)
        .map(|_| Slot {
            start: Instant::now(),
            is_write: false,
            offset: 0,
            iov: Vec::new(),
        })
        .collect();
    let mut seq_pos = job.area_start;
    let mut perm_pos = job.perm_range.0;
    let mut issued_bytes = 0u64;
    let mut in_flight = 0usize;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..job.iodepth).map(|_| MaybeUninit::uninit()).collect();

    let submit = |job: &mut QueueJob,
                  slot: usize,
                  slots: &mut [Slot],
                  rng: &mut Rng,
                  seq_pos: &mut u64,
                  perm_pos: &mut u64,
                  issued_bytes: &mut u64|
     -> bool {
        if let Some(limit) = job.io_limit {
            if *issued_bytes >= limit {
                return false;
            }
        }
        let offset = match job.pattern {
            Pattern::Read | Pattern::Write => {
                if *seq_pos + job.bs > job.area_end {
                    *seq_pos = job.area_start;
                }
                let o = *seq_pos;
                *seq_pos += job.bs;
                o
            }
            _ => match &job.perm {
                Some(p) => {
                    if *perm_pos >= job.perm_range.1 {
                        *perm_pos = job.perm_range.0;
                    }
                    let b = p.get(*perm_pos);
                    *perm_pos += 1;
                    b * job.bs
                }
                None => rng.below(job.blocks) * job.bs,
            },
        };
        let is_write = match job.pattern {
            Pattern::Randread | Pattern::Read => false,
            Pattern::Randwrite | Pattern::Write => true,
            Pattern::Randrw => rng.below(100) >= job.rwmixread as u64,
        };
        *issued_bytes += job.bs;
        // SAFETY: slot < iodepth, and the region holds iodepth * bs bytes.
        let buf = unsafe { job.buf.add(slot * job.bs as usize) };
        if let (true, Some(tag)) = (is_write, job.stamp) {
            for sec in 0..job.bs / 512 {
                // SAFETY: inside this slot's buffer; unaligned writes.
                unsafe {
                    let p = buf.add(sec as usize * 512) as *mut u64;
                    p.write_unaligned((offset + sec * 512).to_le());
                    p.add(1).write_unaligned(tag.to_le());
                }
            }
        }
        let s = &mut slots[slot];
        s.is_write = is_write;
        s.offset = offset;
        s.start = Instant::now();
        if job.max_segment == 0 || job.bs <= job.max_segment {
            if is_write {
                job.queue
                    .write(offset, buf, job.bs as usize, slot, ReqFlags::empty());
            } else {
                job.queue
                    .read(offset, buf, job.bs as usize, slot, ReqFlags::empty());
            }
        } else {
            s.iov.clear();
            let mut done = 0u64;
            while done < job.bs {
                let n = job.max_segment.min(job.bs - done);
                s.iov.push(libc::iovec {
                    // SAFETY: within this slot's buffer.
                    iov_base: unsafe { buf.add(done as usize) } as *mut libc::c_void,
                    iov_len: n as usize,
                });
                done += n;
            }
            let (iov, cnt) = (s.iov.as_ptr(), s.iov.len() as u32);
            if is_write {
                job.queue.writev(offset, iov, cnt, slot, ReqFlags::empty());
            } else {
                job.queue.readv(offset, iov, cnt, slot, ReqFlags::empty());
            }
        }
        true
    };

    barrier.wait();
    // Set by the main thread before it passed the barrier.
    let clock = clock.get().expect("clock set before start");
    for slot in 0..job.iodepth {
        if submit(
            &mut job,
            slot,
            &mut slots,
            &mut rng,
            &mut seq_pos,
            &mut perm_pos,
            &mut issued_bytes,
        ) {
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
                res.errors += 1;
                res.first_error
                    .get_or_insert_with(|| format!("queue {}: do_io: {e}", job.index));
                break;
            }
        };
        if n == 0 {
            if last_completion.elapsed() > Duration::from_secs(STALL_SECS) {
                res.errors += 1;
                res.first_error.get_or_insert_with(|| {
                    format!(
                        "queue {}: stalled: no completion for {STALL_SECS} s with {in_flight} \
                         requests in flight",
                        job.index
                    )
                });
                res.stalled = true;
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
            let s = &slots[slot];
            if c.ret != 0 {
                res.errors += 1;
                res.first_error.get_or_insert_with(|| {
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
                        if s.is_write { "write" } else { "read" },
                        std::io::Error::from_raw_os_error(-c.ret)
                    )
                });
            } else if let Some(msg) = (!s.is_write)
                .then_some(job.check)
                .flatten()
                .and_then(|tag| {
                    // SAFETY: the slot's buffer, filled by the completed read.
                    let buf = unsafe { job.buf.add(slot * job.bs as usize) };
                    check_stamps(buf, job.bs, s.offset, tag)
                })
            {
                res.errors += 1;
                res.first_error
                    .get_or_insert_with(|| format!("queue {}: {msg}", job.index));
            } else if s.start >= clock.measure_start && now <= clock.measure_end {
                let ns = now.duration_since(s.start).as_nanos() as u64;
                if s.is_write {
                    res.writes += 1;
                    res.write_lat.as_mut().unwrap().saturating_record(ns.max(1));
                } else {
                    res.reads += 1;
                    res.read_lat.as_mut().unwrap().saturating_record(ns.max(1));
                }
                res.bytes += job.bs;
            }
            if !stopping
                && submit(
                    &mut job,
                    slot,
                    &mut slots,
                    &mut rng,
                    &mut seq_pos,
                    &mut perm_pos,
                    &mut issued_bytes,
                )
            {
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

/// Checks the stamps of a block read at `offset`.
fn check_stamps(buf: *const u8, bs: u64, offset: u64, tag: u64) -> Option<String> {
    for sec in 0..bs / 512 {
        let want = offset + sec * 512;
        // SAFETY: the caller passes a buffer of `bs` bytes.
        let (got_off, got_tag) = unsafe {
            let p = buf.add(sec as usize * 512) as *const u64;
            (
                u64::from_le(p.read_unaligned()),
                u64::from_le(p.add(1).read_unaligned()),
            )
        };
        if got_off != want || got_tag != tag {
            return Some(format!(
                "data check: sector at byte {want} holds the stamp of byte {got_off:#x} \
                 tag {got_tag:#x}, expected tag {tag:#x}"
            ));
        }
    }
    None
}

/// Daemon process counters from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ProcSample {
    /// utime + stime, seconds.
    cpu_s: f64,
    vm_rss_kib: u64,
    vm_hwm_kib: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    rss_shmem_kib: u64,
    threads: u64,
}

fn sample_proc(pid: i32) -> Result<ProcSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 (1-based) of the whole line.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc/PID/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut s = ProcSample {
        cpu_s: (ticks(14) + ticks(15)) as f64 / hz,
        ..Default::default()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    for line in status.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let v = val.parse::<u64>().unwrap_or(0);
        match key {
            "VmRSS:" => s.vm_rss_kib = v,
            "VmHWM:" => s.vm_hwm_kib = v,
            "RssAnon:" => s.rss_anon_kib = v,
            "RssFile:" => s.rss_file_kib = v,
            "RssShmem:" => s.rss_shmem_kib = v,
            "Threads:" => s.threads = v,
            _ => {}
        }
    }
    Ok(s)
}

/// Our own CPU time (user + system), seconds.
fn self_cpu() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Debug, Serialize)]
struct LatencyUs {
    count: u64,
    mean: f64,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl LatencyUs {
    fn from(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(LatencyUs {
            count: h.len(),
            mean: h.mean() / 1000.0,
            min: us(h.min()),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

#[derive(Debug, Serialize)]
struct DaemonStats {
    pid: i32,
    /// Daemon CPU seconds (user + system) during the measured window.
    cpu_s: f64,
    /// Daemon CPU microseconds per completed I/O.
    cpu_us_per_io: f64,
    /// Average cores busy in the daemon during the window.
    cpu_util: f64,
    /// Memory at the end of the run.
    end: ProcSample,
}

#[derive(Debug, Serialize)]
struct Report {
    label: Option<String>,
    socket: String,
    pattern: Pattern,
    bs: u64,
    iodepth: usize,
    queues: usize,
    poll: bool,
    disk_bytes: u64,
    area_bytes: u64,
    runtime_s: f64,
    ios: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    iops: f64,
    mb_s: f64,
    /// Latency over all requests, microseconds.
    lat_us: Option<LatencyUs>,
    read_lat_us: Option<LatencyUs>,
    write_lat_us: Option<LatencyUs>,
    /// This process's CPU seconds during the whole run.
    load_cpu_s: f64,
    daemon: Option<DaemonStats>,
}

fn berr(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn run(args: &Args) -> Result<Report, String> {
    if args.bs == 0 || args.bs % 512 != 0 {
        return Err("--bs must be a non-zero multiple of 512".into());
    }
    if args.iodepth == 0 || args.queues == 0 {
        return Err("--iodepth and --queues must be at least 1".into());
    }
    if args.rwmixread > 100 {
        return Err("--rwmixread is a percentage".into());
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(berr("blkio"))?;
    b.set_str("path", &args.socket.to_string_lossy())
        .map_err(berr("path"))?;
    b.connect()
        .map_err(berr(&format!("connect to {}", args.socket.display())))?;
    let max_queues = b.get_i32("max-queues").map_err(berr("max-queues"))?;
    if args.queues as i32 > max_queues {
        return Err(format!(
            "{} queues asked, the device offers {max_queues}",
            args.queues
        ));
    }
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
        b.set_i32("num-poll-queues", args.queues as i32)
            .map_err(berr("num-poll-queues"))?;
    } else {
        b.set_i32("num-queues", args.queues as i32)
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
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(berr("mem-region-alignment"))?
        .max(4096) as usize;
    let per_queue = args.iodepth * args.bs as usize;
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
    let slice = (blocks / args.queues as u64).max(1) * args.bs;
    let random = !matches!(args.pattern, Pattern::Read | Pattern::Write);
    let perm = (random && args.random_map).then(|| Arc::new(Permutation::new(blocks, args.seed)));
    let share = |i: u64| blocks * i / args.queues as u64;
    if args.once && random && !args.random_map {
        return Err("--once with a random pattern needs --random-map".into());
    }
    let mut handles = Vec::new();
    for (i, queue) in queues.into_iter().enumerate() {
        let area_start = (i as u64 * slice).min((blocks - 1) * args.bs);
        let job = QueueJob {
            index: i,
            queue,
            // SAFETY: inside the region (per_queue * queues <= len).
            buf: unsafe { base.add(i * per_queue) },
            pattern: args.pattern,
            bs: args.bs,
            iodepth: args.iodepth,
            rwmixread: args.rwmixread,
            area_start,
            area_end: (area_start + slice).min(blocks * args.bs),
            blocks,
            perm: perm.clone(),
            perm_range: (share(i as u64), share(i as u64 + 1)),
            max_segment,
            io_limit: match (args.once, random) {
                (false, _) => args.io_limit,
                (true, true) => Some(
                    ((share(i as u64 + 1) - share(i as u64)) * args.bs)
                        .min(args.io_limit.unwrap_or(u64::MAX)),
                ),
                (true, false) => Some(slice.min(args.io_limit.unwrap_or(u64::MAX))),
            },
            seed: args.seed,
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
    let cpu0 = self_cpu();
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
    let daemon_before = args.pid.map(sample_proc).transpose()?;
    wait_until(clock.measure_end);
    let daemon_after = args.pid.map(sample_proc).transpose()?;
    let results: Vec<QueueResult> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    let load_cpu_s = self_cpu() - cpu0;

    let mut rl = new_hist();
    let mut wl = new_hist();
    let (mut reads, mut writes, mut bytes, mut errors) = (0, 0, 0, 0);
    let mut first_error = None;
    let mut measured: f64 = 0.0;
    for r in &results {
        reads += r.reads;
        writes += r.writes;
        bytes += r.bytes;
        errors += r.errors;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
        if let Some(h) = &r.read_lat {
            rl.add(h).map_err(|e| e.to_string())?;
        }
        if let Some(h) = &r.write_lat {
            wl.add(h).map_err(|e| e.to_string())?;
        }
        measured = measured.max(r.measured);
    }
    let mut all = rl.clone();
    all.add(&wl).map_err(|e| e.to_string())?;
    let ios = reads + writes;
    let secs = measured.max(1e-9);
    let daemon = match (args.pid, daemon_before, daemon_after) {
        (Some(pid), Some(a), Some(z)) => {
            let cpu = z.cpu_s - a.cpu_s;
            Some(DaemonStats {
                pid,
                cpu_s: cpu,
                cpu_us_per_io: if ios > 0 { cpu * 1e6 / ios as f64 } else { 0.0 },
                cpu_util: cpu / secs,
                end: z,
            })
        }
        _ => None,
    };
    drop(b);
    Ok(Report {
        label: args.label.clone(),
        socket: args.socket.display().to_string(),
        pattern: args.pattern,
        bs: args.bs,
        iodepth: args.iodepth,
        queues: args.queues,
        poll: args.poll,
        disk_bytes: capacity,
        area_bytes: area,
        runtime_s: measured,
        ios,
        reads,
        writes,
        errors,
        first_error,
        iops: ios as f64 / secs,
        mb_s: bytes as f64 / secs / 1e6,
        lat_us: LatencyUs::from(&all),
        read_lat_us: LatencyUs::from(&rl),
        write_lat_us: LatencyUs::from(&wl),
        load_cpu_s,
        daemon,
    })
}

fn print_text(r: &Report) {
    println!(
        "{} bs={} iodepth={} queues={}{}: {:.0} IOPS, {:.1} MB/s over {:.2} s ({} I/Os, {} errors)",
        r.pattern,
        r.bs,
        r.iodepth,
        r.queues,
        if r.poll { " poll" } else { "" },
        r.iops,
        r.mb_s,
        r.runtime_s,
        r.ios,
        r.errors
    );
    for (name, l) in [
        ("read ", &r.read_lat_us),
        ("write", &r.write_lat_us),
        ("all  ", &r.lat_us),
    ] {
        if let Some(l) = l {
            println!(
                "  {name} lat us: mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                l.mean, l.p50, l.p99, l.p999, l.max
            );
        }
    }
    if let Some(d) = &r.daemon {
        println!(
            "  daemon {}: {:.2} us CPU/IO, {:.2} cores, VmRSS {} KiB (anon {}, file {}, shmem {}), VmHWM {} KiB, {} threads",
            d.pid,
            d.cpu_us_per_io,
            d.cpu_util,
            d.end.vm_rss_kib,
            d.end.rss_anon_kib,
            d.end.rss_file_kib,
            d.end.rss_shmem_kib,
            d.end.vm_hwm_kib,
            d.end.threads
        );
    }
    println!("  load generator CPU: {:.2} s", r.load_cpu_s);
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string(&r).expect("serialise"));
            } else {
                print_text(&r);
            }
            if r.errors > 0 {
                eprintln!(
                    "vhost-user-cow-load: {} I/O errors; first: {}",
                    r.errors,
                    r.first_error.as_deref().unwrap_or("?")
                );
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vhost-user-cow-load: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 5, 64, 1000, 1024, 1025, 65_537] {
            for seed in [1u64, 7, 12345] {
                let p = Permutation::new(n, seed);
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let x = p.get(i);
                    assert!(x < n);
                    assert!(!seen[x as usize], "n={n} seed={seed}: {x} twice");
                    seen[x as usize] = true;
                }
            }
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("x").is_err());
    }
}
