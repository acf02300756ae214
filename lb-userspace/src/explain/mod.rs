//! `lb explain`: what the datapath does with one packet, asked of the
//! program itself. A crafted frame runs through the TC program with
//! `BPF_PROG_TEST_RUN` against the live (pinned) maps, marked as a dry run
//! (`lb_common::probe::MARK`): the program takes every step a real packet
//! takes but writes no map (no conntrack, affinity or counter change; see
//! `lb-ebpf/src/probe.rs`) and hands its verdict's reason back in `cb[0]`.
//! The rewritten bytes say where the packet went (DNAT, SNAT, the restored
//! frontend of a reply, the refusal built in its place).
//!
//! The conformance suite (`tests/conformance.rs`) asks its questions
//! through this module too, so the tool is tested by it.

mod frame;
mod lookup;
mod query;
mod view;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::MapError,
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::{Addr4, Addr6, ct_flags, probe, reason};

use crate::datapath::loader;
use frame::Seen;
use lookup::{FrontendEntry, Tables};
pub use query::Query;
pub use view::{BackendView, Catalog, Explanation, FrontendView, Outcome};
use view::{frontend_view, protocol_name};

/// `TC_ACT_*` values the program returns.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// Room for `struct __sk_buff` (192 bytes on 6.x) with some to spare: the
/// kernel refuses a `ctx_out` smaller than its own struct.
const SKB_CTX_LEN: usize = 256;
/// Offsets in `struct __sk_buff` (`linux/bpf.h`, stable ABI).
const SKB_MARK_OFF: usize = 8;
const SKB_IFINDEX_OFF: usize = 40;
const SKB_CB0_OFF: usize = 48;
/// Source port used when `--from` names none.
pub const DEFAULT_SOURCE_PORT: u16 = 40_000;

/// Explaining failed.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// An argument could not be read.
    #[error("{0}")]
    Argument(String),
    /// A pinned map could not be opened.
    #[error("cannot open map {map} under {} (is the agent running with this --pin-path?)", path.display())]
    Map {
        /// Map name.
        map: &'static str,
        /// Pin directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A lookup failed.
    #[error("cannot read map {map}")]
    Read {
        /// Map name.
        map: &'static str,
        /// Why.
        #[source]
        source: MapError,
    },
    /// Not every map of this version is pinned there (another version's
    /// agent, or none).
    #[error("the maps pinned there are not this lb's (is the agent of this version running?)")]
    Pins(#[source] crate::datapath::maps::MapsError),
    /// The program could not be loaded.
    #[error("cannot load the datapath program")]
    Load(#[source] loader::LoadError),
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("BPF_PROG_TEST_RUN failed")]
    TestRun(#[source] ProgramError),
    /// The program did not answer as a dry run: it is not this version's
    /// (nothing proves it wrote nothing, so say so).
    #[error(
        "the program did not take the packet as a dry run (cb[0] = {0:#x}): not the datapath of this lb"
    )]
    NotDryRun(u32),
}

/// The maps explain reads, opened read-only from their pins.
pub struct MapView {
    v4: Tables<Addr4>,
    v6: Tables<Addr6>,
}

impl MapView {
    /// Opens the maps pinned under `pin_path`.
    ///
    /// # Errors
    /// A map is not pinned there or has another layout.
    pub fn open(pin_path: &Path) -> Result<Self, ExplainError> {
        Ok(Self {
            v4: Tables::open(pin_path)?,
            v6: Tables::open(pin_path)?,
        })
    }

    fn frontend(&self, addr: SocketAddr, l4: u8) -> Result<Option<FrontendEntry>, ExplainError> {
        if addr.is_ipv4() {
            self.v4.frontend(addr, l4)
        } else {
            self.v6.frontend(addr, l4)
        }
    }
}

/// The program of this `lb` binary, loaded (not attached) against the
/// maps pinned under a pin path, and those maps: what `lb explain` runs.
pub struct Explainer {
    ebpf: Ebpf,
    maps: MapView,
}

impl Explainer {
    /// Opens the pinned maps (they must exist: nothing is created) and
    /// loads the program against them.
    ///
    /// # Errors
    /// No maps pinned there, or the program could not be loaded.
    pub fn load(pin_path: &Path) -> Result<Self, ExplainError> {
        let maps = MapView::open(pin_path)?;
        // Every map the agent keeps must be pinned already: loading the
        // object pins a map it does not find, and explain creates nothing.
        crate::datapath::maps::Maps::open_pinned(pin_path).map_err(ExplainError::Pins)?;
        let ebpf = loader::load(pin_path).map_err(ExplainError::Load)?;
        Ok(Self { ebpf, maps })
    }

    /// Explains `query`.
    ///
    /// # Errors
    /// A map could not be read or the test run failed.
    pub fn explain(
        &mut self,
        query: &Query,
        catalog: Option<&Catalog>,
    ) -> Result<Explanation, ExplainError> {
        let program = loader::program(&mut self.ebpf).map_err(ExplainError::Load)?;
        explain(program, &self.maps, query, catalog)
    }
}

