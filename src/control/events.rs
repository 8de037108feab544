//! Events from anywhere in the daemon to the control server thread, which
//! sends them to the clients that subscribed. Emitting never blocks and
//! never fails: events beyond a bounded backlog are dropped and counted
//! (the next delivered batch starts with an `EVENTS_LOST` event).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

/// Events waiting for the server thread at most.
const BACKLOG: usize = 1024;

pub struct Event {
    pub name: &'static str,
    pub data: Value,
    pub at: Duration,
}

struct Queue {
    events: VecDeque<Event>,
    lost: u64,
}

pub struct EventBus {
    /// Set once a control server runs: without one, emitting is a load.
    enabled: AtomicBool,
    queue: Mutex<Queue>,
    /// Readable when events wait.
    wake: EventFd,
}

impl EventBus {
    pub fn new() -> std::io::Result<EventBus> {
        Ok(EventBus {
            enabled: AtomicBool::new(false),
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                lost: 0,
            }),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn emit(&self, name: &'static str, data: Value) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.events.len() >= BACKLOG {
                q.events.pop_front();
                q.lost += 1;
            }
            q.events.push_back(Event { name, data, at });
        }
        let _ = self.wake.write(1);
    }

    /// Everything waiting, oldest first, with an `EVENTS_LOST` event first
    /// when some were dropped.
    pub fn drain(&self) -> Vec<Event> {
        let _ = self.wake.read();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(q.events.len() + 1);
        if q.lost > 0 {
            out.push(Event {
                name: "EVENTS_LOST",
                data: serde_json::json!({ "count": q.lost }),
                at: q.events.front().map_or(Duration::ZERO, |e| e.at),
            });
            q.lost = 0;
        }
        out.extend(q.events.drain(..));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nothing_is_queued_until_enabled() {
        let bus = EventBus::new().unwrap();
        bus.emit("A", json!({}));
        assert!(bus.drain().is_empty());
        bus.enable();
        bus.emit("A", json!({"n": 1}));
        let got = bus.drain();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "A");
        assert_eq!(got[0].data, json!({"n": 1}));
        assert!(bus.drain().is_empty());
    }

    #[test]
    fn an_overflowing_backlog_keeps_the_newest_and_says_how_many_were_lost() {
        let bus = EventBus::new().unwrap();
        bus.enable();
        for i in 0..BACKLOG + 5 {
            bus.emit("N", json!(i));
        }
        let got = bus.drain();
        assert_eq!(got.len(), BACKLOG + 1);
        assert_eq!(got[0].name, "EVENTS_LOST");
        assert_eq!(got[0].data, json!({"count": 5}));
        assert_eq!(got[1].data, json!(5));
        assert_eq!(got[BACKLOG].data, json!(BACKLOG + 4));
    }
}
