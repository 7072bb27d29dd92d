//! GGUF (v2, v3): F32/F16 tensors to F16, BF16, Q8_0 or Q4_0, streamed tensor by tensor.
//!
//! The header (key/values and tensor infos) is read through a reader that refuses to read
//! past the end of the file, so a length field can never make it allocate more than the
//! file holds. Tensor data is read one tensor at a time, converted and written out in
//! tensor-info order at offsets aligned to `general.alignment` (default 32).

use std::io::{Read, Seek, SeekFrom, Write};

use crate::num;
use crate::{Provenance, QuantError, Result, Variant};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;
/// Nesting of arrays inside arrays that is accepted.
const MAX_ARRAY_DEPTH: usize = 3;
/// `general.quantization_version` written with quantized tensors (ggml's current one).
const QUANTIZATION_VERSION: u32 = 2;

const T_UINT8: u32 = 0;
const T_INT8: u32 = 1;
const T_UINT16: u32 = 2;
const T_INT16: u32 = 3;
const T_UINT32: u32 = 4;
const T_INT32: u32 = 5;
const T_FLOAT32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_UINT64: u32 = 10;
const T_INT64: u32 = 11;
const T_FLOAT64: u32 = 12;

/// ggml tensor types with their (elements per block, bytes per block).
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q8_0: u32 = 8;
pub const GGML_BF16: u32 = 30;

fn type_layout(t: u32) -> Option<(u64, u64, &'static str)> {
    Some(match t {
        0 => (1, 4, "F32"),
        1 => (1, 2, "F16"),
        2 => (32, 18, "Q4_0"),
        3 => (32, 20, "Q4_1"),
        6 => (32, 22, "Q5_0"),
        7 => (32, 24, "Q5_1"),
        8 => (32, 34, "Q8_0"),
        9 => (32, 36, "Q8_1"),
        10 => (256, 84, "Q2_K"),
        11 => (256, 110, "Q3_K"),
        12 => (256, 144, "Q4_K"),
        13 => (256, 176, "Q5_K"),
        14 => (256, 210, "Q6_K"),
        15 => (256, 292, "Q8_K"),
        20 => (32, 18, "IQ4_NL"),
        24 => (1, 1, "I8"),
        25 => (1, 2, "I16"),
        26 => (1, 4, "I32"),
        27 => (1, 8, "I64"),
        28 => (1, 8, "F64"),
        30 => (1, 2, "BF16"),
        _ => return None,
    })
}

/// A reader that knows the file's length and refuses reads past it.
struct Src<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Src<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len - self.pos {
            return Err(QuantError::invalid(format!(
                "{what} at byte {} needs {n} bytes but the file ends at {}",
                self.pos, self.len
            )));
        }
        let mut buf = vec![0; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| QuantError::io(format!("reading {what}"), e))?;
        self.pos += n;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn string(&mut self, what: &str) -> Result<Vec<u8>> {
        let n = self.u64(what)?;
        self.bytes(n, what)
    }

    /// Reads one value of type `t` and appends its encoding to `raw`.
    fn value(&mut self, t: u32, raw: &mut Vec<u8>, depth: usize) -> Result<()> {
        let fixed = match t {
            T_UINT8 | T_INT8 | T_BOOL => Some(1),
            T_UINT16 | T_INT16 => Some(2),
            T_UINT32 | T_INT32 | T_FLOAT32 => Some(4),
            T_UINT64 | T_INT64 | T_FLOAT64 => Some(8),
            _ => None,
        };
        if let Some(n) = fixed {
            raw.extend(self.bytes(n, "a value")?);
            return Ok(());
        }
        match t {
            T_STRING => {
                let s = self.string("a string value")?;
                raw.extend((s.len() as u64).to_le_bytes());
                raw.extend(s);
            }
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(QuantError::invalid("arrays nested too deeply"));
                }
                let item = self.u32("an array's item type")?;
                let count = self.u64("an array's length")?;
                // Every item takes at least one byte: a count beyond what is left is a lie.
                if count > self.len - self.pos {
                    return Err(QuantError::invalid(format!(
                        "an array claims {count} items but only {} bytes are left",
                        self.len - self.pos
                    )));
                }
                raw.extend(item.to_le_bytes());
                raw.extend(count.to_le_bytes());
                for _ in 0..count {
                    self.value(item, raw, depth + 1)?;
                }
            }
            other => {
                return Err(QuantError::invalid(format!("unknown value type {other}")));
            }
        }
        Ok(())
    }
}

struct KeyValue {
    key: Vec<u8>,
    /// Value type followed by the value's encoding.
    raw: Vec<u8>,
}

