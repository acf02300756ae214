//! [`Incremental`]: the model kept up to date object by object, so that a
//! change costs what the Services it touches cost.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoints::{SliceEndpoints, slice_service};
use super::prepared::{PreparedService, PreparedSlice, SliceEntry};
use super::{
    ClaimOrder, ENDPOINT_SLICE, Frontend, FrontendSpec, HealthCheck, Model, NodeContext,
    ObjectError, ObjectKey, SERVICE, ServiceContext, ServiceOutput, ServiceRecord, key_of,
    leave_contested, repack_if_grown, service_output,
};
use crate::fast_hash::{FastHashMap, FastHashSet, map_with_capacity};

/// One stored Service and what it asked for when last computed.
struct ServiceEntry {
    /// `None`: removed, to be forgotten at the next commit. Boxed: B-tree
    /// nodes leave each free slot's size unused.
    service: Option<Box<ServiceRecord>>,
    /// Frontends it claims (served, or refused by a conflict).
    claims: Vec<Frontend>,
    health_check_port: Option<u16>,
    /// Its own errors, a conflict with another Service included.
    errors: Vec<ObjectError>,
}

/// The parts of a Service's entry that a full pass rewrites, borrowed
/// apart from its record (which sorted it into its place).
struct Claimed<'a> {
    claims: &'a mut Vec<Frontend>,
    health_check_port: &'a mut Option<u16>,
    errors: &'a mut Vec<ObjectError>,
}

/// The frontends whose spec changed in one [`Incremental::commit`], with
/// the spec each had before (`None`: it is new).
pub type FrontendChanges = BTreeMap<Frontend, Option<FrontendSpec>>;

/// [`build`](super::build) kept up to date object by object: a change recomputes only the
/// Services it touches (the Service itself, or the Service its slice names),
/// so that one endpoint change costs O(that Service), not O(all Services).
///
/// It gives the same frontends, health checks and errors as [`build`](super::build) over
/// the same objects. Where a change involves two Services claiming one
/// frontend or health check port (whose outcome depends on the claim order
/// of all Services), or the node changes, it recomputes everything.
///
/// Slices are kept only in their parsed, compact form. A new model's first
/// commit computes every Service (as [`build`](super::build) does).
pub struct Incremental {
    node: NodeContext,
    services: BTreeMap<ObjectKey, ServiceEntry>,
    slices: FastHashMap<ObjectKey, SliceEntry>,
    /// (namespace, service name) -> names of its slices, in name order: a
    /// sorted list, as a Service has a few slices (a B-tree set was a node
    /// of ~290 bytes for each Service).
    slices_of: FastHashMap<ObjectKey, Vec<String>>,
    /// How many Services claim each frontend / health check port.
    frontend_claims: FastHashMap<Frontend, u32>,
    port_claims: FastHashMap<u16, u32>,
    frontends: BTreeMap<Frontend, FrontendSpec>,
    health_checks: BTreeMap<u16, HealthCheck>,
    /// Every current error with the number of objects reporting it.
    errors: BTreeMap<ObjectError, u32>,
    /// Duplicates found by the last [`Incremental::reset`].
    duplicates: Vec<ObjectError>,
    /// Services to recompute at the next commit (none kept while
    /// `all_dirty`).
    dirty: BTreeSet<ObjectKey>,
    /// Everything is recomputed at the next commit: a new model (whose
    /// first objects, 300k at 100k Services, then go in without being
    /// noted one by one), or a new node.
    all_dirty: bool,
    /// Objects come from the API server, where an unchanged
    /// `metadata.resourceVersion` means an unchanged object; a slice whose
    /// version did not change is then not parsed again. Off for files,
    /// which may be edited by hand without touching the version.
    trust_resource_versions: bool,
}

