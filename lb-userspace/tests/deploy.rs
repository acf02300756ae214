//! `deploy/`: kubectl renders it (`kubectl kustomize deploy/`) and accepts
//! it (`kubectl apply --dry-run=client --validate=false -k deploy/`, against
//! a stand-in API server on 127.0.0.1 that answers discovery, since even a
//! client-side dry run asks the server which kinds exist), and the rendered
//! objects grant and ask for nothing beyond what the agent needs: RBAC
//! limited to reading Services, `EndpointSlice`s and Nodes and raising
//! Events; a `DaemonSet` that is not privileged and drops every capability
//! but the three it adds.
//!
//! kubectl: `scripts/setup.sh` installs it (Debian's `kubernetes-client`)
//! when it is missing.

mod support;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use support::netns::unique_prefix;
use support::process::{TempDir, find_program, run_ok_within};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kubectl() -> PathBuf {
    find_program("kubectl").unwrap_or_else(|| {
        panic!("kubectl is not on PATH: run scripts/setup.sh (installs Debian's kubernetes-client)")
    })
}

/// kubectl with a private HOME and cache, so nothing of the user's is read
/// or written.
fn kubectl_cmd(home: &Path) -> Command {
    let mut cmd = Command::new(kubectl());
    cmd.env("HOME", home)
        .env_remove("KUBECONFIG")
        .arg(format!("--cache-dir={}", home.join("cache").display()));
    cmd
}

/// Runs CMD (60 s at most, then killed), checks that it succeeded and
/// returns its stdout.
fn run(cmd: &mut Command) -> String {
    run_ok_within(cmd, Duration::from_secs(60))
}

/// A private HOME for kubectl, removed on drop.
fn temp_home(tag: &str) -> TempDir {
    TempDir::create(&unique_prefix(&format!("lb-deploy-{tag}-")))
}

fn rendered() -> Vec<Value> {
    let home = temp_home("render");
    let text = run(kubectl_cmd(&home.0).arg("kustomize").arg(deploy_dir()));
    serde_saphyr::from_multiple(&text).expect("rendered YAML parses")
}

fn kind_of(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| kind_of(d) == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|s| {
            s.iter()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kustomize_renders_the_install() {
    let docs = rendered();
    let kinds: BTreeSet<&str> = docs.iter().map(kind_of).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ])
    );
    for doc in &docs {
        let meta = &doc["metadata"];
        match kind_of(doc) {
            "ClusterRole" | "ClusterRoleBinding" => assert!(meta["namespace"].is_null()),
            _ => assert_eq!(meta["namespace"], "kube-system", "{doc:?}"),
        }
    }
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"]["name"],
        one(&docs, "ClusterRole")["metadata"]["name"]
    );
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(
        binding["subjects"][0]["name"],
        one(&docs, "ServiceAccount")["metadata"]["name"]
    );
    assert_eq!(binding["subjects"][0]["namespace"], "kube-system");
}

/// Every (`apiGroup`, resource, verb) the `ClusterRole` grants is in the list
/// the agent needs, and the ones it uses are there.
#[test]
fn rbac_grants_nothing_beyond_reading_and_events() {
    let docs = rendered();
    let role = one(&docs, "ClusterRole");
    assert!(role["aggregationRule"].is_null(), "no aggregation");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(
            rule["nonResourceURLs"].is_null(),
            "no non-resource URLs: {rule:?}"
        );
        assert!(rule["resourceNames"].is_null() || strings(&rule["resourceNames"]).is_empty());
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for part in [&group, &resource, &verb] {
                        assert!(!part.contains('*'), "wildcard in {rule:?}");
                    }
                    granted.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    let mut allowed = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            allowed.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            allowed.insert((group.to_owned(), "events".to_owned(), verb.to_owned()));
        }
    }
    let beyond: Vec<_> = granted.difference(&allowed).collect();
    assert!(
        beyond.is_empty(),
        "grants beyond the agent's needs: {beyond:?}"
    );
    // What the agent does use: list+watch of the three, Events via events.k8s.io.
    for needed in [
        ("", "services", "list"),
        ("", "services", "watch"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ] {
        let needed = (
            needed.0.to_owned(),
            needed.1.to_owned(),
            needed.2.to_owned(),
        );
        assert!(granted.contains(&needed), "missing {needed:?}");
    }
}

/// The host's cgroup v2 root for the socket programs, read-only, where
/// `--cgroup-root` points.
#[test]
fn daemonset_mounts_the_cgroup_root() {
    let docs = rendered();
    let ds = one(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let cgroup = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["hostPath"]["path"] == "/sys/fs/cgroup")
        .expect("a hostPath volume of /sys/fs/cgroup");
    let cgroup_mount = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == cgroup["name"])
        .expect("cgroup root mounted");
    assert_eq!(cgroup_mount["readOnly"], true);
    let cgroup_root = &one(&docs, "ConfigMap")["data"]["LB_CGROUP_ROOT"];
    assert_eq!(cgroup_mount["mountPath"], *cgroup_root);
    assert!(strings(&c["args"]).contains(&"--cgroup-root=$(LB_CGROUP_ROOT)".to_owned()));
}

