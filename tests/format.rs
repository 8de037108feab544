//! The COW format through the library: files of every layout built byte by
//! byte, header round trips, hostile input, locks.

mod common;

use std::fs::File;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use vhost_user_cow::format::error::DiskError;
use vhost_user_cow::format::header::{CowHeader, HeaderLayout};
use vhost_user_cow::format::lock::{lock_file, LockKind};
use vhost_user_cow::format::open::{read_header, Disk, DiskOptions};
use vhost_user_cow::units::to_usize;

/// A recognisable 512-byte sector: where it came from and its number.
fn sector_data(tag: u8, s: u64) -> Vec<u8> {
    let mut v = vec![tag; 512];
    v[..8].copy_from_slice(&s.to_le_bytes());
    v[511] = tag ^ (s & 0xff) as u8;
    v
}

fn ro() -> DiskOptions {
    DiskOptions {
        read_only: true,
        ..Default::default()
    }
}

/// Builds a COW file of one layout over a fresh backing file, with the COW
/// sectors `cow_sectors` (whole chunks) holding 'C' data, and checks that
/// the header, geometry, bitmap and every sector read back right.
#[allow(clippy::too_many_arguments)]
fn layout_case(
    layout: HeaderLayout,
    sectors: u64,
    sectorsize: u32,
    alignment: u32,
    set_chunks: &[u64],
    bitmap_offset: u64,
    bitmap_len: u64,
    data_offset: u64,
) {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("base.img");
    let size = sectors * 512;
    let mut bdata = Vec::new();
    for s in 0..sectors {
        bdata.extend(sector_data(b'B', s));
    }
    let mtime = write_file(&backing, &bdata);
    let mut f = Fields::new(&backing, mtime, size);
    f.sectorsize = sectorsize;
    f.alignment = alignment;
    let header = match layout {
        HeaderLayout::V1 => {
            f.version = 1;
            v1_header(&f)
        }
        HeaderLayout::V2 => {
            f.version = 2;
            v2_header(&f)
        }
        HeaderLayout::V3 => v3_header(&f),
        HeaderLayout::V3Broken => v3_broken_header(&f),
    };
    let chunks = size.div_ceil(sectorsize as u64);
    let mut bitmap = vec![0u8; to_usize(chunks.div_ceil(8))];
    for &c in set_chunks {
        bitmap[(c / 8) as usize] |= 1 << (c % 8);
    }
    let cow = dir.path().join("disk.cow");
    write_cow(&cow, &header, bitmap_offset, &bitmap, data_offset + size);
    let spc = sectorsize as u64 / 512;
    let in_cow = |s: u64| set_chunks.contains(&(s / spc));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&cow).unwrap();
        for s in (0..sectors).filter(|&s| in_cow(s)) {
            f.write_all_at(&sector_data(b'C', s), data_offset + s * 512)
                .unwrap();
        }
    }

    let h = read_header(&File::open(&cow).unwrap(), &cow).unwrap();
    assert_eq!(h.layout, layout);
    assert_eq!(h.size, size);
    assert_eq!(h.sectorsize, sectorsize);
    assert_eq!(h.mtime, mtime);
    assert_eq!(h.backing_path(), backing);
    let g = h.geometry(&cow).unwrap();
    assert_eq!(
        (g.bitmap_offset, g.bitmap_len, g.data_offset),
        (bitmap_offset, bitmap_len, data_offset),
        "{layout:?} geometry"
    );

    let disk = Disk::open(&cow, &ro()).unwrap();
    let parts = disk.cow.as_ref().unwrap();
    for c in 0..chunks {
        assert_eq!(parts.bitmap.get(c), set_chunks.contains(&c), "bit {c}");
    }
    assert_eq!(disk.sectors(), sectors);
    let mut buf = vec![0u8; to_usize(size)];
    disk.read_sectors(0, &mut buf).unwrap();
    for s in 0..sectors {
        let want = sector_data(if in_cow(s) { b'C' } else { b'B' }, s);
        assert_eq!(
            &buf[to_usize(s * 512)..to_usize((s + 1) * 512)],
            &want[..],
            "{layout:?} sector {s}"
        );
    }
}

#[test]
fn reads_v1_little_endian() {
    // 1001 sectors: the v1 bitmap length formula gives 125 bytes, one bit
    // short; the bit of sector 1000 lives in byte 125, before the data.
    layout_case(
        HeaderLayout::V1,
        1001,
        512,
        0,
        &[0, 7, 8, 9, 10, 64, 999, 1000],
        280,
        125,
        512,
    );
}

#[test]
fn reads_v2() {
    layout_case(
        HeaderLayout::V2,
        2048,
        512,
        0,
        &[1, 2, 3, 100, 2047],
        4120,
        256,
        4608,
    );
}

