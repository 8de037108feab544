//! The test frontend negotiating as cloud-hypervisor's vhost-user-blk
//! device does (`virtio-devices/src/vhost_user/{blk,vu_common_ctrl,mod}.rs`
//! of cloud-hypervisor, read in its August 2026 source), since this
//! machine cannot run cloud-hypervisor itself (it needs KVM):
//!
//! - at creation: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES and
//!   SET_PROTOCOL_FEATURES with what both sides have, then every message
//!   with NEED_REPLY once REPLY_ACK is acked; GET_QUEUE_NUM with MQ;
//!   GET_CONFIG of the whole 60-byte config space at offset 0 with the
//!   WRITABLE flag;
//! - at activation (the guest driver's DRIVER_OK): SET_FEATURES (the
//!   guest's acks plus PROTOCOL_FEATURES), SET_MEM_TABLE with the memory
//!   plugged so far, SET_VRING_NUM on every queue first, GET_INFLIGHT_FD
//!   and SET_INFLIGHT_FD when INFLIGHT_SHMFD was acked, then per queue
//!   SET_VRING_ADDR, SET_VRING_BASE (the avail index), SET_VRING_CALL,
//!   SET_VRING_KICK, and SET_VRING_ENABLE on all;
//! - hot-plugged memory: ADD_MEM_REGION with CONFIGURE_MEM_SLOTS (no
//!   GET_MAX_MEM_SLOTS), else SET_MEM_TABLE of everything;
//! - pause/resume: SET_VRING_ENABLE 0 / 1 on every queue; a device reset:
//!   SET_VRING_ENABLE 0 and GET_VRING_BASE per queue, then a new
//!   activation on the reset rings.
//!
//! The guest side (the driver acking features) is this test driver: it
//! acks the features it implements, as the Linux driver would of them.

use std::fs::File;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

use super::config::{feature, BlkConfigSpace, CONFIG_LEN};
use super::guest_memory::{Arena, GuestMemory, GUEST_BASE};
use super::handshake::{
    check_queue_count, open_frontend, region_info, FrontendOptions, VhostUserBlk, Watchdog,
};
use super::virtqueue::SplitQueue;

/// Bit numbers cloud-hypervisor offers that the test driver has no name
/// for elsewhere (virtio 1.2 §6).
mod bits {
    pub const BLK_GEOMETRY: u32 = 4;
    pub const IN_ORDER: u32 = 35;
    pub const ORDER_PLATFORM: u32 = 36;
    pub const NOTIFICATION_DATA: u32 = 38;
}

fn mask(bits: &[u32]) -> u64 {
    bits.iter().fold(0, |a, &b| a | (1u64 << b))
}

/// The device features cloud-hypervisor's vhost-user-blk offers: its
/// block features, BLK_MQ with more than one queue, and its
/// DEFAULT_VIRTIO_FEATURES (including PROTOCOL_FEATURES and LOG_ALL).
pub fn offered_features(num_queues: u16) -> u64 {
    let mut f = mask(&[
        feature::BLK_SIZE_MAX,
        feature::BLK_SEG_MAX,
        bits::BLK_GEOMETRY,
        feature::BLK_RO,
        feature::BLK_BLK_SIZE,
        feature::BLK_FLUSH,
        feature::BLK_TOPOLOGY,
        feature::BLK_CONFIG_WCE,
        feature::BLK_DISCARD,
        feature::BLK_WRITE_ZEROES,
        feature::INDIRECT_DESC,
        feature::EVENT_IDX,
        feature::VERSION_1,
        bits::IN_ORDER,
        bits::ORDER_PLATFORM,
        bits::NOTIFICATION_DATA,
    ]) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if num_queues > 1 {
        f |= 1 << feature::BLK_MQ;
    }
    f
}

/// The protocol features cloud-hypervisor's vhost-user-blk offers.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// What the test driver acks of the offered features: everything it
/// implements. IN_ORDER and NOTIFICATION_DATA it does not (its used-ring
/// harvesting and its plain eventfd kicks), EVENT_IDX only when asked.
fn driver_features(event_idx: bool) -> u64 {
    let mut f = offered_features(2)
        & !mask(&[bits::IN_ORDER, bits::NOTIFICATION_DATA, feature::EVENT_IDX])
        & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        & !VhostUserVirtioFeatures::LOG_ALL.bits();
    if event_idx {
        f |= 1 << feature::EVENT_IDX;
    }
    f
}

