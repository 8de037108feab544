//! Helpers shared by the integration tests: COW headers built byte by
//! byte, a seeded PRNG, and the UML tools to compare against.

#![allow(dead_code)]

pub mod daemon;
pub mod disk_model;
pub mod vhost_frontend;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

pub const MAGIC: u32 = 0x4f4f4f4d;

/// splitmix64: tiny, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Finds a UML tool. Missing tools skip the test locally but fail it when
/// `CI` is set (the test command installs them).
pub fn uml_tool(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is missing (install Debian's uml-utilities; scripts/test.sh does)");
    }
    eprintln!("SKIP: {name} not installed");
    None
}

/// Held while a test spawns a process, and while a test has a disk open
/// that it will open again after closing it. A child between fork and
/// exec shares every open file description of the test process, and with
/// it the OFD locks; a disk closed and reopened in that window would find
/// its own lock still held. (The tools themselves spawn nothing.)
pub static FORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn fork_guard() -> std::sync::MutexGuard<'static, ()> {
    FORK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a command, holding `FORK` only while it is being spawned.
pub fn output(c: &mut std::process::Command) -> std::process::Output {
    let child = {
        let _g = fork_guard();
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    child.wait_with_output().unwrap()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-user-cow")
}

/// Writes `data` as a file with a fixed mtime, returning that mtime.
pub fn write_file(path: &Path, data: &[u8]) -> u32 {
    std::fs::write(path, data).unwrap();
    let mtime = 1_600_000_000u32;
    set_mtime(path, mtime);
    mtime
}

pub fn set_mtime(path: &Path, secs: u32) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(secs.into()))
        .unwrap();
}

pub fn mtime(path: &Path) -> i64 {
    std::fs::metadata(path).unwrap().mtime()
}

pub fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Header fields for the byte-by-byte builders.
#[derive(Clone, Debug)]
pub struct Fields {
    pub backing: Vec<u8>,
    pub mtime: u32,
    pub size: u64,
    pub sectorsize: u32,
    pub alignment: u32,
    pub version: u32,
}

impl Fields {
    pub fn new(backing: &Path, mtime: u32, size: u64) -> Fields {
        use std::os::unix::ffi::OsStrExt;
        Fields {
            backing: backing.as_os_str().as_bytes().to_vec(),
            mtime,
            size,
            sectorsize: 512,
            alignment: 4096,
            version: 3,
        }
    }
}

/// v1: host (little-endian) byte order, 256-byte backing name.
pub fn v1_header(f: &Fields) -> Vec<u8> {
    let mut b = vec![0u8; 280];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&f.version.to_le_bytes());
    b[8..8 + f.backing.len()].copy_from_slice(&f.backing);
    b[264..268].copy_from_slice(&f.mtime.to_le_bytes());
    b[268..276].copy_from_slice(&f.size.to_le_bytes());
    b[276..280].copy_from_slice(&f.sectorsize.to_le_bytes());
    b
}

/// v2: big-endian, 4096-byte backing name.
pub fn v2_header(f: &Fields) -> Vec<u8> {
    let mut b = vec![0u8; 4120];
    b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&f.version.to_be_bytes());
    b[8..8 + f.backing.len()].copy_from_slice(&f.backing);
    b[4104..4108].copy_from_slice(&f.mtime.to_be_bytes());
    b[4108..4116].copy_from_slice(&f.size.to_be_bytes());
    b[4116..4120].copy_from_slice(&f.sectorsize.to_be_bytes());
    b
}

/// v3, big-endian, packed.
pub fn v3_header(f: &Fields) -> Vec<u8> {
    let mut b = vec![0u8; 4128];
    b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&f.version.to_be_bytes());
    b[8..12].copy_from_slice(&f.mtime.to_be_bytes());
    b[12..20].copy_from_slice(&f.size.to_be_bytes());
    b[20..24].copy_from_slice(&f.sectorsize.to_be_bytes());
    b[24..28].copy_from_slice(&f.alignment.to_be_bytes());
    // cow_format at 28 stays 0.
    b[32..32 + f.backing.len()].copy_from_slice(&f.backing);
    b
}

/// v3 as old unpacked 64-bit writers laid it out: a 64-bit mtime slot
/// (the 32-bit big-endian value in its first 4 bytes) shifts the rest.
pub fn v3_broken_header(f: &Fields) -> Vec<u8> {
    let mut b = vec![0u8; 4136];
    b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&f.version.to_be_bytes());
    b[8..12].copy_from_slice(&f.mtime.to_be_bytes());
    b[16..24].copy_from_slice(&f.size.to_be_bytes());
    b[24..28].copy_from_slice(&f.sectorsize.to_be_bytes());
    b[28..32].copy_from_slice(&f.alignment.to_be_bytes());
    // cow_format at 32 stays 0 (that zero is what marks this layout).
    b[36..36 + f.backing.len()].copy_from_slice(&f.backing);
    b
}

