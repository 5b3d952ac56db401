//! At most one log line per second per failure kind. While a dependency is
//! down every request fails the same way; thousands of identical lines a
//! second bury the first one and cost more than the requests themselves.
//! The line that does get through says how many were left out.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One line per kind per this long.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct LogLimiter {
    /// Keyed by static labels (site, error kind): bounded by the code.
    slots: Mutex<HashMap<(&'static str, &'static str), Slot>>,
}

struct Slot {
    last: Instant,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(suppressed)` when a line for `(site, kind)` may be written now,
    /// with the number of lines left out since the previous one; `None`
    /// when this line is to be left out (and counted).
    pub fn admit(&self, site: &'static str, kind: &'static str) -> Option<u64> {
        self.admit_at(site, kind, Instant::now())
    }

    fn admit_at(&self, site: &'static str, kind: &'static str, now: Instant) -> Option<u64> {
        // A panic elsewhere while holding the lock leaves a consistent map.
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match slots.get_mut(&(site, kind)) {
            Some(slot) if now.duration_since(slot.last) < INTERVAL => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                slot.last = now;
                Some(std::mem::take(&mut slot.suppressed))
            }
            None => {
                slots.insert(
                    (site, kind),
                    Slot {
                        last: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_per_kind_with_the_count_left_out() {
        let limiter = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.admit_at("claim", "down", t0), Some(0));
        for i in 1..=99 {
            assert_eq!(
                limiter.admit_at("claim", "down", t0 + Duration::from_millis(i * 9)),
                None
            );
        }
        // Another kind, or another site, has its own second.
        assert_eq!(limiter.admit_at("claim", "timeout", t0), Some(0));
        assert_eq!(limiter.admit_at("sms", "down", t0), Some(0));
        assert_eq!(limiter.admit_at("claim", "down", t0 + INTERVAL), Some(99));
        assert_eq!(
            limiter.admit_at("claim", "down", t0 + INTERVAL * 3),
            Some(0)
        );
    }
}
