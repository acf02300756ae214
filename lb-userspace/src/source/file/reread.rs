//! Reading one changed file again: JSON objects whose text did not change
//! are only recorded, not parsed again.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::Snapshot;
use super::listing::ManifestFile;
use super::parse::{ItemDefaults, Origin, add_object, file_error, load_file};
use super::split::{ListLayout, split_list, text_hash};
use super::state::{FileEntry, FileRead, ObjectKind, ObjectRecord, Record};
use super::typed::{EitherObject, Typed};
use crate::model::key_of;

/// Reads one file again; JSON objects whose text hash `old` records are
/// recorded without being parsed. With PREPARE the plain JSON objects come
/// as the model's records (see [`FileRead::prepare`]).
pub(super) fn read_file(file: &ManifestFile, old: Option<&FileEntry>, prepare: bool) -> FileRead {
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
            .map(|(kind, key)| {
                Record::Read(ObjectRecord {
                    kind,
                    key,
                    text_hash: None,
                })
            })
            .collect();
        return FileRead {
            objects,
            services: snapshot.services,
            slices: snapshot.slices,
            errors: snapshot.errors,
            ..FileRead::default()
        };
    }
    // Text hash -> the old record's index.
    let known: HashMap<u64, usize> = old
        .into_iter()
        .flat_map(|entry| entry.objects.iter().enumerate())
        .filter_map(|(index, record)| Some((record.text_hash?, index)))
        .collect();
    let mut read = FileRead::new(prepare);
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
    // Most files are one document, a list: its items are found without
    // parsing them, and only those whose text is new are parsed at all.
    let layout = old.and_then(|old| old.layout.as_ref());
    if read_list(&text, &file.name, layout, &known, &mut read) {
        return read;
    }
    // Validating: one pass finds the items of a list.
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

/// The fast path: TEXT as one JSON list whose items are found by the last
/// read's LAYOUT or a scan (not parsed); each item whose text is new is
/// parsed into READ, the others recorded as kept. An item seen before was
/// valid JSON; a new one that is not makes the whole file invalid: then
/// false, with READ as it was, and the validating path reports it as such.
fn read_list(
    text: &str,
    name: &str,
    layout: Option<&ListLayout>,
    known: &HashMap<u64, usize>,
    read: &mut FileRead,
) -> bool {
    // The last read's layout finds the unchanged items without a scan.
    let relocated = layout.and_then(|layout| {
        let defaults = ItemDefaults::of_list(&layout.kind, &layout.api_version);
        layout.relocate(text, |item| item_hash(defaults, item))
    });
    let split = relocated.or_else(|| {
        let list = split_list(text)?;
        let defaults = ItemDefaults::of_list(&list.kind, &list.api_version);
        let hashes = list
            .items
            .iter()
            .map(|item| item_hash(defaults, item))
            .collect();
        Some((list, hashes))
    });
    let Some((list, hashes)) = split else {
        return false;
    };
    let origin = Origin {
        file: name,
        location: "document 1".to_owned(),
    };
    let defaults = ItemDefaults::of_list(&list.kind, &list.api_version);
    let all_json = list
        .items
        .iter()
        .zip(&hashes)
        .enumerate()
        .all(|(index, (text, hash))| {
            let item = Item {
                text,
                hash: *hash,
                defaults,
                index: Some(index),
            };
            read_json_object(&item, &origin, known, read).is_ok()
        });
    if all_json {
        read.layout = ListLayout::of(text, &list, &hashes);
        return true;
    }
    *read = FileRead::default();
    false
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
    known: &HashMap<u64, usize>,
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
    read_validated_object(&Item::new(document.get(), None, None), origin, known, read);
}

/// The items of a list, each with the list's defaults.
fn read_json_items(
    items: &[&RawValue],
    api_version: &str,
    list_kind: &str,
    origin: &Origin<'_>,
    known: &HashMap<u64, usize>,
    read: &mut FileRead,
) {
    let defaults = ItemDefaults::of_list(list_kind, api_version);
    for (index, item) in items.iter().enumerate() {
        let item = Item::new(item.get(), defaults, Some(index));
        read_validated_object(&item, origin, known, read);
    }
}

/// An object's text as written, with the defaults of its list.
struct Item<'a> {
    text: &'a str,
    /// [`item_hash`] of it.
    hash: u64,
    defaults: Option<ItemDefaults<'a>>,
    /// Its place in the list, if in one.
    index: Option<usize>,
}

impl<'a> Item<'a> {
    fn new(text: &'a str, defaults: Option<ItemDefaults<'a>>, index: Option<usize>) -> Self {
        Self {
            text,
            hash: item_hash(defaults, text),
            defaults,
            index,
        }
    }
}

/// What tells that an object (with its list's defaults) changed.
fn item_hash(defaults: Option<ItemDefaults<'_>>, text: &str) -> u64 {
    text_hash(&[
        defaults.map_or("", |d| d.api_version).as_bytes(),
        defaults.map_or("", |d| d.kind).as_bytes(),
        text.as_bytes(),
    ])
}