/// Explains `query` with `program` (the TC program, loaded against the
/// maps `maps` reads).
///
/// # Errors
/// A map could not be read or the test run failed.
pub fn explain(
    program: &mut SchedClassifier,
    maps: &MapView,
    query: &Query,
    catalog: Option<&Catalog>,
) -> Result<Explanation, ExplainError> {
    // The frontend: the one addressed, else (a reply) the one restored.
    let mut frontend_addr = Some(query.to);
    let mut reply = None;
    if maps.frontend(query.to, query.l4_proto)?.is_none() {
        let found = if query.to.is_ipv4() {
            maps.v4.reply(query.from, query.to, query.l4_proto)?
        } else {
            maps.v6.reply(query.from, query.to, query.l4_proto)?
        };
        frontend_addr = found.map(|(_, vip)| vip);
        reply = found.map(|(entry, _)| entry);
    }
    let input = frame::build(query.from, query.to, query.l4_proto, reply.is_some());
    let (action, reason_code, output) = dry_run(program, &input, query.ifindex)?;
    let reason = reason::NAMES
        .get(reason_code as usize)
        .copied()
        .unwrap_or("unknown");
    let seen = frame::read(&output);

    let entry = match frontend_addr {
        Some(addr) => maps.frontend(addr, query.l4_proto)?.map(|e| (addr, e)),
        None => None,
    };
    let mut candidates = entry
        .as_ref()
        .map(|(_, e)| e.backends.clone())
        .unwrap_or_default();
    let frontend = entry
        .as_ref()
        .map(|(addr, e)| frontend_view(*addr, query.l4_proto, &e.value, catalog));

    let outcome = match (reason_code, seen) {
        (reason::NAT_NEW | reason::NAT_ESTABLISHED, Seen::Transport { src, dst, .. }) => {
            let mut backend_id = candidates.iter().find(|b| b.address == dst).map(|b| b.id);
            if backend_id.is_none() && reason_code == reason::NAT_ESTABLISHED {
                // A flow kept on a draining backend (not in the slots).
                backend_id = draining_backend(maps, query, dst, &mut candidates)?;
            }
            Outcome::Translated {
                backend: dst,
                backend_id,
                established: reason_code == reason::NAT_ESTABLISHED,
                source_nat: (src != query.from).then_some(src),
            }
        }
        (reason::NAT_REPLY, Seen::Transport { src, dst, .. }) => Outcome::Reply {
            restored_source: src,
            restored_destination: reply.filter(|r| r.flags & ct_flags::SNAT != 0).map(|_| dst),
        },
        (reason::REJECT, seen) => Outcome::Reject {
            reply: match seen {
                Seen::Transport { reset: true, .. } => "tcp-reset",
                _ => "icmp-port-unreachable",
            },
        },
        _ if action == TC_ACT_SHOT => Outcome::Drop,
        _ => Outcome::Pass,
    };
    Ok(Explanation {
        from: query.from,
        to: query.to,
        protocol: protocol_name(query.l4_proto),
        frontend,
        candidates,
        outcome,
        reason,
        redirected: action == TC_ACT_REDIRECT && reason_code != reason::REJECT,
    })
}

/// The backend `dst` of an established flow that is not in the slots: a
/// draining one, found through the flow's own conntrack entry.
fn draining_backend(
    maps: &MapView,
    query: &Query,
    dst: SocketAddr,
    candidates: &mut Vec<BackendView>,
) -> Result<Option<u32>, ExplainError> {
    // The reply entry of the flow is keyed by the backend's tuple.
    let found = if dst.is_ipv4() {
        maps.v4.reply(dst, query.from, query.l4_proto)?
    } else {
        maps.v6.reply(dst, query.from, query.l4_proto)?
    };
    let Some((entry, _)) = found else {
        return Ok(None);
    };
    let backend = if dst.is_ipv4() {
        maps.v4.backend(entry.backend_id)?
    } else {
        maps.v6.backend(entry.backend_id)?
    };
    Ok(backend.map(|b| {
        let id = b.id;
        candidates.push(b);
        id
    }))
}

/// Runs `input` through `program` as a dry run; returns the action, the
/// reason and the frame as the program left it.
fn dry_run(
    program: &mut SchedClassifier,
    input: &[u8],
    ifindex: Option<u32>,
) -> Result<(u32, u32, Vec<u8>), ExplainError> {
    let mut ctx_in = [0u8; SKB_CTX_LEN];
    ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&probe::MARK.to_ne_bytes());
    if let Some(index) = ifindex {
        ctx_in[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&index.to_ne_bytes());
    }
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    // A reject reply is larger than a small input (ICMP quotes it).
    let mut output = vec![0u8; input.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut output),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .map_err(ExplainError::TestRun)?;
    output.truncate(result.data_size_out as usize);
    let mut cb0 = [0u8; 4];
    cb0.copy_from_slice(&ctx_out[SKB_CB0_OFF..SKB_CB0_OFF + 4]);
    let answer = u32::from_ne_bytes(cb0);
    if answer & !probe::REASON_MASK != probe::ANSWER {
        return Err(ExplainError::NotDryRun(answer));
    }
    let action = match result.return_value {
        TC_ACT_OK | TC_ACT_SHOT | TC_ACT_REDIRECT => result.return_value,
        _ => TC_ACT_OK,
    };
    Ok((action, answer & probe::REASON_MASK, output))
}
