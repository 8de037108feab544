//! Backup jobs around the scheduler's copy-before-write (docs/control.md,
//! `backup`; docs/design.md, rule 10): the target file a client passed,
//! the job's clock, its events, and the jobs that ended (for
//! `query-jobs`).
//!
//! Locks: the jobs' mutex is a leaf. It is taken under the scheduler's
//! lock (after a scheduler step, for the events) and on its own (a worker
//! looking up the target, `query-jobs`), never the other way round.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use thiserror::Error;

use super::copy_before_write::{JobProgress, JobState};
use super::scheduler::{Scheduler, ThreadId};
use crate::control::events::EventBus;

/// Bytes a backup copies at a time (larger chunks make larger clusters).
pub const CLUSTER_BYTES: u64 = 64 << 10;
/// The worker whose engine reads the clusters.
const JOB_THREAD: ThreadId = 0;
/// JOB_PROGRESS at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Ended jobs `query-jobs` still shows.
const KEEP_ENDED: usize = 16;

#[derive(Debug, Error)]
pub enum BackupError {
    #[error("the target ({what}) is not a regular file")]
    NotRegular { what: String },
    #[error("the target ({what}) is not open for writing")]
    NotWritable { what: String },
    #[error("the target ({what}) is open with O_APPEND, which would put every cluster at its end")]
    Append { what: String },
    #[error("the target ({what}): {op}: {source}")]
    Io {
        what: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the target ({what}) is the disk's own {which}")]
    IsTheDisk { what: String, which: &'static str },
    #[error("{0}")]
    Busy(String),
}

/// The file a running job writes.
pub struct BackupTarget {
    pub id: u64,
    file: File,
    /// How the client named it (shown, never opened).
    pub name: String,
    started: Instant,
    started_unix: u64,
}

impl BackupTarget {
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

struct Ended {
    progress: JobProgress,
    target: String,
    started_unix: u64,
    elapsed: Duration,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    running: Option<Arc<BackupTarget>>,
    ended: Vec<Ended>,
    last_progress: Option<Instant>,
}

type Waker = Box<dyn Fn(ThreadId) + Send + Sync>;

#[derive(Default)]
pub struct BackupJobs {
    inner: Mutex<Inner>,
    /// Wakes a worker thread (set once the workers run).
    waker: OnceLock<Waker>,
}

fn job_json(p: &JobProgress, target: &str, started_unix: u64, elapsed: Duration) -> Value {
    json!({
        "id": p.id,
        "type": "backup",
        "target": target,
        "status": p.state,
        "clusters_done": p.clusters_done,
        "clusters_total": p.clusters_total,
        "cluster_bytes": p.cluster_bytes,
        "bytes_written": p.bytes_written,
        "writes_waited": p.writes_waited,
        "started_unix": started_unix,
        "elapsed_seconds": elapsed.as_secs_f64(),
        "error": p.error,
    })
}

impl BackupJobs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_waker(&self, wake: Waker) {
        let _ = self.waker.set(wake);
    }

    /// The target of job `id` while it runs.
    pub fn target(&self, id: u64) -> Option<Arc<BackupTarget>> {
        self.lock().running.clone().filter(|t| t.id == id)
    }

    /// Starts a backup of the disk (`sectors`, clusters of at least
    /// `chunk_sectors`) into `file`: checked to be a regular writable
    /// file, emptied and made `size` bytes long (sparse). The copy's point
    /// in time is when the scheduler's lock is taken here.
    /// `disk_files` (the image, the backing file) are refused as targets:
    /// emptying one would destroy the disk.
    pub fn start(
        &self,
        sched: &Mutex<Scheduler>,
        events: &EventBus,
        disk_files: &[(&File, &'static str)],
        file: File,
        name: String,
        size: u64,
    ) -> Result<u64, BackupError> {
        let io = |op| {
            let what = name.clone();
            move |source| BackupError::Io { what, op, source }
        };
        let meta = file.metadata().map_err(io("fstat"))?;
        if !meta.file_type().is_file() || meta.file_type().is_block_device() {
            return Err(BackupError::NotRegular { what: name });
        }
        for (f, which) in disk_files {
            if f.metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
            {
                return Err(BackupError::IsTheDisk { what: name, which });
            }
        }
        // SAFETY: F_GETFL on an open fd.
        let flags =
            unsafe { libc::fcntl(std::os::unix::io::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
        if flags < 0 || flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(BackupError::NotWritable { what: name });
        }
        if flags & libc::O_APPEND != 0 {
            return Err(BackupError::Append { what: name });
        }
        {
            let mut s = lock_sched(sched);
            // A job that ended under this thread's lock (cancel-job) is
            // reported before another starts.
            self.after_step(&mut s, events);
            if let Some(p) = s.backup_progress() {
                return Err(BackupError::Busy(format!(
                    "backup job {} is still running; one job at a time",
                    p.id
                )));
            }
        }
        file.set_len(0).map_err(io("truncate"))?;
        file.set_len(size).map_err(io("truncate"))?;
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut s = lock_sched(sched);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        s.start_backup(id, JOB_THREAD, CLUSTER_BYTES / crate::units::SECTOR_BYTES)
            .map_err(BackupError::Busy)?;
        inner.running = Some(Arc::new(BackupTarget {
            id,
            file,
            name,
            started: Instant::now(),
            started_unix,
        }));
        inner.last_progress = None;
        drop(inner);
        let kicks = s.take_kicks(usize::MAX);
        drop(s);
        self.wake(&kicks);
        Ok(id)
    }

    /// Cancels job `id` if it runs.
    pub fn cancel(&self, sched: &Mutex<Scheduler>, events: &EventBus, id: u64) -> bool {
        let mut s = lock_sched(sched);
        let done = s.cancel_backup(id);
        // With nothing in flight it ended at once: say so now.
        self.after_step(&mut s, events);
        // The writes it released may be any thread's.
        let kicks = s.take_kicks(usize::MAX);
        drop(s);
        self.wake(&kicks);
        done
    }

    /// Wakes the workers the control thread gave scheduler work to.
    fn wake(&self, threads: &[ThreadId]) {
        if let Some(w) = self.waker.get() {
            for &t in threads {
                w(t);
            }
        }
    }

    /// The running job and those that ended, oldest first.
    pub fn list(&self, sched: &Mutex<Scheduler>) -> Value {
        let running = lock_sched(sched).backup_progress();
        let inner = self.lock();
        let mut out: Vec<Value> = inner
            .ended
            .iter()
            .map(|e| job_json(&e.progress, &e.target, e.started_unix, e.elapsed))
            .collect();
        if let (Some(p), Some(t)) = (running, &inner.running) {
            if p.id == t.id {
                out.push(job_json(&p, &t.name, t.started_unix, t.started.elapsed()));
            }
        }
        Value::Array(out)
    }

    /// After a scheduler step: JOB_COMPLETED for a job that ended (its
    /// target is closed), JOB_PROGRESS at most once a second.
    pub fn after_step(&self, sched: &mut Scheduler, events: &EventBus) {
        if let Some(end) = sched.take_backup_ended() {
            let mut inner = self.lock();
            let Some(t) = inner.running.take() else {
                return;
            };
            let elapsed = t.started.elapsed();
            let data = job_json(&end, &t.name, t.started_unix, elapsed);
            match end.state {
                JobState::Failed => log::error!(
                    "backup job {} to {} failed: {}",
                    end.id,
                    t.name,
                    end.error.as_deref().unwrap_or("?")
                ),
                _ => log::info!(
                    "backup job {} to {}: {:?}, {} bytes written in {:.1} s",
                    end.id,
                    t.name,
                    end.state,
                    end.bytes_written,
                    elapsed.as_secs_f64()
                ),
            }
            inner.ended.push(Ended {
                progress: end,
                target: t.name.clone(),
                started_unix: t.started_unix,
                elapsed,
            });
            if inner.ended.len() > KEEP_ENDED {
                inner.ended.remove(0);
            }
            drop(inner);
            events.emit("JOB_COMPLETED", data);
            return;
        }
        if !sched.take_backup_progressed() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if inner
            .last_progress
            .is_some_and(|at| now.duration_since(at) < PROGRESS_EVERY)
        {
            return;
        }
        inner.last_progress = Some(now);
        let Some(p) = sched.backup_progress() else {
            return;
        };
        events.emit(
            "JOB_PROGRESS",
            json!({
                "id": p.id,
                "clusters_done": p.clusters_done,
                "clusters_total": p.clusters_total,
                "bytes_written": p.bytes_written,
            }),
        );
    }
}

fn lock_sched(sched: &Mutex<Scheduler>) -> MutexGuard<'_, Scheduler> {
    sched.lock().unwrap_or_else(|p| p.into_inner())
}
