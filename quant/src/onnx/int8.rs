//! `int8`: weight-only int8 per output channel. From opset 13, `DequantizeLinear` with
//! `axis`; below it (no `axis` there), `Mul(Cast(W_quantized), W_scale)` with the scale
//! shaped to broadcast along that axis.

use bytes::Bytes;

use super::graph::{FloatData, WeightUse, float_data, float_tensor, int_attr, node};
use super::{FLOAT, INT8, Rewrite};
use crate::Result;
use crate::num;
use crate::onnx_proto::TensorProto;

/// The rewrite of float tensor `t` (named `name`, used as `usage` says) in a model at
/// `opset`.
pub(super) fn rewrite(
    t: &TensorProto,
    name: String,
    usage: &WeightUse,
    opset: i64,
) -> Result<Option<Rewrite>> {
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let view = num::ChannelView::new(&dims, usage.axis);
    let (scales, codes) = match float_data(t)? {
        FloatData::Raw(raw) => num::quantize_per_channel(&raw, view, num::INT8_MAX),
        FloatData::Values(values) => num::quantize_per_channel(values, view, num::INT8_MAX),
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
    if opset >= 13 {
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
