//! Encryption at rest, key rotation and crypto-shredding across two `pacs-broker serve`
//! processes (hospital-a with a DICOM listener fed by dcmtk `storescu`, and telerad-c):
//!
//! - after a `send` and a DIMSE ingest, no original identifier and no de-identified header or
//!   pixel bytes appear in plaintext in any file of either data folder except the delivery folder
//!   (the raw bytes of every file are searched, sled's included), while the delivered copies do
//!   hold them (so the search can find what it looks for);
//! - `keys rotate` while both nodes run: files move to the new key, the running receiver keeps
//!   reading old and new, and a new study still arrives whole;
//! - a wrong key file, a corrupted vault record and a corrupted sealed blob each give a clear
//!   error naming the item, nothing else is lost;
//! - `vault shred` is refused for an active agreement and while retention runs, then destroys
//!   the vault records and the token secret; re-identification says when it was shredded.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::store::sealed::AtRest;
use pacs_broker::store::Store;

use common::sites::Sites;
use common::*;

/// A header value the test profile keeps (Convolution Kernel is not in PS3.15 Table E.1-1).
const HEADER_MARKER: &str = "ZEBRAKERNEL4711";

/// hospital-a and telerad-c as `serve` processes under the test agreement, hospital-a's
/// listener taking `MODALITY` from loopback.
fn start_sites() -> Sites {
    Sites::start(None, &[("MODALITY", "127.0.0.1")], None)
}

/// What the test study must never show outside the delivery folder.
struct Secrets {
    /// Original identifiers (names, ids, dates, UIDs).
    originals: Vec<String>,
    /// Pixel bytes (a window from the middle of the pixel data).
    pixels: Vec<u8>,
}

/// A synthetic CT study with distinctive values: its own patient, a kept header marker and a
/// pixel pattern no other file has.
fn study(
    dir: &Path,
    patient: &SyntheticPatient,
    slices: usize,
    seed: u8,
) -> (Vec<PathBuf>, Secrets) {
    let files = write_synthetic_ct(dir, patient, slices, 64).unwrap();
    let mut originals = vec![
        patient.name.clone(),
        patient.id.clone(),
        patient.accession.clone(),
        patient.institution.clone(),
        patient.referring.clone(),
    ];
    let mut pattern = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut obj = dicom_object::open_file(f).unwrap();
        for tag in [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
        ] {
            originals.push(
                obj.element(tag)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0')
                    .to_string(),
            );
        }
        obj.put(DataElement::new(
            tags::CONVOLUTION_KERNEL,
            VR::SH,
            PrimitiveValue::from(HEADER_MARKER),
        ));
        let len = obj
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .len();
        // A pattern that no synthetic image or header produces: bytes of a small LCG.
        let mut x: u32 = 0x9E37_79B9 ^ (u32::from(seed) << 8) ^ i as u32;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        if i == 0 {
            pattern = bytes[len / 2..len / 2 + 48].to_vec();
        }
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(bytes),
        ));
        obj.write_to_file(f).unwrap();
    }
    originals.sort();
    originals.dedup();
    (
        files,
        Secrets {
            originals,
            pixels: pattern,
        },
    )
}

/// A vectorised search: the files searched include the ingest log's 32 MiB slots and the sled
/// databases, and a byte-by-byte window comparison in a debug build took this test over 100 s.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

/// Every file under `data_dir` except the delivery folder (the inbox).
fn kept_files(data_dir: &Path) -> Vec<PathBuf> {
    let inbox = data_dir.join("store").join("inbox");
    files_under(data_dir)
        .into_iter()
        .filter(|p| !p.starts_with(&inbox))
        .collect()
}

