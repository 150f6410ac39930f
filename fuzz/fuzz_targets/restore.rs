//! Fuzz target for the return path at the origin: any bytes are read as a returned result (the
//! guard's length check, then the parser) and re-identified against a vault that knows one
//! patient and one study; nothing may panic, and no error may name an original value.
//!
//!     cargo install cargo-fuzz
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run restore -- -max_total_time=60
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacs_broker::deid::patient_detail_token;
use pacs_broker::pseudonym::{SiteKeys, Vault, VaultEntry};
use pacs_broker::results::restore::{restore, RestoreContext};

const ORIGINALS: [&str; 3] = [
    "MRN-FUZZ-1",
    "FUZZ^PATIENT",
    "1.2.826.0.1.3680043.10.1432.1.9",
];

fuzz_target!(|data: &[u8]| {
    if pacs_broker::deid::guard::check_declared_lengths(&mut std::io::Cursor::new(data)).is_err() {
        return;
    }
    let body = data.get(128..).unwrap_or(data);
    let Ok(obj) = dicom_object::OpenFileOptions::new().from_reader(body) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = SiteKeys::from_bytes([1; 32], [2; 32]);
    let vault = Vault::new(
        &keys,
        sled::Config::new()
            .temporary(true)
            .path(dir.path())
            .open()
            .unwrap()
            .open_tree("v")
            .unwrap(),
    );
    let tok = keys.tokenizer("FUZZ");
    let patient = tok.token("PatientID", ORIGINALS[0]);
    let record = |t: &str, attribute: &str, original: &str| {
        let e = VaultEntry {
            attribute: attribute.into(),
            original: original.into(),
        };
        vault.record("FUZZ", t, &e).unwrap();
    };
    record(&patient, "PatientID", ORIGINALS[0]);
    record(
        &patient_detail_token(&patient, "PatientName"),
        "PatientName",
        ORIGINALS[1],
    );
    record(&tok.uid(ORIGINALS[2]), "StudyInstanceUID", ORIGINALS[2]);
    let cx = RestoreContext {
        agreement: "FUZZ",
        vault: &vault,
        tokenizer: &tok,
        shift_dates: true,
    };
    let mut obj = obj.into_inner();
    if let Err(e) = restore(&mut obj, &cx) {
        let e = e.to_string();
        for o in ORIGINALS {
            assert!(!e.contains(o), "an error names an original: {e}");
        }
    }
});
