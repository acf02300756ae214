//! `lb conntrack`: the tracked flows, from the pinned maps.

use std::path::Path;

/// Prints every conntrack entry, as a table or as JSON.
pub fn print(json: bool, pin_path: &Path) -> anyhow::Result<()> {
    let maps = super::open(pin_path)?;
    let flows = maps.conntrack()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&flows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<4} {:<46} {:<46} {:>8} {:>7} {:>6}",
        "DIR", "PROTO", "SOURCE", "DESTINATION", "BACKEND", "REVNAT", "IDLE"
    );
    for flow in flows {
        println!(
            "{:<8} {:<4} {:<46} {:<46} {:>8} {:>7} {:>5}s{}{}",
            flow.direction,
            flow.protocol,
            flow.source.to_string(),
            flow.destination.to_string(),
            flow.backend_id,
            flow.rev_nat_id,
            flow.idle_seconds,
            if flow.closing { " closing" } else { "" },
            // Not answered yet: in the map of new flows, 60 s for TCP.
            if flow.answered { "" } else { " new" }
        );
    }
    Ok(())
}
