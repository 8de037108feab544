//! The daemon's control-socket commands (docs/control.md): what the disk
//! is, how its queues are doing, who is connected. They run on the control
//! thread; each takes at most one lock at a time, briefly (the scheduler's
//! to copy its counters, or a connection's handler and then its
//! virtqueues; docs/design.md, "Threads, the run loop and locks").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use std::fs::File;

use super::active_connection::{ActiveConnection, ConnectionId};
use super::backup_job::BackupError;
use super::device::Device;
use super::protocol::FrontendHandler;
use super::request_stats::RequestStats;
use super::throttle::{Limit, Unit};
use crate::control::events::EventBus;
use crate::control::server::Commands;
use crate::control::wire::{ErrorBody, ErrorClass};
use crate::format::bitmap::count_chunk_bits;
use crate::fsutil::aligned::{AlignedBuf, PAGE};
use crate::fsutil::files::read_full_at;
use crate::units::{to_usize, SECTOR_BYTES};

/// A connection's number (1 for the first) and its handler.
type Numbered = (ConnectionId, Arc<Mutex<FrontendHandler>>);

/// The frontend connections open (at most two: the active one and a
/// migration's destination), kept by the accept loop for the control
/// thread, and which of them uses the device.
#[derive(Default)]
pub struct ConnectionSlot {
    open: Mutex<Vec<Numbered>>,
    /// Connections accepted since the daemon started.
    served: AtomicU64,
    pub active: Arc<ActiveConnection>,
}

impl ConnectionSlot {
    pub fn connected(&self, number: ConnectionId, handler: Arc<Mutex<FrontendHandler>>) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.lock().push((number, handler));
    }

    pub fn disconnected(&self, number: ConnectionId) {
        self.lock().retain(|(n, _)| *n != number);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Numbered>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to show (the active one, else the newest), the
    /// numbers of all open ones, and how many were served.
    fn get(&self) -> (Option<Numbered>, Vec<ConnectionId>, u64) {
        let open = self.lock();
        let owner = self.active.owner();
        let shown = open
            .iter()
            .find(|(n, _)| Some(*n) == owner)
            .or(open.last())
            .cloned();
        let numbers = open.iter().map(|(n, _)| *n).collect();
        (shown, numbers, self.served.load(Ordering::Relaxed))
    }
}

pub struct DaemonCommands {
    pub dev: Arc<Device>,
    pub stats: Arc<RequestStats>,
    pub connection: Arc<ConnectionSlot>,
    pub events: Arc<EventBus>,
    pub started: Instant,
}

/// How long `query-connection` waits for a frontend message to finish.
const HANDLER_WAIT: Duration = Duration::from_millis(200);

const COMMANDS: &[(&str, &str)] = &[
    (
        "query-disk",
        "the disk: format, sizes, chunk size, allocation, backing file and its checks",
    ),
    (
        "query-stats",
        "requests, bytes and latency percentiles per queue and in total; the write path's counters",
    ),
    (
        "query-connection",
        "whether a frontend is connected, the features it acked, its queues",
    ),
    (
        "set-throttle",
        "replace the I/O limits: iops-read, iops-write, iops-total, bps-read, bps-write, \
         bps-total, each RATE, \"RATE:BURST\" or {rate, burst}; none: no limits",
    ),
    ("query-throttle", "the I/O limits in force"),
    (
        "backup",
        "copy the disk as it is now into the file passed with the request (SCM_RIGHTS; \
         `ctl SOCKET backup TARGET` creates and passes it) while the guest goes on; \
         target: how to name it",
    ),
    (
        "query-jobs",
        "the backup job running and those that ended: status, progress, bytes written",
    ),
    ("cancel-job", "cancel the job with this id"),
];

/// `backup`: the target passed with the request, checked, and the job
/// started; its id.
fn backup(dev: &Device, args: &Map<String, Value>, fd: Option<File>) -> Result<Value, ErrorBody> {
    let bad = |what: String| ErrorBody::new(ErrorClass::InvalidParameter, what);
    let mut name = "the passed descriptor".to_owned();
    for (key, value) in args {
        match (key.as_str(), value) {
            ("target", Value::String(s)) => name = s.clone(),
            ("target", _) => return Err(bad("target: expected a string".into())),
            _ => return Err(bad(format!("backup: unknown argument '{key}' (target)"))),
        }
    }
    let Some(file) = fd else {
        return Err(bad(
            "backup needs the target file passed with the request as a descriptor \
             (SCM_RIGHTS); `vhost-user-cow ctl SOCKET backup TARGET` creates and passes it"
                .into(),
        ));
    };
    let id = dev.start_backup(file, name.clone()).map_err(|e| {
        let class = match e {
            BackupError::NotRegular { .. }
            | BackupError::NotWritable { .. }
            | BackupError::Append { .. }
            | BackupError::IsTheDisk { .. } => ErrorClass::InvalidParameter,
            _ => ErrorClass::GenericError,
        };
        ErrorBody::new(class, e.to_string())
    })?;
    log::info!("backup job {id} to {name} started through the control socket");
    Ok(json!({ "id": id }))
}

