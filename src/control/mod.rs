//! The control socket: a line-oriented JSON protocol shaped like QMP
//! (docs/control.md). This layer knows nothing of the disk: the wire
//! format, the server that multiplexes clients and the event stream, and
//! the client that `vhost-user-cow ctl` uses. The daemon's commands are in
//! `daemon/control_commands.rs`.

pub mod client;
pub mod ctl;
pub mod ctl_backup;
pub mod events;
pub mod fd_passing;
pub mod server;
pub mod wire;