fn assert_nothing_in_clear(sites: &Sites, secrets: &[&Secrets]) {
    let mut checked = 0;
    for data in [&sites.a.cfg.data_dir, &sites.c.cfg.data_dir] {
        for f in kept_files(data) {
            let Ok(bytes) = std::fs::read(&f) else {
                continue; // removed meanwhile by a running node (a temporary or sled file)
            };
            checked += 1;
            for s in secrets {
                for v in &s.originals {
                    assert!(
                        !contains(&bytes, v.as_bytes()),
                        "an original identifier is in clear in {}",
                        f.display()
                    );
                }
                assert!(
                    !contains(&bytes, &s.pixels),
                    "de-identified pixel bytes are in clear in {}",
                    f.display()
                );
            }
            assert!(
                !contains(&bytes, HEADER_MARKER.as_bytes()),
                "de-identified header bytes are in clear in {}",
                f.display()
            );
        }
    }
    assert!(checked > 20, "only {checked} files were searched");
}

fn patient(name: &str, id: &str) -> SyntheticPatient {
    SyntheticPatient {
        name: name.into(),
        id: id.into(),
        birth_date: "19470219".into(),
        accession: format!("ACC-{id}"),
        institution: "Sealed Valley Infirmary".into(),
        referring: "QUILL^OTTO^DR".into(),
    }
}

#[test]
fn nothing_is_kept_in_clear_and_rotation_runs_beside_the_nodes() {
    let mut sites = start_sites();
    // 1. A `send` of files and a DIMSE ingest by storescu.
    let (sent, s1) = study(
        &sites.dir.path().join("study-1"),
        &patient("ZWOLINSKA^HALINA", "MRN-AR-77311"),
        3,
        1,
    );
    let mut args = vec!["send", "--agreement", AGREEMENT, "--flow", FLOW];
    let names: Vec<String> = sent.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let (code, out) = sites.a.cli(&args);
    assert_eq!(code, 0, "send failed: {out}");
    let (dimse, s2) = study(
        &sites.dir.path().join("study-2"),
        &patient("QUENTIN^BARNABY", "MRN-AR-99120"),
        3,
        2,
    );
    sites.storescu_modality(&dimse);
    sites.wait_received(6);

    // The delivered copies hold the markers (so the search below looks for real bytes).
    let delivered: Vec<Vec<u8>> = sites
        .received()
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(delivered
        .iter()
        .any(|b| contains(b, HEADER_MARKER.as_bytes())));
    assert!(delivered.iter().any(|b| contains(b, &s1.pixels)));
    assert!(delivered.iter().any(|b| contains(b, &s2.pixels)));
    for b in &delivered {
        for v in s1.originals.iter().chain(&s2.originals) {
            assert!(!contains(b, v.as_bytes()), "PHI in a delivered file");
        }
    }
    // The inbox files are ordinary DICOM for dcmtk.
    let (ok, out) = run_tool("dcmdump", &["-q", sites.received()[0].to_str().unwrap()]);
    assert!(ok && !out.contains("E: "), "{out}");
    assert_nothing_in_clear(&sites, &[&s1, &s2]);

    // The inbox copy is the one stored copy at telerad-c: no sealed blob beside it.
    let store_c = sites.c.cfg.data_dir.join("store");
    assert!(files_under(&store_c.join("blobs")).is_empty());
    // 2. Rotation while both nodes run. What telerad-c keeps sealed of a received study: the
    // checksum list of its inbox copies.
    let blob_dir = store_c.join("sums");
    let blob = files_under(&blob_dir)[0].clone();
    let before = AtRest::key_id_of(&blob).unwrap().expect("lists are sealed");
    for node in [&sites.c, &sites.a] {
        let (code, out) = node.cli(&["keys", "rotate"]);
        assert_eq!(code, 0, "keys rotate: {out}");
        assert!(out.contains("is current"), "{out}");
    }
    let after = AtRest::key_id_of(&blob).unwrap().unwrap();
    assert_ne!(before, after, "the checksum list was not re-sealed");
    let key_text = std::fs::read_to_string(&sites.c.cfg.key_file).unwrap();
    assert!(
        key_text.contains(&before) && key_text.contains(&after),
        "old key kept"
    );
    // A new study after the rotation, by DIMSE, and the first study sent again (its inbox
    // copies are re-checked and count as held).
    let (more, s3) = study(
        &sites.dir.path().join("study-3"),
        &patient("ALDERWOOD^PIM", "MRN-AR-55012"),
        2,
        3,
    );
    sites.storescu_modality(&more);
    sites.wait_received(8);
    let (code, out) = sites.a.cli(&args);
    assert_eq!(code, 0, "re-send after rotation failed: {out}");
    assert!(out.contains("0 transferred, 3 already held"), "{out}");
    sites.a.stop();
    sites.c.stop();
    assert_nothing_in_clear(&sites, &[&s1, &s2, &s3]);
    let (code, out) = sites.c.cli(&["store", "verify"]);
    assert_eq!(code, 0, "store verify after rotation: {out}");
    assert!(
        out.contains("all intact") && out.contains("and 8 inbox copies"),
        "{out}"
    );
    for b in files_under(&blob_dir) {
        assert_eq!(
            AtRest::key_id_of(&b).unwrap().as_deref(),
            Some(after.as_str()),
            "{} is not under the new key",
            b.display()
        );
    }
    let audit = std::fs::read_to_string(sites.c.cfg.data_dir.join("audit.log")).unwrap();
    assert!(
        audit.contains("\"action\":\"keys-rotate\""),
        "rotation not audited"
    );
}

