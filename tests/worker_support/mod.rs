//! In-process backend tests' harness: a real disk in a tempdir, the
//! daemon's `Device` and `Worker`, a hand-made split ring in real guest
//! memory (`guest.rs`) and a fake engine the test completes by hand
//! (`engine.rs`). [`Harness::iterate`] is one iteration of
//! `WorkerLoop::run` (worker_thread.rs) with the poll window off; where
//! the loop would sleep in epoll, [`Harness::run`] delivers what could
//! wake it (engine completions chosen by the test), and stops when nothing
//! could.

#![allow(dead_code)]

pub mod engine;
pub mod guest;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tempfile::TempDir;
use vhost_user_cow::daemon::device::{CacheMode, Device, DeviceOptions, DEFAULT_BITMAP_CACHE};
use vhost_user_cow::daemon::virtqueue::Virtqueue;
use vhost_user_cow::daemon::worker::{RingMode, Worker};
use vhost_user_cow::format::{create_cow, CreateOptions, Disk, DiskFormat, DiskOptions};

use engine::{Event, FakeEngine, Layout, OpInfo, State};
use guest::Guest;

/// Loop iterations after which a run is declared stuck.
const MAX_ITERATIONS: usize = 10_000;

/// The byte a backing file or raw image holds at `off` before any write:
/// differs between neighbouring sectors and within one.
pub fn pattern(off: u64) -> u8 {
    (off >> 9).to_le_bytes()[0].wrapping_mul(31) ^ off.to_le_bytes()[0] ^ 0x5a
}

pub fn patterned(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(off + i)).collect()
}

fn patterned_file(path: &Path, len: u64) {
    let f = File::create(path).unwrap();
    f.write_all_at(&patterned(0, vhost_user_cow::units::to_usize(len)), 0)
        .unwrap();
}

/// The disk under test.
#[derive(Debug, Clone, Copy)]
pub enum DiskKind {
    /// A raw image of this many bytes.
    Raw { len: u64 },
    /// A fresh COW file over a backing file of `backing_len` bytes.
    Cow { backing_len: u64, sectorsize: u32 },
}

pub struct Harness {
    // Dropped first: nothing may still refer to guest memory.
    pub worker: Worker,
    pub guest: Guest,
    pub dev: Device,
    engine: Arc<Mutex<State>>,
    pub mode: RingMode,
    rings: Vec<Arc<Virtqueue>>,
    /// The loop's `take` (a kick arrived) and `woken` flags.
    take: bool,
    woken: bool,
    /// Each used entry in publish order, with the engine log's length when
    /// it appeared (so it can be placed among the engine's events).
    pub published: Vec<(u16, usize)>,
    pub iterations: usize,
    pub path: PathBuf,
    _dir: TempDir,
}

