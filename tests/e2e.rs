//! End-to-end tests over the real vhost-user socket: our daemon and
//! qemu-storage-daemon as the reference (`ours::` and `qsd::`; see
//! `common/daemon.rs`) driven by the test frontend in
//! `common/vhost_frontend`, and by libblkio in a separate process
//! (`blkio-rw`, a binary of the `load/` package).

#[path = "../load/test-support/clients.rs"]
mod clients;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use vhost_user_cow::units::to_usize;

use common::daemon::{Daemon, Peer, ServeOptions, Stopped};
use common::disk_model::{make_cow, make_cow_chunked, make_raw, Model, SECTOR};
use common::vhost_frontend::*;
use common::Rng;
use vhost::vhost_user::VhostUserProtocolFeatures;

/// 4 MiB disks: big enough for multi-segment requests all over the bitmap.
const SECTORS: u64 = 8192;

crate::per_peer!(
    cow_round_trip_1_queue,
    cow_round_trip_4_queues,
    cow_4k_chunks_round_trip_2_queues,
    raw_round_trip_2_queues,
    event_idx_and_add_mem_region,
    config_space_and_features,
    flush_completes,
    discard,
    write_zeroes_reads_zeros_over_backing,
    get_id_returns_serial,
    read_only_refuses_writes,
    second_connection_sees_first_ones_data,
    sigterm_exits_cleanly,
    blkio_client_in_another_process,
    cloud_hypervisor_cow_round_trip_2_queues,
    cloud_hypervisor_raw_round_trip_1_queue,
    cloud_hypervisor_negotiation,
    cloud_hypervisor_rings_stopped_and_restarted,
    cloud_hypervisor_hotplugged_memory;
    ours_only: direct_4k_chunks_offer_4k_blocks,
    bitmap_pages_dropped_and_read_again,
    bitmap_pages_dropped_and_read_again_direct,
);

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vuc-e2e-")
        .tempdir()
        .unwrap()
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Reads the whole disk in 256 KiB requests and compares with the model.
/// A bitmap page (4 KiB) covers this many sectors at 512-byte chunks.
const PAGE_SECTORS: u64 = 32768;

