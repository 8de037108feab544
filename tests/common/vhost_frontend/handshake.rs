//! The vhost-user side of the test frontend: connect, negotiate features
//! and protocol features, read the config space, hand over guest memory
//! and the rings, and stop the rings (GET_VRING_BASE) on a clean
//! disconnect. Follows QEMU's message order.
//!
//! Every exchange with the backend is bounded: the connect by
//! [`connect_unix`], each message and its reply by a [`Watchdog`], so a
//! backend that dies or stops answering fails the test with the name of
//! the message it did not answer instead of hanging it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use super::config::{feature, BlkConfigSpace, CONFIG_LEN};
use super::guest_memory::{Arena, GuestMemory, GUEST_BASE};
use super::virtqueue::SplitQueue;

/// How the frontend sets the device up.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    /// Guest memory size in bytes (rings + buffers).
    pub mem_size: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Hand over memory with ADD_MEM_REGION (CONFIGURE_MEM_SLOTS, as
    /// libblkio does) instead of SET_MEM_TABLE, when offered.
    pub add_mem_region: bool,
    /// More guest memory regions after the main one, each `(gap, size)`:
    /// `gap` bytes after the previous region's end (0: adjacent). Not used
    /// for rings or the buffer allocator; tests address them directly.
    pub extra_regions: Vec<(u64, u64)>,
    /// Device features not to ack even when offered (e.g. BLK_RO).
    pub refuse_features: u64,
    /// Negotiate VHOST_USER_PROTOCOL_F_LOG_SHMFD when offered (dirty
    /// logging; the test turns VHOST_F_LOG_ALL on itself).
    pub log_shmfd: bool,
    /// How long a request may take before the test fails as a hang.
    pub timeout: Duration,
    /// How long the connect and each vhost-user message (its send and its
    /// reply or ack) may take.
    pub reply_timeout: Duration,
    /// Negotiate as cloud-hypervisor does (`cloud_hypervisor.rs`) instead
    /// of as QEMU does.
    pub cloud_hypervisor: bool,
    /// Ask for in-flight tracking (INFLIGHT_SHMFD) when offered, and hand
    /// the area over before the rings, as QEMU does.
    pub inflight: bool,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            num_queues: 1,
            queue_size: 256,
            mem_size: 32 << 20,
            event_idx: false,
            add_mem_region: false,
            extra_regions: Vec::new(),
            refuse_features: 0,
            log_shmfd: false,
            timeout: Duration::from_secs(30),
            // Replies are immediate (GET_VRING_BASE waits for in-flight
            // requests, which complete within `timeout` or fail the test).
            reply_timeout: Duration::from_secs(10),
            cloud_hypervisor: false,
            inflight: false,
        }
    }
}

/// The device features this frontend asks for (a Linux-like driver).
pub fn wanted_features(event_idx: bool) -> u64 {
    let mut f = [
        feature::VERSION_1,
        feature::INDIRECT_DESC,
        feature::BLK_SIZE_MAX,
        feature::BLK_SEG_MAX,
        feature::BLK_RO,
        feature::BLK_BLK_SIZE,
        feature::BLK_FLUSH,
        feature::BLK_TOPOLOGY,
        feature::BLK_CONFIG_WCE,
        feature::BLK_MQ,
        feature::BLK_DISCARD,
        feature::BLK_WRITE_ZEROES,
    ]
    .iter()
    .fold(0u64, |a, &b| a | (1u64 << b));
    if event_idx {
        f |= 1 << feature::EVENT_IDX;
    }
    f | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The protocol features this frontend uses when offered.
pub fn wanted_protocol_features(inflight: bool) -> VhostUserProtocolFeatures {
    let f = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if inflight {
        f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    } else {
        f
    }
}

/// Connects to the Unix socket at `path`, giving up after `timeout`.
///
/// A blocking `connect` to a listener whose backlog is full (a backend that
/// stopped accepting) waits forever; a non-blocking one fails at once with
/// EAGAIN, so this retries that until the deadline. Other errors (no
/// listener yet: ENOENT, ECONNREFUSED) are returned at once.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap();
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let start = Instant::now();
    loop {
        // SAFETY: plain socket creation; the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `addr` is a valid sockaddr_un of the given length.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap(),
            )
        };
        if r == 0 {
            let stream = UnixStream::from(sock);
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
            return Err(e);
        }
        if start.elapsed() >= timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect {}: the listener accepted nothing for {timeout:?} (backlog full)",
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bounds the vhost-user exchanges on one connection.
///
/// The vhost crate's `Frontend` has no timeout and retries EAGAIN in its
/// receive loop, so SO_RCVTIMEO would only turn a silent backend into a
/// busy wait. Instead a thread shuts the socket down once an exchange has
/// taken too long: the blocked recvmsg (or sendmsg) then returns EOF (or
/// EPIPE), the call fails, and [`Watchdog::run`] says which message timed out.
pub struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    limit: Duration,
}