#[test]
fn damage_and_wrong_keys_name_the_item_and_lose_nothing_else() {
    // telerad-c forwards to its PACS (down for the whole test): each received instance waits as
    // a sealed blob, its one stored copy.
    let pacs_down = format!("127.0.0.1:{}", free_port());
    let mut sites = Sites::start_tuned(None, &[("MODALITY", "127.0.0.1")], None, |site, cfg| {
        if site == "telerad-c" {
            cfg.dicom.get_or_insert_with(Default::default).deliver = Some(
                pacs_broker::config::DeliverConfig::new("ORTHANC", &pacs_down),
            );
        }
    });
    let (files, _) = study(
        &sites.dir.path().join("study"),
        &patient("MARROW^IDA", "MRN-AR-31337"),
        3,
        9,
    );
    sites.storescu_modality(&files);
    let blob_dir = sites.c.cfg.data_dir.join("store").join("blobs");
    wait_for(
        "3 sealed blobs at telerad-c",
        Duration::from_secs(40),
        || files_under(&blob_dir).len() >= 3,
    );
    assert!(sites.received().is_empty(), "no inbox copy beside a PACS");
    sites.a.stop();
    sites.c.stop();

    // A wrong key file: blobs and vault records are refused by name, nothing is moved.
    let mut wrong = sites.c.cfg.clone();
    wrong.key_file = sites.dir.path().join("other.key");
    pacs_broker::pseudonym::SiteKeys::generate()
        .write_new(&wrong.key_file)
        .unwrap();
    let blobs = files_under(&sites.c.cfg.data_dir.join("store").join("blobs"));
    assert_eq!(blobs.len(), 3);
    // `store verify` under the wrong key file: every blob is named unreadable, none mismatched.
    let wrong_toml = sites.dir.path().join("telerad-c").join("wrong-key.toml");
    std::fs::write(&wrong_toml, wrong.to_toml()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args(["store", "verify", "--config"])
        .arg(&wrong_toml)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert_eq!(text.matches("UNREADABLE").count(), 3, "{text}");
    assert!(
        !text.contains("MISMATCH") && text.contains("wrong key file"),
        "{text}"
    );
    {
        let node = pacs_broker::node::Node::open(wrong).unwrap();
        let store = node.store().unwrap();
        let name = blobs[0].file_name().unwrap().to_string_lossy().to_string();
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&name, &mut sha).unwrap();
        let e = store.check_blob(&sha).unwrap_err().to_string();
        assert!(
            e.contains(&name) && e.contains("does not hold") && e.contains("wrong key file"),
            "{e}"
        );
        let e = store.read_instance(&sha).unwrap_err().to_string();
        assert!(e.contains(&name), "{e}");
    }
    assert_eq!(
        files_under(&sites.c.cfg.data_dir.join("store").join("blobs")).len(),
        3,
        "a wrong key file moved blobs"
    );

    // The vault at hospital-a: a wrong key file names the token; a corrupted record names its
    // token and the others still open.
    let tokens = {
        let a_node = pacs_broker::node::Node::open(sites.a.cfg.clone()).unwrap();
        tokens_of(&a_node)
    };
    assert!(tokens.len() >= 2, "{tokens:?}");
    {
        let mut wrong_a = sites.a.cfg.clone();
        wrong_a.key_file = sites.dir.path().join("other.key");
        let node = pacs_broker::node::Node::open(wrong_a).unwrap();
        let e = node
            .vault()
            .unwrap()
            .reidentify(AGREEMENT, &tokens[0])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&tokens[0]) && e.contains("wrong key file"),
            "{e}"
        );
    }
    {
        let tree = vault_tree(&sites.a.cfg.data_dir);
        let key = format!("{AGREEMENT}\u{1f}{}", tokens[0]);
        let mut v = tree.get(&key).unwrap().unwrap().to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x40;
        tree.insert(key.as_bytes(), v).unwrap();
        tree.flush().unwrap();
    }
    let node = pacs_broker::node::Node::open(sites.a.cfg.clone()).unwrap();
    let vault = node.vault().unwrap();
    let e = vault
        .reidentify(AGREEMENT, &tokens[0])
        .unwrap_err()
        .to_string();
    assert!(e.contains(&tokens[0]) && e.contains("damaged"), "{e}");
    for t in &tokens[1..] {
        assert!(
            vault.reidentify(AGREEMENT, t).unwrap().is_some(),
            "record {t} lost"
        );
    }
    drop(vault);
    drop(node);

    // A corrupted sealed blob: quarantined by name, its siblings intact.
    let mut bytes = std::fs::read(&blobs[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&blobs[1], bytes).unwrap();
    let (code, out) = sites.c.cli(&["store", "verify"]);
    assert_ne!(code, 0, "{out}");
    let bad = blobs[1].file_name().unwrap().to_string_lossy().to_string();
    assert!(out.contains(&bad) && out.contains("MISMATCH"), "{out}");
    assert_eq!(out.matches("MISMATCH").count(), 1, "{out}");
    let node = pacs_broker::node::Node::open(sites.c.cfg.clone()).unwrap();
    let store = node.store().unwrap();
    let mut sha = [0u8; 32];
    hex::decode_to_slice(&bad, &mut sha).unwrap();
    let e = store.read_instance(&sha).unwrap_err().to_string();
    assert!(
        e.contains(&bad) && e.contains("failed authentication"),
        "{e}"
    );
    assert!(matches!(
        store.check_blob(&sha).unwrap(),
        pacs_broker::store::BlobCheck::Quarantined(_)
    ));
    drop(store);
    drop(node);
    // A key file kept inside the data folder is refused at start.
    let mut beside = sites.c.cfg.clone();
    beside.key_file = beside.data_dir.join("site.key");
    std::fs::copy(&sites.c.cfg.key_file, &beside.key_file).unwrap();
    let e = pacs_broker::node::Node::open(beside)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("inside the data folder"), "{e}");
    let node = pacs_broker::node::Node::open(sites.c.cfg.clone()).unwrap();
    let store = node.store().unwrap();
    for b in [&blobs[0], &blobs[2]] {
        let mut sha = [0u8; 32];
        hex::decode_to_slice(b.file_name().unwrap().to_string_lossy().as_ref(), &mut sha).unwrap();
        assert!(store.read_instance(&sha).unwrap().len() > 1000);
    }
}

