//! Frontends, specs and a converging apply shared by the plan's unit tests.

use std::collections::BTreeMap;

use super::{DatapathState, Op, apply_to_state, diff};
use crate::model::{Backend, Frontend, FrontendKind, FrontendSpec, Protocol, ServiceRef};

pub(super) fn fe(addr: &str, port: u16) -> Frontend {
    Frontend {
        addr: addr.parse().unwrap(),
        port,
        proto: Protocol::Tcp,
    }
}

pub(super) fn backend(addr: &str, port: u16) -> Backend {
    Backend {
        addr: addr.parse().unwrap(),
        port,
        node_local: false,
    }
}

pub(super) fn spec(backends: &[(&str, u16)]) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "".into(),
        },
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|(addr, port)| backend(addr, *port))
            .collect(),
        terminating: Vec::new(),
        not_ready: Vec::new(),
        not_serving: Vec::new(),
        external_local: false,
        internal_local: false,
        no_local_endpoints: false,
        affinity_timeout_s: 0,
        source_ranges: Vec::new(),
    }
}

/// Applies the plan and checks that the result is what was desired.
pub(super) fn converge(
    state: &mut DatapathState,
    desired: &BTreeMap<Frontend, FrontendSpec>,
) -> Vec<Op> {
    let plan = diff(state, desired);
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    apply_to_state(state, &plan.ops);
    for (frontend, spec) in desired {
        let got = &state.frontends[frontend];
        let addrs: Vec<_> = got
            .slots
            .iter()
            .map(|id| {
                let key = state.backends[id].key;
                (key.addr, key.port)
            })
            .collect();
        let want: Vec<_> = spec.backends.iter().map(|b| (b.addr, b.port)).collect();
        assert_eq!(addrs, want);
        assert_eq!(
            state.rev_nats[&got.rev_nat_id],
            (frontend.addr, frontend.port)
        );
    }
    assert_eq!(state.frontends.len(), desired.len());
    assert!(diff(state, desired).ops.is_empty(), "not idempotent");
    plan.ops
}
