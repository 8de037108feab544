//! The backend under test, as a child process: our `vhost-user-cow serve`
//! or, as a reference, `qemu-storage-daemon` exporting a raw file.
//!
//! Every peer-generic test is written once as `fn name(peer: Peer)` and
//! instantiated as `ours::name` and `qsd::name` by [`per_peer!`]; both run
//! by default. Pick one with a test-name filter (`ours::` or `qsd::`, see
//! tests/E2E.md), not at run time: a variant that does not run its body
//! must not be reported as a pass. A qsd variant fails when
//! qemu-storage-daemon is not installed.
//!
//! qemu-storage-daemon has no COW format: for a COW image it serves a raw
//! copy of the backing file, which is what the guest must see anyway, so
//! the same test body and the same model apply. COW-only checks (the COW
//! file, `check`, `uml_moo`) apply to ours only; see [`Stopped::image`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::vhost_frontend::handshake::connect_unix;
use super::vhost_frontend::{FrontendOptions, VhostUserBlk};

/// Generates `ours::NAME` and `qsd::NAME` tests for each `fn NAME(peer: Peer)`
/// listed first, and only `ours::NAME` for those after `ours_only:` (tests
/// of options qsd does not have).
#[macro_export]
macro_rules! per_peer {
    ($($name:ident),* $(,)? $(; ours_only: $($only:ident),* $(,)?)?) => {
        mod ours {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::daemon::Peer::Ours);
                }
            )*
            $($(
                #[test]
                fn $only() {
                    super::$only($crate::common::daemon::Peer::Ours);
                }
            )*)?
        }
        mod qsd {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::daemon::Peer::Qsd);
                }
            )*
        }
    };
}

pub const QSD: &str = "qemu-storage-daemon";
/// The serial qemu-storage-daemon's vhost-user-blk export reports (fixed).
pub const QSD_SERIAL: &[u8] = b"vhost_user_blk";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Ours,
    Qsd,
}

impl Peer {
    pub fn is_ours(self) -> bool {
        self == Peer::Ours
    }
}

/// qemu-storage-daemon's path. Missing, the qsd variants fail (with or
/// without `CI`): passing them would claim a comparison that never ran.
pub fn qsd_path() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(QSD))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{QSD} not found: install it (Debian package qemu-utils) or leave the \
             reference variants out with a filter: cargo nextest run -E 'not test(/^qsd::/)'"
        )
    })
}

/// The disk a daemon serves.
#[derive(Clone, Debug)]
pub enum Image {
    /// A COW file over a backing file (both must exist).
    Cow { cow: PathBuf, backing: PathBuf },
    /// A raw image.
    Raw(PathBuf),
}

/// Options of `serve` that tests vary.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub num_queues: u16,
    pub read_only: bool,
    pub serial: Option<String>,
    /// Pass `--backing` explicitly for a COW image.
    pub pass_backing: bool,
    /// More `serve` options (ours only), e.g. the engine and its depth.
    pub extra_args: Vec<String>,
    /// Serve a raw image without naming its format (ours only): the
    /// daemon guesses it from the file.
    pub guess_format: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            num_queues: 1,
            read_only: false,
            serial: None,
            pass_backing: false,
            extra_args: Vec::new(),
            guess_format: false,
        }
    }
}

pub struct Daemon {
    pub peer: Peer,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    pub image: Image,
    /// The file the daemon was given as its disk.
    served: PathBuf,
    pub opts: ServeOptions,
}

