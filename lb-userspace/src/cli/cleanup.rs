//! `lb cleanup`: detach the programs and remove every pin.

use std::path::Path;

use anyhow::Context as _;
use lb_userspace::datapath::loader;

/// Removes the links of every interface and the pins under `pin_path`,
/// printing one line per thing removed.
pub fn run(pin_path: &Path) -> anyhow::Result<()> {
    let done = loader::cleanup(pin_path, &loader::all_interfaces())
        .with_context(|| format!("cleanup of {}", pin_path.display()))?;
    if done.is_empty() {
        println!("nothing to clean up under {}", pin_path.display());
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}
