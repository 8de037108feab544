//! The vhost-user backend: features, config space, and the dispatch of
//! vring and I/O events to the queue threads. One backend per frontend
//! connection; the device behind it outlives connections.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::daemon::device::CacheMode;
use crate::daemon::device::Device;
use crate::daemon::worker::{Memory, Vring, Worker};
use crate::io_engine::{new_engine, EngineError, EngineKind, InlineWrites};
use crate::virtio::config::{virtio_features, BlkConfig};

#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub num_queues: usize,
    pub queue_size: usize,
    pub threads: usize,
    pub engine: EngineKind,
    pub queue_depth: usize,
    /// Busy-poll this long after the last event before sleeping in epoll.
    pub poll: Duration,
    /// Do buffered writes on the queue thread (`InlineWrites`); ignored
    /// for O_DIRECT and O_DSYNC files.
    pub inline_writes: bool,
}

struct ThreadState {
    worker: Mutex<Worker>,
    /// The thread's vrings, as last seen in `handle_event`: `stop_vring`
    /// needs them to put finished requests on the used ring.
    vrings: Mutex<Vec<Vring>>,
    /// Wakes the thread when another thread finished its requests.
    wake: (EventConsumer, EventNotifier),
    /// Given to the vring epoll handler; kept to stop the thread.
    exit: EventNotifier,
    exit_consumer: Mutex<Option<EventConsumer>>,
}

struct Inner {
    // Declared before `dev`: the engines (which wait for their I/O when
    // dropped) go before the files and bitmap that I/O addresses.
    threads: Vec<ThreadState>,
    dev: Arc<Device>,
    opts: BackendOptions,
    mem: Mutex<Option<GuestMemoryAtomic<Memory>>>,
    event_idx: AtomicBool,
    acked: AtomicU64,
    config: Mutex<BlkConfig>,
    /// Set when the connection is over: late events are ignored.
    closed: AtomicBool,
    /// The guest turned the write cache off (config `writeback` = 0).
    writethrough: AtomicBool,
}

#[derive(Clone)]
pub struct CowBackend(Arc<Inner>);

/// Inline writes are for page-cache writes only: an O_DIRECT or O_DSYNC
/// write waits for the device and belongs in the engine.
fn inline_writes_apply(opts: &BackendOptions, dev: &Device) -> bool {
    opts.inline_writes && dev.cache == CacheMode::Buffered
}

impl CowBackend {
    pub fn new(dev: Arc<Device>, opts: BackendOptions) -> Result<CowBackend, EngineError> {
        let nthreads = opts.threads.clamp(1, opts.num_queues.max(1));
        let inline_writes = inline_writes_apply(&opts, &dev);
        let mut threads = Vec::with_capacity(nthreads);
        for t in 0..nthreads {
            let mut engine = new_engine(opts.engine, opts.queue_depth)?;
            if inline_writes {
                engine = Box::new(InlineWrites::new(engine));
            }
            let wake = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(EngineError::EventFd)?;
            let (exit_c, exit_n) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .map_err(EngineError::EventFd)?;
            threads.push(ThreadState {
                worker: Mutex::new(Worker::new(t, engine)),
                vrings: Mutex::new(Vec::new()),
                wake,
                exit: exit_n,
                exit_consumer: Mutex::new(Some(exit_c)),
            });
        }
        let mut config =
            BlkConfig::from_limits(&dev.limits, opts.num_queues as u16, dev.block_size, true);
        config.num_queues = opts.num_queues as u16;
        Ok(CowBackend(Arc::new(Inner {
            dev,
            opts,
            threads,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            config: Mutex::new(config),
            closed: AtomicBool::new(false),
            writethrough: AtomicBool::new(false),
        })))
    }