/// The cloud-hypervisor side of a connection.
pub struct ChState {
    /// Device features negotiated at creation (offered & the backend's).
    pub negotiated: u64,
    /// Guest memory regions handed over so far (the main one at start).
    pub plugged: usize,
    /// The inflight area from the last GET_INFLIGHT_FD, kept open as
    /// cloud-hypervisor keeps it.
    pub inflight: Option<(VhostUserInflight, File)>,
    /// Every message sent, in order.
    pub sent: Vec<String>,
}

impl VhostUserBlk {
    /// Connects as cloud-hypervisor does, then activates the device as the
    /// guest driver's DRIVER_OK makes it do. `opts.extra_regions` are not
    /// handed over: they are hot-pluggable ([`Self::ch_hotplug_memory`]).
    pub fn connect_cloud_hypervisor(
        socket: &Path,
        opts: FrontendOptions,
    ) -> Result<VhostUserBlk, String> {
        let (mut fe, wd) = open_frontend(socket, &opts)?;
        let mut sent = Vec::new();
        // Each message recorded in `sent` and bounded by the watchdog.
        fn send<T, E: std::fmt::Debug>(
            wd: &Watchdog,
            sent: &mut Vec<String>,
            fe: &mut Frontend,
            what: &str,
            f: impl FnOnce(&mut Frontend) -> Result<T, E>,
        ) -> Result<T, String> {
            sent.push(what.to_owned());
            wd.run(what, || f(fe))
        }
        send(&wd, &mut sent, &mut fe, "SET_OWNER", |fe| fe.set_owner())?;
        let backend_features = send(&wd, &mut sent, &mut fe, "GET_FEATURES", |fe| {
            fe.get_features()
        })?;
        let negotiated = offered_features(opts.num_queues) & backend_features;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut backend_protocol = VhostUserProtocolFeatures::empty();
        if negotiated & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = send(&wd, &mut sent, &mut fe, "GET_PROTOCOL_FEATURES", |fe| {
                fe.get_protocol_features()
            })?;
            backend_protocol = offered;
            protocol = offered_protocol_features() & offered;
            send(&wd, &mut sent, &mut fe, "SET_PROTOCOL_FEATURES", |fe| {
                fe.set_protocol_features(protocol)
            })?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // From here on every message asks for an ack.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let max_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            Some(send(&wd, &mut sent, &mut fe, "GET_QUEUE_NUM", |fe| {
                fe.get_queue_num()
            })?)
        } else {
            None
        };
        check_queue_count(opts.num_queues, max_queues)?;
        let (_, raw) = send(&wd, &mut sent, &mut fe, "GET_CONFIG", |fe| {
            fe.get_config(
                0,
                u32::try_from(CONFIG_LEN).unwrap(),
                VhostUserConfigFlags::WRITABLE,
                &[0u8; CONFIG_LEN],
            )
        })?;
        let config = BlkConfigSpace::parse(&raw);

        // The guest driver acks; cloud-hypervisor keeps PROTOCOL_FEATURES
        // (the guest never sees it) in what it sends.
        let features = (negotiated & driver_features(opts.event_idx) & !opts.refuse_features)
            | (negotiated & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());

        let mem = GuestMemory::with_extra(opts.mem_size, &opts.extra_regions);
        let mut arena = Arena::new(GUEST_BASE, mem.main_end());
        let event_idx = features & (1 << feature::EVENT_IDX) != 0;
        let queues: Vec<SplitQueue> = (0..usize::from(opts.num_queues))
            .map(|i| SplitQueue::new(i, opts.queue_size, event_idx, &mem, &mut arena))
            .collect();
        let arena = Arena::new(arena.alloc(0, 4096), mem.main_end());
        let mut dev = VhostUserBlk {
            fe,
            watchdog: wd,
            daemon_log: None,
            mem,
            arena,
            queues,
            opts,
            offered_features: backend_features,
            features,
            offered_protocol: backend_protocol,
            protocol,
            max_queues,
            config,
            inflight: None,
            cloud_hypervisor: Some(ChState {
                negotiated,
                plugged: 1,
                inflight: None,
                sent,
            }),
        };
        dev.ch_activate()?;
        Ok(dev)
    }

    fn ch(&mut self) -> &mut ChState {
        self.cloud_hypervisor
            .as_mut()
            .expect("a cloud-hypervisor-style connection")
    }

    /// The messages sent so far (names), in order.
    pub fn ch_sent(&self) -> &[String] {
        &self
            .cloud_hypervisor
            .as_ref()
            .expect("cloud-hypervisor")
            .sent
    }

    /// One message, recorded and bounded in time.
    fn ch_send<T, E: std::fmt::Debug>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> Result<T, E>,
    ) -> Result<T, String> {
        self.ch().sent.push(what.to_owned());
        let fe = &mut self.fe;
        let r = self.watchdog.run(what, || f(fe));
        r.map_err(|e| self.with_log(e))
    }

    fn ch_regions(&self, range: std::ops::Range<usize>) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem.regions()[range].iter().map(region_info).collect()
    }

    /// The activation (`setup_vhost_user`): features, memory, rings.
    pub fn ch_activate(&mut self) -> Result<(), String> {
        let features = self.features;
        self.ch_send("SET_FEATURES", |fe| fe.set_features(features))?;
        let plugged = self.ch().plugged;
        let regions = self.ch_regions(0..plugged);
        self.ch_send("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))?;
        for i in 0..self.queues.len() {
            let size = self.queues[i].size;
            self.ch_send("SET_VRING_NUM", |fe| fe.set_vring_num(i, size))?;
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            let want = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: u16::try_from(self.queues.len()).unwrap(),
                queue_size: self.queues[0].size,
            };
            let (info, file) = self.ch_send("GET_INFLIGHT_FD", |fe| fe.get_inflight_fd(&want))?;
            if info.mmap_size == 0 {
                return Err(self.with_log("GET_INFLIGHT_FD: an area of size 0".into()));
            }
            use std::os::fd::AsRawFd;
            let fd = file.as_raw_fd();
            self.ch_send("SET_INFLIGHT_FD", |fe| fe.set_inflight_fd(&info, fd))?;
            self.ch().inflight = Some((info, file));
        }
        for i in 0..self.queues.len() {
            let addr = self.vring_addr(i);
            let base = self.queues[i].avail_idx();
            self.ch_send("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &addr))?;
            self.ch_send("SET_VRING_BASE", |fe| fe.set_vring_base(i, base))?;
            let q = &self.queues[i];
            let (call, kick) = (
                q.call.try_clone().expect("clone call"),
                q.kick.try_clone().expect("clone kick"),
            );
            self.ch_send("SET_VRING_CALL", |fe| fe.set_vring_call(i, &call))?;
            self.ch_send("SET_VRING_KICK", |fe| fe.set_vring_kick(i, &kick))?;
        }
        self.ch_enable_all(true)
    }

    fn ch_enable_all(&mut self, enable: bool) -> Result<(), String> {
        for i in 0..self.queues.len() {
            self.ch_send("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, enable))?;
        }
        Ok(())
    }

    /// Pause (snapshot, migration): the rings disabled, kept as they are.
    pub fn ch_pause(&mut self) -> Result<(), String> {
        self.ch_enable_all(false)
    }

    /// Resume after [`Self::ch_pause`].
    pub fn ch_resume(&mut self) -> Result<(), String> {
        self.ch_enable_all(true)
    }

    /// A device reset (`reset_vhost_user`): per queue SET_VRING_ENABLE 0
    /// and GET_VRING_BASE; returns the bases. The guest then resets its
    /// rings; [`Self::ch_reactivate`] starts them again.
    pub fn ch_reset(&mut self) -> Result<Vec<u32>, String> {
        let mut bases = Vec::new();
        for i in 0..self.queues.len() {
            self.ch_send("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, false))?;
            bases.push(self.ch_send("GET_VRING_BASE", |fe| fe.get_vring_base(i))?);
        }
        Ok(bases)
    }

    /// After [`Self::ch_reset`]: the guest's rings zeroed and the device
    /// activated again (a guest driver reloading, a reboot).
    pub fn ch_reactivate(&mut self) -> Result<(), String> {
        for q in &mut self.queues {
            q.reset(&self.mem);
        }
        self.arena.reset();
        self.ch_activate()
    }

    /// Hot-plugs the next not yet plugged region of `opts.extra_regions`;
    /// returns its guest address range.
    pub fn ch_hotplug_memory(&mut self) -> Result<(u64, u64), String> {
        let n = self.ch().plugged;
        assert!(n < self.mem.regions().len(), "no region left to plug");
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            let region = self.ch_regions(n..n + 1).remove(0);
            self.ch_send("ADD_MEM_REGION", |fe| fe.add_mem_region(&region))?;
        } else {
            let regions = self.ch_regions(0..n + 1);
            self.ch_send("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))?;
        }
        self.ch().plugged = n + 1;
        let r = &self.mem.regions()[n];
        Ok((r.gpa, r.end()))
    }
}
