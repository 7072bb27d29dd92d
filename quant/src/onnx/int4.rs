//! `int4`: opset 21 block-wise int4 `DequantizeLinear` (block 32 along K) for the weights
//! of MatMul.

use bytes::Bytes;

use super::graph::{WeightUse, float_tensor, float_values, int_attr, node};
use super::{INT4, INT4_BLOCK, Rewrite};
use crate::Result;
use crate::num;
use crate::onnx_proto::TensorProto;

/// The rewrite of float tensor `t` (named `name`, used as `usage` says).
pub(super) fn rewrite(t: &TensorProto, name: String, usage: &WeightUse) -> Result<Option<Rewrite>> {
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