#[test]
fn reads_v3() {
    layout_case(
        HeaderLayout::V3,
        2048,
        512,
        4096,
        &[0, 63, 64, 65, 2047],
        8192,
        256,
        12288,
    );
}

#[test]
fn reads_v3_with_4k_chunks() {
    // 8 sectors per bit; 2050 sectors leave a partial last chunk.
    layout_case(
        HeaderLayout::V3,
        2050,
        4096,
        4096,
        &[3, 100, 256],
        8192,
        33,
        12288,
    );
}

#[test]
fn reads_broken_v3() {
    layout_case(
        HeaderLayout::V3Broken,
        2048,
        512,
        4096,
        &[5, 6, 1000],
        8192,
        256,
        12288,
    );
}

#[test]
fn v1_last_bits_survive_reopen() {
    // Written through the library into the byte past the v1 bitmap length.
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("base.img");
    let mtime = write_file(&backing, &vec![0u8; 1001 * 512]);
    let mut f = Fields::new(&backing, mtime, 1001 * 512);
    f.version = 1;
    let cow = dir.path().join("disk.cow");
    write_cow(&cow, &v1_header(&f), 280, &[], 512 + 1001 * 512);
    let data = sector_data(b'W', 1000);
    {
        let mut d = Disk::open(&cow, &DiskOptions::default()).unwrap();
        d.write_sectors(1000, &data).unwrap();
    }
    let d = Disk::open(&cow, &ro()).unwrap();
    let mut buf = vec![0u8; 512];
    d.read_sectors(1000, &mut buf).unwrap();
    assert_eq!(buf, data);
}

#[test]
fn every_bad_input_is_refused_without_writing() {
    let root = tempfile::tempdir().unwrap();
    for case in bad_cases(root.path()) {
        let before = snapshot_any(&case.cow);
        let backing_before = case.backing.as_ref().map(|b| snapshot(b));
        let name = case.name;
        let cow_name = case.cow.display().to_string();
        let err = match case.via {
            Via::Open => Disk::open(&case.cow, &DiskOptions::default()).expect_err(name),
            Via::Header => {
                // Without the magic a file is a raw image, by design.
                let d = Disk::open(&case.cow, &DiskOptions::default()).unwrap();
                assert!(d.cow.is_none(), "{name}");
                drop(d);
                read_header(&File::open(&case.cow).unwrap(), &case.cow).expect_err(name)
            }
        };
        assert!((case.expect)(&err), "{name}: unexpected error {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&cow_name),
            "{name}: {msg} does not name the file"
        );
        assert_eq!(snapshot_any(&case.cow), before, "{name}: COW file changed");
        if let (Some(b), Some(s)) = (&case.backing, backing_before) {
            assert_eq!(snapshot(b), s, "{name}: backing file changed");
        }
        // A user-given backing file must not get a header rewritten either.
        if let Some(b) = &case.backing {
            let opts = DiskOptions {
                backing: Some(b.clone()),
                ..Default::default()
            };
            let _ = Disk::open(&case.cow, &opts);
            assert_eq!(snapshot_any(&case.cow), before, "{name}: COW file changed");
        }
    }
}

#[test]
fn second_writable_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("base.img");
    let mtime = write_file(&backing, &vec![1u8; 65536]);
    let cow = dir.path().join("disk.cow");
    let f = Fields::new(&backing, mtime, 65536);
    write_cow(&cow, &v3_header(&f), 8192, &[], 12288 + 65536);

    let first = Disk::open(&cow, &DiskOptions::default()).unwrap();
    let err = Disk::open(&cow, &DiskOptions::default()).unwrap_err();
    match &err {
        DiskError::Locked { path, pid } => {
            assert_eq!(path, &cow);
            assert_eq!(*pid, std::process::id() as i32);
        }
        e => panic!("expected Locked, got {e:?}"),
    }
    assert!(err.to_string().contains(&cow.display().to_string()));
    // A read-only open conflicts with the write lock too.
    assert!(matches!(
        Disk::open(&cow, &ro()),
        Err(DiskError::Locked { .. })
    ));

    // The backing file carries a read lock: other readers are welcome,
    // writers are not.
    let other = File::open(&backing).unwrap();
    lock_file(&other, &backing, LockKind::Read).unwrap();
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    match lock_file(&w, &backing, LockKind::Write) {
        Err(DiskError::Locked { pid, .. }) => assert_eq!(pid, std::process::id() as i32),
        r => panic!("expected Locked, got {r:?}"),
    }
    drop(first);
    drop(other);
    // With every lock gone, the disk opens again.
    Disk::open(&cow, &DiskOptions::default()).unwrap();
}

