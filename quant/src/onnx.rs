//! ONNX: `fp16`, `int8` and `int4` variants of a model, parsed and written with prost from
//! the official `onnx.proto`.
//!
//! Weights are found wherever models keep them: initializers of the main graph and of
//! `If`/`Loop`/`Scan` subgraphs, `Constant` nodes, and external data files. A transformed
//! weight `W` becomes a new initializer (`W_quantized` / `W_fp16`) of the same graph plus
//! the nodes that turn it back into a float tensor named `W`, placed first in that graph,
//! so every consumer, graph input and output is unchanged:
//!
//! - `fp16`: `Cast(to=FLOAT)` of a float16 initializer.
//! - `int8`, opset ≥ 13: `DequantizeLinear(W_quantized, W_scale, W_zero_point, axis)` with
//!   one scale per output channel; below 13 (where `DequantizeLinear` has no `axis`),
//!   `Mul(Cast(W_quantized), W_scale)` with the scale shaped to broadcast along that axis.
//! - `int4`: opset 21 block-wise `DequantizeLinear(W_quantized, W_scale, axis=0,
//!   block_size=32)` for MatMul weights; a model below opset 21 is raised to it only when
//!   none of its ops changed meaning in between (see [`crate::onnx_ops`]).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use modelcache_proto::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto, tensor_proto, tensor_shape_proto,
    type_proto,
};
use prost::Message;

use crate::num;
use crate::{Provenance, QuantError, Result, Variant};

/// Tensors with fewer elements stay as they are (biases, norms, shapes).
const MIN_ELEMENTS: usize = 1024;
/// Lowest opset whose `Mul` broadcasts without the legacy `broadcast` attribute.
const MIN_OPSET: i64 = 7;
const INT4_BLOCK: usize = 32;
/// Alignment of tensors in a written external data file (a page, so runtimes can map them).
const EXTERNAL_ALIGNMENT: u64 = 4096;
/// External data written only for tensors at least this large; smaller ones stay inline.
const EXTERNAL_MIN_BYTES: usize = 1024;

const FLOAT: i32 = tensor_proto::DataType::Float as i32;
const FLOAT16: i32 = tensor_proto::DataType::Float16 as i32;
const INT8: i32 = tensor_proto::DataType::Int8 as i32;
const INT4: i32 = tensor_proto::DataType::Int4 as i32;
const EXTERNAL: i32 = tensor_proto::DataLocation::External as i32;

/// Reads an external data file by its location (relative to the model file's folder).
pub type ExternalReader<'a> = dyn FnMut(&str) -> Result<Bytes> + 'a;

/// A transformed model: the `.onnx` bytes and, when the original kept its weights in
/// external data, the one external data file the new model refers to.
#[derive(Debug)]
pub struct Output {
    pub model: Vec<u8>,
    pub external: Option<(String, Vec<u8>)>,
    pub transformed: usize,
    pub opset: i64,
}

fn decode_model(input: Bytes) -> Result<ModelProto> {
    let model = ModelProto::decode(input)
        .map_err(|e| QuantError::invalid(format!("not an ONNX model: {e}")))?;
    if model.graph.is_none() {
        return Err(QuantError::invalid("not an ONNX model: it has no graph"));
    }
    if model.ir_version.unwrap_or(0) < 3 {
        return Err(QuantError::invalid(format!(
            "ONNX IR version {} is not supported (3 or later is)",
            model.ir_version.unwrap_or(0)
        )));
    }
    Ok(model)
}

fn default_opset(model: &ModelProto) -> Result<i64> {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| QuantError::invalid("the model imports no default-domain opset"))
}

/// A decoded model, for callers that read its external data files themselves between
/// decoding and transforming (the node does: its reads are asynchronous), so the model is
/// decoded once.
pub struct Model {
    proto: ModelProto,
}

impl Model {
    pub fn decode(input: Bytes) -> Result<Self> {
        Ok(Self {
            proto: decode_model(input)?,
        })
    }

    /// The external data files the model refers to, each once, in order of first use.
    pub fn external_locations(&self) -> Vec<String> {
        locations(self.proto.graph.as_ref().expect("checked"))
    }
}

