//! vhost-user-cow: a vhost-user-blk daemon serving copy-on-write disks in
//! User-Mode-Linux's ubd COW format.
//!
//! The layers, from the file up (docs/architecture.md maps every file):
//! - [`units`]: the 512-byte sector and the `u64` to `usize` conversion;
//! - [`fsutil`]: aligned buffers and filesystem helpers;
//! - [`format`]: the COW format and an open disk (header, bitmap, locks);
//! - [`tools`]: `info`, `check`, `merge` and `rebase` on top of the format;
//! - [`io_engine`]: asynchronous file I/O (io_uring, a thread pool);
//! - [`virtio`]: virtio-blk requests and config space, parsed from guest
//!   memory;
//! - [`control`]: the control socket's JSON protocol, server and client;
//! - [`daemon`]: the write-path scheduler, the served device, the queue
//!   threads and the vhost-user protocol;
//! - [`log_tag`] and [`spawn`]: which export a log line is about, and
//!   threads made before the seccomp filter;
//! - [`cli_docs`]: man pages and completions from the command line's
//!   clap definitions.

pub mod cli_docs;
pub mod control;
pub mod daemon;
pub mod format;
pub mod fsutil;
pub mod io_engine;
pub mod log_tag;
pub mod spawn;
pub mod tools;
pub mod units;
pub mod virtio;