#[test]
fn daemonset_is_unprivileged_and_complete() {
    let docs = rendered();
    let ds = one(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let tolerations = pod["tolerations"].as_array().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "tolerates every taint: {tolerations:?}"
    );
    assert!(pod["hostPID"].is_null() || pod["hostPID"] == false);
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    assert!(pod["initContainers"].is_null(), "no init containers");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert!(
        sc["privileged"].is_null() || sc["privileged"] == false,
        "not privileged"
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let allowed: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into();
    assert!(added.is_subset(&allowed), "capabilities {added:?}");

    // NODE_NAME from the downward API.
    let env = c["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );

    // The host's bpffs, without Bidirectional propagation (privileged only).
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
        .expect("a hostPath volume of /sys/fs/bpf");
    let mount = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("bpffs mounted");
    assert_eq!(mount["mountPropagation"], "HostToContainer");

    // Probes and resources.
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(!c["resources"]["requests"]["cpu"].is_null());
    assert!(!c["resources"]["requests"]["memory"].is_null());

    // Every $(VAR) in the arguments comes from the ConfigMap or env, and the
    // pin path lies on the bpffs mount; the probes ask the metrics port.
    let config = one(&docs, "ConfigMap");
    assert_eq!(
        c["envFrom"][0]["configMapRef"]["name"],
        config["metadata"]["name"]
    );
    let data = &config["data"];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "agent");
    for arg in &args {
        let mut rest = arg.as_str();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').expect("closing parenthesis") + start;
            let var = &rest[start + 2..end];
            assert!(
                data[var].is_string() || env.iter().any(|e| e["name"] == var),
                "{arg}: {var} is defined nowhere"
            );
            rest = &rest[end..];
        }
    }
    let pin_path = data["LB_PIN_PATH"].as_str().expect("LB_PIN_PATH");
    let mount_path = mount["mountPath"].as_str().expect("mountPath");
    assert!(
        pin_path.starts_with(&format!("{mount_path}/")),
        "{pin_path} under {mount_path}"
    );
    let metrics = data["LB_METRICS_ADDR"].as_str().expect("LB_METRICS_ADDR");
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(
            format!(
                "{}:{}",
                get["host"].as_str().unwrap_or(""),
                get["port"].as_u64().unwrap_or(0)
            ),
            metrics,
            "{probe} asks where the agent listens"
        );
    }
}

// ---------------------------------------------------------------------------
// `kubectl apply --dry-run=client`: a stand-in API server for discovery
// ---------------------------------------------------------------------------

fn resource(name: &str, kind: &str, namespaced: bool) -> serde_json::Value {
    serde_json::json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced,
        "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
}

fn discovery(path: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    let group = |name: &str| {
        json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}],
            "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}})
    };
    let list = |group_version: &str, resources: Vec<serde_json::Value>| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources})
    };
    Some(match path {
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group("apps"), group("rbac.authorization.k8s.io")]}),
        "/api/v1" => list(
            "v1",
            vec![
                resource("configmaps", "ConfigMap", true),
                resource("namespaces", "Namespace", false),
                resource("serviceaccounts", "ServiceAccount", true),
            ],
        ),
        "/apis/apps/v1" => list("apps/v1", vec![resource("daemonsets", "DaemonSet", true)]),
        "/apis/rbac.authorization.k8s.io/v1" => list(
            "rbac.authorization.k8s.io/v1",
            vec![
                resource("clusterroles", "ClusterRole", false),
                resource("clusterrolebindings", "ClusterRoleBinding", false),
            ],
        ),
        _ => return None,
    })
}

/// Answers discovery; every object is not found (so apply would create it).
struct Discovery {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Discovery {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, requests) = (Arc::clone(&stop), Arc::clone(&requests));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        // One thread per connection: kubectl may open one
                        // it never uses, which must not hold up the others.
                        Ok((stream, _)) => {
                            let requests = Arc::clone(&requests);
                            std::thread::spawn(move || answer(stream, &requests));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            port,
            stop,
            requests,
            thread: Some(thread),
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(mut stream: TcpStream, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("").to_owned();
    let path = target.split('?').next().unwrap_or("").to_owned();
    requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(format!("{method} {target}"));
    let (status, body) = match discovery(&path) {
        Some(body) if method == "GET" => ("200 OK", body),
        _ => (
            "404 Not Found",
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("{path} not found")}),
        ),
    };
    let body = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[test]
fn kubectl_apply_dry_run_accepts_the_install() {
    let server = Discovery::start();
    let home = temp_home("apply");
    let text = run(kubectl_cmd(&home.0)
        .arg(format!("--server=http://127.0.0.1:{}", server.port))
        .args(["apply", "--dry-run=client", "--validate=false", "-k"])
        .arg(deploy_dir()));
    let requests = server
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for object in [
        "serviceaccount/lb-agent",
        "clusterrole.rbac.authorization.k8s.io/lb-agent",
        "clusterrolebinding.rbac.authorization.k8s.io/lb-agent",
        "configmap/lb-agent-config",
        "daemonset.apps/lb-agent",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(object) && l.contains("created") && l.contains("dry run")),
            "{object} not created (dry run):\n{text}\nrequests: {requests:#?}"
        );
    }
    // A dry run writes nothing.
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "only reads: {requests:#?}"
    );
}

/// The per-node cleanup Job (outside the kustomization) is unprivileged too.
#[test]
fn cleanup_job_is_unprivileged() {
    let path = deploy_dir().join("cleanup/job.yaml");
    let text = std::fs::read_to_string(&path).expect("cleanup job");
    let job: Value = serde_saphyr::from_str(&text).expect("cleanup job parses");
    assert_eq!(kind_of(&job), "Job");
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strings(&c["args"])[0], "cleanup");
    let sc = &c["securityContext"];
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strings(&sc["capabilities"]["add"]), ["NET_ADMIN"]);
}
