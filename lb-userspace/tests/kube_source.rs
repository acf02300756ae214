//! The kube source (`--source kube`) against a stand-in API server.
//!
//! The server in this file speaks the Kubernetes list and watch protocol
//! over plain HTTP on 127.0.0.1 as the real API server does: a list answers
//! with the items and the list's `resourceVersion`; a watch streams one JSON
//! event per chunk (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, and an
//! `ERROR` with a `410 Gone` Status that forces a re-list), from the
//! requested resource version on. It can drop every connection or refuse
//! them all (an unreachable API server). The objects are real API JSON:
//! Services, `EndpointSlice`s and a Node as a v1.3x API server serves them.
//!
//! The real kube-rs client drives it through `source::spawn`, with a
//! kubeconfig pointing at the server; the snapshots go through
//! `model::build` and the resulting frontends are checked for a dual-stack,
//! an IPv4-only and an IPv6-only cluster. No root, no cluster.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::{
    model::{self, ObjectError},
    source::{
        self, Snapshot, SourceSpec, SourceUpdate,
        kube::{EventReporter, KubeSourceConfig, node_context},
    },
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
};

const NODE: &str = "node-a";

// ---------------------------------------------------------------------------
// The stand-in API server
// ---------------------------------------------------------------------------

/// The resources the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Res {
    Services,
    Slices,
    Nodes,
}

impl Res {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::Slices),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    /// (apiVersion, kind of the list, kind of an item).
    fn kinds(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Services => ("v1", "ServiceList", "Service"),
            Self::Slices => ("discovery.k8s.io/v1", "EndpointSliceList", "EndpointSlice"),
            Self::Nodes => ("v1", "NodeList", "Node"),
        }
    }
}

/// What open watch streams are told.
#[derive(Clone, Debug)]
enum Wire {
    Event {
        res: Res,
        rv: u64,
        kind: &'static str,
        object: Value,
    },
    Bookmark {
        res: Res,
        rv: u64,
    },
    Gone {
        res: Res,
    },
    DropAll,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<String, Value>>,
    history: Vec<(Res, u64, &'static str, Value)>,
    /// Refuse every connection (close it unanswered).
    down: bool,
    /// Delay before answering a list.
    list_delay: BTreeMap<Res, Duration>,
    /// `METHOD path?query` of every request.
    requests: Vec<String>,
    /// Bodies of the Events posted.
    events: Vec<Value>,
}

fn key_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

struct ApiServer {
    state: Arc<Mutex<State>>,
    wire: broadcast::Sender<Wire>,
    task: tokio::task::JoinHandle<()>,
    kubeconfig: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

impl ApiServer {
    async fn start(objects: Vec<(Res, Value)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (wire, _) = broadcast::channel(1024);
        let state = Arc::new(Mutex::new(State::default()));
        let task = {
            let (state, wire) = (Arc::clone(&state), wire.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, wire) = (Arc::clone(&state), wire.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, &state, &wire).await;
                    });
                }
            })
        };
        let kubeconfig = write_kubeconfig(addr);
        let server = Self {
            state,
            wire,
            task,
            kubeconfig,
        };
        for (res, object) in objects {
            server.apply(res, object);
        }
        server
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces OBJECT (ADDED or MODIFIED), as a write would.
    fn apply(&self, res: Res, mut object: Value) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        let kind = if state
            .objects
            .entry(res)
            .or_default()
            .insert(key, object.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.history.push((res, rv, kind, object.clone()));
        let _ = self.wire.send(Wire::Event {
            res,
            rv,
            kind,
            object,
        });
    }

    fn delete(&self, res: Res, namespace: &str, name: &str) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let mut object = state
            .objects
            .entry(res)
            .or_default()
            .remove(&format!("{namespace}/{name}"))
            .expect("object to delete exists");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push((res, rv, "DELETED", object.clone()));
        let _ = self.wire.send(Wire::Event {
            res,
            rv,
            kind: "DELETED",
            object,
        });
    }

    /// Changes OBJECT without any watch event, as if the event had been
    /// compacted away: only a re-list shows it.
    fn apply_silently(&self, res: Res, mut object: Value) {
        let mut state = self.lock();
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state
            .objects
            .entry(res)
            .or_default()
            .insert(key_of(&object), object);
    }

    fn bookmark(&self, res: Res) {
        let mut state = self.lock();
        state.rv += 1;
        let _ = self.wire.send(Wire::Bookmark { res, rv: state.rv });
    }

    /// Ends RES's open watches with `410 Gone`; history is compacted, so a
    /// watch from any older version gets 410 too.
    fn gone(&self, res: Res) {
        let mut state = self.lock();
        state.history.retain(|(r, ..)| *r != res);
        let _ = self.wire.send(Wire::Gone { res });
    }

    /// Closes every open watch mid-stream (no final chunk).
    fn drop_watches(&self) {
        let _ = self.wire.send(Wire::DropAll);
    }

    fn set_down(&self, down: bool) {
        self.lock().down = down;
        if down {
            self.drop_watches();
        }
    }

    fn set_list_delay(&self, res: Res, delay: Duration) {
        self.lock().list_delay.insert(res, delay);
    }

    fn lists(&self, res: Res) -> usize {
        let path = match res {
            Res::Services => "/api/v1/services",
            Res::Slices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::Nodes => "/api/v1/nodes",
        };
        self.lock()
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch=true"))
            .count()
    }

    fn posted_events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    fn source_config(&self) -> KubeSourceConfig {
        KubeSourceConfig {
            node_name: NODE.to_owned(),
            kubeconfig: Some(self.kubeconfig.clone()),
        }
    }
}

