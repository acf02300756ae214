//! The node's network as the agent sees it: interfaces appearing and
//! going (rtnetlink link events) and the addresses configured on them.

pub mod ifaddrs;
pub mod ifwatch;
pub mod netns;
pub mod sockdiag;
