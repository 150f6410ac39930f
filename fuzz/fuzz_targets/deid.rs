//! Fuzz target for the de-identification entry point: any bytes are read as a DICOM file and,
//! if they parse, de-identified with every option; the output, if released, is re-encoded and
//! re-checked. Nothing may panic.
//!
//!     cargo install cargo-fuzz
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run deid -- -max_total_time=60
//!
//! (Run from this folder; seed the corpus with pydicom's test files for faster coverage:
//! `mkdir -p corpus/deid && cp /usr/lib/python3/dist-packages/pydicom/data/test_files/*.dcm corpus/deid/`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacs_broker::deid::{check_release_file, DeidConfig, Deidentifier, ProfileOption};
use pacs_broker::pseudonym::SiteKeys;

fuzz_target!(|data: &[u8]| {
    // The node refuses, before parsing, a file whose declared lengths run past its end.
    if pacs_broker::deid::guard::check_declared_lengths(&mut std::io::Cursor::new(data)).is_err() {
        return;
    }
    let body = data.get(128..).unwrap_or(data);
    let Ok(obj) = dicom_object::OpenFileOptions::new().from_reader(body) else {
        return;
    };
    let all = DeidConfig {
        options: ProfileOption::ALL
            .into_iter()
            .filter(|o| *o != ProfileOption::RetainUids)
            .collect(),
        ..DeidConfig::default()
    };
    for config in [DeidConfig::default(), all] {
        let deid = Deidentifier::new(
            config.clone(),
            SiteKeys::from_bytes([1; 32], [2; 32]).tokenizer("FUZZ"),
        );
        if let Ok(d) = deid.deidentify(obj.clone()) {
            assert!(
                check_release_file(&d.object, &config).is_ok(),
                "released output fails the release check"
            );
            let mut out = Vec::new();
            let _ = d.object.write_all(&mut out);
        }
    }
});
