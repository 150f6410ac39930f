//! The self-contained demo federation behind `pacs-broker demo`, and the synthetic study it sends.
//!
//! Owns: laying out two site nodes (hospital-a sending, telerad-c receiving) on loopback with the
//! development certificates and the example agreement, generating a realistic CT study full of
//! (fictitious) PHI, sending it, and the before/after report of what the receiver stored.
//! hospital-a also gets a DICOM listener (AE `HOSP_A_BROKER`, the device `MODALITY` allowed from
//! 127.0.0.1, routed to the teleradiology flow), and the demo prints the dcmtk `storescu`
//! command that sends a study into it. The node folders it writes are complete: `pacs-broker serve --config <dir>/<site>/node.toml` starts
//! the same site by hand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

use crate::config::{DicomAllow, DicomConfig, DicomRoute, NodeConfig, Peer, TlsPaths};
use crate::dsa::Agreement;
use crate::node::{Node, SendReport};
use crate::pseudonym::SiteKeys;

/// The sending and receiving sites of the demo.
pub const SENDER: &str = "hospital-a";
pub const RECEIVER: &str = "telerad-c";
/// The example agreement and its flow.
pub const AGREEMENT_FILE: &str = "example-teleradiology.toml";
pub const FLOW: &str = "ct-reads";
/// The DICOM listener of the sending site, and the device allowed to send to it.
pub const SENDER_AE: &str = "HOSP_A_BROKER";
pub const MODALITY_AE: &str = "MODALITY";
/// The listener's port when it is free (else any free port).
pub const DICOM_PORT: u16 = 11112;

/// hospital-a's `[dicom]` table: the listener, the allowed modality, the route to the
/// teleradiology flow.
fn sender_dicom(listen: std::net::SocketAddr, agreement: &str) -> DicomConfig {
    DicomConfig {
        listen: listen.to_string(),
        ae_title: SENDER_AE.into(),
        allow: vec![DicomAllow {
            ae_title: MODALITY_AE.into(),
            address: std::net::IpAddr::from([127, 0, 0, 1]),
        }],
        routes: vec![DicomRoute {
            agreement: agreement.into(),
            flow: FLOW.into(),
            calling_ae: None,
            called_ae: None,
            purpose: None,
        }],
        max_associations: 8,
        study_quiet_secs: 10,
        max_pdu: 262_144,
        idle_timeout_secs: 60,
        deliver: None,
    }
}

/// The `storescu` command (dcmtk) that sends the files of `study` to the demo's listener.
pub fn storescu_command(listen: &str, study: &Path) -> String {
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "11112"));
    format!(
        "TCP_NODELAY=1 storescu -aet {MODALITY_AE} -aec {SENDER_AE} +sd +r {host} {port} {}",
        study.display()
    )
}

/// The fictitious patient of the synthetic study.
#[derive(Debug, Clone)]
pub struct SyntheticPatient {
    pub name: String,
    pub id: String,
    pub birth_date: String,
    pub accession: String,
    pub institution: String,
    pub referring: String,
}

impl Default for SyntheticPatient {
    fn default() -> Self {
        SyntheticPatient {
            name: "DOE^JANE^QUINN".into(),
            id: "MRN-0042117".into(),
            birth_date: "19580314".into(),
            accession: "ACC-2026-118842".into(),
            institution: "St. Example General Hospital".into(),
            referring: "SMITH^ROBERT^J^DR".into(),
        }
    }
}

fn random_uid(root: &str) -> String {
    format!("{root}.{}", rand::random::<u64>() >> 1)
}