/// Writes a COW file: `header`, bitmap bytes at `bitmap_offset`, and the
/// file extended to `len`.
pub fn write_cow(path: &Path, header: &[u8], bitmap_offset: u64, bitmap: &[u8], len: u64) {
    let f = File::create(path).unwrap();
    f.write_all_at(header, 0).unwrap();
    f.write_all_at(bitmap, bitmap_offset).unwrap();
    f.set_len(len.max(bitmap_offset + bitmap.len() as u64))
        .unwrap();
}

/// Length and mtime of a file (for files too large to read whole).
pub fn snapshot_meta(path: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (m.len(), m.mtime(), m.mtime_nsec())
}

/// Contents and mtime of a file, to show nothing was written.
pub fn snapshot(path: &Path) -> (Vec<u8>, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), m.mtime(), m.mtime_nsec())
}

use vhost_user_cow::format::error::DiskError;
use vhost_user_cow::units::to_usize;

/// Through which door a bad file is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `Disk::open` (and so every tool) refuses it.
    Open,
    /// Only the header parser can call it bad: without the magic the file
    /// is, by design, a raw image.
    Header,
}

/// What is wrong with a bad case: the COW file itself (check exits 2) or
/// only its backing file (check exits 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Cow,
    Backing,
}

pub struct BadCase {
    pub name: &'static str,
    pub cow: PathBuf,
    /// The backing file, when there is a real one to keep unchanged.
    pub backing: Option<PathBuf>,
    pub via: Via,
    pub blame: Blame,
    pub expect: fn(&DiskError) -> bool,
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// Every kind of bad input the disk layer must refuse, each in its own
/// directory under `root`.
pub fn bad_cases(root: &Path) -> Vec<BadCase> {
    let mut out = Vec::new();
    let mut add = |name: &'static str,
                   via: Via,
                   blame: Blame,
                   expect: fn(&DiskError) -> bool,
                   make: &dyn Fn(&Path) -> (PathBuf, Option<PathBuf>)| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (cow, backing) = make(&dir);
        out.push(BadCase {
            name,
            cow,
            backing,
            via,
            blame,
            expect,
        });
    };
    const SIZE: u64 = 1 << 20;
    // A good backing file and the fields of a good header over it.
    let base = |dir: &Path| -> (PathBuf, Fields) {
        let b = dir.join("base.img");
        let mtime = write_file(&b, &vec![0x5a; to_usize(SIZE)]);
        let f = Fields::new(&b, mtime, SIZE);
        (b, f)
    };
    let v3_file = |dir: &Path, f: &Fields, len: u64| -> PathBuf {
        let c = dir.join("disk.cow");
        write_cow(&c, &v3_header(f), 8192, &[], len);
        c
    };

