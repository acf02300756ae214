//! What the agent serves over HTTP: its own `/healthz`, `/readyz` and
//! `/metrics`, and a `healthCheckNodePort` listener per Service that asks
//! for one.

pub mod healthcheck;
mod metrics;
mod server;

pub use metrics::Histogram;
pub use server::serve;
