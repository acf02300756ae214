//! What the agent holds of each resource (keys and versions only) and
//! what changed since the last update.

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Resource, runtime::watcher};

use super::{Changes, NodeChange};
use crate::fast_hash::{FastHashMap, FastHashSet};
use crate::model::{ListedService, ListedSlice, ObjectKey, PreparedSlice, key_of};

/// What one watcher item means for the source.
pub(super) enum Change {
    /// The initial list (or a re-list) is complete.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
    /// Part of a list in progress: its removals are known at `Listed`.
    Listing,
}

/// One watcher item, of whichever resource.
#[expect(
    clippy::large_enum_variant,
    reason = "one item at a time, moved into the tracker at once; a box buys nothing"
)]
pub(super) enum Observed {
    Services(watcher::Event<ListedService>),
    Slices(watcher::Event<ListedSlice>),
    Node(watcher::Event<Node>),
}

/// The objects of one resource as the agent holds them (their key and
/// `resourceVersion` only), and what changed since the last update.
pub(super) struct Tracker<K> {
    /// Key -> `resourceVersion` of each object sent.
    pub(super) sent: FastHashMap<ObjectKey, Option<String>>,
    /// Key -> the object's newest state not yet sent (`None`: deleted).
    pending: FastHashMap<ObjectKey, Option<K>>,
    /// During a re-list: the keys listed so far, so that what it does not
    /// name is removed at its end. `None` during a first list (nothing held
    /// or pending, so nothing to remove: at 100k Services the set cost
    /// ~0.2 s of the list's one thread) and between lists.
    listing: Option<FastHashSet<ObjectKey>>,
    /// A first list's objects not yet sent, in the order listed. A first
    /// list names each key once and the agent holds nothing to compare
    /// them with, so they are not filed by key (a key made, hashed and
    /// stored for each, the object moved into a map and out again: ~5% of
    /// the list's one thread at 100k Services). Filed into `pending` as
    /// soon as any other event comes before they are sent.
    first_list: Vec<K>,
    /// A first list is in progress (its objects go to `first_list`).
    first_listing: bool,
}

impl<K: Resource> Default for Tracker<K> {
    fn default() -> Self {
        Self {
            sent: FastHashMap::default(),
            pending: FastHashMap::default(),
            listing: None,
            first_list: Vec::new(),
            first_listing: false,
        }
    }
}

impl<K: Resource> Tracker<K> {
    /// Takes one watcher event.
    fn observe(&mut self, event: watcher::Event<K>) -> Change {
        match event {
            watcher::Event::Init => {
                self.file_first_list();
                let holds_any = !self.sent.is_empty() || !self.pending.is_empty();
                self.listing = holds_any.then(FastHashSet::default);
                self.first_listing = !holds_any;
                Change::Listing
            }
            watcher::Event::InitApply(object) if self.first_listing => {
                if self.first_list.capacity() == 0 {
                    // Taken at FIRST_LIST_BATCH objects (or at the list's
                    // end): sized once instead of copied as it grows.
                    self.first_list.reserve(super::watch::FIRST_LIST_BATCH + 1);
                }
                self.first_list.push(object);
                Change::Listing
            }
            watcher::Event::InitApply(object) => {
                let key = key_of(object.meta());
                if let Some(listing) = &mut self.listing {
                    listing.insert(key.clone());
                }
                self.applied(key, object);
                Change::Listing
            }
            watcher::Event::InitDone => {
                self.first_listing = false;
                // What the list did not name was deleted meanwhile.
                if let Some(listed) = self.listing.take() {
                    let gone: Vec<ObjectKey> = self
                        .sent
                        .keys()
                        .chain(self.pending.keys())
                        .filter(|key| !listed.contains(*key))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.deleted(key);
                    }
                }
                Change::Listed
            }
            watcher::Event::Apply(object) => {
                self.file_first_list();
                self.applied(key_of(object.meta()), object);
                Change::Changed
            }
            watcher::Event::Delete(object) => {
                self.file_first_list();
                self.deleted(key_of(object.meta()));
                Change::Changed
            }
        }
    }

    /// Files a first list's unsent objects by key, as any other listed
    /// object is (before an event that may replace or delete one of them).
    fn file_first_list(&mut self) {
        for object in std::mem::take(&mut self.first_list) {
            self.pending.insert(key_of(object.meta()), Some(object));
        }
    }

    fn applied(&mut self, key: ObjectKey, object: K) {
        let version = object.meta().resource_version.as_ref();
        let as_sent = version.is_some()
            && self
                .sent
                .get(&key)
                .is_some_and(|sent| sent.as_ref() == version);
        if as_sent {
            // A re-list of an object the agent holds already.
            self.pending.remove(&key);
        } else {
            self.pending.insert(key, Some(object));
        }
    }

    fn deleted(&mut self, key: ObjectKey) {
        if self.sent.contains_key(&key) {
            self.pending.insert(key, None);
        } else {
            self.pending.remove(&key);
        }
    }

    /// Objects (and removals) not yet sent.
    fn pending(&self) -> usize {
        self.pending.len() + self.first_list.len()
    }

    /// What changed since the last call: objects added or replaced, keys
    /// removed. From now on they count as sent.
    fn take(&mut self) -> (Vec<K>, Vec<ObjectKey>) {
        // No key of a first list's objects is in `pending` (they are filed
        // there before anything else is).
        let mut applied = std::mem::take(&mut self.first_list);
        self.sent.reserve(applied.len());
        for object in &applied {
            self.sent.insert(
                key_of(object.meta()),
                object.meta().resource_version.clone(),
            );
        }
        let mut removed = Vec::new();
        for (key, object) in self.pending.drain() {
            if let Some(object) = object {
                self.sent
                    .insert(key, object.meta().resource_version.clone());
                applied.push(object);
            } else {
                self.sent.remove(&key);
                removed.push(key);
            }
        }
        (applied, removed)
    }
}

