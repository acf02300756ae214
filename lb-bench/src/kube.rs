//! The cluster behind the kube source (`lb agent --source kube`): the
//! stand-in API server of `lb-userspace/tests/kube_source`, holding the
//! benchmark's Services and `EndpointSlice`s, listening on loopback inside
//! the `lb` node's namespace (where the agent runs).

use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use crate::api_server::{ApiServer, Res};
use crate::rules::{Cluster, Family};
use crate::sys::Netns;

/// The node name the agent is given (`--node-name`); its Node object has
/// no addresses, as the file source's node has none.
pub const NODE_NAME: &str = "lb-bench-node";

/// The API server and the runtime its tasks run on.
pub struct StandIn {
    // Dropped first: its drop aborts the server's task on the runtime.
    server: ApiServer,
    _runtime: tokio::runtime::Runtime,
}

impl StandIn {
    /// Starts the server in NODE's namespace with every object of CLUSTER
    /// (as if written long ago: no watch history).
    ///
    /// # Errors
    /// The runtime or the namespace could not be set up.
    pub fn start(node: &Netns, cluster: &Cluster) -> anyhow::Result<Self> {
        // The listener is bound in the namespace (by a thread that joined
        // it); the connections it accepts belong there too, whichever
        // thread serves them.
        let (runtime, server) = node.run_in(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let server = runtime.block_on(ApiServer::start(Vec::new()));
            Ok((runtime, server))
        })?;
        server.apply_silently(Res::Nodes, node_json());
        for i in 0..cluster.count {
            server.apply_silently(Res::Services, cluster.service_json(i));
            for family in Family::BOTH {
                server.apply_silently(Res::Slices, cluster.slice_json(i, family));
            }
        }
        Ok(Self {
            server,
            _runtime: runtime,
        })
    }

    /// The kubeconfig that points at the server.
    pub fn kubeconfig(&self) -> &Path {
        self.server.kubeconfig()
    }

    /// Writes Service I's IPv4 slice as CLUSTER has it now (a watch event);
    /// returns the instant just before the write.
    pub fn rewrite_slice(&self, cluster: &Cluster, i: u32) -> Instant {
        let slice = cluster.slice_json(i, Family::V4);
        let at = Instant::now();
        self.server.apply(Res::Slices, slice);
        at
    }
}

fn node_json() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        "status": {"addresses": [{"type": "Hostname", "address": NODE_NAME}]},
    })
}
