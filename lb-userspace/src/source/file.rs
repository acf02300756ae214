//! The `file:` source: Services and `EndpointSlice`s from a directory of
//! manifests, as `kubectl get -o yaml` prints them or as written by hand.
//!
//! It lets the agent run without an API server (tests, benchmarks, demos).
//! A bad document is reported and skipped; only an unreadable directory is
//! fatal, because then there is no state to serve at all.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_yaml::Value;

pub use super::Snapshot;
use super::{Changes, SourceUpdate};
use crate::model::{DEFAULT_NAMESPACE, ObjectError, ObjectKey, key_of};

/// The directory itself is unusable; individual files never cause this.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("cannot read manifest directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

const FILE: &str = "File";

/// Loads every manifest file of `dir` (not recursive), in file name order.
///
/// Files ending in `.yaml`, `.yml` or `.json` are read; hidden files and
/// editor temporaries (leading `.`) are not. Symlinks are followed, as in a
/// mounted `ConfigMap`.
///
/// # Errors
///
/// [`FileSourceError::ReadDir`] when `dir` is missing, not a directory or not
/// readable. Problems inside files go to [`Snapshot::errors`] instead.
pub fn load_dir(dir: &Path) -> Result<Snapshot, FileSourceError> {
    let files = manifest_files(dir).map_err(|source| FileSourceError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut snapshot = Snapshot::default();
    for file in &files {
        load_file(file, &mut snapshot);
    }
    tracing::debug!(
        dir = %dir.display(),
        files = files.len(),
        services = snapshot.services.len(),
        slices = snapshot.slices.len(),
        errors = snapshot.errors.len(),
        "loaded manifest directory"
    );
    Ok(snapshot)
}

/// Checks that `dir` can be listed, without reading any file.
///
/// # Errors
///
/// [`FileSourceError::ReadDir`] when `dir` is missing, not a directory or not
/// readable.
pub fn load_dir_check(dir: &Path) -> Result<(), FileSourceError> {
    manifest_files(dir)
        .map(drop)
        .map_err(|source| FileSourceError::ReadDir {
            path: dir.to_owned(),
            source,
        })
}

/// Tells, from stats alone, whether the manifest files of a directory may
/// have changed since the last look, so that polling stays cheap.
#[derive(Debug)]
pub struct DirWatcher {
    dir: PathBuf,
    /// `None` before the first look and after a failed one.
    last: Option<BTreeMap<String, FileStamp>>,
}

/// What a stat says about one file; a change in any field means "reload".
/// The inode catches atomic replaces (editors, `ConfigMap` symlink swaps) that
/// keep length and mtime.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(metadata: &Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

impl DirWatcher {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last: None,
        }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True on the first call, and whenever a manifest file appeared,
    /// disappeared or changed its stat since the previous call.
    ///
    /// # Errors
    ///
    /// The directory could not be listed. The next successful call then
    /// returns true, so a directory that comes back is reloaded.
    pub fn changed(&mut self) -> io::Result<bool> {
        let files = match manifest_files(&self.dir) {
            Ok(files) => files,
            Err(error) => {
                self.last = None;
                return Err(error);
            }
        };
        let current: BTreeMap<String, FileStamp> = files
            .into_iter()
            .map(|file| (file.name, FileStamp::of(&file.metadata)))
            .collect();
        let changed = self.last.as_ref() != Some(&current);
        self.last = Some(current);
        Ok(changed)
    }
}

struct ManifestFile {
    name: String,
    path: PathBuf,
    metadata: Metadata,
}

