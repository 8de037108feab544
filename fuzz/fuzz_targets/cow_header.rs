//! The COW header parser and the whole open path.
//!
//! Input: one control byte, then the bytes of a COW file.
//!
//! * `CowHeader::parse` and `geometry` run on the bytes directly; a parsed
//!   header must have a consistent geometry, and a v3 header must survive
//!   `to_v3_bytes` -> `parse` unchanged.
//! * The bytes are then written to a temp file and opened with
//!   `Disk::open` (read-only, no locks), `tools::info::inspect` and
//!   `tools::check::check`: always when control bit 4 is set, otherwise
//!   only when the header parsed (file I/O costs most of the time here).
//!
//! Control bits:
//! * bit 0: "fix up" the header so that the open gets past the backing
//!   checks: the size field is cut to at most 1 MiB and the backing file is
//!   made that long, and the backing file's mtime is set to the header's;
//! * bit 1: write the backing file's absolute path into the header's name;
//! * bit 2: pass the backing file explicitly (`--backing`);
//! * bit 3: name the format (`Some(Cow)`) instead of guessing it.
//!
//! Nothing may panic; errors are fine. `FUZZ_TRACE=1` prints the open's
//! and the check's outcome.

#![no_main]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use vhost_user_cow::format::header::{CowHeader, HeaderLayout, MAX_HEADER_LEN};
use vhost_user_cow::format::{Disk, DiskFormat, DiskOptions};
use vhost_user_cow::tools::{check, info};

struct Files {
    cow: PathBuf,
    backing: PathBuf,
}

static FILES: OnceLock<Files> = OnceLock::new();
static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_dir() {
    if let Some(d) = DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn files() -> &'static Files {
    FILES.get_or_init(|| {
        // tmpfs when there is one: the open path is file I/O bound.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("fuzz-cow-header-")
            .tempdir_in(base)
            .expect("temp dir")
            .keep();
        DIR.set(dir.clone()).unwrap();
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(remove_dir) };
        let backing = dir.join("backing.img");
        File::create(&backing).unwrap().set_len(4096).unwrap();
        Files {
            cow: dir.join("disk.cow"),
            backing,
        }
    })
}

/// The layout the parser will pick, from the magic and version alone.
fn layout_of(b: &[u8]) -> Option<(HeaderLayout, bool)> {
    if b.len() < 8 {
        return None;
    }
    let be = u32::from_be_bytes(b[0..4].try_into().unwrap());
    let le = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let (little, version) = if be == 0x4f4f4f4d {
        (false, u32::from_be_bytes(b[4..8].try_into().unwrap()))
    } else if le == 0x4f4f4f4d {
        (true, u32::from_le_bytes(b[4..8].try_into().unwrap()))
    } else {
        return None;
    };
    let layout = match version {
        1 => HeaderLayout::V1,
        2 => HeaderLayout::V2,
        3 if b.len() >= 36 && b[32..36] != [0; 4] => HeaderLayout::V3,
        3 => HeaderLayout::V3Broken,
        _ => return None,
    };
    (b.len() >= layout.header_len()).then_some((layout, little))
}

/// (mtime offset, size offset, name offset, name field length)
fn fields(layout: HeaderLayout) -> (usize, usize, usize, usize) {
    match layout {
        HeaderLayout::V1 => (264, 268, 8, 256),
        HeaderLayout::V2 => (4104, 4108, 8, 4096),
        HeaderLayout::V3 => (8, 12, 32, 4096),
        HeaderLayout::V3Broken => (8, 16, 36, 4096),
    }
}