/// The vault's sled tree at a data folder (the node must be stopped).
fn vault_tree(data_dir: &Path) -> sled::Tree {
    let db = sled::open(data_dir.join("vault")).unwrap();
    db.open_tree("vault").unwrap()
}

#[test]
fn shredding_needs_an_ended_agreement_past_retention_and_ends_reidentification() {
    let mut sites = start_sites();
    let (files, _) = study(
        &sites.dir.path().join("study"),
        &patient("PLUMB^WREN", "MRN-AR-24680"),
        2,
        5,
    );
    sites.storescu_modality(&files);
    sites.wait_received(2);
    sites.a.stop();
    sites.c.stop();
    let cfg = sites.a.cfg.clone();
    let key_text = std::fs::read_to_string(&cfg.key_file).unwrap();
    assert!(
        key_text.contains("token_secret"),
        "no per-agreement secret was made"
    );

    // Active: refused, audited.
    let (code, out) = sites.a.cli(&["vault", "shred", "--agreement", AGREEMENT]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("is `active`") && out.contains("only an ended agreement"),
        "{out}"
    );

    // Ended (signed by all), but its 30-day retention runs from the last disclosure.
    let policy = cfg.agreements.join("test.toml");
    std::fs::write(&policy, agreement_toml("ended", "false")).unwrap();
    let _ = std::fs::remove_dir_all(pacs_broker::dsa::sign::signature_dir(&policy));
    sign_by_all(sites.dir.path(), &policy);
    let (code, out) = sites.a.cli(&["vault", "shred", "--agreement", AGREEMENT]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("30 days") && out.contains("runs until"),
        "{out}"
    );

    // 31 days on (the clock is a parameter of the library call): shredded.
    let node = pacs_broker::node::Node::open(cfg.clone()).unwrap();
    let token = tokens_of(&node)[0].clone();
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(31);
    let done = pacs_broker::custody::shred(
        &node.agreements(),
        AGREEMENT,
        &node.keys,
        || {
            node.vault()
                .map_err(|e| pacs_broker::custody::VaultOpen::Failed(e.to_string()))
        },
        &node.audit,
        "user:privacy-officer",
        later,
    )
    .unwrap();
    assert!(done.records >= 2 && !done.legacy, "{done:?}");
    let key_text = std::fs::read_to_string(&cfg.key_file).unwrap();
    assert!(
        !key_text.contains("token_secret"),
        "the token secret survived"
    );
    assert!(key_text.contains("shredded"));
    let e = node
        .vault()
        .unwrap()
        .reidentify(AGREEMENT, &token)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("agreement `{AGREEMENT}` was shredded on")),
        "{e}"
    );
    assert!(
        node.keys.tokenizer(AGREEMENT).is_err(),
        "new tokens after shred"
    );
    drop(node);
    // Through the command a person uses: the same message.
    let mut users = cfg.clone();
    users.users = vec![pacs_broker::users::UserConfig {
        name: "dr-on-duty".into(),
        roles: vec!["reidentify".into()],
    }];
    let node = pacs_broker::node::Node::open(users).unwrap();
    let req = pacs_broker::reidentify::Request {
        agreement: AGREEMENT,
        token: &token,
        user: "dr-on-duty",
        justification: "follow-up",
        purpose: None,
    };
    if let Err(e) = node.reidentify(&req) {
        let e = e.to_string();
        assert!(!e.contains("PLUMB") && !e.contains("MRN-AR-24680"), "{e}");
    } else {
        panic!("re-identified after shredding");
    }
    let audit = std::fs::read_to_string(cfg.data_dir.join("audit.log")).unwrap();
    assert!(audit.contains("\"action\":\"vault-shred\""));
    assert!(audit.contains("user:privacy-officer"));
    assert_eq!(
        audit.matches("\"action\":\"vault-shred\"").count(),
        3,
        "refusals audited too"
    );
}

fn tokens_of(node: &pacs_broker::node::Node) -> Vec<String> {
    node.vault().unwrap().tokens(AGREEMENT).unwrap()
}
