//! Which files of the directory are manifests, and what a stat says about
//! each: enough to tell, without reading it, that a file changed.

use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub(super) fn of(metadata: &Metadata) -> Self {
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

pub(super) struct ManifestFile {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) metadata: Metadata,
}

/// The manifest files of `dir`, sorted by name.
pub(super) fn manifest_files(dir: &Path) -> io::Result<Vec<ManifestFile>> {
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

/// A manifest by its name: `.yaml`, `.yml` or `.json`, not hidden.
pub(super) fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && Path::new(name)
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| matches!(extension, "yaml" | "yml" | "json"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::source::file::{FileSourceError, load_dir, testdir::*};

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
}
