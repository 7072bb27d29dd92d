//! Any bytes as a GGUF file, through every variant.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use modelcache_quant::{Format, Provenance, Variant, gguf};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    let variant = Variant::ALL[selector as usize % Variant::ALL.len()];
    let provenance = Provenance {
        source_sha256: String::new(),
        variant,
        format: Format::Gguf,
    };
    let len = file.len() as u64;
    let _ = gguf::transform(Cursor::new(file), len, std::io::sink(), variant, &provenance);
});
