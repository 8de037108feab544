//! The command-line tools against the built binary, and against UML's own
//! `uml_mkcow` and `uml_moo` where they do the same job.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use vhost_user_cow::format::{Disk, DiskOptions};
use vhost_user_cow::units::to_usize;

fn run_in(cwd: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(bin());
    c.current_dir(cwd).env_remove("RUST_LOG");
    for a in args {
        c.arg(a);
    }
    output(&mut c)
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    run_in(Path::new("/"), args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "failed ({:?}): {}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

fn tool(path: &Path, args: &[&dyn AsRef<std::ffi::OsStr>], cwd: &Path) {
    let mut c = Command::new(path);
    c.current_dir(cwd);
    for a in args {
        c.arg(a);
    }
    let o = output(&mut c);
    assert!(
        o.status.success(),
        "{} failed: {}{}",
        path.display(),
        stdout(&o),
        stderr(&o)
    );
}

/// The bytes up to the data offset (header + bitmap + padding) and length.
fn head_and_len(path: &Path) -> (Vec<u8>, u64) {
    let data = std::fs::read(path).unwrap();
    let len = data.len() as u64;
    let h = vhost_user_cow::format::open::read_header(&std::fs::File::open(path).unwrap(), path)
        .unwrap();
    let off = to_usize(h.geometry(path).unwrap().data_offset);
    (data[..off].to_vec(), len)
}

fn random_backing(path: &Path, size: usize, rng: &mut Rng) -> u32 {
    // Random first half, zeros after: merges must leave holes there.
    let mut data = rng.bytes(size);
    data[size / 2..].fill(0);
    write_file(path, &data)
}

/// Writes `n` random runs of random sectors through the library.
fn random_writes(cow: &Path, n: usize, rng: &mut Rng) {
    let _g = fork_guard();
    let mut d = Disk::open(cow, &DiskOptions::default()).unwrap();
    let sectors = d.sectors();
    for _ in 0..n {
        let count = 1 + rng.below(64).min(sectors - 1);
        let start = rng.below(sectors - count + 1);
        let mut buf = rng.bytes(to_usize(count * 512));
        // Some all-zero COW data, which must still win over the backing.
        if rng.below(8) == 0 {
            buf.fill(0);
        }
        d.write_sectors(start, &buf).unwrap();
    }
    d.sync().unwrap();
}

/// Every sector as our mapping reads it.
fn read_all(cow: &Path) -> Vec<u8> {
    let _g = fork_guard();
    let d = Disk::open(
        cow,
        &DiskOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; to_usize(d.size)];
    d.read_sectors(0, &mut buf).unwrap();
    buf
}

#[test]
fn create_matches_uml_mkcow() {
    let Some(mkcow) = uml_tool("uml_mkcow") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng::new(1);
    for (name, size) in [
        ("odd.img", 3_000_000usize),
        ("even.img", 4 << 20),
        ("tiny.img", 1),
    ] {
        let backing = d.join(name);
        write_file(&backing, &rng.bytes(size));
        let ours = d.join(format!("{name}.ours.cow"));
        let theirs = d.join(format!("{name}.uml.cow"));
        ok(run(&[&"create", &ours, &"--backing", &backing]));
        tool(&mkcow, &[&theirs, &backing], d);
        assert_eq!(head_and_len(&ours), head_and_len(&theirs), "{name}");
        // Sparse: only the header page is allocated.
        assert!(std::fs::metadata(&ours).unwrap().blocks() * 512 <= 16384);
    }
}

#[test]
fn create_matches_uml_mkcow_for_symlinks_and_relative_paths() {
    let Some(mkcow) = uml_tool("uml_mkcow") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let real = d.join("images");
    std::fs::create_dir(&real).unwrap();
    write_file(&real.join("base.img"), &vec![7u8; 1 << 20]);
    // A symlink to the image is recorded as the link (its name kept), a
    // symlinked directory as its target.
    std::os::unix::fs::symlink("base.img", real.join("link.img")).unwrap();
    std::os::unix::fs::symlink(&real, d.join("dirlink")).unwrap();
    std::fs::create_dir(d.join("elsewhere")).unwrap();
    let cases: [(&str, &Path); 4] = [
        ("images/link.img", d),
        ("dirlink/base.img", d),
        ("../images/base.img", &d.join("elsewhere")),
        ("base.img", &real),
    ];
    for (i, (backing, cwd)) in cases.iter().enumerate() {
        let ours = d.join(format!("{i}.ours.cow"));
        let theirs = d.join(format!("{i}.uml.cow"));
        ok(run_in(cwd, &[&"create", &ours, &"--backing", backing]));
        tool(&mkcow, &[&theirs, backing], cwd);
        assert_eq!(head_and_len(&ours), head_and_len(&theirs), "{backing}");
    }
}

#[test]
fn create_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = d.join("base.img");
    write_file(&backing, &vec![1u8; 65536]);
    let cow = d.join("disk.cow");
    std::fs::write(&cow, b"precious").unwrap();
    let o = run(&[&"create", &cow, &"--backing", &backing]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("vhost-user-cow: "), "{e}");
    assert!(e.contains(&cow.display().to_string()) && e.contains("already exists"));
    assert_eq!(std::fs::read(&cow).unwrap(), b"precious");
    ok(run(&[&"create", &cow, &"--backing", &backing, &"--force"]));
    assert_eq!(std::fs::metadata(&cow).unwrap().len(), 12288 + 65536);
    // Non-default geometry.
    let big = d.join("big.cow");
    ok(run(&[
        &"create",
        &big,
        &"--backing",
        &backing,
        &"--sector-size",
        &"4096",
        &"--alignment",
        &"65536",
    ]));
    let j = info_json(&big);
    assert_eq!(j["sector_size"], 4096);
    assert_eq!(j["alignment"], 65536);
    assert_eq!(j["bitmap_offset"], 65536);
    assert_eq!(j["data_offset"], 131072);
    let o = run(&[
        &"create",
        &d.join("x.cow"),
        &"--backing",
        &backing,
        &"--sector-size",
        &"1000",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid sector size 1000"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("x.cow").exists());
}

fn info_json(path: &Path) -> serde_json::Value {
    let o = ok(run(&[&"info", &"--json", &path]));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn info_reports_layout_allocation_and_backing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = d.join("base.img");
    write_file(&backing, &vec![0u8; 4 << 20]);
    let cow = d.join("disk.cow");
    ok(run(&[&"create", &cow, &"--backing", &backing]));
    {
        let _g = fork_guard();
        let mut disk = Disk::open(&cow, &DiskOptions::default()).unwrap();
        disk.write_sectors(10, &vec![1u8; 512 * 20]).unwrap();
        disk.write_sectors(8191, &[2u8; 512]).unwrap();
    }
    let j = info_json(&cow);
    assert_eq!(j["format"], "cow");
    assert_eq!(j["version"], 3);
    assert_eq!(j["layout"], "v3");
    assert_eq!(j["virtual_size"], 4 << 20);
    assert_eq!(j["sector_size"], 512);
    assert_eq!(j["alignment"], 4096);
    assert_eq!(j["bitmap_offset"], 8192);
    assert_eq!(j["bitmap_len"], 1024);
    assert_eq!(j["data_offset"], 12288);
    assert_eq!(j["file_size"], 12288 + (4 << 20));
    assert_eq!(j["chunks"], 8192);
    assert_eq!(j["allocated_chunks"], 21);
    assert_eq!(j["allocated_sectors"], 21);
    assert_eq!(j["allocated_bytes"], 21 * 512);
    let pct = j["allocated_percent"].as_f64().unwrap();
    assert!((pct - 21.0 * 100.0 / 8192.0).abs() < 1e-9);
    assert!(j["host_bytes"].as_u64().unwrap() >= 4096);
    let b = &j["backing"];
    assert_eq!(b["path"], backing.display().to_string());
    assert_eq!(b["header_path"], backing.display().to_string());
    assert_eq!(b["exists"], true);
    assert_eq!(b["size_matches"], true);
    assert_eq!(b["mtime_matches"], true);
    assert_eq!(b["matches"], true);
    assert_eq!(b["recorded_mtime"], 1_600_000_000u32);

    // A changed backing file is reported, not refused.
    set_mtime(&backing, 1_700_000_000);
    let j = info_json(&cow);
    let b = &j["backing"];
    assert_eq!(b["mtime_matches"], false);
    assert_eq!(b["recorded_mtime"], 1_600_000_000u32);
    assert_eq!(b["actual_mtime"], 1_700_000_000u32);
    assert_eq!(b["matches"], false);
    let text = stdout(&ok(run(&[&"info", &cow])));
    assert!(
        text.contains("MISMATCH") && text.contains("1700000000"),
        "{text}"
    );

    // So is a missing one; --backing points elsewhere.
    let moved = d.join("moved.img");
    std::fs::rename(&backing, &moved).unwrap();
    let b = info_json(&cow)["backing"].clone();
    assert_eq!(b["exists"], false);
    assert_eq!(b["matches"], false);
    assert!(b["error"].as_str().unwrap().contains("No such file"));
    set_mtime(&moved, 1_600_000_000);
    let o = ok(run(&[&"info", &"--json", &cow, &"--backing", &moved]));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["backing"]["path"], moved.display().to_string());
    assert_eq!(j["backing"]["overridden"], true);
    assert_eq!(j["backing"]["matches"], true);

    // A raw image.
    let j = info_json(&moved);
    assert_eq!(j["format"], "raw");
    assert_eq!(j["size"], 4 << 20);
    assert!(j["host_bytes"].is_u64());
}

fn check_code(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String) {
    let o = run(args);
    (o.status.code().unwrap(), stdout(&o) + &stderr(&o))
}

#[test]
fn check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = d.join("base.img");
    write_file(&backing, &vec![9u8; 1 << 20]);
    let cow = d.join("disk.cow");
    ok(run(&[&"create", &cow, &"--backing", &backing]));
    {
        let _g = fork_guard();
        let mut disk = Disk::open(&cow, &DiskOptions::default()).unwrap();
        disk.write_sectors(2000, &vec![1u8; 512 * 8]).unwrap();
    }
    assert_eq!(check_code(&[&"check", &cow]).0, 0);
    let (code, _) = check_code(&[&"check", &backing]);
    assert_eq!(code, 0, "a raw image is clean");

    // Backing changed: the COW file is fine, the pairing is not → 1.
    set_mtime(&backing, 1_600_000_005);
    let (code, out) = check_code(&[&"check", &cow]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("mtime 1600000005") && out.contains("1600000000"),
        "{out}"
    );
    set_mtime(&backing, 1_600_000_000);

    // Backing missing → 1, and fine again with --backing.
    let moved = d.join("moved.img");
    std::fs::rename(&backing, &moved).unwrap();
    let (code, out) = check_code(&[&"check", &cow]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&backing.display().to_string()), "{out}");
    assert_eq!(check_code(&[&"check", &cow, &"--backing", &moved]).0, 0);
    std::fs::rename(&moved, &backing).unwrap();

    // Stray bits past the last chunk (2048 chunks: bitmap bytes 0..256).
    let stray = d.join("stray.cow");
    std::fs::copy(&cow, &stray).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&stray)
            .unwrap();
        f.write_all_at(&[0x80], 8192 + 300).unwrap();
    }
    let (code, out) = check_code(&[&"check", &stray]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("beyond the last chunk"), "{out}");

    // Shorter than data_offset + size but past its data → 1, one line;
    // cutting into allocated data → 1 and says the data is lost.
    let short = d.join("short.cow");
    std::fs::copy(&cow, &short).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap();
    f.set_len(12288 + 2008 * 512).unwrap();
    let (code, out) = check_code(&[&"check", &short]);
    assert_eq!((code, out.lines().count()), (1, 1), "{out}");
    assert!(out.contains("shorter than data offset + size"), "{out}");
    f.set_len(12288 + 2004 * 512).unwrap();
    let (code, out) = check_code(&[&"check", &short]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("4 allocated chunks"), "{out}");

    // Truncated header → 2.
    f.set_len(1000).unwrap();
    let (code, out) = check_code(&[&"check", &short]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("truncated") && out.contains(&short.display().to_string()));
    // Cannot open → 2.
    assert_eq!(check_code(&[&"check", &d.join("nope.cow")]).0, 2);
}

