//! `lb explain`: one packet through the datapath as a dry run, printed.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use lb_userspace::{
    datapath::loader,
    explain::{Catalog, Explainer, Explanation, Outcome, Query},
    model::{self, NodeContext},
    node::{self, NodeSettings},
    source::file,
};

/// The command's arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Source of the packet (port default 40000).
    #[arg(long, value_name = "SRC[:PORT]")]
    from: String,
    /// Destination of the packet (protocol default tcp).
    #[arg(long, value_name = "DST:PORT[/tcp|udp|sctp]")]
    to: String,
    /// Interface the packet arrives on (default: loopback).
    #[arg(long, value_name = "IF")]
    iface: Option<String>,
    /// The agent's manifest directory (`--source file:DIR`): names the
    /// Services and kinds of the frontends (the maps hold addresses).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// bpffs directory of the pins.
    #[arg(long, default_value = crate::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
}

/// Explains the packet and prints the answer, as text or JSON.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut query = Query::parse(&args.from, &args.to)?;
    if let Some(iface) = &args.iface {
        query.ifindex = Some(loader::if_index(iface).with_context(|| {
            format!("--iface {iface}: no such interface in this network namespace")
        })?);
    }
    loader::check_bpffs(&args.pin_path)?;
    let catalog = args.manifests.as_deref().map(catalog).transpose()?;
    let mut explainer = Explainer::load(&args.pin_path)?;
    let explanation = explainer.explain(&query, catalog.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{}", text(&explanation));
    }
    Ok(())
}

/// The frontends' Services and kinds as the agent's model makes them from
/// the manifest directory `dir`, for a node whose addresses are this
/// namespace's (the agent's default without `--node-ip`).
fn catalog(dir: &Path) -> anyhow::Result<Catalog> {
    let snapshot = file::load_dir(dir)?;
    let context = node::context(&NodeSettings::default(), &NodeContext::default());
    let built = model::build(&snapshot.services, &snapshot.slices, &context);
    Ok(Catalog::from_desired(&built.frontends))
}

/// The explanation as lines of text.
fn text(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "packet     {} -> {} {}", e.from, e.to, e.protocol);
    match &e.frontend {
        Some(f) => {
            let _ = writeln!(
                out,
                "frontend   {} {} ({}{}, rev-nat {}){}",
                f.address,
                f.protocol,
                f.kind,
                f.service
                    .as_ref()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default(),
                f.rev_nat_id,
                if f.policies.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", f.policies.join(", "))
                }
            );
        }
        None => {
            let _ = writeln!(out, "frontend   none");
        }
    }
    for b in &e.candidates {
        let _ = writeln!(
            out,
            "candidate  {} (id {}, {}{})",
            b.address,
            b.id,
            b.state,
            if b.local { ", local" } else { "" }
        );
    }
    let line = match &e.outcome {
        Outcome::Translated {
            backend,
            backend_id,
            established,
            source_nat,
        } => format!(
            "backend    {backend}{} ({})\nsource NAT {}",
            backend_id
                .map(|id| format!(" (id {id})"))
                .unwrap_or_default(),
            if *established {
                "established flow"
            } else {
                "new flow"
            },
            source_nat.map_or_else(|| "none (client source kept)".to_owned(), |s| s.to_string())
        ),
        Outcome::Reply {
            restored_source,
            restored_destination,
        } => format!(
            "reply      source restored to {restored_source}{}",
            restored_destination
                .map(|d| format!(", destination to {d}"))
                .unwrap_or_default()
        ),
        Outcome::Reject { reply } => format!("verdict    reject ({reply} sent back)"),
        Outcome::Drop => "verdict    drop".to_owned(),
        Outcome::Pass => "verdict    pass (untouched)".to_owned(),
    };
    let _ = writeln!(out, "{line}");
    let _ = writeln!(
        out,
        "reason     {}{}",
        e.reason,
        if e.redirected {
            " (forwarded by the datapath)"
        } else {
            ""
        }
    );
    out
}
