//! The container image `cargo xtask image` writes, checked offline with
//! Debian's tools: `skopeo inspect` reads its labels, entrypoint and
//! platform; `umoci` unpacks it; the unpacked root's `lb --version` names
//! this build, and its `lb agent` runs in a namespace this test creates
//! until `/readyz` answers 200. `deploy/` (rendered by kubectl) runs the
//! image by the name and tag the archive carries, and deploy/Containerfile
//! builds the same image (entrypoint, command, labels).
//!
//! The archive is built before `cargo test` (scripts/run-tests.sh:
//! `cargo xtask image`; cargo holds its lock while tests run, so the test
//! cannot build it): `LB_IMAGE_ARCHIVE`, default
//! `target/image/lb-VERSION.oci.tar`. Without it every test here fails and
//! says how to build it. The agent test is privileged (root and bpffs).

mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{
    clients::http_get,
    manifests::{Cond, Manifest, ManifestDir, service, slice, sp},
    netns::{Netns, ns_command, sweep_stale_netns, unique_prefix},
    pins::{PinGuard, require_privileged, sweep_stale_pins},
    process::{ChildGuard, LogOnPanic, TempDir, have_program, metrics_addr, run_ok, spawn_logged},
    topo::Family,
};

const TAG: &str = "lbim";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The image's name; deploy/kustomization.yaml points `image: lb` at it.
const IMAGE_NAME: &str = "localhost/lb";
/// The archive's one 30 MiB ceiling; a static agent is far below it.
const SIZE_LIMIT: u64 = 30 << 20;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-userspace has a parent directory")
        .to_path_buf()
}

/// The archive under test; panics (naming the command that builds it)
/// when it is missing.
fn archive() -> PathBuf {
    let path = std::env::var_os("LB_IMAGE_ARCHIVE").map_or_else(
        || workspace_root().join(format!("target/image/lb-{VERSION}.oci.tar")),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no image archive at {}: build it first with `cargo xtask image` \
         (scripts/run-tests.sh does, before `cargo test`), or point LB_IMAGE_ARCHIVE at one",
        path.display()
    );
    for tool in ["skopeo", "umoci", "tar", "kubectl"] {
        assert!(
            have_program(tool),
            "{tool} not found: scripts/setup.sh installs it"
        );
    }
    path
}

fn oci_archive_ref(archive: &Path) -> String {
    format!("oci-archive:{}", archive.display())
}

/// `skopeo inspect --config`: the image's OCI config.
fn image_config(archive: &Path) -> Value {
    let text =
        run_ok(Command::new("skopeo").args(["inspect", "--config", &oci_archive_ref(archive)]));
    serde_json::from_str(&text).expect("skopeo prints JSON")
}

/// `skopeo inspect`: name-independent summary (labels, platform, layers).
fn image_summary(archive: &Path) -> Value {
    let text = run_ok(Command::new("skopeo").args(["inspect", &oci_archive_ref(archive)]));
    serde_json::from_str(&text).expect("skopeo prints JSON")
}