    pub fn engine_name(&self) -> &'static str {
        self.worker(0).engine_name()
    }

    /// Whether buffered writes are done on the queue threads.
    pub fn inline_writes(&self) -> bool {
        inline_writes_apply(&self.0.opts, &self.0.dev)
    }

    pub fn acked_features_bits(&self) -> u64 {
        self.0.acked.load(Ordering::Relaxed)
    }

    fn worker(&self, thread: usize) -> MutexGuard<'_, Worker> {
        self.0.threads[thread]
            .worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn num_threads(&self) -> usize {
        self.0.threads.len()
    }

    /// Event ids of the custom listeners of a thread: the engine's
    /// completions and the cross-thread wake-up. Above the vring ids and
    /// the exit event, which vhost-user-backend reserves.
    pub fn engine_event(&self) -> u64 {
        self.0.opts.num_queues as u64 + 1
    }

    pub fn wake_event(&self) -> u64 {
        self.0.opts.num_queues as u64 + 2
    }

    /// (engine fd, wake fd) of a thread, for registering with its epoll.
    pub fn thread_fds(&self, thread: usize) -> (i32, i32) {
        use std::os::unix::io::AsRawFd;
        let t = &self.0.threads[thread];
        (self.worker(thread).engine_fd(), t.wake.0.as_raw_fd())
    }

    /// Which thread serves queue `q`, and its index among that thread's
    /// vrings (queues are dealt out round-robin).
    fn writethrough(&self) -> bool {
        self.0.writethrough.load(Ordering::Relaxed)
    }

    fn thread_of(&self, q: usize) -> (usize, usize) {
        let n = self.0.threads.len();
        (q % n, q / n)
    }

    fn wake(&self, threads: Vec<usize>) {
        for t in threads {
            let _ = self.0.threads[t].wake.1.notify();
        }
    }

    /// Issue, reap and complete until this thread has nothing left to do
    /// right now.
    fn run_thread(&self, thread: usize, vrings: &[Vring], mem: &GuestMemoryAtomic<Memory>) {
        let dev = &self.0.dev;
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        let mut w = self.worker(thread);
        loop {
            let kicks = w.pump(dev);
            self.wake(kicks);
            w.complete(dev, vrings, self.writethrough());
            if w.should_retake() {
                w.take_all(dev, vrings, mem, event_idx);
                continue;
            }
            if !w.reap(dev) && !w.has_work(dev) {
                break;
            }
        }
    }

    fn take_all(&self, thread: usize, vrings: &[Vring], mem: &GuestMemoryAtomic<Memory>) {
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        self.worker(thread)
            .take_all(&self.0.dev, vrings, mem, event_idx);
    }

    fn has_avail(vrings: &[Vring], mem: &GuestMemoryAtomic<Memory>) -> bool {
        let m = mem.memory();
        vrings.iter().any(|v| {
            let st = v.get_ref();
            let q = st.get_queue();
            q.ready()
                && q.avail_idx(&*m, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != q.next_avail())
        })
    }

    /// Completes everything in flight on all threads: used when a
    /// connection ends and at shutdown, so no request or bitmap write of
    /// the old connection is left half done.
    pub fn drain(&self) {
        self.0.closed.store(true, Ordering::Release);
        for t in &self.0.threads {
            let _ = t.exit.notify();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut busy = false;
            for thread in 0..self.0.threads.len() {
                let mut w = self.worker(thread);
                let kicks = w.pump(&self.0.dev);
                drop(w);
                self.wake(kicks);
                let mut w = self.worker(thread);
                w.complete(&self.0.dev, &[], false);
                w.reap(&self.0.dev);
                if w.has_inflight() || w.engine_in_flight() > 0 {
                    busy = true;
                    if w.engine_in_flight() > 0 {
                        w.wait_engine();
                    }
                }
            }
            if !busy {
                break;
            }
            if Instant::now() > deadline {
                log::error!("I/O did not finish within 60 s while draining");
                break;
            }
        }
    }
}

impl VhostUserBackend for CowBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.opts.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.0.opts.queue_size
    }

    fn features(&self) -> u64 {
        virtio_features(self.0.dev.read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Relaxed);
        log::info!("frontend acked virtio features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut config = self.0.config.lock().unwrap_or_else(|p| p.into_inner());
        config
            .write_config(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let writethrough = config.writeback == 0;
        self.0.writethrough.store(writethrough, Ordering::Relaxed);
        log::info!(
            "guest set the write cache to {}",
            if writethrough {
                "writethrough"
            } else {
                "writeback"
            }
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Memory>) -> io::Result<()> {
        *self.0.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.0.threads.len();
        let mut masks = vec![0u64; n];
        for q in 0..self.0.opts.num_queues {
            masks[q % n] |= 1 << q;
        }
        masks
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let t = self.0.threads.get(thread_index)?;
        let consumer = t.exit_consumer.lock().ok()?.take()?;
        Some((consumer, t.exit.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: finish what this ring took before the frontend
        // reads its indices back.
        let (thread, local) = self.thread_of(queue_index as usize);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut w = self.worker(thread);
            if !w.has_inflight_on(local) {
                return Ok(());
            }
            let vrings = self.0.threads[thread]
                .vrings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let kicks = w.pump(&self.0.dev);
            w.complete(&self.0.dev, &vrings, self.writethrough());
            if w.has_inflight_on(local) {
                w.wait_engine();
                w.reap(&self.0.dev);
            }
            drop(w);
            self.wake(kicks);
            if Instant::now() > deadline {
                log::error!("queue {queue_index}: requests still in flight after 30 s at stop");
                return Ok(());
            }
            std::thread::yield_now();
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if self.0.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(mem) = self.0.mem.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        {
            let mut known = self.0.threads[thread_id]
                .vrings
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if known.len() != vrings.len() {
                *known = vrings.to_vec();
            }
        }
        let ev = u64::from(device_event);
        if ev == self.wake_event() {
            let _ = self.0.threads[thread_id].wake.0.consume();
        } else if (device_event as usize) < vrings.len() {
            let event_idx = self.0.event_idx.load(Ordering::Relaxed);
            self.worker(thread_id).take_requests(
                &self.0.dev,
                vrings,
                device_event as usize,
                &mem,
                event_idx,
            );
        }
        self.run_thread(thread_id, vrings, &mem);
        // The polling window: a request that follows soon after the last
        // one is picked up without a trip through epoll.
        if !self.0.opts.poll.is_zero() {
            let deadline = Instant::now() + self.0.opts.poll;
            while Instant::now() < deadline {
                if Self::has_avail(vrings, &mem) {
                    self.take_all(thread_id, vrings, &mem);
                    self.run_thread(thread_id, vrings, &mem);
                } else if self.worker(thread_id).engine_in_flight() > 0 {
                    self.run_thread(thread_id, vrings, &mem);
                }
                std::hint::spin_loop();
            }
        }
        Ok(())
    }
}
