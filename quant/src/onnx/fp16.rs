//! `fp16`: a float weight stored as float16, followed by a `Cast` to float.

use bytes::Bytes;

use super::graph::{float_values, int_attr, node};
use super::{FLOAT, FLOAT16, Rewrite};
use crate::Result;
use crate::num;
use crate::onnx_proto::TensorProto;

/// The rewrite of float tensor `t` (named `name`), unless its values do not fit float16.
pub(super) fn rewrite(t: &TensorProto, name: String) -> Result<Option<Rewrite>> {
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
