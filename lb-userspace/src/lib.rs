//! The `lb` node agent: sources -> model -> diff -> apply, the loader and the
//! inspection CLI of the dual-stack eBPF service load balancer.
//!
//! Where to look (docs/ARCHITECTURE.md has the whole map):
//! `source` (file and API-server sources) -> `model` (Kubernetes semantics,
//! pure) -> `plan` (what to write, in which order) -> `datapath` (maps,
//! loader, batch writes) under the `agent` loop; `http` serves health,
//! metrics and `healthCheckNodePort`s; `net` watches interfaces and reads
//! their addresses; `node` merges what is known about this node.

pub mod agent;
pub mod datapath;
pub mod error;
pub mod explain;
pub mod fast_hash;
pub mod http;
pub mod maglev;
pub mod model;
pub mod net;
pub mod node;
pub mod plan;
pub mod source;
#[cfg(test)]
mod test_rng;
#[doc(hidden)]
pub mod testing;
