//! Which export a log line is about. A daemon serving several disks
//! (`serve --export`) runs each export's threads under that export's tag,
//! and every line they log starts with it; a daemon serving one disk logs
//! untagged, as before. Threads made with [`crate::spawn`] inherit the tag
//! of the thread that made them.

use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    static TAG: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// This thread's tag.
pub fn current() -> Option<Arc<str>> {
    TAG.with(|t| t.borrow().clone())
}

/// Sets this thread's tag; returns the previous one.
pub fn set(tag: Option<Arc<str>>) -> Option<Arc<str>> {
    TAG.with(|t| std::mem::replace(&mut *t.borrow_mut(), tag))
}

/// This thread's tag until dropped, then the one before.
pub struct Scoped(Option<Arc<str>>);

impl Scoped {
    pub fn new(tag: Option<Arc<str>>) -> Scoped {
        Scoped(set(tag))
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        set(self.0.take());
    }
}

/// A logger that puts the thread's tag in front of each message and
/// hands the line on to `inner` (whose format, filter and colours stay).
pub struct TaggedLogger<L>(pub L);

impl<L: log::Log> log::Log for TaggedLogger<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let Some(tag) = current() else {
            return self.0.log(record);
        };
        self.0.log(
            &log::Record::builder()
                .args(format_args!("{tag}: {}", record.args()))
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.0.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl log::Log for &Lines {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    fn line(logger: &dyn log::Log, msg: &str) {
        logger.log(
            &log::Record::builder()
                .args(format_args!("{msg}"))
                .level(log::Level::Info)
                .build(),
        );
    }

    #[test]
    fn lines_carry_the_tag_of_their_thread_and_scopes_restore_the_old_one() {
        let lines = Lines::default();
        let logger = TaggedLogger(&lines);
        line(&logger, "untagged");
        {
            let _a = Scoped::new(Some("vm1.cow".into()));
            line(&logger, "first");
            {
                let _b = Scoped::new(Some("vm2.cow".into()));
                line(&logger, "second");
            }
            line(&logger, "first again");
            std::thread::scope(|s| {
                s.spawn(|| line(&logger, "plain thread"));
            });
        }
        line(&logger, "untagged again");
        assert_eq!(
            *lines.0.lock().unwrap(),
            [
                "untagged",
                "vm1.cow: first",
                "vm2.cow: second",
                "vm1.cow: first again",
                "plain thread",
                "untagged again"
            ]
        );
    }

    #[test]
    fn spawned_threads_inherit_the_tag() {
        let _a = Scoped::new(Some("disk-a".into()));
        let seen = crate::spawn::spawn_started("t".into(), current)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(seen.as_deref(), Some("disk-a"));
        let seen = std::thread::scope(|s| {
            crate::spawn::spawn_started_scoped(s, "t".into(), current)
                .unwrap()
                .join()
                .unwrap()
        });
        assert_eq!(seen.as_deref(), Some("disk-a"));
    }
}
