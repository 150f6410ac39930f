//! A real PACS for tests: Debian's Orthanc, started on free loopback ports with its own temporary
//! configuration and storage, queried through its REST API, stopped on drop. It can be stopped
//! and started again on the same ports and storage (a PACS that goes down and comes back).
//!
//! Include it from a test with `#[path = "common/orthanc.rs"] mod orthanc;`. `.ci/setup`
//! installs the `orthanc` package.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Orthanc binary of the Debian package (in /usr/sbin, which a user's PATH may lack).
fn orthanc_binary() -> PathBuf {
    let debian = std::path::Path::new("/usr/sbin/Orthanc");
    if debian.exists() {
        debian.to_owned()
    } else {
        PathBuf::from("Orthanc")
    }
}

/// A running (or stopped) Orthanc.
pub struct Orthanc {
    dir: tempfile::TempDir,
    pub aet: String,
    pub dicom_port: u16,
    pub http_port: u16,
    child: Option<Child>,
    /// Extra configuration keys (merged over the defaults).
    extra: serde_json::Value,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Orthanc {
    /// Starts an Orthanc with AE title `ORTHANC` and waits until its REST API answers.
    pub fn start() -> Orthanc {
        Orthanc::start_with(serde_json::json!({}))
    }

    /// Starts an Orthanc with extra configuration keys, e.g.
    /// `{"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2.1"]}`.
    pub fn start_with(extra: serde_json::Value) -> Orthanc {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Orthanc {
            dir,
            aet: "ORTHANC".into(),
            dicom_port: free_port(),
            http_port: free_port(),
            child: None,
            extra,
        };
        o.write_config();
        o.restart();
        o
    }

    /// `host:port` of its DICOM port.
    pub fn dicom_address(&self) -> String {
        format!("127.0.0.1:{}", self.dicom_port)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.json")
    }

    /// Orthanc's own output (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("orthanc.log")).unwrap_or_default()
    }

    fn write_config(&self) {
        let storage = self.dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut config = serde_json::json!({
            "Name": "pacs-broker-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": false,
            "DicomServerEnabled": true,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": true,
            "DicomAlwaysAllowStore": true,
            "HttpServerEnabled": true,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "SslEnabled": false,
            "Plugins": [],
            "DicomModalities": {},
            "OrthancPeers": {},
            "SaveJobs": false,
            "HttpTimeout": 10,
            "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": false,
        });
        if let (Some(c), Some(extra)) = (config.as_object_mut(), self.extra.as_object()) {
            c.extend(extra.clone());
        }
        std::fs::write(self.config_path(), config.to_string()).unwrap();
    }

    /// Starts it again on the same ports and storage (after [`Orthanc::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "Orthanc is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("orthanc.log"))
            .unwrap();
        let child = Command::new(orthanc_binary())
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("Orthanc is required for this test (run .ci/setup to install orthanc): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.get("/system").is_some_and(|(code, _)| code == 200) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("Orthanc exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("Orthanc did not answer on its REST port:\n{}", self.log());
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits until its DICOM port is closed.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A GET on the REST API: (status code, body); None when nothing answers.
    pub fn get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        // HTTP/1.0: the answer is not chunked and ends when the connection closes.
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, raw[split + 4..].to_vec()))
    }

    /// A GET whose answer must be 200 and JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self
            .get(path)
            .unwrap_or_else(|| panic!("Orthanc REST {path}: no answer"));
        assert_eq!(
            code,
            200,
            "Orthanc REST {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("Orthanc REST {path}: {e}"))
    }

    /// The Orthanc ids of every stored instance.
    pub fn instances(&self) -> Vec<String> {
        serde_json::from_value(self.get_json("/instances")).unwrap()
    }

    /// The tags of an instance, simplified (`{"PatientName": "...", ...}`).
    pub fn instance_tags(&self, id: &str) -> serde_json::Value {
        self.get_json(&format!("/instances/{id}/tags?simplify"))
    }

    /// The transfer syntax an instance was received in.
    pub fn transfer_syntax(&self, id: &str) -> String {
        let (code, body) = self
            .get(&format!("/instances/{id}/metadata/TransferSyntax"))
            .expect("Orthanc answers");
        assert_eq!(code, 200);
        String::from_utf8_lossy(&body).trim().to_string()
    }

    /// Waits until at least `n` instances are stored (or `timeout` passes); returns their ids.
    pub fn wait_for_instances(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ids = self.instances();
            if ids.len() >= n || Instant::now() >= deadline {
                return ids;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