fn write_kubeconfig(addr: SocketAddr) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "lb-kube-test-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: local\n  context:\n    cluster: local\n    user: nobody\n\
         current-context: local\nusers:\n- name: nobody\n  user: {{}}\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("").to_owned();
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        query,
        body,
    }))
}

async fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// `fieldSelector=metadata.name=NAME`, the only selector the source uses.
fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    match query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
    {
        Some(name) => object["metadata"]["name"].as_str() == Some(name),
        None => true,
    }
}

async fn serve(
    mut stream: TcpStream,
    state: &Mutex<State>,
    wire: &broadcast::Sender<Wire>,
) -> std::io::Result<()> {
    if state.lock().unwrap_or_else(PoisonError::into_inner).down {
        return Ok(());
    }
    let Some(request) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let line = format!(
        "{} {}?{}",
        request.method,
        request.path,
        request
            .query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    );
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .requests
        .push(line);
    let res = Res::from_path(&request.path);
    match (request.method.as_str(), res) {
        ("GET", Some(res))
            if request
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(stream, state, wire, res, &request.query).await
        }
        ("GET", Some(res)) => list(&mut stream, state, res, &request.query).await,
        ("POST", None) if request.path.ends_with("/events") => {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .events
                .push(body.clone());
            respond(&mut stream, "201 Created", &body).await
        }
        _ => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("the server could not find {}", request.path)});
            respond(&mut stream, "404 Not Found", &status).await
        }
    }
}

async fn list(
    stream: &mut TcpStream,
    state: &Mutex<State>,
    res: Res,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let delay = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .list_delay
        .get(&res)
        .copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let body = {
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let items: Vec<Value> = state
            .objects
            .get(&res)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|o| selected(o, query))
            .take(limit)
            .map(|o| {
                // Items in a list carry no kind/apiVersion, as the API sends them.
                let mut o = o.clone();
                if let Some(map) = o.as_object_mut() {
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                o
            })
            .collect();
        let (api_version, kind, _) = res.kinds();
        json!({"kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": state.rv.to_string()}, "items": items})
    };
    respond(stream, "200 OK", &body).await
}

async fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let data = format!("{line}\n");
    stream
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await
}

