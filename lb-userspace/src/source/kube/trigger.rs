//! `EndpointSlice` trigger times as network programming latencies.

use std::{collections::HashMap, str::FromStr as _, time::SystemTime};

use k8s_openapi::{api::discovery::v1::EndpointSlice, jiff::Timestamp};

use crate::model::SliceTrigger;

/// Turns `EndpointSlice` trigger-time annotations into network programming
/// latencies, as kube-proxy does: each distinct annotation value of a slice
/// counts once, and only changes made after the agent started.
#[derive(Debug)]
pub struct TriggerTimes {
    started: SystemTime,
    seen: HashMap<(String, String), String>,
}

impl TriggerTimes {
    /// Ignores trigger times before STARTED.
    #[must_use]
    pub fn new(started: SystemTime) -> Self {
        Self {
            started,
            seen: HashMap::new(),
        }
    }

    /// Trigger times of SLICES not seen before; call once their state is in
    /// the maps. Forgets slices that are gone.
    pub fn take_new(&mut self, slices: &[EndpointSlice]) -> Vec<SystemTime> {
        let mut fresh = Vec::new();
        let mut current = HashMap::with_capacity(slices.len());
        for slice in slices.iter().filter_map(SliceTrigger::of_annotated) {
            let SliceTrigger {
                namespace,
                name,
                time: Some(value),
            } = slice
            else {
                continue;
            };
            let key = (namespace, name);
            fresh.extend(self.fresh_time(&key, &value));
            current.insert(key, value);
        }
        self.seen = current;
        fresh
    }
}

impl TriggerTimes {
    /// Trigger times of SLICES (changed ones) not seen before, forgetting
    /// the REMOVED ones: [`TriggerTimes::take_new`] for a source that sends
    /// changes instead of snapshots.
    pub fn take_changed(
        &mut self,
        slices: impl IntoIterator<Item = SliceTrigger>,
        removed: &[crate::model::ObjectKey],
    ) -> Vec<SystemTime> {
        for (namespace, name) in removed {
            // Keys carry the defaulted namespace; annotations are kept by
            // the namespace as written.
            self.seen.remove(&(namespace.clone(), name.clone()));
            if namespace == crate::model::DEFAULT_NAMESPACE {
                self.seen.remove(&(String::new(), name.clone()));
            }
        }
        let mut fresh = Vec::new();
        for slice in slices {
            let key = (slice.namespace, slice.name);
            let Some(value) = slice.time else {
                self.seen.remove(&key);
                continue;
            };
            fresh.extend(self.fresh_time(&key, &value));
            self.seen.insert(key, value);
        }
        fresh
    }

    /// The time of VALUE, the trigger-time annotation of slice KEY, when
    /// it is not the value seen last and not from before the start.
    fn fresh_time(&self, key: &(String, String), value: &str) -> Option<SystemTime> {
        if self.seen.get(key).map(String::as_str) == Some(value) {
            return None;
        }
        parse_time(value).filter(|time| *time >= self.started)
    }
}

/// An RFC 3339 time, as the API writes annotations.
#[must_use]
pub fn parse_time(text: &str) -> Option<SystemTime> {
    Timestamp::from_str(text).ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::model::TRIGGER_TIME_ANNOTATION;

    fn slice(name: &str, trigger: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                annotations: trigger
                    .map(|t| [(TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        }
    }

    #[test]
    fn trigger_times_count_each_change_once_and_skip_old_ones() {
        let started = parse_time("2025-01-01T00:00:00Z").unwrap();
        let mut times = TriggerTimes::new(started);
        let first = [
            slice("a", Some("2025-01-01T00:00:01Z")),
            slice("b", Some("2024-12-31T23:59:59Z")),
            slice("c", None),
            slice("d", Some("garbage")),
        ];
        assert_eq!(
            times.take_new(&first),
            vec![parse_time("2025-01-01T00:00:01Z").unwrap()]
        );
        assert!(times.take_new(&first).is_empty());
        let second = [
            slice("a", Some("2025-01-01T00:00:02.5Z")),
            slice("b", Some("2025-01-01T00:00:03Z")),
        ];
        assert_eq!(times.take_new(&second).len(), 2);
    }
}