/// Writes a CT series of `slices` instances (`size`x`size`, 16-bit, explicit VR little endian)
/// with PHI in the usual attributes, including inside sequences. Returns the files.
pub fn write_synthetic_ct(
    dir: &Path,
    patient: &SyntheticPatient,
    slices: usize,
    size: u16,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let root = "1.2.826.0.1.3680043.10.1432";
    let study_uid = random_uid(&format!("{root}.1"));
    let series_uid = random_uid(&format!("{root}.2"));
    let frame_uid = random_uid(&format!("{root}.3"));
    let mut files = Vec::new();
    for i in 0..slices {
        let sop_uid = format!("{}.{}", random_uid(&format!("{root}.4")), i + 1);
        let obj = synthetic_ct_slice(
            patient,
            &study_uid,
            &series_uid,
            &frame_uid,
            &sop_uid,
            i,
            size,
        );
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .implementation_class_uid("1.2.826.0.1.3680043.10.1432.0.1")
                    .implementation_version_name("PACSBROKER_DEMO"),
            )
            .map_err(std::io::Error::other)?;
        let path = dir.join(format!("CT{:04}.dcm", i + 1));
        file.write_to_file(&path).map_err(std::io::Error::other)?;
        files.push(path);
    }
    Ok(files)
}

fn put(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}