fn p() -> &'static Path {
    Path::new("prop.cow")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn v3_header_round_trips(
        name in proptest::collection::vec(1u8..=255, 1..4095),
        mtime in any::<u32>(),
        size in 1u64..(1 << 50),
        ss_shift in 9u32..=16,
        align_shift in 0u32..=20,
    ) {
        let h = CowHeader::new_v3(name, mtime, size, 1 << ss_shift, 1 << align_shift);
        let bytes = h.to_v3_bytes(p()).unwrap();
        prop_assert_eq!(bytes.len(), 4128);
        let parsed = CowHeader::parse(&bytes, i64::MAX as u64, p()).unwrap();
        prop_assert_eq!(&parsed, &h);
        let g = parsed.geometry(p()).unwrap();
        let align = 1u64 << align_shift;
        prop_assert_eq!(g.bitmap_offset % align, 0);
        prop_assert_eq!(g.data_offset % align, 0);
        prop_assert!(g.bitmap_offset >= 4128);
        prop_assert!(g.data_offset >= g.bitmap_offset + g.bitmap_len);
        prop_assert!(g.bitmap_len * 8 >= size.div_ceil(1 << ss_shift));
    }

    #[test]
    fn parse_of_random_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        len in any::<u64>(),
    ) {
        if let Ok(h) = CowHeader::parse(&bytes, len, p()) {
            // Whatever parses has a usable geometry.
            prop_assert!(h.geometry(p()).is_ok());
        }
    }

    #[test]
    fn parse_of_mutated_headers_never_panics(
        which in 0usize..4,
        muts in proptest::collection::vec((0usize..4136, any::<u8>()), 1..8),
        len in prop_oneof![Just(u64::MAX), 0u64..100_000, Just(i64::MAX as u64)],
        cut in 0usize..4200,
    ) {
        let f = Fields::new(Path::new("/some/backing.img"), 7, 1 << 20);
        let mut v = match which {
            0 => v1_header(&Fields { version: 1, ..f }),
            1 => v2_header(&Fields { version: 2, ..f }),
            2 => v3_header(&f),
            _ => v3_broken_header(&f),
        };
        for (at, b) in muts {
            if at < v.len() {
                v[at] = b;
            }
        }
        v.truncate(cut.max(1));
        if let Ok(h) = CowHeader::parse(&v, len, p()) {
            prop_assert!(h.geometry(p()).is_ok());
        }
    }
}

proptest! {
    // These go through files, so fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn tools_survive_mutated_files(
        muts in proptest::collection::vec((0usize..4136, any::<u8>()), 1..6),
        bitmap in proptest::collection::vec(any::<u8>(), 0..300),
        len in 0u64..(12288 + 65536 + 10),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("base.img");
        let mtime = write_file(&backing, &vec![3u8; 65536]);
        let mut h = v3_header(&Fields::new(&backing, mtime, 65536));
        for (at, b) in muts {
            if at < h.len() {
                h[at] = b;
            }
        }
        let cow = dir.path().join("disk.cow");
        write_cow(&cow, &h, 8192, &bitmap, 0);
        std::fs::OpenOptions::new().write(true).open(&cow).unwrap().set_len(len).unwrap();
        let before = snapshot(&cow);
        let _ = vhost_user_cow::tools::info::inspect(&cow, None);
        let _ = vhost_user_cow::tools::check::check(&cow, None);
        if let Ok(d) = Disk::open(&cow, &ro()) {
            let mut buf = vec![0u8; 4096];
            let n = to_usize(d.sectors().min(8) * 512);
            d.read_sectors(0, &mut buf[..n]).unwrap();
        }
        prop_assert_eq!(snapshot(&cow), before);
    }
}

/// A huge bitmap that is a hole of its sparse file is neither read nor
/// allocated: not by the tools' open (every page on file) nor by the
/// daemon's (none), and the disk maps as all backing.
#[test]
fn huge_sparse_bitmap_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    // A sparse 8 TiB backing file that matches the header: a 2 GiB bitmap.
    let size = 1u64 << 43;
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(size)
        .unwrap();
    common::set_mtime(&backing, 1_600_000_000);
    let cow = dir.path().join("huge.cow");
    let f = common::Fields::new(&backing, 1_600_000_000, size);
    let bitmap_len = size / 512 / 8;
    common::write_cow(&cow, &common::v3_header(&f), 8192, &[], 8192 + bitmap_len);
    let before = common::snapshot_meta(&cow);
    for cache in [None, Some(1 << 20)] {
        let disk = Disk::open(
            &cow,
            &DiskOptions {
                bitmap_cache: cache,
                ..ro()
            },
        )
        .unwrap();
        let bitmap = &disk.cow.as_ref().unwrap().bitmap;
        assert_eq!(bitmap.resident_pages(), 0, "{cache:?}");
        assert_eq!(bitmap.pages_loaded(), 0, "{cache:?}");
        if cache.is_none() {
            let e = disk.extents(size / 512 - 8, 8);
            assert!(e.len() == 1 && !e[0].in_cow, "{e:?}");
        }
    }
    assert_eq!(common::snapshot_meta(&cow), before, "the file changed");
}
