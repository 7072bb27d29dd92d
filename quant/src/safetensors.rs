//! safetensors: F32 → F16 (`fp16`), F32/F16 → BF16 (`bf16`), and int8 in the
//! compressed-tensors `naive-quantized` channel layout (`int8`), streamed tensor by tensor.
//!
//! The header is read once (its length is checked against the file and a cap before it is
//! allocated), every tensor's offsets are checked against its dtype, shape and the file,
//! and then each tensor is read, converted and written in turn, so memory stays at one
//! tensor plus the header.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};

use serde_json::{Map, Value, json};

use crate::num;
use crate::{Provenance, QuantError, Result, Variant};

/// Largest header accepted (the reference implementation's own limit).
const MAX_HEADER: u64 = 100 * 1024 * 1024;
/// Tensors with fewer elements stay as they are (biases, norms).
const MIN_QUANTIZED_ELEMENTS: u64 = 1024;

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Byte range inside the data section.
    pub begin: u64,
    pub end: u64,
}

/// A parsed header.
#[derive(Clone, Debug)]
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    /// Sorted by `begin`.
    pub tensors: Vec<Tensor>,
    /// Where the data section starts in the file.
    pub data_start: u64,
}

/// Reads and checks the header of a file of `len` bytes.
pub fn read_header<R: Read>(mut input: R, len: u64) -> Result<Header> {
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(QuantError::invalid(format!(
            "{len} bytes is too short for a safetensors file"
        )));
    }
    input
        .read_exact(&mut n)
        .map_err(|e| QuantError::io("reading the header length", e))?;
    let n = u64::from_le_bytes(n);
    if n > len - 8 || n > MAX_HEADER {
        return Err(QuantError::invalid(format!(
            "header length {n} does not fit a {len}-byte file"
        )));
    }
    let mut text = vec![0; n as usize];
    input
        .read_exact(&mut text)
        .map_err(|e| QuantError::io("reading the header", e))?;
    let json: Map<String, Value> = serde_json::from_slice(&text)
        .map_err(|e| QuantError::invalid(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            metadata = read_metadata(&entry)?;
        } else {
            tensors.push(read_tensor(name, &entry, data_len)?);
        }
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    for pair in tensors.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(QuantError::invalid(format!(
                "tensors {:?} and {:?} overlap",
                pair[0].name, pair[1].name
            )));
        }
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

/// The `__metadata__` entry: a map of strings.
fn read_metadata(entry: &Value) -> Result<BTreeMap<String, String>> {
    let map = entry
        .as_object()
        .ok_or_else(|| QuantError::invalid("__metadata__ is not an object"))?;
    map.iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .ok_or_else(|| QuantError::invalid(format!("__metadata__.{k} is not a string")))?;
            Ok((k.clone(), v.to_owned()))
        })
        .collect()
}

/// One tensor's entry, checked against the `data_len`-byte data section: a known dtype,
/// a shape whose size does not overflow, and offsets that cover exactly that size.
fn read_tensor(name: String, entry: &Value, data_len: u64) -> Result<Tensor> {
    let bad = |why: &str| QuantError::invalid(format!("tensor {name:?}: {why}"));
    let dtype = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no dtype"))?
        .to_owned();
    let size = dtype_size(&dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype}")))?;
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| bad("shape is not a list of sizes"))
        })
        .collect::<Result<Vec<u64>>>()?;
    let (begin, end) = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
        .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
    let bytes = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    if begin > end || end > data_len {
        return Err(bad(&format!(
            "data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section"
        )));
    }
    if end - begin != bytes {
        return Err(bad(&format!(
            "data_offsets cover {} bytes but {dtype} {shape:?} needs {bytes}",
            end - begin
        )));
    }
    Ok(Tensor {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// How one input tensor is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conversion {
    Keep,
    /// To another float dtype.
    Float(&'static str),
    /// int8 codes `[out, in]` plus `<name>_scale` `[out, 1]` in the input dtype.
    Int8,
}

fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F32" | "F16" | "BF16")
}

/// Layers that are not Linear even though their weight is a matrix.
fn is_embedding(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["embed", "wte.", "wpe.", "lm_head", "shared.weight"]
        .iter()
        .any(|p| lower.contains(p))
}

pub fn conversion(t: &Tensor, variant: Variant) -> Conversion {
    match variant {
        Variant::Fp16 if t.dtype == "F32" => Conversion::Float("F16"),
        Variant::Bf16 if t.dtype == "F32" || t.dtype == "F16" => Conversion::Float("BF16"),
        Variant::Int8
            if is_float(&t.dtype)
                && t.shape.len() == 2
                && t.name.ends_with(".weight")
                && !is_embedding(&t.name)
                && t.shape.iter().product::<u64>() >= MIN_QUANTIZED_ELEMENTS =>
        {
            Conversion::Int8
        }
        _ => Conversion::Keep,
    }
}

/// The output's tensors (name, dtype, shape, byte size) for `variant`, in file order.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub tensors: Vec<(String, String, Vec<u64>, u64)>,
    /// Layers (weight name without `.weight`) stored as int8.
    pub quantized: Vec<String>,
    /// Matrix layers kept in float (embeddings, heads).
    pub ignored: Vec<String>,
}