fn locations(graph: &GraphProto) -> Vec<String> {
    let mut out = Vec::new();
    for_each_tensor_ref(graph, &mut |t| {
        if t.data_location == Some(EXTERNAL)
            && let Some(loc) = external_field(t, "location")
            && !out.contains(&loc)
        {
            out.push(loc);
        }
    });
    out
}

fn external_field(t: &TensorProto, key: &str) -> Option<String> {
    t.external_data
        .iter()
        .find(|e| e.key.as_deref() == Some(key))
        .and_then(|e| e.value.clone())
}

/// Calls `f` on every tensor of `graph` and its subgraphs: initializers and the values of
/// `Constant` nodes.
fn for_each_tensor(
    graph: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut graph.initializer {
        f(t)?;
    }
    for node in &mut graph.node {
        for attr in &mut node.attribute {
            if let Some(t) = attr.t.as_mut() {
                f(t)?;
            }
            for t in &mut attr.tensors {
                f(t)?;
            }
            if let Some(g) = attr.g.as_mut() {
                for_each_tensor(g, f)?;
            }
            for g in &mut attr.graphs {
                for_each_tensor(g, f)?;
            }
        }
    }
    Ok(())
}

fn for_each_graph(graph: &GraphProto, f: &mut dyn FnMut(&GraphProto)) {
    f(graph);
    for node in &graph.node {
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                for_each_graph(g, f);
            }
            for g in &attr.graphs {
                for_each_graph(g, f);
            }
        }
    }
}

/// Calls `f` on every tensor of `graph` and its subgraphs without changing them.
fn for_each_tensor_ref(graph: &GraphProto, f: &mut dyn FnMut(&TensorProto)) {
    for_each_graph(graph, &mut |g| {
        g.initializer.iter().for_each(&mut *f);
        for attr in g.node.iter().flat_map(|n| &n.attribute) {
            attr.t.iter().chain(&attr.tensors).for_each(&mut *f);
        }
    });
}

/// Replaces external references with the bytes they point to.
fn load_external(graph: &mut GraphProto, read: &mut ExternalReader<'_>) -> Result<usize> {
    let mut files: HashMap<String, Bytes> = HashMap::new();
    let mut loaded = 0;
    for_each_tensor(graph, &mut |t| {
        if t.data_location != Some(EXTERNAL) {
            return Ok(());
        }
        let name = t.name.clone().unwrap_or_default();
        let location = external_field(t, "location").ok_or_else(|| {
            QuantError::invalid(format!("tensor {name:?} is external but names no location"))
        })?;
        modelcache_proto::check_file_path(&location)
            .map_err(|e| QuantError::invalid(format!("tensor {name:?}: external location: {e}")))?;
        if !files.contains_key(&location) {
            let bytes = read(&location)?;
            files.insert(location.clone(), bytes);
        }
        let file = &files[&location];
        let number = |key: &str| -> Result<Option<u64>> {
            external_field(t, key)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        QuantError::invalid(format!("tensor {name:?}: external {key} {v:?}"))
                    })
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?.unwrap_or((file.len() as u64).saturating_sub(offset));
        let end = offset.checked_add(length);
        if end.is_none_or(|e| e > file.len() as u64) {
            return Err(QuantError::invalid(format!(
                "tensor {name:?}: external data {offset}+{length} lies past the end of {location} ({} bytes)",
                file.len()
            )));
        }
        t.raw_data = Some(file.slice(offset as usize..(offset + length) as usize));
        t.data_location = None;
        t.external_data.clear();
        loaded += 1;
        Ok(())
    })?;
    Ok(loaded)
}

fn element_count(t: &TensorProto) -> Result<usize> {
    t.dims
        .iter()
        .try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
        .ok_or_else(|| {
            QuantError::invalid(format!(
                "tensor {:?} has bad dimensions {:?}",
                t.name.as_deref().unwrap_or(""),
                t.dims
            ))
        })
}