async fn watch(
    mut stream: TcpStream,
    state: &Mutex<State>,
    wire: &broadcast::Sender<Wire>,
    res: Res,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let (api_version, _, kind) = res.kinds();
    // Subscribe and read the backlog under one lock: nothing falls between.
    let (backlog, mut rx, compacted) = {
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = wire.subscribe();
        let oldest = state
            .history
            .iter()
            .filter(|(r, ..)| *r == res)
            .map(|(_, rv, ..)| *rv)
            .min();
        // History before the oldest kept event is gone: a watch from there
        // cannot be served (the API server's etcd compaction).
        let newest_of_res = state
            .objects
            .get(&res)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter_map(|o| {
                o["metadata"]["resourceVersion"]
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        let compacted = oldest.is_none_or(|oldest| from + 1 < oldest) && newest_of_res > from;
        let backlog: Vec<Value> = state
            .history
            .iter()
            .filter(|(r, rv, _, o)| *r == res && *rv > from && selected(o, query))
            .map(|(_, _, kind, object)| json!({"type": kind, "object": object}))
            .collect();
        (backlog, rx, compacted)
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
        "message": format!("too old resource version: {from}")}});
    if compacted {
        chunk(&mut stream, &gone).await?;
        return stream.write_all(b"0\r\n\r\n").await;
    }
    for event in backlog {
        chunk(&mut stream, &event).await?;
    }
    loop {
        match rx.recv().await {
            Ok(Wire::Event {
                res: r,
                rv,
                kind: event,
                object,
            }) if r == res && rv > from && selected(&object, query) => {
                chunk(&mut stream, &json!({"type": event, "object": object})).await?;
            }
            Ok(Wire::Bookmark { res: r, rv }) if r == res => {
                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind,
                    "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}}}});
                chunk(&mut stream, &bookmark).await?;
            }
            Ok(Wire::Gone { res: r }) if r == res => {
                chunk(&mut stream, &gone).await?;
                return stream.write_all(b"0\r\n\r\n").await;
            }
            // Mid-stream, no final chunk: the client sees a broken body.
            Ok(Wire::DropAll) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Real API JSON
// ---------------------------------------------------------------------------

const CREATED: &str = "2025-03-01T10:00:00Z";

fn uid(name: &str) -> String {
    let mut h: u32 = 2_166_136_261;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    format!("{h:08x}-1c2d-4e5f-8a9b-{:012x}", u64::from(h) * 7919)
}

fn managed_fields(manager: &str) -> Value {
    json!([{"manager": manager, "operation": "Update", "apiVersion": "v1", "time": CREATED,
        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}])
}

struct Svc<'a> {
    name: &'a str,
    type_: &'a str,
    cluster_ips: &'a [&'a str],
    families: &'a [&'a str],
    policy: &'a str,
    /// (name, port, protocol, targetPort, nodePort)
    ports: &'a [(&'a str, u16, &'a str, u16, Option<u16>)],
    labels: Value,
}

impl Default for Svc<'_> {
    fn default() -> Self {
        Self {
            name: "web",
            type_: "ClusterIP",
            cluster_ips: &[],
            families: &[],
            policy: "SingleStack",
            ports: &[("http", 80, "TCP", 8080, None)],
            labels: json!({}),
        }
    }
}

fn service(s: &Svc<'_>) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(name, port, protocol, target, node_port)| {
            let mut p =
                json!({"name": name, "protocol": protocol, "port": port, "targetPort": target});
            if let Some(node_port) = node_port {
                p["nodePort"] = json!(node_port);
            }
            p
        })
        .collect();
    let mut labels = s.labels.clone();
    labels["app"] = json!(s.name);
    let mut spec = json!({
        "ports": ports,
        "selector": {"app": s.name},
        "clusterIP": s.cluster_ips.first().copied().unwrap_or("None"),
        "clusterIPs": s.cluster_ips,
        "type": s.type_,
        "sessionAffinity": "None",
        "ipFamilies": s.families,
        "ipFamilyPolicy": s.policy,
        "internalTrafficPolicy": "Cluster",
    });
    if s.type_ == "NodePort" {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": s.name,
            "namespace": "default",
            "uid": uid(s.name),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}\n"},
            "managedFields": managed_fields("kubectl-client-side-apply"),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