/// How long a daemon may take to start listening or to exit.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Starts `peer` serving `image` on `dir/<name>.sock` and waits until the
    /// socket accepts connections.
    pub fn start(peer: Peer, dir: &Path, image: &Image, opts: &ServeOptions) -> Daemon {
        let n = std::fs::read_dir(dir).unwrap().count();
        let socket = dir.join(format!("vub-{n}.sock"));
        let log = dir.join(format!("daemon-{n}.log"));
        let (mut cmd, served) = match peer {
            Peer::Ours => ours_command(&socket, image, opts),
            Peer::Qsd => qsd_command(dir, &socket, image, opts),
        };
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let child = {
            let _g = super::fork_guard();
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {peer:?} ({cmd:?}): {e}"))
        };
        let mut d = Daemon {
            peer,
            child: Some(child),
            socket,
            log,
            image: image.clone(),
            served,
            opts: opts.clone(),
        };
        d.wait_listening();
        d
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        loop {
            // Bounded: a connect to a full backlog would block.
            if connect_unix(&self.socket, Duration::from_millis(100)).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{:?} exited ({st}) before listening on {}:\n{}",
                    self.peer,
                    self.socket.display(),
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < PROCESS_TIMEOUT,
                "{:?} not listening on {} after {PROCESS_TIMEOUT:?}:\n{}",
                self.peer,
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The file the daemon's stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// The daemon's stdout and stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 10 s) until the daemon's log holds `text` at least
    /// `n` times; fails the test with the log otherwise.
    #[allow(dead_code)] // not every test crate waits on the log
    pub fn wait_log_count(&self, text: &str, n: usize) {
        let start = Instant::now();
        while self.log_text().matches(text).count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{:?}: {text:?} not {n} times in the log after 10 s:\n{}",
                self.peer,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connects a frontend with `num_queues` = the daemon's.
    pub fn connect(&self) -> VhostUserBlk {
        self.connect_with(FrontendOptions {
            num_queues: self.opts.num_queues,
            ..FrontendOptions::default()
        })
    }

    /// Connects and negotiates (each step bounded by
    /// `opts.reply_timeout`), failing the test with the daemon's log.
    pub fn connect_with(&self, opts: FrontendOptions) -> VhostUserBlk {
        let mut dev = self.try_connect_with(opts).unwrap_or_else(|e| {
            panic!(
                "{:?}: vhost-user handshake failed: {e}\n{}",
                self.peer,
                self.log_text()
            )
        });
        dev.set_daemon_log(&self.log);
        dev
    }

    /// The handshake, its failure returned.
    pub fn try_connect_with(&self, opts: FrontendOptions) -> Result<VhostUserBlk, String> {
        VhostUserBlk::connect(&self.socket, opts)
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().unwrap().id() as libc::pid_t
    }

    /// Sends `sig` to the daemon (e.g. SIGSTOP, SIGKILL).
    /// SIGSTOP, then waits until every thread of the daemon is stopped:
    /// kill() returns before a thread running on another CPU has stopped,
    /// and until then it may still take and answer requests.
    pub fn stop_threads(&mut self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        let start = Instant::now();
        loop {
            let states: Vec<String> = std::fs::read_dir(&tasks)
                .unwrap_or_else(|e| panic!("{tasks}: {e}"))
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                // The state is the field after the parenthesised name.
                .filter_map(|s| Some(s[s.rfind(')')? + 1..].split_whitespace().next()?.to_owned()))
                .collect();
            if !states.is_empty() && states.iter().all(|st| st == "T" || st == "t") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon {} not stopped 10 s after SIGSTOP: thread states {states:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn signal(&mut self, sig: libc::c_int) {
        assert!(self.running(), "{:?} exited before signal {sig}", self.peer);
        // SAFETY: signalling our own child by pid; it was running just now
        // and is not reaped until we wait for it, so the pid is still its.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            r,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Files whose bytes the daemon may change (the served disk; for ours
    /// and a COW image, the COW file) and that must not otherwise change:
    /// the backing file of a COW image.
    pub fn writable_files(&self) -> Vec<PathBuf> {
        vec![self.served.clone()]
    }

    pub fn read_only_files(&self) -> Vec<PathBuf> {
        match (&self.image, self.peer) {
            (Image::Cow { backing, .. }, _) => vec![backing.clone()],
            _ => vec![],
        }
    }

    /// What GET_ID should answer.
    pub fn expected_serial(&self) -> Vec<u8> {
        match self.peer {
            Peer::Ours => self.opts.serial.clone().unwrap_or_default().into_bytes(),
            Peer::Qsd => QSD_SERIAL.to_vec(),
        }
    }

    /// Whether the child is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM and waits for the exit.
    /// SIGTERM, and the daemon must exit 0 (the test fails with its log
    /// otherwise).
    #[allow(dead_code)] // not every test crate stops daemons so
    pub fn terminate_ok(self) -> Stopped {
        let st = self.terminate();
        assert!(
            st.status.success(),
            "{:?}: exit status {}:\n{}",
            st.peer,
            st.status,
            st.log
        );
        st
    }

    pub fn terminate(mut self) -> Stopped {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = wait_timeout(&mut child, PROCESS_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{:?} did not exit within {PROCESS_TIMEOUT:?} of SIGTERM:\n{}",
                self.peer,
                self.log_text()
            )
        });
        Stopped {
            peer: self.peer,
            status,
            socket: self.socket.clone(),
            image: self.image.clone(),
            served: self.served.clone(),
            log: self.log_text(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > t {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ours_command(socket: &Path, image: &Image, o: &ServeOptions) -> (Command, PathBuf) {
    let mut c = Command::new(super::bin());
    c.arg("serve").arg("--socket-path").arg(socket);
    let served = match image {
        Image::Cow { cow, backing } => {
            c.arg("--disk").arg(cow);
            if o.pass_backing {
                c.arg("--backing").arg(backing);
            }
            cow.clone()
        }
        Image::Raw(p) => {
            c.arg("--disk").arg(p);
            if !o.guess_format {
                c.arg("--format").arg("raw");
            }
            p.clone()
        }
    };
    if o.read_only {
        c.arg("--read-only");
    }
    c.arg("--num-queues").arg(o.num_queues.to_string());
    if let Some(s) = &o.serial {
        c.arg("--serial").arg(s);
    }
    c.args(&o.extra_args);
    (c, served)
}

fn qsd_command(dir: &Path, socket: &Path, image: &Image, o: &ServeOptions) -> (Command, PathBuf) {
    let served = match image {
        Image::Cow { backing, .. } => {
            // The raw equivalent of a fresh COW: a copy of the backing file.
            let copy = dir.join("qsd-image.raw");
            if !copy.exists() {
                std::fs::copy(backing, &copy).unwrap();
            }
            copy
        }
        Image::Raw(p) => p.clone(),
    };
    let mut c = Command::new(qsd_path());
    c.arg("--blockdev").arg(format!(
        "driver=file,node-name=file0,filename={},aio=io_uring",
        served.display()
    ));
    c.arg("--blockdev")
        .arg("driver=raw,node-name=disk0,file=file0");
    c.arg("--export").arg(format!(
        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={}",
        socket.display(),
        if o.read_only { "off" } else { "on" },
        o.num_queues
    ));
    (c, served)
}

/// A daemon after SIGTERM.
pub struct Stopped {
    pub peer: Peer,
    pub status: ExitStatus,
    pub socket: PathBuf,
    pub image: Image,
    served: PathBuf,
    pub log: String,
}

impl Stopped {
    /// The disk as a guest would see it now: for ours and a COW image,
    /// `uml_moo COW OUT` (the reference merge); otherwise the served file.
    /// None when uml_moo is missing (and CI is not set).
    pub fn image(&self, scratch: &Path) -> Option<Vec<u8>> {
        match (&self.image, self.peer) {
            (Image::Cow { cow, .. }, Peer::Ours) => {
                let moo = super::uml_tool("uml_moo")?;
                let out = scratch.join("merged-by-uml_moo.img");
                let _ = std::fs::remove_file(&out);
                let o = super::output(Command::new(moo).arg(cow).arg(&out));
                assert!(
                    o.status.success(),
                    "uml_moo failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                Some(std::fs::read(&out).unwrap())
            }
            _ => Some(std::fs::read(&self.served).unwrap()),
        }
    }

    /// For ours and a COW image: `vhost-user-cow check` finds it clean.
    #[allow(dead_code)] // not every test crate checks
    pub fn assert_check_clean(&self) {
        if let (Image::Cow { cow, .. }, Peer::Ours) = (&self.image, self.peer) {
            let o = super::output(Command::new(super::bin()).arg("check").arg(cow));
            assert!(
                o.status.success(),
                "vhost-user-cow check: {}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}
