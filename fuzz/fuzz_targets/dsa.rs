//! Fuzz target for the agreement parser and its tools: any text is parsed as a DSA file; when it
//! parses, it is formatted, re-parsed (must give the same agreement), explained and linted.
//! Nothing may panic.
//!
//!     cargo install cargo-fuzz
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run dsa -- -max_total_time=60
//!
//! (Run from this folder; seed the corpus with the examples and the broken-policy corpus:
//! `mkdir -p corpus/dsa && cp ../policies/*.toml ../tests/dsa-corpus/*.toml corpus/dsa/`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacs_broker::dsa::{self, Agreement};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let today = time::macros::date!(2026 - 11 - 25);
    let _ = dsa::check("fuzz.toml", text, today);
    if let Ok(a) = Agreement::parse("fuzz.toml", text) {
        let formatted = dsa::format(&a);
        let again = Agreement::parse("formatted.toml", &formatted)
            .expect("a formatted agreement parses");
        assert_eq!(again, a, "format/parse round trip changed the agreement");
        let _ = dsa::explain::explain(&a);
    }
});
