//! Mapping a 1 MiB request (2048 sectors) to backing/COW extents. The
//! uniform cases must stay far below 1 µs: they are on every guest I/O.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use vhost_user_cow::format::bitmap::Bitmap;

/// 1 GiB disk of 512-byte chunks.
const CHUNKS: u64 = 1 << 21;
/// Not word-aligned, like most guest requests relative to 64-sector words.
const START: u64 = 123_456 * 8 + 5;
const COUNT: u64 = 2048;

fn map_count(b: &Bitmap) -> u64 {
    b.map(black_box(START), black_box(COUNT))
        .map(|e| e.count)
        .sum()
}

fn bench(c: &mut Criterion) {
    let backing = Bitmap::new(CHUNKS, 512);
    let mut cow = Bitmap::new(CHUNKS, 512);
    cow.set_range(0, CHUNKS);
    let mut alternating = Bitmap::new(CHUNKS, 512);
    for i in (0..CHUNKS).step_by(2) {
        alternating.set_range(i, 1);
    }
    // Runs of 64 sectors, as left by 32 KiB guest writes.
    let mut runs = Bitmap::new(CHUNKS, 512);
    for i in (0..CHUNKS).step_by(128) {
        runs.set_range(i, 64);
    }

    let mut g = c.benchmark_group("map_1MiB");
    g.bench_function("all_backing", |bn| bn.iter(|| map_count(&backing)));
    g.bench_function("all_cow", |bn| bn.iter(|| map_count(&cow)));
    g.bench_function("runs_of_64", |bn| bn.iter(|| map_count(&runs)));
    g.bench_function("alternating", |bn| bn.iter(|| map_count(&alternating)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
