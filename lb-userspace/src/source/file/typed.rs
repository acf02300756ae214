//! A JSON object read in one pass as the Service or `EndpointSlice` its
//! `apiVersion` and `kind` (or its list's defaults) say it is.
//!
//! Reading an object's head (`apiVersion`, `kind`) first and then the
//! object as its type scans its text twice: at 100k Services that was
//! about a fifth of the whole first read. The two kinds share only
//! `metadata`, so one struct holds the fields of both, and the kind,
//! known at the end of the object, picks which are used. Anything this
//! does not take exactly as `k8s-openapi` would (the object is not of the
//! two kinds, or a field does not fit) is left to the general path, which
//! reports it with the field's path and the object's name.

use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

use super::parse::ItemDefaults;

/// The fields of a Service (`metadata`, `spec`, `status`) and of an
/// `EndpointSlice` (`metadata`, `addressType`, `endpoints`, `ports`) side
/// by side; other fields are skipped, as `k8s-openapi` skips them.
#[derive(Deserialize)]
pub(super) struct EitherObject {
    /// Present only as a string: `k8s-openapi` rejects `null` here, so
    /// such an object goes to the general path and its error.
    #[serde(rename = "apiVersion", default, deserialize_with = "present")]
    api_version: Option<String>,
    #[serde(default, deserialize_with = "present")]
    kind: Option<String>,
    metadata: Option<ObjectMeta>,
    spec: Option<ServiceSpec>,
    status: Option<ServiceStatus>,
    #[serde(rename = "addressType")]
    address_type: Option<String>,
    endpoints: Option<Vec<Endpoint>>,
    ports: Option<Vec<EndpointPort>>,
}

/// A string field that, when present, must be a string (not `null`).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

/// What an [`EitherObject`] turned out to be.
#[expect(
    clippy::large_enum_variant,
    reason = "moved out at once into the file's list; a box would be one more allocation per object"
)]
pub(super) enum Typed {
    Service(Service),
    Slice(EndpointSlice),
}

impl EitherObject {
    /// The object as its kind, built as `k8s-openapi`'s own deserializers
    /// build it (missing `metadata` and `addressType`: empty);
    /// `None` when it is neither kind.
    pub(super) fn into_typed(self, defaults: Option<ItemDefaults<'_>>) -> Option<Typed> {
        let api_version = self
            .api_version
            .as_deref()
            .or(defaults.map(|defaults| defaults.api_version));
        let kind = self
            .kind
            .as_deref()
            .or(defaults.map(|defaults| defaults.kind));
        match (api_version, kind) {
            (Some("v1"), Some("Service")) => Some(Typed::Service(Service {
                metadata: self.metadata.unwrap_or_default(),
                spec: self.spec,
                status: self.status,
            })),
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
                Some(Typed::Slice(EndpointSlice {
                    address_type: self.address_type.unwrap_or_default(),
                    endpoints: self.endpoints,
                    metadata: self.metadata.unwrap_or_default(),
                    ports: self.ports,
                }))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop","labels":{"app":"web"}},"spec":{"clusterIP":"10.96.0.1","clusterIPs":["10.96.0.1","fd00::1"],"ports":[{"name":"http","port":80,"targetPort":8080}]},"status":{"loadBalancer":{}}}"#;
    const SLICE: &str = r#"{"addressType":"IPv4","apiVersion":"discovery.k8s.io/v1","endpoints":[{"addresses":["10.244.0.1"],"conditions":{"ready":true},"nodeName":"n1","zone":"a"}],"kind":"EndpointSlice","metadata":{"name":"web-a","namespace":"shop","labels":{"kubernetes.io/service-name":"web"}},"ports":[{"name":"http","port":8080,"protocol":"TCP"}]}"#;

    fn typed(text: &str, defaults: Option<ItemDefaults<'_>>) -> Option<Typed> {
        serde_json::from_str::<EitherObject>(text)
            .expect("parses")
            .into_typed(defaults)
    }

    #[test]
    fn a_service_and_a_slice_come_out_as_k8s_openapi_reads_them() {
        let Some(Typed::Service(service)) = typed(SERVICE, None) else {
            panic!("a Service");
        };
        assert_eq!(
            service,
            serde_json::from_str::<Service>(SERVICE).expect("k8s-openapi")
        );
        let Some(Typed::Slice(slice)) = typed(SLICE, None) else {
            panic!("a slice");
        };
        assert_eq!(
            slice,
            serde_json::from_str::<EndpointSlice>(SLICE).expect("k8s-openapi")
        );
    }

    #[test]
    fn list_items_take_their_kind_from_the_list() {
        let defaults = ItemDefaults::of_list("ServiceList", "v1");
        let item = r#"{"metadata":{"name":"web"},"spec":{"ports":[{"port":80}]}}"#;
        let Some(Typed::Service(service)) = typed(item, defaults) else {
            panic!("a Service from a ServiceList");
        };
        assert_eq!(service.metadata.name.as_deref(), Some("web"));
        assert!(typed(item, None).is_none(), "no kind and no list: neither");
        // The item's own kind wins over the list's.
        let other = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#;
        assert!(typed(other, defaults).is_none());
    }

    #[test]
    fn empty_fields_default_as_in_k8s_openapi() {
        let bare = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice"}"#;
        let Some(Typed::Slice(slice)) = typed(bare, None) else {
            panic!("a slice");
        };
        assert_eq!(
            slice,
            serde_json::from_str::<EndpointSlice>(bare).expect("k8s-openapi")
        );
        let nulls = r#"{"apiVersion":"v1","kind":"Service","metadata":null,"spec":null}"#;
        let Some(Typed::Service(service)) = typed(nulls, None) else {
            panic!("a Service");
        };
        assert_eq!(
            service,
            serde_json::from_str::<Service>(nulls).expect("k8s-openapi")
        );
    }

    /// What `k8s-openapi` would reject is not taken here: the general path
    /// reports it (see `reread`'s tests for the message).
    #[test]
    fn what_does_not_fit_is_an_error_for_the_general_path() {
        for text in [
            r#"{"apiVersion":null,"kind":"Service"}"#,
            r#"{"apiVersion":"v1","kind":"Service","spec":{"ports":[{"port":"eighty"}]}}"#,
            r#"{"apiVersion":"v1","kind":"Service","kind":"Service"}"#,
            r#"{"apiVersion":"v1","kind":"Service","metadata":["web"]}"#,
            r#"["not", "an", "object"]"#,
        ] {
            assert!(
                serde_json::from_str::<EitherObject>(text).is_err(),
                "{text}"
            );
        }
    }
}