/// The name the archive gives the image (`index.json`'s ref.name).
fn image_ref_name(archive: &Path) -> String {
    let text = run_ok(
        Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg("index.json"),
    );
    let index: Value = serde_json::from_str(&text).expect("index.json is JSON");
    let manifests = index["manifests"]
        .as_array()
        .expect("index.json lists manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let annotations = &manifests[0]["annotations"];
    let name = annotations["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("the manifest carries a ref.name")
        .to_owned();
    assert_eq!(
        annotations["io.containerd.image.name"], name,
        "containerd's name annotation agrees with ref.name"
    );
    name
}

/// The checkout's state as the image's revision label spells it, if git
/// knows it.
fn checkout_revision() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"])?;
    let status = git(&[
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
    ])?;
    Some(if status.is_empty() {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

#[test]
fn the_archive_carries_labels_entrypoint_platform_and_a_small_size() {
    let archive = archive();
    let size = std::fs::metadata(&archive).expect("stat archive").len();
    assert!(
        size < SIZE_LIMIT,
        "the image is {size} bytes, over {SIZE_LIMIT}"
    );

    let summary = image_summary(&archive);
    assert_eq!(summary["Architecture"], "amd64", "{summary}");
    assert_eq!(summary["Os"], "linux", "{summary}");
    assert_eq!(
        summary["Layers"].as_array().map(Vec::len),
        Some(1),
        "{summary}"
    );
    let labels = &summary["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "lb", "{labels}");
    assert_eq!(
        labels["org.opencontainers.image.version"], VERSION,
        "{labels}"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .expect("a revision label");
    if let Some(checkout) = checkout_revision() {
        assert_eq!(
            revision, checkout,
            "the archive was built from another state of the tree: rebuild it with \
             `cargo xtask image`"
        );
    }

    let config = image_config(&archive);
    assert_eq!(
        config["config"]["Entrypoint"],
        json!(["/usr/bin/lb"]),
        "{config}"
    );
    assert_eq!(
        config["config"]["Cmd"],
        json!(["agent", "--source=kube", "--attach-pattern=veth*,eth*"]),
        "{config}"
    );
    assert_eq!(
        config["config"]["Labels"], *labels,
        "config and summary agree"
    );
    assert_eq!(image_ref_name(&archive), format!("{IMAGE_NAME}:{VERSION}"));
}

#[test]
fn deploy_runs_the_image_by_the_archives_name_and_tag() {
    let name = image_ref_name(&archive());
    let rendered = run_ok(
        Command::new("kubectl")
            .args(["kustomize"])
            .arg(workspace_root().join("deploy")),
    );
    let images: Vec<&str> = rendered
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: "))
        .map(|image| image.trim_matches('"'))
        .collect();
    assert_eq!(
        images,
        [name.as_str()],
        "the rendered DaemonSet runs the archive's image"
    );
}

#[test]
fn the_containerfile_builds_the_same_image() {
    let config = image_config(&archive());
    let containerfile = std::fs::read_to_string(workspace_root().join("deploy/Containerfile"))
        .expect("read deploy/Containerfile");
    // Instructions of the final stage, continuation lines joined.
    let joined = containerfile.replace("\\\n", " ");
    let stages: Vec<&str> = joined.split("\nFROM ").collect();
    let runtime = stages.last().expect("a stage");
    assert!(
        runtime.starts_with("scratch"),
        "the image is FROM scratch:\n{runtime}"
    );
    let instruction = |name: &str| -> Vec<String> {
        runtime
            .lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_owned)
            .collect()
    };
    let json_instruction = |name: &str| -> Value {
        let values = instruction(name);
        assert_eq!(values.len(), 1, "one {name}: {values:?}");
        serde_json::from_str(&values[0]).expect("exec form (JSON)")
    };
    assert_eq!(
        json_instruction("ENTRYPOINT"),
        config["config"]["Entrypoint"]
    );
    assert_eq!(json_instruction("CMD"), config["config"]["Cmd"]);
    assert_eq!(
        instruction("USER"),
        [config["config"]["User"].as_str().unwrap_or("")]
    );
    // LABEL key="value" ...; the revision comes from a build argument.
    let label_line = instruction("LABEL").join(" ");
    let mut labels = serde_json::Map::new();
    for pair in label_line
        .split("\" ")
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').expect("LABEL key=value");
        labels.insert(
            key.to_owned(),
            Value::String(value.trim_matches('"').to_owned()),
        );
    }
    let mut expected = config["config"]["Labels"]
        .as_object()
        .expect("labels")
        .clone();
    expected.insert(
        "org.opencontainers.image.revision".to_owned(),
        Value::String("${REVISION}".to_owned()),
    );
    // No remote here: the source label is optional on both paths.
    expected.remove("org.opencontainers.image.source");
    assert_eq!(Value::Object(labels), Value::Object(expected));
}

/// The archive unpacked with umoci: the image's root filesystem.
struct Unpacked {
    bundle: TempDir,
}

impl Unpacked {
    fn new(archive: &Path, prefix: &str) -> Self {
        let bundle = TempDir(std::env::temp_dir().join(format!("{prefix}-image")));
        let layout = bundle.0.join("layout");
        std::fs::create_dir_all(&layout).expect("create layout directory");
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(archive)
                .arg("-C")
                .arg(&layout),
        );
        // umoci reads a layout directory; its tag syntax (PATH:TAG) has no
        // room for a name with a colon, so copy the image to a plain tag.
        let plain = bundle.0.join("plain");
        run_ok(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("oci:{}", layout.display()),
            &format!("oci:{}:lb", plain.display()),
        ]));
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:lb", plain.display()))
                .arg(bundle.0.join("bundle")),
        );
        Self { bundle }
    }

    fn rootfs(&self) -> PathBuf {
        self.bundle.0.join("bundle/rootfs")
    }

    fn lb(&self) -> PathBuf {
        self.rootfs().join("usr/bin/lb")
    }

    /// Every path in the root filesystem, relative to it.
    fn contents(&self) -> BTreeSet<String> {
        fn walk(root: &Path, dir: &Path, found: &mut BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).expect("read rootfs").flatten() {
                let path = entry.path();
                let relative = path.strip_prefix(root).expect("under root");
                found.insert(relative.display().to_string());
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(root, &path, found);
                }
            }
        }
        let mut found = BTreeSet::new();
        walk(&self.rootfs(), &self.rootfs(), &mut found);
        found
    }
}