impl Layout {
    pub fn total_size(&self) -> u64 {
        self.tensors.iter().map(|t| t.3).sum()
    }
}

pub fn layout(header: &Header, variant: Variant) -> Layout {
    let mut out = Layout::default();
    for t in &header.tensors {
        let elements: u64 = t.shape.iter().product();
        match conversion(t, variant) {
            Conversion::Keep => {
                if variant == Variant::Int8
                    && t.shape.len() == 2
                    && is_float(&t.dtype)
                    && let Some(layer) = t.name.strip_suffix(".weight")
                {
                    out.ignored.push(layer.to_owned());
                }
                out.tensors.push((
                    t.name.clone(),
                    t.dtype.clone(),
                    t.shape.clone(),
                    t.end - t.begin,
                ));
            }
            Conversion::Float(dtype) => {
                out.tensors.push((
                    t.name.clone(),
                    dtype.to_owned(),
                    t.shape.clone(),
                    elements * 2,
                ));
            }
            Conversion::Int8 => {
                let rows = t.shape[0];
                let scale_size = rows * dtype_size(&t.dtype).expect("float dtype");
                out.tensors
                    .push((t.name.clone(), "I8".into(), t.shape.clone(), elements));
                out.tensors.push((
                    format!("{}_scale", t.name),
                    t.dtype.clone(),
                    vec![rows, 1],
                    scale_size,
                ));
                out.quantized
                    .push(t.name.trim_end_matches(".weight").to_owned());
            }
        }
    }
    out
}

fn decode(dtype: &str, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        "F16" => num::f16_values(bytes),
        "BF16" => num::bf16_values(bytes),
        _ => num::f32_values(bytes),
    }
}

fn encode(dtype: &str, values: &[f32]) -> Vec<u8> {
    match dtype {
        "F16" => num::f16_bytes(values),
        "BF16" => num::bf16_bytes(values),
        _ => num::f32_bytes(values),
    }
}

/// Writes `variant` of the safetensors file `input` (`len` bytes) to `output`.
pub fn transform<R: Read + Seek, W: Write>(
    mut input: R,
    len: u64,
    mut output: W,
    variant: Variant,
    provenance: &Provenance,
) -> Result<Layout> {
    input
        .seek(SeekFrom::Start(0))
        .map_err(|e| QuantError::io("seeking", e))?;
    let header = read_header(&mut input, len)?;
    let layout = layout(&header, variant);
    let mut json = Map::new();
    let mut metadata: Map<String, Value> = header
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("modelcache."))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for (k, v) in provenance.pairs() {
        metadata.insert(k, Value::String(v));
    }
    json.insert("__metadata__".into(), Value::Object(metadata));
    let mut offset = 0u64;
    for (name, dtype, shape, size) in &layout.tensors {
        json.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
    }
    let mut text = serde_json::to_vec(&json).expect("JSON of strings and numbers");
    // The reference writer pads the header with spaces so the data starts 8-byte aligned.
    text.resize(text.len().next_multiple_of(8), b' ');
    let put = |out: &mut W, bytes: &[u8]| {
        out.write_all(bytes)
            .map_err(|e| QuantError::io("writing the variant", e))
    };
    put(&mut output, &(text.len() as u64).to_le_bytes())?;
    put(&mut output, &text)?;
    for t in &header.tensors {
        input
            .seek(SeekFrom::Start(header.data_start + t.begin))
            .map_err(|e| QuantError::io("seeking to a tensor", e))?;
        let mut data = vec![0; (t.end - t.begin) as usize];
        input
            .read_exact(&mut data)
            .map_err(|e| QuantError::io(format!("reading tensor {:?}", t.name), e))?;
        match conversion(t, variant) {
            Conversion::Keep => put(&mut output, &data)?,
            Conversion::Float(dtype) => put(&mut output, &encode(dtype, &decode(&t.dtype, &data)))?,
            Conversion::Int8 => {
                let dims = [t.shape[0] as usize, t.shape[1] as usize];
                let view = num::ChannelView::new(&dims, 0);
                let (scales, codes) = if t.dtype == "F32" {
                    num::quantize_per_channel(&num::LeF32(&data), view, num::INT8_MAX)
                } else {
                    let values = decode(&t.dtype, &data);
                    drop(data);
                    num::quantize_per_channel(&values[..], view, num::INT8_MAX)
                };
                let codes: Vec<u8> = codes.into_iter().map(|c| c as u8).collect();
                put(&mut output, &codes)?;
                put(&mut output, &encode(&t.dtype, &scales))?;
            }
        }
    }
    Ok(layout)
}

