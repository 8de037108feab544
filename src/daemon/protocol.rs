//! The vhost-user frontend protocol, on the `vhost` crate's backend
//! request handler: that crate reads and writes the messages (and their
//! file descriptors) and answers REPLY_ACK; this file gives each message
//! its meaning for our device. One handler per frontend connection; the
//! worker threads it hands rings to outlive it.
//!
//! Why our own code and not vhost-user-backend: docs/design.md, "The
//! protocol layer".

use std::fs::File;
use std::io;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VhostError, GpuBackend, Result as VhostResult};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::active_connection::{ActiveConnection, Claim, ConnectionId};
use super::device::Device;
use super::dirty_log::DirtyLog;
use super::guest_memory::{GuestMemoryMap, MemoryError};
use super::inflight::{InflightArea, InflightError, Layout};
use super::virtqueue::Virtqueue;
use super::worker_thread::{Command, ConnectionShared, WorkerPool};
use crate::virtio::config::{virtio_features, BlkConfig};

/// Memory slots offered with CONFIGURE_MEM_SLOTS.
const MAX_MEM_SLOTS: u64 = 509;

/// The protocol features we offer; REPLY_ACK is the vhost crate's.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// The virtio features we offer: the device's, and dirty logging
/// (docs/design.md, "Dirty logging").
fn offered_features(read_only: bool) -> u64 {
    virtio_features(read_only) | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// What the frontend may set up.
#[derive(Debug, Clone, Copy)]
pub struct ProtocolOptions {
    pub num_queues: u16,
    /// Largest virtqueue size accepted (a power of two).
    pub max_queue_size: u16,
}

/// One frontend connection's view of the device.
pub struct FrontendHandler {
    dev: Arc<Device>,
    pool: Arc<WorkerPool>,
    opts: ProtocolOptions,
    config: BlkConfig,
    memory: GuestMemoryMap,
    conn: Arc<ConnectionShared>,
    queues: Vec<Arc<Virtqueue>>,
    /// Dirty logging (src/daemon/dirty_log.rs); its rings mark in it.
    log: Arc<DirtyLog>,
    acked_features: u64,
    acked_protocol_features: u64,
    /// The in-flight area the frontend handed over (SET_INFLIGHT_FD).
    inflight: Option<Arc<InflightArea>>,
    /// This connection's number, and which connection is using the device
    /// (src/daemon/active_connection.rs).
    id: ConnectionId,
    active: Arc<ActiveConnection>,
    /// Rings handed to a worker and not yet taken back (a ring the worker
    /// stopped as broken is still on its list).
    handed: Vec<bool>,
}

/// A refused message: logged (rate-limited per `cause`) and answered with
/// a failure.
fn invalid(cause: &'static str, what: String) -> VhostError {
    crate::log_limited!(log::Level::Warn, cause, "frontend message refused: {what}");
    VhostError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what))
}

fn memory_error(e: MemoryError) -> VhostError {
    invalid("memory table", e.to_string())
}

fn inflight_error(e: InflightError) -> VhostError {
    invalid("in-flight area", e.to_string())
}

fn unsupported(what: &'static str) -> VhostError {
    crate::log_limited!(
        log::Level::Warn,
        what,
        "frontend message refused: {what} is not supported"
    );
    VhostError::InvalidOperation("not supported")
}

