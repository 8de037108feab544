//! The daemon: the write-path scheduler (a pure state machine), the served
//! device, the queue threads that drive the engines, and the vhost-user
//! protocol and life cycle.

pub mod backend;
pub mod cow_magic_guard;
pub mod device;
pub mod scheduler;
pub mod serve;
pub mod worker;