/// The manifest files of `dir`, sorted by name.
fn manifest_files(dir: &Path) -> io::Result<Vec<ManifestFile>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            tracing::debug!(dir = %dir.display(), file = ?entry.file_name(), "skipping file with a non-UTF-8 name");
            continue;
        };
        if !is_manifest_name(&name) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: ConfigMap volumes are symlinks into `..data/`.
        let metadata = match fs::metadata(&path) {
            Ok(metadata) => metadata,
            // Removed since listed, or a dangling symlink: not there.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        if metadata.is_file() {
            files.push(ManifestFile {
                name,
                path,
                metadata,
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && Path::new(name)
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| matches!(extension, "yaml" | "yml" | "json"))
}

fn file_error(file: &str, reason: String) -> ObjectError {
    ObjectError {
        kind: FILE,
        namespace: String::new(),
        name: file.to_owned(),
        reason,
    }
}

fn load_file(file: &ManifestFile, snapshot: &mut Snapshot) {
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
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            match Value::deserialize(document) {
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
struct Origin<'a> {
    file: &'a str,
    location: String,
}

impl<'a> Origin<'a> {
    /// Where item `index` (0-based) of the list here is.
    fn item(&self, index: usize) -> Origin<'a> {
        Origin {
            file: self.file,
            location: format!("{} item {}", self.location, index + 1),
        }
    }

    fn error(&self, reason: &str) -> ObjectError {
        file_error(self.file, format!("{}: {reason}", self.location))
    }
}

/// Defaults for the items of a typed list (`ServiceList` from the raw API),
/// which omit their own `apiVersion` and `kind`.
#[derive(Clone, Copy)]
struct ItemDefaults<'a> {
    api_version: &'a str,
    kind: &'a str,
}

impl<'a> ItemDefaults<'a> {
    /// What the items of a `FooList` default to (`kind: Foo`); none for a
    /// plain `List`.
    fn of_list(list_kind: &'a str, api_version: &'a str) -> Option<Self> {
        list_kind
            .strip_suffix("List")
            .filter(|kind| !kind.is_empty())
            .map(|kind| ItemDefaults { api_version, kind })
    }
}

fn add_object(
    document: &Value,
    origin: &Origin<'_>,
    defaults: Option<ItemDefaults<'_>>,
    snapshot: &mut Snapshot,
) {
    if document.is_null() {
        return;
    }
    if !document.is_mapping() {
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
    let Some(items) = list.get("items").and_then(Value::as_sequence) else {
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
    match T::deserialize(document) {
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
                reason: format!(
                    "{}: {}: {}",
                    origin.file,
                    origin.location,
                    describe_error::<T>(document, &error)
                ),
            });
            None
        }
    }
}

/// The error with the path of the offending field (`spec.ports[0].port`),
/// which `serde_yaml` gives only when reading text: so the document is read
/// again from re-serialised text, whose line numbers are dropped because they
/// would not match the file.
fn describe_error<T: serde::de::DeserializeOwned>(
    document: &Value,
    error: &serde_yaml::Error,
) -> String {
    let Some(error) = serde_yaml::to_string(document)
        .ok()
        .and_then(|text| serde_yaml::from_str::<T>(&text).err())
    else {
        return error.to_string();
    };
    let message = error.to_string();
    error
        .location()
        .and_then(|at| {
            message.strip_suffix(&format!(" at line {} column {}", at.line(), at.column()))
        })
        .map_or_else(|| message.clone(), str::to_owned)
}

// ---------------------------------------------------------------------------
// Following the directory file by file.
// ---------------------------------------------------------------------------

/// Which of the two kinds an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ObjectKind {
    Service,
    Slice,
}

/// One object a file defines.
#[derive(Clone, Debug)]
struct ObjectRecord {
    kind: ObjectKind,
    key: ObjectKey,
    /// Hash of the JSON text it was read from (with the list defaults);
    /// `None` for YAML, whose objects are sent again whenever the file changes.
    text_hash: Option<u64>,
}

/// What the source remembers of one file.
#[derive(Debug)]
struct FileEntry {
    stamp: FileStamp,
    objects: Vec<ObjectRecord>,
    errors: Vec<ObjectError>,
}

/// One file read again: its objects (those whose text did not change are
/// only recorded, not parsed again) and errors.
struct FileRead {
    objects: Vec<ObjectRecord>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    errors: Vec<ObjectError>,
}