#[derive(Default)]
struct WatchState {
    /// The deadline of the exchange in progress.
    armed: Option<Instant>,
    /// Set when the watchdog shut the socket down.
    fired: bool,
    quit: bool,
}

impl Watchdog {
    /// Watches `sock` (a clone of the frontend's socket), allowing `limit`
    /// per exchange.
    pub fn new(sock: UnixStream, limit: Duration) -> Watchdog {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock().unwrap();
                while !st.quit {
                    match st.armed {
                        None => st = cv.wait(st).unwrap(),
                        Some(deadline) => {
                            let now = Instant::now();
                            if now >= deadline {
                                let _ = sock.shutdown(std::net::Shutdown::Both);
                                st.fired = true;
                                st.armed = None;
                            } else {
                                st = cv.wait_timeout(st, deadline - now).unwrap().0;
                            }
                        }
                    }
                }
            })
            .expect("spawn the vhost-user watchdog");
        Watchdog {
            shared,
            thread: Some(thread),
            limit,
        }
    }

    /// Runs one exchange (`what`: the message) under the time limit.
    pub fn run<T, E: std::fmt::Debug>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, String> {
        let (lock, cv) = &*self.shared;
        {
            let mut st = lock.lock().unwrap();
            if st.fired {
                return Err(format!(
                    "{what}: not sent, the connection was shut down after an earlier timeout"
                ));
            }
            st.armed = Some(Instant::now() + self.limit);
            cv.notify_one();
        }
        let r = f();
        let mut st = lock.lock().unwrap();
        st.armed = None;
        if st.fired {
            return Err(format!(
                "{what}: no reply from the backend within {:?} (it hung or stopped; \
                 the frontend shut the connection down)",
                self.limit
            ));
        }
        r.map_err(|e| format!("{what}: {e:?}"))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.0.lock().unwrap().quit = true;
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Refuses more queues than GET_QUEUE_NUM allows (one without MQ).
pub fn check_queue_count(wanted: u16, max_queues: Option<u64>) -> Result<(), String> {
    if u64::from(wanted) > max_queues.unwrap_or(1) {
        return Err(format!(
            "{wanted} queues wanted, backend has {max_queues:?}"
        ));
    }
    Ok(())
}

/// Connects to `socket` (bounded in time) and wraps the stream in the
/// `vhost` crate's frontend, with a watchdog on its exchanges.
pub fn open_frontend(
    socket: &Path,
    opts: &FrontendOptions,
) -> Result<(Frontend, Watchdog), String> {
    let stream = connect_unix(socket, opts.reply_timeout)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let wd = Watchdog::new(
        stream
            .try_clone()
            .map_err(|e| format!("clone the socket: {e}"))?,
        opts.reply_timeout,
    );
    Ok((
        Frontend::from_stream(stream, u64::from(opts.num_queues)),
        wd,
    ))
}

/// Connects and negotiates features, protocol features and the config
/// space (QEMU's order), each message bounded.
fn negotiate(socket: &Path, opts: &FrontendOptions) -> Result<Negotiated, String> {
    let (mut fe, wd) = open_frontend(socket, opts)?;
    wd.run("SET_OWNER", || fe.set_owner())?;
    let offered_features = wd.run("GET_FEATURES", || fe.get_features())?;
    for (bit, name) in [
        (1u64 << feature::VERSION_1, "VIRTIO_F_VERSION_1"),
        (
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            "VHOST_USER_F_PROTOCOL_FEATURES",
        ),
    ] {
        if offered_features & bit == 0 {
            return Err(format!(
                "backend does not offer {name} (features {offered_features:#x})"
            ));
        }
    }
    let offered_protocol = wd.run("GET_PROTOCOL_FEATURES", || fe.get_protocol_features())?;
    let mut wanted = wanted_protocol_features(opts.inflight);
    if opts.log_shmfd {
        wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
    }
    let protocol = offered_protocol & wanted;
    wd.run("SET_PROTOCOL_FEATURES", || {
        fe.set_protocol_features(protocol)
    })?;
    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // Every message that has no reply of its own gets an ack, so a
        // backend that refuses one is caught right there.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let max_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
        Some(wd.run("GET_QUEUE_NUM", || fe.get_queue_num())?)
    } else {
        None
    };
    check_queue_count(opts.num_queues, max_queues)?;
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err("backend does not offer VHOST_USER_PROTOCOL_F_CONFIG".into());
    }
    let (_, raw) = wd.run("GET_CONFIG", || {
        fe.get_config(
            0,
            u32::try_from(CONFIG_LEN).unwrap(),
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_LEN],
        )
    })?;
    let config = BlkConfigSpace::parse(&raw);
    let features = offered_features & wanted_features(opts.event_idx) & !opts.refuse_features;
    wd.run("SET_FEATURES", || fe.set_features(features))?;
    Ok(Negotiated {
        fe,
        wd,
        offered_features,
        features,
        offered_protocol,
        protocol,
        max_queues,
        config,
    })
}