    add(
        "truncated_v3",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::TruncatedHeader { len: 100, .. }),
        &|d| {
            let (b, f) = base(d);
            let c = d.join("disk.cow");
            std::fs::write(&c, &v3_header(&f)[..100]).unwrap();
            (c, Some(b))
        },
    );
    add(
        "truncated_v1",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::TruncatedHeader { need: 280, .. }),
        &|d| {
            let (b, mut f) = base(d);
            f.version = 1;
            let c = d.join("disk.cow");
            std::fs::write(&c, &v1_header(&f)[..200]).unwrap();
            (c, Some(b))
        },
    );
    add(
        "magic_only",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::TruncatedHeader { .. }),
        &|d| {
            let c = d.join("disk.cow");
            std::fs::write(&c, b"OOOM\0\0\0").unwrap();
            (c, None)
        },
    );
    add(
        "bad_magic",
        Via::Header,
        Blame::Cow,
        |e| {
            matches!(
                e,
                DiskError::BadMagic {
                    found: 0x4f4f4f4e,
                    ..
                }
            )
        },
        &|d| {
            let (b, f) = base(d);
            let mut h = v3_header(&f);
            h[3] = b'N';
            let c = d.join("disk.cow");
            write_cow(&c, &h, 8192, &[], 12288 + SIZE);
            (c, Some(b))
        },
    );
    add(
        "unknown_version",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::UnknownVersion { version: 4, .. }),
        &|d| {
            let (b, mut f) = base(d);
            f.version = 4;
            (v3_file(d, &f, 12288 + SIZE), Some(b))
        },
    );
    for (name, ss) in [
        ("sectorsize_zero", 0u32),
        ("sectorsize_not_pow2", 1000),
        ("sectorsize_too_big", 131072),
        ("sectorsize_too_small", 256),
    ] {
        add(
            name,
            Via::Open,
            Blame::Cow,
            |e| matches!(e, DiskError::BadSectorSize { .. }),
            &move |d| {
                let (b, mut f) = base(d);
                f.sectorsize = ss;
                (v3_file(d, &f, 12288 + SIZE), Some(b))
            },
        );
    }
    for (name, align) in [("alignment_zero", 0u32), ("alignment_not_pow2", 3000)] {
        add(
            name,
            Via::Open,
            Blame::Cow,
            |e| matches!(e, DiskError::BadAlignment { .. }),
            &move |d| {
                let (b, mut f) = base(d);
                f.alignment = align;
                (v3_file(d, &f, 12288 + SIZE), Some(b))
            },
        );
    }
    for (name, size) in [
        ("size_zero", 0u64),
        ("size_overflows_u64", u64::MAX),
        ("size_beyond_off_t", (1u64 << 63) - 4096),
    ] {
        add(
            name,
            Via::Open,
            Blame::Cow,
            |e| matches!(e, DiskError::BadSize { .. }),
            &move |d| {
                let (b, mut f) = base(d);
                f.size = size;
                (v3_file(d, &f, 12288 + SIZE), Some(b))
            },
        );
    }
    add(
        "shorter_than_bitmap",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::ShorterThanBitmap { need, .. } if *need == 8192 + (1 << 18)),
        &|d| {
            let (b, mut f) = base(d);
            f.size = 1 << 30;
            (v3_file(d, &f, 8192 + 1000), Some(b))
        },
    );
    add(
        "backing_name_empty",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::BackingPathEmpty { .. }),
        &|d| {
            let (b, mut f) = base(d);
            f.backing.clear();
            (v3_file(d, &f, 12288 + SIZE), Some(b))
        },
    );
    add(
        "backing_name_unterminated_v3",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::BackingPathUnterminated { .. }),
        &|d| {
            let (b, mut f) = base(d);
            f.backing = vec![b'/'; 4096];
            (v3_file(d, &f, 12288 + SIZE), Some(b))
        },
    );
    add(
        "backing_name_unterminated_v1",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::BackingPathUnterminated { .. }),
        &|d| {
            let (b, mut f) = base(d);
            f.version = 1;
            f.backing = vec![b'/'; 256];
            let c = d.join("disk.cow");
            write_cow(&c, &v1_header(&f), 280, &[], 512 + SIZE);
            (c, Some(b))
        },
    );
    add(
        "backing_missing",
        Via::Open,
        Blame::Backing,
        |e| {
            matches!(e, DiskError::BackingOpen { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound)
        },
        &|d| {
            let (b, f) = base(d);
            std::fs::remove_file(&b).unwrap();
            (v3_file(d, &f, 12288 + SIZE), None)
        },
    );
    add(
        "backing_directory",
        Via::Open,
        Blame::Backing,
        |e| {
            matches!(
                e,
                DiskError::BackingNotRegular {
                    kind: "a directory",
                    ..
                }
            )
        },
        &|d| {
            let (b, f) = base(d);
            std::fs::remove_file(&b).unwrap();
            std::fs::create_dir(&b).unwrap();
            (v3_file(d, &f, 12288 + SIZE), None)
        },
    );
    add(
        "backing_fifo",
        Via::Open,
        Blame::Backing,
        |e| matches!(e, DiskError::BackingNotRegular { kind: "a FIFO", .. }),
        &|d| {
            let (b, f) = base(d);
            std::fs::remove_file(&b).unwrap();
            mkfifo(&b);
            (v3_file(d, &f, 12288 + SIZE), None)
        },
    );
    add(
        "backing_size_changed",
        Via::Open,
        Blame::Backing,
        |e| {
            matches!(e, DiskError::SizeMismatch { recorded, actual, .. }
                if *recorded == SIZE && *actual == SIZE + 512)
        },
        &|d| {
            let (b, f) = base(d);
            let mtime = write_file(&b, &vec![0x5a; to_usize(SIZE) + 512]);
            assert_eq!(mtime, f.mtime);
            (v3_file(d, &f, 12288 + SIZE), Some(b))
        },
    );
    add(
        "backing_mtime_changed",
        Via::Open,
        Blame::Backing,
        |e| {
            matches!(e, DiskError::MtimeMismatch { recorded, actual, .. }
                if *recorded == 1_600_000_000 && *actual == 1_600_000_001)
        },
        &|d| {
            let (b, f) = base(d);
            set_mtime(&b, f.mtime + 1);
            (v3_file(d, &f, 12288 + SIZE), Some(b))
        },
    );
    add(
        "cow_is_directory",
        Via::Open,
        Blame::Cow,
        |e| {
            matches!(
                e,
                DiskError::NotRegular {
                    kind: "a directory",
                    ..
                }
            )
        },
        &|d| {
            let c = d.join("disk.cow");
            std::fs::create_dir(&c).unwrap();
            (c, None)
        },
    );
    add(
        "cow_is_fifo",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::NotRegular { kind: "a FIFO", .. }),
        &|d| {
            let c = d.join("disk.cow");
            mkfifo(&c);
            (c, None)
        },
    );
    add(
        "empty_file",
        Via::Open,
        Blame::Cow,
        |e| matches!(e, DiskError::EmptyImage { .. }),
        &|d| {
            let c = d.join("disk.cow");
            std::fs::write(&c, b"").unwrap();
            (c, None)
        },
    );
    out
}

/// Snapshot of a path that may be a directory or FIFO (not read then).
pub fn snapshot_any(path: &Path) -> (Vec<u8>, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    let data = if m.is_file() {
        std::fs::read(path).unwrap()
    } else {
        Vec::new()
    };
    (data, m.mtime(), m.mtime_nsec())
}
