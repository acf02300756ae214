//! Says when the datapath ran out of SNAT ports: the drop counter
//! `drop_snat_exhausted` is read every `EVERY` and a rise is logged once
//! per check, so a flood of drops is one line every ten seconds, never
//! silence and never a line per packet.

use std::{sync::Arc, time::Duration};

use crate::datapath::maps::Maps;

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

/// The drop counter's last reading.
#[derive(Debug, Default)]
struct SnatWatch {
    last: Option<u64>,
}

impl SnatWatch {
    /// Reads the counter; warns when it rose since the last reading (the
    /// first reading after a start only sets the baseline: the pinned
    /// counter may hold drops an earlier agent already logged).
    fn check(&mut self, maps: &Maps) {
        let Ok(reasons) = maps.reason_counts() else {
            return;
        };
        let Some(now) = reasons
            .iter()
            .find(|(name, _)| *name == "drop_snat_exhausted")
            .map(|(_, count)| *count)
        else {
            return;
        };
        if let Some(drops) = self.rise(now) {
            tracing::warn!(
                drops,
                total = now,
                "new flows dropped: no free SNAT port towards their backend (lb_snat_exhausted_total)"
            );
        }
    }

    /// Records `now`; the rise since the last reading, when there is one.
    fn rise(&mut self, now: u64) -> Option<u64> {
        let last = self.last.replace(now)?;
        now.checked_sub(last).filter(|drops| *drops > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::SnatWatch;

    #[test]
    fn only_a_rise_after_the_baseline_is_reported() {
        let mut watch = SnatWatch::default();
        assert_eq!(watch.rise(5), None, "the first reading is the baseline");
        assert_eq!(watch.rise(5), None);
        assert_eq!(watch.rise(9), Some(4));
        // A counter that went back (maps recreated) is a new baseline.
        assert_eq!(watch.rise(2), None);
        assert_eq!(watch.rise(3), Some(1));
    }
}
