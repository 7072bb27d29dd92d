//! Walking an ONNX graph and its subgraphs: where weights are, how they are used, their
//! values, external data read in and written out, and builders of the nodes and tensors a
//! rewrite adds.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::{EXTERNAL, EXTERNAL_ALIGNMENT, EXTERNAL_MIN_BYTES, ExternalReader, FLOAT};
use crate::onnx_proto::{
    AttributeProto, GraphProto, NodeProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto, attribute_proto, tensor_shape_proto, type_proto,
};
use crate::{QuantError, Result, num};

pub(super) fn locations(graph: &GraphProto) -> Vec<String> {
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

pub(super) fn external_field(t: &TensorProto, key: &str) -> Option<String> {
    t.external_data
        .iter()
        .find(|e| e.key.as_deref() == Some(key))
        .and_then(|e| e.value.clone())
}

/// Calls `f` on every tensor of `graph` and its subgraphs: initializers and the values of
/// `Constant` nodes.
pub(super) fn for_each_tensor(
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

pub(super) fn for_each_graph(graph: &GraphProto, f: &mut dyn FnMut(&GraphProto)) {
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
pub(super) fn for_each_tensor_ref(graph: &GraphProto, f: &mut dyn FnMut(&TensorProto)) {
    for_each_graph(graph, &mut |g| {
        g.initializer.iter().for_each(&mut *f);
        for attr in g.node.iter().flat_map(|n| &n.attribute) {
            attr.t.iter().chain(&attr.tensors).for_each(&mut *f);
        }
    });
}

/// Replaces external references with the bytes they point to.
pub(super) fn load_external(
    graph: &mut GraphProto,
    read: &mut ExternalReader<'_>,
) -> Result<usize> {
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

pub(super) fn element_count(t: &TensorProto) -> Result<usize> {
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
pub(super) enum FloatData<'a> {
    Raw(num::LeF32<'a>),
    Values(&'a [f32]),
}

/// The values of a FLOAT tensor, in `raw_data` or `float_data`, checked against its dims.
pub(super) fn float_data(t: &TensorProto) -> Result<FloatData<'_>> {
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
pub(super) fn float_values(t: &TensorProto) -> Result<Vec<f32>> {
    Ok(match float_data(t)? {
        FloatData::Raw(raw) => num::f32_values(raw.0),
        FloatData::Values(values) => values.to_vec(),
    })
}

/// How a weight is consumed: which axis holds its output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WeightUse {
    /// The weight's output-channel axis for the op that uses it.
    pub(super) axis: usize,
    /// Used by MatMul (int4 applies to those only).
    pub(super) matmul: bool,
}

pub(super) fn is_default_domain(node: &NodeProto) -> bool {
    matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

pub(super) fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

/// Weight inputs of Conv, ConvTranspose, MatMul and Gemm anywhere in the model, with the
/// axis of their output channels (`None` when uses disagree).
pub(super) fn weight_uses(
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

pub(super) fn float_tensor(name: String, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name),
        dims,
        data_type: Some(FLOAT),
        raw_data: Some(Bytes::from(num::f32_bytes(values))),
        ..Default::default()
    }
}

pub(super) fn node(
    op: &str,
    inputs: Vec<String>,
    output: String,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        name: Some(format!("{output}_{}", op.to_ascii_lowercase())),
        op_type: Some(op.into()),
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    }
}

pub(super) fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_proto::AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

pub(super) fn value_info(t: &TensorProto) -> ValueInfoProto {
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

pub(super) fn ops_used(graph: &GraphProto) -> HashSet<String> {
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

pub(super) fn tensor_ranks(graph: &GraphProto) -> HashMap<String, usize> {
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
pub(super) fn write_external(graph: &mut GraphProto, location: &str) -> Result<Vec<u8>> {
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
