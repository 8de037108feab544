//! A client of the control socket (what `vhost-user-cow ctl` and the tests
//! use): connect, read the greeting, execute commands, read events.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::wire::{self, ErrorBody, ServerMessage};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{path}: cannot connect: {source} (is the daemon running with --control-socket?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the daemon closed the connection")]
    Closed { path: PathBuf },
    #[error("{path}: unexpected message from the daemon: {what}")]
    Protocol { path: PathBuf, what: String },
}

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// Events that arrived while waiting for an answer.
    events: VecDeque<(String, Value)>,
    pub greeting: Value,
}

impl Client {
    /// Connects and reads the greeting; `timeout` bounds every read.
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let io = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(timeout).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut c = Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        match c.read_message()? {
            ServerMessage::Greeting(g) => c.greeting = g,
            ServerMessage::Error { error, .. } => {
                return Err(c.protocol(format!("refused: {}", error.desc)))
            }
            other => return Err(c.protocol(format!("expected the greeting, got {other:?}"))),
        }
        Ok(c)
    }

    fn protocol(&self, what: String) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            what,
        }
    }

    fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        let mut line = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        wire::parse_server_line(&line).map_err(|what| self.protocol(what))
    }

    /// Sends raw bytes (tests send malformed requests with it).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer
            .write_all(bytes)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Sends raw bytes with a descriptor passed with their first byte.
    pub fn send_raw_with_fd(&mut self, bytes: &[u8], fd: RawFd) -> Result<(), ClientError> {
        super::fd_passing::send_with_fd(&self.writer, bytes, fd).map_err(|source| ClientError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Reads the next answer (a return or an error), keeping events for
    /// [`Client::next_event`].
    pub fn read_answer(
        &mut self,
    ) -> Result<(Result<Value, ErrorBody>, Option<Value>), ClientError> {
        loop {
            match self.read_message()? {
                ServerMessage::Return { value, id } => return Ok((Ok(value), id)),
                ServerMessage::Error { error, id } => return Ok((Err(error), id)),
                ServerMessage::Event { name, data } => self.events.push_back((name, data)),
                ServerMessage::Greeting(_) => return Err(self.protocol("a second greeting".into())),
            }
        }
    }

    /// Executes a command; the outer error is the connection's, the inner
    /// the command's.
    pub fn execute(
        &mut self,
        name: &str,
        arguments: Value,
    ) -> Result<Result<Value, ErrorBody>, ClientError> {
        self.execute_passing(name, arguments, None)
    }

    /// Executes a command with descriptor `fd` passed along with its line
    /// (SCM_RIGHTS), as `backup` wants its target.
    pub fn execute_with_fd(
        &mut self,
        name: &str,
        arguments: Value,
        fd: RawFd,
    ) -> Result<Result<Value, ErrorBody>, ClientError> {
        self.execute_passing(name, arguments, Some(fd))
    }

    fn execute_passing(
        &mut self,
        name: &str,
        arguments: Value,
        fd: Option<RawFd>,
    ) -> Result<Result<Value, ErrorBody>, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = serde_json::json!({ "execute": name, "id": id });
        if !arguments.is_null() {
            req["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&req).unwrap_or_default();
        line.push(b'\n');
        match fd {
            None => self.send_raw(&line)?,
            Some(fd) => self.send_raw_with_fd(&line, fd)?,
        }
        let (answer, got) = self.read_answer()?;
        if got != Some(Value::from(id)) {
            return Err(self.protocol(format!("answer for id {got:?}, expected {id}")));
        }
        Ok(answer)
    }

    /// The next event (after those that came with earlier answers).
    pub fn next_event(&mut self) -> Result<(String, Value), ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        match self.read_message()? {
            ServerMessage::Event { name, data } => Ok((name, data)),
            other => Err(self.protocol(format!("expected an event, got {other:?}"))),
        }
    }
}