fn eventfd(file: File) -> EventFd {
    // SAFETY: the file descriptor is ours alone (received with the
    // message); EventFd takes it over.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl FrontendHandler {
    pub fn new(
        dev: Arc<Device>,
        pool: Arc<WorkerPool>,
        opts: ProtocolOptions,
    ) -> Result<FrontendHandler, virtio_queue::Error> {
        let config = BlkConfig::from_limits(&dev.limits, opts.num_queues, dev.block_size, true);
        let memory = GuestMemoryMap::default();
        let conn = Arc::new(ConnectionShared {
            mem: memory.atomic(),
            event_idx: AtomicBool::new(false),
            writethrough: AtomicBool::new(false),
        });
        let queues = (0..opts.num_queues)
            .map(|i| Virtqueue::new(i, opts.max_queue_size).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let log = Arc::new(DirtyLog::default());
        for q in &queues {
            q.lock().log = Some(log.clone());
        }
        Ok(FrontendHandler {
            dev,
            pool,
            opts,
            config,
            memory,
            conn,
            queues,
            log,
            acked_features: 0,
            acked_protocol_features: 0,
            inflight: None,
            id: 1,
            active: Arc::new(ActiveConnection::default()),
            handed: vec![false; usize::from(opts.num_queues)],
        })
    }

    /// Makes this connection number `id` among those sharing `active`
    /// (several connections to one daemon).
    pub fn sharing(mut self, id: ConnectionId, active: Arc<ActiveConnection>) -> Self {
        self.id = id;
        self.active = active;
        self
    }

    /// Whether the workers serve this connection's rings.
    pub fn is_active(&self) -> bool {
        self.active.is_active(self.id)
    }

    /// Makes this the connection the workers serve, unless another one
    /// is; the first ring started claims the device.
    fn claim(&self, index: u32) -> bool {
        match self.active.claim(self.id) {
            Claim::Held => true,
            Claim::Taken => {
                self.pool.attach(&self.conn);
                crate::log_limited!(
                    log::Level::Info,
                    "connection active",
                    "frontend connection {} is now the active one",
                    self.id
                );
                true
            }
            Claim::Busy(other) => {
                crate::log_limited!(
                    log::Level::Info,
                    "connection waits",
                    "frontend connection {}: queue {index} waits, connection {other} is using \
                     the device",
                    self.id
                );
                false
            }
        }
    }

    /// Gives the device up once no ring of ours is with a worker.
    fn release_if_idle(&mut self) {
        if self.handed.iter().any(|&h| h) || !self.active.is_active(self.id) {
            return;
        }
        if !self.pool.detach() {
            log::error!("I/O of connection {} did not finish in time", self.id);
        }
        self.active.release(self.id);
        crate::log_limited!(
            log::Level::Info,
            "connection inactive",
            "frontend connection {} stopped its rings and is no longer the active one",
            self.id
        );
    }

    /// Starts the rings that waited for the device (another connection
    /// had it); the serve loop calls this when the device is free.
    pub fn start_waiting_rings(&mut self) {
        for i in 0..u32::from(self.opts.num_queues) {
            // A refusal is logged by `maybe_start`; the ring stays stopped.
            let _ = self.maybe_start(i);
        }
    }

    /// Whether the frontend truncated a file this connection mapped
    /// (guest memory or the dirty log) under the daemon.
    pub fn memory_truncated(&self) -> bool {
        self.memory.truncated() || self.log.truncated()
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn queue(&self, index: u32) -> VhostResult<&Arc<Virtqueue>> {
        self.queues.get(index as usize).ok_or_else(|| {
            invalid(
                "no such queue",
                format!(
                    "queue {index} does not exist (there are {})",
                    self.queues.len()
                ),
            )
        })
    }

    /// Hands a ring to its worker once it is set up, kicked and enabled.
    fn maybe_start(&mut self, index: u32) -> VhostResult<()> {
        let vq = self.queue(index)?.clone();
        let mut st = vq.lock();
        if st.started || !st.can_start() {
            return Ok(());
        }
        let mem = self.conn.mem.memory();
        if !st.queue.is_valid(&*mem) {
            return Err(invalid(
                "rings outside memory",
                format!("queue {index}: its rings are not inside guest memory"),
            ));
        }
        if !self.claim(index) {
            return Ok(());
        }
        recover_inflight(&mut st, &mem)?;
        st.started = true;
        drop(st);
        self.handed[usize::from(vq.index)] = true;
        self.pool.send(
            self.pool.thread_of(vq.index),
            Command::StartRing(vq.clone()),
        );
        Ok(())
    }

    /// Takes a ring back from its worker, once its requests in flight are
    /// published.
    fn stop(&mut self, index: u32) -> VhostResult<()> {
        let vq = self.queue(index)?.clone();
        let was = std::mem::replace(&mut vq.lock().started, false);
        // A ring its worker stopped as broken is still on the worker's list.
        let handed = std::mem::take(&mut self.handed[usize::from(vq.index)]);
        if (was || handed) && !self.pool.stop_ring(vq.index) {
            crate::log_limited!(
                log::Level::Error,
                "stop timed out",
                "queue {index}: requests still in flight after stopping it"
            );
        }
        self.release_if_idle();
        Ok(())
    }

    /// The daemon is stopping (SIGTERM): stop every ring, which publishes
    /// every request taken, before the connection ends. A frontend rewinds
    /// its rings to the used index when its backend goes away, so then it
    /// neither loses nor repeats a request, whichever daemon it reconnects
    /// to, with in-flight tracking or without (an upgrade or a downgrade).
    pub fn drain(&mut self) {
        for i in 0..u32::from(self.opts.num_queues) {
            let _ = self.stop(i);
        }
        log::info!("every request taken was completed and published before disconnecting");
    }

    /// The connection ended: stop every ring and finish the I/O in flight.
    pub fn disconnect(&mut self) {
        for q in &self.queues {
            q.lock().started = false;
        }
        self.handed.fill(false);
        // An inactive connection's rings were never with the workers.
        if !self.is_active() {
            return;
        }
        if !self.pool.detach() {
            log::error!("I/O of the ended connection did not finish in time");
        }
        self.active.release(self.id);
    }
}

impl VhostUserBackendReqHandlerMut for FrontendHandler {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        for i in 0..u32::from(self.opts.num_queues) {
            self.stop(i)?;
        }
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        Err(unsupported("RESET_DEVICE"))
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(offered_features(self.dev.read_only))
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = offered_features(self.dev.read_only);
        if features & !offered != 0 {
            return Err(invalid(
                "SET_FEATURES",
                format!("features {:#x} were not offered", features & !offered),
            ));
        }
        self.acked_features = features;
        crate::log_limited!(
            log::Level::Info,
            "features acked",
            "frontend acked virtio features {features:#x}"
        );
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &self.queues {
            q.lock().queue.set_event_idx(event_idx);
        }
        self.conn.event_idx.store(event_idx, Ordering::Release);
        // Rings keep running: each looks at the log before it marks.
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log_all != self.log.is_on() {
            crate::log_limited!(
                log::Level::Info,
                "dirty logging",
                "dirty logging {} (VHOST_F_LOG_ALL {})",
                if log_all { "requested" } else { "off" },
                if log_all { "acked" } else { "cleared" }
            );
        }
        self.log.set_logging(log_all);
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings
        // start enabled.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..u32::from(self.opts.num_queues) {
                self.queues[i as usize].lock().enabled = true;
                self.maybe_start(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.memory
            .set_table(regions, files)
            .map_err(memory_error)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let max = self.opts.max_queue_size;
        let size = u16::try_from(num)
            .ok()
            .filter(|&n| n <= max && n.is_power_of_two());
        let Some(size) = size else {
            return Err(invalid(
                "SET_VRING_NUM",
                format!("queue {index}: size {num} (must be a power of two from 1 to {max})"),
            ));
        };
        let mut st = self.queue(index)?.lock();
        if st.started {
            return Err(invalid(
                "SET_VRING_NUM",
                format!("queue {index}: SET_VRING_NUM on a started ring"),
            ));
        }
        st.queue.set_size(size);
        // A ring stopped as broken is served again, at its next kick.
        st.revive();
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostResult<()> {
        let gpa = |what: &str, addr: u64| {
            self.memory
                .frontend_to_guest(addr)
                .map_err(|e| invalid("SET_VRING_ADDR", format!("queue {index}: {what}: {e}")))
        };
        let (desc, avail, used) = (
            gpa("descriptor table", descriptor)?,
            gpa("avail ring", available)?,
            gpa("used ring", used)?,
        );
        let mem = self.conn.mem.memory();
        let mut st = self.queue(index)?.lock();
        let log_used = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        if st.started {
            // QEMU turns used-ring logging on and off on running rings
            // (same addresses, new flags): only that is allowed.
            let q = &st.queue;
            if (q.desc_table(), q.avail_ring(), q.used_ring()) != (desc, avail, used) {
                return Err(invalid(
                    "SET_VRING_ADDR",
                    format!("queue {index}: SET_VRING_ADDR moves a started ring"),
                ));
            }
            st.log_used = log_used;
            return Ok(());
        }
        st.log_used = log_used;
        let q = &mut st.queue;
        q.try_set_desc_table_address(GuestAddress(desc))
            .and_then(|_| q.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|_| q.try_set_used_ring_address(GuestAddress(used)))
            .map_err(|e| {
                invalid(
                    "SET_VRING_ADDR",
                    format!("queue {index}: ring address: {e}"),
                )
            })?;
        // The used index continues from where the driver's ring is (as
        // after a reconnect); SET_VRING_BASE gives only the avail side.
        if let Ok(idx) = q.used_idx(&*mem, Ordering::Acquire) {
            q.set_next_used(idx.0);
        }
        // A ring stopped as broken is served again, at its next kick.
        st.revive();
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let mut st = self.queue(index)?.lock();
        if st.started {
            return Err(invalid(
                "SET_VRING_BASE",
                format!("queue {index}: SET_VRING_BASE on a started ring"),
            ));
        }
        // A split ring's avail index is 16 bits.
        let Ok(base) = u16::try_from(base) else {
            return Err(invalid(
                "SET_VRING_BASE",
                format!("queue {index}: base {base} out of range"),
            ));
        };
        st.queue.set_next_avail(base);
        // A ring stopped as broken is served again, at its next kick.
        st.revive();
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        // Stop the ring: its worker publishes what it took first.
        self.stop(index)?;
        let mut st = self.queue(index)?.lock();
        let next = st.queue.next_avail();
        st.queue.set_ready(false);
        st.kick = None;
        st.call = None;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = u32::from(index);
        self.stop(index)?;
        {
            let mut st = self.queue(index)?.lock();
            st.kick = fd.map(eventfd);
            // A kick fd starts the ring (the spec's "ring starts on kick").
            let ready = st.kick.is_some();
            st.queue.set_ready(ready);
        }
        self.maybe_start(index)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.queue(u32::from(index))?.lock().call = fd.map(eventfd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // We never report ring errors through it; the fd is dropped.
        self.queue(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.opts.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        if enable {
            self.queue(index)?.lock().enabled = true;
            self.maybe_start(index)
        } else {
            self.stop(index)?;
            self.queue(index)?.lock().enabled = false;
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        Ok(self.config.read_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.config
            .write_config(offset, buf)
            .map_err(|e| invalid("SET_CONFIG", format!("SET_CONFIG: {e}")))?;
        let writethrough = self.config.writeback == 0;
        self.conn
            .writethrough
            .store(writethrough, Ordering::Release);
        crate::log_limited!(
            log::Level::Info,
            "write cache set",
            "guest set the write cache to {}",
            if writethrough {
                "writethrough"
            } else {
                "writeback"
            }
        );
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(unsupported("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(unsupported("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let area = InflightArea::create(
            inflight.num_queues,
            inflight.queue_size,
            self.opts.num_queues,
            self.opts.max_queue_size,
        )
        .map_err(inflight_error)?;
        let l = area.layout();
        let file = area
            .file()
            .map_err(|e| invalid("in-flight area", format!("in-flight area: {e}")))?;
        Ok((
            VhostUserInflight::new(l.mmap_size, l.mmap_offset, l.num_queues, l.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        let layout = Layout {
            mmap_size: inflight.mmap_size,
            mmap_offset: inflight.mmap_offset,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        let area = InflightArea::open(file, layout, self.opts.num_queues, self.opts.max_queue_size)
            .map(Arc::new)
            .map_err(inflight_error)?;
        area.check().map_err(inflight_error)?;
        if self.queues.iter().any(|q| q.lock().started) {
            return Err(invalid(
                "SET_INFLIGHT_FD",
                "SET_INFLIGHT_FD while rings are started".into(),
            ));
        }
        for q in &self.queues {
            q.lock().inflight = area.queue(q.index);
        }
        self.inflight = Some(area);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.memory.add_region(region, fd).map_err(memory_error)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.memory.remove_region(region).map_err(memory_error)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(unsupported("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(unsupported("CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(unsupported("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        self.log
            .set_base(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| invalid("SET_LOG_BASE", e.to_string()))?;
        crate::log_limited!(
            log::Level::Info,
            "dirty log mapped",
            "dirty log of {} bytes mapped (covers {} MiB of guest memory)",
            log.mmap_size,
            log.mmap_size.saturating_mul(8 << 12) >> 20
        );
        Ok(())
    }
}

/// What `query-connection` shows of one queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStatus {
    pub index: u16,
    pub size: u16,
    pub ready: bool,
    pub enabled: bool,
    /// Being served by its worker.
    pub started: bool,
    pub broken: bool,
    pub next_avail: u16,
    pub next_used: u16,
}

/// What `query-connection` shows of a connection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionStatus {
    pub features: Vec<String>,
    pub protocol_features: Vec<String>,
    pub memory_regions: usize,
    /// Queues the frontend set up (ready) or that are served.
    pub queues: Vec<QueueStatus>,
}

impl FrontendHandler {
    /// Takes each virtqueue's lock in turn (lock order: this handler, then
    /// a virtqueue; docs/design.md).
    pub fn status(&self) -> ConnectionStatus {
        let queues = self
            .queues
            .iter()
            .filter_map(|q| {
                let st = q.lock();
                let shown = st.queue.ready() || st.started || st.enabled;
                shown.then(|| QueueStatus {
                    index: q.index,
                    size: st.queue.size(),
                    ready: st.queue.ready(),
                    enabled: st.enabled,
                    started: st.started,
                    broken: st.broken,
                    next_avail: st.queue.next_avail(),
                    next_used: st.queue.next_used(),
                })
            })
            .collect();
        ConnectionStatus {
            features: crate::virtio::config::feature_names(self.acked_features),
            protocol_features: VhostUserProtocolFeatures::from_bits_truncate(
                self.acked_protocol_features,
            )
            .iter_names()
            .map(|(n, _)| n.to_ascii_lowercase().replace('_', "-"))
            .collect(),
            memory_regions: self.memory.regions(),
            queues,
        }
    }
}

/// At a ring start with an in-flight region: repair it, and continue the
/// ring after the requests still in flight, which are resubmitted first
/// (docs/design.md, "In-flight tracking").
fn recover_inflight(
    st: &mut super::virtqueue::VirtqueueState,
    mem: &super::guest_memory::Memory,
) -> VhostResult<()> {
    let Some(t) = st.inflight.as_mut() else {
        return Ok(());
    };
    let ring = |e: virtio_queue::Error| invalid("in-flight area", format!("ring indices: {e}"));
    let used = st.queue.used_idx(mem, Ordering::Acquire).map_err(ring)?.0;
    let avail = st.queue.avail_idx(mem, Ordering::Acquire).map_err(ring)?.0;
    let r = t
        .recover(st.queue.size(), used, avail)
        .map_err(inflight_error)?;
    st.queue.set_next_used(used);
    if let Some(next) = r.next_avail {
        st.queue.set_next_avail(next);
    }
    if r.in_flight > 0 || r.repaired {
        log::info!(
            "queue {}: found {} requests in flight at the restart{}; resubmitting them, oldest first",
            t.index(),
            r.in_flight,
            if r.repaired {
                " (the last used-ring update was repaired)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
