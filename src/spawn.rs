//! Spawning a thread that is already running when `spawn_started`
//! returns. A thread's own start-up (glibc's set_robust_list and rseq,
//! Rust's signal stack and thread name) makes system calls the daemon's
//! seccomp filter does not allow, with every signal blocked; a thread
//! that got going only after the filter was installed would be killed
//! there without a word. So every thread is made before the filter and
//! waited for.

use std::io;
use std::sync::mpsc::sync_channel;
use std::thread::{Builder, JoinHandle};

/// Spawns `f` on a thread called `name` and waits until it has started.
pub fn spawn_started<F, T>(name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (started, wait) = sync_channel(0);
    let handle = Builder::new().name(name).spawn(move || {
        let _ = started.send(());
        f()
    })?;
    // The thread runs our closure only after its start-up is done.
    let _ = wait.recv();
    Ok(handle)
}
