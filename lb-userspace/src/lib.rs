//! The `lb` node agent: sources -> model -> diff -> apply, the loader and the
//! inspection CLI of the dual-stack eBPF service load balancer.

pub mod agent;
pub mod healthcheck;
pub mod http;
pub mod ifwatch;
pub mod loader;
pub mod maps;
pub mod model;
pub mod node;
pub mod plan;
pub mod source;
#[cfg(test)]
mod test_rng;
#[doc(hidden)]
pub mod testing;