/// [`read_json_object`] of an object `serde_json` has checked already.
fn read_validated_object(
    item: &Item<'_>,
    origin: &Origin<'_>,
    known: &HashMap<u64, usize>,
    read: &mut FileRead,
) {
    if let Err(error) = read_json_object(item, origin, known, read) {
        let item_origin = item.index.map(|index| origin.item(index));
        read.errors.push(
            item_origin
                .as_ref()
                .unwrap_or(origin)
                .error(&format!("not valid JSON: {error}")),
        );
    }
}

/// An object into READ: recorded if its text is known, else parsed (as a
/// Service or slice, or by the general path with its reports). ORIGIN is
/// where its document sits (the item's place is added).
///
/// # Errors
/// The text is not JSON; nothing was added to READ.
fn read_json_object(
    item: &Item<'_>,
    origin: &Origin<'_>,
    known: &HashMap<u64, usize>,
    read: &mut FileRead,
) -> Result<(), serde_json::Error> {
    let (text_hash, defaults) = (item.hash, item.defaults);
    if let Some(index) = known.get(&text_hash) {
        read.objects.push(Record::Kept(*index));
        return Ok(());
    }
    let typed = match serde_json::from_str::<EitherObject>(item.text) {
        Ok(object) => object.into_typed(defaults),
        // Not one of the two kinds, or not valid as one: the general path
        // below says what is wrong, with the field's path.
        Err(_) => None,
    };
    let typed = typed.map(|typed| match typed {
        Typed::Service(service) => {
            let key = key_of(&service.metadata);
            read.add_service(service);
            (ObjectKind::Service, key)
        }
        Typed::Slice(slice) => {
            let key = key_of(&slice.metadata);
            read.add_slice(slice);
            (ObjectKind::Slice, key)
        }
    });
    if let Some((kind, key)) = typed {
        read.objects.push(Record::Read(ObjectRecord {
            kind,
            key,
            text_hash: Some(text_hash),
        }));
        return Ok(());
    }
    // Not a plain Service or slice: the general path, with its reports.
    let value = serde_json::from_str::<Value>(item.text)?;
    let mut snapshot = Snapshot::default();
    let item_origin = item.index.map(|index| origin.item(index));
    add_object(
        &value,
        item_origin.as_ref().unwrap_or(origin),
        defaults,
        &mut snapshot,
    );
    for service in &snapshot.services {
        read.objects.push(Record::Read(ObjectRecord {
            kind: ObjectKind::Service,
            key: key_of(&service.metadata),
            text_hash: None,
        }));
    }
    for slice in &snapshot.slices {
        read.objects.push(Record::Read(ObjectRecord {
            kind: ObjectKind::Slice,
            key: key_of(&slice.metadata),
            text_hash: None,
        }));
    }
    read.services.extend(snapshot.services);
    read.slices.extend(snapshot.slices);
    read.errors.extend(snapshot.errors);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::listing::manifest_files;
    use crate::source::file::testdir::TempDir;

    fn read(dir: &TempDir) -> FileRead {
        let files = manifest_files(&dir.0).expect("list");
        read_file(&files[0], None, false)
    }

    /// An item the one-pass read cannot take is read by the general path,
    /// whose error names the object and where it sits; the items around it
    /// still load.
    #[test]
    fn a_malformed_list_item_is_an_error_naming_it() {
        let dir = TempDir::new("reread-malformed");
        dir.write(
            "a.json",
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"good","namespace":"shop"},"spec":{"ports":[{"port":80}]}},
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"bad","namespace":"shop"},"spec":{"ports":[{"port":"eighty"}]}},
                {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"bad-a","namespace":"shop"},"addressType":"IPv4","endpoints":[{"addresses":"10.0.0.1"}]},
                {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"good-a","namespace":"shop"},"addressType":"IPv4","endpoints":[]}
            ]}"#,
        );
        let read = read(&dir);
        let errors: Vec<String> = read.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("Service shop/bad: a.json: document 1 item 2: spec.ports[0].port: invalid type: string \"eighty\""),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("EndpointSlice shop/bad-a: a.json: document 1 item 3: endpoints[0].addresses: invalid type: string"),
            "{errors:?}"
        );
        assert_eq!(read.services.len(), 1);
        assert_eq!(read.services[0].metadata.name.as_deref(), Some("good"));
        assert_eq!(read.slices.len(), 1);
        assert_eq!(read.slices[0].metadata.name.as_deref(), Some("good-a"));
        assert_eq!(read.objects.len(), 2, "only what loaded is recorded");
    }

    /// A field of the other kind that does not fit is ignored, as
    /// `k8s-openapi` ignores it: the object loads (by the general path).
    #[test]
    fn a_foreign_field_does_not_stop_an_object() {
        let dir = TempDir::new("reread-foreign");
        dir.write(
            "a.json",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},"spec":{"ports":[{"port":80}]},"endpoints":"not a list"}"#,
        );
        let read = read(&dir);
        assert!(read.errors.is_empty(), "{:?}", read.errors);
        assert_eq!(read.services.len(), 1);
        assert_eq!(read.objects.len(), 1);
    }
}