/// How a frontend describes a guest memory region to the backend.
pub fn region_info(r: &super::guest_memory::Region) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: r.host_base(),
        mmap_offset: 0,
        mmap_handle: r.fd(),
    }
}

/// SET_MEM_TABLE, or ADD_MEM_REGION per region when asked and offered.
fn hand_over_memory(
    n: &mut Negotiated,
    mem: &GuestMemory,
    opts: &FrontendOptions,
) -> Result<(), String> {
    let (fe, wd) = (&mut n.fe, &n.wd);
    let regions: Vec<VhostUserMemoryRegionInfo> = mem.regions().iter().map(region_info).collect();
    if opts.add_mem_region
        && n.protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    {
        let slots = wd.run("GET_MAX_MEM_SLOTS", || fe.get_max_mem_slots())?;
        if slots < regions.len() as u64 {
            return Err(format!("GET_MAX_MEM_SLOTS answered {slots}"));
        }
        for region in &regions {
            wd.run("ADD_MEM_REGION", || fe.add_mem_region(region))?;
        }
        Ok(())
    } else {
        wd.run("SET_MEM_TABLE", || fe.set_mem_table(&regions))
            .map(|_| ())
    }
}

/// Sets every ring up (SET_VRING_BASE `base(i)`) and enables them.
fn start_rings(
    n: &mut Negotiated,
    mem: &GuestMemory,
    queues: &[SplitQueue],
    base: impl Fn(usize) -> u16,
) -> Result<(), String> {
    let (fe, wd) = (&mut n.fe, &n.wd);
    for (i, q) in queues.iter().enumerate() {
        wd.run("SET_VRING_NUM", || fe.set_vring_num(i, q.size))?;
        wd.run("SET_VRING_BASE", || fe.set_vring_base(i, base(i)))?;
        let addr = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: mem.user_addr(q.desc_gpa),
            used_ring_addr: mem.user_addr(q.used_gpa),
            avail_ring_addr: mem.user_addr(q.avail_gpa),
            log_addr: None,
        };
        wd.run("SET_VRING_ADDR", || fe.set_vring_addr(i, &addr))?;
        wd.run("SET_VRING_KICK", || fe.set_vring_kick(i, &q.kick))?;
        wd.run("SET_VRING_CALL", || fe.set_vring_call(i, &q.call))?;
    }
    for i in 0..queues.len() {
        wd.run("SET_VRING_ENABLE", || fe.set_vring_enable(i, true))?;
    }
    Ok(())
}