/// A COW disk over a random backing file, with random writes.
fn setup_written(d: &Path, size: usize, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut rng = Rng::new(seed);
    let backing = d.join("base.img");
    random_backing(&backing, size, &mut rng);
    let cow = d.join("disk.cow");
    ok(run(&[&"create", &cow, &"--backing", &backing]));
    random_writes(&cow, 300, &mut rng);
    (backing, cow)
}

#[test]
fn merge_into_matches_uml_moo_and_the_mapping() {
    let Some(moo) = uml_tool("uml_moo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, cow) = setup_written(d, 4 << 20, 42);
    let ours = d.join("ours.img");
    let theirs = d.join("theirs.img");
    ok(run(&[&"merge", &cow, &"--into", &ours]));
    tool(&moo, &[&cow, &theirs], d);
    let ours_data = std::fs::read(&ours).unwrap();
    assert_eq!(ours_data.len(), 4 << 20);
    assert!(
        ours_data == std::fs::read(&theirs).unwrap(),
        "differs from uml_moo"
    );
    assert!(ours_data == read_all(&cow), "differs from the mapping");
    // The zero half of the backing file became holes (writes may have
    // dirtied up to 300 * 64 sectors of it).
    let used = std::fs::metadata(&ours).unwrap().blocks() * 512;
    assert!(
        used < (2 << 20) + 300 * 64 * 512 + 65536,
        "not sparse: {used}"
    );
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn merge_in_place_matches_uml_moo_d() {
    let Some(moo) = uml_tool("uml_moo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let (backing, cow) = setup_written(&a, 4 << 20, 7);
    let expected = read_all(&cow);
    // Copies for uml_moo, pointed at its own backing copy with -b.
    std::fs::copy(&backing, b.join("base.img")).unwrap();
    set_mtime(&b.join("base.img"), 1_600_000_000);
    std::fs::copy(&cow, b.join("disk.cow")).unwrap();

    ok(run(&[&"merge", &cow, &"--in-place"]));
    // uml_moo wants -d before -b (with "-b X -d COW" it fails to open COW).
    tool(
        &moo,
        &[&"-d", &"-b", &b.join("base.img"), &b.join("disk.cow")],
        &b,
    );
    let merged = std::fs::read(&backing).unwrap();
    assert!(
        merged == expected,
        "in-place result differs from the mapping"
    );
    assert!(
        merged == std::fs::read(b.join("base.img")).unwrap(),
        "differs from uml_moo -d"
    );
}

#[test]
fn merge_with_backing_override_matches_uml_moo_b() {
    let Some(moo) = uml_tool("uml_moo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (backing, cow) = setup_written(d, 2 << 20, 99);
    let expected = read_all(&cow);
    // As if the COW file came out of a chroot: the header's path is gone.
    let moved = d.join("moved.img");
    std::fs::rename(&backing, &moved).unwrap();
    let ours = d.join("ours.img");
    let o = run(&[&"merge", &cow, &"--into", &ours]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&backing.display().to_string()));
    assert!(!ours.exists());
    ok(run(&[
        &"merge",
        &cow,
        &"--into",
        &ours,
        &"--backing",
        &moved,
    ]));
    let theirs = d.join("theirs.img");
    tool(&moo, &[&"-b", &moved, &cow, &theirs], d);
    let data = std::fs::read(&ours).unwrap();
    assert!(data == expected);
    assert!(data == std::fs::read(&theirs).unwrap());
    // The read-only merge did not rewrite the header's backing name.
    let j = info_json(&cow);
    assert_eq!(j["backing"]["header_path"], backing.display().to_string());
}

/// The one deliberate difference from uml_moo: a backing file whose size
/// is not a multiple of 512 keeps its partial last sector (uml_moo writes
/// only the whole sectors).
#[test]
fn merge_keeps_partial_last_sector_unlike_uml_moo() {
    let Some(moo) = uml_tool("uml_moo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (1 << 20) + 300;
    let (backing, cow) = setup_written(d, size, 5);
    {
        // Make sure the partial sector itself is in the COW file too.
        let _g = fork_guard();
        let mut disk = Disk::open(&cow, &DiskOptions::default()).unwrap();
        let last = disk.sectors() - 1;
        disk.write_sectors(last, &[0xabu8; 512]).unwrap();
    }
    let expected = read_all(&cow);
    let ours = d.join("ours.img");
    let theirs = d.join("theirs.img");
    ok(run(&[&"merge", &cow, &"--into", &ours]));
    tool(&moo, &[&cow, &theirs], d);
    let ours_data = std::fs::read(&ours).unwrap();
    let theirs_data = std::fs::read(&theirs).unwrap();
    assert_eq!(ours_data.len(), size);
    assert_eq!(theirs_data.len(), size / 512 * 512);
    assert!(ours_data[..theirs_data.len()] == theirs_data[..]);
    assert!(ours_data[..] == expected[..size]);
    assert_eq!(&ours_data[size - 300..], &[0xab; 300][..]);

    // In place: the backing file keeps its length.
    ok(run(&[&"merge", &cow, &"--in-place"]));
    let merged = std::fs::read(&backing).unwrap();
    assert!(merged == ours_data);
}

#[test]
fn merge_refuses_to_clobber() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (backing, cow) = setup_written(d, 1 << 20, 3);
    let cow_before = snapshot(&cow);
    let backing_before = snapshot(&backing);
    let out = d.join("out.img");
    std::fs::write(&out, b"keep").unwrap();
    let o = run(&[&"merge", &cow, &"--into", &out]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    ok(run(&[&"merge", &cow, &"--into", &out, &"--force"]));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 20);
    for target in [&cow, &backing] {
        let o = run(&[&"merge", &cow, &"--into", target, &"--force"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("choose another output file"),
            "{}",
            stderr(&o)
        );
    }
    // Neither or both targets: a usage error.
    assert_eq!(run(&[&"merge", &cow]).status.code(), Some(2));
    assert_eq!(
        run(&[&"merge", &cow, &"--in-place", &"--into", &out])
            .status
            .code(),
        Some(2)
    );
    // A raw image has nothing to merge.
    let o = run(&[&"merge", &out, &"--into", &d.join("x.img")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("raw image"));
    assert_eq!(snapshot(&cow), cow_before);
    assert_eq!(snapshot(&backing), backing_before);

    // A COW disk in use (write-locked by this process) is not merged.
    let held = Disk::open(&cow, &DiskOptions::default()).unwrap();
    let o = run(&[&"merge", &cow, &"--in-place"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("in use by process {}", std::process::id())),
        "{e}"
    );
    drop(held);
    assert_eq!(snapshot(&backing), backing_before);
}

#[test]
fn bad_inputs_through_the_tools() {
    let root = tempfile::tempdir().unwrap();
    for case in bad_cases(root.path()) {
        let name = case.name;
        let cow_name = case.cow.display().to_string();
        let before = snapshot_any(&case.cow);
        let backing_before = case.backing.as_ref().map(|b| snapshot(b));
        let out = case.cow.with_file_name("merged.img");

        let raw = case.via == Via::Header;
        let (code, text) = check_code(&[&"check", &case.cow]);
        let want = match (raw, case.blame) {
            (true, _) => 0,
            (false, Blame::Cow) => 2,
            (false, Blame::Backing) => 1,
        };
        assert_eq!(code, want, "{name}: check: {text}");
        assert!(text.contains(&cow_name), "{name}: {text}");

        let o = run(&[&"info", &case.cow]);
        let want = if raw || case.blame == Blame::Backing {
            0
        } else {
            1
        };
        assert_eq!(o.status.code(), Some(want), "{name}: info: {}", stderr(&o));

        for args in [
            vec!["merge", "--in-place"],
            vec!["merge", "--into", out.to_str().unwrap()],
        ] {
            let mut c = Command::new(bin());
            c.args(&args).arg(&case.cow);
            let o = output(&mut c);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{name}: {args:?}: {e}");
            assert!(e.starts_with("vhost-user-cow: "), "{name}: {e}");
            assert!(e.contains(&cow_name), "{name}: {e}");
            assert!(!out.exists(), "{name}: output created");
        }
        for o in [stderr(&run(&[&"info", &case.cow])), text] {
            assert!(!o.contains("panicked"), "{name}: {o}");
        }
        assert_eq!(snapshot_any(&case.cow), before, "{name}: COW file changed");
        if let (Some(b), Some(s)) = (&case.backing, backing_before) {
            assert_eq!(snapshot(b), s, "{name}: backing file changed");
        }
        // Nothing else appeared next to the file (no temporaries).
        let dir = case.cow.parent().unwrap();
        let n = std::fs::read_dir(dir).unwrap().count();
        let expected = 1 + usize::from(std::fs::symlink_metadata(dir.join("base.img")).is_ok());
        assert_eq!(n, expected, "{name}: stray files");
    }
}

/// A backing file name with control characters (a header can hold any
/// bytes) is printed escaped by every tool: raw, an escape sequence
/// would reach the user's terminal.
#[test]
fn control_characters_in_the_backing_name_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base\u{1b}[2J\nforged line.img");
    std::fs::write(&base, vec![0u8; 1 << 16]).unwrap();
    let cow = dir.path().join("disk.cow");
    let o = run(&[&"create", &cow, &"--backing", &base]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown = |o: &Output| {
        let all = [o.stdout.clone(), o.stderr.clone()].concat();
        assert!(
            !all.contains(&0x1b) && !String::from_utf8_lossy(&all).contains("\nforged"),
            "raw control characters printed:\n{}",
            String::from_utf8_lossy(&all)
        );
        String::from_utf8_lossy(&all).into_owned()
    };
    let info = shown(&run(&[&"info", &cow]));
    assert!(info.contains("base\\u{1b}[2J\\nforged line.img"), "{info}");
    // Changed backing file: check and the open path's error name it too.
    common::set_mtime(&base, 1_000_000);
    let check = shown(&run(&[&"check", &cow]));
    assert!(check.contains("\\u{1b}"), "{check}");
    let merged = dir.path().join("merged.img");
    let merge = shown(&run(&[&"merge", &cow, &"--into", &merged]));
    assert!(
        merge.contains("\\u{1b}") && merge.contains("mtime"),
        "{merge}"
    );
}

#[test]
fn a_changed_mtime_names_the_way_out_and_rebase_unsafe_takes_it() {
    let Some(moo) = uml_tool("uml_moo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (backing, cow) = setup_written(d, 2 << 20, 5);
    let expected = read_all(&cow);
    set_mtime(&backing, 1_700_000_000);

    // Every tool says what to do.
    let hint = format!(
        "vhost-user-cow rebase {} --backing {} --unsafe",
        cow.display(),
        backing.display()
    );
    let (code, out) = check_code(&[&"check", &cow]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&hint), "check: {out}");
    let out = stdout(&ok(run(&[&"info", &cow])));
    assert!(out.contains(&hint), "info: {out}");
    let o = run(&[&"merge", &cow, &"--into", &d.join("m.img")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&hint), "merge: {}", stderr(&o));
    let o = run(&[&"serve", &"--socket-path", &d.join("s"), &"--disk", &cow]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&hint), "serve: {}", stderr(&o));

    // Without --unsafe: what it would do, exit 2, nothing written.
    let before = snapshot(&cow);
    let o = run(&[&"rebase", &cow, &"--backing", &backing]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing without --unsafe"));
    assert!(
        stdout(&o).contains("1600000000 -> 1700000000"),
        "{}",
        stdout(&o)
    );
    assert!(snapshot(&cow) == before, "rebase without --unsafe wrote");

    let o = ok(run(&[&"rebase", &cow, &"--backing", &backing, &"--unsafe"]));
    assert!(
        stderr(&o).contains("warning: rebase --unsafe"),
        "{}",
        stderr(&o)
    );
    assert_eq!(check_code(&[&"check", &cow]).0, 0);
    assert_eq!(
        info_json(&cow)["backing"]["recorded_mtime"],
        1_700_000_000u32
    );
    assert!(read_all(&cow) == expected, "the disk's data changed");
    let theirs = d.join("theirs.img");
    tool(&moo, &[&cow, &theirs], d);
    assert!(
        std::fs::read(&theirs).unwrap() == expected,
        "uml_moo reads the rebased file differently"
    );
}

#[test]
fn rebase_unsafe_onto_a_moved_copy_is_read_by_uml_moo() {
    let Some(moo) = uml_tool("uml_moo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (backing, cow) = setup_written(d, 2 << 20, 6);
    let expected = read_all(&cow);
    let sub = d.join("elsewhere");
    std::fs::create_dir(&sub).unwrap();
    let copy = sub.join("copy.img");
    std::fs::copy(&backing, &copy).unwrap();
    std::fs::remove_file(&backing).unwrap();
    // A relative name is recorded absolute, as `create` records it.
    ok(run_in(
        d,
        &[
            &"rebase",
            &"disk.cow",
            &"-b",
            &"elsewhere/copy.img",
            &"--unsafe",
        ],
    ));
    let j = info_json(&cow);
    assert_eq!(j["backing"]["header_path"], copy.display().to_string());
    assert_eq!(j["backing"]["matches"], true);
    let theirs = d.join("theirs.img");
    tool(&moo, &[&cow, &theirs], d);
    assert!(
        std::fs::read(&theirs).unwrap() == expected,
        "uml_moo differs"
    );
    let ours = d.join("ours.img");
    ok(run(&[&"merge", &cow, &"--into", &ours]));
    assert!(std::fs::read(&ours).unwrap() == expected, "merge differs");
}

#[test]
fn rebase_refuses_what_it_cannot_do_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (backing, cow) = setup_written(d, 1 << 20, 8);
    let before = snapshot(&cow);
    let refused = |args: &[&dyn AsRef<std::ffi::OsStr>], what: &str| {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains(what), "{what}: {}", stderr(&o));
    };

    // Another size is another disk.
    let big = d.join("big.img");
    write_file(&big, &vec![0u8; 2 << 20]);
    refused(
        &[&"rebase", &cow, &"-b", &big, &"--unsafe"],
        "has size 2097152, but the COW header records 1048576",
    );
    refused(
        &[&"rebase", &cow, &"-b", &d.join("nope.img"), &"--unsafe"],
        "No such file",
    );
    refused(
        &[&"rebase", &backing, &"-b", &backing, &"--unsafe"],
        "raw image",
    );
    // A disk in use (a daemon, a merge, UML) keeps its header.
    {
        // (No fork guard: `run` takes it; this disk is not reopened.)
        let _open = Disk::open(&cow, &DiskOptions::default()).unwrap();
        refused(
            &[&"rebase", &cow, &"-b", &backing, &"--unsafe"],
            "in use by process",
        );
    }
    assert!(snapshot(&cow) == before, "a refused rebase wrote");

    // Old layouts are not rewritten.
    let v1 = d.join("v1.cow");
    let f = Fields::new(&backing, 1_600_000_000, 1 << 20);
    write_cow(
        &v1,
        &v1_header(&Fields { version: 1, ..f }),
        280,
        &[0u8; 256],
        512 + (1 << 20),
    );
    refused(
        &[&"rebase", &v1, &"-b", &backing, &"--unsafe"],
        "only v3 headers are rewritten",
    );
}

#[test]
fn every_argument_in_help_has_a_description() {
    for sub in ["create", "info", "check", "merge", "rebase", "serve"] {
        let help = stdout(&ok(run(&[&sub, &"--help"])));
        // clap lists each argument as "  <NAME>  text" or "  -x, --name <V>  text".
        let args: Vec<&str> = help
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                l.starts_with("  ") && (t.starts_with('-') || t.starts_with('<'))
            })
            .collect();
        assert!(args.len() >= 3, "{sub}: no arguments found in\n{help}");
        for l in args {
            let text = l.trim_start().split_once("  ").map(|(_, t)| t.trim());
            assert!(
                text.is_some_and(|t| !t.is_empty()),
                "{sub} --help: no description for {l:?}"
            );
        }
    }
}

/// A tool writing into a closed pipe (`info | head`) ends by SIGPIPE, as
/// other command-line tools do: no panic, no backtrace.
#[test]
fn tools_end_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    write_file(&base, &vec![0u8; 1 << 20]);
    let cow = dir.path().join("d.cow");
    ok(run(&[&"create", &cow, &"--backing", &base]));
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin())
        .args([std::ffi::OsStr::new("info"), cow.as_os_str()])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "info into a closed pipe: {:?}, stderr: {}",
        out.status,
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}
