//! Any bytes as an ONNX model: the quantizer returns a result (usually an error) and never
//! panics, hangs or allocates beyond what the input accounts for.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use modelcache_quant::{Format, Provenance, QuantError, Variant, onnx};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, model)) = data.split_first() else {
        return;
    };
    let variant = [Variant::Int8, Variant::Fp16, Variant::Int4][selector as usize % 3];
    let provenance = Provenance {
        source_sha256: String::new(),
        variant,
        format: Format::Onnx,
    };
    let mut no_external = |_: &str| Err(QuantError::invalid("no external data"));
    if let Ok(model) = onnx::Model::decode(Bytes::copy_from_slice(model)) {
        let _ = model.external_locations();
        let _ = model.transform(variant, &provenance, &mut no_external);
    }
});
