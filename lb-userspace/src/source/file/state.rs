//! Following the directory file by file: what changed since the last
//! look, as [`Changes`] (or the whole directory when a duplicate is
//! involved).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::PathBuf;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::listing::{FileStamp, ManifestFile, manifest_files};
use super::reread::read_file;
use super::split::ListLayout;
use super::{FileSourceError, load_dir};
use crate::model::{ObjectError, ObjectKey, PreparedService, PreparedSlice};
use crate::source::{Changes, SourceUpdate};

/// Which of the two kinds an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum ObjectKind {
    Service,
    Slice,
}

/// One object a file defines.
#[derive(Clone, Debug)]
pub(super) struct ObjectRecord {
    pub(super) kind: ObjectKind,
    pub(super) key: ObjectKey,
    /// Hash of the JSON text it was read from (with the list defaults);
    /// `None` for YAML, whose objects are sent again whenever the file changes.
    pub(super) text_hash: Option<u64>,
}

impl ObjectRecord {
    /// What is left where a record was moved out.
    fn moved() -> Self {
        Self {
            kind: ObjectKind::Service,
            key: (String::new(), String::new()),
            text_hash: None,
        }
    }
}

/// What the source remembers of one file.
#[derive(Debug)]
pub(super) struct FileEntry {
    stamp: FileStamp,
    pub(super) objects: Vec<ObjectRecord>,
    errors: Vec<ObjectError>,
    /// Where a JSON list's items sat, to find them again.
    pub(super) layout: Option<ListLayout>,
}

/// One object of a file read again.
#[derive(Debug)]
pub(super) enum Record {
    /// The old entry's record at this index: the text did not change.
    Kept(usize),
    /// Read (parsed) now.
    Read(ObjectRecord),
}

/// One file read again: its objects (those whose text did not change are
/// only recorded, not parsed again) and errors.
#[derive(Default)]
pub(super) struct FileRead {
    pub(super) objects: Vec<Record>,
    /// A JSON list's layout, when it was read by the fast path.
    pub(super) layout: Option<ListLayout>,
    pub(super) services: Vec<Service>,
    pub(super) slices: Vec<EndpointSlice>,
    /// The plain objects of a read that prepares them ([`Self::prepare`]).
    pub(super) prepared_services: Vec<PreparedService>,
    pub(super) prepared_slices: Vec<PreparedSlice>,
    pub(super) errors: Vec<ObjectError>,
    /// Each plain object parsed into its record as soon as it is read
    /// (`Changes::prepare` one by one), not once the whole file is: at
    /// 100k Services a file's objects outgrew the CPU's caches, and turning
    /// them into records afterwards spent most of its time waiting on
    /// memory.
    pub(super) prepare: bool,
}

impl FileRead {
    /// A read that keeps its objects as API objects, or with PREPARE as
    /// the model's records.
    pub(super) fn new(prepare: bool) -> Self {
        Self {
            prepare,
            ..Self::default()
        }
    }

    pub(super) fn add_service(&mut self, service: Service) {
        if self.prepare {
            self.prepared_services.push(PreparedService::new(&service));
        } else {
            self.services.push(service);
        }
    }

    pub(super) fn add_slice(&mut self, slice: EndpointSlice) {
        if self.prepare {
            self.prepared_slices.push(PreparedSlice::new(&slice));
        } else {
            self.slices.push(slice);
        }
    }

    /// Moves the objects read into CHANGES; returns the file's errors.
    fn hand_over(&mut self, changes: &mut Changes) -> Vec<ObjectError> {
        changes.services.append(&mut self.services);
        changes.slices.append(&mut self.slices);
        changes
            .prepared_services
            .append(&mut self.prepared_services);
        changes.prepared_slices.append(&mut self.prepared_slices);
        std::mem::take(&mut self.errors)
    }
}

/// The objects of CHANGES (taken out), as a part of a streamed read that
/// more parts follow.
fn take_objects(changes: &mut Changes) -> Changes {
    Changes {
        services: std::mem::take(&mut changes.services),
        slices: std::mem::take(&mut changes.slices),
        prepared_services: std::mem::take(&mut changes.prepared_services),
        prepared_slices: std::mem::take(&mut changes.prepared_slices),
        more_follow: true,
        ..Changes::default()
    }
}

