//! Differential fuzz target for the pixel-data pass-through: any bytes are written to a file and
//! de-identified twice, once parsed whole and once with the pixel data left in the file and
//! copied into the output. Nothing may panic, and whenever the fast path is taken both outputs
//! must be the same bytes.
//!
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run passthrough -- -max_total_time=60
//!
//! (Run from this folder; `corpus/deid` makes a good seed corpus: `cp -r corpus/deid corpus/passthrough`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacs_broker::deid::batch::{encode_file, encode_output, read_and_deidentify};
use pacs_broker::deid::guard::read_guarded;
use pacs_broker::deid::{DeidConfig, Deidentifier};
use pacs_broker::pseudonym::SiteKeys;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if std::io::Write::write_all(&mut file, data).is_err() {
        return;
    }
    let deid = Deidentifier::new(
        DeidConfig::default(),
        SiteKeys::from_bytes([1; 32], [2; 32]).tokenizer("FUZZ"),
    );
    let split = read_and_deidentify(&deid, file.path(), |_| Ok(()));
    let Ok(whole) = read_guarded(file.path()) else {
        assert!(split.is_err(), "the fast path read a file the guard refuses");
        return;
    };
    let (Ok(split), Ok(whole)) = (split, deid.deidentify(whole)) else {
        return;
    };
    if split.pixel_data.is_none() {
        return;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let fast = encode_output(split.object, split.pixel_data.as_ref(), &mut a);
    let slow = encode_file(whole.object, &mut b);
    if let (Ok(()), Ok(())) = (fast, slow) {
        assert!(a == b, "the pass-through output differs from the full parse");
    }
});