/// Follows a manifest directory file by file: a change re-reads only the
/// files whose stat changed, parses only the JSON objects whose text
/// changed, and reports what differs as [`Changes`].
///
/// Of two definitions of one object (in two files, or twice in one) the
/// first in file name order wins, as in [`load_dir`]; whenever a change
/// involves such a duplicate the whole directory is sent again as a
/// [`Snapshot`], which resolves it the same way.
#[derive(Debug)]
pub struct DirState {
    dir: PathBuf,
    files: BTreeMap<String, FileEntry>,
    /// Definitions of each object over all files.
    definitions: HashMap<(ObjectKind, ObjectKey), u32>,
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
        self.look(None)
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
        self.look(Some(partial))
    }

    fn look(
        &mut self,
        mut partial: Option<&mut dyn FnMut(Changes)>,
    ) -> Result<Option<SourceUpdate>, FileSourceError> {
        let started = std::time::Instant::now();
        let first = !self.sent;
        let listing = match manifest_files(&self.dir) {
            Ok(listing) => listing,
            Err(source) => {
                self.failed = true;
                return Err(FileSourceError::ReadDir {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let (stale_files, gone) = self.stale_and_gone(&listing);
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
            let read = read_file(file, self.files.get(&file.name));
            let old = self.files.remove(&file.name);
            if let Some(ids) = old
                .as_ref()
                .and_then(|old| edited_in_place(&old.objects, &read.objects))
            {
                edited.extend(ids);
            } else {
                old_objects.extend(old.map(|old| old.objects).unwrap_or_default());
                new_objects.extend(read.objects.iter().cloned());
            }
            changes.services.extend(read.services);
            changes.slices.extend(read.slices);
            if let Some(partial) = partial.as_mut() {
                partial(Changes {
                    services: std::mem::take(&mut changes.services),
                    slices: std::mem::take(&mut changes.slices),
                    more_follow: true,
                    ..Changes::default()
                });
            }
            self.files.insert(
                file.name.clone(),
                FileEntry {
                    stamp,
                    objects: read.objects,
                    errors: read.errors,
                },
            );
        }
        let duplicated = self.count_definitions(&old_objects, &new_objects)
            || edited
                .iter()
                .any(|id| self.definitions.get(id).is_some_and(|count| *count > 1));
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
    /// The listed files whose stamp changed (or that are new), and the
    /// names of remembered files that are no longer listed.
    fn stale_and_gone<'a>(
        &self,
        listing: &'a [ManifestFile],
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
            let id = (record.kind, record.key.clone());
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
                .entry((record.kind, record.key.clone()))
                .or_default();
            *count += 1;
            duplicated |= *count > 1;
        }
        duplicated
    }
}

/// When `new` defines the same objects as `old` in the same order, the ones
/// whose text changed (YAML: all); `None` when the objects differ.
fn edited_in_place(
    old: &[ObjectRecord],
    new: &[ObjectRecord],
) -> Option<Vec<(ObjectKind, ObjectKey)>> {
    if old.len() != new.len()
        || old
            .iter()
            .zip(new)
            .any(|(old, new)| old.kind != new.kind || old.key != new.key)
    {
        return None;
    }
    Some(
        old.iter()
            .zip(new)
            .filter(|(old, new)| new.text_hash.is_none() || old.text_hash != new.text_hash)
            .map(|(_, new)| (new.kind, new.key.clone()))
            .collect(),
    )
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

/// Reads one file again; JSON objects whose text hash `old` records are
/// recorded without being parsed.
fn read_file(file: &ManifestFile, old: Option<&FileEntry>) -> FileRead {
    let is_json = Path::new(&file.name)
        .extension()
        .is_some_and(|extension| extension == "json");
    if !is_json {
        let mut snapshot = Snapshot::default();
        load_file(file, &mut snapshot);
        let objects = snapshot
            .services
            .iter()
            .map(|service| (ObjectKind::Service, key_of(&service.metadata)))
            .chain(
                snapshot
                    .slices
                    .iter()
                    .map(|slice| (ObjectKind::Slice, key_of(&slice.metadata))),
            )
            .map(|(kind, key)| ObjectRecord {
                kind,
                key,
                text_hash: None,
            })
            .collect();
        return FileRead {
            objects,
            services: snapshot.services,
            slices: snapshot.slices,
            errors: snapshot.errors,
        };
    }
    let known: HashMap<u64, &ObjectRecord> = old
        .into_iter()
        .flat_map(|entry| &entry.objects)
        .filter_map(|record| Some((record.text_hash?, record)))
        .collect();
    let mut read = FileRead {
        objects: Vec::new(),
        services: Vec::new(),
        slices: Vec::new(),
        errors: Vec::new(),
    };
    let text = match fs::read_to_string(&file.path) {
        Ok(text) => text,
        // Deleted since listed: the next look sees that.
        Err(error) if error.kind() == io::ErrorKind::NotFound => return read,
        Err(error) => {
            read.errors
                .push(file_error(&file.name, format!("cannot read: {error}")));
            return read;
        }
    };
    // Most files are one document, a list: then one pass finds its items.
    if let Ok(JsonHead {
        api_version: Some(api_version),
        kind: Some(list_kind),
        items: Some(items),
    }) = serde_json::from_str::<JsonHead<'_>>(&text)
        && list_kind.ends_with("List")
    {
        let origin = Origin {
            file: &file.name,
            location: "document 1".to_owned(),
        };
        read_json_items(&items, &api_version, &list_kind, &origin, &known, &mut read);
        return read;
    }
    for (index, document) in serde_json::Deserializer::from_str(&text)
        .into_iter::<&RawValue>()
        .enumerate()
    {
        let document = match document {
            Ok(document) => document,
            Err(error) => {
                read.errors
                    .push(file_error(&file.name, format!("not valid JSON: {error}")));
                break;
            }
        };
        let origin = Origin {
            file: &file.name,
            location: format!("document {}", index + 1),
        };
        read_json_document(document, &origin, &known, &mut read);
    }
    read
}

/// A fast 64-bit hash of `parts` (eight bytes per step), to tell whether an
/// object's text changed: every object of a changed file is hashed, so
/// `SipHash` would cost more than the rest of reading the file. Not meant to
/// resist crafted collisions: whoever writes the directory controls the
/// objects anyway.
fn text_hash(parts: &[&[u8]]) -> u64 {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |hash: u64, word: u64| (hash ^ word).wrapping_mul(MULTIPLIER).rotate_left(29);
    let mut hash: u64 = 0x243f_6a88_85a3_08d3;
    for part in parts {
        let (words, rest) = part.as_chunks::<8>();
        for word in words {
            hash = mix(hash, u64::from_le_bytes(*word));
        }
        for &byte in rest {
            hash = mix(hash, u64::from(byte));
        }
        hash = mix(hash, part.len() as u64);
    }
    hash ^ (hash >> 32)
}

/// The fields that say what a JSON object (or list) is.
#[derive(Deserialize)]
struct JsonHead<'a> {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(borrow)]
    items: Option<Vec<&'a RawValue>>,
}

/// A list's items one by one; anything else as one object. What the fast
/// path does not understand goes through [`add_object`], which reports it.
fn read_json_document(
    document: &RawValue,
    origin: &Origin<'_>,
    known: &HashMap<u64, &ObjectRecord>,
    read: &mut FileRead,
) {
    let head = serde_json::from_str::<JsonHead<'_>>(document.get()).ok();
    if let Some(JsonHead {
        api_version: Some(api_version),
        kind: Some(list_kind),
        items: Some(items),
    }) = &head
        && list_kind.ends_with("List")
    {
        read_json_items(items, api_version, list_kind, origin, known, read);
        return;
    }
    read_json_object(document, origin, None, known, read);
}

/// The items of a list, each with the list's defaults.
fn read_json_items(
    items: &[&RawValue],
    api_version: &str,
    list_kind: &str,
    origin: &Origin<'_>,
    known: &HashMap<u64, &ObjectRecord>,
    read: &mut FileRead,
) {
    let defaults = ItemDefaults::of_list(list_kind, api_version);
    for (index, item) in items.iter().enumerate() {
        read_json_object(item, &origin.item(index), defaults, known, read);
    }
}

fn read_json_object(
    raw: &RawValue,
    origin: &Origin<'_>,
    defaults: Option<ItemDefaults<'_>>,
    known: &HashMap<u64, &ObjectRecord>,
    read: &mut FileRead,
) {
    let text_hash = text_hash(&[
        defaults.map_or("", |d| d.api_version).as_bytes(),
        defaults.map_or("", |d| d.kind).as_bytes(),
        raw.get().as_bytes(),
    ]);
    if let Some(record) = known.get(&text_hash) {
        read.objects.push((*record).clone());
        return;
    }
    let head = serde_json::from_str::<JsonHead<'_>>(raw.get()).ok();
    let api_version = head
        .as_ref()
        .and_then(|head| head.api_version.as_deref())
        .or(defaults.map(|d| d.api_version));
    let kind = head
        .as_ref()
        .and_then(|head| head.kind.as_deref())
        .or(defaults.map(|d| d.kind));
    let typed = match (api_version, kind) {
        (Some("v1"), Some("Service")) => {
            serde_json::from_str::<Service>(raw.get())
                .ok()
                .map(|service| {
                    let key = key_of(&service.metadata);
                    read.services.push(service);
                    (ObjectKind::Service, key)
                })
        }
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
            serde_json::from_str::<EndpointSlice>(raw.get())
                .ok()
                .map(|slice| {
                    let key = key_of(&slice.metadata);
                    read.slices.push(slice);
                    (ObjectKind::Slice, key)
                })
        }
        _ => None,
    };
    if let Some((kind, key)) = typed {
        read.objects.push(ObjectRecord {
            kind,
            key,
            text_hash: Some(text_hash),
        });
        return;
    }
    // Not a plain Service or slice: the general path, with its reports.
    let mut snapshot = Snapshot::default();
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(value) => add_object(&value, origin, defaults, &mut snapshot),
        Err(error) => snapshot
            .errors
            .push(origin.error(&format!("not valid JSON: {error}"))),
    }
    for service in &snapshot.services {
        read.objects.push(ObjectRecord {
            kind: ObjectKind::Service,
            key: key_of(&service.metadata),
            text_hash: None,
        });
    }
    for slice in &snapshot.slices {
        read.objects.push(ObjectRecord {
            kind: ObjectKind::Slice,
            key: key_of(&slice.metadata),
            text_hash: None,
        });
    }
    read.services.extend(snapshot.services);
    read.slices.extend(snapshot.slices);
    read.errors.extend(snapshot.errors);
}

