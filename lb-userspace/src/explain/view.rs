//! What explain answers: the frontend, its backends, the outcome; and the
//! names the maps do not hold.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{LbService, proto, svc_flags};

use crate::model::{Frontend, FrontendSpec};

/// Service names and kinds of the frontends, when the caller knows them
/// (the maps hold addresses only).
#[derive(Clone, Debug, Default)]
pub struct Catalog(BTreeMap<(SocketAddr, u8), (String, &'static str)>);

impl Catalog {
    /// From the model's desired frontends.
    #[must_use]
    pub fn from_desired(desired: &BTreeMap<Frontend, FrontendSpec>) -> Self {
        Self(
            desired
                .iter()
                .map(|(f, spec)| {
                    (
                        (SocketAddr::new(f.addr, f.port), f.proto.number()),
                        (spec.service.to_string(), spec.kind.name()),
                    )
                })
                .collect(),
        )
    }
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendView {
    /// Backend id (per frontend).
    pub id: u32,
    /// Address and port.
    pub address: SocketAddr,
    /// "active" (takes new flows) or "draining" (established flows only).
    pub state: &'static str,
    /// On this node.
    pub local: bool,
}

/// The frontend a packet is addressed to (or, for a reply, came from).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendView {
    /// Address and port.
    pub address: SocketAddr,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    /// Service port (`namespace/name[:port]`), when known.
    pub service: Option<String>,
    /// `ClusterIP`, `NodePort`, ... (from the maps alone: `ClusterIP` or
    /// `external`).
    pub kind: &'static str,
    /// Its rev-NAT id.
    pub rev_nat_id: u32,
    /// Its policies: `affinity`, `source-ranges`, `external-local`.
    pub policies: Vec<&'static str>,
}

/// What happened to the packet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Sent to a backend (destination NAT).
    Translated {
        /// The backend this tuple goes to.
        backend: SocketAddr,
        /// Its id, when it is one of the frontend's backends.
        backend_id: Option<u32>,
        /// An existing flow (conntrack) rather than a new choice.
        established: bool,
        /// The source the packet gets (source NAT), if any.
        source_nat: Option<SocketAddr>,
    },
    /// A backend's reply, translated back.
    Reply {
        /// The frontend restored as source.
        restored_source: SocketAddr,
        /// The client restored as destination (source-NATed flows).
        restored_destination: Option<SocketAddr>,
    },
    /// Refused: a TCP reset or an ICMP port unreachable sent back.
    Reject {
        /// "tcp-reset" or "icmp-port-unreachable".
        reply: &'static str,
    },
    /// Dropped.
    Drop,
    /// Passed on untouched.
    Pass,
}

/// What the datapath does with one packet, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The packet asked about.
    pub from: SocketAddr,
    /// Its destination.
    pub to: SocketAddr,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    /// The frontend matched (or restored, for a reply).
    pub frontend: Option<FrontendView>,
    /// The frontend's backends: its slots (new flows), then draining ones.
    pub candidates: Vec<BackendView>,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The verdict's reason (as in `lb_datapath_packets_total{reason}`).
    pub reason: &'static str,
    /// A translated packet was forwarded by the datapath itself
    /// (redirected), not handed to the stack.
    pub redirected: bool,
}

pub(super) fn frontend_view(
    address: SocketAddr,
    l4: u8,
    value: &LbService,
    catalog: Option<&Catalog>,
) -> FrontendView {
    let named = catalog.and_then(|c| c.0.get(&(address, l4)));
    let policies = [
        (svc_flags::AFFINITY, "affinity"),
        (svc_flags::SOURCE_RANGES, "source-ranges"),
        (svc_flags::EXT_LOCAL, "external-local"),
    ]
    .into_iter()
    .filter(|(flag, _)| value.flags & flag != 0)
    .map(|(_, name)| name)
    .collect();
    FrontendView {
        address,
        protocol: protocol_name(l4),
        service: named.map(|(service, _)| service.clone()),
        kind: named.map_or(
            if value.flags & svc_flags::EXTERNAL != 0 {
                "external"
            } else {
                "ClusterIP"
            },
            |(_, kind)| kind,
        ),
        rev_nat_id: value.rev_nat_id,
        policies,
    }
}

pub(super) fn protocol_name(l4: u8) -> &'static str {
    match l4 {
        proto::TCP => "TCP",
        proto::SCTP => "SCTP",
        _ => "UDP",
    }
}
