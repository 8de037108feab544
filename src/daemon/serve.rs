//! The daemon's life: open the disk, listen, serve frontend connections
//! (two at once, one of them active: docs/design.md, "Two connections,
//! one active"), and on SIGINT/SIGTERM drain, sync, report and leave no
//! socket behind.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::eventfd::EventFd;

use super::active_connection::ConnectionId;
use super::control_commands::{ConnectionSlot, DaemonCommands};
use super::device::{Device, DeviceOptions};
use super::memory_trim;
use super::protocol::{FrontendHandler, ProtocolOptions};
use super::request_stats::RequestStats;
use super::sandbox::{self, SandboxError, SandboxMode, SocketDir};
use super::seccomp::{self, SeccompError, SeccompMode};
use super::truncation_guard;
use super::worker_thread::{WorkerOptions, WorkerPool};
use crate::control::server::ControlServer;
use crate::format::error::DiskError;
use crate::io_engine::EngineError;
use crate::log_tag;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("{path}: a daemon is already listening on this socket")]
    SocketInUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {op}: {source}")]
    Socket {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("inherited fd {fd} is not a listening unix socket: {source}")]
    BadFd {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O engine: {0}")]
    Engine(#[from] EngineError),
    #[error("signal handling: {0}")]
    Signals(#[source] std::io::Error),
    #[error("{0}: accept: {1}")]
    Accept(String, #[source] std::io::Error),
    #[error("virtqueue: {0}")]
    Virtqueue(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("{0}")]
    Exports(String),
}

pub enum SocketSource {
    Path {
        path: PathBuf,
        mode: u32,
    },
    /// An inherited listening socket (systemd socket activation).
    Fd(RawFd),
}

/// One disk served on its own socket.
pub struct ExportOptions {
    pub device: DeviceOptions,
    pub socket: SocketSource,
    /// The control socket's path (created with the data socket's mode).
    pub control_socket: Option<PathBuf>,
}

pub struct ServeOptions {
    /// The disks, each with its own socket, device, scheduler and queue
    /// threads (docs/design.md, "Several disks in one process").
    pub exports: Vec<ExportOptions>,
    pub workers: WorkerOptions,
    pub protocol: ProtocolOptions,
    pub confinement: Confinement,
}

/// Disks one process serves at most (each message thread needs one of
/// the SIGBUS guard's wake-ups).
pub const MAX_EXPORTS: usize = truncation_guard::WAKERS;

/// How the daemon confines itself once started (docs/design.md, "Trust
/// model").
#[derive(Debug, Clone, Copy, Default)]
pub struct Confinement {
    pub seccomp: SeccompMode,
    pub sandbox: SandboxMode,
}

/// Binds the socket path, refusing to take it from a live daemon.
fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket {
                path: path.to_owned(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::SocketInUse {
                path: path.to_owned(),
            });
        }
        // Nobody answers: a stale socket of a daemon that died.
        std::fs::remove_file(path).map_err(|source| ServeError::Socket {
            path: path.to_owned(),
            op: "remove stale socket",
            source,
        })?;
    }
    // The socket must never be reachable with looser permissions, not
    // even between bind and chmod.
    // SAFETY: umask only changes process state.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|source| ServeError::Socket {
        path: path.to_owned(),
        op: "bind",
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ServeError::Socket {
            path: path.to_owned(),
            op: "chmod",
            source,
        }
    })?;
    Ok(listener)
}

/// Serves the exports until SIGINT or SIGTERM. Every path out after the
/// sockets are bound goes through the same cleanup: workers finish their
/// I/O, the files are synced, the sockets are removed, the counters are
/// logged.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    // First of all, so that a signal during start-up is not fatal (the
    // handlers are installed now; the thread that reads them starts once
    // the sandbox is entered, which needs a single-threaded process).
    let shutdown = Arc::new(
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ServeError::Signals)?,
    );
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(ServeError::Signals)?;
    if opts.exports.is_empty() || opts.exports.len() > MAX_EXPORTS {
        return Err(ServeError::Exports(format!(
            "{} disks to serve: one process serves 1 to {MAX_EXPORTS}",
            opts.exports.len()
        )));
    }

    // The one place the thread count is decided: a thread without a
    // virtqueue would only idle, and the scheduler keeps one queue per
    // thread.
    let mut workers = opts.workers.clone();
    workers.threads = workers
        .threads
        .clamp(1, usize::from(opts.protocol.num_queues.max(1)));
    truncation_guard::reserve(opts.exports.len() * MAX_CONNECTIONS);
    let tagged = opts.exports.len() > 1;
    let mut exports: Vec<Export<'_>> = Vec::with_capacity(opts.exports.len());
    for e in &opts.exports {
        match Export::open(e, workers.threads, tagged) {
            Ok(x) => exports.push(x),
            Err(err) => {
                for x in &exports {
                    x.remove_sockets();
                }
                return Err(err);
            }
        }
    }

    let result = serve_bound(&opts, &mut exports, &workers, signals, &shutdown);
    for x in exports {
        x.close();
    }
    super::log_limit::report_suppressed();
    result
}

