//! The config loader reads files an operator (or a bad merge) wrote: any
//! text must come back as a config or as diagnostics, never as a panic. A
//! config that loads must also print (`umbra validate`'s summary).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `load` reads files the same way: bytes, then UTF-8 with replacement.
    let text = String::from_utf8_lossy(data);
    match umbra::config::load_str("fuzz.yaml", &text) {
        Ok(config) => {
            let _ = umbra::config::summary(&config);
        }
        Err(errors) => {
            // Every load error carries at least one message, each printable.
            assert!(!errors.errors.is_empty());
            let _ = errors.to_string();
        }
    }
});
