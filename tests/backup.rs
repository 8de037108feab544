//! `backup` through the real control socket (docs/control.md; rule 10 of
//! docs/design.md): the target holds the disk as it was when the command
//! was answered while the guest keeps writing, it is sparse, a second job
//! is refused while one runs, cancel-job, refused targets, descriptors
//! passed with other commands closed, and `ctl backup`.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user_cow::control::client::Client;
use vhost_user_cow::control::wire::ErrorClass;
use vhost_user_cow::units::to_usize;

use common::daemon::{Daemon, Image, Peer, ServeOptions};
use common::disk_model::{make_raw, SECTOR};

const TIMEOUT: Duration = Duration::from_secs(20);

struct Setup {
    dir: tempfile::TempDir,
    daemon: Daemon,
    control: PathBuf,
}

/// A COW file over an all-zero sparse backing file of `sectors`: a
/// mostly empty disk, so that a sparse target shows.
fn empty_cow(dir: &Path, sectors: u64) -> Image {
    let backing = dir.join("backing.img");
    File::create(&backing)
        .unwrap()
        .set_len(sectors * SECTOR as u64)
        .unwrap();
    let cow = dir.join("disk.cow");
    let o = common::output(
        Command::new(common::bin())
            .arg("create")
            .arg(&cow)
            .arg("--backing")
            .arg(&backing),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Image::Cow { cow, backing }
}

fn serve(dir: tempfile::TempDir, image: &Image) -> Setup {
    let control = dir.path().join("control.sock");
    let daemon = Daemon::start(
        Peer::Ours,
        dir.path(),
        image,
        &ServeOptions {
            extra_args: vec!["--control-socket".into(), control.display().to_string()],
            ..ServeOptions::default()
        },
    );
    Setup {
        dir,
        daemon,
        control,
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vuc-backup-")
        .tempdir()
        .unwrap()
}

fn client(s: &Setup) -> Client {
    // The control socket is bound before the data socket the harness
    // waits for.
    let mut c = Client::connect(&s.control, Some(TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.daemon.log_text()));
    c.execute("subscribe-events", Value::Null).unwrap().unwrap();
    c
}

fn new_target(path: &Path) -> File {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
}

fn start_backup(c: &mut Client, target: &File) -> Result<u64, (ErrorClass, String)> {
    match c
        .execute_with_fd("backup", json!({"target": "t"}), target.as_raw_fd())
        .unwrap()
    {
        Ok(v) => Ok(v["id"].as_u64().unwrap()),
        Err(e) => Err((e.class, e.desc)),
    }
}

/// The JOB_COMPLETED event of job `id`, and how many JOB_PROGRESS came.
fn wait_completed(c: &mut Client, id: u64) -> (Value, usize) {
    let deadline = Instant::now() + TIMEOUT;
    let mut progress = 0;
    loop {
        assert!(Instant::now() < deadline, "job {id} did not end");
        let (name, data) = c.next_event().unwrap();
        if data["id"] != json!(id) {
            continue;
        }
        match name.as_str() {
            "JOB_COMPLETED" => return (data, progress),
            "JOB_PROGRESS" => progress += 1,
            _ => {}
        }
    }
}

fn fill(byte: u8, sectors: u64) -> Vec<u8> {
    vec![byte; to_usize(sectors) * SECTOR]
}

#[test]
fn the_target_is_the_disk_at_the_reply_while_the_guest_writes() {
    const SECTORS: u64 = 128 << 11; // 128 MiB: 2048 clusters of 64 KiB
    let dir = tempdir();
    let image = empty_cow(dir.path(), SECTORS);
    let s = serve(dir, &image);
    let mut c = client(&s);
    let mut dev = s.daemon.connect();
    let last = SECTORS - 8;
    // Completed before the reply: in the copy.
    for at in [0, 100_000, last] {
        dev.write(0, at, &fill(0xa1, 8)).ok("write before");
    }
    // In flight at the reply: either, sector by sector.
    let racing = dev.submit_write(0, 150_000, &fill(0xc3, 8));
    let target_path = s.dir.path().join("backup.img");
    let target = new_target(&target_path);
    let id = start_backup(&mut c, &target).expect("backup starts");
    drop(target);
    // Submitted after the reply: not in the copy. The last cluster is far
    // ahead of the copier, so this write waits for its copy first.
    for at in [last, 60_000, 0, 100_000] {
        dev.write(0, at, &fill(0xb2, 8)).ok("write after");
    }
    dev.complete(racing, "racing write");
    let (end, progress) = wait_completed(&mut c, id);
    assert_eq!(end["status"], "completed", "{end}");
    assert!(progress >= 1, "no JOB_PROGRESS before {end}");
    assert_eq!(end["clusters_done"], end["clusters_total"]);
    assert_eq!(end["clusters_total"], SECTORS * 512 / 65536);
    assert!(end["error"].is_null());

    let copy = std::fs::read(&target_path).unwrap();
    assert_eq!(copy.len() as u64, SECTORS * 512);
    let at = |s: u64, n: u64| &copy[to_usize(s) * SECTOR..to_usize(s + n) * SECTOR];
    for s0 in [0, 100_000, last] {
        assert_eq!(
            at(s0, 8),
            &fill(0xa1, 8)[..],
            "sector {s0}: the write before"
        );
    }
    assert_eq!(
        at(60_000, 8),
        &fill(0, 8)[..],
        "a write after reached the copy"
    );
    for i in 0..8 {
        let sector = at(150_000 + i, 1);
        assert!(
            sector == &fill(0, 1)[..] || sector == &fill(0xc3, 1)[..],
            "sector {}: torn",
            150_000 + i
        );
    }
    // Everything else is the empty disk.
    let written: Vec<(u64, u64)> = vec![(0, 8), (100_000, 8), (last, 8), (150_000, 8)];
    for (i, chunk) in copy.chunks(SECTOR).enumerate() {
        let i = i as u64;
        if !written.iter().any(|&(s0, n)| (s0..s0 + n).contains(&i)) {
            assert!(chunk.iter().all(|&b| b == 0), "sector {i} not zero");
        }
    }
    // Sparse: the all-zero clusters were never written.
    let meta = std::fs::metadata(&target_path).unwrap();
    assert!(meta.blocks() * 512 <= 8 * 65536, "{} blocks", meta.blocks());
    // The guest's disk has the later writes.
    assert_eq!(dev.read(0, last, 8 * SECTOR).ok("read"), fill(0xb2, 8));

    let jobs = c.execute("query-jobs", Value::Null).unwrap().unwrap();
    let job = &jobs.as_array().unwrap()[0];
    assert_eq!(job["id"], id);
    assert_eq!(job["type"], "backup");
    assert_eq!(job["status"], "completed");
    assert_eq!(job["target"], "t");
    assert!(job["bytes_written"].as_u64().unwrap() >= 3 * 4096, "{job}");
    assert!(
        job["writes_waited"].as_u64().unwrap() >= 1,
        "no write waited for its cluster: {job}"
    );
    let stats = c.execute("query-stats", Value::Null).unwrap().unwrap();
    assert!(
        stats["write_path"]["writes_waited_on_backup"]
            .as_u64()
            .unwrap()
            >= 1
    );
    drop(dev);
    s.daemon.terminate_ok();
}

fn open_fds(pid: libc::pid_t) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn one_job_at_a_time_cancel_and_refused_targets() {
    // 1 GiB, empty: long enough to be running when the next line comes.
    let dir = tempdir();
    let image = empty_cow(dir.path(), 2 << 20);
    let s = serve(dir, &image);
    let mut c = client(&s);
    let pid = s.daemon.pid();

    let first = new_target(&s.dir.path().join("one.img"));
    let id = start_backup(&mut c, &first).expect("backup starts");
    let second = new_target(&s.dir.path().join("two.img"));
    let (class, desc) = start_backup(&mut c, &second).unwrap_err();
    assert_eq!(class, ErrorClass::GenericError);
    assert!(desc.contains("running"), "{desc}");
    c.execute("cancel-job", json!({"id": id}))
        .unwrap()
        .expect("cancel-job");
    let (end, _) = wait_completed(&mut c, id);
    assert_eq!(end["status"], "cancelled", "{end}");
    let err = c
        .execute("cancel-job", json!({"id": id}))
        .unwrap()
        .unwrap_err();
    assert!(err.desc.contains("no job"), "{err:?}");
    let jobs = c.execute("query-jobs", Value::Null).unwrap().unwrap();
    assert_eq!(jobs[0]["status"], "cancelled", "{jobs}");

    // No descriptor, a read-only one, a directory.
    let err = c.execute("backup", json!({})).unwrap().unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidParameter);
    assert!(err.desc.contains("SCM_RIGHTS"), "{err:?}");
    let ro = File::open(s.dir.path().join("two.img")).unwrap();
    let (class, desc) = start_backup(&mut c, &ro).unwrap_err();
    assert_eq!(class, ErrorClass::InvalidParameter);
    assert!(desc.contains("not open for writing"), "{desc}");
    let append = OpenOptions::new()
        .append(true)
        .open(s.dir.path().join("two.img"))
        .unwrap();
    let (_, desc) = start_backup(&mut c, &append).unwrap_err();
    assert!(desc.contains("O_APPEND"), "{desc}");
    let Image::Cow { cow, .. } = &image else {
        unreachable!()
    };
    let disk = OpenOptions::new().write(true).open(cow).unwrap();
    let (class, desc) = start_backup(&mut c, &disk).unwrap_err();
    assert_eq!(class, ErrorClass::InvalidParameter);
    assert!(desc.contains("the disk's own image"), "{desc}");
    let d = File::open(s.dir.path()).unwrap();
    let (_, desc) = start_backup(&mut c, &d).unwrap_err();
    assert!(desc.contains("not a regular file"), "{desc}");

    // A descriptor passed with a command that takes none is closed once
    // the line is answered (and so are refused targets').
    let before = open_fds(pid);
    for _ in 0..5 {
        c.execute_with_fd("query-disk", Value::Null, first.as_raw_fd())
            .unwrap()
            .unwrap();
    }
    assert_eq!(open_fds(pid), before, "passed descriptors kept open");

    // A job after the cancelled one starts; the daemon exits with it
    // running (it is cancelled at exit).
    let id2 = start_backup(&mut c, &second).expect("a new job starts");
    assert_ne!(id2, id);
    s.daemon.terminate_ok();
}

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::bin());
    cmd.arg("ctl").arg(socket).args(args);
    common::output(&mut cmd)
}

#[test]
fn ctl_backup_creates_the_target_and_waits_for_the_end() {
    let dir = tempdir();
    let (image, model) = make_raw(dir.path(), 4096, 5);
    let s = serve(dir, &image);
    drop(client(&s)); // the control socket listens
    let target = s.dir.path().join("raw-backup.img");
    let t = target.display().to_string();
    let out = ctl(&s.control, &["backup", &t]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}\n{}", s.daemon.log_text());
    assert!(text.contains("backup job 1 started: "), "{text}");
    assert!(text.contains("backup job 1 completed: "), "{text}");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let copy = std::fs::read(&target).unwrap();
    model.check(0, &copy, "the raw image's copy");

    let out = ctl(&s.control, &["backup", &t]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");

    let other = s.dir.path().join("second.img");
    let out = ctl(
        &s.control,
        &[
            "backup",
            &other.display().to_string(),
            "--no-wait",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], 2, "{v}");

    let out = ctl(&s.control, &["backup"]);
    assert_ne!(out.status.code(), Some(0));
    s.daemon.terminate_ok();
}
