//! The scheduler's own cost per 4 KiB request on the common paths, with an
//! engine that completes every operation at once.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use vhost_user_cow::daemon::scheduler::{CowLayout, DiskRequest, ReqKind, Scheduler};
use vhost_user_cow::format::bitmap::Bitmap;

const SECTORS: u64 = 1 << 21; // 1 GiB

fn scheduler(all_cow: bool) -> Scheduler {
    let mut bitmap = Bitmap::new(SECTORS, 512);
    if all_cow {
        bitmap.set_range(0, SECTORS);
    }
    let layout = CowLayout {
        bitmap_offset: 8192,
        data_offset: 8192 + SECTORS / 8,
        bitmap_block: 1,
        storable_chunks: SECTORS,
    };
    Scheduler::new_cow(SECTORS, bitmap, layout, 1, false)
}

/// Submits one request and runs it to completion.
fn run(s: &mut Scheduler, id: u64, kind: ReqKind, sector: u64) {
    s.submit(DiskRequest {
        id,
        thread: 0,
        kind,
        sector,
        count: 8,
    });
    while let Some(op) = s.pop_op(0) {
        s.op_done(op.id, Ok(()));
    }
    black_box(s.pop_done(0));
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler per 4k request");
    let mut s = scheduler(true);
    let mut i = 0u64;
    g.bench_function("all-COW write", |b| {
        b.iter(|| {
            i += 1;
            run(&mut s, i, ReqKind::Write, (i * 8) % SECTORS);
        })
    });
    let mut s = scheduler(false);
    let mut i = 0u64;
    g.bench_function("first write", |b| {
        b.iter(|| {
            i += 1;
            let sector = (i * 8) % SECTORS;
            if sector == 0 {
                s = scheduler(false);
            }
            run(&mut s, i, ReqKind::Write, sector);
        })
    });
    let mut s = scheduler(false);
    let mut i = 0u64;
    g.bench_function("backing read", |b| {
        b.iter(|| {
            i += 1;
            run(&mut s, i, ReqKind::Read, (i * 8) % SECTORS);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
