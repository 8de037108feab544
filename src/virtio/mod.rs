//! virtio-blk as the device sees it: requests parsed and validated from
//! descriptor chains in guest memory, and the configuration space.
//!
//! `request.rs` holds the types, `framing.rs` splits a chain into header,
//! data and status, `decode.rs` gives each request type its meaning,
//! `host_ranges.rs` maps their guest ranges to host addresses, `chain.rs`
//! walks a chain from a known head (resubmission after a restart),
//! `split_ring.rs` reads the avail ring and writes the used ring.

pub mod chain;
pub mod config;
pub mod decode;
mod framing;
pub mod host_ranges;
pub mod request;
pub mod split_ring;

pub use decode::{parse_request, parse_request_in};
