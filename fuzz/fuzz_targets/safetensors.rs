//! Any bytes as a safetensors file, through every variant that applies.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use modelcache_quant::{Format, Provenance, Variant, safetensors};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    let variant = [Variant::Int8, Variant::Fp16, Variant::Bf16][selector as usize % 3];
    let provenance = Provenance {
        source_sha256: String::new(),
        variant,
        format: Format::Safetensors,
    };
    let len = file.len() as u64;
    if let Ok(layout) = safetensors::transform(Cursor::new(file), len, std::io::sink(), variant, &provenance) {
        let index = br#"{"metadata":{},"weight_map":{}}"#;
        let _ = safetensors::rewrite_index(index, &[("model.safetensors".into(), layout.clone())]);
        let _ = safetensors::rewrite_config(b"{}", &[&layout]);
    }
});
