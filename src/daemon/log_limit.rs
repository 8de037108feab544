//! Rate-limited logging for the lines a guest or a frontend can trigger:
//! at most one line per second per cause; the next line after a quiet
//! second says how many were suppressed, and the daemon reports what is
//! left at exit. A hostile guest can then not flood the log (or the disk
//! under it). Causes are counted per export ([`crate::log_tag`]), so that
//! one guest's flood does not hide another disk's lines.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

const WINDOW: Duration = Duration::from_secs(1);

struct Cause {
    last_logged: Instant,
    suppressed: u64,
}

/// A cause of one export (None: the daemon serves one disk, or the line
/// is not about a disk).
type Key = (Option<Arc<str>>, &'static str);

static CAUSES: LazyLock<Mutex<FxHashMap<Key, Cause>>> =
    LazyLock::new(|| Mutex::new(FxHashMap::default()));

/// Whether a line for `cause` may be logged now; if so, how many were
/// suppressed since the last one.
pub fn allow(cause: &'static str) -> Option<u64> {
    allow_at((crate::log_tag::current(), cause), Instant::now())
}

fn allow_at(key: Key, now: Instant) -> Option<u64> {
    let mut causes = CAUSES.lock().unwrap_or_else(|p| p.into_inner());
    match causes.get_mut(&key) {
        Some(c) if now.duration_since(c.last_logged) < WINDOW => {
            c.suppressed += 1;
            None
        }
        Some(c) => {
            c.last_logged = now;
            Some(std::mem::take(&mut c.suppressed))
        }
        None => {
            causes.insert(
                key,
                Cause {
                    last_logged: now,
                    suppressed: 0,
                },
            );
            Some(0)
        }
    }
}

/// Logs, once, how many lines of each cause were suppressed and never
/// followed by a logged one.
pub fn report_suppressed() {
    let mut causes = CAUSES.lock().unwrap_or_else(|p| p.into_inner());
    for ((tag, cause), c) in causes.iter_mut() {
        if c.suppressed > 0 {
            let _tag = crate::log_tag::Scoped::new(tag.clone());
            log::warn!("{} more \"{cause}\" lines were suppressed", c.suppressed);
            c.suppressed = 0;
        }
    }
}

/// `log::log!` for a line a guest or frontend can cause, rate-limited per
/// `cause` (a short static name).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $cause:expr, $($arg:tt)+) => {
        if let Some(n) = $crate::daemon::log_limit::allow($cause) {
            if n > 0 {
                log::log!(
                    $level,
                    "{} ({n} more like this suppressed)",
                    format_args!($($arg)+)
                );
            } else {
                log::log!($level, $($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_then_the_count() {
        let t0 = Instant::now();
        let cause = (None, "test cause");
        assert_eq!(allow_at(cause.clone(), t0), Some(0));
        for i in 1..100 {
            assert_eq!(allow_at(cause.clone(), t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            allow_at(cause.clone(), t0 + Duration::from_millis(1000)),
            Some(99)
        );
        assert_eq!(allow_at(cause, t0 + Duration::from_millis(1001)), None);
        // Another cause is not held back, nor the same cause of another
        // export.
        let later = t0 + Duration::from_millis(1001);
        assert_eq!(allow_at((None, "other cause"), later), Some(0));
        assert_eq!(
            allow_at((Some("b.cow".into()), "test cause"), later),
            Some(0)
        );
    }
}