#[test]
fn the_unpacked_image_runs_the_agent_until_ready() {
    let archive = archive();
    if !require_privileged("the image's agent") {
        return;
    }
    sweep_stale_netns(TAG);
    sweep_stale_pins(TAG);
    let prefix = unique_prefix(TAG);
    let unpacked = Unpacked::new(&archive, &prefix);
    assert_eq!(
        unpacked.contents(),
        ["usr", "usr/bin", "usr/bin/lb"].map(str::to_owned).into(),
        "the image holds the binary and nothing else"
    );

    let revision = image_summary(&archive)["Labels"]["org.opencontainers.image.revision"]
        .as_str()
        .expect("a revision label")
        .to_owned();
    let short = match revision.strip_suffix("-dirty") {
        Some(commit) => format!("{}-dirty", &commit[..7]),
        None if revision == "unknown" => revision.clone(),
        None => revision[..7].to_owned(),
    };
    let version = run_ok(Command::new(unpacked.lb()).arg("--version"));
    assert_eq!(version.trim(), format!("lb {VERSION} ({short})"));

    // The node: a namespace with a veth pair to attach to (this kernel has
    // no dummy devices), one Service in a manifest directory.
    let ns = Netns::create(&format!("{prefix}-node"));
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "d0"]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["link", "set", "d1", "up"]);
    let work = TempDir::create(&format!("{prefix}-work"));
    let manifests = ManifestDir::create(&work);
    let endpoint = Cond::Ready.endpoint("198.18.0.2".parse().expect("an address"));
    let web = Manifest::default()
        .with(
            &service(
                "web",
                "ClusterIP",
                &["198.19.0.10".parse().expect("an address")],
                &[sp("http", 80, "TCP", "8080")],
            )
            .build(),
        )
        .with(&slice(
            "web",
            "web-v4",
            Family::V4,
            &[("http", 8080, "TCP")],
            [endpoint],
        ));
    manifests.write("web.json", &web);
    let pins = PinGuard::new(TAG, ns.name());
    let log = unpacked.bundle.0.join("agent.log");
    let _log = LogOnPanic::new(log.clone());
    let mut cmd = ns_command(ns.name(), unpacked.lb());
    // No socket programs: they would attach to the machine's cgroup root.
    cmd.arg("agent")
        .arg("--socket-lb=off")
        .args(["--source", &manifests.source()])
        .args(["--attach", "d0", "--node-ip", "198.18.0.1"])
        .args(["--metrics-addr", &metrics_addr().to_string()])
        .arg("--pin-path")
        .arg(&pins.path);
    // Drop order: the agent, the pins (cleanup inside the namespace), the
    // namespace, then the files.
    let agent: ChildGuard = spawn_logged(&mut cmd, &log);
    let start = Instant::now();
    let ready = loop {
        if http_get(ns.name(), metrics_addr(), "/readyz").is_ok_and(|(code, _)| code == 200) {
            break true;
        }
        if start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(agent);
    drop(pins);
    drop(ns);
    assert!(
        ready,
        "the image's agent never answered /readyz 200; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