/// Where a FLOAT tensor keeps its values.
enum FloatData<'a> {
    Raw(num::LeF32<'a>),
    Values(&'a [f32]),
}

/// The values of a FLOAT tensor, in `raw_data` or `float_data`, checked against its dims.
fn float_data(t: &TensorProto) -> Result<FloatData<'_>> {
    let n = element_count(t)?;
    let name = t.name.as_deref().unwrap_or("");
    match &t.raw_data {
        Some(raw) if !raw.is_empty() || n == 0 => {
            if raw.len() as u64 != n as u64 * 4 {
                return Err(QuantError::invalid(format!(
                    "tensor {name:?}: raw_data has {} bytes but dims {:?} need {}",
                    raw.len(),
                    t.dims,
                    n * 4
                )));
            }
            Ok(FloatData::Raw(num::LeF32(raw)))
        }
        _ => {
            if t.float_data.len() != n {
                return Err(QuantError::invalid(format!(
                    "tensor {name:?}: {} float values but dims {:?} need {n}",
                    t.float_data.len(),
                    t.dims
                )));
            }
            Ok(FloatData::Values(&t.float_data))
        }
    }
}

/// The float values of a FLOAT tensor.
fn float_values(t: &TensorProto) -> Result<Vec<f32>> {
    Ok(match float_data(t)? {
        FloatData::Raw(raw) => num::f32_values(raw.0),
        FloatData::Values(values) => values.to_vec(),
    })
}

/// How a weight is consumed: which axis holds its output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WeightUse {
    axis: usize,
    matmul: bool,
}

fn is_default_domain(node: &NodeProto) -> bool {
    matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

/// Weight inputs of Conv, ConvTranspose, MatMul and Gemm anywhere in the model, with the
/// axis of their output channels (`None` when uses disagree).
fn weight_uses(
    graph: &GraphProto,
    ranks: &HashMap<String, usize>,
) -> HashMap<String, Option<WeightUse>> {
    let mut uses: HashMap<String, Option<WeightUse>> = HashMap::new();
    for_each_graph(graph, &mut |g| {
        for node in &g.node {
            if !is_default_domain(node) {
                continue;
            }
            let Some(w) = node.input.get(1) else { continue };
            let Some(&rank) = ranks.get(w) else { continue };
            let found = match node.op_type.as_deref() {
                Some("Conv") if rank >= 3 => Some(WeightUse {
                    axis: 0,
                    matmul: false,
                }),
                Some("ConvTranspose") if rank >= 3 => Some(WeightUse {
                    axis: 1,
                    matmul: false,
                }),
                Some("MatMul") if rank >= 2 => Some(WeightUse {
                    axis: rank - 1,
                    matmul: true,
                }),
                Some("Gemm") if rank == 2 => {
                    let axis = if attr_int(node, "transB").unwrap_or(0) != 0 {
                        0
                    } else {
                        1
                    };
                    Some(WeightUse {
                        axis,
                        matmul: false,
                    })
                }
                _ => None,
            };
            if let Some(found) = found {
                uses.entry(w.clone())
                    .and_modify(|u| {
                        if *u != Some(found) {
                            *u = None;
                        }
                    })
                    .or_insert(Some(found));
            }
        }
    });
    uses
}

fn float_tensor(name: String, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name),
        dims,
        data_type: Some(FLOAT),
        raw_data: Some(Bytes::from(num::f32_bytes(values))),
        ..Default::default()
    }
}

