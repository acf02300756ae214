//! Services as the kube source lists and watches them: `spec` and `status`
//! as `k8s-openapi` reads them, the metadata reduced to what the model
//! reads (see `meta`: a Service applied with kubectl carries a copy of
//! itself in an annotation, and its managed fields).

use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::meta;

/// A Service with only the metadata the model reads. Read as `k8s-openapi`
/// reads a Service, but for `apiVersion` and `kind` (the watch asked for
/// Services) and the metadata not kept, which are not checked.
#[derive(Clone, Debug, Deserialize)]
pub struct ListedService {
    /// `metadata`: name, namespace, `resourceVersion`,
    /// `creationTimestamp`, and the labels the model reads.
    #[serde(default, deserialize_with = "meta::listed_service_meta")]
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: Option<ServiceSpec>,
    /// `status`.
    pub status: Option<ServiceStatus>,
}

impl From<ListedService> for Service {
    fn from(service: ListedService) -> Self {
        Self {
            metadata: service.metadata,
            spec: service.spec,
            status: service.status,
        }
    }
}

impl k8s_openapi::Resource for ListedService {
    const API_VERSION: &'static str = <Service as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Service as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Service as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Service as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Service as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Service as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::ListableResource for ListedService {
    const LIST_KIND: &'static str = <Service as k8s_openapi::ListableResource>::LIST_KIND;
}

impl k8s_openapi::Metadata for ListedService {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::build;
    use crate::model::test_fixtures::node_a;

    /// A Service as a cluster serves one applied with kubectl, and a
    /// contested twin: the older one claims the frontend.
    fn services() -> [serde_json::Value; 2] {
        let service = |name: &str, created: &str| {
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {
                    "name": name, "namespace": "shop", "uid": "5f0c", "resourceVersion": "42",
                    "creationTimestamp": created,
                    "labels": {"app": "web"},
                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"Service\"}"},
                    "managedFields": [{"manager": "kubectl", "operation": "Update",
                                       "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {}}}}],
                },
                "spec": {
                    "type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
                    "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                },
                "status": {"loadBalancer": {}},
            })
        };
        [
            service("web", "2026-12-01T10:00:00Z"),
            service("web-twin", "2026-11-01T10:00:00Z"),
        ]
    }

    #[test]
    fn a_listed_service_gives_the_model_what_the_api_object_does() {
        let api: Vec<Service> = services()
            .into_iter()
            .map(|json| serde_json::from_value(json).expect("a Service"))
            .collect();
        let listed: Vec<Service> = services()
            .into_iter()
            .map(|json| {
                let listed: ListedService = serde_json::from_value(json).expect("a listed Service");
                Service::from(listed)
            })
            .collect();
        let node = node_a();
        let model = build(&listed, &[], &node);
        assert_eq!(model, build(&api, &[], &node));
        // Not vacuous: the older twin won the contest, which only the
        // creation times decide.
        assert!(!model.frontends.is_empty() && !model.errors.is_empty());
        assert!(model.errors.iter().all(|error| error.name == "web"));
        // What the model does not read is gone.
        let meta = &listed[0].metadata;
        assert!(meta.annotations.is_none() && meta.managed_fields.is_none() && meta.uid.is_none());
        assert_eq!(meta.labels, None, "no label the model reads");
        assert_eq!(listed[0].spec, api[0].spec);
    }
}