/// An export with its device open and its sockets bound.
struct Export<'a> {
    opts: &'a ExportOptions,
    /// What its log lines start with when the process serves several.
    tag: Option<Arc<str>>,
    dev: Arc<Device>,
    listener: UnixListener,
    socket_dir: Option<SocketDir>,
    name: String,
    /// Taken by the control server once it starts.
    control_listener: Option<UnixListener>,
    control_dir: Option<SocketDir>,
}

impl<'a> Export<'a> {
    fn open(opts: &'a ExportOptions, threads: usize, tagged: bool) -> Result<Self, ServeError> {
        let tag: Option<Arc<str>> = tagged.then(|| {
            let name = opts.device.disk.file_name().unwrap_or_default();
            name.to_string_lossy().into()
        });
        let _tag = log_tag::Scoped::new(tag.clone());
        let dev = Arc::new(Device::open(&opts.device, threads)?);
        if dev.format_guessed {
            let format = if dev.is_cow() { "cow" } else { "raw" };
            log::warn!(
                "{}: format guessed as {format} from the file's first bytes; name it with \
                 --format {format}{}",
                dev.path.display(),
                if dev.guards_cow_magic {
                    " (until then, guest writes that would put the COW magic in sector 0 are refused)"
                } else {
                    ""
                }
            );
        }
        // The control socket first: whoever waits for the data socket to
        // appear (a supervisor, the tests) finds the control socket there too.
        let control = match &opts.control_socket {
            None => None,
            Some(path) => {
                let mode = match &opts.socket {
                    SocketSource::Path { mode, .. } => *mode,
                    SocketSource::Fd(_) => 0o600,
                };
                let bound = bind(path, mode).and_then(|l| {
                    SocketDir::open(path)
                        .map(|d| (l, d))
                        .map_err(|source| ServeError::Socket {
                            path: path.clone(),
                            op: "open its directory",
                            source,
                        })
                });
                Some(bound?)
            }
        };
        let (listener, socket_dir, name) = match bind_data(&opts.socket) {
            Ok(d) => d,
            Err(e) => {
                if let Some((_, d)) = &control {
                    d.remove();
                }
                return Err(e);
            }
        };
        let (control_listener, control_dir) = control.unzip();
        Ok(Export {
            opts,
            tag,
            dev,
            listener,
            socket_dir,
            name,
            control_listener,
            control_dir,
        })
    }

    /// Removes the socket files (after a later export failed to open).
    fn remove_sockets(&self) {
        if let Some(d) = &self.control_dir {
            d.remove();
        }
        if let Some(d) = &self.socket_dir {
            d.remove();
        }
    }

    /// The cleanup after serving: stop listening, sync, remove the
    /// sockets (the data socket last: it going away says the disk is
    /// consistent), log the counters.
    fn close(self) {
        let Export {
            tag,
            dev,
            listener,
            socket_dir,
            control_listener,
            control_dir,
            ..
        } = self;
        let _tag = log_tag::Scoped::new(tag);
        drop((listener, control_listener));
        if let Some(d) = &control_dir {
            d.remove();
        }
        let sched_stats = dev.sched().stats().clone();
        if let Err(e) = dev.sync() {
            log::error!("{e}");
        }
        if let Some(d) = &socket_dir {
            d.remove();
        }
        log::info!(
            "write path counters: {}",
            serde_json::to_string(&sched_stats).unwrap_or_default()
        );
        log::info!(
            "lock counters: {}",
            serde_json::to_string(&dev.lock_counts_total()).unwrap_or_default()
        );
        let failure = dev.sched().failure().map(|why| why.to_string());
        if let Some(why) = failure {
            log::error!("the disk stopped accepting writes: {why}");
        }
    }
}

