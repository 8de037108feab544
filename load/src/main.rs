//! A load generator for vhost-user-blk sockets: drives any vhost-user-blk
//! backend (this project's daemon, `qemu-storage-daemon`, ...) from the
//! host, without a VM, through libblkio's `virtio-blk-vhost-user` driver.
//!
//! One thread per virtqueue, each keeping `--iodepth` requests in flight and
//! waiting on its own completion eventfd (or busy-polling with `--poll`).
//! Reports IOPS, MB/s, latency percentiles and, given `--pid`, the daemon's
//! CPU time per I/O and its memory use. A queue that sees no completion for
//! 10 s gives up and reports the backend as stalled.

mod args;
mod convert;
mod driver;
mod report;
mod workload;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    match driver::run(&args) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string(&r).expect("serialise"));
            } else {
                r.print_text();
            }
            if r.errors > 0 {
                eprintln!(
                    "vhost-user-cow-load: {} I/O errors; first: {}",
                    r.errors,
                    r.first_error.as_deref().unwrap_or("?")
                );
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vhost-user-cow-load: {e}");
            ExitCode::FAILURE
        }
    }
}
