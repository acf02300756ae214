//! When the agent syncs without being asked to: a retry after a sync that
//! did not write everything (with exponential backoff), and the periodic
//! resync that compares the pinned maps with what the agent believes they
//! hold and repairs any drift. Pure: the clock is passed in.

use std::time::{Duration, Instant};

/// The first retry's delay.
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest delay between retries.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(30);
/// Failed syncs in a row after which `/readyz` says not ready: the first
/// failure is retried at once, and only a failing retry means the agent
/// cannot converge.
pub(super) const UNREADY_AFTER_FAILURES: u32 = 2;

/// The retry and resync deadlines.
#[derive(Debug)]
pub(super) struct SyncTimers {
    /// When to retry, while the last sync did not write everything.
    retry_at: Option<Instant>,
    /// The delay before the next retry after this one.
    next_delay: Duration,
    /// Syncs in a row that had failed map writes.
    pub(super) failed_in_a_row: u32,
    /// Period of the full resync (`None`: off).
    resync_every: Option<Duration>,
    /// When the next full resync is due.
    resync_at: Option<Instant>,
}

/// What a timer asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Retry the sync (a full plan against what the maps hold).
    Retry,
    /// Read the maps back, compare, repair.
    Resync,
}

impl SyncTimers {
    pub(super) fn new(resync_every: Option<Duration>, now: Instant) -> Self {
        Self {
            retry_at: None,
            next_delay: FIRST_RETRY,
            failed_in_a_row: 0,
            resync_every,
            resync_at: resync_every.map(|every| now + every),
        }
    }

    /// Records a sync's outcome: `complete` when every write succeeded and
    /// no frontend was left out. Returns the retry delay, if one is set.
    pub(super) fn after_sync(
        &mut self,
        failed_writes: bool,
        complete: bool,
        now: Instant,
    ) -> Option<Duration> {
        if failed_writes {
            self.failed_in_a_row += 1;
        } else {
            self.failed_in_a_row = 0;
        }
        if complete {
            self.retry_at = None;
            self.next_delay = FIRST_RETRY;
            return None;
        }
        let delay = self.next_delay;
        self.retry_at = Some(now + delay);
        self.next_delay = (delay * 2).min(MAX_RETRY);
        Some(delay)
    }

    /// The next deadline, if any.
    pub(super) fn next(&self) -> Option<Instant> {
        match (self.retry_at, self.resync_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now` (a retry first), and re-arms it.
    pub(super) fn take_due(&mut self, now: Instant) -> Option<Due> {
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            return Some(Due::Retry);
        }
        if self.resync_at.is_some_and(|at| at <= now) {
            self.resync_at = self.resync_every.map(|every| now + every);
            return Some(Due::Resync);
        }
        None
    }
}

/// Sleeps until `deadline`; never returns without one.
pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap_and_reset_on_success() {
        let start = Instant::now();
        let mut timers = SyncTimers::new(None, start);
        assert_eq!(timers.next(), None);
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(timers.after_sync(true, false, start).unwrap());
        }
        assert_eq!(delays[0], FIRST_RETRY);
        assert_eq!(delays[1], FIRST_RETRY * 2);
        assert_eq!(delays[2], FIRST_RETRY * 4);
        assert_eq!(*delays.last().unwrap(), MAX_RETRY);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(timers.failed_in_a_row, 12);
        assert_eq!(timers.after_sync(false, true, start), None);
        assert_eq!(timers.failed_in_a_row, 0);
        assert_eq!(timers.next(), None);
        assert_eq!(timers.after_sync(true, false, start), Some(FIRST_RETRY));
    }

    #[test]
    fn an_incomplete_plan_without_failed_writes_is_retried_but_not_counted_as_failing() {
        let start = Instant::now();
        let mut timers = SyncTimers::new(None, start);
        assert_eq!(timers.after_sync(false, false, start), Some(FIRST_RETRY));
        assert_eq!(timers.failed_in_a_row, 0);
    }

    #[test]
    fn retry_comes_before_resync_and_resync_rearms() {
        let start = Instant::now();
        let every = Duration::from_secs(60);
        let mut timers = SyncTimers::new(Some(every), start);
        assert_eq!(timers.next(), Some(start + every));
        assert_eq!(timers.take_due(start), None);
        timers.after_sync(true, false, start);
        assert_eq!(timers.next(), Some(start + FIRST_RETRY));
        let later = start + every;
        assert_eq!(timers.take_due(later), Some(Due::Retry));
        assert_eq!(timers.take_due(later), Some(Due::Resync));
        assert_eq!(timers.take_due(later), None);
        assert_eq!(timers.next(), Some(later + every));
    }
}
