//! Spawning a thread that is already running when `spawn_started`
//! returns. A thread's own start-up (glibc's set_robust_list and rseq,
//! Rust's signal stack and thread name) makes system calls the daemon's
//! seccomp filter does not allow, with every signal blocked; a thread
//! that got going only after the filter was installed would be killed
//! there without a word. So every thread is made before the filter and
//! waited for. A new thread logs under its maker's export tag
//! ([`crate::log_tag`]).

use std::io;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{Builder, JoinHandle, Scope, ScopedJoinHandle};

/// Spawns `f` on a thread called `name` and waits until it has started.
pub fn spawn_started<F, T>(name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (begin, started) = Begin::new();
    let handle = Builder::new().name(name).spawn(move || begin.run(f))?;
    started.wait();
    Ok(handle)
}

/// [`spawn_started`] in a scope: the thread may borrow from its maker.
pub fn spawn_started_scoped<'scope, F, T>(
    scope: &'scope Scope<'scope, '_>,
    name: String,
    f: F,
) -> io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    let (begin, started) = Begin::new();
    let handle = Builder::new()
        .name(name)
        .spawn_scoped(scope, move || begin.run(f))?;
    started.wait();
    Ok(handle)
}

/// What a new thread does first: take its maker's tag and say it started.
struct Begin {
    started: SyncSender<()>,
    tag: Option<Arc<str>>,
}

struct Started(Receiver<()>);

impl Begin {
    fn new() -> (Begin, Started) {
        let (tx, rx) = sync_channel(0);
        let begin = Begin {
            started: tx,
            tag: crate::log_tag::current(),
        };
        (begin, Started(rx))
    }

    fn run<T>(self, f: impl FnOnce() -> T) -> T {
        crate::log_tag::set(self.tag);
        let _ = self.started.send(());
        f()
    }
}

impl Started {
    /// Returns once the thread runs its closure (its start-up is done).
    fn wait(self) {
        let _ = self.0.recv();
    }
}