impl Incremental {
    /// An empty model for `node`; its first commit computes everything.
    #[must_use]
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            services: BTreeMap::new(),
            slices: FastHashMap::default(),
            slices_of: FastHashMap::default(),
            frontend_claims: FastHashMap::default(),
            port_claims: FastHashMap::default(),
            frontends: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            errors: BTreeMap::new(),
            duplicates: Vec::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            trust_resource_versions: false,
        }
    }

    /// See `trust_resource_versions`: on for the API server's objects.
    pub fn set_trust_resource_versions(&mut self, trust: bool) {
        self.trust_resource_versions = trust;
    }

    /// Replaces every object, as [`build`](super::build) takes them (of two with the same
    /// namespace/name the first given wins). Objects equal to the stored
    /// ones change nothing, so that the commit recomputes only what differs.
    pub fn reset(&mut self, services: &[Service], slices: &[EndpointSlice]) {
        self.duplicates.clear();
        let mut present = BTreeSet::new();
        for service in services {
            let key = key_of(&service.metadata);
            if !present.insert(key.clone()) && service.metadata.name.is_some() {
                self.duplicates.push(ObjectError::for_object(
                    SERVICE,
                    &service.metadata,
                    "duplicate Service, the first one given is used",
                ));
                continue;
            }
            let record = ServiceRecord::new(service);
            let stored = self
                .services
                .get(&key)
                .and_then(|entry| entry.service.as_deref());
            if stored != Some(&record) {
                self.upsert_record(key, record);
            }
        }
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_service(key);
        }
        let mut present = FastHashSet::default();
        for slice in slices {
            // Slices of no Service are none of ours (and no duplicates).
            if slice_service(&slice.metadata).is_none() {
                continue;
            }
            let key = key_of(&slice.metadata);
            if !present.insert(key) && slice.metadata.name.is_some() {
                self.duplicates.push(ObjectError::for_object(
                    ENDPOINT_SLICE,
                    &slice.metadata,
                    "duplicate EndpointSlice, the first one given is used",
                ));
                continue;
            }
            self.upsert_slice(slice);
        }
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_slice(key);
        }
    }

    /// Sets the node; a different node recomputes everything.
    pub fn set_node(&mut self, node: &NodeContext) {
        if *node != self.node {
            self.node = node.clone();
            self.all_dirty = true;
        }
    }

    /// Adds or replaces a Service. Only what the model needs of it is
    /// kept: the API object may be dropped.
    pub fn upsert_service(&mut self, service: &Service) {
        self.upsert_record(key_of(&service.metadata), ServiceRecord::new(service));
    }

    /// As [`Incremental::upsert_service`], parsed already.
    pub fn upsert_prepared_service(&mut self, service: PreparedService) {
        self.upsert_record(service.key, service.record);
    }

    fn upsert_record(&mut self, key: ObjectKey, record: ServiceRecord) {
        if let Some(entry) = self.services.get_mut(&key) {
            if entry.service.as_deref() == Some(&record) {
                return;
            }
            entry.service = Some(Box::new(record));
            self.mark_dirty(&key);
        } else {
            self.mark_dirty(&key);
            self.services.insert(
                key,
                ServiceEntry {
                    service: Some(Box::new(record)),
                    claims: Vec::new(),
                    health_check_port: None,
                    errors: Vec::new(),
                },
            );
        }
    }

    /// The Service KEY is to be recomputed at the next commit.
    fn mark_dirty(&mut self, key: &ObjectKey) {
        if !self.all_dirty {
            self.dirty.insert(key.clone());
        }
    }

    /// Removes a Service, if present.
    pub fn remove_service(&mut self, key: &ObjectKey) {
        if let Some(entry) = self.services.get_mut(key) {
            entry.service = None;
            self.mark_dirty(key);
        }
    }

    /// Adds or replaces an `EndpointSlice`.
    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let key = key_of(&slice.metadata);
        if self.same_version(&key, slice.metadata.resource_version.as_ref()) {
            return;
        }
        self.upsert_slice_entry(key, SliceEntry::new(slice));
    }

    /// As [`Incremental::upsert_slice`], parsed already.
    pub fn upsert_prepared_slice(&mut self, slice: PreparedSlice) {
        if self.same_version(&slice.key, slice.entry.resource_version.as_ref()) {
            return;
        }
        self.upsert_slice_entry(slice.key, slice.entry);
    }

    /// The stored slice `key` has `resource_version`, and versions are
    /// trusted: the object did not change.
    fn same_version(&self, key: &ObjectKey, resource_version: Option<&String>) -> bool {
        self.trust_resource_versions
            && resource_version.is_some()
            && self
                .slices
                .get(key)
                .is_some_and(|old| old.resource_version.as_ref() == resource_version)
    }

    fn upsert_slice_entry(&mut self, key: ObjectKey, entry: SliceEntry) {
        if let Some(old) = self.slices.get_mut(&key)
            && old.service == entry.service
            && old.parsed == entry.parsed
            && old.errors == entry.errors
        {
            old.resource_version = entry.resource_version;
            return;
        }
        self.remove_slice(&key);
        for error in &entry.errors {
            *self.errors.entry(error.clone()).or_default() += 1;
        }
        if let Some(service) = &entry.service {
            let owner = (key.0.clone(), service.clone());
            self.mark_dirty(&owner);
            let names = self.slices_of.entry(owner).or_default();
            if let Err(at) = names.binary_search(&key.1) {
                names.insert(at, key.1.clone());
            }
        }
        self.slices.insert(key, entry);
    }

    /// Removes an `EndpointSlice`, if present.
    pub fn remove_slice(&mut self, key: &ObjectKey) {
        let Some(entry) = self.slices.remove(key) else {
            return;
        };
        for error in &entry.errors {
            self.forget_error(error);
        }
        if let Some(service) = entry.service {
            let owner = (key.0.clone(), service);
            if let Some(names) = self.slices_of.get_mut(&owner) {
                if let Ok(at) = names.binary_search(&key.1) {
                    names.remove(at);
                }
                if names.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            self.mark_dirty(&owner);
        }
    }

    fn forget_error(&mut self, error: &ObjectError) {
        Self::forget_error_in(&mut self.errors, error);
    }

    fn forget_error_in(errors: &mut BTreeMap<ObjectError, u32>, error: &ObjectError) {
        if let Some(count) = errors.get_mut(error) {
            *count -= 1;
            if *count == 0 {
                errors.remove(error);
            }
        }
    }

    /// Recomputes what changed since the last commit; returns the frontends
    /// whose spec changed, with their previous spec.
    pub fn commit(&mut self) -> FrontendChanges {
        if !self.all_dirty {
            let len_before = self.frontends.len();
            let dirty = std::mem::take(&mut self.dirty);
            let mut changes = FrontendChanges::new();
            let mut contested = false;
            for key in &dirty {
                if !self.recompute(key, &mut changes) {
                    contested = true;
                    break;
                }
            }
            if !contested {
                // The Service by Service path inserts one at a time (a full
                // pass builds the tree full).
                repack_if_grown(&mut self.frontends, len_before);
                return changes;
            }
            // Services done so far stay done; the full pass recomputes all
            // of them, measured against the frontends before this commit.
            let before = Self::restore(std::mem::take(&mut self.frontends), changes);
            return self.recompute_all(Some(&before));
        }
        let before = std::mem::take(&mut self.frontends);
        self.recompute_all(Some(&before))
    }

    /// [`commit`](Self::commit) for a caller that plans over every
    /// frontend next and so needs no changes (a first sync, or one after
    /// a failed write). When most Services are to be recomputed anyway, a
    /// pass over all of them without measuring what changed costs less:
    /// on a first sync at 100k Services the changes are 200k entries, each
    /// looked up twice more, and thrown away.
    pub fn commit_for_full_plan(&mut self) {
        if self.all_dirty || 2 * self.dirty.len() >= self.services.len() {
            self.recompute_all(None);
        } else {
            let _ = self.commit();
        }
    }

    /// The frontends as they were, from the current ones and the changes.
    fn restore(
        mut frontends: BTreeMap<Frontend, FrontendSpec>,
        changes: FrontendChanges,
    ) -> BTreeMap<Frontend, FrontendSpec> {
        for (frontend, old) in changes {
            match old {
                Some(spec) => frontends.insert(frontend, spec),
                None => frontends.remove(&frontend),
            };
        }
        frontends
    }

    /// Recomputes one uncontested Service in place; false when it shares a
    /// frontend or health check port with another Service (before or after),
    /// where only a full pass in claim order decides.
    fn recompute(&mut self, key: &ObjectKey, changes: &mut FrontendChanges) -> bool {
        let output = self.services.get(key).and_then(|entry| {
            let context = ServiceContext::new(&self.node);
            Some(self.output_of(key, entry.service.as_deref()?, &context))
        });
        let (old_claims, old_port) = self
            .services
            .get(key)
            .map(|entry| (entry.claims.clone(), entry.health_check_port))
            .unwrap_or_default();
        let new_claims: Vec<Frontend> = output
            .iter()
            .flat_map(|output| output.frontends.iter().map(|(frontend, _)| *frontend))
            .collect();
        let new_port = output
            .as_ref()
            .and_then(|output| output.health_check.as_ref().map(|check| check.port));
        let others =
            |claims: &FastHashMap<Frontend, u32>, frontend: &Frontend, mine: &[Frontend]| {
                claims.get(frontend).copied().unwrap_or(0) > u32::from(mine.contains(frontend))
            };
        let ports_contested = [old_port, new_port].into_iter().flatten().any(|port| {
            self.port_claims.get(&port).copied().unwrap_or(0) > u32::from(old_port == Some(port))
        });
        if ports_contested
            || old_claims
                .iter()
                .chain(&new_claims)
                .any(|frontend| others(&self.frontend_claims, frontend, &old_claims))
        {
            return false;
        }

        for frontend in &old_claims {
            let old = self.frontends.remove(frontend);
            changes.entry(*frontend).or_insert(old);
        }
        if let Some(port) = old_port {
            self.health_checks.remove(&port);
        }
        self.unclaim(key);
        let Some(output) = output else {
            self.services.remove(key);
            Self::settle(changes, &self.frontends, &old_claims);
            return true;
        };
        for error in &output.errors {
            *self.errors.entry(error.clone()).or_default() += 1;
        }
        for frontend in &new_claims {
            *self.frontend_claims.entry(*frontend).or_default() += 1;
        }
        if let Some(port) = new_port {
            *self.port_claims.entry(port).or_default() += 1;
        }
        for (frontend, spec) in output.frontends {
            let old = self.frontends.insert(frontend, spec);
            changes.entry(frontend).or_insert(old);
        }
        if let Some(check) = output.health_check {
            self.health_checks.insert(check.port, check);
        }
        if let Some(entry) = self.services.get_mut(key) {
            entry.claims = new_claims;
            entry.health_check_port = new_port;
            entry.errors = output.errors;
        }
        Self::settle(changes, &self.frontends, &old_claims);
        if let Some(entry) = self.services.get(key) {
            Self::settle(changes, &self.frontends, &entry.claims);
        }
        true
    }

    /// Drops changes of `touched` that turned out to be none (same spec as
    /// before).
    fn settle(
        changes: &mut FrontendChanges,
        frontends: &BTreeMap<Frontend, FrontendSpec>,
        touched: &[Frontend],
    ) {
        for frontend in touched {
            if changes
                .get(frontend)
                .is_some_and(|old| frontends.get(frontend) == old.as_ref())
            {
                changes.remove(frontend);
            }
        }
    }

    /// Forgets what a Service claimed and reported.
    fn unclaim(&mut self, key: &ObjectKey) {
        let Some(entry) = self.services.get_mut(key) else {
            return;
        };
        let claims = std::mem::take(&mut entry.claims);
        let port = entry.health_check_port.take();
        let errors = std::mem::take(&mut entry.errors);
        for frontend in claims {
            if let Some(count) = self.frontend_claims.get_mut(&frontend) {
                *count -= 1;
                if *count == 0 {
                    self.frontend_claims.remove(&frontend);
                }
            }
        }
        if let Some(port) = port
            && let Some(count) = self.port_claims.get_mut(&port)
        {
            *count -= 1;
            if *count == 0 {
                self.port_claims.remove(&port);
            }
        }
        for error in &errors {
            self.forget_error(error);
        }
    }

    /// Whether the claim counts are what the Services' entries claim (a
    /// stale count would send every later commit down the full pass).
    #[cfg(test)]
    fn claims_match_entries(&self) -> bool {
        let mut frontends: FastHashMap<Frontend, u32> = FastHashMap::default();
        let mut ports: FastHashMap<u16, u32> = FastHashMap::default();
        for entry in self.services.values() {
            for frontend in &entry.claims {
                *frontends.entry(*frontend).or_default() += 1;
            }
            if let Some(port) = entry.health_check_port {
                *ports.entry(port).or_default() += 1;
            }
        }
        frontends == self.frontend_claims && ports == self.port_claims
    }

    /// What the Service with `key` and `record` serves and reports.
    fn output_of(
        &self,
        key: &ObjectKey,
        record: &ServiceRecord,
        context: &ServiceContext<'_>,
    ) -> ServiceOutput {
        let owner = (key.0.as_str(), key.1.as_str());
        if !record.named {
            return ServiceOutput {
                errors: vec![ObjectError::for_key(
                    SERVICE,
                    owner,
                    "missing metadata.name".to_owned(),
                )],
                ..ServiceOutput::default()
            };
        }
        // One key to look each slice up with, its name rewritten in place
        // (not two strings made and freed per slice).
        let mut slice_key: ObjectKey = (key.0.clone(), String::new());
        let slices: Vec<&SliceEndpoints> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                slice_key.1.clear();
                slice_key.1.push_str(name);
                self.slices.get(&slice_key)?.parsed.as_ref()
            })
            .collect();
        service_output(record, owner, &slices, context)
    }

    /// Every Service in claim order (oldest first), as [`build`](super::build)
    /// does; the changes are measured against `before` (none without it).
    fn recompute_all(
        &mut self,
        before: Option<&BTreeMap<Frontend, FrontendSpec>>,
    ) -> FrontendChanges {
        self.all_dirty = false;
        self.dirty.clear();
        // Every Service claims again below: what they all claimed goes at
        // once (only Services claim frontends and ports).
        self.frontend_claims.clear();
        self.port_claims.clear();
        for entry in self.services.values_mut() {
            entry.claims.clear();
            entry.health_check_port = None;
            for error in std::mem::take(&mut entry.errors) {
                Self::forget_error_in(&mut self.errors, &error);
            }
        }
        self.services.retain(|_, entry| entry.service.is_some());
        // Out of `self` for the pass: each Service's entry is then written
        // through the borrow its place was sorted with (no copy of the
        // 100k keys at 100k Services, no lookups of them).
        let mut services = std::mem::take(&mut self.services);
        // Each Service's place computed once, not at every comparison (a
        // lookup of both keys each time: ~1.7M at 100k Services). Stable:
        // equal places keep the keys' order.
        let mut order: Vec<(ClaimOrder<'_>, &ObjectKey, &ServiceRecord, Claimed<'_>)> = services
            .iter_mut()
            .filter_map(|(key, entry)| {
                let ServiceEntry {
                    service,
                    claims,
                    health_check_port,
                    errors,
                } = entry;
                let record = service.as_deref()?;
                let claimed = Claimed {
                    claims,
                    health_check_port,
                    errors,
                };
                Some((record.claim_order(key), key, record, claimed))
            })
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0));
        // The frontends are collected in claim order and made into their
        // B-tree at the end, from sorted entries, which fills its nodes.
        // Inserted one by one in claim order (not key order), the 200k of
        // 100k Services left the nodes half full and were rebuilt after:
        // the inserts and the rebuild were ~40% of a first sync's commit.
        // Until then, which Service serves a frontend is found through
        // `served` (its place in `accepted`). Room for as many as before,
        // or one per Service on a first pass.
        let room = [
            self.frontends.len(),
            before.map_or(0, BTreeMap::len),
            order.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or_default();
        let mut accepted: Vec<(Frontend, FrontendSpec)> = Vec::with_capacity(room);
        let mut served: FastHashMap<Frontend, usize> = map_with_capacity(room);
        // The old tree goes now, not when the new one replaces it.
        self.frontends.clear();
        self.health_checks.clear();
        // Made once for the pass (its node addresses are a set).
        let context = ServiceContext::new(&self.node);
        for (_, key, record, claimed) in order {
            let mut output = self.output_of(key, record, &context);
            let claims: Vec<Frontend> = output.frontends.iter().map(|(f, _)| *f).collect();
            let port = output.health_check.as_ref().map(|check| check.port);
            leave_contested(
                &mut output,
                (&key.0, &key.1),
                |frontend| served.get(frontend).map(|&at| &accepted[at].1.service),
                &self.health_checks,
            );
            for error in &output.errors {
                *self.errors.entry(error.clone()).or_default() += 1;
            }
            for frontend in &claims {
                *self.frontend_claims.entry(*frontend).or_default() += 1;
            }
            if let Some(port) = port {
                *self.port_claims.entry(port).or_default() += 1;
            }
            for (frontend, spec) in output.frontends {
                served.insert(frontend, accepted.len());
                accepted.push((frontend, spec));
            }
            if let Some(check) = output.health_check {
                self.health_checks.insert(check.port, check);
            }
            *claimed.claims = claims;
            *claimed.health_check_port = port;
            *claimed.errors = output.errors;
        }
        // Freed first, so that the tree can take its memory.
        drop(served);
        // Sorted here through their keys (the keys sorted, then one swap
        // per entry), so that the tree's own stable sort finds one run and
        // moves nothing: its merges moved the 200-byte entries several
        // times over (~7% of a first sync's commit). Equal frontends keep
        // their claim order, so that one given twice by one Service is the
        // later one, as an insert would have it.
        accepted.sort_by_cached_key(|(frontend, _)| *frontend);
        self.frontends = accepted.into_iter().collect();
        self.services = services;
        let mut changes = FrontendChanges::new();
        let Some(before) = before else {
            return changes;
        };
        for (frontend, spec) in before {
            if self.frontends.get(frontend) != Some(spec) {
                changes.insert(*frontend, Some(spec.clone()));
            }
        }
        for frontend in self.frontends.keys() {
            if !before.contains_key(frontend) {
                changes.insert(*frontend, None);
            }
        }
        changes
    }

    /// The desired frontends.
    #[must_use]
    pub fn frontends(&self) -> &BTreeMap<Frontend, FrontendSpec> {
        &self.frontends
    }

    /// Health checks to serve, sorted by port.
    #[must_use]
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        self.health_checks.values().cloned().collect()
    }

    /// Current errors, sorted and deduplicated as [`build`](super::build) gives them.
    #[must_use]
    pub fn errors(&self) -> Vec<ObjectError> {
        let mut errors: Vec<ObjectError> = self
            .errors
            .keys()
            .chain(&self.duplicates)
            .cloned()
            .collect();
        errors.sort();
        errors.dedup();
        errors
    }

    /// The whole model, as [`build`](super::build) returns it.
    #[must_use]
    pub fn model(&self) -> Model {
        Model {
            frontends: self.frontends.clone(),
            health_checks: self.health_checks(),
            errors: self.errors(),
        }
    }
}

#[cfg(test)]
mod tests;