/// A connected, started vhost-user-blk device.
pub struct VhostUserBlk {
    pub(super) fe: Frontend,
    pub(super) watchdog: Watchdog,
    /// The backend's log, quoted when a wait on it fails.
    pub(super) daemon_log: Option<PathBuf>,
    pub(super) mem: GuestMemory,
    pub(super) arena: Arena,
    pub(super) queues: Vec<SplitQueue>,
    pub opts: FrontendOptions,
    /// Device features the backend offered.
    pub offered_features: u64,
    /// Device features acked (offered & wanted).
    pub features: u64,
    pub offered_protocol: VhostUserProtocolFeatures,
    pub protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM's answer (when MQ was negotiated).
    pub max_queues: Option<u64>,
    pub config: BlkConfigSpace,
    /// Set on a connection made as cloud-hypervisor makes it.
    pub(super) cloud_hypervisor: Option<super::cloud_hypervisor::ChState>,
    /// The in-flight area GET_INFLIGHT_FD gave (with `opts.inflight`).
    pub inflight: Option<(VhostUserInflight, File)>,
}

/// A connection negotiated up to SET_FEATURES (memory and rings not yet).
struct Negotiated {
    fe: Frontend,
    wd: Watchdog,
    offered_features: u64,
    features: u64,
    offered_protocol: VhostUserProtocolFeatures,
    protocol: VhostUserProtocolFeatures,
    max_queues: Option<u64>,
    config: BlkConfigSpace,
}

