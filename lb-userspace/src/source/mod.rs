//! Where Services and `EndpointSlice`s come from.

pub mod file;
