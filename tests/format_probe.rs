//! The format-probing escape, tried through the real socket: a guest of a
//! raw image served without `--format` writes a COW header naming a host
//! file into its sector 0; the daemon is restarted with the same command.
//! The host file's bytes must never reach the guest (docs/design.md,
//! "Trust model").

mod common;

use std::path::Path;
use vhost_user_cow::units::to_usize;

use common::daemon::{Daemon, Image, Peer, ServeOptions};
use common::vhost_frontend::*;
use common::{mtime, v1_header, v3_header, Fields, Rng};

/// The served raw image: 1 MiB.
const DISK_BYTES: usize = 1 << 20;
/// What the host file holds: a pattern no raw image here contains.
const SECRET: &[u8] = b"HOST-SECRET-do-not-leak-to-the-guest:";

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vuc-probe-")
        .tempdir()
        .unwrap()
}

/// A host file the guest must never see, 64 KiB of the secret pattern.
fn host_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("host-secret");
    let data: Vec<u8> = SECRET.iter().copied().cycle().take(64 << 10).collect();
    std::fs::write(&p, data).unwrap();
    p
}

/// A raw image of random bytes whose first sector holds `first`.
fn raw_image(dir: &Path, first: &[u8]) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let mut data = Rng::new(7).bytes(DISK_BYTES);
    data[..first.len()].copy_from_slice(first);
    std::fs::write(&p, data).unwrap();
    p
}

/// A COW header naming `host` with its real size and mtime (so every
/// check the daemon makes on a backing file passes), padded to sectors.
fn hostile_header(host: &Path, v1: bool) -> Vec<u8> {
    let size = std::fs::metadata(host).unwrap().len();
    let f = Fields::new(host, (mtime(host) & 0xffff_ffff) as u32, size);
    let mut h = if v1 {
        v1_header(&Fields { version: 1, ..f })
    } else {
        v3_header(&f)
    };
    h.resize(h.len().next_multiple_of(512), 0);
    h
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Reads the whole disk and fails if any of the host file shows.
fn assert_no_leak(dev: &mut VhostUserBlk, what: &str) -> Vec<u8> {
    let sectors = dev.config.capacity;
    let mut all = Vec::new();
    let mut s = 0;
    while s < sectors {
        let n = 256.min(sectors - s);
        all.extend(dev.read(0, s, to_usize(n * 512)).ok(what));
        s += n;
    }
    assert!(
        !contains(&all, &SECRET[..16]),
        "{what}: the guest read the host file's bytes"
    );
    all
}

fn guessing() -> ServeOptions {
    ServeOptions {
        guess_format: true,
        ..ServeOptions::default()
    }
}

/// The attack, in both byte orders of the magic and with the header split
/// over descriptors so the magic straddles two of them.
#[test]
fn guest_cannot_turn_a_guessed_raw_image_into_a_cow_file() {
    let dir = tempdir();
    let host = host_file(dir.path());
    let disk = raw_image(dir.path(), &[]);
    let before = std::fs::read(&disk).unwrap();
    let image = Image::Raw(disk.clone());

    let d = Daemon::start(Peer::Ours, dir.path(), &image, &guessing());
    assert!(
        d.log_text().contains("format guessed as raw") && d.log_text().contains("--format raw"),
        "startup log does not say the format was guessed:\n{}",
        d.log_text()
    );
    let mut dev = d.connect();
    let mut statuses = Vec::new();
    // The v1 header goes last: it is the one left in place if the writes
    // are not refused, so the restart below really opens it.
    for v1 in [false, true] {
        let header = hostile_header(&host, v1);
        // The magic split 2 + 2 bytes over two descriptors.
        let p = dev
            .chain()
            .header(T_OUT, 0)
            .readable(&header[..2])
            .readable(&header[2..])
            .status()
            .submit(0);
        statuses.push(dev.complete(p, "split COW header write").status);
        statuses.push(dev.write(0, 0, &header).status);
    }
    dev.flush(0).ok("flush");
    let log = d.log_text();
    drop(dev);
    let st = d.terminate();
    assert!(
        st.status.success(),
        "daemon exit: {}\n{}",
        st.status,
        st.log
    );

    // Restarted with the same command: still a raw image, no host bytes.
    // (Before the guard, this start served the host file.)
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &guessing());
    let mut dev = d.connect();
    let seen = assert_no_leak(&mut dev, "after restart");
    assert!(seen == before, "the guest no longer sees its raw image");
    drop(dev);
    d.terminate();
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a refused write changed the image"
    );
    assert_eq!(
        statuses,
        vec![Some(S_IOERR); 4],
        "writes of a COW header to sector 0 (split, whole; v3, v1)"
    );
    assert!(
        log.contains(&format!("{}: refused a guest write", disk.display())),
        "no log line naming the disk:\n{log}"
    );
}