/// One tracker per watched resource.
#[derive(Default)]
pub(super) struct Trackers {
    services: Tracker<ListedService>,
    slices: Tracker<ListedSlice>,
    pub(super) node: Tracker<Node>,
}

impl Trackers {
    pub(super) fn observe(&mut self, observed: Observed) -> Change {
        match observed {
            Observed::Services(event) => self.services.observe(event),
            Observed::Slices(event) => self.slices.observe(event),
            Observed::Node(event) => self.node.observe(event),
        }
    }

    /// Objects (and removals) of every resource not yet sent.
    pub(super) fn pending_objects(&self) -> usize {
        self.services.pending() + self.slices.pending() + self.node.pending()
    }

    /// Everything not yet sent, as one update; PREPARED: with the objects
    /// parsed into the model's records ([`Changes::prepare`]).
    pub(super) fn take_changes(&mut self, prepared: bool) -> Changes {
        let (services, removed_services) = self.services.take();
        let services = services.into_iter().map(Service::from).collect();
        let (listed, removed_slices) = self.slices.take();
        let (slices, prepared_slices) = if prepared {
            (
                Vec::new(),
                listed.iter().map(PreparedSlice::listed).collect(),
            )
        } else {
            let slices = listed.into_iter().map(EndpointSlice::from).collect();
            (slices, Vec::new())
        };
        let (mut nodes, removed_nodes) = self.node.take();
        let node = match nodes.pop() {
            Some(node) => Some(NodeChange::Set(Box::new(node))),
            None if !removed_nodes.is_empty() => Some(NodeChange::Removed),
            None => None,
        };
        let mut changes = Changes {
            services,
            removed_services,
            slices,
            removed_slices,
            node,
            prepared_slices,
            ..Changes::default()
        };
        if prepared {
            changes.prepare();
        }
        changes
    }
}

/// Nothing changed.
pub(super) fn no_changes(changes: &Changes) -> bool {
    changes.services.is_empty()
        && changes.removed_services.is_empty()
        && changes.slices.is_empty()
        && changes.removed_slices.is_empty()
        && changes.node.is_none()
}

#[cfg(test)]
mod tests {
    use kube::ResourceExt as _;

    use super::*;

    fn versioned(name: &str, version: u32) -> Service {
        let mut service = Service::default();
        service.metadata.name = Some(name.into());
        service.metadata.namespace = Some("default".into());
        service.metadata.resource_version = Some(version.to_string());
        service
    }

