//! The inspection and clean-up subcommands (`lb services`, `lb conntrack`,
//! `lb explain`, `lb status`, `lb cleanup`): they work on the pinned maps and links, with or without a
//! running agent.

pub mod cleanup;
pub mod conntrack;
pub mod explain;
pub mod services;
pub mod status;

use std::path::Path;

use anyhow::Context as _;
use lb_userspace::datapath::maps::Maps;

/// The maps pinned under `pin_path`.
fn open(pin_path: &Path) -> anyhow::Result<Maps> {
    Maps::open_pinned(pin_path).with_context(|| {
        format!(
            "no lb maps pinned under {} (is the agent running there?)",
            pin_path.display()
        )
    })
}