/// Ordinary first sectors (an MBR, a filesystem) keep working on a guessed
/// raw image, and they survive a restart.
#[test]
fn ordinary_first_sectors_keep_working_on_a_guessed_raw_image() {
    let dir = tempdir();
    let mut mbr = vec![0u8; 512];
    mbr[0..3].copy_from_slice(&[0xeb, 0x63, 0x90]); // jmp, as boot code starts
    mbr[446..462].copy_from_slice(&[
        0x80, 0, 2, 0, 0x83, 0xfe, 0xff, 0xff, 8, 0, 0, 0, 0, 8, 0, 0,
    ]);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let disk = raw_image(dir.path(), &mbr);
    let image = Image::Raw(disk.clone());
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &guessing());
    let mut dev = d.connect();
    assert_eq!(dev.read(0, 0, 512).ok("read MBR"), mbr);

    // A new MBR plus an ext4 superblock (magic 0xef53 at byte 56 of the
    // superblock, which starts at byte 1024) in one 4 KiB write.
    let mut first = vec![0u8; 4096];
    first[..512].copy_from_slice(&mbr);
    first[440..444].copy_from_slice(b"DISK");
    first[1024 + 56..1024 + 58].copy_from_slice(&0xef53u16.to_le_bytes());
    dev.write(0, 0, &first).ok("write MBR + superblock");
    // Bytes that are the COW magic but not at offset 0 are ordinary data.
    let mut magic_later = vec![0u8; 512];
    magic_later[4..8].copy_from_slice(&0x4f4f4f4du32.to_be_bytes());
    dev.write(0, 8, &magic_later).ok("magic away from offset 0");
    dev.flush(0).ok("flush");
    assert_eq!(dev.read(0, 0, 4096).ok("read back"), first);
    drop(dev);
    d.terminate();

    let d = Daemon::start(Peer::Ours, dir.path(), &image, &guessing());
    let mut dev = d.connect();
    assert_eq!(dev.read(0, 0, 4096).ok("after restart"), first);
    assert_eq!(dev.read(0, 8, 512).ok("after restart"), magic_later);
    drop(dev);
    d.terminate();
}

/// With `--format raw` the operator has said what the file is: the guest
/// may write anything, and the next start with `--format raw` still serves
/// those bytes as a raw image.
#[test]
fn named_raw_format_allows_any_first_sector() {
    let dir = tempdir();
    let host = host_file(dir.path());
    let disk = raw_image(dir.path(), &[]);
    let image = Image::Raw(disk.clone());
    let named = ServeOptions::default();
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &named);
    assert!(!d.log_text().contains("format guessed"), "{}", d.log_text());
    let mut dev = d.connect();
    let header = hostile_header(&host, false);
    dev.write(0, 0, &header)
        .ok("COW header on a named raw image");
    dev.flush(0).ok("flush");
    drop(dev);
    d.terminate();

    let d = Daemon::start(Peer::Ours, dir.path(), &image, &named);
    let mut dev = d.connect();
    let seen = assert_no_leak(&mut dev, "named raw after restart");
    assert_eq!(&seen[..header.len()], &header[..]);
    drop(dev);
    d.terminate();
}