impl KeyValue {
    fn u32_value(&self) -> Option<u32> {
        let t = u32::from_le_bytes(self.raw.get(..4)?.try_into().ok()?);
        (t == T_UINT32).then(|| u32::from_le_bytes(self.raw[4..8].try_into().expect("4 bytes")))
    }

    fn new_u32(key: &str, v: u32) -> Self {
        let mut raw = T_UINT32.to_le_bytes().to_vec();
        raw.extend(v.to_le_bytes());
        Self {
            key: key.as_bytes().to_vec(),
            raw,
        }
    }

    fn new_string(key: &str, v: &str) -> Self {
        let mut raw = T_STRING.to_le_bytes().to_vec();
        raw.extend((v.len() as u64).to_le_bytes());
        raw.extend(v.as_bytes());
        Self {
            key: key.as_bytes().to_vec(),
            raw,
        }
    }
}

/// One tensor as the header describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Relative to the start of the data section.
    pub offset: u64,
    pub size: u64,
}

/// A parsed GGUF header.
pub struct Header {
    pub version: u32,
    kvs: Vec<KeyValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_start: u64,
}

impl Header {
    /// Keys of the header's key/values, lossily decoded.
    pub fn keys(&self) -> impl Iterator<Item = String> + '_ {
        self.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
    }
}

fn tensor_size(name: &str, dims: &[u64], t: u32) -> Result<u64> {
    let (block, bytes, type_name) = type_layout(t).ok_or_else(|| {
        QuantError::invalid(format!("tensor {name:?} has unknown tensor type {t}"))
    })?;
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| QuantError::invalid(format!("tensor {name:?}: dimensions overflow")))?;
    if dims.first().is_some_and(|d| d % block != 0) {
        return Err(QuantError::invalid(format!(
            "tensor {name:?}: rows of {} elements are not whole {type_name} blocks of {block}",
            dims[0]
        )));
    }
    (elements / block)
        .checked_mul(bytes)
        .ok_or_else(|| QuantError::invalid(format!("tensor {name:?}: size overflows")))
}

