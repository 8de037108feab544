//! Which frontend connection the device is serving now.
//!
//! The daemon accepts a second connection while the first is open (a live
//! migration's destination QEMU connects while the source still runs), but
//! only one connection's rings are ever handed to the workers: the active
//! one. A connection becomes active when it starts a ring while no other
//! connection is active, and stays active until every ring it started has
//! been stopped again (GET_VRING_BASE, SET_VRING_ENABLE 0, RESET_OWNER) or
//! it has disconnected. Rings another connection starts meanwhile wait, not
//! served and not refused, and start once the device is free
//! (docs/design.md, "Two connections, one active").
//!
//! Only the message thread (which handles every connection) changes it.

use std::sync::Mutex;

/// A connection's number, counted from 1 in the order they were accepted.
pub type ConnectionId = u64;

#[derive(Debug, Default)]
pub struct ActiveConnection {
    owner: Mutex<Option<ConnectionId>>,
}

/// What [`ActiveConnection::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The connection was active already.
    Held,
    /// The device was free; the connection is active from now on.
    Taken,
    /// Another connection is active.
    Busy(ConnectionId),
}

impl ActiveConnection {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ConnectionId>> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `id` the active connection unless another one is.
    pub fn claim(&self, id: ConnectionId) -> Claim {
        let mut owner = self.lock();
        match *owner {
            Some(o) if o == id => Claim::Held,
            Some(o) => Claim::Busy(o),
            None => {
                *owner = Some(id);
                Claim::Taken
            }
        }
    }

    /// `id` no longer uses the device. Returns whether it was active.
    pub fn release(&self, id: ConnectionId) -> bool {
        let mut owner = self.lock();
        if *owner == Some(id) {
            *owner = None;
            true
        } else {
            false
        }
    }

    pub fn owner(&self) -> Option<ConnectionId> {
        *self.lock()
    }

    pub fn is_active(&self, id: ConnectionId) -> bool {
        self.owner() == Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_at_a_time() {
        let a = ActiveConnection::default();
        assert_eq!(a.claim(1), Claim::Taken);
        assert_eq!(a.claim(1), Claim::Held);
        assert_eq!(a.claim(2), Claim::Busy(1));
        assert!(!a.release(2), "2 was never active");
        assert!(a.is_active(1));
        assert!(a.release(1));
        assert_eq!(a.owner(), None);
        assert_eq!(a.claim(2), Claim::Taken);
    }
}
