//! The control server: one thread, one `poll` over the listening socket,
//! its clients, the event bus and the daemon's shutdown eventfd. Commands
//! run on this thread and are quick (they copy counters or state); a
//! client that stops reading is disconnected once its backlog of answers
//! and events passes a bound, so no client can stall the others or grow
//! the daemon's memory.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use serde_json::{Map, Value};
use vmm_sys_util::eventfd::EventFd;

use super::events::EventBus;
use super::fd_passing::recv_with_fds;
use super::wire::{self, ErrorBody, ErrorClass};

/// Clients served at once; one more is told so and disconnected.
pub const MAX_CLIENTS: usize = 256;
/// Unsent bytes a client may have before it is disconnected.
const MAX_BACKLOG: usize = 4 << 20;
/// Passed descriptors a client may have waiting for their request line;
/// more are closed at once.
const MAX_CLIENT_FDS: usize = 8;

/// What the daemon executes. Names are QMP-style (`query-disk`).
pub trait Commands: Send + Sync {
    /// Every command with a one-line description.
    fn list(&self) -> Vec<(&'static str, &'static str)>;
    /// Runs a command the list names; anything else is the caller's
    /// CommandNotFound. `fd` is the first descriptor passed with the
    /// request's line (SCM_RIGHTS); a command that does not keep it
    /// closes it by dropping it.
    fn execute(
        &self,
        name: &str,
        args: &Map<String, Value>,
        fd: Option<File>,
    ) -> Result<Value, ErrorBody>;
}

/// The commands the server itself answers.
const BUILTIN: &[(&str, &str)] = &[
    ("query-commands", "list the commands and what they do"),
    (
        "subscribe-events",
        "send this client the daemon's events from now on",
    ),
];

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    subscribed: bool,
    /// Close once the output is sent (after a fatal request error).
    closing: bool,
    /// Descriptors received and not yet handed to their line, each with
    /// the stream offset of the last byte read with it.
    fds: Vec<(u64, OwnedFd)>,
    /// The stream offset of `input[0]`.
    consumed: u64,
}

impl Client {
    fn queue(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
    }

    /// Sends what it can without blocking; false when the client is gone.
    fn flush(&mut self) -> bool {
        while !self.output.is_empty() {
            // SAFETY: a valid socket and buffer of its length; MSG_NOSIGNAL
            // turns a vanished peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    self.output.as_ptr().cast(),
                    self.output.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => true,
                    io::ErrorKind::Interrupted => continue,
                    _ => false,
                };
            }
            #[allow(clippy::cast_sign_loss)] // checked non-negative
            self.output.drain(..n as usize);
        }
        true
    }
}

pub struct ControlServer {
    listener: UnixListener,
    name: String,
    commands: Arc<dyn Commands>,
    events: Arc<EventBus>,
}

impl ControlServer {
    /// `name` is how log lines call the socket (its path).
    pub fn new(
        listener: UnixListener,
        name: String,
        commands: Arc<dyn Commands>,
        events: Arc<EventBus>,
    ) -> io::Result<ControlServer> {
        listener.set_nonblocking(true)?;
        events.enable();
        Ok(ControlServer {
            listener,
            name,
            commands,
            events,
        })
    }