/// Four bitmap pages and a cache of one: writes across page boundaries and
/// into every page, each read back after the others pushed its page out,
/// so pages are dropped and read again from the file all the time.
fn pages_dropped_and_read_again(extra: &[&str]) {
    let dir = tempdir();
    let sectors = 4 * PAGE_SECTORS;
    let (image, mut model) = make_cow(dir.path(), sectors, 0xb17);
    let opts = ServeOptions {
        extra_args: ["--bitmap-cache", "4K"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect(),
        ..ServeOptions::default()
    };
    let d = Daemon::start(Peer::Ours, dir.path(), &image, &opts);
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect();
    let mut rng = Rng::new(0xb17);
    for round in 0..3u64 {
        for page in 0..4 {
            // Across the boundary below this page, and somewhere inside it.
            let inside = page * PAGE_SECTORS + rng.below(PAGE_SECTORS - 16);
            for s in [(page * PAGE_SECTORS).saturating_sub(4), inside] {
                let data = rng.bytes(8 * SECTOR);
                dev.write(0, s, &data).ok("write");
                model.write(s, &data);
            }
        }
        for page in (0..4).rev() {
            let s = (page * PAGE_SECTORS).saturating_sub(8);
            let got = dev.read(0, s, 16 * SECTOR).ok("read");
            model.check(s, &got, &format!("round {round}, page {page}"));
        }
    }
    assert_eq!(dev.flush(0).ok("flush").len(), 0);
    check_whole_disk(&mut dev, &model, "after the writes");
    disconnect(dev);
    let st = finish(d, &model, dir.path(), &ro_before);
    let counters = st
        .log
        .split("write path counters: ")
        .nth(1)
        .and_then(|t| t.lines().next())
        .expect("the daemon prints its counters");
    let c: serde_json::Value = serde_json::from_str(counters).unwrap();
    assert!(c["bitmap_page_loads"].as_u64().unwrap() > 10, "{c}");
    assert!(c["bitmap_pages_evicted"].as_u64().unwrap() > 10, "{c}");
}

fn bitmap_pages_dropped_and_read_again(_: Peer) {
    pages_dropped_and_read_again(&[]);
}

/// O_DIRECT: page loads and bitmap writes in whole 512-byte blocks.
fn bitmap_pages_dropped_and_read_again_direct(_: Peer) {
    pages_dropped_and_read_again(&["--direct"]);
}

fn check_whole_disk(dev: &mut VhostUserBlk, model: &Model, what: &str) {
    let chunk = 512u64;
    let mut s = 0;
    while s < model.sectors() {
        let n = chunk.min(model.sectors() - s);
        let data = dev
            .read(0, s, to_usize(n) * SECTOR)
            .ok(&format!("{what}: read"));
        model.check(s, &data, what);
        s += n;
    }
}

/// Stops the rings and checks GET_VRING_BASE reports every request as
/// processed.
fn disconnect(dev: VhostUserBlk) {
    let want = dev.avail_indices();
    let got = dev.disconnect().expect("GET_VRING_BASE");
    assert_eq!(got, want, "GET_VRING_BASE after all requests completed");
}

/// SIGTERM; then exit 0, socket gone, `check` clean (ours, COW) and the
/// image as `uml_moo` merges it (ours, COW) or the served file equal to
/// the model. Files that must not change are compared with `ro_before`.
fn finish(d: Daemon, model: &Model, dir: &Path, ro_before: &[Vec<u8>]) -> Stopped {
    let ro = d.read_only_files();
    let st = d.terminate_ok();
    assert!(
        !st.socket.exists(),
        "{:?} left its socket {} behind",
        st.peer,
        st.socket.display()
    );
    assert!(snapshot(&ro) == ro_before, "the backing file changed");
    st.assert_check_clean();
    if let Some(img) = st.image(dir) {
        assert_eq!(img.len(), model.data.len(), "image size");
        model.check(0, &img, "final image (uml_moo for a COW)");
    }
    st
}

/// Batches of disjoint writes, all in flight at once and spread over the
/// queues, then overlapping reads across written and unwritten (backing)
/// sectors, compared with the model; then the edges of the disk.
fn exercise(dev: &mut VhostUserBlk, model: &mut Model, rng: &mut Rng) {
    let queues = dev.num_queues();
    let sectors = model.sectors();
    for round in 0..6 {
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        while batch.len() < 12 {
            let n = 1 + rng.below(48);
            let s = rng.below(sectors - n);
            if batch
                .iter()
                .any(|(b, d)| *b < s + n && s < b + (d.len() / SECTOR) as u64)
            {
                continue;
            }
            batch.push((s, rng.bytes(to_usize(n) * SECTOR)));
        }
        let pending: Vec<Pending> = batch
            .iter()
            .enumerate()
            .map(|(i, (s, data))| dev.submit_write(i % queues, *s, data))
            .collect();
        for (p, (s, data)) in pending.into_iter().zip(batch) {
            let c = dev.complete(p, &format!("round {round}: write at {s}"));
            assert_eq!(c.status, Some(S_OK), "round {round}: write at {s}");
            assert_eq!(c.used_len, 1, "write used length = the status byte");
            model.write(s, &data);
        }
        let reads: Vec<(u64, usize)> = (0..12)
            .map(|_| {
                let n = 1 + rng.below(160);
                (rng.below(sectors - n), to_usize(n) * SECTOR)
            })
            .collect();
        let pending: Vec<Pending> = reads
            .iter()
            .enumerate()
            .map(|(i, &(s, len))| dev.submit_read(i % queues, s, len))
            .collect();
        for (p, (s, len)) in pending.into_iter().zip(reads) {
            let c = dev.complete(p, &format!("round {round}: read at {s}"));
            assert_eq!(c.status, Some(S_OK), "round {round}: read at {s}");
            assert_eq!(
                c.used_len as usize,
                len + 1,
                "read used length = data + status"
            );
            model.check(s, &c.data, &format!("round {round}: read at {s}"));
        }
    }
    // The first and last sectors, alone and in a request ending at capacity.
    for (s, n) in [(0u64, 1u64), (sectors - 1, 1), (sectors - 9, 9)] {
        let data = rng.bytes(to_usize(n) * SECTOR);
        dev.write(queues - 1, s, &data).ok("edge write");
        model.write(s, &data);
        let got = dev.read(0, s, to_usize(n) * SECTOR).ok("edge read");
        model.check(s, &got, "edge read");
    }
}

fn round_trip(peer: Peer, queues: u16, raw: bool, fopts: FrontendOptions) {
    round_trip_chunked(peer, queues, raw, fopts, 512)
}

/// `chunk`: bytes per bitmap bit of the COW file.
fn round_trip_chunked(peer: Peer, queues: u16, raw: bool, fopts: FrontendOptions, chunk: u32) {
    let dir = tempdir();
    let seed = 0x5eed_0000 + u64::from(queues);
    let (image, mut model) = if raw {
        make_raw(dir.path(), SECTORS, seed)
    } else {
        make_cow_chunked(dir.path(), SECTORS, seed, chunk)
    };
    let opts = ServeOptions {
        num_queues: queues,
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect_with(FrontendOptions {
        num_queues: queues,
        ..fopts
    });
    assert_eq!(dev.config.capacity, SECTORS, "capacity");
    check_whole_disk(&mut dev, &model, "before any write");
    let mut rng = Rng::new(seed);
    exercise(&mut dev, &mut model, &mut rng);
    assert_eq!(dev.flush(0).ok("flush").len(), 0);
    check_whole_disk(&mut dev, &model, "after the writes");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

fn cow_round_trip_1_queue(peer: Peer) {
    round_trip(peer, 1, false, FrontendOptions::default());
}

fn cow_round_trip_4_queues(peer: Peer) {
    round_trip(peer, 4, false, FrontendOptions::default());
}

/// 4 KiB chunks: the 512-byte writes of the exercise need copy-ups.
fn cow_4k_chunks_round_trip_2_queues(peer: Peer) {
    round_trip_chunked(peer, 2, false, FrontendOptions::default(), 4096);
}

fn raw_round_trip_2_queues(peer: Peer) {
    round_trip(peer, 2, true, FrontendOptions::default());
}

/// The notification-suppression and memory-slot paths Linux and libblkio
/// use: EVENT_IDX, and memory given with ADD_MEM_REGION.
fn event_idx_and_add_mem_region(peer: Peer) {
    round_trip(
        peer,
        2,
        false,
        FrontendOptions {
            event_idx: true,
            add_mem_region: true,
            queue_size: 128,
            ..FrontendOptions::default()
        },
    );
}

fn config_space_and_features(peer: Peer) {
    let dir = tempdir();
    let (image, _) = make_cow(dir.path(), SECTORS, 1);
    for (queues, read_only) in [(3u16, false), (1, true)] {
        let opts = ServeOptions {
            num_queues: queues,
            read_only,
            ..ServeOptions::default()
        };
        let d = Daemon::start(peer, dir.path(), &image, &opts);
        let dev = d.connect();
        let c = &dev.config;
        assert_eq!(c.capacity, SECTORS);
        for (bit, name) in [
            (feature::VERSION_1, "VERSION_1"),
            (feature::BLK_FLUSH, "FLUSH"),
            (feature::BLK_SEG_MAX, "SEG_MAX"),
            (feature::BLK_DISCARD, "DISCARD"),
            (feature::BLK_WRITE_ZEROES, "WRITE_ZEROES"),
            (feature::BLK_MQ, "MQ"),
        ] {
            assert!(dev.has_feature(bit), "{name} not offered");
        }
        assert_eq!(dev.has_feature(feature::BLK_RO), read_only, "RO feature");
        assert_eq!(c.num_queues, queues, "config num_queues");
        assert!(
            dev.max_queues.unwrap() >= u64::from(queues),
            "GET_QUEUE_NUM"
        );
        assert!(c.seg_max >= 1, "seg_max {}", c.seg_max);
        if dev.has_feature(feature::BLK_BLK_SIZE) {
            assert_eq!(c.blk_size, 512, "blk_size");
        }
        assert!(c.max_discard_sectors > 0 && c.max_discard_seg > 0);
        assert!(c.max_write_zeroes_sectors > 0 && c.max_write_zeroes_seg > 0);
        // What real frontends need (docs/design.md, "Protocol facts"): QEMU wants CONFIG,
        // libblkio refuses to connect without MQ, REPLY_ACK and
        // CONFIGURE_MEM_SLOTS.
        let need = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        assert!(
            dev.offered_protocol.contains(need),
            "protocol features {:?}",
            dev.offered_protocol
        );
        if peer.is_ours() {
            // In-flight tracking is implemented (tests/e2e_inflight.rs).
            assert!(
                dev.offered_protocol
                    .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
                "INFLIGHT_SHMFD not offered"
            );
        }
        disconnect(dev);
        let st = d.terminate();
        assert!(st.status.success(), "{}", st.log);
    }
}

fn flush_completes(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 2);
    let d = Daemon::start(peer, dir.path(), &image, &ServeOptions::default());
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect();
    let c = dev.flush(0);
    assert_eq!(
        (c.status, c.used_len),
        (Some(S_OK), 1),
        "flush on a clean disk"
    );
    let data = vec![0x42u8; 8 * SECTOR];
    dev.write(0, 100, &data).ok("write");
    model.write(100, &data);
    let c = dev.flush(0);
    assert_eq!(
        (c.status, c.used_len),
        (Some(S_OK), 1),
        "flush after a write"
    );
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

fn discard(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 3);
    let d = Daemon::start(peer, dir.path(), &image, &ServeOptions::default());
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect();
    let written = vec![0x77u8; 64 * SECTOR];
    dev.write(0, 4000, &written).ok("write");
    model.write(4000, &written);
    // Two segments: one over COW-written sectors and backing, one over
    // backing only.
    let ranges = [(4032, 64, 0), (6000, 16, 0)];
    // Several segments per request where the device takes them (qsd: 1).
    for group in ranges.chunks(dev.config.max_discard_seg as usize) {
        let c = dev.discard(0, group);
        assert_eq!((c.status, c.used_len), (Some(S_OK), 1), "discard {group:?}");
    }
    model.discard(4032, 64);
    model.discard(6000, 16);
    // Whatever a discarded sector reads as, writing it again works.
    let again = vec![0x99u8; 8 * SECTOR];
    dev.write(0, 4040, &again).ok("write over discarded");
    model.write(4040, &again);
    check_whole_disk(&mut dev, &model, "after discard");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

/// With O_DIRECT, a COW file with 4 KiB chunks is offered as a disk with
/// 4 KiB logical blocks, so a guest's I/O covers whole chunks and stays
/// aligned. (A daemon option of ours: nothing to compare with qsd.)
fn direct_4k_chunks_offer_4k_blocks(peer: Peer) {
    if peer == Peer::Qsd {
        return;
    }
    let dir = tempdir();
    let (image, mut model) = make_cow_chunked(dir.path(), SECTORS, 11, 4096);
    let opts = ServeOptions {
        extra_args: vec!["--direct".into()],
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect();
    assert_eq!(dev.config.blk_size, 4096, "blk_size");
    let data: Vec<u8> = (0..8 * SECTOR)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    dev.write(0, 16, &data).ok("aligned 4 KiB write");
    model.write(16, &data);
    check_whole_disk(&mut dev, &model, "after a 4 KiB write");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

fn write_zeroes_reads_zeros_over_backing(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 4);
    let d = Daemon::start(peer, dir.path(), &image, &ServeOptions::default());
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect();
    assert!(model.data[5000 * SECTOR..5001 * SECTOR]
        .iter()
        .any(|&b| b != 0));
    let written = vec![0x31u8; 32 * SECTOR];
    dev.write(0, 5100, &written).ok("write");
    model.write(5100, &written);
    for (ranges, unmap) in [
        (vec![(5000u64, 40u32)], false),
        (vec![(5090, 20), (6000, 3)], true),
        (vec![(SECTORS - 2, 2)], false),
    ] {
        for group in ranges.chunks(dev.config.max_write_zeroes_seg as usize) {
            let c = dev.write_zeroes(0, group, unmap);
            assert_eq!(
                (c.status, c.used_len),
                (Some(S_OK), 1),
                "write zeroes {group:?} unmap={unmap}"
            );
        }
        for &(s, n) in &ranges {
            model.zero(s, n);
            let got = dev.read(0, s, n as usize * SECTOR).ok("read");
            assert!(
                got.iter().all(|&b| b == 0),
                "{ranges:?}: not zero after write zeroes"
            );
        }
    }
    check_whole_disk(&mut dev, &model, "after write zeroes");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

fn get_id_returns_serial(peer: Peer) {
    let dir = tempdir();
    let (image, _) = make_cow(dir.path(), SECTORS, 5);
    let opts = ServeOptions {
        serial: Some("vuc-e2e-serial-7".into()),
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let serial = d.expected_serial();
    let mut dev = d.connect();
    let c = dev.get_id(0, ID_BYTES);
    assert_eq!(c.status, Some(S_OK), "GET_ID");
    let end = c.data.iter().position(|&b| b == 0).unwrap_or(c.data.len());
    assert_eq!(
        String::from_utf8_lossy(&c.data[..end]),
        String::from_utf8_lossy(&serial),
        "serial"
    );
    assert!(c.data[end..].iter().all(|&b| b == 0), "bytes after the NUL");
    // Ours reports the whole 20-byte buffer plus the status as written.
    if peer.is_ours() {
        assert_eq!(c.used_len, ID_BYTES + 1, "GET_ID used length");
    }
    // A 1-byte buffer gets the first byte of the serial.
    let c = dev.get_id(0, 1);
    assert_eq!(c.status, Some(S_OK), "GET_ID into 1 byte");
    assert_eq!(c.data, serial[..1].to_vec());
    assert_eq!(c.used_len, 2, "GET_ID into 1 byte: used length");
    disconnect(dev);
}

fn read_only_refuses_writes(peer: Peer) {
    let dir = tempdir();
    let (image, model) = make_cow(dir.path(), SECTORS, 6);
    let opts = ServeOptions {
        read_only: true,
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let files: Vec<PathBuf> = [d.writable_files(), d.read_only_files()].concat();
    let before = snapshot(&files);
    let mut dev = d.connect();
    assert!(dev.has_feature(feature::BLK_RO), "RO not offered");
    // virtio 1.2 §5.2.6.2: IOERR for a write to a VIRTIO_BLK_F_RO device,
    // and no data written. Discard and write zeroes write too.
    let c = dev.write(0, 10, &[0xab; 4 * SECTOR]);
    assert_eq!((c.status, c.used_len), (Some(S_IOERR), 1), "write");
    let c = dev.write_zeroes(0, &[(3000, 8)], false);
    assert_eq!(c.status, Some(S_IOERR), "write zeroes");
    let c = dev.discard(0, &[(3000, 8, 0)]);
    assert_eq!(c.status, Some(S_IOERR), "discard");
    check_whole_disk(&mut dev, &model, "read-only disk");
    disconnect(dev);
    let st = d.terminate();
    assert!(st.status.success(), "{}", st.log);
    assert!(
        snapshot(&files) == before,
        "a read-only disk's files changed"
    );
}

fn second_connection_sees_first_ones_data(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 7);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let ro_before = snapshot(&d.read_only_files());
    let mut rng = Rng::new(77);
    let mut dev = d.connect();
    let data = rng.bytes(40 * SECTOR);
    dev.write(1, 2048, &data).ok("first connection: write");
    model.write(2048, &data);
    disconnect(dev);
    // A frontend that just goes away without stopping the rings.
    let mut dev = d.connect();
    let data = rng.bytes(8 * SECTOR);
    dev.write(0, 7000, &data).ok("second connection: write");
    model.write(7000, &data);
    drop(dev);
    // The third sees both, on fewer queues than offered.
    let mut dev = d.connect_with(FrontendOptions::default());
    check_whole_disk(&mut dev, &model, "third connection");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

fn sigterm_exits_cleanly(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 8);
    let d = Daemon::start(peer, dir.path(), &image, &ServeOptions::default());
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect();
    let data = vec![0x5au8; 16 * SECTOR];
    dev.write(0, 1234, &data).ok("write");
    model.write(1234, &data);
    // SIGTERM while a frontend is still connected.
    let st = finish(d, &model, dir.path(), &ro_before);
    drop(dev);
    drop(st);
}

/// The pattern `blkio-rw` writes: a byte per disk offset. Must match
/// `pattern` in load/src/bin/blkio-rw.rs.
fn blkio_pattern(seed: u64, offset: u64) -> u8 {
    ((offset ^ (offset >> 9) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// The libblkio client runs a few MiB of I/O: seconds even unoptimised.
/// It gives up by itself when the daemon completes nothing for 10 s; this
/// bounds everything else (a daemon that hangs in the handshake).
const BLKIO_RW_TIMEOUT: Duration = Duration::from_secs(60);

/// `blkio-rw`, built from the current sources. Under `FORK` like every
/// spawn here (the build runs cargo; and so that `FORK` is always taken
/// before the build's once-lock, never the other way round).
fn blkio_rw() -> PathBuf {
    let _g = common::fork_guard();
    clients::client_bin("blkio-rw")
}

/// The test runs the `blkio-rw` of the current sources, never one left in
/// the target directory by an earlier build: it would go on testing the
/// daemon with an old client after the client changed.
#[test]
fn blkio_client_is_built_from_current_sources() {
    let bin = blkio_rw();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("load/src/bin/blkio-rw.rs");
    clients::assert_built_from(&bin, &src);
}

/// libblkio's virtio-blk-vhost-user driver, an independent frontend, in
/// its own process: it writes, flushes, reads back and verifies on every
/// queue; then our frontend sees its data.
fn blkio_client_in_another_process(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 9);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let ro_before = snapshot(&d.read_only_files());
    let (seed, start, sectors) = (0xb10c_u64, 1000u64, 2048u64);
    let bin = blkio_rw();
    let child = {
        let _g = common::fork_guard();
        Command::new(bin)
            .arg(d.socket())
            .arg("2")
            .arg(start.to_string())
            .arg(sectors.to_string())
            .arg(seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn blkio-rw")
    };
    let o = clients::wait_output(child, BLKIO_RW_TIMEOUT, "blkio-rw")
        .unwrap_or_else(|e| panic!("{e}\ndaemon:\n{}", d.log_text()));
    assert!(
        o.status.success(),
        "blkio-rw failed ({}):\n{}{}\ndaemon:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        d.log_text()
    );
    let data: Vec<u8> = (start * 512..(start + sectors) * 512)
        .map(|off| blkio_pattern(seed, off))
        .collect();
    model.write(start, &data);
    // blkio-rw zeroes its last 64 sectors with write-zeroes.
    model.zero(start + sectors - 64, 64);
    let mut dev = d.connect();
    check_whole_disk(&mut dev, &model, "after libblkio");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}

/// The frontend options of a cloud-hypervisor guest (`cloud_hypervisor.rs`
/// in the test frontend): Linux acks EVENT_IDX.
fn cloud_hypervisor(queues: u16) -> FrontendOptions {
    FrontendOptions {
        num_queues: queues,
        cloud_hypervisor: true,
        event_idx: true,
        ..FrontendOptions::default()
    }
}

fn cloud_hypervisor_cow_round_trip_2_queues(peer: Peer) {
    round_trip(peer, 2, false, cloud_hypervisor(2));
}

fn cloud_hypervisor_raw_round_trip_1_queue(peer: Peer) {
    round_trip(peer, 1, true, cloud_hypervisor(1));
}

/// What cloud-hypervisor asks for and the order it asks in, as the
/// backend answered it.
fn cloud_hypervisor_negotiation(peer: Peer) {
    use common::vhost_frontend::cloud_hypervisor::{offered_features, offered_protocol_features};
    let dir = tempdir();
    let (image, _) = make_cow(dir.path(), SECTORS, 11);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let dev = d.connect_with(cloud_hypervisor(2));
    assert_eq!(dev.config.capacity, SECTORS);
    assert_eq!(dev.config.num_queues, 2, "config num_queues");
    for (bit, name) in [
        (feature::VERSION_1, "VERSION_1"),
        (feature::BLK_FLUSH, "FLUSH"),
        (feature::BLK_MQ, "MQ"),
        (feature::EVENT_IDX, "EVENT_IDX"),
    ] {
        assert!(dev.has_feature(bit), "{name} not negotiated");
    }
    assert_eq!(
        dev.features & !offered_features(2),
        0,
        "acked beyond CH's offer"
    );
    let need = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(dev.protocol.contains(need), "{:?}", dev.protocol);
    assert_eq!(
        dev.protocol,
        dev.offered_protocol & offered_protocol_features()
    );
    let inflight = dev
        .offered_protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    let mut want: Vec<&str> = vec![
        "SET_OWNER",
        "GET_FEATURES",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "GET_CONFIG",
        "SET_FEATURES",
        "SET_MEM_TABLE",
        "SET_VRING_NUM",
        "SET_VRING_NUM",
    ];
    if inflight {
        want.extend(["GET_INFLIGHT_FD", "SET_INFLIGHT_FD"]);
    }
    for _ in 0..2 {
        want.extend([
            "SET_VRING_ADDR",
            "SET_VRING_BASE",
            "SET_VRING_CALL",
            "SET_VRING_KICK",
        ]);
    }
    want.extend(["SET_VRING_ENABLE", "SET_VRING_ENABLE"]);
    assert_eq!(
        dev.ch_sent(),
        want,
        "message sequence (INFLIGHT_SHMFD offered: {inflight})"
    );
    disconnect(dev);
    let st = d.terminate();
    assert!(st.status.success(), "{}", st.log);
}

/// Pause/resume (the rings disabled and enabled again) and a device reset
/// (GET_VRING_BASE, the rings reset by the guest, a new activation), with
/// I/O before, between and after, compared with the model.
fn cloud_hypervisor_rings_stopped_and_restarted(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 12);
    let opts = ServeOptions {
        num_queues: 2,
        ..ServeOptions::default()
    };
    let d = Daemon::start(peer, dir.path(), &image, &opts);
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect_with(cloud_hypervisor(2));
    let mut rng = Rng::new(12);
    exercise(&mut dev, &mut model, &mut rng);

    dev.ch_pause().expect("pause");
    dev.ch_resume().expect("resume");
    let data = rng.bytes(24 * SECTOR);
    dev.write(1, 4000, &data).ok("write after resume");
    model.write(4000, &data);
    check_whole_disk(&mut dev, &model, "after pause and resume");

    let want = dev.avail_indices();
    assert_eq!(
        dev.ch_reset().expect("reset"),
        want,
        "GET_VRING_BASE at reset"
    );
    dev.ch_reactivate().expect("activate again");
    assert_eq!(dev.avail_indices(), [0, 0], "the guest's rings start over");
    exercise(&mut dev, &mut model, &mut rng);
    check_whole_disk(&mut dev, &model, "after the device reset");
    let want = dev.avail_indices();
    assert_eq!(
        dev.ch_reset().expect("reset"),
        want,
        "GET_VRING_BASE at the end"
    );
    drop(dev);
    finish(d, &model, dir.path(), &ro_before);
}

/// Memory hot-plugged with ADD_MEM_REGION carries request buffers; after
/// a device reset the whole memory goes in one SET_MEM_TABLE.
fn cloud_hypervisor_hotplugged_memory(peer: Peer) {
    let dir = tempdir();
    let (image, mut model) = make_cow(dir.path(), SECTORS, 13);
    let d = Daemon::start(peer, dir.path(), &image, &ServeOptions::default());
    let ro_before = snapshot(&d.read_only_files());
    let mut dev = d.connect_with(FrontendOptions {
        extra_regions: vec![(1 << 30, 4 << 20)],
        ..cloud_hypervisor(1)
    });
    let (start, _) = dev.ch_hotplug_memory().expect("hot-plug");
    assert_eq!(dev.ch_sent().last().unwrap(), "ADD_MEM_REGION");
    let mut rng = Rng::new(13);
    let mut write_and_read = |dev: &mut VhostUserBlk, sector: u64, what: &str| {
        let data = rng.bytes(16 * SECTOR);
        dev.mem().write(start, &data);
        let p = dev
            .chain()
            .header(T_OUT, sector)
            .desc(start, 16 * 512, false)
            .status()
            .submit(0);
        dev.complete(p, what).ok(what);
        model.write(sector, &data);
        let back = start + (1 << 20);
        dev.mem().fill(back, data.len(), 0);
        let p = dev
            .chain()
            .header(T_IN, sector)
            .desc(back, 16 * 512, true)
            .status()
            .submit(0);
        dev.complete(p, what).ok(what);
        model.check(sector, &dev.mem().read_vec(back, data.len()), what);
    };
    write_and_read(&mut dev, 300, "buffers in hot-plugged memory");
    dev.ch_reset().expect("reset");
    dev.ch_reactivate().expect("activate again");
    write_and_read(&mut dev, 5000, "hot-plugged memory after a reset");
    check_whole_disk(&mut dev, &model, "the whole disk");
    disconnect(dev);
    finish(d, &model, dir.path(), &ro_before);
}
