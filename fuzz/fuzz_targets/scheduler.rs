//! The write-path scheduler against its model: random submissions,
//! issues refused by a full engine (`op_refused`), completions in any
//! order and injected failures of bitmap writes and bitmap page reads,
//! checking after every step the invariants of `tests/bitmap_sched.rs`
//! (whose harness, `tests/sched_model/`, this includes; only the driver
//! below is the fuzzer's).
//!
//! Input:
//! * byte 0: bits 0-2 engine capacity (1 + value % 5), bit 3 O_DIRECT
//!   (bitmap writes widened to 512-byte blocks), bits 4-5 log2 of the
//!   sectors per chunk, bit 6 inject bitmap-write and page-read failures,
//!   bit 7 paged: 256 sectors in 8-byte bitmap pages (64 chunks), all on
//!   file, at most one unpinned page resident (buffered only);
//! * byte 1: script length (mod 81 requests);
//! * 3 bytes per request: kind (value % 10: 0-3 write, 4-7 read, 8 zero,
//!   9 flush; bit 7 the thread), first sector (mod the disk's sectors),
//!   count (1 + value % 5, cut at the end of the disk);
//! * the rest, one byte per step (at most 4000): which of the possible
//!   actions (submit the next request, issue, complete, fail) is taken.
//!
//! At the end everything is drained and `finish` checks that nothing is
//! left and no update was lost.

#![no_main]

#[path = "../../tests/sched_model/mod.rs"]
mod sched_model;

use libfuzzer_sys::fuzz_target;
use sched_model::{Config, Harness, QUEUES};
use vhost_user_cow::daemon::scheduler::{ReqKind, ThreadId};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cfg = data[0];
    let capacity = 1 + usize::from(cfg & 7) % 5;
    let direct = cfg & 8 != 0;
    let spc_shift = (cfg >> 4) & 3;
    let inject = cfg & 0x40 != 0;
    let paged = cfg & 0x80 != 0;
    let mut config = Config::new(capacity, if direct && !paged { 512 } else { 1 }, 1 << spc_shift);
    if paged {
        config = config.paged(256, 8, 1);
    }
    let sectors = config.sectors;
    let n = usize::from(data[1]) % 81;
    let body = &data[2..];
    let n = n.min(body.len() / 3);
    let script: Vec<(ReqKind, u64, u64, ThreadId)> = body[..3 * n]
        .chunks(3)
        .map(|r| {
            let kind = match r[0] % 10 {
                0..=3 => ReqKind::Write,
                4..=7 => ReqKind::Read,
                8 => ReqKind::Zero,
                _ => ReqKind::Flush,
            };
            let thread = usize::from(r[0] >> 7) % QUEUES;
            let sector = u64::from(r[1]) % sectors;
            let count = (1 + u64::from(r[2]) % 5).min(sectors - sector);
            (kind, sector, count, thread)
        })
        .collect();
    let choices = &body[3 * n..];
    let mut h = Harness::with(config);
    for &c in choices.iter().take(4000) {
        let actions = h.actions(&script, inject);
        if actions.is_empty() {
            break;
        }
        h.apply(actions[usize::from(c) % actions.len()]);
    }
    h.finish();
});
