//! Small helpers below the format: aligned buffers, page slots, range
//! sets and filesystem calls.

pub mod aligned;
pub mod data_ranges;
pub mod escape;
pub mod files;
pub mod page_pool;
pub mod range_set;
