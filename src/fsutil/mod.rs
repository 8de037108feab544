//! Small helpers below the format: aligned buffers and filesystem calls.

pub mod aligned;
pub mod escape;
pub mod files;
