//! Socket-level load balancing for the node's own sockets (host-network
//! pods, node processes, `localhost:NodePort`), which no TC hook sees on
//! their way out: cgroup `sock_addr` programs send `connect()` and
//! unconnected `sendmsg()` to a service straight to a backend, and make
//! `getpeername()` and `recvmsg()` show the service again, so nothing is
//! translated per packet. A `sock` program drops a socket's reverse entry
//! when it is released.
//!
//! Same maps and Service semantics as the TC path (`lb`): the frontend
//! lookup, the slots (ready / terminating fallback, traffic policies,
//! topology: what the agent put there), membership of the affinity's
//! backend. `policy` holds the plain decisions and is tested on the host:
//! `BPF_PROG_TEST_RUN` cannot run `sock_addr` programs.

pub(crate) mod policy;

#[cfg(target_arch = "bpf")]
mod hooks;

#[cfg(target_arch = "bpf")]
pub(crate) use hooks::{
    bind4, bind6, connect4, connect6, release, reverse4, reverse6, sendmsg4, sendmsg6,
};
