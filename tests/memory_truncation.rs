//! A frontend that truncates its guest-memory file after handing it over:
//! the daemon's next access to a page past the new end would raise SIGBUS.
//! The truncation must cost the frontend its connection, not the daemon
//! its life (docs/design.md, "Trust model").

mod common;

use common::daemon::{Daemon, Image, Peer, ServeOptions};

#[test]
fn truncated_guest_memory_ends_the_connection_not_the_daemon() {
    let dir = tempfile::Builder::new()
        .prefix("vuc-trunc-")
        .tempdir()
        .unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let mut d = Daemon::start(
        Peer::Ours,
        dir.path(),
        &Image::Raw(disk.clone()),
        &ServeOptions::default(),
    );
    let mut dev = d.connect();
    dev.write(0, 0, &[1u8; 512])
        .ok("a write before the truncation");
    dev.read_over_truncated_memory();
    std::mem::forget(dev); // its mapping is partly gone: do not touch it again
    assert!(d.running(), "the daemon died:\n{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("truncated a guest memory file"),
        "no log line about the truncation:\n{log}"
    );
    // The next connection is served.
    let mut dev = d.connect();
    assert_eq!(
        dev.read(0, 0, 512).ok("read after reconnecting"),
        vec![1u8; 512]
    );
    drop(dev);
    let st = d.terminate();
    assert!(st.status.success(), "{}\n{}", st.status, st.log);
}
