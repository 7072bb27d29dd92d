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

mod fp16;
mod graph;
mod int4;
mod int8;

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use prost::Message;

use crate::onnx_proto::{
    GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto, tensor_proto,
};
use crate::{Provenance, QuantError, Result, Variant};
use graph::{
    WeightUse, element_count, is_default_domain, load_external, locations, ops_used, tensor_ranks,
    value_info, weight_uses, write_external,
};

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
    /// How `t` (a float tensor) is rewritten, if at all: one rewrite per variant.
    fn rewrite(&self, t: &TensorProto) -> Result<Option<Rewrite>> {
        if t.data_type != Some(FLOAT) || element_count(t)? < MIN_ELEMENTS {
            return Ok(None);
        }
        let name = t.name.clone().unwrap_or_default();
        let usage = self.uses.get(&name).and_then(Option::as_ref);
        match (self.variant, usage) {
            (Variant::Fp16, _) => fp16::rewrite(t, name),
            // Names are only unique within a graph: a use seen on a tensor of another rank
            // is not this tensor's.
            (Variant::Int8, Some(usage)) if usage.axis >= t.dims.len() => Ok(None),
            (Variant::Int8, Some(usage)) => int8::rewrite(t, name, usage, self.opset),
            (Variant::Int4, Some(usage)) => int4::rewrite(t, name, usage),
            (Variant::Int8 | Variant::Int4, None) => Ok(None),
            (other, _) => Err(QuantError::NotApplicable(format!(
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
pub(crate) mod tests {
    use super::*;
    use crate::Format;
    use crate::onnx_proto::OperatorSetIdProto;
    use graph::{attr_int, float_tensor, node};

    pub(crate) fn matmul_model(opset: i64, k: usize, n: usize) -> Bytes {
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