fn cancel_job(dev: &Device, args: &Map<String, Value>) -> Result<Value, ErrorBody> {
    let bad = |what: String| ErrorBody::new(ErrorClass::InvalidParameter, what);
    let mut id = None;
    for (key, value) in args {
        match key.as_str() {
            "id" => {
                id = Some(
                    value
                        .as_u64()
                        .ok_or_else(|| bad("id: expected a job number".into()))?,
                )
            }
            _ => return Err(bad(format!("cancel-job: unknown argument '{key}' (id)"))),
        }
    }
    let id = id.ok_or_else(|| bad("cancel-job needs the job's id".into()))?;
    if !dev.cancel_backup(id) {
        return Err(ErrorBody::new(
            ErrorClass::GenericError,
            format!("no job {id} is running (query-jobs lists them)"),
        ));
    }
    Ok(json!({}))
}

/// `set-throttle`'s arguments as limits.
fn parse_limits(args: &Map<String, Value>) -> Result<Vec<Limit>, ErrorBody> {
    let bad = |what: String| ErrorBody::new(ErrorClass::InvalidParameter, what);
    let mut limits = Vec::new();
    for (key, value) in args {
        let (unit, direction) = match key.as_str() {
            "iops-read" => (Unit::Iops, "read"),
            "iops-write" => (Unit::Iops, "write"),
            "iops-total" => (Unit::Iops, "total"),
            "bps-read" => (Unit::Bps, "read"),
            "bps-write" => (Unit::Bps, "write"),
            "bps-total" => (Unit::Bps, "total"),
            _ => {
                return Err(bad(format!(
                    "unknown argument '{key}' (iops-read, iops-write, iops-total, bps-read, \
                     bps-write, bps-total)"
                )))
            }
        };
        let spec = match value {
            Value::Number(n) if n.as_u64().is_some() => n.to_string(),
            Value::String(s) => s.clone(),
            Value::Object(o) => match (o.get("rate"), o.get("burst"), o.len()) {
                (Some(r), None, 1) if r.is_u64() => r.to_string(),
                (Some(r), Some(b), 2) if r.is_u64() && b.is_u64() => format!("{r}:{b}"),
                _ => {
                    return Err(bad(format!(
                        "{key}: expected {{\"rate\": N, \"burst\": M}}"
                    )))
                }
            },
            _ => {
                return Err(bad(format!(
                    "{key}: expected a rate, \"RATE:BURST\" or an object"
                )))
            }
        };
        let limit = Limit::parse(unit, &format!("{direction}={spec}"))
            .map_err(|e| bad(format!("{key}: {e}")))?;
        limits.push(limit);
    }
    Ok(limits)
}

fn no_arguments(name: &str, args: &Map<String, Value>) -> Result<(), ErrorBody> {
    match args.keys().next() {
        None => Ok(()),
        Some(k) => Err(ErrorBody::new(
            ErrorClass::InvalidParameter,
            format!("{name} takes no arguments (got '{k}')"),
        )),
    }
}

impl DaemonCommands {
    /// Allocated chunks: the loaded bitmap pages counted under the
    /// scheduler's lock, the others read from the file after it (a write
    /// in between may or may not be counted). None for a raw image or when
    /// the file cannot be read.
    fn allocated_chunks(&self) -> Option<u64> {
        let cow = self.dev.cow_summary.as_ref()?;
        let (loaded, on_file) = self.dev.sched().bitmap()?.count_split();
        let mut ones = loaded;
        const PIECE: u64 = 1 << 20;
        let align = PAGE as u64;
        let mut buf = AlignedBuf::zeroed(to_usize(PIECE + align));
        for r in on_file {
            let mut at = r.start;
            while at < r.end {
                let end = r.end.min(at + PIECE);
                // Aligned for O_DIRECT: whole pages of the file around it.
                let file_at = (cow.bitmap_offset + at) / align * align;
                let skip = to_usize(cow.bitmap_offset + at - file_at);
                let len = (skip + to_usize(end - at)).div_ceil(PAGE) * PAGE;
                let bytes = &mut buf.as_mut_slice()[..len];
                if let Err(e) = read_full_at(&self.dev.file, bytes, file_at) {
                    log::warn!(
                        "query-disk: read the bitmap of {}: {e}",
                        self.dev.path.display()
                    );
                    return None;
                }
                ones +=
                    count_chunk_bits(&bytes[skip..skip + to_usize(end - at)], at * 8, cow.chunks);
                at = end;
            }
        }
        Some(ones)
    }

