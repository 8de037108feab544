//! A vhost-user-blk frontend for the end-to-end tests, built on the `vhost`
//! crate's `Frontend`: guest memory in a memfd, split virtqueues laid out
//! there by hand, and virtio-blk requests, well-formed or deliberately not.
//!
//! - [`guest_memory`]: the memfd mapping and the buffer allocator;
//! - [`virtqueue`]: ring layout, descriptor chains, used-ring harvesting and
//!   waiting on the call eventfd with a timeout;
//! - [`config`]: feature bits and the config space as a driver parses it;
//! - [`handshake`]: the vhost-user negotiation and ring setup/teardown,
//!   each message and the connect bounded in time;
//! - [`requests`]: the chain builder and the read/write/flush/... helpers;
//! - [`raw`]: hand-made vhost-user messages the `vhost` crate would refuse;
//! - [`cloud_hypervisor`]: the negotiation, activation, memory hot-plug and
//!   ring stop/restart of cloud-hypervisor's vhost-user-blk device.

pub mod cloud_hypervisor;
pub mod config;
pub mod guest_memory;
pub mod handshake;
pub mod raw;
pub mod requests;
pub mod virtqueue;

// Not every test crate that includes `common` uses all of these.
#[allow(unused_imports)]
pub use config::{feature, BlkConfigSpace};
#[allow(unused_imports)]
pub use guest_memory::{GuestMemory, GUEST_BASE};
#[allow(unused_imports)]
pub use handshake::{FrontendOptions, VhostUserBlk};
#[allow(unused_imports)]
pub use requests::*;
#[allow(unused_imports)]
pub use virtqueue::{
    indirect_table, Next, RawDesc, WaitError, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
