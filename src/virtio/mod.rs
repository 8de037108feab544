//! virtio-blk as the device sees it: requests parsed and validated from
//! descriptor chains in guest memory, and the configuration space.

pub mod config;
pub mod request;
