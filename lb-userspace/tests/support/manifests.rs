//! Manifests the agents read: Services and `EndpointSlice`s built with
//! `lb_userspace::testing`'s builders from a few parameters, written as
//! JSON files (a `kind: List` per file) into the directory of the file
//! source, atomically (staging file + rename).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_userspace::testing::{EndpointBuilder, IpFamily, ServiceBuilder, SliceBuilder};
use serde::Serialize;
use serde_json::{Value, json};

use super::process::TempDir;
use super::topo::Family;

/// Every test object lives in this namespace.
const NAMESPACE: &str = "default";

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

    fn add_to(self, service: ServiceBuilder) -> ServiceBuilder {
        let port = i32::from(self.port);
        let service = match self.target.parse::<i32>() {
            Ok(target) => service.port(self.name, port, self.proto, target),
            Err(_) => service.named_target_port(self.name, port, self.proto, self.target),
        };
        match self.node_port {
            Some(node_port) => service.node_port_of_last(i32::from(node_port)),
            None => service,
        }
    }
}

/// `http` 80/TCP and `dns` 53/UDP, both to 8080.
pub(crate) const HTTP_DNS: [SvcPort; 2] =
    [sp("http", 80, "TCP", "8080"), sp("dns", 53, "UDP", "8080")];
/// The matching `EndpointSlice` ports: (name, port, protocol).
pub(crate) const HTTP_DNS_EP: [(&str, u16, &str); 2] =
    [("http", 8080, "TCP"), ("dns", 8080, "UDP")];

fn ip_family(family: Family) -> IpFamily {
    match family {
        Family::V4 => IpFamily::V4,
        Family::V6 => IpFamily::V6,
    }
}

/// A Service NAME in `default` of TYPE with `clusterIPs` IPS (the first is
/// `clusterIP`; `ipFamilies` follow them) and PORTS. The rest is the
/// caller's, through the builder.
pub(crate) fn service(
    name: &str,
    type_: &str,
    ips: &[IpAddr],
    ports: &[SvcPort],
) -> ServiceBuilder {
    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
    let families = ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" });
    let service = ServiceBuilder::new(NAMESPACE, name)
        .type_(type_)
        .ips(ips.iter().map(String::as_str))
        .families(families);
    ports
        .iter()
        .fold(service, |service, port| port.add_to(service))
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

    /// An endpoint at ADDR with these conditions.
    pub(crate) fn endpoint(self, addr: IpAddr) -> EndpointBuilder {
        let endpoint = EndpointBuilder::new(&addr.to_string());
        match self {
            Self::Ready => endpoint.up(),
            Self::NotReady => endpoint.ready(false).serving(false).terminating(false),
            Self::ServingTerminating => endpoint.draining(),
            Self::Terminating => endpoint.ready(false).serving(false).terminating(true),
        }
    }
}

/// `EndpointSlice` NAME of SERVICE for FAMILY with PORTS (name, port,
/// protocol) and ENDPOINTS.
pub(crate) fn slice(
    service: &str,
    name: &str,
    family: Family,
    ports: &[(&str, u16, &str)],
    endpoints: impl IntoIterator<Item = EndpointBuilder>,
) -> EndpointSlice {
    let slice = SliceBuilder::for_service(NAMESPACE, service, ip_family(family)).name(name);
    let slice = ports.iter().fold(slice, |slice, (name, port, proto)| {
        slice.port(name, i32::from(*port), proto)
    });
    endpoints
        .into_iter()
        .fold(slice, SliceBuilder::endpoint)
        .build()
}

/// `v4` / `v6`, the family suffix of slice names.
pub(crate) fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

/// The objects of one manifest file, written as a `kind: List`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Manifest {
    items: Vec<Value>,
}

impl Manifest {
    /// One more object (a Service, a slice).
    pub(crate) fn with(mut self, object: &impl Serialize) -> Self {
        self.items
            .push(serde_json::to_value(object).expect("serialisable object"));
        self
    }

    /// Several more objects.
    pub(crate) fn with_all<T: Serialize>(self, objects: &[T]) -> Self {
        objects.iter().fold(self, Self::with)
    }

    /// The file's text: pretty JSON.
    pub(crate) fn text(&self) -> String {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": self.items});
        serde_json::to_string_pretty(&list).expect("serialisable manifest")
    }
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

    /// Writes MANIFEST to FILE; returns the instant of the rename.
    pub(crate) fn write(&self, file: &str, manifest: &Manifest) -> Instant {
        self.write_text(file, &manifest.text())
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
}
