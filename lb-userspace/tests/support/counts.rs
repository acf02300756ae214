//! What a load of new connections observed (`support::load`): counts by
//! kind of outcome, per target and per epoch, and the report of a whole
//! load, as text for the log and as JSON for the benchmark.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// What one target's new connections observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) attempts: u64,
    pub(crate) answered: u64,
    pub(crate) refused: u64,
    pub(crate) timeout: u64,
    pub(crate) reset: u64,
    /// EOF before the answer.
    pub(crate) closed: u64,
    /// An answer that is not what a backend of this Service says.
    pub(crate) wrong: u64,
    pub(crate) error: u64,
    /// Answered, but a packet had to be sent again (a drop on the way).
    pub(crate) retransmitted: u64,
    /// Slowest answered connection, milliseconds.
    pub(crate) max_ms: u64,
}

impl Counts {
    /// Attempts that did not get their answer.
    pub(crate) fn failed(&self) -> u64 {
        self.refused + self.timeout + self.reset + self.closed + self.wrong + self.error
    }

    pub(crate) fn add(&mut self, other: &Self) {
        self.attempts += other.attempts;
        self.answered += other.answered;
        self.refused += other.refused;
        self.timeout += other.timeout;
        self.reset += other.reset;
        self.closed += other.closed;
        self.wrong += other.wrong;
        self.error += other.error;
        self.retransmitted += other.retransmitted;
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// Answered share of the attempts (1 when there were none).
    pub(crate) fn success_ratio(&self) -> f64 {
        if self.attempts == 0 {
            return 1.0;
        }
        ratio(self.answered, self.attempts)
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "attempts": self.attempts, "answered": self.answered, "failed": self.failed(),
            "refused": self.refused, "timeout": self.timeout, "reset": self.reset,
            "closed": self.closed, "wrong": self.wrong, "error": self.error,
            "retransmitted": self.retransmitted, "max_ms": self.max_ms,
        })
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} attempts, {} answered, {} failed (refused {}, timeout {}, reset {}, closed {}, \
             wrong {}, error {}), {} retransmitted, slowest {} ms",
            self.attempts,
            self.answered,
            self.failed(),
            self.refused,
            self.timeout,
            self.reset,
            self.closed,
            self.wrong,
            self.error,
            self.retransmitted,
            self.max_ms
        )
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts far below 2^52: exact as f64"
)]
pub(crate) fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

/// One kind of outcome of a new connection.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Answered,
    Refused,
    Timeout,
    Reset,
    Closed,
    Wrong,
    Error,
}

/// The atomic twin of `Counts`, written by the load's threads.
#[derive(Default)]
pub(crate) struct Tally {
    by_kind: [AtomicU64; 7],
    retransmitted: AtomicU64,
    max_ms: AtomicU64,
}

impl Tally {
    pub(crate) fn record(&self, kind: Kind, retransmitted: bool, took: Duration) {
        self.by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
        if matches!(kind, Kind::Answered) {
            if retransmitted {
                self.retransmitted.fetch_add(1, Ordering::Relaxed);
            }
            let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
            self.max_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        let n = |k: Kind| self.by_kind[k as usize].load(Ordering::Relaxed);
        let mut counts = Counts {
            answered: n(Kind::Answered),
            refused: n(Kind::Refused),
            timeout: n(Kind::Timeout),
            reset: n(Kind::Reset),
            closed: n(Kind::Closed),
            wrong: n(Kind::Wrong),
            error: n(Kind::Error),
            retransmitted: self.retransmitted.load(Ordering::Relaxed),
            max_ms: self.max_ms.load(Ordering::Relaxed),
            attempts: 0,
        };
        counts.attempts = counts.answered + counts.failed();
        counts
    }
}

/// One epoch of a load.
#[derive(Clone, Debug)]
pub(crate) struct EpochReport {
    pub(crate) name: String,
    pub(crate) secs: f64,
    /// In the order of the targets.
    pub(crate) per_target: Vec<Counts>,
}

impl EpochReport {
    pub(crate) fn total(&self) -> Counts {
        let mut total = Counts::default();
        for counts in &self.per_target {
            total.add(counts);
        }
        total
    }
}

/// What a load observed.
#[derive(Clone, Debug)]
pub(crate) struct LoadReport {
    /// The rate asked for.
    pub(crate) rate: u32,
    pub(crate) targets: Vec<String>,
    pub(crate) epochs: Vec<EpochReport>,
    /// The first failures, with when and where.
    pub(crate) samples: Vec<String>,
}

impl LoadReport {
    pub(crate) fn total(&self) -> Counts {
        let mut total = Counts::default();
        for epoch in &self.epochs {
            total.add(&epoch.total());
        }
        total
    }

    /// Seconds from the start to the stop.
    pub(crate) fn secs(&self) -> f64 {
        self.epochs.iter().map(|e| e.secs).sum()
    }

    /// New connections per second actually made (attempts / time).
    pub(crate) fn achieved_rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let attempts = self.total().attempts as f64;
        attempts / self.secs()
    }

    /// The counts of epoch NAME.
    pub(crate) fn epoch(&self, name: &str) -> Counts {
        self.epochs
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no epoch {name:?}"))
            .total()
    }

    /// Everything, for the log and for failure messages.
    pub(crate) fn text(&self) -> String {
        let mut text = format!(
            "asked {} conn/s, achieved {:.0} conn/s over {:.2} s: {}\n",
            self.rate,
            self.achieved_rate(),
            self.secs(),
            self.total()
        );
        for epoch in &self.epochs {
            let _ = writeln!(
                text,
                "  epoch {:?} ({:.2} s): {}",
                epoch.name,
                epoch.secs,
                epoch.total()
            );
            for (label, counts) in self.targets.iter().zip(&epoch.per_target) {
                if counts.failed() > 0 || counts.retransmitted > 0 {
                    let _ = writeln!(text, "    {label}: {counts}");
                }
            }
        }
        for sample in &self.samples {
            let _ = writeln!(text, "  failure: {sample}");
        }
        text
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "rate_asked": self.rate,
            "rate_achieved": self.achieved_rate(),
            "secs": self.secs(),
            "total": self.total().json(),
            "epochs": self.epochs.iter().map(|e| json!({
                "name": e.name,
                "secs": e.secs,
                "total": e.total().json(),
            })).collect::<Vec<_>>(),
            "failures": self.samples,
        })
    }
}