/// Wakes the file source when something in the directory changed
/// (inotify), so that a change is seen at once instead of at the next poll.
/// Only completed changes count: a closed written file, a rename, a
/// removal, an attribute change; not every write of a file being written.
#[derive(Debug)]
pub struct DirEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl DirEvents {
    /// Watches `dir`.
    ///
    /// # Errors
    ///
    /// inotify is unavailable (or out of watches), or `dir` cannot be watched.
    pub fn new(dir: &Path) -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: `fd` is an inotify descriptor and `path` a C string.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an `OwnedFd` always returns the descriptor it owns, which
        // stays open until the `AsyncFd` (its owner now) is dropped.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits for the next events and consumes all that are queued.
    ///
    /// # Errors
    ///
    /// Reading the inotify descriptor failed.
    pub async fn wait(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut buffer = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe {
                    libc::read(
                        fd.get_ref().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, Frontend, Protocol};
    use std::time::Duration;

    /// A scratch directory removed on drop, also when the test fails.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("lb-file-source-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn write(&self, name: &str, contents: &str) {
            fs::write(self.0.join(name), contents).expect("write manifest");
        }

        fn remove(&self, name: &str) {
            fs::remove_file(self.0.join(name)).expect("remove manifest");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(snapshot: &Snapshot) -> (Vec<String>, Vec<String>) {
        let name = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or("-"),
                meta.name.as_deref().unwrap_or("-")
            )
        };
        (
            snapshot
                .services
                .iter()
                .map(|service| name(&service.metadata))
                .collect(),
            snapshot
                .slices
                .iter()
                .map(|slice| name(&slice.metadata))
                .collect(),
        )
    }