fn external_name(name: &str) -> Value {
    json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default", "uid": uid(name), "resourceVersion": "1",
            "creationTimestamp": CREATED},
        "spec": {"type": "ExternalName", "externalName": "db.example.com", "sessionAffinity": "None"},
        "status": {"loadBalancer": {}}})
}

/// A slice of SERVICE; ENDPOINTS are (address, ready).
fn slice(
    name: &str,
    service: &str,
    address_type: &str,
    endpoints: &[(&str, bool)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (addr, ready))| {
            json!({"addresses": [addr],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": NODE, "zone": "zone-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("{service}-{i}"),
                    "uid": uid(&format!("{service}-{i}"))}})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, "protocol": protocol, "port": port}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": "default",
            "uid": uid(name),
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": CREATED,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                "uid": uid(service), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kube-controller-manager"),
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn node(addresses: &[(&str, &str)]) -> Value {
    let mut addrs: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    addrs.push(json!({"type": "Hostname", "address": NODE}));
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": NODE,
            "uid": uid(NODE),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "labels": {
                "kubernetes.io/hostname": NODE,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": "zone-a",
                "topology.kubernetes.io/region": "region-1",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": managed_fields("kubelet"),
        },
        "spec": {"podCIDR": "198.18.0.0/24", "podCIDRs": ["198.18.0.0/24", "fd00:18::/64"]},
        "status": {
            "addresses": addrs,
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status", "lastHeartbeatTime": CREATED,
                "lastTransitionTime": CREATED}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b",
                "kernelVersion": "6.12.0", "osImage": "Debian GNU/Linux 13",
                "containerRuntimeVersion": "containerd://2.0.0", "kubeletVersion": "v1.33.0",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        },
    })
}

// ---------------------------------------------------------------------------
// Driving the source
// ---------------------------------------------------------------------------

struct Source {
    rx: mpsc::Receiver<SourceUpdate>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_source(server: &ApiServer) -> Source {
    // The agent's channel size.
    let (tx, rx) = mpsc::channel(4);
    let task = source::spawn(&SourceSpec::Kube(server.source_config()), tx).expect("source starts");
    Source { rx, task }
}

impl Source {
    /// The next update, or a panic after TIMEOUT.
    async fn next(&mut self, timeout: Duration, what: &str) -> SourceUpdate {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(update)) => update,
            Ok(None) => panic!("{what}: the source ended"),
            Err(tokio::time::error::Elapsed { .. }) => {
                panic!("{what}: no update within {timeout:?}")
            }
        }
    }

    /// The first snapshot for which PREDICATE holds (stale updates and other
    /// snapshots are skipped), with the number of snapshots seen.
    async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&Snapshot) -> bool,
    ) -> (Snapshot, usize) {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left, what).await {
                SourceUpdate::Snapshot(snapshot) => {
                    seen += 1;
                    if predicate(&snapshot) {
                        return (snapshot, seen);
                    }
                }
                SourceUpdate::Stale(reason) => eprintln!("{what}: stale: {reason}"),
                SourceUpdate::Changes(_) => panic!("{what}: the kube source sends snapshots"),
            }
        }
    }

    async fn until_stale(&mut self, timeout: Duration, what: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let SourceUpdate::Stale(reason) = self.next(left, what).await {
                return reason;
            }
        }
    }

    /// Asserts that nothing arrives for FOR.
    async fn quiet(&mut self, period: Duration, what: &str) {
        if let Ok(update) = tokio::time::timeout(period, self.rx.recv()).await {
            panic!("{what}: expected no update, got {update:?}");
        }
    }
}

