//! The frame fuzzer behind `tests/fuzz.rs` and `cargo xtask fuzz`: random
//! and mutated frames through the real TC program (`BPF_PROG_TEST_RUN`),
//! each checked against the datapath's invariants.
//!
//! `rng` is the seeded generator, `parse` a tolerant reading of whatever
//! came out, `corpus` the Services under test and the valid frames to
//! them, `mutate` what is done to those frames, `check` the invariants,
//! `state` the map growth check between epochs, and `campaign` the loop
//! and its report.

pub(crate) mod campaign;
pub(crate) mod check;
pub(crate) mod corpus;
pub(crate) mod mutate;
pub(crate) mod parse;
pub(crate) mod rng;
pub(crate) mod state;