    fn error_lines(snapshot: &Snapshot) -> Vec<String> {
        snapshot.errors.iter().map(ToString::to_string).collect()
    }

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

    #[test]
    fn only_visible_manifest_files_are_read_and_symlinks_are_followed() {
        let dir = TempDir::new("selection");
        let service = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            )
        };
        dir.write("b.yaml", &service("b"));
        dir.write("a.yml", &service("a"));
        dir.write(".hidden.yaml", &service("hidden"));
        dir.write(".#a.yml", &service("emacs-lock"));
        dir.write("b.yaml~", &service("backup"));
        dir.write("notes.txt", &service("notes"));
        fs::create_dir(dir.0.join("nested.yaml")).unwrap();
        dir.write("nested.yaml/inner.yaml", &service("nested"));
        fs::create_dir(dir.0.join("..data")).unwrap();
        dir.write("..data/c.yaml", &service("c"));
        std::os::unix::fs::symlink("..data/c.yaml", dir.0.join("c.yaml")).unwrap();
        std::os::unix::fs::symlink("missing.yaml", dir.0.join("dangling.yaml")).unwrap();

        let snapshot = load_dir(&dir.0).expect("load");
        assert_eq!(error_lines(&snapshot), Vec::<String>::new());
        assert_eq!(names(&snapshot).0, ["shop/a", "shop/b", "shop/c"]);
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let dir = TempDir::new("missing");
        let missing = dir.0.join("nope");
        let error = load_dir(&missing).expect_err("missing dir");
        assert_eq!(
            error.to_string(),
            format!("cannot read manifest directory {}", missing.display())
        );
        let FileSourceError::ReadDir { source, .. } = &error;
        assert_eq!(source.kind(), io::ErrorKind::NotFound);

        dir.write("file.yaml", "");
        assert!(
            load_dir(&dir.0.join("file.yaml")).is_err(),
            "a file is not a directory"
        );
    }

    #[test]
    fn watcher_reports_add_edit_replace_and_delete() {
        let dir = TempDir::new("watcher");
        let mut watcher = DirWatcher::new(&dir.0);
        assert!(watcher.changed().unwrap(), "first look");
        assert!(!watcher.changed().unwrap());

        dir.write("web.yaml", "apiVersion: v1\n");
        assert!(watcher.changed().unwrap(), "added");
        assert!(!watcher.changed().unwrap());

        dir.write("web.yaml", "apiVersion: v1\nkind: Service\n");
        assert!(watcher.changed().unwrap(), "edited");
        assert!(!watcher.changed().unwrap());

        // Same length, renamed over: what editors and ConfigMap updates do.
        dir.write(".web.yaml.tmp", "apiVersion: v2\nkind: Service\n");
        assert!(!watcher.changed().unwrap(), "hidden files do not count");
        fs::rename(dir.0.join(".web.yaml.tmp"), dir.0.join("web.yaml")).unwrap();
        assert!(watcher.changed().unwrap(), "replaced");

        dir.write("README.md", "not a manifest");
        assert!(!watcher.changed().unwrap(), "other files do not count");

        dir.remove("web.yaml");
        assert!(watcher.changed().unwrap(), "deleted");
        assert!(!watcher.changed().unwrap());
    }

    #[test]
    fn watcher_sees_a_rewrite_after_mtime_ticks() {
        let dir = TempDir::new("watcher-mtime");
        dir.write("web.yaml", "kind: Service\n");
        let mut watcher = DirWatcher::new(dir.0.clone());
        assert!(watcher.changed().unwrap());
        std::thread::sleep(Duration::from_millis(20));
        // Same length and inode: only the timestamps move.
        dir.write("web.yaml", "kind: Servicf\n");
        assert!(watcher.changed().unwrap());
    }

    #[test]
    fn watcher_errors_while_the_directory_is_gone_then_reloads() {
        let dir = TempDir::new("watcher-gone");
        let mut watcher = DirWatcher::new(&dir.0);
        assert!(watcher.changed().unwrap());
        fs::remove_dir(&dir.0).unwrap();
        assert!(watcher.changed().is_err());
        fs::create_dir(&dir.0).unwrap();
        assert!(watcher.changed().unwrap(), "back again: reload");
    }
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
                    model.upsert_service(service.clone());
                }
                Some(changes)
            }
            SourceUpdate::Stale(reason) => panic!("stale: {reason}"),
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
