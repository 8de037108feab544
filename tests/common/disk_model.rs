//! Disk images with a known pattern and the in-memory model of what a
//! guest must read back, plus file-change checks for the e2e tests.

use std::ops::Range;
use std::path::Path;

use vhost_user_cow::units::to_usize;

use super::daemon::{Image, Peer};
use super::Rng;

/// The frontend's sector, as a `usize` for indexing the model.
pub const SECTOR: usize = to_usize(super::vhost_frontend::SECTOR);

/// What the disk must contain. Sectors that were discarded have
/// unspecified contents (virtio 1.2 §5.2.6: a discarded range may read as
/// old data or zeroes) and are not compared.
#[derive(Clone, Debug)]
pub struct Model {
    pub data: Vec<u8>,
    unknown: Vec<bool>,
}

impl Model {
    pub fn new(data: Vec<u8>) -> Model {
        assert_eq!(data.len() % SECTOR, 0);
        let n = data.len() / SECTOR;
        Model {
            data,
            unknown: vec![false; n],
        }
    }

    pub fn sectors(&self) -> u64 {
        (self.data.len() / SECTOR) as u64
    }

    pub fn write(&mut self, sector: u64, bytes: &[u8]) {
        let at = to_usize(sector) * SECTOR;
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
        for s in to_usize(sector)..(at + bytes.len()).div_ceil(SECTOR) {
            self.unknown[s] = false;
        }
    }

    pub fn zero(&mut self, sector: u64, n: u32) {
        self.write(sector, &vec![0u8; n as usize * SECTOR]);
    }

    pub fn discard(&mut self, sector: u64, n: u32) {
        for s in sector..sector + u64::from(n) {
            self.unknown[to_usize(s)] = true;
        }
    }

    /// Panics, naming the first differing sector, unless `got` (read at
    /// `sector`) matches the model.
    pub fn check(&self, sector: u64, got: &[u8], what: &str) {
        let at = to_usize(sector) * SECTOR;
        assert!(
            at + got.len() <= self.data.len(),
            "{what}: {} bytes at sector {sector} past the model",
            got.len()
        );
        for (i, chunk) in got.chunks(SECTOR).enumerate() {
            let s = to_usize(sector) + i;
            if self.unknown[s] {
                continue;
            }
            let want = &self.data[s * SECTOR..s * SECTOR + chunk.len()];
            if chunk != want {
                let off = chunk.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "{what}: sector {s} differs from the model at byte {off}: got {:02x?}, want {:02x?}",
                    &chunk[off..(off + 8).min(chunk.len())],
                    &want[off..(off + 8).min(want.len())]
                );
            }
        }
    }
}

/// A backing image of `sectors`: the first quarter zeroes (holes), the rest
/// sectors that each start with their own number, then seeded noise.
pub fn pattern(sectors: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = vec![0u8; to_usize(sectors) * SECTOR];
    for s in sectors / 4..sectors {
        let c = &mut v[to_usize(s) * SECTOR..(to_usize(s) + 1) * SECTOR];
        rng.fill(c);
        c[..8].copy_from_slice(&s.to_le_bytes());
    }
    v
}

/// `dir/backing.img` with [`pattern`] and `dir/disk.cow` over it (made with
/// `vhost-user-cow create`).
pub fn make_cow(dir: &Path, sectors: u64, seed: u64) -> (Image, Model) {
    make_cow_chunked(dir, sectors, seed, 512)
}

/// As [`make_cow`], with `chunk` bytes per bitmap bit (the header's
/// sectorsize).
pub fn make_cow_chunked(dir: &Path, sectors: u64, seed: u64, chunk: u32) -> (Image, Model) {
    let backing = dir.join("backing.img");
    let data = pattern(sectors, seed);
    super::write_file(&backing, &data);
    let cow = dir.join("disk.cow");
    create_cow(&cow, &backing, chunk);
    (Image::Cow { cow, backing }, Model::new(data))
}

/// `vhost-user-cow create COW --backing BACKING --sector-size CHUNK`.
pub fn create_cow(cow: &Path, backing: &Path, chunk: u32) {
    let o = super::output(
        std::process::Command::new(super::bin())
            .arg("create")
            .arg(cow)
            .arg("--backing")
            .arg(backing)
            .arg("--sector-size")
            .arg(chunk.to_string()),
    );
    assert!(
        o.status.success(),
        "vhost-user-cow create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `dir/raw.img` with [`pattern`].
pub fn make_raw(dir: &Path, sectors: u64, seed: u64) -> (Image, Model) {
    let p = dir.join("raw.img");
    let data = pattern(sectors, seed);
    super::write_file(&p, &data);
    (Image::Raw(p), Model::new(data))
}

/// The byte ranges of the served file that a write of `n` sectors at
/// `sector` may change: the sectors themselves in a raw file, or in a COW
/// file (ours) their data and the bitmap bytes that cover them.
pub fn write_footprint(image: &Image, peer: Peer, sector: u64, n: u64) -> Vec<Range<u64>> {
    let s = SECTOR as u64;
    match (image, peer) {
        (Image::Cow { cow, .. }, Peer::Ours) => {
            let h = std::fs::read(cow).unwrap();
            // v3 as `create` writes it: size @12, alignment @24 (big-endian).
            let size = u64::from_be_bytes(h[12..20].try_into().unwrap());
            let align = u64::from(u32::from_be_bytes(h[24..28].try_into().unwrap()));
            let bitmap_off = 4128u64.div_ceil(align) * align;
            let bitmap_len = size.div_ceil(s).div_ceil(8);
            let data_off = (bitmap_off + bitmap_len).div_ceil(align) * align;
            vec![
                bitmap_off + sector / 8..bitmap_off + (sector + n - 1) / 8 + 1,
                data_off + sector * s..data_off + (sector + n) * s,
            ]
        }
        _ => std::iter::once(sector * s..(sector + n) * s).collect(),
    }
}

/// Panics if `after` differs from `before` outside `allowed`.
pub fn assert_changes_within(before: &[u8], after: &[u8], allowed: &[Range<u64>], what: &str) {
    assert_eq!(before.len(), after.len(), "{what}: file size changed");
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b && !allowed.iter().any(|r| r.contains(&(i as u64))) {
            panic!("{what}: byte {i} changed ({a:#04x} -> {b:#04x}) outside {allowed:?}");
        }
    }
}