impl Harness {
    pub fn new(disk: DiskKind, capacity: usize, mode: RingMode) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (path, format) = match disk {
            DiskKind::Raw { len } => {
                let p = dir.path().join("disk.img");
                patterned_file(&p, len);
                (p, DiskFormat::Raw)
            }
            DiskKind::Cow {
                backing_len,
                sectorsize,
            } => {
                let b = dir.path().join("backing.img");
                patterned_file(&b, backing_len);
                let p = dir.path().join("disk.cow");
                let opts = CreateOptions {
                    sectorsize,
                    ..CreateOptions::default()
                };
                create_cow(&p, &b, &opts).unwrap();
                (p, DiskFormat::Cow)
            }
        };
        let data_offset = Disk::open(
            &path,
            &DiskOptions {
                read_only: true,
                no_lock: true,
                format: Some(format),
                ..DiskOptions::default()
            },
        )
        .unwrap()
        .cow
        .map_or(0, |c| c.geometry.data_offset);
        let dev = Device::open(
            &DeviceOptions {
                disk: path.clone(),
                backing: None,
                format: Some(format),
                read_only: false,
                cache: CacheMode::Buffered,
                serial: None,
                throttle: Vec::new(),
                bitmap_cache: DEFAULT_BITMAP_CACHE,
            },
            1,
        )
        .unwrap();
        let guest = Guest::new(mode.event_idx);
        let (engine, state) = FakeEngine::new(
            Layout {
                guest: guest.host_range(),
                cow_fd: dev.cow_fd(),
                data_offset,
            },
            capacity,
        );
        let rings = vec![guest.vq.clone()];
        Harness {
            worker: Worker::new(0, Box::new(engine)),
            guest,
            dev,
            engine: state,
            mode,
            rings,
            take: false,
            woken: false,
            published: Vec::new(),
            iterations: 0,
            path,
            _dir: dir,
        }
    }

    pub fn engine(&self) -> MutexGuard<'_, State> {
        self.engine.lock().unwrap()
    }

    /// The guest kicked the ring (the loop's epoll saw the kick eventfd).
    pub fn kick(&mut self) {
        self.take = true;
    }

    /// One iteration of `WorkerLoop::run`, in its order: take (after a
    /// kick or when backpressure left descriptors behind), reap, issue the
    /// reads that skip the scheduler, one scheduler step under the lock,
    /// flush the engine, reap, publish.
    pub fn iterate(&mut self) {
        self.iterations += 1;
        assert!(
            self.iterations < MAX_ITERATIONS,
            "the worker did not converge in {MAX_ITERATIONS} iterations"
        );
        if self.take || self.worker.should_retake() {
            self.take = false;
            self.worker
                .take_requests(&self.dev, &self.rings, &self.guest.mem, self.mode);
        }
        self.worker.reap();
        self.worker.issue_off_lock(&self.dev);
        if self.worker.has_sched_input() || self.woken {
            self.woken = false;
            self.worker.sched_step_locked(&self.dev);
            // One thread: the scheduler never names another one.
            assert!(self.worker.take_kicks().is_empty());
        }
        self.worker.flush_engine();
        self.worker.run_backup_io(&self.dev);
        self.worker.reap();
        self.worker.publish(&self.rings, self.mode);
        self.record_used();
    }

    /// Another thread gave this one scheduler work (the control thread
    /// starting a backup wakes the worker so).
    pub fn wake(&mut self) {
        self.woken = true;
    }

    fn record_used(&mut self) {
        let used = self.guest.used();
        let log_len = self.engine().log.len();
        for &(head, _) in &used[self.published.len()..] {
            assert!(
                self.published.iter().all(|&(h, _)| h != head),
                "request {head} published twice"
            );
            self.published.push((head, log_len));
        }
    }

    /// The loop would go round again without sleeping.
    pub fn busy(&self) -> bool {
        // The same decision as WorkerLoop::run's.
        self.worker.has_work_now() || self.take || self.woken
    }

    /// Runs the loop. Where it would sleep in epoll, the engine's eventfd
    /// wakes it: `pick` chooses which pending operations complete, in which
    /// order (indices into the pending list, oldest first). Returns when
    /// the loop would sleep with nothing left to wake it: no pending
    /// operation, or `pick` chose none (the test holds them).
    pub fn run(&mut self, pick: impl FnMut(&[OpInfo]) -> Vec<usize>) {
        self.run_observed(pick, |_| {});
    }

    /// [`run`](Self::run), calling `observe` after every iteration.
    pub fn run_observed(
        &mut self,
        mut pick: impl FnMut(&[OpInfo]) -> Vec<usize>,
        mut observe: impl FnMut(&Harness),
    ) {
        loop {
            self.iterate();
            observe(self);
            if self.busy() {
                continue;
            }
            let pending = self.engine().pending();
            let chosen = pick(&pending);
            if chosen.is_empty() {
                return;
            }
            self.engine().complete(&chosen);
        }
    }

    /// The loop's idle condition, which StopRing/Detach/Exit wait for.
    pub fn idle(&self) -> bool {
        self.worker.requests_in_flight() == 0 && self.worker.ops_in_flight() == 0
    }

    /// Where the used entry of `head` appeared in the engine log.
    pub fn published_at(&self, head: u16) -> Option<usize> {
        self.published
            .iter()
            .find(|&&(h, _)| h == head)
            .map(|&(_, at)| at)
    }

    pub fn log(&self) -> Vec<Event> {
        self.engine().log.clone()
    }

    /// The disk's sectors read back with the synchronous format code (no
    /// lock: the device still holds it).
    pub fn read_back(&self, sector: u64, sectors: usize) -> Vec<u8> {
        let d = Disk::open(
            &self.path,
            &DiskOptions {
                read_only: true,
                no_lock: true,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; sectors * 512];
        d.read_sectors(sector, &mut buf).unwrap();
        buf
    }
}

/// Pick: every pending operation, oldest first.
pub fn all_in_order(p: &[OpInfo]) -> Vec<usize> {
    (0..p.len()).collect()
}

/// Pick: every pending operation, newest first (out of order).
pub fn all_reversed(p: &[OpInfo]) -> Vec<usize> {
    (0..p.len()).rev().collect()
}

/// Pick: the oldest pending operation only.
pub fn oldest(p: &[OpInfo]) -> Vec<usize> {
    (0..p.len().min(1)).collect()
}
