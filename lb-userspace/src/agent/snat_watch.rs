//! Says when the datapath ran out of SNAT ports: the drop counter
//! `drop_snat_exhausted` and the event counter `snat_took_unconfirmed`
//! (a new flow took the tuple of a flow unconfirmed for a second) are read
//! every `EVERY`, and a rise of either is logged once per check, so a
//! flood is one line every ten seconds, never silence and never a line
//! per packet.

use std::{sync::Arc, time::Duration};

use crate::datapath::maps::{Maps, named_count};

/// Watches the counter for as long as the agent runs, through the agent's
/// read-only handle on the maps (none: nothing to watch).
pub(super) fn spawn(maps: Option<Arc<Maps>>) {
    let Some(maps) = maps else { return };
    tokio::spawn(async move {
        let mut watch = SnatWatch::default();
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            watch.check(&maps);
        }
    });
}

/// How often the counter is read (and so at most how often it is logged).
const EVERY: Duration = Duration::from_secs(10);

/// The counters' last readings.
#[derive(Debug, Default)]
struct SnatWatch {
    exhausted: Reading,
    took_unconfirmed: Reading,
}

impl SnatWatch {
    /// Reads the counters; warns for each that rose since the last
    /// reading (the first reading after a start only sets the baseline:
    /// the pinned counters may hold what an earlier agent already logged).
    fn check(&mut self, maps: &Maps) {
        if let Ok(reasons) = maps.reason_counts()
            && let Some(now) = named_count(&reasons, "drop_snat_exhausted")
            && let Some(drops) = self.exhausted.rise(now)
        {
            tracing::warn!(
                drops,
                total = now,
                "new flows dropped: no free SNAT port towards their backend (lb_snat_exhausted_total)"
            );
        }
        if let Ok(events) = maps.event_counts()
            && let Some(now) = named_count(&events, "snat_took_unconfirmed")
            && let Some(taken) = self.took_unconfirmed.rise(now)
        {
            tracing::warn!(
                taken,
                total = now,
                "new flows with no free SNAT port took the tuples of flows unconfirmed for a \
                 second (a SYN flood?); those flows ended \
                 (lb_datapath_events_total{{event=\"snat_took_unconfirmed\"}})"
            );
        }
    }
}

/// One counter's last reading.
#[derive(Debug, Default)]
struct Reading {
    last: Option<u64>,
}

impl Reading {
    /// Records `now`; the rise since the last reading, when there is one.
    fn rise(&mut self, now: u64) -> Option<u64> {
        let last = self.last.replace(now)?;
        now.checked_sub(last).filter(|rise| *rise > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::Reading;

    #[test]
    fn only_a_rise_after_the_baseline_is_reported() {
        let mut watch = Reading::default();
        assert_eq!(watch.rise(5), None, "the first reading is the baseline");
        assert_eq!(watch.rise(5), None);
        assert_eq!(watch.rise(9), Some(4));
        // A counter that went back (maps recreated) is a new baseline.
        assert_eq!(watch.rise(2), None);
        assert_eq!(watch.rise(3), Some(1));
    }
}