fn synthetic_ct_slice(
    p: &SyntheticPatient,
    study_uid: &str,
    series_uid: &str,
    frame_uid: &str,
    sop_uid: &str,
    index: usize,
    size: u16,
) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    let z = -100.0 + 5.0 * index as f64;
    for (tag, vr, v) in [
        (
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            "ISO_IR 100".to_string(),
        ),
        (tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL".into()),
        (
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.2".into(),
        ),
        (tags::SOP_INSTANCE_UID, VR::UI, sop_uid.into()),
        (tags::STUDY_DATE, VR::DA, "20261102".into()),
        (tags::SERIES_DATE, VR::DA, "20261102".into()),
        (tags::ACQUISITION_DATE, VR::DA, "20261102".into()),
        (tags::CONTENT_DATE, VR::DA, "20261102".into()),
        (tags::STUDY_TIME, VR::TM, "101500".into()),
        (tags::CONTENT_TIME, VR::TM, format!("1016{:02}", index % 60)),
        (tags::ACCESSION_NUMBER, VR::SH, p.accession.clone()),
        (tags::MODALITY, VR::CS, "CT".into()),
        (tags::MANUFACTURER, VR::LO, "ExampleMed".into()),
        (tags::INSTITUTION_NAME, VR::LO, p.institution.clone()),
        (
            tags::INSTITUTION_ADDRESS,
            VR::ST,
            "1 Hospital Road, Springfield".into(),
        ),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN, p.referring.clone()),
        (tags::STATION_NAME, VR::SH, "CT-SCANNER-01".into()),
        (
            tags::STUDY_DESCRIPTION,
            VR::LO,
            "CT CHEST WITH CONTRAST".into(),
        ),
        (tags::SERIES_DESCRIPTION, VR::LO, "AXIAL 5MM".into()),
        (tags::PERFORMING_PHYSICIAN_NAME, VR::PN, "JONES^MARY".into()),
        (tags::OPERATORS_NAME, VR::PN, "TECH^TERRY".into()),
        (
            tags::MANUFACTURER_MODEL_NAME,
            VR::LO,
            "Example CT 64".into(),
        ),
        (tags::PATIENT_NAME, VR::PN, p.name.clone()),
        (tags::PATIENT_ID, VR::LO, p.id.clone()),
        (tags::PATIENT_BIRTH_DATE, VR::DA, p.birth_date.clone()),
        (tags::PATIENT_SEX, VR::CS, "F".into()),
        (tags::PATIENT_AGE, VR::AS, "068Y".into()),
        (
            tags::PATIENT_ADDRESS,
            VR::LO,
            "42 Elm Street, Springfield".into(),
        ),
        (tags::BODY_PART_EXAMINED, VR::CS, "CHEST".into()),
        (tags::SLICE_THICKNESS, VR::DS, "5".into()),
        (tags::KVP, VR::DS, "120".into()),
        (tags::DEVICE_SERIAL_NUMBER, VR::LO, "SN-77812".into()),
        (tags::PATIENT_POSITION, VR::CS, "HFS".into()),
        (tags::STUDY_INSTANCE_UID, VR::UI, study_uid.into()),
        (tags::SERIES_INSTANCE_UID, VR::UI, series_uid.into()),
        (tags::STUDY_ID, VR::SH, "4711".into()),
        (tags::SERIES_NUMBER, VR::IS, "2".into()),
        (tags::INSTANCE_NUMBER, VR::IS, (index + 1).to_string()),
        (
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            format!("-125\\-125\\{z}"),
        ),
        (
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            "1\\0\\0\\0\\1\\0".into(),
        ),
        (tags::FRAME_OF_REFERENCE_UID, VR::UI, frame_uid.into()),
        (tags::SLICE_LOCATION, VR::DS, format!("{z}")),
        (tags::SAMPLES_PER_PIXEL, VR::US, "1".into()),
        (
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2".into(),
        ),
        (tags::BURNED_IN_ANNOTATION, VR::CS, "NO".into()),
        (tags::PIXEL_SPACING, VR::DS, "0.9765625\\0.9765625".into()),
        (tags::RESCALE_INTERCEPT, VR::DS, "-1024".into()),
        (tags::RESCALE_SLOPE, VR::DS, "1".into()),
        (tags::WINDOW_CENTER, VR::DS, "40".into()),
        (tags::WINDOW_WIDTH, VR::DS, "400".into()),
    ] {
        put(&mut o, tag, vr, &v);
    }
    for (tag, v) in [
        (tags::ROWS, size),
        (tags::COLUMNS, size),
        (tags::BITS_ALLOCATED, 16),
        (tags::BITS_STORED, 12),
        (tags::HIGH_BIT, 11),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    // Identifiers inside sequences, as RIS-fed modalities write them.
    let mut request = InMemDicomObject::new_empty();
    put(&mut request, tags::ACCESSION_NUMBER, VR::SH, &p.accession);
    put(
        &mut request,
        tags::REQUESTED_PROCEDURE_ID,
        VR::SH,
        "RP-99812",
    );
    put(
        &mut request,
        tags::REQUESTING_PHYSICIAN,
        VR::PN,
        &p.referring,
    );
    put(&mut request, tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
    o.put(DataElement::new(
        tags::REQUEST_ATTRIBUTES_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![request]),
    ));
    let mut other = InMemDicomObject::new_empty();
    put(&mut other, tags::PATIENT_ID, VR::LO, "NHS-943-476-5919");
    put(&mut other, tags::ISSUER_OF_PATIENT_ID, VR::LO, "NHS");
    o.put(DataElement::new(
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![other]),
    ));
    // A phantom: air, a body ellipse of soft tissue, lungs, and a vessel that moves per slice.
    let n = size as usize;
    let mut pixels = Vec::with_capacity(n * n * 2);
    let c = n as f64 / 2.0;
    for y in 0..n {
        for x in 0..n {
            let (dx, dy) = ((x as f64 - c) / c, (y as f64 - c) / c);
            let body = (dx / 0.85).powi(2) + (dy / 0.65).powi(2) <= 1.0;
            let lung = ((dx.abs() - 0.38) / 0.25).powi(2) + (dy / 0.4).powi(2) <= 1.0;
            let vx = 0.1 * ((index as f64) / 4.0).sin();
            let vessel = (dx - vx).powi(2) + (dy + 0.1).powi(2) <= 0.004;
            let hu: i32 = if vessel {
                250
            } else if lung && body {
                -850
            } else if body {
                40 + ((x * 7 + y * 13 + index * 3) % 20) as i32
            } else {
                -1000
            };
            let stored = (hu + 1024).clamp(0, 4095) as u16;
            pixels.extend_from_slice(&stored.to_le_bytes());
        }
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U8(pixels.into()),
    ));
    o
}