    fn query_disk(&self) -> Value {
        let dev = &self.dev;
        let allocated_chunks = self.allocated_chunks();
        let mut v = json!({
            "path": crate::fsutil::escape::escape_path(&dev.path),
            "format": if dev.is_cow() { "cow" } else { "raw" },
            "format_guessed": dev.format_guessed,
            "read_only": dev.read_only,
            "cache": dev.cache.name(),
            "virtual_size": dev.sectors * SECTOR_BYTES,
            "sectors": dev.sectors,
            "sector_size": SECTOR_BYTES,
            "logical_block_size": dev.block_size,
            "serial": String::from_utf8_lossy(&dev.serial),
        });
        if let (Some(cow), Some(allocated)) = (&dev.cow_summary, allocated_chunks) {
            let mut c = serde_json::to_value(cow).unwrap_or(Value::Null);
            c["allocated_chunks"] = json!(allocated);
            c["allocated_bytes"] =
                json!((allocated * cow.chunk_size).min(dev.sectors * SECTOR_BYTES));
            v["cow"] = c;
        }
        v
    }

    fn query_stats(&self) -> Value {
        let n = self.stats.len();
        let queues: Vec<Value> = (0..n)
            .filter_map(|i| {
                let s = self.stats.snapshot(i..i + 1);
                let used = s.in_flight + s.reads + s.writes + s.flushes + s.others > 0;
                used.then(|| {
                    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                    v["queue"] = json!(i);
                    v
                })
            })
            .collect();
        let (write_path, failure) = {
            let sched = self.dev.sched();
            (sched.stats().clone(), sched.failure().map(str::to_owned))
        };
        json!({
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "total": self.stats.snapshot(0..n),
            "queues": queues,
            "write_path": write_path,
            "locks": self.dev.lock_counts_total(),
            "metadata_failure": failure,
        })
    }

    fn query_connection(&self) -> Result<Value, ErrorBody> {
        let (shown, open, served) = self.connection.get();
        let Some((number, handler)) = shown else {
            return Ok(json!({ "connected": false, "connections_served": served }));
        };
        let active = self.connection.active.owner() == Some(number);
        // The message thread holds the handler across a frontend message,
        // which may wait up to a minute for a worker: never stall every
        // control client behind that.
        let deadline = Instant::now() + HANDLER_WAIT;
        let status = loop {
            match handler.try_lock() {
                Ok(h) => break h.status(),
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().status(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(ErrorBody::new(
                        ErrorClass::GenericError,
                        "the connection is busy with a frontend message; try again",
                    ))
                }
            }
        };
        let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
        v["connected"] = json!(true);
        v["connection"] = json!(number);
        v["active"] = json!(active);
        v["open_connections"] = json!(open);
        v["connections_served"] = json!(served);
        Ok(v)
    }
}

impl Commands for DaemonCommands {
    fn list(&self) -> Vec<(&'static str, &'static str)> {
        COMMANDS.to_vec()
    }

    fn execute(
        &self,
        name: &str,
        args: &Map<String, Value>,
        fd: Option<File>,
    ) -> Result<Value, ErrorBody> {
        match name {
            "backup" => return backup(&self.dev, args, fd),
            "cancel-job" => return cancel_job(&self.dev, args),
            _ => {}
        }
        if name == "set-throttle" {
            let limits = parse_limits(args)?;
            self.dev.throttle.set(&limits);
            log::info!(
                "I/O limits set through the control socket: {}",
                if limits.is_empty() {
                    "none".to_owned()
                } else {
                    serde_json::to_string(&limits).unwrap_or_default()
                }
            );
            return Ok(json!({ "limits": limits }));
        }
        no_arguments(name, args)?;
        match name {
            "query-throttle" => Ok(json!({ "limits": self.dev.throttle.limits() })),
            "query-disk" => Ok(self.query_disk()),
            "query-stats" => Ok(self.query_stats()),
            "query-connection" => self.query_connection(),
            "query-jobs" => Ok(self.dev.list_jobs()),
            _ => Err(ErrorBody::new(
                ErrorClass::CommandNotFound,
                format!("no such command: {name}"),
            )),
        }
    }
}