/// Reads and checks a GGUF header: every tensor's data must lie inside the file.
pub fn read_header<R: Read>(input: R, len: u64) -> Result<Header> {
    let mut src = Src {
        inner: input,
        pos: 0,
        len,
    };
    if src.bytes(4, "the magic")? != MAGIC {
        return Err(QuantError::invalid("not a GGUF file (no GGUF magic)"));
    }
    let version = src.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(QuantError::invalid(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    let tensor_count = src.u64("the tensor count")?;
    let kv_count = src.u64("the key/value count")?;
    // Each key/value and tensor info takes well over 8 bytes.
    if tensor_count.saturating_add(kv_count) > len / 8 {
        return Err(QuantError::invalid(format!(
            "header claims {kv_count} key/values and {tensor_count} tensors, more than a {len}-byte file holds"
        )));
    }
    let mut kvs = Vec::with_capacity(kv_count as usize);
    for _ in 0..kv_count {
        let key = src.string("a key")?;
        let t = src.u32("a value type")?;
        let mut raw = t.to_le_bytes().to_vec();
        src.value(t, &mut raw, 0).map_err(|e| {
            QuantError::invalid(format!("key {:?}: {e}", String::from_utf8_lossy(&key)))
        })?;
        kvs.push(KeyValue { key, raw });
    }
    let alignment = match kvs.iter().find(|kv| kv.key == b"general.alignment") {
        Some(kv) => kv
            .u32_value()
            .map(u64::from)
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                QuantError::invalid("general.alignment is not a power of two (uint32)")
            })?,
        None => DEFAULT_ALIGNMENT,
    };
    let tensors = (0..tensor_count)
        .map(|_| read_tensor_info(&mut src))
        .collect::<Result<Vec<_>>>()?;
    let data_start = src.pos.next_multiple_of(alignment);
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(QuantError::invalid(format!(
                "tensor {:?} starts at {} which is not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size));
        if end.is_none_or(|e| e > len) {
            return Err(QuantError::invalid(format!(
                "tensor {:?} ({} bytes at offset {}) lies past the end of the file ({len} bytes)",
                t.name, t.size, t.offset
            )));
        }
    }
    Ok(Header {
        version,
        kvs,
        tensors,
        alignment,
        data_start,
    })
}

/// One tensor's info: name, dimensions, type and offset, with its size in bytes.
fn read_tensor_info<R: Read>(src: &mut Src<R>) -> Result<TensorInfo> {
    let name = String::from_utf8_lossy(&src.string("a tensor name")?).into_owned();
    let n_dims = src.u32("a tensor's dimension count")?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(QuantError::invalid(format!(
            "tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        )));
    }
    let dims = (0..n_dims)
        .map(|_| src.u64("a tensor dimension"))
        .collect::<Result<Vec<_>>>()?;
    let ggml_type = src.u32("a tensor type")?;
    let offset = src.u64("a tensor offset")?;
    let size = tensor_size(&name, &dims, ggml_type)?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        size,
    })
}

/// The ggml type `variant` turns a tensor of type `t` and shape `dims` into, if any.
fn target_type(variant: Variant, t: u32, dims: &[u64]) -> Option<u32> {
    let float = t == GGML_F32 || t == GGML_F16;
    // A tensor with a zero dimension has no values to convert.
    if !float || dims.len() < 2 || dims.contains(&0) {
        return None;
    }
    let target = match variant {
        Variant::Fp16 => GGML_F16,
        Variant::Bf16 => GGML_BF16,
        Variant::Int8 | Variant::Q8_0 => GGML_Q8_0,
        Variant::Int4 | Variant::Q4_0 => GGML_Q4_0,
    };
    if target == t {
        return None;
    }
    let blocked = target == GGML_Q8_0 || target == GGML_Q4_0;
    if blocked && !dims[0].is_multiple_of(num::GGML_BLOCK as u64) {
        return None;
    }
    Some(target)
}

fn file_type(variant: Variant) -> u32 {
    match variant {
        Variant::Fp16 => 1,
        Variant::Bf16 => 32,
        Variant::Int8 | Variant::Q8_0 => 7,
        Variant::Int4 | Variant::Q4_0 => 2,
    }
}

/// What a transform did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub converted: usize,
    pub kept: usize,
    pub bytes_written: u64,
}

fn convert(data: &[u8], from: u32, to: u32, row: usize) -> Vec<u8> {
    let values = if from == GGML_F16 {
        num::f16_values(data)
    } else {
        num::f32_values(data)
    };
    match to {
        GGML_F16 => num::f16_bytes(&values),
        GGML_BF16 => num::bf16_bytes(&values),
        GGML_Q8_0 | GGML_Q4_0 => {
            let (block, bytes, _) = type_layout(to).expect("known type");
            let mut out = Vec::with_capacity(values.len() / block as usize * bytes as usize);
            for r in values.chunks(row) {
                if to == GGML_Q8_0 {
                    num::q8_0_row(r, &mut out);
                } else {
                    num::q4_0_row(r, &mut out);
                }
            }
            out
        }
        _ => unreachable!("only float and Q8_0/Q4_0 targets are produced"),
    }
}

struct Counter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Counter<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .map_err(|e| QuantError::io("writing the variant", e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, alignment: u64) -> Result<()> {
        let pad = self.written.next_multiple_of(alignment) - self.written;
        self.put(&vec![0; pad as usize])
    }
}

/// Writes `variant` of the GGUF file `input` (`len` bytes) to `output`.
pub fn transform<R: Read + Seek, W: Write>(
    mut input: R,
    len: u64,
    output: W,
    variant: Variant,
    provenance: &Provenance,
) -> Result<Summary> {
    input
        .seek(SeekFrom::Start(0))
        .map_err(|e| QuantError::io("seeking", e))?;
    let header = read_header(&mut input, len)?;
    let mut plan = Vec::with_capacity(header.tensors.len());
    let mut offset = 0u64;
    for t in &header.tensors {
        let target = target_type(variant, t.ggml_type, &t.dims);
        let ty = target.unwrap_or(t.ggml_type);
        let size = tensor_size(&t.name, &t.dims, ty)?;
        plan.push((target, ty, offset));
        offset = (offset + size).next_multiple_of(header.alignment);
    }
    let mut kvs: Vec<KeyValue> = header
        .kvs
        .into_iter()
        .filter(|kv| {
            !kv.key.starts_with(b"modelcache.")
                && kv.key != b"general.quantization_version"
                && kv.key != b"general.file_type"
        })
        .collect();
    kvs.push(KeyValue::new_u32(
        "general.quantization_version",
        QUANTIZATION_VERSION,
    ));
    kvs.push(KeyValue::new_u32("general.file_type", file_type(variant)));
    for (k, v) in provenance.pairs() {
        kvs.push(KeyValue::new_string(&k, &v));
    }

    let mut out = Counter {
        inner: output,
        written: 0,
    };
    out.put(MAGIC)?;
    out.put(&header.version.to_le_bytes())?;
    out.put(&(header.tensors.len() as u64).to_le_bytes())?;
    out.put(&(kvs.len() as u64).to_le_bytes())?;
    for kv in &kvs {
        out.put(&(kv.key.len() as u64).to_le_bytes())?;
        out.put(&kv.key)?;
        out.put(&kv.raw)?;
    }
    for (t, (_, ty, off)) in header.tensors.iter().zip(&plan) {
        out.put(&(t.name.len() as u64).to_le_bytes())?;
        out.put(t.name.as_bytes())?;
        out.put(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            out.put(&d.to_le_bytes())?;
        }
        out.put(&ty.to_le_bytes())?;
        out.put(&off.to_le_bytes())?;
    }
    out.pad_to(header.alignment)?;
    let data_start = out.written;
    let mut summary = Summary::default();
    for (t, (target, _, off)) in header.tensors.iter().zip(&plan) {
        debug_assert_eq!(out.written - data_start, *off);
        input
            .seek(SeekFrom::Start(header.data_start + t.offset))
            .map_err(|e| QuantError::io("seeking to a tensor", e))?;
        let mut data = vec![0; t.size as usize];
        input
            .read_exact(&mut data)
            .map_err(|e| QuantError::io(format!("reading tensor {:?}", t.name), e))?;
        match target {
            Some(to) => {
                out.put(&convert(&data, t.ggml_type, *to, t.dims[0] as usize))?;
                summary.converted += 1;
            }
            None => {
                out.put(&data)?;
                summary.kept += 1;
            }
        }
        out.pad_to(header.alignment)?;
    }
    summary.bytes_written = out.written;
    Ok(summary)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Format;
    use std::io::Cursor;

    fn provenance(variant: Variant) -> Provenance {
        Provenance {
            source_sha256: "00".repeat(32),
            variant,
            format: Format::Gguf,
        }
    }

    /// A GGUF with one key/value and the given F32 tensors.
    /// `file` transformed to `variant`, and what the transform reported.
    fn convert(file: &[u8], variant: Variant) -> (Vec<u8>, Summary) {
        let mut out = Vec::new();
        let summary = transform(
            Cursor::new(file),
            file.len() as u64,
            &mut out,
            variant,
            &provenance(variant),
        )
        .unwrap();
        (out, summary)
    }

    pub(crate) fn sample(tensors: &[(&str, &[u64], Vec<f32>)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend(1u64.to_le_bytes());
        let key = b"general.architecture";
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key);
        out.extend(T_STRING.to_le_bytes());
        out.extend(5u64.to_le_bytes());
        out.extend(b"llama");
        let mut offset = 0u64;
        for (name, dims, values) in tensors {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(GGML_F32.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + values.len() as u64 * 4).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for (_, _, values) in tensors {
            out.extend(num::f32_bytes(values));
            out.resize(out.len().next_multiple_of(32), 0);
        }
        out
    }

    #[test]
    fn q8_0_converts_matrices_and_keeps_vectors() {
        let w: Vec<f32> = (0..64 * 4).map(|i| (i as f32 - 100.0) * 0.01).collect();
        let file = sample(&[
            ("blk.0.attn_q.weight", &[64, 4], w),
            ("blk.0.attn_norm.weight", &[64], vec![1.0; 64]),
            ("odd.weight", &[33, 2], vec![0.5; 66]),
        ]);
        let (out, summary) = convert(&file, Variant::Q8_0);
        assert_eq!(summary.converted, 1);
        assert_eq!(summary.kept, 2);
        let header = read_header(Cursor::new(&out), out.len() as u64).unwrap();
        assert_eq!(header.tensors[0].ggml_type, GGML_Q8_0);
        assert_eq!(header.tensors[0].size, 4 * 2 * 34);
        assert_eq!(header.tensors[1].ggml_type, GGML_F32);
        assert_eq!(header.tensors[2].ggml_type, GGML_F32);
        assert!(header.keys().any(|k| k == "general.quantization_version"));
    }

    #[test]
    fn empty_tensors_are_copied() {
        // Found by fuzzing: a matrix with rows of zero elements.
        let file = sample(&[("w", &[0, 4], vec![])]);
        let (_, summary) = convert(&file, Variant::Q8_0);
        assert_eq!((summary.converted, summary.kept), (0, 1));
    }

    #[test]
    fn hostile_headers_are_errors() {
        let good = sample(&[("w", &[32, 2], vec![1.0; 64])]);
        for cut in [0, 3, 10, 30, good.len() - 1] {
            let err = read_header(Cursor::new(&good[..cut]), cut as u64);
            assert!(err.is_err(), "cut at {cut}");
        }
        // An unknown tensor type.
        let mut bad = good.clone();
        // magic, version, counts (24), the one key/value (45), name (9), n_dims (4), dims (16)
        let pos = 24 + 45 + 9 + 4 + 16;
        assert_eq!(bad[pos..pos + 4], GGML_F32.to_le_bytes());
        bad[pos..pos + 4].copy_from_slice(&77u32.to_le_bytes());
        let err = read_header(Cursor::new(&bad), bad.len() as u64)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown tensor type 77"), "{err}");
    }
}
