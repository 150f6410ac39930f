//! The command line as a new user meets it: the demo, key files, certificates.

mod common;

use std::process::Command;

/// Tests that start nodes on the loopback ports a demo chose take turns, so that one test's
/// node never binds a port that another test's demo left in its configs.
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ports() -> std::sync::MutexGuard<'static, ()> {
    PORTS.lock().unwrap_or_else(|p| p.into_inner())
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
}

#[test]
fn demo_runs_and_leaves_startable_sites() {
    let _turn = ports();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["--log", "debug", "demo", "--data-dir"])
        .arg(dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("signed receipt verified"), "{stdout}");
    // No PHI in any log line, even at debug level.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for phi in [
        "DOE",
        "JANE",
        "MRN-0042117",
        "19580314",
        "ACC-2026-118842",
        "Elm Street",
    ] {
        assert!(!stderr.contains(phi), "PHI {phi:?} in the logs: {stderr}");
    }
    assert!(
        stdout.contains("DOE^JANE^QUINN"),
        "before column missing: {stdout}"
    );
    for site in ["hospital-a", "telerad-c"] {
        let cfg = dir.path().join(site).join("node.toml");
        pacs_broker::config::NodeConfig::load(&cfg).expect("demo leaves a valid node.toml");
    }
    let inbox = common::files_under(&dir.path().join("telerad-c/data/store/inbox"));
    assert_eq!(inbox.len(), 20, "the 20-slice CT was delivered");
    // Everything the receiver stored parses in dcmtk and pydicom, and carries no PHI.
    for f in &inbox {
        let (ok, text) = common::run_tool("dcmdump", &["-q", f.to_str().unwrap()]);
        assert!(ok && !text.contains("E: "), "dcmdump: {text}");
    }
    let script = r#"
import sys, pydicom
for p in sys.argv[1:]:
    ds = pydicom.dcmread(p)
    assert ds.PatientIdentityRemoved == 'YES', p
    assert 'DOE' not in str(ds.PatientName), p
    assert len(ds.PixelData) == ds.Rows * ds.Columns * 2, p
print('ok', len(sys.argv) - 1)
"#;
    let mut args = vec!["-c", script];
    let paths: Vec<String> = inbox.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(|s| s.as_str()));
    let (ok, text) = common::run_tool("/usr/bin/python3", &args);
    assert!(ok && text.contains("ok 20"), "pydicom: {text}");
    // The audit chains verify through the CLI.
    assert_audit_verifies(&dir.path().join("telerad-c/node.toml"));
}