/// Where the demo finds the repository's certs-dev/ and policies/: the current folder, then the
/// folder the binary was built from.
pub fn find_repo_dir(name: &str) -> Option<PathBuf> {
    [
        PathBuf::from("."),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ]
    .into_iter()
    .map(|b| b.join(name))
    .find(|p| p.is_dir())
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("site {site} in {dir} is running (a `pacs-broker serve --config {config}` holds its data folder); nothing was changed. Stop it before re-running the demo there, or give another --data-dir")]
    Running {
        site: String,
        dir: PathBuf,
        config: PathBuf,
    },
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the demo did, for the report.
pub struct DemoOutcome {
    pub base: PathBuf,
    pub report: SendReport,
    pub original: PathBuf,
    pub received: PathBuf,
    pub inbox: PathBuf,
    pub configs: Vec<PathBuf>,
    /// The `storescu` command that sends a study into hospital-a's DICOM listener.
    pub storescu: String,
}

fn copy_dir_files(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        let p = e.path();
        if p.is_file() {
            std::fs::copy(&p, to.join(e.file_name()))?;
        } else if p.is_dir() {
            copy_dir_files(&p, &to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Gives `site` the example agreements it is a party to, each with its signatures, and only the
/// trial subject-ID mappings of the flows it sends: a mapping turns a trial subject back into a
/// patient, so it stays at the origin. A mapping a site does not send under, left in its folder
/// by an earlier demo, is removed.
fn copy_agreements_for(policies: &Path, site: &str, to: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(to)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(policies)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        let a = Agreement::from_file(&file).map_err(|e| DemoError::Setup(e.to_string()))?;
        if a.party(site).is_none() {
            continue;
        }
        let name = file.file_name().expect("a file has a name");
        std::fs::copy(&file, to.join(name))?;
        let sigs = crate::dsa::sign::signature_dir(&file);
        if sigs.is_dir() {
            copy_dir_files(&sigs, &crate::dsa::sign::signature_dir(&to.join(name)))?;
        }
        let from_dir = file.parent().unwrap_or(Path::new("."));
        for f in &a.flows {
            let Some(ids) = &f.subject_ids else { continue };
            let target = to.join(&ids.mapping);
            if f.from == site {
                std::fs::copy(from_dir.join(&ids.mapping), &target)?;
            } else if target.is_file() {
                std::fs::remove_file(&target)?;
            }
        }
    }
    Ok(())
}

/// Refuses to lay out a site whose node is running: its `serve` (or a `send`) holds the lock on
/// the site's store or vault, and rewriting its configuration under it would leave it serving
/// one set of ports and keys while its files say another.
fn refuse_running(base: &Path, site: &str) -> Result<(), DemoError> {
    let dir = base.join(site);
    let config = dir.join("node.toml");
    if !config.exists() {
        return Ok(());
    }
    let data = NodeConfig::load(&config)
        .map(|c| c.data_dir)
        .unwrap_or_else(|_| dir.join("data"));
    let held = [data.join("store").join("index"), data.join("vault")]
        .iter()
        .any(|db| crate::store::database_in_use(db));
    if held {
        return Err(DemoError::Running {
            site: site.to_string(),
            dir,
            config,
        });
    }
    Ok(())
}

/// Lays out one demo site under `base/<site>` and returns its config path.
fn lay_out_site(
    base: &Path,
    certs: &Path,
    policies: &Path,
    site: &str,
    listen: &str,
    peers: BTreeMap<String, Peer>,
    dicom: Option<DicomConfig>,
) -> Result<PathBuf, DemoError> {
    let dir = base.join(site);
    std::fs::create_dir_all(dir.join("tls"))?;
    for (from, to) in [
        ("ca.pem".to_string(), "ca.pem".to_string()),
        (format!("{site}.pem"), "site.pem".into()),
        (format!("{site}.key"), "site-tls.key".into()),
    ] {
        let dest = dir.join("tls").join(&to);
        std::fs::copy(certs.join(&from), &dest).map_err(|e| {
            DemoError::Setup(format!(
                "cannot copy {} from {}: {e}",
                from,
                certs.display()
            ))
        })?;
        if to.ends_with(".key") {
            // A private key is for this process only, whatever the mode of its source.
            crate::federation::pki::restrict_to_owner(&dest)
                .map_err(|e| DemoError::Setup(e.to_string()))?;
        }
    }
    copy_agreements_for(policies, site, &dir.join("agreements"))?;
    let key = dir.join("site.key");
    if !key.exists() {
        SiteKeys::generate()
            .write_new(&key)
            .map_err(|e| DemoError::Setup(e.to_string()))?;
    }
    let cfg = NodeConfig {
        site_id: site.into(),
        listen: listen.into(),
        data_dir: PathBuf::from("data"),
        key_file: PathBuf::from("site.key"),
        agreements: PathBuf::from("agreements"),
        tls: TlsPaths {
            ca: PathBuf::from("tls/ca.pem"),
            cert: PathBuf::from("tls/site.pem"),
            key: PathBuf::from("tls/site-tls.key"),
            crl: None,
        },
        peers,
        limits: Default::default(),
        dicom,
        audit: Default::default(),
        users: demo_users(site),
        storage: Default::default(),
    };
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        format!(
            "# pacs-broker node configuration for site {site}, written by `pacs-broker demo`.\n\
             # Start this site by hand with: pacs-broker serve --config {}\n{}",
            path.display(),
            cfg.to_toml()
        ),
    )?;
    Ok(path)
}

/// The demo's local users: at hospital-a, the radiologist on duty may re-identify returned
/// results (`pacs-broker reidentify --user dr-on-duty ...`), as the teleradiology agreement names.
fn demo_users(site: &str) -> Vec<crate::users::UserConfig> {
    if site != "hospital-a" {
        return Vec::new();
    }
    vec![crate::users::UserConfig {
        name: "dr-on-duty".into(),
        roles: vec![
            crate::users::ROLE_REIDENTIFY.into(),
            "radiologist on duty at Hospital A".into(),
        ],
    }]
}

/// Runs the demo: two sites on loopback, one study from hospital-a to telerad-c (the generated
/// CT of `slices` x `size`², unless `study` names a folder to send instead).
pub async fn run(
    data_dir: Option<PathBuf>,
    study: Option<PathBuf>,
    slices: usize,
    size: u16,
) -> Result<DemoOutcome, DemoError> {
    let certs = find_repo_dir("certs-dev").ok_or_else(|| {
        DemoError::Setup("certs-dev/ not found: run the demo from the repository folder".into())
    })?;
    let policies = find_repo_dir("policies").ok_or_else(|| {
        DemoError::Setup("policies/ not found: run the demo from the repository folder".into())
    })?;
    let agreement = Agreement::from_file(&policies.join(AGREEMENT_FILE))
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let base = match data_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            std::fs::canonicalize(&d)?
        }
        None => tempfile::Builder::new()
            .prefix("pacs-broker-demo-")
            .tempdir()?
            .keep(),
    };
    for site in [SENDER, RECEIVER] {
        refuse_running(&base, site)?;
    }
    let listener_a = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let listener_c = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (addr_a, addr_c) = (listener_a.local_addr()?, listener_c.local_addr()?);
    let peer = |a: std::net::SocketAddr| Peer {
        address: a.to_string(),
        server_name: Some("localhost".into()),
    };
    let dicom_addr = match std::net::TcpListener::bind(("127.0.0.1", DICOM_PORT)) {
        Ok(l) => l.local_addr()?,
        Err(_) => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?,
    };
    let cfg_a = lay_out_site(
        &base,
        &certs,
        &policies,
        SENDER,
        &addr_a.to_string(),
        BTreeMap::from([(RECEIVER.to_string(), peer(addr_c))]),
        Some(sender_dicom(dicom_addr, &agreement.id)),
    )?;
    let cfg_c = lay_out_site(
        &base,
        &certs,
        &policies,
        RECEIVER,
        &addr_c.to_string(),
        BTreeMap::from([(SENDER.to_string(), peer(addr_a))]),
        None,
    )?;
    let node_a = Arc::new(Node::open_config(&cfg_a)?);
    let node_c = Arc::new(Node::open_config(&cfg_c)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for (node, listener) in [(node_a.clone(), listener_a), (node_c.clone(), listener_c)] {
        let mut rx = stop_rx.clone();
        servers.push(tokio::spawn(async move {
            node.serve(listener, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    let study_dir = match study {
        Some(s) => s,
        None => {
            let d = base.join("source-study");
            if !d.exists() {
                write_synthetic_ct(&d, &SyntheticPatient::default(), slices, size)?;
            }
            d
        }
    };
    // The partner's listener is bound before its `serve` runs, and `serve` writes (and fsyncs)
    // its start-up audit entries before it accepts: on a busy disk an offer sent at once waits
    // on a server that is not serving yet, and can time out. Wait until it answers over mutual
    // TLS, then send.
    wait_until_ready(&node_a, RECEIVER, &addr_c.to_string(), PARTNER_READY_WITHIN).await?;
    let send = || node_a.send(&agreement.id, FLOW, None, std::slice::from_ref(&study_dir));
    let mut report = send().await;
    // Should the partner still not take it, the study waits in hospital-a's outbox: the node's
    // own outbox retry delivers it (as a serving node's outbox worker would, with backoff).
    for attempt in 1..=DEMO_OUTBOX_RETRIES {
        let Ok(r) = &report else { break };
        if !r.studies.is_empty() || r.queued.is_empty() {
            break;
        }
        tracing::warn!(attempt, reason = %r.queued[0].1, "the partner did not take the demo study yet; retrying from the outbox");
        tokio::time::sleep(std::time::Duration::from_secs(attempt as u64)).await;
        if node_a.drain_outbox(true).await > 0 {
            // Delivered from the outbox. Offering it again moves no data (the partner holds
            // every instance and says so) and yields the report of what was sent.
            report = send().await;
        }
    }
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let report = report?;
    let first = report
        .studies
        .first()
        .and_then(|s| s.files.first())
        .cloned()
        .ok_or_else(|| DemoError::Setup("no study was sent".into()))?;
    let inbox = node_c.store()?.inbox();
    let received = inbox
        .join(crate::store::safe_name(&agreement.id))
        .join(crate::store::safe_name(&report.studies[0].study_token))
        .join(first.1.file_name().expect("outbox file has a name"));
    Ok(DemoOutcome {
        base,
        report,
        original: first.0,
        received,
        inbox,
        configs: vec![cfg_a, cfg_c],
        storescu: storescu_command(&dicom_addr.to_string(), &study_dir),
    })
}

/// How many times the demo retries its study from the outbox when the partner did not take
/// the first offer.
const DEMO_OUTBOX_RETRIES: u32 = 4;

/// How long the demo waits for its partner to answer before it gives up.
const PARTNER_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits (at most `within`) until `partner` at `address` answers a Hello over mutual TLS: its
/// server accepts and serves (a TCP connect proves nothing, the listener is bound before `serve`
/// starts).
async fn wait_until_ready(
    node: &Node,
    partner: &str,
    address: &str,
    within: std::time::Duration,
) -> Result<(), DemoError> {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    loop {
        let hello = async {
            let mut client = crate::federation::client::PeerClient::connect(
                &node.tls,
                partner,
                address,
                "localhost",
            )
            .await
            .map_err(|e| e.to_string())?;
            client
                .raw()
                .hello(crate::federation::proto::HelloRequest {})
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let limit = within
            .saturating_sub(start.elapsed())
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let why = match tokio::time::timeout(limit, hello).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} ms", limit.as_millis()),
        };
        if start.elapsed() >= within {
            return Err(DemoError::Setup(format!(
                "the partner `{partner}` at {address} did not answer within {} s: {why}",
                within.as_secs()
            )));
        }
        tracing::debug!(partner, %why, "partner not ready yet");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The identifying attributes the demo's before/after table shows.
pub const REPORT_ATTRIBUTES: &[(Tag, &str)] = &[
    (tags::PATIENT_NAME, "PatientName"),
    (tags::PATIENT_ID, "PatientID"),
    (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
    (tags::PATIENT_SEX, "PatientSex"),
    (tags::PATIENT_ADDRESS, "PatientAddress"),
    (tags::ACCESSION_NUMBER, "AccessionNumber"),
    (tags::INSTITUTION_NAME, "InstitutionName"),
    (tags::REFERRING_PHYSICIAN_NAME, "ReferringPhysicianName"),
    (tags::OPERATORS_NAME, "OperatorsName"),
    (tags::STATION_NAME, "StationName"),
    (tags::STUDY_DATE, "StudyDate"),
    (tags::STUDY_ID, "StudyID"),
    (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
    (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID"),
    (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
    (tags::FRAME_OF_REFERENCE_UID, "FrameOfReferenceUID"),
    (tags::OTHER_PATIENT_I_DS_SEQUENCE, "OtherPatientIDsSequence"),
    (tags::PATIENT_IDENTITY_REMOVED, "PatientIdentityRemoved"),
    (tags::DEIDENTIFICATION_METHOD, "DeidentificationMethod"),
];

/// One attribute's value for the table: the text, `(sequence)`, `(empty)` or `(removed)`.
pub fn show(obj: &InMemDicomObject, tag: Tag) -> String {
    match obj.get(tag) {
        None => "(removed)".into(),
        Some(e) => match e.value() {
            dicom_core::value::Value::Sequence(s) => {
                format!("(sequence, {} items)", s.items().len())
            }
            _ => match e.to_str() {
                Ok(s) if s.trim().is_empty() => "(empty)".into(),
                Ok(s) => s.trim_end_matches(['\0', ' ']).to_string(),
                Err(_) => "(binary)".into(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo sends only once its partner serves: a bound listener whose node has not started
    /// serving is not ready; the same address once `serve` runs is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_partner_is_ready_once_it_serves_not_once_its_port_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let certs = find_repo_dir("certs-dev").expect("certs-dev/");
        let policies = find_repo_dir("policies").expect("policies/");
        let listener_a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener_c = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr_a, addr_c) = (
            listener_a.local_addr().unwrap(),
            listener_c.local_addr().unwrap(),
        );
        let peer = |a: std::net::SocketAddr| Peer {
            address: a.to_string(),
            server_name: Some("localhost".into()),
        };
        let site = |name: &str, addr: std::net::SocketAddr, other: &str, at| {
            lay_out_site(
                dir.path(),
                &certs,
                &policies,
                name,
                &addr.to_string(),
                BTreeMap::from([(other.to_string(), peer(at))]),
                None,
            )
            .unwrap()
        };
        let cfg_a = site(SENDER, addr_a, RECEIVER, addr_c);
        let cfg_c = site(RECEIVER, addr_c, SENDER, addr_a);
        let node_a = Node::open_config(&cfg_a).unwrap();
        let node_c = Arc::new(Node::open_config(&cfg_c).unwrap());
        let short = std::time::Duration::from_millis(600);
        let not_yet = wait_until_ready(&node_a, RECEIVER, &addr_c.to_string(), short).await;
        let why = not_yet.expect_err("bound but not serving").to_string();
        assert!(
            why.contains("`telerad-c`") && why.contains("did not answer"),
            "{why}"
        );

        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(async move {
            node_c
                .serve(listener_c, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        });
        wait_until_ready(&node_a, RECEIVER, &addr_c.to_string(), PARTNER_READY_WITHIN)
            .await
            .expect("ready once serving");
        let _ = stop_tx.send(true);
        server.await.unwrap().unwrap();
        drop(listener_a);
    }
}