/// Frontend -> its backends, through the model, as `ADDR:PORT/PROTO` ->
/// `[ADDR:PORT, ...]`.
fn frontends(snapshot: &Snapshot) -> BTreeMap<String, Vec<String>> {
    let node = node_context(snapshot.node.as_ref(), NODE);
    let model = model::build(&snapshot.services, &snapshot.slices, &node);
    model
        .frontends
        .iter()
        .map(|(frontend, spec)| {
            (
                frontend.to_string(),
                spec.backends.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

fn names(snapshot: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    names.sort();
    names
}

fn has_slice(snapshot: &Snapshot, name: &str) -> bool {
    snapshot
        .slices
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(name))
}

fn expect(frontends: &BTreeMap<String, Vec<String>>, frontend: &str, backends: &[&str]) {
    let got = frontends
        .get(frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend}; frontends: {frontends:#?}"));
    assert_eq!(
        got,
        &backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "backends of {frontend}"
    );
}

const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[expect(clippy::too_many_lines, reason = "the fixture: a list of objects")]
fn dual_stack_objects() -> Vec<(Res, Value)> {
    vec![
        (
            Res::Services,
            service(&Svc {
                cluster_ips: &["198.19.0.10", "fd00:96::10"],
                families: &["IPv4", "IPv6"],
                policy: "RequireDualStack",
                ports: &[
                    ("http", 80, "TCP", 8080, None),
                    ("dns", 53, "UDP", 8053, None),
                ],
                ..Svc::default()
            }),
        ),
        (
            Res::Services,
            service(&Svc {
                name: "np",
                type_: "NodePort",
                cluster_ips: &["fd00:96::20", "198.19.0.20"],
                families: &["IPv6", "IPv4"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        // Handed to another proxy: filtered by the model, as in the file source.
        (
            Res::Services,
            service(&Svc {
                name: "other-proxy",
                cluster_ips: &["198.19.0.30"],
                families: &["IPv4"],
                labels: json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
                ..Svc::default()
            }),
        ),
        (Res::Services, external_name("db")),
        (
            Res::Services,
            service(&Svc {
                name: "headless",
                families: &["IPv4", "IPv6"],
                policy: "RequireDualStack",
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-abc12",
                "web",
                "IPv4",
                &[
                    ("198.18.2.2", true),
                    ("198.18.3.2", true),
                    ("198.18.4.2", false),
                ],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "web-def34",
                "web",
                "IPv6",
                &[("fd00:2::2", true), ("fd00:3::2", true)],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "web-fqdn",
                "web",
                "FQDN",
                &[("web.example.com", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-v4",
                "np",
                "IPv4",
                &[("198.18.5.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-v6",
                "np",
                "IPv6",
                &[("fd00:5::2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Nodes,
            node(&[
                ("InternalIP", "198.18.0.1"),
                ("InternalIP", "fd00:18::1"),
                ("ExternalIP", "198.18.100.1"),
            ]),
        ),
    ]
}

/// Dual-stack cluster: list, watch (ADDED/MODIFIED/DELETED/BOOKMARK),
/// coalescing, `410 Gone` and re-list, a dropped connection.
#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
async fn dual_stack_cluster_follows_list_and_watch() {
    let server = ApiServer::start(dual_stack_objects()).await;
    // The node list comes last: no snapshot before all three are listed.
    server.set_list_delay(Res::Nodes, Duration::from_millis(300));
    let mut source = start_source(&server);

    let (first, _) = source.until(STEP, "initial lists", |_| true).await;
    assert!(
        first.node.is_some(),
        "the first snapshot waits for the Node list"
    );
    assert_eq!(
        names(&first),
        ["db", "headless", "np", "other-proxy", "web"]
    );
    assert_eq!(first.slices.len(), 5);
    assert!(
        first
            .services
            .iter()
            .all(|s| s.metadata.managed_fields.is_none()
                || s.metadata
                    .managed_fields
                    .as_ref()
                    .is_some_and(Vec::is_empty)),
        "managedFields are dropped"
    );
    let node = node_context(first.node.as_ref(), NODE);
    assert_eq!(
        node.addresses,
        ["198.18.0.1", "fd00:18::1", "198.18.100.1"]
            .map(|a| a.parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(node.zone.as_deref(), Some("zone-a"));

    let f = frontends(&first);
    expect(
        &f,
        "198.19.0.10:80/TCP",
        &["198.18.2.2:8080", "198.18.3.2:8080"],
    );
    expect(
        &f,
        "[fd00:96::10]:80/TCP",
        &["[fd00:2::2]:8080", "[fd00:3::2]:8080"],
    );
    expect(
        &f,
        "198.19.0.10:53/UDP",
        &["198.18.2.2:8053", "198.18.3.2:8053"],
    );
    expect(
        &f,
        "[fd00:96::10]:53/UDP",
        &["[fd00:2::2]:8053", "[fd00:3::2]:8053"],
    );
    expect(&f, "198.19.0.20:80/TCP", &["198.18.5.2:8080"]);
    expect(&f, "[fd00:96::20]:80/TCP", &["[fd00:5::2]:8080"]);
    // NodePort on the node's addresses, from the Node object.
    expect(&f, "198.18.0.1:30080/TCP", &["198.18.5.2:8080"]);
    expect(&f, "[fd00:18::1]:30080/TCP", &["[fd00:5::2]:8080"]);
    assert!(
        !f.keys().any(|k| k.starts_with("198.19.0.30")),
        "the other proxy's Service is skipped"
    );

    // MODIFIED: one endpoint more, reaching the snapshot in milliseconds.
    let changed = Instant::now();
    server.apply(
        Res::Slices,
        slice(
            "web-abc12",
            "web",
            "IPv4",
            &[
                ("198.18.2.2", true),
                ("198.18.3.2", true),
                ("198.18.4.2", true),
            ],
            &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
        ),
    );
    let (snapshot, _) = source
        .until(STEP, "MODIFIED slice", |s| {
            frontends(s)["198.19.0.10:80/TCP"].len() == 3
        })
        .await;
    let latency = changed.elapsed();
    assert!(
        latency < Duration::from_millis(500),
        "change took {latency:?}"
    );
    eprintln!("watch event -> snapshot: {latency:?}");
    drop(snapshot);

    // A burst of 40 changes becomes a few snapshots, the last one final.
    for i in 0..40u8 {
        let ready: Vec<(String, bool)> = (0..=i % 4)
            .map(|k| (format!("198.18.{}.2", 10 + k), true))
            .collect();
        let endpoints: Vec<(&str, bool)> = ready.iter().map(|(a, r)| (a.as_str(), *r)).collect();
        server.apply(
            Res::Slices,
            slice(
                "web-abc12",
                "web",
                "IPv4",
                &endpoints,
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Final state of the burst: i = 39 -> 39 % 4 = 3 -> four endpoints.
    let (_, seen) = source
        .until(STEP, "burst", |s| {
            frontends(s)["198.19.0.10:80/TCP"].len() == 4
        })
        .await;
    source
        .quiet(Duration::from_millis(300), "after the burst")
        .await;
    assert!(
        seen <= 4,
        "40 changes gave {seen} snapshots; expected a few"
    );

    // BOOKMARK: no change, no snapshot.
    server.bookmark(Res::Services);
    server.bookmark(Res::Slices);
    source
        .quiet(Duration::from_millis(300), "after bookmarks")
        .await;

    // ADDED and DELETED.
    server.apply(
        Res::Services,
        service(&Svc {
            name: "api",
            cluster_ips: &["198.19.0.40", "fd00:96::40"],
            families: &["IPv4", "IPv6"],
            policy: "PreferDualStack",
            ..Svc::default()
        }),
    );
    server.delete(Res::Slices, "default", "web-def34");
    let (snapshot, _) = source
        .until(STEP, "ADDED + DELETED", |s| {
            names(s).contains(&"api".to_owned()) && !has_slice(s, "web-def34")
        })
        .await;
    let f = frontends(&snapshot);
    expect(&f, "[fd00:96::10]:80/TCP", &[]);
    expect(&f, "198.19.0.40:80/TCP", &[]);
    expect(&f, "[fd00:96::40]:80/TCP", &[]);

    // 410 Gone: history is compacted and a change is only in the store; the
    // watcher must re-list to see it.
    let lists_before = server.lists(Res::Services);
    server.apply_silently(
        Res::Services,
        service(&Svc {
            name: "late",
            cluster_ips: &["198.19.0.50"],
            families: &["IPv4"],
            ..Svc::default()
        }),
    );
    server.gone(Res::Services);
    let (snapshot, _) = source
        .until(STEP, "re-list after 410", |s| {
            names(s).contains(&"late".to_owned())
        })
        .await;
    assert!(
        server.lists(Res::Services) > lists_before,
        "410 Gone caused a re-list"
    );
    assert!(frontends(&snapshot).contains_key("198.19.0.50:80/TCP"));

    // A dropped connection: the watch resumes from its resource version and
    // the change made meanwhile arrives.
    server.drop_watches();
    server.delete(Res::Services, "default", "late");
    let (snapshot, _) = source
        .until(STEP, "after a dropped connection", |s| {
            !names(s).contains(&"late".to_owned())
        })
        .await;
    assert!(!frontends(&snapshot).contains_key("198.19.0.50:80/TCP"));
}

/// An unreachable API server: the source says so (the agent keeps its maps
/// and /readyz shows the reason), and catches up when it is back.
#[tokio::test]
async fn unreachable_api_server_is_reported_and_recovered() {
    let server = ApiServer::start(dual_stack_objects()).await;
    let mut source = start_source(&server);
    source.until(STEP, "initial lists", |_| true).await;

    server.set_down(true);
    let reason = source.until_stale(STEP, "API server down").await;
    assert!(reason.contains("cannot watch"), "stale reason: {reason}");
    eprintln!("stale: {reason}");
    server.delete(Res::Services, "default", "np");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.set_down(false);
    // The watches come back within kube-runtime's backoff (seconds).
    let (snapshot, _) = source
        .until(Duration::from_secs(40), "API server back", |s| {
            !names(s).contains(&"np".to_owned())
        })
        .await;
    assert!(!frontends(&snapshot).contains_key("198.19.0.20:80/TCP"));
}

/// The API server is unreachable from the start: stale, no snapshot.
#[tokio::test]
async fn unreachable_at_start_is_stale_without_snapshot() {
    let server = ApiServer::start(dual_stack_objects()).await;
    server.set_down(true);
    let mut source = start_source(&server);
    let reason = source.until_stale(STEP, "API server down at start").await;
    assert!(reason.contains("cannot watch"), "stale reason: {reason}");
    server.set_down(false);
    let (snapshot, _) = source
        .until(Duration::from_secs(40), "API server up", |_| true)
        .await;
    assert_eq!(snapshot.services.len(), 5);
}

/// IPv4-only cluster: Services carry only `clusterIP` and one family, the
/// Node has one `InternalIP`.
#[tokio::test]
async fn single_stack_ipv4_cluster() {
    let mut web = service(&Svc {
        cluster_ips: &["198.19.0.10"],
        families: &["IPv4"],
        ports: &[("", 443, "TCP", 8443, None)],
        ..Svc::default()
    });
    // As older API servers send it: no clusterIPs.
    web["spec"].as_object_mut().unwrap().remove("clusterIPs");
    let server = ApiServer::start(vec![
        (Res::Services, web),
        (
            Res::Services,
            service(&Svc {
                name: "np",
                type_: "NodePort",
                cluster_ips: &["198.19.0.20"],
                families: &["IPv4"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-1",
                "web",
                "IPv4",
                &[("198.18.2.2", true), ("198.18.3.2", true)],
                &[("", 8443, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-1",
                "np",
                "IPv4",
                &[("198.18.5.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (Res::Nodes, node(&[("InternalIP", "198.18.0.1")])),
    ])
    .await;
    let mut source = start_source(&server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    let f = frontends(&snapshot);
    expect(
        &f,
        "198.19.0.10:443/TCP",
        &["198.18.2.2:8443", "198.18.3.2:8443"],
    );
    expect(&f, "198.19.0.20:80/TCP", &["198.18.5.2:8080"]);
    expect(&f, "198.18.0.1:30080/TCP", &["198.18.5.2:8080"]);
    assert!(
        f.keys().all(|k| !k.starts_with('[')),
        "no IPv6 frontend: {f:#?}"
    );
}

/// IPv6-only cluster: every address IPv6, the Node's too.
#[tokio::test]
async fn single_stack_ipv6_cluster() {
    let server = ApiServer::start(vec![
        (
            Res::Services,
            service(&Svc {
                cluster_ips: &["fd00:96::10"],
                families: &["IPv6"],
                ports: &[
                    ("http", 80, "TCP", 8080, None),
                    ("dns", 53, "UDP", 8053, None),
                ],
                ..Svc::default()
            }),
        ),
        (
            Res::Services,
            service(&Svc {
                name: "np",
                type_: "NodePort",
                cluster_ips: &["fd00:96::20"],
                families: &["IPv6"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-1",
                "web",
                "IPv6",
                &[("fd00:2::2", true), ("fd00:3::2", false)],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-1",
                "np",
                "IPv6",
                &[("fd00:5::2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (Res::Nodes, node(&[("InternalIP", "fd00:18::1")])),
    ])
    .await;
    let mut source = start_source(&server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    let f = frontends(&snapshot);
    expect(&f, "[fd00:96::10]:80/TCP", &["[fd00:2::2]:8080"]);
    expect(&f, "[fd00:96::10]:53/UDP", &["[fd00:2::2]:8053"]);
    expect(&f, "[fd00:96::20]:80/TCP", &["[fd00:5::2]:8080"]);
    expect(&f, "[fd00:18::1]:30080/TCP", &["[fd00:5::2]:8080"]);
    assert!(
        f.keys().all(|k| k.starts_with('[')),
        "no IPv4 frontend: {f:#?}"
    );

    // A change of the single-stack slice arrives too.
    server.apply(
        Res::Slices,
        slice(
            "web-1",
            "web",
            "IPv6",
            &[("fd00:2::2", true), ("fd00:3::2", true)],
            &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
        ),
    );
    let (snapshot, _) = source
        .until(STEP, "MODIFIED", |s| {
            frontends(s)["[fd00:96::10]:80/TCP"].len() == 2
        })
        .await;
    expect(
        &frontends(&snapshot),
        "[fd00:96::10]:80/TCP",
        &["[fd00:2::2]:8080", "[fd00:3::2]:8080"],
    );
}

/// An object the model rejects raises a Warning Event on that object.
#[tokio::test]
async fn invalid_object_raises_an_event() {
    let mut bad = service(&Svc {
        name: "bad",
        cluster_ips: &["198.19.0.60"],
        families: &["IPv4"],
        ..Svc::default()
    });
    bad["spec"]["clusterIP"] = json!("198.19.0.300");
    bad["spec"]["clusterIPs"] = json!(["198.19.0.300"]);
    let server = ApiServer::start(vec![
        (Res::Services, bad),
        (Res::Nodes, node(&[("InternalIP", "198.18.0.1")])),
    ])
    .await;
    let mut source = start_source(&server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    let model = model::build(
        &snapshot.services,
        &snapshot.slices,
        &node_context(snapshot.node.as_ref(), NODE),
    );
    let errors: Vec<&ObjectError> = model.errors.iter().filter(|e| e.name == "bad").collect();
    assert_eq!(errors.len(), 1, "{:?}", model.errors);

    let reporter = EventReporter::spawn(&server.source_config());
    reporter.report(errors[0], &snapshot);
    let deadline = Instant::now() + STEP;
    let event = loop {
        if let Some(event) = server.posted_events().pop() {
            break event;
        }
        assert!(Instant::now() < deadline, "no Event posted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["apiVersion"], "events.k8s.io/v1");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidObject");
    assert_eq!(event["metadata"]["namespace"], "default");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["name"], "bad");
    assert_eq!(event["regarding"]["uid"], json!(uid("bad")));
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("198.19.0.300")),
        "note names the problem: {event}"
    );
    assert_eq!(event["reportingController"], "lb-agent");
    assert_eq!(event["reportingInstance"], format!("lb-agent-{NODE}"));
    let posted = server
        .lock()
        .requests
        .iter()
        .filter(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/default/events"))
        .count();
    assert_eq!(posted, 1);
}
