//! Two sites as `pacs-broker serve` processes, as a hospital runs them: hospital-a with a DICOM
//! listener for local devices, telerad-c receiving; a fresh federation (own CA) in a temporary
//! folder, loopback ports. Shared by tests/dicom_edge.rs and tests/at_rest.rs.
//!
//! Owns: starting the processes and waiting until they accept, stopping them (SIGTERM and a
//! drain: [`Served::stop`]) or killing them (a crash: [`Served::kill`]; also on drop), their
//! logs and audit logs, running CLI commands against a site, and sending from a "modality"
//! with dcmtk's `storescu`. Does not own: what the tests check.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pacs_broker::config::NodeConfig;

use super::{files_under, free_port, listener_config, sign_by_all, site_config, wait_for};
use super::{AGREEMENT, FLOW};

pub const BROKER_AE: &str = "HOSP_A_BROKER";

/// A `pacs-broker serve` process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub config: PathBuf,
    pub cfg: NodeConfig,
}

impl Served {
    /// Starts `serve` with `config` (stderr to `<config>.log`; `log`: its `PACS_BROKER_LOG`,
    /// the default filter when `None`) and waits until its listeners accept.
    pub fn start(config: &Path, cfg: &NodeConfig, log: Option<&str>) -> Served {
        let log_file = std::fs::File::create(config.with_extension("log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pacs-broker"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some(level) = log {
            cmd.env("PACS_BROKER_LOG", level);
        }
        let served = Served {
            child: cmd.spawn().unwrap(),
            config: config.to_path_buf(),
            cfg: cfg.clone(),
        };
        let mut addrs = vec![cfg.listen.clone()];
        addrs.extend(
            cfg.dicom
                .as_ref()
                .map(|d| d.listen.clone())
                .filter(|l| !l.is_empty()),
        );
        for a in addrs {
            wait_for(&format!("{a} to accept"), Duration::from_secs(20), || {
                TcpStream::connect(&a).is_ok()
            });
        }
        served
    }

    /// SIGKILL, as a crash or power loss would stop it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the node drains and exits (its sled databases flushed and unlocked); killed
    /// after 15 s.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// Its audit log, as text.
    pub fn audit(&self) -> String {
        std::fs::read_to_string(self.cfg.data_dir.join("audit.log")).unwrap_or_default()
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }

    /// `pacs-broker <args> --config <its node.toml>`: exit code and output.
    pub fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

/// hospital-a (with a DICOM listener) and telerad-c, as processes.
pub struct Sites {
    pub dir: tempfile::TempDir,
    pub a: Served,
    pub c: Served,
    pub dicom_port: u16,
}

impl Sites {
    /// `agreement` replaces the test agreement's text (signed by all) when given; `allow`
    /// lists the (AE title, address) pairs hospital-a's listener takes; `log` is the nodes'
    /// `PACS_BROKER_LOG` (see [`Served::start`]).
    pub fn start(agreement: Option<String>, allow: &[(&str, &str)], log: Option<&str>) -> Sites {
        Sites::start_tuned(agreement, allow, log, |_, _| {})
    }

    /// [`Sites::start`], with `tune(site, config)` applied to each node's configuration before
    /// it starts.
    pub fn start_tuned(
        agreement: Option<String>,
        allow: &[(&str, &str)],
        log: Option<&str>,
        tune: impl Fn(&str, &mut NodeConfig),
    ) -> Sites {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<String> = ["hospital-a", "hospital-b", "telerad-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        pacs_broker::federation::pki::generate_dev_federation(&dir.path().join("pki"), &all)
            .unwrap();
        let addrs: BTreeMap<String, String> = ["hospital-a", "telerad-c"]
            .iter()
            .map(|s| (s.to_string(), format!("127.0.0.1:{}", free_port())))
            .collect();
        let dicom_port = free_port();
        let mut cfgs = BTreeMap::new();
        for site in ["hospital-a", "telerad-c"] {
            let mut cfg = site_config(dir.path(), site, &addrs);
            if let Some(text) = &agreement {
                let policy = dir.path().join(site).join("agreements").join("test.toml");
                std::fs::write(&policy, text).unwrap();
                let _ = std::fs::remove_dir_all(pacs_broker::dsa::sign::signature_dir(&policy));
                sign_by_all(dir.path(), &policy);
            }
            if site == "hospital-a" {
                cfg.dicom = Some(listener_config(
                    dicom_port, BROKER_AE, allow, AGREEMENT, FLOW,
                ));
            }
            tune(site, &mut cfg);
            let path = dir.path().join(site).join("node.toml");
            std::fs::write(&path, cfg.to_toml()).unwrap();
            cfgs.insert(site, (path, cfg));
        }
        let c = Served::start(&cfgs["telerad-c"].0, &cfgs["telerad-c"].1, log);
        let a = Served::start(&cfgs["hospital-a"].0, &cfgs["hospital-a"].1, log);
        Sites {
            dir,
            a,
            c,
            dicom_port,
        }
    }

    /// The DICOM files telerad-c holds in its inbox.
    pub fn received(&self) -> Vec<PathBuf> {
        files_under(&self.c.cfg.data_dir.join("store").join("inbox"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .collect()
    }

    /// Waits (40 s at most) until telerad-c holds `n` instances; fails with both logs.
    pub fn wait_received(&self, n: usize) {
        let start = Instant::now();
        while self.received().len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "{} of {n} instances reached telerad-c:\n{}\n{}",
                self.received().len(),
                self.a.log(),
                self.c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Instances hospital-a holds in its outbox (durable, de-identified).
    pub fn outbox_instances(&self) -> usize {
        files_under(&self.a.cfg.data_dir.join("outbox"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .count()
    }

    /// storescu with an association profile that proposes, per SOP class of the test studies,
    /// the uncompressed transfer syntaxes and the compressed ones the samples are in (storescu
    /// alone proposes uncompressed only and would decompress, or fail on JPEG).
    pub fn storescu(&self, calling: &str, called: &str, files: &[PathBuf]) -> (bool, String) {
        let profile = self.dir.path().join("storescu.cfg");
        std::fs::write(&profile, STORESCU_PROFILE).unwrap();
        let profile = profile.display().to_string();
        let head = ["-v", "-xf", profile.as_str(), "Study"];
        self.run_storescu(&head, calling, called, files)
    }

    /// Plain storescu (uncompressed transfer syntaxes) from `MODALITY` to hospital-a's
    /// listener; fails the test when storescu fails. Its output.
    pub fn storescu_modality(&self, files: &[PathBuf]) -> String {
        let (ok, text) = self.run_storescu(&[], "MODALITY", BROKER_AE, files);
        assert!(ok, "storescu failed: {text}");
        text
    }

    fn run_storescu(
        &self,
        head: &[&str],
        calling: &str,
        called: &str,
        files: &[PathBuf],
    ) -> (bool, String) {
        let port = self.dicom_port.to_string();
        let mut args: Vec<&str> = head.to_vec();
        args.extend(["-aet", calling, "-aec", called, "127.0.0.1", port.as_str()]);
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        let out = Command::new("storescu")
            .args(&args)
            .env("TCP_NODELAY", "1")
            .output()
            .expect("storescu (dcmtk) is required: run .ci/setup");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

const STORESCU_PROFILE: &str = r"
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[JPEGBaseline]
TransferSyntax1 = JPEGBaseline
[JPEG2000Lossless]
TransferSyntax1 = JPEG2000LosslessOnly
[RLE]
TransferSyntax1 = RLELossless

[[PresentationContexts]]
[Study]
PresentationContext1 = CTImageStorage\Uncompressed
PresentationContext2 = MRImageStorage\Uncompressed
PresentationContext3 = MRImageStorage\JPEG2000Lossless
PresentationContext4 = MRImageStorage\RLE
PresentationContext5 = SecondaryCaptureImageStorage\JPEGBaseline
PresentationContext6 = SecondaryCaptureImageStorage\Uncompressed

[[Profiles]]
[Study]
PresentationContexts = Study
";
