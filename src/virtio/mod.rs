//! virtio-blk as the device sees it: requests parsed and validated from
//! descriptor chains in guest memory, and the configuration space.
//!
//! `request.rs` holds the types, `framing.rs` splits a chain into header,
//! data and status, `decode.rs` gives each request type its meaning, `chain.rs` walks
//! a chain from a known head (resubmission after a restart).

pub mod chain;
pub mod config;
pub mod decode;
mod framing;
pub mod request;

pub use decode::parse_request;
