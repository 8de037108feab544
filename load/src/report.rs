//! What a run measured: per-queue tallies, the daemon's /proc counters,
//! and the report (text or JSON).

use std::mem::MaybeUninit;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::{Args, Pattern};

/// What one queue thread counted.
#[derive(Default)]
pub struct QueueResult {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub read_lat: Option<Histogram<u64>>,
    pub write_lat: Option<Histogram<u64>>,
    /// Seconds this queue spent in the measured window.
    pub measured: f64,
}

impl QueueResult {
    pub fn new() -> Self {
        QueueResult {
            read_lat: Some(new_hist()),
            write_lat: Some(new_hist()),
            ..Default::default()
        }
    }

    /// Counts an error; the first one is kept with `msg`.
    pub fn error(&mut self, msg: impl FnOnce() -> String) {
        self.errors += 1;
        self.first_error.get_or_insert_with(msg);
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

/// Daemon process counters from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// utime + stime, seconds.
    cpu_s: f64,
    vm_rss_kib: u64,
    vm_hwm_kib: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    rss_shmem_kib: u64,
    threads: u64,
}

pub fn sample_proc(pid: i32) -> Result<ProcSample, String> {
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
pub fn self_cpu() -> f64 {
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
pub struct Report {
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
    pub errors: u64,
    pub first_error: Option<String>,
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

/// What the run saw besides the queues' tallies.
pub struct RunInfo {
    pub disk_bytes: u64,
    pub area_bytes: u64,
    pub load_cpu_s: f64,
    /// The daemon at the start and the end of the measured window.
    pub daemon: Option<(ProcSample, ProcSample)>,
}

impl Report {
    pub fn new(args: &Args, info: RunInfo, results: &[QueueResult]) -> Result<Self, String> {
        let mut rl = new_hist();
        let mut wl = new_hist();
        let (mut reads, mut writes, mut bytes, mut errors) = (0, 0, 0, 0);
        let mut first_error = None;
        let mut measured: f64 = 0.0;
        for r in results {
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
        let daemon = match (args.pid, info.daemon) {
            (Some(pid), Some((a, z))) => {
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
        Ok(Report {
            label: args.label.clone(),
            socket: args.socket.display().to_string(),
            pattern: args.pattern,
            bs: args.bs,
            iodepth: args.iodepth,
            queues: args.queues,
            poll: args.poll,
            disk_bytes: info.disk_bytes,
            area_bytes: info.area_bytes,
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
            load_cpu_s: info.load_cpu_s,
            daemon,
        })
    }

    pub fn print_text(&self) {
        let r = self;
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
}
