//! vhost-user-cow: a vhost-user-blk daemon serving copy-on-write disks in
//! User-Mode-Linux's ubd COW format.

pub mod aligned;
pub mod backend;
pub mod bitmap;
pub mod bitmap_sched;
pub mod blk_config;
pub mod blk_request;
pub mod check;
pub mod cow_disk;
pub mod cow_header;
pub mod cow_magic_guard;
pub mod device;
pub mod error;
pub mod info;
pub mod io_engine;
pub mod lock;
pub mod merge;
pub mod queue_worker;
pub mod serve;
