//! Kubernetes Events on the objects the agent rejects.

use k8s_openapi::api::{
    core::v1::{ObjectReference, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{EVENT_CONTROLLER, INVALID_REASON, KubeSourceConfig, client, with_causes};
use crate::model::ObjectError;

/// Raises a Kubernetes Event (type Warning, reason [`INVALID_REASON`]) on
/// each object the agent rejects. Publishing happens in the background; a
/// failure is logged, never retried (the log line and metric remain).
#[derive(Clone, Debug)]
pub struct EventReporter {
    tx: mpsc::UnboundedSender<(ObjectReference, String)>,
}

impl EventReporter {
    /// Starts the publisher for the cluster of CONFIG (client created on the
    /// first Event).
    #[must_use]
    pub fn spawn(config: &KubeSourceConfig) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(ObjectReference, String)>();
        let config = config.clone();
        let span = tracing::info_span!("events", node = %config.node_name);
        tokio::spawn(
            async move {
                let reporter = Reporter {
                    controller: EVENT_CONTROLLER.to_owned(),
                    instance: Some(format!("{EVENT_CONTROLLER}-{}", config.node_name)),
                };
                let mut connected: Option<(Client, Recorder)> = None;
                while let Some((object, note)) = rx.recv().await {
                    if connected.is_none() {
                        match client(config.kubeconfig.as_deref()).await {
                            Ok(client) => {
                                let recorder = Recorder::new(client.clone(), reporter.clone());
                                connected = Some((client, recorder));
                            }
                            Err(error) => {
                                tracing::warn!(%error, "cannot raise Kubernetes Events");
                                continue;
                            }
                        }
                    }
                    let Some((client, recorder)) = connected.as_ref() else {
                        continue;
                    };
                    let object = with_uid(client, object).await;
                    let event = invalid_event(note);
                    if let Err(error) = recorder.publish(&event, &object).await {
                        tracing::warn!(
                            %error,
                            kind = ?object.kind,
                            namespace = ?object.namespace,
                            name = ?object.name,
                            "cannot raise a Kubernetes Event"
                        );
                    }
                }
            }
            .instrument(span),
        );
        Self { tx }
    }

    /// Queues an Event on the object ERROR names (its uid is read from the
    /// API server when the Event is raised). Errors about files (not
    /// objects) raise none.
    pub fn report(&self, error: &ObjectError) {
        if let Some(object) = involved_object(error) {
            let _ = self.tx.send((object, error.reason.clone()));
        }
    }
}

fn invalid_event(note: String) -> KubeEvent {
    // The API limits a note to 1 kB.
    let mut note = note;
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    KubeEvent {
        type_: EventType::Warning,
        reason: INVALID_REASON.to_owned(),
        note: Some(note),
        action: "Skipped".to_owned(),
        secondary: None,
    }
}

/// The object an error is about, as an Event's `regarding`, by name (the
/// agent keeps no objects); the publisher adds its uid, read from the API
/// server, when it raises the Event.
#[must_use]
pub fn involved_object(error: &ObjectError) -> Option<ObjectReference> {
    let api_version = match error.kind {
        "Service" => Service::api_version(&()),
        "EndpointSlice" => EndpointSlice::api_version(&()),
        _ => return None,
    };
    Some(ObjectReference {
        api_version: Some(api_version.into_owned()),
        kind: Some(error.kind.to_owned()),
        namespace: Some(error.namespace.clone()),
        name: Some(error.name.clone()),
        ..ObjectReference::default()
    })
}

/// REFERENCE with the uid of the object it names, as the API server has
/// it now (`kubectl describe` finds an object's Events by uid); as it is
/// when the object cannot be read.
async fn with_uid(client: &Client, reference: ObjectReference) -> ObjectReference {
    let (Some(namespace), Some(name)) = (reference.namespace.as_deref(), reference.name.as_deref())
    else {
        return reference;
    };
    let found = match reference.kind.as_deref() {
        Some("Service") => Api::<Service>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|found| found.map(|object| object.object_ref(&()))),
        Some("EndpointSlice") => Api::<EndpointSlice>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|found| found.map(|object| object.object_ref(&()))),
        _ => return reference,
    };
    match found {
        Ok(Some(found)) => found,
        Ok(None) => reference,
        Err(error) => {
            tracing::debug!(error = %with_causes(&error), namespace, name, "cannot read the object of an Event; raised without its uid");
            reference
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn involved_object_names_services_and_slices_only() {
        let error = ObjectError {
            kind: "Service",
            namespace: "prod".into(),
            name: "web".into(),
            reason: "bad".into(),
        };
        let reference = involved_object(&error).unwrap();
        assert_eq!(reference.kind.as_deref(), Some("Service"));
        assert_eq!(reference.api_version.as_deref(), Some("v1"));
        assert_eq!(reference.namespace.as_deref(), Some("prod"));
        assert_eq!(reference.name.as_deref(), Some("web"));
        assert!(reference.uid.is_none(), "read when the Event is raised");
        let slice = ObjectError {
            kind: "EndpointSlice",
            name: "web-1".into(),
            ..error.clone()
        };
        let reference = involved_object(&slice).unwrap();
        assert_eq!(
            reference.api_version.as_deref(),
            Some("discovery.k8s.io/v1")
        );
        let file = ObjectError {
            kind: "File",
            ..error
        };
        assert!(involved_object(&file).is_none());
    }
}