/// `pacs-broker audit verify` accepts the node's audit log.
fn assert_audit_verifies(cfg: &std::path::Path) {
    let out = bin()
        .args(["audit", "verify", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        cfg.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_node_refuses_a_key_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("site.key");
    let out = bin()
        .args(["keys", "new", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A node config that points at the now world-readable key.
    pacs_broker::federation::pki::generate_dev_federation(
        &dir.path().join("pki"),
        &["hospital-a".into(), "hospital-b".into(), "telerad-c".into()],
    )
    .unwrap();
    let mut cfg = common::site_config(dir.path(), "telerad-c", &Default::default());
    cfg.key_file = key.clone();
    let cfg_path = dir.path().join("node.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by group or others"), "{err}");
    // Keys are never overwritten.
    let out = bin()
        .args(["keys", "new", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn certs_dev_writes_site_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["certs", "dev", "--sites", "site-x,site-y", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for s in ["site-x", "site-y"] {
        let c =
            pacs_broker::federation::pki::load_certs(&dir.path().join(format!("{s}.pem"))).unwrap();
        assert_eq!(pacs_broker::federation::pki::site_id_of(&c[0]).unwrap(), s);
    }
    let bad = bin()
        .args(["certs", "dev", "--sites", "Bad Site", "--out"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not valid"));
}

#[test]
fn the_compose_node_configs_parse() {
    for site in ["hospital-a", "telerad-c"] {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/compose")
            .join(format!("{site}.toml"));
        let cfg = pacs_broker::config::NodeConfig::load(&p).unwrap();
        assert_eq!(cfg.site_id, site);
    }
}

/// Kills a child process when dropped, so a failing test leaves no server behind.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the demo with a small study into a new folder and returns the folder.
fn demo_sites(slices: &str, size: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["demo", "--slices", slices, "--size", size, "--data-dir"])
        .arg(dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Starts `pacs-broker serve` for a site the demo laid out and waits until it listens.
fn serve(cfg: &std::path::Path) -> Running {
    let child = bin()
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    let listen = pacs_broker::config::NodeConfig::load(cfg).unwrap().listen;
    wait_listening(&listen);
    running
}

fn wait_listening(addr: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn sites_left_by_the_demo_serve_by_hand_and_send_beside_serve() {
    let _turn = ports();
    let dir = demo_sites("3", "64");
    let cfg = |site: &str| dir.path().join(site).join("node.toml");
    let servers = vec![serve(&cfg("telerad-c")), serve(&cfg("hospital-a"))];
    // The partners reach each other and agree on who is who.
    let out = bin()
        .args(["ping", "--peer", "telerad-c", "--config"])
        .arg(cfg("hospital-a"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("it is \"telerad-c\" and sees us as \"hospital-a\""),
        "{stdout}"
    );
    // hospital-a's own `serve` is running: `send` with the same config works beside it.
    let out = bin()
        .args(["send", "--config"])
        .arg(cfg("hospital-a"))
        .args(["--agreement", "example-teleradiology", "--flow", "ct-reads"])
        .arg(dir.path().join("source-study"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 transferred, 3 already held"), "{stdout}");
    // A flow that does not exist is refused with a clear error and exit 1.
    let out = bin()
        .args(["send", "--config"])
        .arg(cfg("hospital-a"))
        .args([
            "--agreement",
            "example-teleradiology",
            "--flow",
            "no-such-flow",
        ])
        .arg(dir.path().join("source-study"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no flow `no-such-flow`")
            && stderr.contains("its flows are: `ct-reads`"),
        "{stderr}"
    );
    // A misspelt agreement id is unknown, with a did-you-mean.
    let out = bin()
        .args(["send", "--config"])
        .arg(cfg("hospital-a"))
        .args(["--agreement", "example-teleradiolgy", "--flow", "ct-reads"])
        .arg(dir.path().join("source-study"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agreement `example-teleradiolgy` is unknown")
            && stderr.contains("did you mean `example-teleradiology`?"),
        "{stderr}"
    );
    // SIGTERM (docker stop, systemd) stops a node cleanly.
    for mut s in servers {
        let pid = s.0.id().to_string();
        let (ok, text) = common::run_tool("kill", &["-TERM", &pid]);
        assert!(ok, "{text}");
        let status = s.0.wait().unwrap();
        assert!(status.success(), "serve exited with {status} on SIGTERM");
    }
    for site in ["hospital-a", "telerad-c"] {
        assert_audit_verifies(&cfg(site));
    }
}

#[test]
fn a_study_for_a_partner_that_is_down_waits_in_the_outbox_and_is_delivered_later() {
    let _turn = ports();
    let dir = demo_sites("2", "32");
    let cfg = |site: &str| dir.path().join(site).join("node.toml");
    // A new study while telerad-c is down: queued, exit 2, and the reason is given.
    let study = dir.path().join("second-study");
    pacs_broker::demo::write_synthetic_ct(
        &study,
        &pacs_broker::demo::SyntheticPatient::default(),
        2,
        32,
    )
    .unwrap();
    let send = || {
        bin()
            .args(["send", "--config"])
            .arg(cfg("hospital-a"))
            .args(["--agreement", "example-teleradiology", "--flow", "ct-reads"])
            .arg(&study)
            .output()
            .unwrap()
    };
    let out = send();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("queued study") && stdout.contains("cannot connect"),
        "{stdout}"
    );
    let list = bin()
        .args(["outbox", "--config"])
        .arg(cfg("hospital-a"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.status.code(), Some(2), "{text}");
    assert!(text.contains("pending, attempt 2"), "{text}");
    // Reported queued only once its copies are durable (`send` writes them unflushed and makes
    // them durable when the attempt fails).
    let entries: Vec<std::path::PathBuf> =
        common::files_under(&dir.path().join("hospital-a/data/outbox"))
            .into_iter()
            .filter(|p| p.ends_with("transfer.json"))
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .contains("\"state\": \"pending\"")
            })
            .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = std::fs::read_to_string(&entries[0]).unwrap();
    assert!(entry.contains("\"flushed\": true"), "{entry}");
    // As a `send` killed mid-attempt leaves it: not marked durable. The next attempt re-verifies
    // every copy through its seal and SHA-256 before anything is sent (whole here: it goes).
    std::fs::write(
        &entries[0],
        entry.replace("\"flushed\": true", "\"flushed\": false"),
    )
    .unwrap();
    // telerad-c comes back; an operator retries now.
    let _server = serve(&cfg("telerad-c"));
    let out = bin()
        .args(["outbox", "--retry", "--config"])
        .arg(cfg("hospital-a"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 queued studies delivered"), "{text}");
    assert!(!text.contains("pending"), "{text}");
    let inbox = common::files_under(&dir.path().join("telerad-c/data/store/inbox"));
    assert_eq!(inbox.len(), 4, "both studies are at the receiver");
}

/// `deid` killed mid-batch (SIGKILL, as a crash or an out-of-memory kill would) leaves only
/// whole outputs: every file in the output folder is a complete, parseable instance, and no
/// partial or temporary file is left. Run again, it completes the batch.
#[test]
fn a_deid_batch_killed_midway_leaves_only_whole_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let files = pacs_broker::demo::write_synthetic_ct(
        &input,
        &pacs_broker::demo::SyntheticPatient::default(),
        400,
        256,
    )
    .unwrap();
    let key = tmp.path().join("site.key");
    assert!(bin()
        .args(["keys", "new", "--out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let out = tmp.path().join("out");
    let deid = |out: &std::path::Path| {
        let mut c = bin();
        c.args(["deid", "--profile", "basic", "--key"])
            .arg(&key)
            .arg(&input)
            .arg("--out")
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let mut child = deid(&out).spawn().unwrap();
    let outputs = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let start = std::time::Instant::now();
    let mut killed_midway = false;
    while start.elapsed() < std::time::Duration::from_secs(60) {
        let n = outputs(&out)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .count();
        if n > 0 {
            child.kill().unwrap();
            killed_midway = n < files.len();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.wait().unwrap();
    assert!(
        killed_midway,
        "the batch finished before it could be killed"
    );
    let left = outputs(&out);
    let mut whole = 0;
    for p in &left {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name == "quarantine.jsonl" {
            continue;
        }
        assert!(
            name.ends_with(".dcm") && !name.starts_with('.'),
            "left behind: {name}"
        );
        let obj = dicom_object::open_file(p).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pixels = obj
            .element(dicom_dictionary_std::tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap();
        assert_eq!(pixels.len(), 256 * 256 * 2, "{name}");
        whole += 1;
    }
    assert!(
        whole > 0 && whole < files.len(),
        "{whole} of {}",
        files.len()
    );
    // The same command again completes the batch over what the killed run left.
    assert!(deid(&out).status().unwrap().success());
    let done = outputs(&out)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .count();
    assert_eq!(done, files.len());
}

/// `send` killed (SIGKILL) while its partial offers run — the partner already holds part of
/// the study — sends nothing torn afterwards: no outbox entry lists its working copies, so
/// neither `outbox --retry` nor a running node sends them; every file the partner delivered is
/// whole; and the same `send` again completes the study, the partner answering "already held"
/// for the part it has.
#[test]
fn a_send_killed_during_its_partial_offers_leaves_nothing_to_send_torn_and_completes_when_sent_again(
) {
    let _turn = ports();
    let dir = demo_sites("2", "32");
    let cfg = |site: &str| dir.path().join(site).join("node.toml");
    let study = dir.path().join("long-study");
    let n = 400;
    pacs_broker::demo::write_synthetic_ct(
        &study,
        &pacs_broker::demo::SyntheticPatient::default(),
        n,
        128,
    )
    .unwrap();
    let _partner = serve(&cfg("telerad-c"));
    let send = || {
        let mut c = bin();
        c.args(["send", "--config"])
            .arg(cfg("hospital-a"))
            .args(["--agreement", "example-teleradiology", "--flow", "ct-reads"])
            .arg(&study);
        c
    };
    let inbox = dir.path().join("telerad-c/data/store/inbox");
    // The demo's own study is there already; the long study's folder is the other one.
    let delivered = |inbox: &std::path::Path| -> Vec<std::path::PathBuf> {
        common::files_under(inbox)
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                name.ends_with(".dcm") && !name.starts_with('.')
            })
            .collect()
    };
    let demo_study = delivered(&inbox);
    let before = demo_study.len();
    let mut child = send()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut held_when_killed = 0;
    while start.elapsed() < std::time::Duration::from_secs(120) {
        let now = delivered(&inbox).len() - before;
        if now > 0 {
            child.kill().unwrap();
            held_when_killed = now;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.wait().unwrap();
    assert!(
        held_when_killed > 0 && held_when_killed < n,
        "the send finished before it could be killed ({held_when_killed} of {n})"
    );
    // No entry lists the killed send's working copies: nothing is queued.
    for entry in common::files_under(&dir.path().join("hospital-a/data/outbox"))
        .into_iter()
        .filter(|p| p.ends_with("transfer.json"))
    {
        let text = std::fs::read_to_string(&entry).unwrap();
        assert!(!text.contains("\"state\": \"pending\""), "{text}");
    }
    let out = bin()
        .args(["outbox", "--retry", "--config"])
        .arg(cfg("hospital-a"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every instance of the long study the partner delivered is whole.
    let partial = delivered(&inbox);
    for p in partial.iter().filter(|p| !demo_study.contains(p)) {
        let obj = dicom_object::open_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let pixels = obj
            .element(dicom_dictionary_std::tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap();
        assert_eq!(pixels.len(), 128 * 128 * 2, "{}", p.display());
    }
    // The same send again completes the study; what the partner holds is not sent again.
    let out = send().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (Instances of the interrupted transfer that the partner verified are resumed, not
    // transferred either.)
    let held = partial.len() - before;
    let counts = stdout
        .split_once(" transferred, ")
        .and_then(|(a, b)| {
            let sent: usize = a.rsplit('(').next()?.parse().ok()?;
            let held: usize = b.split(' ').next()?.parse().ok()?;
            Some((sent, held))
        })
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(counts.1, held, "{stdout}");
    assert!(counts.0 <= n - held, "{stdout}");
    assert_eq!(delivered(&inbox).len(), before + n);
}
