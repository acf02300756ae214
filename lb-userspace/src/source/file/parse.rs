//! A manifest file's documents into Services, `EndpointSlice`s and errors
//! that say where the offending document sits.

use std::fs;
use std::io;
use std::path::Path;

use serde_json::Value;

use super::Snapshot;
use super::listing::ManifestFile;
use crate::model::{DEFAULT_NAMESPACE, ObjectError};

/// The kind of an error about a file (not an object).
const FILE: &str = "File";

pub(super) fn file_error(file: &str, reason: String) -> ObjectError {
    ObjectError {
        kind: FILE,
        namespace: String::new(),
        name: file.to_owned(),
        reason,
    }
}

pub(super) fn load_file(file: &ManifestFile, snapshot: &mut Snapshot) {
    let name = file.name.as_str();
    let text = match fs::read_to_string(&file.path) {
        Ok(text) => text,
        // Deleted since listed: the watcher will see that and reload.
        Err(error) if error.kind() == io::ErrorKind::NotFound => return,
        Err(error) => {
            snapshot
                .errors
                .push(file_error(name, format!("cannot read: {error}")));
            return;
        }
    };
    let is_json = Path::new(name)
        .extension()
        .is_some_and(|extension| extension == "json");
    for (index, document) in parse_documents(name, &text, is_json, &mut snapshot.errors)
        .into_iter()
        .enumerate()
    {
        let origin = Origin {
            file: name,
            location: format!("document {}", index + 1),
        };
        add_object(&document, &origin, None, snapshot);
    }
}

/// Splits a file into documents. A syntax error ends the file (the parser
/// cannot resynchronise) but keeps the documents before it.
fn parse_documents(
    name: &str,
    text: &str,
    is_json: bool,
    errors: &mut Vec<ObjectError>,
) -> Vec<Value> {
    let mut documents = Vec::new();
    if is_json {
        // A stream, so that concatenated JSON objects (`jq -c`) also load.
        for document in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
            match document {
                Ok(document) => documents.push(document),
                Err(error) => {
                    errors.push(file_error(name, format!("not valid JSON: {error}")));
                    break;
                }
            }
        }
    } else {
        // One line per error (no source snippet): it goes into a log line.
        let options = serde_saphyr::options! { with_snippet: false };
        let mut bytes = text.as_bytes();
        // Empty documents are skipped, not counted.
        for (index, document) in serde_saphyr::read_with_options(&mut bytes, options).enumerate() {
            match document {
                Ok(document) => documents.push(document),
                Err(error) => {
                    let reason = format!("document {}: not valid YAML: {error}", index + 1);
                    errors.push(file_error(name, reason));
                    break;
                }
            }
        }
    }
    documents
}

/// Where a document sits, for error messages: file, then document number
/// and list item within it.
pub(super) struct Origin<'a> {
    pub(super) file: &'a str,
    pub(super) location: String,
}

impl<'a> Origin<'a> {
    /// Where item `index` (0-based) of the list here is.
    pub(super) fn item(&self, index: usize) -> Origin<'a> {
        Origin {
            file: self.file,
            location: format!("{} item {}", self.location, index + 1),
        }
    }

    pub(super) fn error(&self, reason: &str) -> ObjectError {
        file_error(self.file, format!("{}: {reason}", self.location))
    }
}

/// Defaults for the items of a typed list (`ServiceList` from the raw API),
/// which omit their own `apiVersion` and `kind`.
#[derive(Clone, Copy)]
pub(super) struct ItemDefaults<'a> {
    pub(super) api_version: &'a str,
    pub(super) kind: &'a str,
}

impl<'a> ItemDefaults<'a> {
    /// What the items of a `FooList` default to (`kind: Foo`); none for a
    /// plain `List`.
    pub(super) fn of_list(list_kind: &'a str, api_version: &'a str) -> Option<Self> {
        list_kind
            .strip_suffix("List")
            .filter(|kind| !kind.is_empty())
            .map(|kind| ItemDefaults { api_version, kind })
    }
}

pub(super) fn add_object(
    document: &Value,
    origin: &Origin<'_>,
    defaults: Option<ItemDefaults<'_>>,
    snapshot: &mut Snapshot,
) {
    if document.is_null() {
        return;
    }
    if !document.is_object() {
        snapshot
            .errors
            .push(origin.error("not a Kubernetes object (expected a mapping)"));
        return;
    }
    let api_version = document
        .get("apiVersion")
        .and_then(Value::as_str)
        .or(defaults.map(|defaults| defaults.api_version));
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .or(defaults.map(|defaults| defaults.kind));
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        snapshot
            .errors
            .push(origin.error("object has no apiVersion and kind"));
        return;
    };
    match (api_version, kind) {
        ("v1", "Service") => {
            if let Some(service) =
                deserialize_object(document, "Service", origin, &mut snapshot.errors)
            {
                snapshot.services.push(service);
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(slice) =
                deserialize_object(document, "EndpointSlice", origin, &mut snapshot.errors)
            {
                snapshot.slices.push(slice);
            }
        }
        (_, list_kind) if list_kind.ends_with("List") && document.get("items").is_some() => {
            add_list(document, api_version, list_kind, origin, snapshot);
        }
        _ => tracing::debug!(
            file = origin.file,
            location = origin.location,
            api_version,
            kind,
            "ignoring object of another kind"
        ),
    }
}