/// The data socket: bound at its path, or inherited (socket activation).
fn bind_data(
    socket: &SocketSource,
) -> Result<(UnixListener, Option<SocketDir>, String), ServeError> {
    Ok(match socket {
        SocketSource::Path { path, mode } => {
            let listener = bind(path, *mode)?;
            let dir = SocketDir::open(path);
            let dir = match dir {
                Ok(d) => d,
                Err(source) => {
                    let _ = std::fs::remove_file(path);
                    return Err(ServeError::Socket {
                        path: path.clone(),
                        op: "open its directory",
                        source,
                    });
                }
            };
            (listener, Some(dir), path.display().to_string())
        }
        SocketSource::Fd(fd) => {
            // SAFETY: the fd was handed to us by our parent for this use.
            let l = unsafe { UnixListener::from_raw_fd(*fd) };
            l.local_addr()
                .map_err(|source| ServeError::BadFd { fd: *fd, source })?;
            (l, None, format!("fd {fd}"))
        }
    })
}

/// An export's running parts, made before the seccomp filter.
struct Running {
    pool: Arc<WorkerPool>,
    slot: Arc<ConnectionSlot>,
}

/// Confines the daemon, starts its threads and serves until a signal.
fn serve_bound(
    opts: &ServeOptions,
    exports: &mut [Export<'_>],
    workers: &WorkerOptions,
    mut signals: signal_hook::iterator::Signals,
    shutdown: &Arc<EventFd>,
) -> Result<(), ServeError> {
    // Start-up's deepest calls are behind us; /proc is still there.
    memory_trim::note_main_stack();
    sandbox::enter(opts.confinement.sandbox)?;
    {
        let shutdown = shutdown.clone();
        crate::spawn::spawn_started("signals".into(), move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: finishing in-flight I/O and exiting");
                let _ = shutdown.write(1);
            }
        })
        .map_err(ServeError::Signals)?;
    }
    let mut running = Vec::with_capacity(exports.len());
    for x in exports.iter_mut() {
        running.push(start_export(opts, x, workers, shutdown)?);
    }
    let exports = &*exports;
    let result = std::thread::scope(|scope| {
        // A process serving several disks gives each its own message
        // thread, made before the filter and held until it is in place.
        let mut gates = Vec::new();
        let mut threads = Vec::new();
        if exports.len() > 1 {
            for (k, (x, r)) in exports.iter().zip(&running).enumerate() {
                let (go, wait) = std::sync::mpsc::sync_channel::<()>(1);
                let _tag = log_tag::Scoped::new(x.tag.clone());
                let thread =
                    crate::spawn::spawn_started_scoped(scope, format!("export-{k}"), move || {
                        if wait.recv().is_err() {
                            return Ok(());
                        }
                        let result = accept_loop(x, r, opts, shutdown, memory_trim::trim_heap);
                        if result.is_err() {
                            // One export failing ends them all: the
                            // supervisor sees the process go.
                            let _ = shutdown.write(1);
                        }
                        result
                    })
                    .map_err(ServeError::Signals)?;
                gates.push(go);
                threads.push((x, thread));
            }
        }
        sandbox::drop_privileges()?;
        seccomp::install(opts.confinement.seccomp)?;
        for (x, r) in exports.iter().zip(&running) {
            log_serving(opts, workers, x, r);
        }
        #[cfg(feature = "test-hooks")]
        test_hooks::after_confinement();
        if threads.is_empty() {
            return accept_loop(&exports[0], &running[0], opts, shutdown, memory_trim::trim);
        }
        for g in &gates {
            let _ = g.send(());
        }
        // Set-up's memory back now; each message thread trims the heap
        // after its own frontends' set-up.
        memory_trim::trim();
        let mut result = Ok(());
        for (x, t) in threads {
            let r = t.join().unwrap_or_else(|_| {
                Err(ServeError::Exports(format!(
                    "{}: its message thread panicked",
                    x.name
                )))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    });
    for r in running {
        match Arc::try_unwrap(r.pool) {
            Ok(mut pool) => pool.shutdown(),
            Err(_) => log::error!("worker threads still referenced at exit"),
        }
    }
    result
}

/// Starts an export's queue threads and its control server (under its
/// log tag, which they inherit).
fn start_export(
    opts: &ServeOptions,
    x: &mut Export<'_>,
    workers: &WorkerOptions,
    shutdown: &Arc<EventFd>,
) -> Result<Running, ServeError> {
    let _tag = log_tag::Scoped::new(x.tag.clone());
    let dev = &x.dev;
    // io_uring rings and pool threads are made here, before the filter.
    let stats = Arc::new(RequestStats::new(usize::from(opts.protocol.num_queues)));
    let pool = Arc::new(WorkerPool::start(dev.clone(), workers, stats.clone())?);
    dev.backups.set_waker(pool.waker());
    let slot = Arc::new(ConnectionSlot::default());
    if let (Some(l), Some(path)) = (x.control_listener.take(), &x.opts.control_socket) {
        let commands = Arc::new(DaemonCommands {
            dev: dev.clone(),
            stats,
            connection: slot.clone(),
            events: dev.events.clone(),
            started: std::time::Instant::now(),
        });
        let server =
            ControlServer::new(l, path.display().to_string(), commands, dev.events.clone())
                .map_err(|source| ServeError::Socket {
                    path: path.clone(),
                    op: "set up the control socket",
                    source,
                })?;
        let shutdown = shutdown.clone();
        crate::spawn::spawn_started("control".into(), move || server.run(&shutdown))
            .map_err(ServeError::Signals)?;
    }
    Ok(Running { pool, slot })
}

/// The line that says an export is being served, and how.
fn log_serving(opts: &ServeOptions, workers: &WorkerOptions, x: &Export<'_>, r: &Running) {
    let _tag = log_tag::Scoped::new(x.tag.clone());
    let (dev, pool) = (&x.dev, &r.pool);
    log::info!(
        "serving {} ({}) on {}: {} queues on {} threads, engine {}{}, queue depth {}, cache {}{}; \
         sandbox {}, seccomp {}, no capabilities",
        dev.path.display(),
        dev.description,
        x.name,
        opts.protocol.num_queues,
        pool.threads(),
        pool.engine_name(),
        if pool.inline_writes() {
            " (writes inline)"
        } else {
            ""
        },
        workers.queue_depth,
        dev.cache.name(),
        if dev.read_only { ", read-only" } else { "" },
        opts.confinement.sandbox.name(),
        opts.confinement.seccomp.name(),
    );
    let limits = dev.throttle.limits();
    if !limits.is_empty() {
        log::info!(
            "I/O limits: {}",
            serde_json::to_string(&limits).unwrap_or_default()
        );
    }
}

/// Hooks for tests of the confinement; never in a release build.
#[cfg(feature = "test-hooks")]
mod test_hooks {
    /// `VUC_TEST_OPEN=PATH`: try to open a host path once confined, and
    /// say what happened (a blocked openat ends the daemon instead).
    pub fn after_confinement() {
        if let Some(path) = std::env::var_os("VUC_TEST_OPEN") {
            match std::fs::File::open(&path) {
                Ok(_) => log::warn!("test hook: opened {}", path.to_string_lossy()),
                Err(e) => log::warn!("test hook: open {}: {e}", path.to_string_lossy()),
            }
        }
    }
}

/// Frontend connections served at once: the one using the device and one
/// more (a migration's destination, or a frontend reconnecting before its
/// old connection was seen closing). A third is closed at once.
const MAX_CONNECTIONS: usize = 2;
/// How long the frontends stay silent before set-up memory is trimmed.
const TRIM_AFTER_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a frontend may take to send the rest of a message it began:
/// the one message thread serves every connection, so a stalled message
/// must not hold up the other one.
const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One accepted frontend connection.
struct Connection {
    id: ConnectionId,
    fd: RawFd,
    req: BackendReqHandler<Mutex<FrontendHandler>>,
    handler: Arc<Mutex<FrontendHandler>>,
}

impl Connection {
    fn handler(&self) -> std::sync::MutexGuard<'_, FrontendHandler> {
        self.handler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops its rings, finishes its I/O and says why it ended. At a
    /// signal (`stopped`) every request taken is published first, so that
    /// a frontend that rewinds its rings loses and repeats nothing.
    fn end(self, stopped: bool, opts: &ServeOptions, dev: &Device, slot: &ConnectionSlot) {
        slot.disconnected(self.id);
        let mut h = self.handler();
        if stopped {
            h.drain();
        }
        h.disconnect();
        dev.events.emit(
            "FRONTEND_DISCONNECTED",
            serde_json::json!({ "connection": self.id }),
        );
        if h.acked_features() == 0 && !stopped {
            crate::log_limited!(
                log::Level::Info,
                "left before negotiating",
                "frontend disconnected before negotiating (QEMU does that when its \
                 num-queues, by default one per vCPU, exceeds the {} queues offered: \
                 raise --num-queues)",
                opts.protocol.num_queues
            );
        } else {
            crate::log_limited!(log::Level::Info, "disconnected", "frontend disconnected");
        }
    }
}

/// Serves frontend connections, at most [`MAX_CONNECTIONS`] at once and
/// one of them active, until a signal.
/// `trim` gives set-up memory back once the frontends are quiet.
fn accept_loop(
    x: &Export<'_>,
    r: &Running,
    opts: &ServeOptions,
    shutdown: &EventFd,
    trim: fn(),
) -> Result<(), ServeError> {
    let (dev, pool, slot) = (&x.dev, &r.pool, &*r.slot);
    let (listener, name) = (&x.listener, x.name.as_str());
    // Signalled when a guest memory file was truncated under our mapping.
    let truncated =
        &EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ServeError::Signals)?;
    let _waker = truncation_guard::add_wake_fd(truncated.as_raw_fd());
    let active = slot.active.clone();
    let mut conns: Vec<Connection> = Vec::new();
    let mut next_id: ConnectionId = 1;
    // Set-up freed memory since the last trim: trim once the messages
    // stop for a while (start-up counts as such a burst).
    let mut trim_due = true;
    let result = loop {
        let mut fds = vec![
            shutdown.as_raw_fd(),
            truncated.as_raw_fd(),
            listener.as_raw_fd(),
        ];
        fds.extend(conns.iter().map(|c| c.fd));
        let quiet = trim_due.then_some(TRIM_AFTER_QUIET);
        let Some(ready) = readable(&fds, quiet) else {
            break Ok(());
        };
        if !ready.iter().any(|&r| r) {
            trim();
            trim_due = false;
            continue;
        }
        trim_due = true;
        if ready[0] {
            break Ok(());
        }
        if ready[1] {
            let _ = truncated.read();
            // The guard woke every export: end only the connections
            // whose files were truncated.
            let (guilty, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut conns)
                .into_iter()
                .partition(|c| c.handler().memory_truncated());
            conns = kept;
            for c in guilty {
                log::error!(
                    "a frontend truncated a guest memory file under the daemon's \
                     mapping: ending its connection (connection {})",
                    c.id
                );
                c.end(false, opts, dev, slot);
            }
            continue;
        }
        // Every connection with a message gets one handled per pass, so
        // that neither can starve the other.
        let mut ended = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            if ready[3 + i] && !handle_message(&mut c.req) {
                ended.push(i);
            }
        }
        for i in ended.into_iter().rev() {
            conns.remove(i).end(false, opts, dev, slot);
        }
        if ready[2] {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(ServeError::Accept(name.to_owned(), e)),
            };
            if conns.len() >= MAX_CONNECTIONS {
                crate::log_limited!(
                    log::Level::Warn,
                    "too many connections",
                    "refused a frontend connection: {MAX_CONNECTIONS} are open already"
                );
                continue;
            }
            let _ = stream.set_read_timeout(Some(MESSAGE_TIMEOUT));
            let handler = FrontendHandler::new(dev.clone(), pool.clone(), opts.protocol)
                .map_err(|e| ServeError::Virtqueue(e.to_string()))?
                .sharing(next_id, active.clone());
            crate::log_limited!(
                log::Level::Info,
                "connected",
                "frontend connected (connection {next_id}{})",
                if conns.is_empty() {
                    ""
                } else {
                    ", a second one: it is served once the other stops its rings"
                }
            );
            let handler = Arc::new(Mutex::new(handler));
            slot.connected(next_id, handler.clone());
            dev.events.emit(
                "FRONTEND_CONNECTED",
                serde_json::json!({ "connection": next_id }),
            );
            let fd = stream.as_raw_fd();
            conns.push(Connection {
                id: next_id,
                fd,
                req: BackendReqHandler::from_stream(stream, handler.clone()),
                handler,
            });
            next_id += 1;
        }
        // The device is free: rings that waited for it start now.
        if active.owner().is_none() {
            for c in &conns {
                c.handler().start_waiting_rings();
            }
        }
    };
    for c in conns.drain(..) {
        c.end(true, opts, dev, slot);
    }
    result
}

/// Which of `fds` are readable (or hung up), all false when `timeout`
/// passed first; None if poll itself failed.
fn readable(fds: &[RawFd], timeout: Option<std::time::Duration>) -> Option<Vec<bool>> {
    let timeout_ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: a valid pollfd array of its length.
        let n = unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        return Some(polled.iter().map(|p| p.revents != 0).collect());
    }
}

/// Handles one message of a connection. Returns false when the
/// connection ended.
fn handle_message(req: &mut BackendReqHandler<Mutex<FrontendHandler>>) -> bool {
    match req.handle_request() {
        Ok(()) => true,
        Err(vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage) => {
            false
        }
        // Our own refusal, already logged with its reason.
        Err(
            vhost::vhost_user::Error::ReqHandlerError(_)
            | vhost::vhost_user::Error::InvalidOperation(_),
        ) => {
            crate::log_limited!(
                log::Level::Info,
                "connection ended after a refusal",
                "frontend connection ended after a refused message"
            );
            false
        }
        Err(e) => {
            crate::log_limited!(
                log::Level::Warn,
                "connection ended",
                "frontend connection ended: {e}"
            );
            false
        }
    }
}
