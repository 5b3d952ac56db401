//! A small pool of interchangeable, ready-to-run evaluators (interpreter
//! engines or compiled-policy VMs), so a request neither builds one nor holds
//! a lock while it evaluates: the lock is held only to pop or push.

use std::sync::{Mutex, MutexGuard};

#[derive(Debug)]
pub(super) struct Pool<T> {
    idle: Mutex<Vec<T>>,
    /// Most idle items kept; extra ones are dropped on return.
    max_idle: usize,
}

impl<T> Pool<T> {
    /// A pool sized for this machine: one prepared item per core, up to
    /// twice that (and at least 4) kept idle. `make` builds each item.
    pub(super) fn per_core<E>(mut make: impl FnMut() -> Result<T, E>) -> Result<Self, E> {
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get());
        let idle = (0..parallelism).map(|_| make()).collect::<Result<_, _>>()?;
        Ok(Pool {
            idle: Mutex::new(idle),
            max_idle: parallelism.saturating_mul(2).max(4),
        })
    }

    /// An idle item, or `None` when the pool has run dry.
    pub(super) fn take(&self) -> Option<T> {
        self.lock().pop()
    }

    /// Returns an item for the next request (dropped if enough are idle).
    pub(super) fn put(&self, item: T) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(item);
        }
    }

    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub(super) fn max_idle(&self) -> usize {
        self.max_idle
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        // The pool holds only interchangeable items; a panic elsewhere
        // cannot leave it inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
