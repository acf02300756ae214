//! Manifests the agents read: Services and `EndpointSlice`s built from a
//! few parameters, written as JSON files (a `kind: List` per file) into
//! the directory of the file source, atomically (staging file + rename).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use super::process::TempDir;
use super::topo::Family;

/// A Service port; TARGET is a number or a port name.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SvcPort {
    name: &'static str,
    port: u16,
    proto: &'static str,
    target: &'static str,
    node_port: Option<u16>,
}

/// Port NAME PORT/PROTO to TARGET (a number or a port name).
pub(crate) const fn sp(
    name: &'static str,
    port: u16,
    proto: &'static str,
    target: &'static str,
) -> SvcPort {
    SvcPort {
        name,
        port,
        proto,
        target,
        node_port: None,
    }
}

impl SvcPort {
    /// The same port with `nodePort` `NODE_PORT`.
    pub(crate) const fn node(self, node_port: u16) -> Self {
        Self {
            node_port: Some(node_port),
            ..self
        }
    }

    pub(crate) fn name(self) -> &'static str {
        self.name
    }

    pub(crate) fn proto(self) -> &'static str {
        self.proto
    }

    fn json(self) -> Value {
        let target = self
            .target
            .parse::<u16>()
            .map_or_else(|_| json!(self.target), |n| json!(n));
        let mut v = json!({
            "name": self.name, "port": self.port, "protocol": self.proto, "targetPort": target,
        });
        if let Some(node_port) = self.node_port {
            v["nodePort"] = json!(node_port);
        }
        v
    }
}

/// `http` 80/TCP and `dns` 53/UDP, both to 8080.
pub(crate) const HTTP_DNS: [SvcPort; 2] =
    [sp("http", 80, "TCP", "8080"), sp("dns", 53, "UDP", "8080")];
/// The matching `EndpointSlice` ports: (name, port, protocol).
pub(crate) const HTTP_DNS_EP: [(&str, u16, &str); 2] =
    [("http", 8080, "TCP"), ("dns", 8080, "UDP")];

/// A Service NAME in `default` of TYPE with `clusterIPs` IPS (the first is
/// `clusterIP`; dual-stack `RequireDualStack` when there are two).
pub(crate) fn service(name: &str, type_: &str, ips: &[IpAddr], ports: &[SvcPort]) -> Value {
    let families: Vec<&str> = ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let policy = if ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let ports: Vec<Value> = ports.iter().map(|p| p.json()).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": type_,
            "clusterIP": ips[0].to_string(),
            "clusterIPs": ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ipFamilies": families,
            "ipFamilyPolicy": policy,
            "ports": ports,
        },
    })
}

/// Endpoint conditions.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cond {
    /// ready, serving, not terminating.
    Ready,
    /// not ready, not serving, not terminating.
    NotReady,
    /// not ready, serving, terminating (draining but still able to serve).
    ServingTerminating,
    /// not ready, not serving, terminating.
    Terminating,
}

impl Cond {
    /// `Ready` when READY, else `NotReady`.
    pub(crate) fn ready_if(ready: bool) -> Self {
        if ready { Self::Ready } else { Self::NotReady }
    }

    fn json(self) -> Value {
        let (ready, serving, terminating) = match self {
            Self::Ready => (true, true, false),
            Self::NotReady => (false, false, false),
            Self::ServingTerminating => (false, true, true),
            Self::Terminating => (false, false, true),
        };
        json!({"ready": ready, "serving": serving, "terminating": terminating})
    }
}

/// One endpoint of a slice.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: IpAddr,
    pub(crate) cond: Cond,
    pub(crate) node_name: Option<String>,
    pub(crate) zone: Option<&'static str>,
    /// `hints.forZones`.
    pub(crate) hint: Option<&'static str>,
}

impl Endpoint {
    pub(crate) fn new(addr: IpAddr, cond: Cond) -> Self {
        Self {
            addr,
            cond,
            node_name: None,
            zone: None,
            hint: None,
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "addresses": [self.addr.to_string()],
            "conditions": self.cond.json(),
        });
        if let Some(node) = &self.node_name {
            v["nodeName"] = json!(node);
        }
        if let Some(zone) = self.zone {
            v["zone"] = json!(zone);
        }
        if let Some(hint) = self.hint {
            v["hints"] = json!({"forZones": [{"name": hint}]});
        }
        v
    }
}

/// `EndpointSlice` NAME of SERVICE for FAMILY with PORTS (name, port,
/// protocol) and ENDPOINTS.
pub(crate) fn slice(
    service: &str,
    name: &str,
    family: Family,
    ports: &[(&str, u16, &str)],
    endpoints: &[Endpoint],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto}))
        .collect();
    let endpoints: Vec<Value> = endpoints.iter().map(Endpoint::json).collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        },
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// `v4` / `v6`, the family suffix of slice names.
pub(crate) fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

/// A `kind: List` of ITEMS: one manifest file.
pub(crate) fn list(items: Vec<Value>) -> Value {
    let mut list = json!({"apiVersion": "v1", "kind": "List"});
    list["items"] = Value::Array(items);
    list
}

/// The manifest directory of the file source, with a staging directory
/// beside it for atomic replaces; both removed with the work directory.
pub(crate) struct ManifestDir {
    pub(crate) dir: PathBuf,
    staging: PathBuf,
}

impl ManifestDir {
    /// `WORK/manifests` (and `WORK/staging`).
    pub(crate) fn create(work: &TempDir) -> Self {
        Self {
            dir: work.subdir("manifests"),
            staging: work.subdir("staging"),
        }
    }

    /// `file:DIR`, the agent's `--source`.
    pub(crate) fn source(&self) -> String {
        format!("file:{}", self.dir.display())
    }

    /// Writes CONTENT (pretty JSON) to FILE; returns the instant of the rename.
    pub(crate) fn write(&self, file: &str, content: &Value) -> Instant {
        let text = serde_json::to_string_pretty(content).expect("serialisable manifest");
        self.write_text(file, &text)
    }

    /// Writes TEXT to FILE atomically (a file in the staging directory,
    /// renamed into place); returns the instant of the rename.
    pub(crate) fn write_text(&self, file: &str, text: &str) -> Instant {
        let tmp = self.staging.join(file);
        std::fs::write(&tmp, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        let dst = self.dir.join(file);
        std::fs::rename(&tmp, &dst)
            .unwrap_or_else(|e| panic!("cannot rename to {}: {e}", dst.display()));
        Instant::now()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }
}
