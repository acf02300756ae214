//! Scratch manifest directories and what the tests read from a snapshot.

use std::fs;
use std::path::PathBuf;

use super::Snapshot;

/// A scratch directory removed on drop, also when the test fails.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(test: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("lb-file-source-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(super) fn write(&self, name: &str, contents: &str) {
        fs::write(self.0.join(name), contents).expect("write manifest");
    }

    pub(super) fn remove(&self, name: &str) {
        fs::remove_file(self.0.join(name)).expect("remove manifest");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(super) fn names(snapshot: &Snapshot) -> (Vec<String>, Vec<String>) {
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

pub(super) fn error_lines(snapshot: &Snapshot) -> Vec<String> {
    snapshot.errors.iter().map(ToString::to_string).collect()
}