fn node(op: &str, inputs: Vec<String>, output: String, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: Some(format!("{output}_{}", op.to_ascii_lowercase())),
        op_type: Some(op.into()),
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_proto::AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

fn value_info(t: &TensorProto) -> ValueInfoProto {
    ValueInfoProto {
        name: t.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: t.data_type,
                shape: Some(TensorShapeProto {
                    dim: t
                        .dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The rewrite of one weight: new initializers and the nodes producing the float weight.
struct Rewrite {
    initializers: Vec<TensorProto>,
    nodes: Vec<NodeProto>,
}

struct Plan {
    variant: Variant,
    opset: i64,
    uses: HashMap<String, Option<WeightUse>>,
}

impl Plan {
    /// How `t` (a float tensor) is rewritten, if at all.
    fn rewrite(&self, t: &TensorProto) -> Result<Option<Rewrite>> {
        if t.data_type != Some(FLOAT) || element_count(t)? < MIN_ELEMENTS {
            return Ok(None);
        }
        let name = t.name.clone().unwrap_or_default();
        match self.variant {
            Variant::Fp16 => {
                let values = float_values(t)?;
                if !num::fits_f16(&values) {
                    return Ok(None);
                }
                let stored = format!("{name}_fp16");
                let init = TensorProto {
                    name: Some(stored.clone()),
                    dims: t.dims.clone(),
                    data_type: Some(FLOAT16),
                    raw_data: Some(Bytes::from(num::f16_bytes(&values))),
                    ..Default::default()
                };
                let cast = node(
                    "Cast",
                    vec![stored],
                    name,
                    vec![int_attr("to", FLOAT as i64)],
                );
                Ok(Some(Rewrite {
                    initializers: vec![init],
                    nodes: vec![cast],
                }))
            }
            Variant::Int8 => {
                // Names are only unique within a graph: a use seen on a tensor of another
                // rank is not this tensor's.
                let Some(Some(usage)) = self
                    .uses
                    .get(&name)
                    .filter(|u| u.is_some_and(|u| u.axis < t.dims.len()))
                else {
                    return Ok(None);
                };
                let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                let view = num::ChannelView::new(&dims, usage.axis);
                let (scales, codes) = match float_data(t)? {
                    FloatData::Raw(raw) => num::quantize_per_channel(&raw, view, num::INT8_MAX),
                    FloatData::Values(values) => {
                        num::quantize_per_channel(values, view, num::INT8_MAX)
                    }
                };
                let channels = dims[usage.axis] as i64;
                let q_name = format!("{name}_quantized");
                let s_name = format!("{name}_scale");
                let quantized = TensorProto {
                    name: Some(q_name.clone()),
                    dims: t.dims.clone(),
                    data_type: Some(INT8),
                    raw_data: Some(Bytes::from(
                        codes.into_iter().map(|c| c as u8).collect::<Vec<u8>>(),
                    )),
                    ..Default::default()
                };
                if self.opset >= 13 {
                    let z_name = format!("{name}_zero_point");
                    let zero = TensorProto {
                        name: Some(z_name.clone()),
                        dims: vec![channels],
                        data_type: Some(INT8),
                        raw_data: Some(Bytes::from(vec![0u8; channels as usize])),
                        ..Default::default()
                    };
                    let scale = float_tensor(s_name.clone(), vec![channels], &scales);
                    let dq = node(
                        "DequantizeLinear",
                        vec![q_name, s_name, z_name],
                        name,
                        vec![int_attr("axis", usage.axis as i64)],
                    );
                    Ok(Some(Rewrite {
                        initializers: vec![quantized, scale, zero],
                        nodes: vec![dq],
                    }))
                } else {
                    let mut shape = vec![1i64; dims.len()];
                    shape[usage.axis] = channels;
                    let scale = float_tensor(s_name.clone(), shape, &scales);
                    let c_name = format!("{name}_dequantized");
                    let cast = node(
                        "Cast",
                        vec![q_name],
                        c_name.clone(),
                        vec![int_attr("to", FLOAT as i64)],
                    );
                    let mul = node("Mul", vec![c_name, s_name], name, vec![]);
                    Ok(Some(Rewrite {
                        initializers: vec![quantized, scale],
                        nodes: vec![cast, mul],
                    }))
                }
            }
            Variant::Int4 => {
                let Some(Some(usage)) = self.uses.get(&name) else {
                    return Ok(None);
                };
                if !usage.matmul || t.dims.len() != 2 {
                    return Ok(None);
                }
                let values = float_values(t)?;
                let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
                let (scales, codes) = num::quantize_blocks_axis0(&values, rows, cols, INT4_BLOCK);
                let q_name = format!("{name}_quantized");
                let s_name = format!("{name}_scale");
                let quantized = TensorProto {
                    name: Some(q_name.clone()),
                    dims: t.dims.clone(),
                    data_type: Some(INT4),
                    raw_data: Some(Bytes::from(num::pack_int4(&codes))),
                    ..Default::default()
                };
                let scale = float_tensor(
                    s_name.clone(),
                    vec![rows.div_ceil(INT4_BLOCK) as i64, cols as i64],
                    &scales,
                );
                let dq = node(
                    "DequantizeLinear",
                    vec![q_name, s_name],
                    name,
                    vec![
                        int_attr("axis", 0),
                        int_attr("block_size", INT4_BLOCK as i64),
                    ],
                );
                Ok(Some(Rewrite {
                    initializers: vec![quantized, scale],
                    nodes: vec![dq],
                }))
            }
            other => Err(QuantError::NotApplicable(format!(
                "variant {other} does not apply to ONNX models; variants that do: fp16, int8, int4"
            ))),
        }
    }
}

/// Rewrites the weights of `graph` and its subgraphs; returns how many were rewritten.
fn rewrite_graph(graph: &mut GraphProto, plan: &Plan, legacy_inputs: bool) -> Result<usize> {
    let mut count = 0;
    // Subgraphs first: their weights are rewritten inside them.
    for n in &mut graph.node {
        for attr in &mut n.attribute {
            if let Some(g) = attr.g.as_mut() {
                count += rewrite_graph(g, plan, legacy_inputs)?;
            }
            for g in &mut attr.graphs {
                count += rewrite_graph(g, plan, legacy_inputs)?;
            }
        }
    }
    // Constant nodes holding a weight become initializers of this graph.
    let mut kept_nodes = Vec::with_capacity(graph.node.len());
    let mut constants = Vec::new();
    for n in std::mem::take(&mut graph.node) {
        let is_constant = is_default_domain(&n)
            && n.op_type.as_deref() == Some("Constant")
            && n.output.len() == 1
            && n.attribute.len() == 1
            && n.attribute[0].name.as_deref() == Some("value");
        if is_constant && let Some(t) = &n.attribute[0].t {
            let mut t = t.clone();
            t.name = Some(n.output[0].clone());
            if plan.rewrite(&t)?.is_some() {
                constants.push(t);
                continue;
            }
        }
        kept_nodes.push(n);
    }
    graph.node = kept_nodes;
    let mut initializers = Vec::with_capacity(graph.initializer.len());
    let mut prepended = Vec::new();
    let mut replaced: HashSet<String> = HashSet::new();
    let mut new_inputs = Vec::new();
    for t in std::mem::take(&mut graph.initializer)
        .into_iter()
        .chain(constants)
    {
        match plan.rewrite(&t)? {
            Some(rw) => {
                replaced.insert(t.name.clone().unwrap_or_default());
                if legacy_inputs {
                    new_inputs.extend(rw.initializers.iter().map(value_info));
                }
                initializers.extend(rw.initializers);
                prepended.extend(rw.nodes);
                count += 1;
            }
            None => initializers.push(t),
        }
    }
    graph.initializer = initializers;
    // Weights listed as graph inputs (IR < 4 requires it) are no longer inputs.
    graph
        .input
        .retain(|i| i.name.as_ref().is_none_or(|n| !replaced.contains(n)));
    graph.input.extend(new_inputs);
    prepended.append(&mut graph.node);
    graph.node = prepended;
    Ok(count)
}

fn ops_used(graph: &GraphProto) -> HashSet<String> {
    let mut ops = HashSet::new();
    for_each_graph(graph, &mut |g| {
        for n in &g.node {
            if is_default_domain(n) {
                ops.insert(n.op_type.clone().unwrap_or_default());
            }
        }
    });
    ops
}

fn tensor_ranks(graph: &GraphProto) -> HashMap<String, usize> {
    let mut ranks = HashMap::new();
    for_each_tensor_ref(graph, &mut |t| {
        if let Some(name) = &t.name {
            ranks.insert(name.clone(), t.dims.len());
        }
    });
    // Constant node values carry the node's output name, not their own.
    for_each_graph(graph, &mut |g| {
        for n in &g.node {
            if n.op_type.as_deref() == Some("Constant")
                && n.output.len() == 1
                && let Some(t) = n.attribute.first().and_then(|a| a.t.as_ref())
            {
                ranks.insert(n.output[0].clone(), t.dims.len());
            }
        }
    });
    ranks
}

/// Moves every large initializer of every graph to one external data file.
fn write_external(graph: &mut GraphProto, location: &str) -> Result<Vec<u8>> {
    let mut data: Vec<u8> = Vec::new();
    for_each_tensor(graph, &mut |t| {
        let Some(raw) = t
            .raw_data
            .as_ref()
            .filter(|r| r.len() >= EXTERNAL_MIN_BYTES)
        else {
            return Ok(());
        };
        let offset = (data.len() as u64).next_multiple_of(EXTERNAL_ALIGNMENT);
        data.resize(offset as usize, 0);
        data.extend_from_slice(raw);
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        t.external_data = vec![
            entry("location", location.to_owned()),
            entry("offset", offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(EXTERNAL);
        t.raw_data = None;
        Ok(())
    })?;
    Ok(data)
}

/// Builds `variant` of the ONNX model `input`. External data files are read through
/// `read_external`; if the model had any, the output keeps its large tensors in one
/// external file named like the first one the original used.
pub fn transform(
    input: Bytes,
    variant: Variant,
    provenance: &Provenance,
    read_external: &mut ExternalReader<'_>,
) -> Result<Output> {
    Model::decode(input)?.transform(variant, provenance, read_external)
}

impl Model {
    /// Builds `variant` of this model; see [`transform`].
    pub fn transform(
        self,
        variant: Variant,
        provenance: &Provenance,
        read_external: &mut ExternalReader<'_>,
    ) -> Result<Output> {
        transform_model(self.proto, variant, || provenance.clone(), read_external)
    }

    /// Like [`Model::transform`], with the provenance asked for only once the weights are
    /// quantized, just before the model is encoded: the source's digest can be computed
    /// meanwhile.
    pub fn transform_then(
        self,
        variant: Variant,
        read_external: &mut ExternalReader<'_>,
        provenance: impl FnOnce() -> Provenance,
    ) -> Result<Output> {
        transform_model(self.proto, variant, provenance, read_external)
    }
}

fn transform_model(
    mut model: ModelProto,
    variant: Variant,
    provenance: impl FnOnce() -> Provenance,
    read_external: &mut ExternalReader<'_>,
) -> Result<Output> {
    let mut opset = default_opset(&model)?;
    if opset < MIN_OPSET {
        return Err(QuantError::NotApplicable(format!(
            "opset {opset} is below {MIN_OPSET}, the oldest this quantizer writes"
        )));
    }
    let graph = model.graph.as_mut().expect("checked");
    let locations = locations(graph);
    load_external(graph, read_external)?;
    if variant == Variant::Int4 && opset < 21 {
        let mut changed: Vec<String> = ops_used(graph)
            .into_iter()
            .filter(|op| !crate::onnx_ops::unchanged_between(op, opset, 21))
            .collect();
        if !changed.is_empty() {
            changed.sort();
            return Err(QuantError::NotApplicable(format!(
                "int4 needs opset 21 and this model is at opset {opset}; raising it would change the meaning of {}",
                changed.join(", ")
            )));
        }
        opset = 21;
    }
    let ranks = tensor_ranks(graph);
    let plan = Plan {
        variant,
        opset,
        uses: weight_uses(graph, &ranks),
    };
    let legacy_inputs = model.ir_version.unwrap_or(0) < 4;
    let transformed = rewrite_graph(graph, &plan, legacy_inputs)?;
    if transformed == 0 {
        return Err(QuantError::NotApplicable(match variant {
            Variant::Int4 => {
                "int4 applies to MatMul weights and the model has none large enough".into()
            }
            _ => format!("the model has no weight that {variant} applies to"),
        }));
    }
    if variant == Variant::Int4 {
        for o in &mut model.opset_import {
            if matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
                o.version = Some(21);
            }
        }
        model.ir_version = Some(model.ir_version.unwrap_or(0).max(10));
    }
    let external = match locations.first() {
        Some(location) => {
            let data = write_external(model.graph.as_mut().expect("checked"), location)?;
            Some((location.clone(), data))
        }
        None => None,
    };
    model.metadata_props.retain(|p| {
        !p.key
            .as_deref()
            .is_some_and(|k| k.starts_with("modelcache."))
    });
    for (k, v) in provenance().pairs() {
        model.metadata_props.push(StringStringEntryProto {
            key: Some(k),
            value: Some(v),
        });
    }
    Ok(Output {
        model: model.encode_to_vec(),
        external,
        transformed,
        opset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;
    use modelcache_proto::onnx::OperatorSetIdProto;

    fn matmul_model(opset: i64, k: usize, n: usize) -> Bytes {
        matmul_then(opset, k, n, &[])
    }

    fn matmul_then(opset: i64, k: usize, n: usize, ops: &[&str]) -> Bytes {
        let values: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let graph = GraphProto {
            name: Some("g".into()),
            node: std::iter::once(node(
                "MatMul",
                vec!["x".into(), "w".into()],
                "y0".into(),
                vec![],
            ))
            .chain(
                ops.iter()
                    .enumerate()
                    .map(|(i, op)| node(op, vec![format!("y{i}")], format!("y{}", i + 1), vec![])),
            )
            .collect(),
            initializer: vec![float_tensor("w".into(), vec![k as i64, n as i64], &values)],
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(graph),
            ..Default::default()
        };
        Bytes::from(model.encode_to_vec())
    }

    fn provenance(variant: Variant) -> Provenance {
        Provenance {
            source_sha256: "cd".repeat(32),
            variant,
            format: Format::Onnx,
        }
    }

    fn no_external(_: &str) -> Result<Bytes> {
        Err(QuantError::invalid("no external data here"))
    }

    #[test]
    fn int8_uses_dequantize_linear_with_axis_from_opset_13() {
        let out = transform(
            matmul_model(13, 64, 32),
            Variant::Int8,
            &provenance(Variant::Int8),
            &mut no_external,
        )
        .unwrap();
        let model = ModelProto::decode(Bytes::from(out.model)).unwrap();
        let g = model.graph.unwrap();
        assert_eq!(g.node[0].op_type.as_deref(), Some("DequantizeLinear"));
        assert_eq!(attr_int(&g.node[0], "axis"), Some(1));
        let scale = g
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("w_scale"))
            .unwrap();
        assert_eq!(scale.dims, vec![32]);
        assert!(
            model
                .metadata_props
                .iter()
                .any(|p| p.key.as_deref() == Some("modelcache.variant"))
        );
    }

    #[test]
    fn int8_below_13_uses_cast_and_mul() {
        let out = transform(
            matmul_model(11, 64, 32),
            Variant::Int8,
            &provenance(Variant::Int8),
            &mut no_external,
        )
        .unwrap();
        let g = ModelProto::decode(Bytes::from(out.model))
            .unwrap()
            .graph
            .unwrap();
        let ops: Vec<&str> = g
            .node
            .iter()
            .map(|n| n.op_type.as_deref().unwrap())
            .collect();
        assert_eq!(ops, ["Cast", "Mul", "MatMul"]);
        let scale = g
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("w_scale"))
            .unwrap();
        assert_eq!(scale.dims, vec![1, 32]);
    }

    #[test]
    fn int4_raises_opset_only_when_meaning_is_kept() {
        let out = transform(
            matmul_model(17, 64, 32),
            Variant::Int4,
            &provenance(Variant::Int4),
            &mut no_external,
        )
        .unwrap();
        assert_eq!(out.opset, 21);
        let g = ModelProto::decode(Bytes::from(out.model))
            .unwrap()
            .graph
            .unwrap();
        let scale = g
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("w_scale"))
            .unwrap();
        assert_eq!(scale.dims, vec![2, 32]);
        // Softmax changed its signature (the default axis) at opset 13.
        let err = transform(
            matmul_then(12, 64, 32, &["Relu", "Softmax"]),
            Variant::Int4,
            &provenance(Variant::Int4),
            &mut no_external,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Softmax") && !err.contains("Relu"), "{err}");
    }

    #[test]
    fn garbage_is_not_onnx() {
        let err = transform(
            Bytes::from_static(b"\xff\xff\xff\xffnot a model"),
            Variant::Int8,
            &provenance(Variant::Int8),
            &mut no_external,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an ONNX model"), "{err}");
    }
}