/// `kind: List` (kubectl; items carry their own kind) or a typed list such
/// as `ServiceList` (the raw API; items inherit it).
fn add_list(
    list: &Value,
    api_version: &str,
    list_kind: &str,
    origin: &Origin<'_>,
    snapshot: &mut Snapshot,
) {
    let Some(items) = list.get("items").and_then(Value::as_array) else {
        snapshot
            .errors
            .push(origin.error(&format!("{list_kind} items is not a list")));
        return;
    };
    let defaults = ItemDefaults::of_list(list_kind, api_version);
    for (index, item) in items.iter().enumerate() {
        add_object(item, &origin.item(index), defaults, snapshot);
    }
}

/// A document of a known kind that does not fit its type is reported under
/// that kind and the name its raw metadata gives, so that the log points at it.
fn deserialize_object<T: serde::de::DeserializeOwned>(
    document: &Value,
    kind: &'static str,
    origin: &Origin<'_>,
    errors: &mut Vec<ObjectError>,
) -> Option<T> {
    // With the path of the offending field: `spec.ports[0].port: ...`.
    match serde_path_to_error::deserialize::<_, T>(document) {
        Ok(object) => Some(object),
        Err(error) => {
            let metadata = document.get("metadata");
            let field = |key: &str| {
                metadata
                    .and_then(|meta| meta.get(key))
                    .and_then(Value::as_str)
            };
            let name = field("name").unwrap_or_default();
            let namespace = match field("namespace") {
                Some(namespace) => namespace,
                None if !name.is_empty() => DEFAULT_NAMESPACE,
                None => "",
            };
            errors.push(ObjectError {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                reason: format!("{}: {}: {error}", origin.file, origin.location),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{self, Frontend, Protocol};
    use crate::source::file::{load_dir, testdir::*};

    /// Verbatim shape of `kubectl get svc,endpointslices -n shop -o yaml`.
    const KUBECTL_LIST: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"web","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80,"targetPort":"http"}],"selector":{"app":"web"}}}
    creationTimestamp: "2025-03-14T09:26:53Z"
    labels:
      app: web
    name: web
    namespace: shop
    resourceVersion: "48213"
    uid: 0f4b7a52-3c1e-4d0b-9a6e-2b8f1c0d9e11
  spec:
    clusterIP: 10.96.112.40
    clusterIPs:
    - 10.96.112.40
    - fd00:10:96::7c1a
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    - IPv6
    ipFamilyPolicy: PreferDualStack
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: http
    selector:
      app: web
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.17
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: kind-worker
    targetRef:
      kind: Pod
      name: web-6d9f7c5b8-4xk2n
      namespace: shop
      uid: 6a1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d
    zone: zone-a
  - addresses:
    - 10.244.2.9
    conditions:
      ready: false
      serving: false
      terminating: true
    nodeName: kind-worker2
    targetRef:
      kind: Pod
      name: web-6d9f7c5b8-p7q8r
      namespace: shop
      uid: 7b2d3e4f-5061-4b7c-9d8e-0f1a2b3c4d5e
    zone: zone-b
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2025-03-14T09:27:10Z"
    creationTimestamp: "2025-03-14T09:26:53Z"
    generateName: web-
    generation: 4
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    name: web-2lqzv
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: 0f4b7a52-3c1e-4d0b-9a6e-2b8f1c0d9e11
    resourceVersion: "48290"
    uid: 1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f
  ports:
  - name: http
    port: 8080
    protocol: TCP
- addressType: IPv6
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - fd00:10:244:1::11
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: kind-worker
    targetRef:
      kind: Pod
      name: web-6d9f7c5b8-4xk2n
      namespace: shop
      uid: 6a1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d
    zone: zone-a
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2025-03-14T09:26:53Z"
    generateName: web-
    generation: 2
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    name: web-9mbcw
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: 0f4b7a52-3c1e-4d0b-9a6e-2b8f1c0d9e11
    resourceVersion: "48291"
    uid: 2d3e4f5a-6b7c-4d8e-9f0a-1b2c3d4e5f60
  ports:
  - name: http
    port: 8080
    protocol: TCP
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn kubectl_list_output_loads_and_builds() {
        let dir = TempDir::new("kubectl-list");
        dir.write("shop.yaml", KUBECTL_LIST);
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(error_lines(&snapshot), Vec::<String>::new());
        assert_eq!(
            names(&snapshot),
            (
                vec!["shop/web".into()],
                vec!["shop/web-2lqzv".into(), "shop/web-9mbcw".into()]
            )
        );

        let model = model::build(
            &snapshot.services,
            &snapshot.slices,
            &model::NodeContext::default(),
        );
        assert_eq!(model.errors, []);
        let backends = |addr: &str| {
            let frontend = Frontend {
                addr: addr.parse().unwrap(),
                port: 80,
                proto: Protocol::Tcp,
            };
            model.frontends[&frontend]
                .backends
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(backends("10.96.112.40"), ["10.244.1.17:8080"]);
        assert_eq!(backends("fd00:10:96::7c1a"), ["[fd00:10:244:1::11]:8080"]);
    }

    #[test]
    fn multi_document_yaml_skips_empty_documents_and_other_kinds() {
        let dir = TempDir::new("multi-doc");
        dir.write(
            "app.yml",
            r"---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {a: b}
---
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.1]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
...
",
        );
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(error_lines(&snapshot), Vec::<String>::new());
        assert_eq!(
            names(&snapshot),
            (vec!["shop/web".into()], vec!["shop/web-1".into()])
        );
    }

    #[test]
    fn json_files_load_single_objects_and_lists() {
        let dir = TempDir::new("json");
        dir.write(
            "svc.json",
            "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Service\",\n\t\"metadata\": {\"name\": \"web\", \"namespace\": \"shop\"},\n\t\"spec\": {\"clusterIP\": \"10.96.0.10\", \"ports\": [{\"port\": 80}]}\n}\n",
        );
        dir.write(
            "slices.json",
            r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {"resourceVersion": "9"},
                "items": [{"metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                           "addressType": "IPv4", "ports": [{"port": 80}], "endpoints": [{"addresses": ["10.244.0.1"]}]}]}"#,
        );
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(error_lines(&snapshot), Vec::<String>::new());
        assert_eq!(
            names(&snapshot),
            (vec!["shop/web".into()], vec!["shop/web-1".into()])
        );
    }

    #[test]
    fn broken_document_is_reported_and_the_rest_of_the_file_loads() {
        let dir = TempDir::new("broken-doc");
        dir.write(
            "mixed.yaml",
            r"apiVersion: v1
kind: Service
metadata: {name: good-a, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec: {clusterIP: 10.96.0.2, ports: [{port: eighty}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-slice}
addressType: IPv4
endpoints: oops
---
kind: Service
metadata: {name: no-version}
---
just a string
---
apiVersion: v1
kind: Service
metadata: {name: good-b, namespace: shop}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
",
        );
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(names(&snapshot).0, ["shop/good-a", "shop/good-b"]);
        assert!(snapshot.slices.is_empty());
        let errors = error_lines(&snapshot);
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert_eq!(
            errors,
            [
                r#"Service shop/bad: mixed.yaml: document 2: spec.ports[0].port: invalid type: string "eighty", expected i32"#,
                r#"EndpointSlice default/bad-slice: mixed.yaml: document 3: endpoints: invalid type: string "oops", expected a sequence"#,
                "File mixed.yaml: document 4: object has no apiVersion and kind",
                "File mixed.yaml: document 5: not a Kubernetes object (expected a mapping)",
            ]
        );
    }

    #[test]
    fn broken_list_item_is_reported_with_its_position() {
        let dir = TempDir::new("broken-item");
        dir.write(
            "list.yaml",
            r"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: good, namespace: shop}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: bad, namespace: shop}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 80, protocol: [TCP]}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: ignored, namespace: shop}
",
        );
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(names(&snapshot).0, ["shop/good"]);
        assert_eq!(
            error_lines(&snapshot),
            [
                "Service shop/bad: list.yaml: document 1 item 2: spec.ports[0].protocol: invalid type: sequence, expected a string"
            ]
        );
    }

    #[test]
    fn syntax_error_keeps_the_documents_before_it() {
        let dir = TempDir::new("syntax-late");
        dir.write(
            "late.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkey: value: another\n",
        );
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(names(&snapshot).0, ["shop/web"]);
        let errors = error_lines(&snapshot);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("File late.yaml: document 2: not valid YAML: ")
                && !errors[0].contains('\n'),
            "{errors:#?}"
        );
    }

    #[test]
    fn garbage_file_is_reported_and_other_files_still_load() {
        let dir = TempDir::new("garbage");
        dir.write("a-garbage.yaml", "key: value: another\n\t- [unclosed\n");
        dir.write("b-garbage.json", "{\"apiVersion\": \"v1\", ");
        dir.write(
            "c-good.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        );
        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(names(&snapshot).0, ["shop/web"]);
        let errors = &snapshot.errors;
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!(
            (errors[0].kind, errors[0].name.as_str()),
            ("File", "a-garbage.yaml")
        );
        assert!(errors[0].reason.contains("not valid YAML"), "{}", errors[0]);
        assert_eq!(
            (errors[1].kind, errors[1].name.as_str()),
            ("File", "b-garbage.json")
        );
        assert!(errors[1].reason.contains("not valid JSON"), "{}", errors[1]);
    }
}
