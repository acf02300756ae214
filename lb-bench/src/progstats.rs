//! What the agent's socket programs cost per connection, from the kernel's
//! BPF run-time statistics (`BPF_ENABLE_STATS`: every run of every program
//! is timed while the returned descriptor is open; `run_time_ns` and
//! `run_cnt` in the program's info). Unlike a connection rate, which moves
//! with whatever else the machine does, this counts only the programs' own
//! nanoseconds: the `connect()` program (a lookup that misses for a
//! connection straight to a backend; the frontend, a slot, a backend and the
//! reverse entry for a `ClusterIP`) and the release program (every socket
//! closed in the cgroup). The agent's programs are told from other loaded
//! copies (tests, other benchmarks) by the pinned map they use.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::Context as _;
use aya::maps::MapData;
use lb_common::{map_names, prog_names};
use serde_json::{Value, json};

use crate::stats::summary;

/// Turns the statistics on until the descriptor is dropped.
///
/// # Errors
/// The kernel refused (`CAP_SYS_ADMIN` is needed).
pub(crate) fn enable() -> anyhow::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")
}

/// Run time and run count of the socket programs, summed per kind.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SockProgCost {
    connect_ns: u64,
    connect_runs: u64,
    release_ns: u64,
    release_runs: u64,
}

impl SockProgCost {
    /// The programs of the agent whose pins are at PINS, now.
    ///
    /// # Errors
    /// The pinned map or the program list could not be read.
    pub(crate) fn sample(pins: &Path) -> anyhow::Result<Self> {
        // The connect programs use the settings, the release program the
        // filter: a program using either pinned map is the agent's. (An
        // agent of before the filter has only the settings: its release
        // program is not found.)
        let mut map_ids = Vec::new();
        for name in [map_names::SOCK_CONFIG, map_names::SOCK_REVNAT_FILTER] {
            let path = pins.join(name);
            if name != map_names::SOCK_CONFIG && !path.exists() {
                continue;
            }
            let info = MapData::from_pin(&path)
                .and_then(|map| map.info())
                .with_context(|| format!("open {}", path.display()))?;
            map_ids.push(info.id());
        }
        let mut cost = Self::default();
        for info in aya::programs::loaded_programs() {
            let info = info.context("list BPF programs")?;
            let ours = info
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.iter().any(|id| map_ids.contains(id)));
            if !ours {
                continue;
            }
            let (ns, runs) = (
                u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                info.run_count(),
            );
            let name = info.name_as_str().unwrap_or_default();
            if name == kernel_name(prog_names::SOCK_CONNECT4)
                || name == kernel_name(prog_names::SOCK_CONNECT6)
            {
                cost.connect_ns += ns;
                cost.connect_runs += runs;
            } else if name == kernel_name(prog_names::SOCK_RELEASE) {
                cost.release_ns += ns;
                cost.release_runs += runs;
            }
        }
        Ok(cost)
    }

    /// Nanoseconds per run of each kind between EARLIER and self:
    /// [connect, release], NaN for a kind that did not run.
    pub(crate) fn since(&self, earlier: &Self) -> [f64; 2] {
        let per_run = |ns: u64, runs: u64| {
            #[expect(clippy::cast_precision_loss, reason = "a mean")]
            if runs > 0 {
                ns as f64 / runs as f64
            } else {
                f64::NAN
            }
        };
        [
            per_run(
                self.connect_ns.saturating_sub(earlier.connect_ns),
                self.connect_runs.saturating_sub(earlier.connect_runs),
            ),
            per_run(
                self.release_ns.saturating_sub(earlier.release_ns),
                self.release_runs.saturating_sub(earlier.release_runs),
            ),
        ]
    }
}

/// The socket programs' ns per run during each contender's measurements:
/// [connect, release], one sample per round.
#[derive(Default)]
pub(crate) struct ProgramNs(BTreeMap<&'static str, [Vec<f64>; 2]>);

impl ProgramNs {
    /// Adds one measurement of CONTENDER (`SockProgCost::since`).
    pub(crate) fn push(&mut self, contender: &'static str, [connect_ns, release_ns]: [f64; 2]) {
        let [connect, release] = self.0.entry(contender).or_default();
        connect.push(connect_ns);
        release.push(release_ns);
    }

    /// The median of CONTENDER's connect (KIND 0) or release (1) samples.
    pub(crate) fn median(&self, contender: &str, kind: usize) -> f64 {
        self.0
            .get(contender)
            .map_or(f64::NAN, |samples| crate::stats::median(&samples[kind]))
    }

    /// Per contender, a summary of each kind.
    pub(crate) fn to_json(&self) -> Value {
        self.0
            .iter()
            .map(|(name, [connect, release])| {
                (
                    (*name).to_owned(),
                    json!({"connect": summary(connect), "release": summary(release)}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// A program name as the kernel keeps it: at most 15 bytes
/// (`BPF_OBJ_NAME_LEN`), so `lb_sock_connect4` and `lb_sock_connect6` are
/// both `lb_sock_connect`.
fn kernel_name(name: &str) -> &str {
    name.get(..15).unwrap_or(name)
}