/// Follows a manifest directory file by file: a change re-reads only the
/// files whose stat changed, parses only the JSON objects whose text
/// changed, and reports what differs as [`Changes`].
///
/// Of two definitions of one object (in two files, or twice in one) the
/// first in file name order wins, as in [`load_dir`]; whenever a change
/// involves such a duplicate the whole directory is sent again as a
/// [`Snapshot`](super::Snapshot), which resolves it the same way.
#[derive(Debug)]
pub struct DirState {
    dir: PathBuf,
    files: BTreeMap<String, FileEntry>,
    /// Definitions of each object over all files, by [`definition_id`]:
    /// the keys themselves were ~40 MiB at 100k Services.
    definitions: HashMap<u64, u32>,
    /// The last look failed: the next good one is sent even if it finds no
    /// change, so that the agent knows the source is back.
    failed: bool,
    /// A look has sent its update (the first look always sends, also for
    /// an empty directory; later ones only when something changed).
    sent: bool,
    /// A whole-directory snapshot is owed: the one a duplicate called for
    /// could not be read, and the files' state has moved on without it.
    snapshot_owed: bool,
}

impl DirState {
    /// Nothing read yet.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            definitions: HashMap::new(),
            failed: false,
            sent: false,
            snapshot_owed: false,
        }
    }

    /// Looks at the directory; `None` when no manifest file changed since
    /// the previous look (the first look always sends).
    ///
    /// # Errors
    ///
    /// [`FileSourceError::ReadDir`] when the directory cannot be listed.
    pub fn refresh(&mut self) -> Result<Option<SourceUpdate>, FileSourceError> {
        self.look(None, None)
    }

    /// [`DirState::refresh`] where only the manifest files NAMES may have
    /// changed (inotify says which): only they are looked at, not every
    /// file of the directory. The whole directory when it has not been
    /// read whole yet, when the last look failed, or when a named file
    /// cannot be looked at.
    ///
    /// # Errors
    ///
    /// [`FileSourceError::ReadDir`] when the directory cannot be listed.
    pub fn refresh_files(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<Option<SourceUpdate>, FileSourceError> {
        self.look(None, Some(names))
    }

    /// [`DirState::refresh`], but the objects of each file read are handed
    /// to `partial` (as [`Changes`] with `more_follow`) as soon as they are
    /// read; the result then holds only what is left (removals, errors).
    ///
    /// # Errors
    ///
    /// [`FileSourceError::ReadDir`] when the directory cannot be listed.
    pub fn refresh_streaming(
        &mut self,
        partial: &mut dyn FnMut(Changes),
    ) -> Result<Option<SourceUpdate>, FileSourceError> {
        self.look(Some(partial), None)
    }

    /// What changed in the directory (only among NAMED, if given) since
    /// the last look.
    fn look(
        &mut self,
        mut partial: Option<&mut dyn FnMut(Changes)>,
        named: Option<&BTreeSet<String>>,
    ) -> Result<Option<SourceUpdate>, FileSourceError> {
        let started = std::time::Instant::now();
        let first = !self.sent;
        let named = named.filter(|_| !first && !self.failed && !self.snapshot_owed);
        let listing = match named.map(|names| self.named_files(names)) {
            Some(Some(listing)) => Ok(listing),
            _ => manifest_files(&self.dir),
        };
        let listing = match listing {
            Ok(listing) => listing,
            Err(source) => {
                self.failed = true;
                return Err(FileSourceError::ReadDir {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let (stale_files, gone) = self.stale_and_gone(&listing, named);
        if stale_files.is_empty()
            && gone.is_empty()
            && !first
            && !self.failed
            && !self.snapshot_owed
        {
            return Ok(None);
        }
        self.failed = false;

        let mut changes = Changes::default();
        let mut old_objects = Vec::new();
        let mut new_objects = Vec::new();
        for name in gone {
            if let Some(entry) = self.files.remove(&name) {
                old_objects.extend(entry.objects);
            }
        }
        // Objects whose text changed in files that still define the same
        // objects in the same order (the usual edit): their definition
        // counts stay, only they can involve a duplicate.
        let mut edited = Vec::new();
        for (file, stamp) in stale_files {
            let old = self.files.remove(&file.name);
            // The first read, streamed to the agent, hands over records.
            let mut read = read_file(file, old.as_ref(), partial.is_some());
            let old = old.map(|old| old.objects).unwrap_or_default();
            let objects = match settle(old, std::mem::take(&mut read.objects)) {
                (objects, InPlace::Edited(ids)) => {
                    edited.extend(ids);
                    objects
                }
                (objects, InPlace::No(old)) => {
                    old_objects.extend(old);
                    new_objects.extend(objects.iter().cloned());
                    objects
                }
            };
            let errors = read.hand_over(&mut changes);
            if let Some(partial) = partial.as_mut() {
                partial(take_objects(&mut changes));
            }
            self.files.insert(
                file.name.clone(),
                FileEntry {
                    stamp,
                    objects,
                    errors,
                    layout: read.layout,
                },
            );
        }
        let duplicated = self.count_definitions(&old_objects, &new_objects)
            || edited.iter().any(|(kind, key)| {
                self.definitions
                    .get(&definition_id(*kind, key))
                    .is_some_and(|count| *count > 1)
            });
        changes.errors = self
            .files
            .values()
            .flat_map(|entry| entry.errors.iter().cloned())
            .collect();
        if duplicated || self.snapshot_owed {
            tracing::debug!(dir = %self.dir.display(), "a change involves an object defined twice; sending the whole directory");
            return self.whole_directory();
        }
        removals(old_objects, &new_objects, &mut changes);
        tracing::debug!(
            dir = %self.dir.display(),
            services = changes.services.len(),
            slices = changes.slices.len(),
            removed_services = changes.removed_services.len(),
            removed_slices = changes.removed_slices.len(),
            errors = changes.errors.len(),
            millis = started.elapsed().as_secs_f64() * 1000.0,
            "manifest directory changed"
        );
        self.sent = true;
        Ok(Some(SourceUpdate::Changes(changes)))
    }
}

impl DirState {
    /// The manifest files among NAMES that are there (as
    /// [`manifest_files`] lists them); `None` when one cannot be looked
    /// at (the whole listing then says why).
    fn named_files(&self, names: &BTreeSet<String>) -> Option<Vec<ManifestFile>> {
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path = self.dir.join(name);
            match fs::metadata(&path) {
                Ok(metadata) if metadata.is_file() => files.push(ManifestFile {
                    name: name.clone(),
                    path,
                    metadata,
                }),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(_) => return None,
            }
        }
        Some(files)
    }

    /// The listed files whose stamp changed (or that are new), and the
    /// names of remembered files that are no longer listed (of NAMED
    /// only, when the listing is of those).
    fn stale_and_gone<'a>(
        &self,
        listing: &'a [ManifestFile],
        named: Option<&BTreeSet<String>>,
    ) -> (Vec<(&'a ManifestFile, FileStamp)>, Vec<String>) {
        let mut stale_files = Vec::new();
        for file in listing {
            let stamp = FileStamp::of(&file.metadata);
            if self
                .files
                .get(&file.name)
                .is_none_or(|entry| entry.stamp != stamp)
            {
                stale_files.push((file, stamp));
            }
        }
        let listed: std::collections::HashSet<&str> =
            listing.iter().map(|file| file.name.as_str()).collect();
        let gone = self
            .files
            .keys()
            .filter(|name| named.is_none_or(|named| named.contains(name.as_str())))
            .filter(|name| !listed.contains(name.as_str()))
            .cloned()
            .collect();
        (stale_files, gone)
    }

    /// The whole directory as a snapshot, read after the files' state was
    /// updated (so it is as new as that state or newer; a newer file is
    /// read again at the next look). If it cannot be read, it stays owed.
    fn whole_directory(&mut self) -> Result<Option<SourceUpdate>, FileSourceError> {
        match load_dir(&self.dir) {
            Ok(snapshot) => {
                self.snapshot_owed = false;
                self.sent = true;
                Ok(Some(SourceUpdate::Snapshot(snapshot)))
            }
            Err(error) => {
                self.snapshot_owed = true;
                self.failed = true;
                Err(error)
            }
        }
    }

    /// Moves the definition counts from `old` to `new`; true when an
    /// object involved is (or was) defined more than once.
    fn count_definitions(&mut self, old: &[ObjectRecord], new: &[ObjectRecord]) -> bool {
        let mut duplicated = false;
        for record in old {
            let id = definition_id(record.kind, &record.key);
            if let Some(count) = self.definitions.get_mut(&id) {
                duplicated |= *count > 1;
                *count -= 1;
                if *count == 0 {
                    self.definitions.remove(&id);
                }
            }
        }
        for record in new {
            let count = self
                .definitions
                .entry(definition_id(record.kind, &record.key))
                .or_default();
            *count += 1;
            duplicated |= *count > 1;
        }
        duplicated
    }
}

/// An object's identity as a hash, for counting its definitions. Two
/// objects whose ids collide count as one object defined twice: the
/// whole directory is sent whenever either changes, which is right, only
/// slower.
fn definition_id(kind: ObjectKind, key: &ObjectKey) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    (kind, key).hash(&mut hasher);
    hasher.finish()
}

/// How a file read again relates to what it defined before.
enum InPlace {
    /// The same objects in the same order (the usual edit): the ones
    /// whose text changed (YAML: all).
    Edited(Vec<(ObjectKind, ObjectKey)>),
    /// Other objects: the old records, for the definition counts.
    No(Vec<ObjectRecord>),
}

/// A file's new records from NEW, the kept ones moved out of OLD (a file
/// of 1,500 objects with one changed would otherwise copy 1,499 keys),
/// and how they relate to OLD.
fn settle(old: Vec<ObjectRecord>, new: Vec<Record>) -> (Vec<ObjectRecord>, InPlace) {
    fn record<'a>(old: &'a [ObjectRecord], record: &'a Record) -> Option<&'a ObjectRecord> {
        match record {
            Record::Kept(index) => old.get(*index),
            Record::Read(record) => Some(record),
        }
    }
    let in_place = old.len() == new.len()
        && old.iter().zip(&new).all(|(was, now)| {
            record(&old, now).is_some_and(|now| was.kind == now.kind && was.key == now.key)
        });
    if !in_place {
        let records = new
            .iter()
            .filter_map(|new| record(&old, new).cloned())
            .collect();
        return (records, InPlace::No(old));
    }
    let edited = old
        .iter()
        .zip(&new)
        .filter_map(|(was, now)| {
            let now = record(&old, now)?;
            (now.text_hash.is_none() || was.text_hash != now.text_hash)
                .then(|| (now.kind, now.key.clone()))
        })
        .collect();
    // Each old record moves once; one kept twice (the same text twice in
    // the file) is copied the second time.
    let mut moved = vec![false; old.len()];
    let new: Vec<Record> = new
        .into_iter()
        .map(|new| match new {
            Record::Kept(index) if moved[index] => Record::Read(old[index].clone()),
            Record::Kept(index) => {
                moved[index] = true;
                Record::Kept(index)
            }
            read @ Record::Read(_) => read,
        })
        .collect();
    let mut old = old;
    let records = new
        .into_iter()
        .map(|new| match new {
            Record::Kept(index) => std::mem::replace(&mut old[index], ObjectRecord::moved()),
            Record::Read(record) => record,
        })
        .collect();
    (records, InPlace::Edited(edited))
}

/// Objects of `old` that `new` no longer defines go to `changes` as removed.
fn removals(old_objects: Vec<ObjectRecord>, new_objects: &[ObjectRecord], changes: &mut Changes) {
    let still: std::collections::HashSet<(ObjectKind, &ObjectKey)> = new_objects
        .iter()
        .map(|record| (record.kind, &record.key))
        .collect();
    for record in old_objects {
        if still.contains(&(record.kind, &record.key)) {
            continue;
        }
        match record.kind {
            ObjectKind::Service => changes.removed_services.push(record.key),
            ObjectKind::Slice => changes.removed_slices.push(record.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model;
    use crate::source::file::testdir::*;

    #[test]
    fn dir_state_sends_an_empty_directory_once() {
        let dir = TempDir::new("dir-state-empty");
        let mut state = DirState::new(dir.0.clone());
        assert!(matches!(
            state.refresh(),
            Ok(Some(SourceUpdate::Changes(_)))
        ));
        assert!(
            matches!(state.refresh(), Ok(None)),
            "nothing changed: no update"
        );
    }

    #[test]
    fn dir_state_sends_an_owed_snapshot_at_the_next_look() {
        let dir = TempDir::new("dir-state-owed");
        dir.write("a.json", &json_list(1, 2, None));
        let mut state = DirState::new(dir.0.clone());
        assert!(matches!(
            state.refresh(),
            Ok(Some(SourceUpdate::Changes(_)))
        ));
        assert!(matches!(state.refresh(), Ok(None)));
        // As after a duplicate whose whole-directory read failed.
        state.snapshot_owed = true;
        match state.refresh() {
            Ok(Some(SourceUpdate::Snapshot(snapshot))) => {
                assert_eq!(snapshot.services.len(), 2);
                assert_eq!(snapshot.slices.len(), 2);
            }
            other => panic!("expected the owed snapshot, got {other:?}"),
        }
        assert!(matches!(state.refresh(), Ok(None)), "paid: no more");
    }

    /// The streamed first read hands the plain JSON objects over as the
    /// model's records, parsed as each is read, and the rest (YAML, an
    /// item only the general path takes) as API objects; fed as the agent
    /// feeds them, they build the model the whole directory builds, with
    /// the same errors.
    #[test]
    fn the_streamed_first_read_hands_over_records_that_build_the_same_model() {
        let dir = TempDir::new("dir-state-streamed");
        dir.write("a.json", &json_list(1, 4, Some((2, "not-an-ip"))));
        // `port` as a string: not a plain slice, the general path reports it.
        let odd = json_list(5, 6, None).replacen(
            r#""ports":[{"port":80}],"endpoints""#,
            r#""ports":[{"port":"80"}],"endpoints""#,
            1,
        );
        dir.write("b.json", &odd);
        dir.write(
            "c.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: svc-7, namespace: ns}\nspec: {clusterIP: 10.96.0.7, ports: [{port: 80}]}\n",
        );
        let mut state = DirState::new(&dir.0);
        let mut parts = Vec::new();
        let last = state
            .refresh_streaming(&mut |part| parts.push(part))
            .expect("refresh");
        let plain = &parts[0];
        assert_eq!(
            (plain.services.len(), plain.slices.len()),
            (0, 0),
            "a.json's objects come as records"
        );
        assert_eq!(
            (plain.prepared_services.len(), plain.prepared_slices.len()),
            (4, 4)
        );
        assert_eq!(
            parts[2].services.len(),
            1,
            "c.yaml's Service as it was read"
        );

        let node = model::NodeContext::default();
        let mut model = model::Incremental::new(node.clone());
        let mut errors = Vec::new();
        for mut part in parts {
            part.prepare();
            errors.extend(part.feed(&mut model).errors);
        }
        let Some(SourceUpdate::Changes(mut last)) = last else {
            panic!("the first read ends with changes");
        };
        last.prepare();
        errors.extend(last.feed(&mut model).errors);
        model.commit();
        let snapshot = load_dir(&dir.0).expect("load");
        let expected = model::build(&snapshot.services, &snapshot.slices, &node);
        assert_eq!(model.model(), expected);
        let mut file_errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let mut expected_errors: Vec<String> =
            snapshot.errors.iter().map(ToString::to_string).collect();
        file_errors.sort();
        expected_errors.sort();
        assert!(
            expected_errors.iter().any(|e| e.contains("b.json")),
            "the general path reports b.json's odd port: {expected_errors:?}"
        );
        assert_eq!(file_errors, expected_errors);
        assert!(
            expected
                .errors
                .iter()
                .any(|e| e.to_string().contains("not-an-ip")),
            "the bad address is reported by the model: {:?}",
            expected.errors
        );
    }

    /// A JSON list of Services `first..=last`, each with one slice whose
    /// endpoint is `endpoint` (or `10.244.0.N` by default).
    fn json_list(first: u32, last: u32, endpoint: Option<(u32, &str)>) -> String {
        let mut items = Vec::new();
        for n in first..=last {
            let address = match endpoint {
                Some((which, address)) if which == n => address.to_owned(),
                _ => format!("10.244.0.{n}"),
            };
            items.push(format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"svc-{n}","namespace":"ns"}},"spec":{{"clusterIP":"10.96.0.{n}","ports":[{{"port":80}}]}}}}"#
            ));
            items.push(format!(
                r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"svc-{n}-a","namespace":"ns","labels":{{"kubernetes.io/service-name":"svc-{n}"}}}},"addressType":"IPv4","ports":[{{"port":80}}],"endpoints":[{{"addresses":["{address}"]}}]}}"#
            ));
        }
        format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
            items.join(",")
        )
    }

    /// Feeds an update to the model as the agent does.
    fn feed(model: &mut model::Incremental, update: SourceUpdate) -> Option<Changes> {
        match update {
            SourceUpdate::Snapshot(snapshot) => {
                model.reset(&snapshot.services, &snapshot.slices);
                None
            }
            SourceUpdate::Changes(changes) => {
                for key in &changes.removed_services {
                    model.remove_service(key);
                }
                for key in &changes.removed_slices {
                    model.remove_slice(key);
                }
                for slice in &changes.slices {
                    model.upsert_slice(slice);
                }
                for service in &changes.services {
                    model.upsert_service(service);
                }
                Some(changes)
            }
            SourceUpdate::Stale(reason) => panic!("stale: {reason}"),
        }
    }

    /// Kept records move into the new entry; the file relates to the old
    /// one as before: an edit in place names the changed objects, a new
    /// order or set hands the old records back; a record kept twice is
    /// copied.
    #[test]
    fn settle_moves_kept_records_and_tells_an_edit_in_place() {
        let record = |name: &str, hash: u64| ObjectRecord {
            kind: ObjectKind::Slice,
            key: ("ns".to_owned(), name.to_owned()),
            text_hash: Some(hash),
        };
        let names = |records: &[ObjectRecord]| -> Vec<(String, Option<u64>)> {
            records
                .iter()
                .map(|r| (r.key.1.clone(), r.text_hash))
                .collect()
        };
        let (records, how) = settle(
            vec![record("a", 1), record("b", 2)],
            vec![Record::Kept(0), Record::Read(record("b", 3))],
        );
        assert_eq!(
            names(&records),
            [("a".into(), Some(1)), ("b".into(), Some(3))]
        );
        let InPlace::Edited(edited) = how else {
            panic!("in place")
        };
        assert_eq!(edited, [(ObjectKind::Slice, ("ns".into(), "b".into()))]);

        let (records, how) = settle(
            vec![record("a", 1), record("a", 1)],
            vec![Record::Kept(0), Record::Kept(0)],
        );
        assert_eq!(
            names(&records),
            [("a".into(), Some(1)), ("a".into(), Some(1))]
        );
        assert!(matches!(how, InPlace::Edited(edited) if edited.is_empty()));

        let (records, how) = settle(
            vec![record("a", 1), record("b", 2)],
            vec![Record::Kept(1), Record::Kept(0)],
        );
        assert_eq!(
            names(&records),
            [("b".into(), Some(2)), ("a".into(), Some(1))]
        );
        let InPlace::No(old) = how else {
            panic!("reordered")
        };
        assert_eq!(names(&old), [("a".into(), Some(1)), ("b".into(), Some(2))]);
    }

    /// A look at the files inotify named sees their changes, additions
    /// and removals, and nothing of the files it was not told about (no
    /// stat of them), which the next look at everything finds.
    #[test]
    fn a_look_at_named_files_sees_only_them() {
        let dir = TempDir::new("dir-state-named");
        dir.write("a.json", &json_list(1, 2, None));
        dir.write("b.json", &json_list(3, 4, None));
        let mut state = DirState::new(dir.0.clone());
        let names = |names: &[&str]| -> BTreeSet<String> {
            names.iter().map(|name| (*name).to_owned()).collect()
        };
        // Not read whole yet: the first look is of everything anyway.
        let Ok(Some(SourceUpdate::Changes(first))) = state.refresh_files(&names(&[])) else {
            panic!("the first look sends");
        };
        assert_eq!(first.slices.len(), 4);
        std::thread::sleep(Duration::from_millis(20));
        dir.write("a.json", &json_list(1, 2, Some((1, "10.244.9.9"))));
        dir.write("b.json", &json_list(3, 4, Some((3, "10.244.9.9"))));
        let Ok(Some(SourceUpdate::Changes(edit))) = state.refresh_files(&names(&["a.json"])) else {
            panic!("a.json changed");
        };
        assert_eq!(object_names(&edit.slices), ["svc-1-a"]);
        assert!(matches!(state.refresh_files(&names(&["a.json"])), Ok(None)));
        let Ok(Some(SourceUpdate::Changes(rest))) = state.refresh() else {
            panic!("b.json changed");
        };
        assert_eq!(object_names(&rest.slices), ["svc-3-a"]);
        // Added, removed, and named but not there: each as it is.
        dir.write("c.json", &json_list(5, 5, None));
        dir.remove("b.json");
        let Ok(Some(SourceUpdate::Changes(moved))) =
            state.refresh_files(&names(&["b.json", "c.json", "d.json"]))
        else {
            panic!("c.json added, b.json removed");
        };
        assert_eq!(object_names(&moved.slices), ["svc-5-a"]);
        assert_eq!(moved.removed_slices.len(), 2, "{moved:?}");
        assert_eq!(moved.removed_services.len(), 2, "{moved:?}");
        assert!(matches!(state.refresh(), Ok(None)), "all seen");
    }

    fn object_names(slices: &[EndpointSlice]) -> Vec<&str> {
        slices
            .iter()
            .filter_map(|slice| slice.metadata.name.as_deref())
            .collect()
    }

    /// An item of a known list whose new text is not JSON makes the whole
    /// file invalid, as `serde_json` reading the whole file finds it: its
    /// error naming the file, and none of the file's objects. Fixed, it
    /// loads again.
    #[test]
    fn a_broken_item_in_a_known_list_makes_the_file_invalid_as_before() {
        let dir = TempDir::new("dir-state-broken-item");
        dir.write("a.json", &json_list(1, 3, None));
        let mut state = DirState::new(dir.0.clone());
        assert!(matches!(state.refresh(), Ok(Some(_))));
        let good = json_list(1, 3, None);
        for (what, broken) in [
            (
                "a missing quote",
                good.replacen(r#""10.244.0.2"]"#, r#""10.244.0.2]"#, 1),
            ),
            (
                "a bad literal",
                good.replacen(r#""port":80"#, r#""port":8O"#, 1),
            ),
            (
                "a raw newline in a string",
                good.replacen(
                    "svc-2-a",
                    "svc-2\n-a
",
                    1,
                ),
            ),
        ] {
            assert_ne!(broken, good, "{what}");
            std::thread::sleep(Duration::from_millis(20));
            dir.write("a.json", &broken);
            let Ok(Some(SourceUpdate::Changes(changes))) = state.refresh() else {
                panic!("{what}: changes expected");
            };
            let serde_error = serde_json::Deserializer::from_str(&broken)
                .into_iter::<&serde_json::value::RawValue>()
                .find_map(Result::err)
                .expect("not JSON");
            let errors: Vec<String> = changes.errors.iter().map(ToString::to_string).collect();
            assert_eq!(
                errors,
                [format!("File a.json: not valid JSON: {serde_error}")],
                "{what}"
            );
            assert_eq!(changes.removed_services.len(), 3, "{what}");
            assert_eq!(changes.removed_slices.len(), 3, "{what}");
            std::thread::sleep(Duration::from_millis(20));
            dir.write("a.json", &good);
            let Ok(Some(SourceUpdate::Changes(changes))) = state.refresh() else {
                panic!("{what}: changes expected");
            };
            assert!(changes.errors.is_empty(), "{what}: {:?}", changes.errors);
            assert_eq!((changes.services.len(), changes.slices.len()), (3, 3));
        }
    }

    /// Following a directory file by file keeps the model equal to one
    /// built from the whole directory, through edits, a move between
    /// files, a duplicate and its removal, YAML and broken files, and
    /// sends only what changed.
    #[test]
    fn dir_state_changes_match_reloading_the_directory() {
        let dir = TempDir::new("dir-state");
        let node = model::NodeContext::default();
        let mut state = DirState::new(&dir.0);
        let mut model = model::Incremental::new(node.clone());
        let mut check = |state: &mut DirState, step: &str| -> Option<Changes> {
            let update = state.refresh().expect("refresh");
            let changes = update.and_then(|update| feed(&mut model, update));
            model.commit();
            let snapshot = load_dir(&dir.0).expect("load");
            let expected = model::build(&snapshot.services, &snapshot.slices, &node);
            assert_eq!(model.model(), expected, "{step}");
            changes
        };
        dir.write("a.json", &json_list(1, 5, None));
        dir.write("b.json", &json_list(6, 9, None));
        let first = check(&mut state, "first").expect("changes");
        assert_eq!((first.services.len(), first.slices.len()), (9, 9));
        assert!(check(&mut state, "nothing changed").is_none());

        // One endpoint of one Service: only its slice is sent again.
        std::thread::sleep(Duration::from_millis(20));
        dir.write("a.json", &json_list(1, 5, Some((3, "10.244.9.9"))));
        let edit = check(&mut state, "edit").expect("changes");
        assert_eq!((edit.services.len(), edit.slices.len()), (0, 1), "{edit:?}");
        assert_eq!(edit.slices[0].metadata.name.as_deref(), Some("svc-3-a"));

        // svc-5 moves from a.json to b.json: changed, never removed.
        std::thread::sleep(Duration::from_millis(20));
        dir.write("a.json", &json_list(1, 4, Some((3, "10.244.9.9"))));
        dir.write("b.json", &json_list(5, 9, None));
        let moved = check(&mut state, "move").expect("changes");
        assert!(moved.removed_services.is_empty(), "{moved:?}");

        // A duplicate in a YAML file, then its removal.
        dir.write(
            "c.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: svc-1, namespace: ns}\nspec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}\n",
        );
        check(&mut state, "duplicate");
        // An edit in place (same objects, same order) of the duplicated
        // Service: which definition wins depends on every file, so the
        // whole directory is sent again.
        std::thread::sleep(Duration::from_millis(20));
        let edited = json_list(1, 4, Some((3, "10.244.9.9")))
            .replace(r#""clusterIP":"10.96.0.1""#, r#""clusterIP":"10.96.0.201""#);
        dir.write("a.json", &edited);
        assert!(
            check(&mut state, "duplicate edited in place").is_none(),
            "a snapshot, not changes"
        );
        dir.remove("c.yaml");
        check(&mut state, "duplicate removed");

        // A broken file is reported; its objects go away.
        std::thread::sleep(Duration::from_millis(20));
        dir.write("b.json", "{ not json");
        let broken = check(&mut state, "broken").expect("changes");
        assert_eq!(broken.removed_services.len(), 5, "{broken:?}");
        assert_eq!(broken.errors.len(), 1, "{broken:?}");
        dir.remove("b.json");
        let removed = check(&mut state, "file removed").expect("changes");
        assert!(removed.errors.is_empty());
    }
}