impl VhostUserBlk {
    /// Connects to `socket` and starts `opts.num_queues` queues.
    pub fn connect(socket: &Path, opts: FrontendOptions) -> Result<VhostUserBlk, String> {
        if opts.cloud_hypervisor {
            return VhostUserBlk::connect_cloud_hypervisor(socket, opts);
        }
        let mut n = negotiate(socket, &opts)?;
        let mem = GuestMemory::with_extra(opts.mem_size, &opts.extra_regions);
        hand_over_memory(&mut n, &mem, &opts)?;
        let inflight = if opts.inflight
            && n.protocol
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            let ask = VhostUserInflight::new(0, 0, opts.num_queues, opts.queue_size);
            let fe = &mut n.fe;
            let got = n.wd.run("GET_INFLIGHT_FD", || fe.get_inflight_fd(&ask))?;
            Some(got)
        } else {
            None
        };
        if let Some((layout, file)) = &inflight {
            let fe = &mut n.fe;
            n.wd.run("SET_INFLIGHT_FD", || {
                fe.set_inflight_fd(layout, file.as_raw_fd())
            })?;
        }
        let mut arena = Arena::new(GUEST_BASE, mem.main_end());
        let event_idx = n.features & (1 << feature::EVENT_IDX) != 0;
        let queues: Vec<SplitQueue> = (0..usize::from(opts.num_queues))
            .map(|i| SplitQueue::new(i, opts.queue_size, event_idx, &mem, &mut arena))
            .collect();
        start_rings(&mut n, &mem, &queues, |_| 0)?;
        // Buffers go after the rings; the arena rewinds to here when idle.
        let arena = Arena::new(arena.alloc(0, 4096), mem.main_end());
        Ok(VhostUserBlk {
            fe: n.fe,
            watchdog: n.wd,
            daemon_log: None,
            mem,
            arena,
            queues,
            opts,
            offered_features: n.offered_features,
            features: n.features,
            offered_protocol: n.offered_protocol,
            protocol: n.protocol,
            max_queues: n.max_queues,
            config: n.config,
            inflight,
            cloud_hypervisor: None,
        })
    }

    /// Connects again, to a restarted backend at `socket`, with the same
    /// guest memory and rings, as QEMU does after its backend died: the
    /// in-flight area handed back before the rings, and each ring's base
    /// rewound to its used index (the requests taken and not completed
    /// are the backend's to find in the area).
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), String> {
        let mut n = negotiate(socket, &self.opts)?;
        if n.features != self.features {
            return Err(format!(
                "features {:#x} after the reconnect, {:#x} before",
                n.features, self.features
            ));
        }
        hand_over_memory(&mut n, &self.mem, &self.opts)?;
        if let Some((layout, file)) = &self.inflight {
            if !n
                .protocol
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            {
                return Err("the restarted backend does not offer INFLIGHT_SHMFD".into());
            }
            let fe = &mut n.fe;
            n.wd.run("SET_INFLIGHT_FD", || {
                fe.set_inflight_fd(layout, file.as_raw_fd())
            })?;
        }
        let mem = &self.mem;
        let used: Vec<u16> = self
            .queues
            .iter()
            .map(|q| mem.load_u16_acquire(q.used_gpa + 2))
            .collect();
        start_rings(&mut n, mem, &self.queues, |i| used[i])?;
        self.fe = n.fe;
        self.watchdog = n.wd;
        Ok(())
    }

    /// Names the backend's log file, quoted by the failures of waits on it.
    pub fn set_daemon_log(&mut self, log: &Path) {
        self.daemon_log = Some(log.to_path_buf());
    }

    /// `msg`, followed by the backend's log when there is one.
    pub fn with_log(&self, msg: String) -> String {
        match &self.daemon_log {
            Some(p) => format!(
                "{msg}\n--- daemon log {} ---\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_else(|e| format!("(unreadable: {e})"))
            ),
            None => msg,
        }
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The vhost-user socket, to notice a hang-up.
    pub fn socket_fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    /// Stops every ring with GET_VRING_BASE and returns the backend's
    /// answers (the next avail index it would process, per queue); the
    /// connection closes when `self` drops.
    pub fn stop(&mut self) -> Result<Vec<u32>, String> {
        let mut bases = Vec::new();
        for i in 0..self.queues.len() {
            let fe = &mut self.fe;
            let r = self
                .watchdog
                .run(&format!("GET_VRING_BASE {i}"), || fe.get_vring_base(i));
            bases.push(r.map_err(|e| self.with_log(e))?);
        }
        Ok(bases)
    }

    /// Avail index published on each queue (what GET_VRING_BASE must
    /// answer once everything submitted has been processed).
    pub fn avail_indices(&self) -> Vec<u32> {
        self.queues
            .iter()
            .map(|q| u32::from(q.avail_idx()))
            .collect()
    }

    /// Runs one `Frontend` call under the message time limit; a refusal
    /// (a NACK with REPLY_ACK, or no reply) comes back as the error.
    pub fn message<T, E: std::fmt::Debug>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> Result<T, E>,
    ) -> Result<T, String> {
        let fe = &mut self.fe;
        self.watchdog.run(what, || f(fe))
    }

    /// The ring addresses of queue `i` as SET_VRING_ADDR sends them.
    pub fn vring_addr(&self, i: usize) -> VringConfigData {
        let q = &self.queues[i];
        VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.mem.user_addr(q.desc_gpa),
            used_ring_addr: self.mem.user_addr(q.used_gpa),
            avail_ring_addr: self.mem.user_addr(q.avail_gpa),
            log_addr: None,
        }
    }

    pub fn queue(&self, i: usize) -> &SplitQueue {
        &self.queues[i]
    }

    /// Sets queue `i`'s avail index to `idx` as is (no chain behind it)
    /// and kicks once.
    pub fn publish_avail_idx(&mut self, i: usize, idx: u16) {
        let q = &self.queues[i];
        self.mem.store_u16_release(q.avail_gpa + 2, idx);
        q.kick.write(1).expect("kick");
    }

    /// Writes queue `i`'s kick eventfd.
    pub fn kick(&self, i: usize) {
        self.queues[i].kick.write(1).expect("kick");
    }

    /// Sets queue `i` up again from scratch, as after a device reset of
    /// that ring: its rings zeroed, then SET_VRING_NUM, SET_VRING_BASE 0
    /// and SET_VRING_ADDR; with `restart`, also SET_VRING_KICK,
    /// SET_VRING_CALL and SET_VRING_ENABLE 1 (QEMU's full sequence).
    pub fn reset_queue(&mut self, i: usize, restart: bool) -> Result<(), String> {
        self.queues[i].reset(&self.mem);
        self.arena.reset();
        let size = self.queues[i].size;
        let addr = self.vring_addr(i);
        self.message("SET_VRING_NUM", |fe| fe.set_vring_num(i, size))?;
        self.message("SET_VRING_BASE", |fe| fe.set_vring_base(i, 0))?;
        self.message("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &addr))?;
        if restart {
            let q = &self.queues[i];
            let fe = &mut self.fe;
            self.watchdog
                .run("SET_VRING_KICK", || fe.set_vring_kick(i, &q.kick))?;
            self.watchdog
                .run("SET_VRING_CALL", || fe.set_vring_call(i, &q.call))?;
            self.message("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, true))?;
        }
        Ok(())
    }

    /// A clean disconnect: stop the rings, then close the socket.
    pub fn disconnect(mut self) -> Result<Vec<u32>, String> {
        self.stop()
    }
}
