//! The daemon's life: open the disk, listen, serve one frontend
//! connection after another, and on SIGINT/SIGTERM drain, sync, report
//! and leave no socket behind.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

use crate::daemon::backend::{BackendOptions, CowBackend};
use crate::daemon::device::{Device, DeviceOptions};
use crate::daemon::worker::Memory;
use crate::format::error::DiskError;
use crate::io_engine::EngineError;

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
    #[error("vhost-user: {0}")]
    VhostUser(String),
}

pub enum SocketSource {
    Path {
        path: PathBuf,
        mode: u32,
    },
    /// An inherited listening socket (systemd socket activation).
    Fd(RawFd),
}

pub struct ServeOptions {
    pub device: DeviceOptions,
    pub backend: BackendOptions,
    pub socket: SocketSource,
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

/// Waits until the listener has a connection or a signal arrived.
/// Returns false on shutdown.
fn wait_for_connection(listener: RawFd, shutdown: RawFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shutdown,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: valid pollfd array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    // First of all, so that a signal during start-up is not fatal.
    // Signals: stop accepting, cut the connection, then drain and exit.
    let (shutdown_c, shutdown_n) =
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(ServeError::Signals)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(ServeError::Signals)?;
    {
        let stopping = stopping.clone();
        let current = current.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    log::info!("signal {sig}: finishing in-flight I/O and exiting");
                    stopping.store(true, Ordering::SeqCst);
                    let _ = shutdown_n.notify();
                    if let Some(h) = current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        h.shutdown();
                    }
                }
            })
            .map_err(ServeError::Signals)?;
    }

    let dev = Arc::new(Device::open(&opts.device)?);
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

    let (listener, socket_path) = match &opts.socket {
        SocketSource::Path { path, mode } => (bind(path, *mode)?, Some(path.clone())),
        SocketSource::Fd(fd) => {
            // SAFETY: the fd was handed to us by our parent for this use.
            let l = unsafe { UnixListener::from_raw_fd(*fd) };
            l.local_addr()
                .map_err(|source| ServeError::BadFd { fd: *fd, source })?;
            (l, None)
        }
    };
    let listener_fd = listener.as_raw_fd();
    let mut vhost_listener = Listener::from(listener);

    let mut first = true;
    let result = loop {
        let backend = CowBackend::new(dev.clone(), opts.backend.clone())?;
        if first {
            log::info!(
                "serving {} ({}) on {}: {} queues on {} threads, engine {}{}, queue depth {}, cache {}{}",
                dev.path.display(),
                dev.description,
                socket_path
                    .as_ref()
                    .map_or_else(|| format!("fd {listener_fd}"), |p| p.display().to_string()),
                opts.backend.num_queues,
                backend.num_threads(),
                backend.engine_name(),
                if backend.inline_writes() { " (writes inline)" } else { "" },
                opts.backend.queue_depth,
                dev.cache.name(),
                if dev.read_only { ", read-only" } else { "" },
            );
            first = false;
        }
        if !wait_for_connection(listener_fd, shutdown_c.as_raw_fd())
            || stopping.load(Ordering::SeqCst)
        {
            break Ok(());
        }
        let mut daemon = match VhostUserDaemon::new(
            "vhost-user-cow".into(),
            backend.clone(),
            GuestMemoryAtomic::new(Memory::new()),
        ) {
            Ok(d) => d,
            Err(e) => break Err(ServeError::VhostUser(e.to_string())),
        };
        let handlers = daemon.get_epoll_handlers();
        for (t, h) in handlers.iter().enumerate() {
            let (engine_fd, wake_fd) = backend.thread_fds(t);
            let reg = h
                .register_listener(
                    engine_fd,
                    vmm_sys_util::epoll::EventSet::IN,
                    backend.engine_event(),
                )
                .and_then(|_| {
                    h.register_listener(
                        wake_fd,
                        vmm_sys_util::epoll::EventSet::IN,
                        backend.wake_event(),
                    )
                });
            if let Err(e) = reg {
                return Err(ServeError::VhostUser(format!("register event: {e}")));
            }
        }
        if let Err(e) = daemon.start(&mut vhost_listener) {
            log::warn!("connection failed: {e}");
            backend.drain();
            continue;
        }
        log::info!("frontend connected");
        *current.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        if stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        let outcome = daemon.wait();
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        backend.drain();
        let clean = matches!(
            outcome,
            Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                ))
        );
        match outcome {
            Err(e) if !clean => log::warn!("frontend connection ended: {e}"),
            _ if backend.acked_features_bits() == 0 => log::info!(
                "frontend disconnected before negotiating (QEMU does that when its \
                 num-queues, by default one per vCPU, exceeds the {} queues offered: \
                 raise --num-queues)",
                opts.backend.num_queues
            ),
            _ => log::info!("frontend disconnected"),
        }
        if stopping.load(Ordering::SeqCst) {
            break Ok(());
        }
    };

    let sched_stats = dev.sched().stats().clone();
    if let Err(e) = dev.sync() {
        log::error!("{e}");
    }
    if let Some(p) = &socket_path {
        let _ = std::fs::remove_file(p);
    }
    log::info!(
        "write path counters: {}",
        serde_json::to_string(&sched_stats).unwrap_or_default()
    );
    if let Some(why) = dev.sched().failure() {
        log::error!("the disk stopped accepting writes: {why}");
    }
    result
}
