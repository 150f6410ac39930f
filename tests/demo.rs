//! `pacs-broker demo` (issue 12): it gives each site only what that site may hold (the trial
//! subject-ID mappings stay at the site that sends under them), and re-running it into a folder
//! whose nodes are running refuses, naming the running site, and changes nothing.

use std::path::Path;
use std::process::{Command, Stdio};

/// The tests take turns: a demo picks free loopback ports, and a node started from its configs
/// must not find one taken by the other test's demo.
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ports() -> std::sync::MutexGuard<'static, ()> {
    PORTS.lock().unwrap_or_else(|p| p.into_inner())
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
}

fn demo(dir: &Path) -> std::process::Output {
    bin()
        .args(["demo", "--slices", "2", "--size", "32", "--data-dir"])
        .arg(dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            e.path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// Kills the child on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_receiver_gets_the_signed_agreements_but_no_subject_id_mapping() {
    let _turn = ports();
    let dir = tempfile::tempdir().unwrap();
    // A mapping an older demo leaked to the receiver is taken away on the next run.
    let leaked = dir
        .path()
        .join("telerad-c/agreements/example-multisite-trial.site01-subjects.csv");
    std::fs::create_dir_all(leaked.parent().unwrap()).unwrap();
    std::fs::write(&leaked, "patient_id,subject_id\nA0000123,SI-01-0001\n").unwrap();
    let out = demo(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = names(&dir.path().join("telerad-c/agreements"));
    assert!(
        c.iter().all(|f| !f.ends_with(".csv")),
        "telerad-c holds a subject-ID mapping: {c:?}"
    );
    // The receiver still has every agreement it is a party to, with every party's signature.
    for f in [
        "example-teleradiology.toml",
        "example-teleradiology.toml.sig/hospital-a.sig",
        "example-teleradiology.toml.sig/telerad-c.sig",
        "example-multisite-trial.toml",
        "example-multisite-trial.toml.sig/hospital-b.sig",
    ] {
        assert!(c.contains(&f.to_string()), "telerad-c lacks {f}: {c:?}");
    }
    // ... and none it is not a party to.
    assert!(
        !c.iter().any(|f| f.starts_with("example-regional-network")),
        "{c:?}"
    );
    // hospital-a holds its own site's mapping (it sends under that flow), not hospital-b's.
    let a = names(&dir.path().join("hospital-a/agreements"));
    assert!(
        a.contains(&"example-multisite-trial.site01-subjects.csv".to_string()),
        "{a:?}"
    );
    assert!(
        !a.contains(&"example-multisite-trial.site02-subjects.csv".to_string()),
        "{a:?}"
    );
    // The receiver's node opens with those agreements in force.
    let cfg =
        pacs_broker::config::NodeConfig::load(&dir.path().join("telerad-c/node.toml")).unwrap();
    let node = pacs_broker::node::Node::open(cfg).unwrap();
    let set = node.agreements();
    assert!(set.agreements.contains_key("example-teleradiology"));
    assert!(set.agreements.contains_key("example-multisite-trial"));
}

#[test]
fn rerunning_the_demo_over_a_running_site_refuses_and_changes_nothing() {
    let _turn = ports();
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = dir.path().join("telerad-c/node.toml");
    let before_c = std::fs::read(&cfg).unwrap();
    let before_a = std::fs::read(dir.path().join("hospital-a/node.toml")).unwrap();
    let listen = pacs_broker::config::NodeConfig::load(&cfg).unwrap().listen;
    let _serving = Running(
        bin()
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let again = demo(dir.path());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("site telerad-c") && stderr.contains("is running"),
        "{stderr}"
    );
    assert!(stderr.contains(&cfg.display().to_string()), "{stderr}");
    assert_eq!(
        std::fs::read(&cfg).unwrap(),
        before_c,
        "node.toml rewritten"
    );
    assert_eq!(
        std::fs::read(dir.path().join("hospital-a/node.toml")).unwrap(),
        before_a,
        "the other site's node.toml rewritten"
    );
}

/// The container version of the demo follows the same rule: each service mounts only its own
/// agreements, and a subject-ID mapping only where the site sends under it.
#[test]
fn the_compose_sites_mount_only_what_they_may_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let mut site = String::new();
    let mut mounts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !s.starts_with(' ') {
                site = s.to_string();
            }
        }
        if let Some(m) = line.trim().strip_prefix("- ./policies") {
            let host = format!("policies{}", m.split(':').next().unwrap());
            assert!(root.join(&host).exists(), "{site} mounts a missing {host}");
            mounts.entry(site.clone()).or_default().push(host);
        }
    }
    let c = &mounts["telerad-c"];
    assert!(
        !c.is_empty() && c.iter().all(|m| !m.ends_with(".csv")),
        "{c:?}"
    );
    assert!(
        !c.iter().any(|m| m == "policies"),
        "the whole folder: {c:?}"
    );
    let a = &mounts["hospital-a"];
    assert!(
        a.iter().any(|m| m.ends_with("site01-subjects.csv")),
        "{a:?}"
    );
    assert!(
        !a.iter().any(|m| m.ends_with("site02-subjects.csv")),
        "{a:?}"
    );
}