/// Bit 0 and 1 of the control byte; returns the backing length wanted.
fn fix_up(bytes: &mut [u8], control: u8, backing: &Path) -> Option<(u64, u32)> {
    let (layout, little) = layout_of(bytes)?;
    let (mtime_off, size_off, name_off, name_len) = fields(layout);
    let r32 = |b: &[u8], o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let r64 = |b: &[u8], o: usize| {
        let a: [u8; 8] = b[o..o + 8].try_into().unwrap();
        if little {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    };
    if control & 2 != 0 {
        let name = backing.as_os_str().as_bytes();
        if name.len() < name_len {
            bytes[name_off..name_off + name.len()].copy_from_slice(name);
            bytes[name_off + name.len()] = 0;
        }
    }
    let mut size = r64(bytes, size_off);
    if control & 1 != 0 {
        size %= 1 << 20;
        let raw = if little {
            size.to_le_bytes()
        } else {
            size.to_be_bytes()
        };
        bytes[size_off..size_off + 8].copy_from_slice(&raw);
    }
    Some((size, r32(bytes, mtime_off)))
}

fn check_geometry(h: &CowHeader, path: &Path) {
    let g = h.geometry(path).expect("a parsed header has a geometry");
    assert!(g.bitmap_offset >= h.layout.header_len() as u64);
    assert!(g.data_offset >= g.bitmap_offset + g.bitmap_len);
    assert!(g.data_offset.checked_add(h.size).unwrap() <= i64::MAX as u64);
    assert_eq!(g.sectorsize, u64::from(h.sectorsize));
    assert!(g.chunks * g.sectorsize >= h.size);
    assert!((g.chunks - 1) * g.sectorsize < h.size);
    if matches!(h.layout, HeaderLayout::V3 | HeaderLayout::V3Broken) {
        assert!(g.bitmap_len * 8 >= g.chunks);
        assert_eq!(g.bitmap_offset % u64::from(h.alignment), 0);
        assert_eq!(g.data_offset % u64::from(h.alignment), 0);
    } else {
        assert_eq!(g.data_offset % g.sectorsize, 0);
    }
    // A v3 header written back parses to itself.
    if h.layout == HeaderLayout::V3 {
        if let Ok(bytes) = h.to_v3_bytes(path) {
            let again = CowHeader::parse(&bytes, u64::MAX, path).expect("v3 round trip");
            assert_eq!(&again, h);
        }
    }
}

/// FUZZ_TRACE=1 prints what the open path did (to check seeds by hand).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

fn open_all(f: &Files, bytes: &[u8], control: u8, backing_len: Option<(u64, u32)>) {
    if let Some((len, mtime)) = backing_len.filter(|_| control & 1 != 0) {
        let b = OpenOptions::new().write(true).open(&f.backing).unwrap();
        b.set_len(len).unwrap();
        b.set_modified(UNIX_EPOCH + Duration::from_secs(u64::from(mtime)))
            .unwrap();
    }
    write_file(&f.cow, bytes);
    let backing = (control & 4 != 0).then_some(f.backing.as_path());
    let opts = DiskOptions {
        read_only: true,
        no_lock: true,
        backing: backing.map(Path::to_owned),
        format: (control & 8 != 0).then_some(DiskFormat::Cow),
        ..Default::default()
    };
    let opened = Disk::open(&f.cow, &opts);
    if trace() {
        eprintln!("Disk::open: {:?}", opened.as_ref().map(|d| d.size));
    }
    if let Ok(disk) = opened {
        assert_eq!(disk.size % 512, 0);
        if let Some(c) = &disk.cow {
            assert_eq!(c.bitmap.chunks(), c.geometry.chunks);
            assert!(c.storable_chunks <= c.geometry.chunks);
            assert_eq!(disk.size, c.header.size.div_ceil(512) * 512);
        }
        let sectors = disk.sectors();
        let mut buf = [0u8; 512];
        if sectors > 0 {
            let _ = disk.read_sectors(0, &mut buf);
            let _ = disk.read_sectors(sectors - 1, &mut buf);
        }
        assert!(disk.read_sectors(sectors, &mut buf).is_err());
    }
    if let Ok(i) = info::inspect(&f.cow, backing) {
        let _ = i.to_string();
        let _ = serde_json::to_string(&i);
    }
    let report = check::check(&f.cow, backing);
    if trace() {
        eprintln!("check: {:?} {:?}", report.verdict(), report.problems);
    }
    let _ = report.verdict().exit_code();
    if let Some(e) = &report.fatal {
        let _ = e.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let f = files();
    let mut bytes = rest.to_vec();
    let fixed = fix_up(&mut bytes, control, &f.backing);
    let path = Path::new("fuzz.cow");
    let head = &bytes[..bytes.len().min(MAX_HEADER_LEN)];
    // As the open path calls it (the first bytes, the whole length), and on
    // the whole buffer with an unlimited file.
    let parsed = CowHeader::parse(head, bytes.len() as u64, path);
    match &parsed {
        Ok(h) => check_geometry(h, path),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(h) = CowHeader::parse(&bytes, u64::MAX, path) {
        check_geometry(&h, path);
    }
    if parsed.is_ok() || control & 16 != 0 {
        open_all(f, &bytes, control, fixed);
    }
});
