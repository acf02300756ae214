//! Helpers shared by the integration tests, each once: network namespaces
//! (`netns`), processes and files (`process`), bpffs, pins and the pinned
//! maps (`pins`), addresses and pods (`topo`), backend servers (`servers`),
//! clients and what they observed (`clients`), device features (`ethtool`),
//! manifests (`manifests`),
//! named sub-scenarios (`scenarios`), the failure said again after the
//! logs (`panics`), the socket-LB cgroup and client
//! (`sockclient`), steady load (`load`) and what it observed (`counts`),
//! long-lived flows (`keepers`), a spoofed SYN flood (`flood`), what the
//! lifecycle proofs share (`lifecycle`), and the two labs built from them:
//! one node (`lab`, for `harness.rs`) and a two-node cluster (`cluster`,
//! for `harness_services_*.rs`), and a path with a small MTU in the middle
//! (`pmtu`, for `harness_pmtu.rs`); for the `datapath*.rs` tests, the program
//! under `BPF_PROG_TEST_RUN` (`prog_test`) and crafted frames (`frames`).
//!
//! Rules these helpers enforce for the tests that use them: everything
//! network-related happens inside namespaces the test creates (nothing is
//! added to the root namespace, no traffic leaves them), and every
//! namespace, process, pin directory, server thread and temporary file is
//! removed on drop, also while a panic unwinds.
#![allow(
    dead_code,
    reason = "each integration-test crate uses its own subset of these helpers"
)]

pub(crate) mod clients;
pub(crate) mod cluster;
pub(crate) mod conformance;
pub(crate) mod counts;
pub(crate) mod ethtool;
pub(crate) mod flood;
pub(crate) mod frames;
pub(crate) mod fuzz;
pub(crate) mod keepers;
pub(crate) mod lab;
pub(crate) mod lifecycle;
pub(crate) mod load;
pub(crate) mod manifests;
pub(crate) mod netns;
pub(crate) mod overlay;
pub(crate) mod panics;
pub(crate) mod pins;
pub(crate) mod pmtu;
pub(crate) mod process;
pub(crate) mod prog_test;
pub(crate) mod scenarios;
pub(crate) mod servers;
pub(crate) mod sockclient;
pub(crate) mod topo;
pub(crate) mod tun_relay;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The tests of one binary share nothing, but one at a time keeps their
/// timing honest and their logs readable.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    panics::remember();
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}
