//! The daemon: the write-path scheduler (a pure state machine), the served
//! device, the worker threads that drive the engines, and the vhost-user
//! protocol and life cycle.

pub mod active_connection;
pub mod backup_job;
pub mod control_commands;
pub mod copy_before_write;
pub mod cow_magic_guard;
pub mod device;
pub mod dirty_log;
pub mod guest_memory;
pub mod inflight;
pub mod log_limit;
pub mod memory_trim;
pub mod protocol;
pub mod request_stats;
pub mod sandbox;
pub mod scheduler;
pub mod seccomp;
pub mod serve;
pub mod throttle;
pub mod truncation_guard;
pub mod virtqueue;
pub mod worker;
pub mod worker_thread;
