//! The vhost-user side of the test frontend: connect, negotiate features
//! and protocol features, read the config space, hand over guest memory
//! and the rings, and stop the rings (GET_VRING_BASE) on a clean
//! disconnect. Follows QEMU's message order.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
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
    /// How long a request may take before the test fails as a hang.
    pub timeout: Duration,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            num_queues: 1,
            queue_size: 256,
            mem_size: 32 << 20,
            event_idx: false,
            add_mem_region: false,
            timeout: Duration::from_secs(30),
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
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// A connected, started vhost-user-blk device.
pub struct VhostUserBlk {
    pub(super) fe: Frontend,
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
}

fn err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e:?}")
}

impl VhostUserBlk {
    /// Connects to `socket` and starts `opts.num_queues` queues.
    pub fn connect(socket: &Path, opts: FrontendOptions) -> Result<VhostUserBlk, String> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        // A backend that never answers a message fails the test, not hangs it.
        stream
            .set_read_timeout(Some(opts.timeout.max(Duration::from_secs(10))))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(30))))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let mut fe = Frontend::from_stream(stream, u64::from(opts.num_queues));
        fe.set_owner().map_err(err("SET_OWNER"))?;
        let offered_features = fe.get_features().map_err(err("GET_FEATURES"))?;
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
        let offered_protocol = fe
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        let protocol = offered_protocol & wanted_protocol_features();
        fe.set_protocol_features(protocol)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message that has no reply of its own gets an ack, so a
            // backend that refuses one is caught right there.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            Some(fe.get_queue_num().map_err(err("GET_QUEUE_NUM"))?)
        } else {
            None
        };
        if u64::from(opts.num_queues) > max_queues.unwrap_or(1) {
            return Err(format!(
                "{} queues wanted, backend has {max_queues:?}",
                opts.num_queues
            ));
        }
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err("backend does not offer VHOST_USER_PROTOCOL_F_CONFIG".into());
        }
        let (_, raw) = fe
            .get_config(
                0,
                CONFIG_LEN as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_LEN],
            )
            .map_err(err("GET_CONFIG"))?;
        let config = BlkConfigSpace::parse(&raw);
        let features = offered_features & wanted_features(opts.event_idx);
        fe.set_features(features).map_err(err("SET_FEATURES"))?;

        let mem = GuestMemory::new(opts.mem_size);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: GUEST_BASE,
            memory_size: mem.size(),
            userspace_addr: mem.host_base(),
            mmap_offset: 0,
            mmap_handle: mem.fd(),
        };
        if opts.add_mem_region && protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            let slots = fe.get_max_mem_slots().map_err(err("GET_MAX_MEM_SLOTS"))?;
            if slots == 0 {
                return Err("GET_MAX_MEM_SLOTS answered 0".into());
            }
            fe.add_mem_region(&region).map_err(err("ADD_MEM_REGION"))?;
        } else {
            fe.set_mem_table(&[region]).map_err(err("SET_MEM_TABLE"))?;
        }

        let mut arena = Arena::new(GUEST_BASE, mem.end());
        let event_idx = features & (1 << feature::EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for i in 0..usize::from(opts.num_queues) {
            let q = SplitQueue::new(i, opts.queue_size, event_idx, &mem, &mut arena);
            fe.set_vring_num(i, q.size).map_err(err("SET_VRING_NUM"))?;
            fe.set_vring_base(i, 0).map_err(err("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: mem.user_addr(q.desc_gpa),
                used_ring_addr: mem.user_addr(q.used_gpa),
                avail_ring_addr: mem.user_addr(q.avail_gpa),
                log_addr: None,
            };
            fe.set_vring_addr(i, &addr).map_err(err("SET_VRING_ADDR"))?;
            fe.set_vring_kick(i, &q.kick)
                .map_err(err("SET_VRING_KICK"))?;
            fe.set_vring_call(i, &q.call)
                .map_err(err("SET_VRING_CALL"))?;
            queues.push(q);
        }
        for i in 0..queues.len() {
            fe.set_vring_enable(i, true)
                .map_err(err("SET_VRING_ENABLE"))?;
        }
        // Buffers go after the rings; the arena rewinds to here when idle.
        let arena = Arena::new(arena.alloc(0, 4096), mem.end());
        Ok(VhostUserBlk {
            fe,
            mem,
            arena,
            queues,
            opts,
            offered_features,
            features,
            offered_protocol,
            protocol,
            max_queues,
            config,
        })
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
        (0..self.queues.len())
            .map(|i| self.fe.get_vring_base(i).map_err(err("GET_VRING_BASE")))
            .collect()
    }

    /// Avail index published on each queue (what GET_VRING_BASE must
    /// answer once everything submitted has been processed).
    pub fn avail_indices(&self) -> Vec<u32> {
        self.queues
            .iter()
            .map(|q| u32::from(q.avail_idx()))
            .collect()
    }

    /// A clean disconnect: stop the rings, then close the socket.
    pub fn disconnect(mut self) -> Result<Vec<u32>, String> {
        self.stop()
    }
}