    /// Names of the objects and keys in one update, sorted.
    fn taken(tracker: &mut Tracker<Service>) -> (Vec<String>, Vec<String>) {
        let (applied, removed) = tracker.take();
        let mut applied: Vec<String> = applied
            .iter()
            .map(|s| {
                format!(
                    "{}@{}",
                    s.name_any(),
                    s.resource_version().unwrap_or_default()
                )
            })
            .collect();
        let mut removed: Vec<String> = removed.into_iter().map(|(_, name)| name).collect();
        applied.sort();
        removed.sort();
        (applied, removed)
    }

    fn observe_all(
        tracker: &mut Tracker<Service>,
        events: impl IntoIterator<Item = watcher::Event<Service>>,
    ) {
        for event in events {
            tracker.observe(event);
        }
    }

    #[test]
    fn a_burst_sends_each_object_once_and_a_relist_only_the_difference() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut tracker = Tracker::<Service>::default();
        observe_all(
            &mut tracker,
            [
                Init,
                InitApply(versioned("a", 1)),
                InitApply(versioned("b", 2)),
                InitDone,
            ],
        );
        assert_eq!(
            taken(&mut tracker),
            (vec!["a@1".into(), "b@2".into()], vec![])
        );
        // A burst: the newest state of each object, once; an object added
        // and deleted within it is not sent at all.
        observe_all(
            &mut tracker,
            [
                Apply(versioned("a", 3)),
                Apply(versioned("a", 4)),
                Delete(versioned("b", 5)),
                Apply(versioned("c", 6)),
                Delete(versioned("c", 7)),
            ],
        );
        assert_eq!(taken(&mut tracker), (vec!["a@4".into()], vec!["b".into()]));
        // A re-list: unchanged objects are not sent again.
        observe_all(
            &mut tracker,
            [
                Init,
                InitApply(versioned("a", 4)),
                InitApply(versioned("d", 8)),
                InitDone,
            ],
        );
        assert_eq!(taken(&mut tracker), (vec!["d@8".into()], vec![]));
        // A re-list that no longer names what was sent, nor a change not
        // yet sent: all of it is removed.
        observe_all(&mut tracker, [Apply(versioned("d", 9)), Init, InitDone]);
        assert_eq!(taken(&mut tracker), (vec![], vec!["a".into(), "d".into()]));
        assert!(tracker.sent.is_empty());
    }

    #[test]
    fn a_list_restarted_before_anything_was_sent_drops_what_it_no_longer_names() {
        use watcher::Event::{Init, InitApply, InitDone};
        let mut tracker = Tracker::<Service>::default();
        tracker.observe(Init);
        // A first list has nothing to remove, so it keeps no key set.
        assert!(tracker.listing.is_none());
        // It fails after one object; the watcher lists again, without it.
        tracker.observe(InitApply(versioned("a", 1)));
        tracker.observe(Init);
        assert!(tracker.listing.is_some());
        observe_all(&mut tracker, [InitApply(versioned("b", 2)), InitDone]);
        assert_eq!(taken(&mut tracker), (vec!["b@2".into()], vec![]));
    }

    /// A first list's objects are kept in a list, not by key, until sent:
    /// an event that comes before they are sent still replaces or deletes
    /// them.
    #[test]
    fn a_first_lists_objects_are_replaced_and_deleted_by_later_events() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut tracker = Tracker::<Service>::default();
        observe_all(
            &mut tracker,
            [
                Init,
                InitApply(versioned("a", 1)),
                InitApply(versioned("b", 2)),
                InitApply(versioned("c", 3)),
                InitDone,
            ],
        );
        assert_eq!(tracker.pending(), 3);
        assert!(tracker.pending.is_empty(), "listed, not filed by key");
        tracker.observe(Apply(versioned("a", 4)));
        tracker.observe(Delete(versioned("b", 5)));
        assert_eq!(
            taken(&mut tracker),
            (vec!["a@4".into(), "c@3".into()], vec![])
        );
        // Sent: a re-list names them by their versions, and sends nothing.
        observe_all(
            &mut tracker,
            [
                Init,
                InitApply(versioned("a", 4)),
                InitApply(versioned("c", 3)),
                InitDone,
            ],
        );
        assert_eq!(taken(&mut tracker), (vec![], vec![]));
    }
}