/// `model.safetensors.index.json` rewritten for the shards' new layouts
/// (`(shard file name, layout)`): every output tensor mapped to its shard, and
/// `metadata.total_size` the sum of the tensors' sizes.
pub fn rewrite_index(index: &[u8], shards: &[(String, Layout)]) -> Result<Vec<u8>> {
    let mut json: Map<String, Value> = serde_json::from_slice(index)
        .map_err(|e| QuantError::invalid(format!("not a JSON object: {e}")))?;
    let old = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| QuantError::invalid("no weight_map object"))?;
    let mut map = Map::new();
    let rewritten: Vec<&str> = shards.iter().map(|(f, _)| f.as_str()).collect();
    for (name, file) in old {
        if file.as_str().is_none_or(|f| !rewritten.contains(&f)) {
            map.insert(name.clone(), file.clone());
        }
    }
    for (file, layout) in shards {
        for (name, ..) in &layout.tensors {
            map.insert(name.clone(), Value::String(file.clone()));
        }
    }
    let total: u64 = shards.iter().map(|(_, l)| l.total_size()).sum();
    let metadata = json
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = metadata.as_object_mut() {
        m.insert("total_size".into(), json!(total));
    }
    json.insert("weight_map".into(), Value::Object(map));
    Ok(serde_json::to_vec_pretty(&json).expect("JSON"))
}

/// `config.json` with the compressed-tensors `quantization_config` that describes the
/// int8 channel layout (what vLLM and transformers read to load it).
pub fn rewrite_config(config: &[u8], layouts: &[&Layout]) -> Result<Vec<u8>> {
    let mut json: Map<String, Value> = serde_json::from_slice(config)
        .map_err(|e| QuantError::invalid(format!("not a JSON object: {e}")))?;
    let mut ignore: Vec<&str> = layouts
        .iter()
        .flat_map(|l| l.ignored.iter().map(String::as_str))
        .collect();
    ignore.sort_unstable();
    ignore.dedup();
    json.insert(
        "quantization_config".into(),
        json!({
            "quant_method": "compressed-tensors",
            "format": "naive-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": true,
                        "strategy": "channel",
                        "dynamic": false,
                        "group_size": null,
                        "observer": "mse",
                    },
                    "input_activations": null,
                    "output_activations": null,
                }
            },
            "ignore": ignore,
            "modelcache_quantizer_version": crate::QUANTIZER_VERSION,
        }),
    );
    Ok(serde_json::to_vec_pretty(&json).expect("JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;
    use std::io::Cursor;

    pub(crate) fn sample(tensors: &[(&str, &[u64], Vec<f32>)]) -> Vec<u8> {
        let mut json = Map::new();
        let mut offset = 0u64;
        for (name, shape, values) in tensors {
            let size = values.len() as u64 * 4;
            json.insert(
                name.to_string(),
                json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}),
            );
            offset += size;
        }
        let text = serde_json::to_vec(&json).unwrap();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        for (_, _, values) in tensors {
            out.extend(num::f32_bytes(values));
        }
        out
    }

    fn provenance(variant: Variant) -> Provenance {
        Provenance {
            source_sha256: "ab".repeat(32),
            variant,
            format: Format::Safetensors,
        }
    }

    #[test]
    fn int8_writes_codes_and_channel_scales() {
        let w: Vec<f32> = (0..64 * 32)
            .map(|i| ((i % 7) as f32 - 3.0) * if i < 32 * 32 { 0.001 } else { 1.0 })
            .collect();
        let file = sample(&[
            ("layer.0.fc.weight", &[64, 32], w.clone()),
            ("layer.0.fc.bias", &[64], vec![0.1; 64]),
        ]);
        let mut out = Vec::new();
        let layout = transform(
            Cursor::new(&file),
            file.len() as u64,
            &mut out,
            Variant::Int8,
            &provenance(Variant::Int8),
        )
        .unwrap();
        assert_eq!(layout.quantized, vec!["layer.0.fc"]);
        let header = read_header(Cursor::new(&out), out.len() as u64).unwrap();
        assert_eq!(header.data_start % 8, 0);
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layer.0.fc.weight",
                "layer.0.fc.weight_scale",
                "layer.0.fc.bias"
            ]
        );
        let scale = &header.tensors[1];
        assert_eq!(
            (scale.dtype.as_str(), scale.shape.clone()),
            ("F32", vec![64, 1])
        );
        let data = &out[header.data_start as usize..];
        let scales = num::f32_values(&data[scale.begin as usize..scale.end as usize]);
        for (i, &v) in w.iter().enumerate() {
            let q = data[i] as i8 as f32 * scales[i / 32];
            assert!((q - v).abs() <= scales[i / 32] * 0.51 + 1e-6, "{i}");
        }
        assert_eq!(header.metadata["modelcache.variant"], "int8");
    }

    #[test]
    fn lying_offsets_are_errors() {
        let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,4000]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header);
        file.extend([0u8; 16]);
        let err = read_header(Cursor::new(&file), file.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside"), "{err}");
        let short = sample(&[("w", &[2, 2], vec![1.0; 4])]);
        let err = read_header(Cursor::new(&short[..20]), 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
