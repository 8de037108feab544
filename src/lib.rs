//! vhost-user-cow: a vhost-user-blk daemon serving copy-on-write disks in
//! User-Mode-Linux's ubd COW format.

pub mod io_engine;