    /// Serves until `shutdown` is readable.
    pub fn run(self, shutdown: &EventFd) {
        let mut clients: Vec<Client> = Vec::new();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            fds.clear();
            for fd in [
                shutdown.as_raw_fd(),
                self.events.wake_fd().as_raw_fd(),
                self.listener.as_raw_fd(),
            ] {
                fds.push(pollfd(fd, libc::POLLIN));
            }
            for c in &clients {
                let mut ev = libc::POLLIN;
                if !c.output.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.stream.as_raw_fd(), ev));
            }
            // SAFETY: a valid pollfd array of its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{}: poll: {}", self.name, io::Error::last_os_error());
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            let mut keep = vec![true; clients.len()];
            for (i, c) in clients.iter_mut().enumerate() {
                let revents = fds[3 + i].revents;
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    keep[i] = self.read_client(c);
                }
            }
            if fds[1].revents != 0 {
                let events = self.events.drain();
                for c in clients.iter_mut().filter(|c| c.subscribed) {
                    for e in &events {
                        c.queue(&wire::event_line(e.name, e.data.clone(), e.at));
                    }
                }
            }
            for (i, c) in clients.iter_mut().enumerate() {
                if !keep[i] {
                    continue;
                }
                if !c.flush() || (c.closing && c.output.is_empty()) {
                    keep[i] = false;
                } else if c.output.len() > MAX_BACKLOG {
                    // Only local clients with access to the socket get here.
                    log::warn!(
                        "{}: a client read nothing while {} bytes waited for it: disconnected",
                        self.name,
                        c.output.len()
                    );
                    keep[i] = false;
                }
            }
            let mut k = keep.iter();
            clients.retain(|_| *k.next().unwrap_or(&false));
            if fds[2].revents != 0 {
                self.accept(&mut clients);
            }
        }
    }

    fn accept(&self, clients: &mut Vec<Client>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("{}: accept: {e}", self.name);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut c = Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                subscribed: false,
                closing: false,
                fds: Vec::new(),
                consumed: 0,
            };
            if clients.len() >= MAX_CLIENTS {
                let e = ErrorBody::new(
                    ErrorClass::GenericError,
                    format!("too many control clients (at most {MAX_CLIENTS})"),
                );
                c.queue(&wire::error_line(&e, None));
                let _ = c.flush();
                continue;
            }
            c.queue(&wire::greeting_line());
            clients.push(c);
        }
    }

    /// Reads what the client sent and answers every complete line; false
    /// when the client is gone.
    fn read_client(&self, c: &mut Client) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match recv_with_fds(&c.stream, &mut buf) {
                // Gone, possibly in the middle of a line: nothing to answer.
                Ok((0, _)) => return false,
                Ok((n, fds)) => {
                    // The last byte read came with them (fd_passing.rs).
                    let at = c.consumed + (c.input.len() + n) as u64 - 1;
                    for fd in fds {
                        if c.fds.len() < MAX_CLIENT_FDS {
                            c.fds.push((at, fd));
                        } else {
                            crate::log_limited!(
                                log::Level::Warn,
                                "control fds",
                                "{}: a client passed more than {MAX_CLIENT_FDS} descriptors \
                                 ahead of its requests: the extra ones are closed",
                                self.name
                            );
                        }
                    }
                    c.input.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
            if c.input.len() > wire::MAX_LINE && !c.input.contains(&b'\n') {
                break;
            }
        }
        let mut input = std::mem::take(&mut c.input);
        let mut start = 0;
        while let Some(pos) = input[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line = &input[start..end];
            start = end + 1;
            // The descriptors that came with this line's bytes: the first
            // goes to its command, the others (and any the command does not
            // keep) are closed once it is handled.
            let line_end = c.consumed + end as u64;
            let split = c.fds.partition_point(|(at, _)| *at <= line_end);
            let mut mine = c.fds.drain(..split).map(|(_, fd)| File::from(fd));
            let fd = mine.next();
            drop(mine);
            if c.closing || line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if line.len() > wire::MAX_LINE {
                self.refuse_long_line(c);
                continue;
            }
            let answer = self.answer(c, line, fd);
            c.queue(&answer);
        }
        input.drain(..start);
        c.consumed += start as u64;
        c.input = input;
        if c.input.len() > wire::MAX_LINE {
            self.refuse_long_line(c);
            c.consumed += c.input.len() as u64;
            c.input.clear();
            c.fds.clear();
        }
        true
    }

    fn refuse_long_line(&self, c: &mut Client) {
        let e = ErrorBody::new(
            ErrorClass::InvalidRequest,
            format!("request longer than {} bytes", wire::MAX_LINE),
        );
        c.queue(&wire::error_line(&e, None));
        c.closing = true;
    }

    fn answer(&self, c: &mut Client, line: &[u8], fd: Option<File>) -> Vec<u8> {
        let req = match wire::parse_request(line) {
            Ok(r) => r,
            Err((id, e)) => return wire::error_line(&e, id),
        };
        let result = match req.execute.as_str() {
            "query-commands" => Ok(self.command_list()),
            "subscribe-events" => {
                c.subscribed = true;
                Ok(Value::Object(Map::new()))
            }
            name if self.commands.list().iter().any(|(n, _)| *n == name) => {
                self.commands.execute(name, &req.arguments, fd)
            }
            name => Err(ErrorBody::new(
                ErrorClass::CommandNotFound,
                format!("no such command: {name} (query-commands lists them)"),
            )),
        };
        match result {
            Ok(v) => wire::return_line(v, req.id),
            Err(e) => wire::error_line(&e, req.id),
        }
    }

    fn command_list(&self) -> Value {
        let mut all: Vec<(&str, &str)> = BUILTIN.to_vec();
        all.extend(self.commands.list());
        all.sort_by_key(|(n, _)| *n);
        Value::Array(
            all.into_iter()
                .map(|(name, help)| serde_json::json!({ "name": name, "help": help }))
                .collect(),
        )
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
