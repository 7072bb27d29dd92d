//! The sample model `modelcache-sample` writes (and the tests and the benchmark use): a
//! ResNet-50-shaped ONNX model (opset 13): the real topology (7×7 stem, bottleneck
//! stages of 3, 4, 6 and 3 blocks, global pooling, a 1000-way Gemm) with batch norm folded
//! into the convolutions, about 25.5 M parameters (~100 MB).
//!
//! Weights are deterministic but not uniform: each output channel has its own scale, spread
//! over two orders of magnitude, and a few weights are outliers, as in trained networks, so
//! per-channel handling is exercised.

use crate::onnx_proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto, tensor_proto, tensor_shape_proto,
    type_proto,
};
use bytes::Bytes;
use prost::Message;

pub mod rng;

use rng::Rng;

/// The opset the sample declares.
pub const OPSET: i64 = 13;

struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    rng: Rng,
    counter: usize,
}

fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_proto::AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_proto::AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(values.len() * 4);
    for v in values {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(tensor_proto::DataType::Float as i32),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(*d)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(tensor_proto::DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Builder {
    fn name(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// Weights `[out, fan_in…]`, He-scaled, each output channel with its own scale
    /// (10^-1.5 … 10^0.5) and one outlier in 512 weights.
    fn weights(&mut self, out: usize, fan_in: usize) -> Vec<f32> {
        let he = (2.0 / fan_in as f32).sqrt();
        let mut w = Vec::with_capacity(out * fan_in);
        for _ in 0..out {
            let channel_scale = 10f32.powf(self.rng.uniform() * 2.0 - 1.5);
            for _ in 0..fan_in {
                let mut v = self.rng.normal() * he * channel_scale;
                if self.rng.next_u64().is_multiple_of(512) {
                    v *= 8.0;
                }
                w.push(v);
            }
        }
        w
    }

    fn bias(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.rng.normal() * 0.05).collect()
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, attributes: Vec<AttributeProto>) -> String {
        let output = self.name(&op.to_ascii_lowercase());
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output.clone()],
            name: Some(format!("{output}_node")),
            op_type: Some(op.into()),
            attribute: attributes,
            ..Default::default()
        });
        output
    }

    fn conv(&mut self, x: &str, c_in: usize, c_out: usize, k: usize, stride: usize) -> String {
        let w_name = self.name("conv_w");
        let b_name = self.name("conv_b");
        let w = self.weights(c_out, c_in * k * k);
        let b = self.bias(c_out);
        self.initializers.push(float_tensor(
            &w_name,
            &[c_out as i64, c_in as i64, k as i64, k as i64],
            &w,
        ));
        self.initializers
            .push(float_tensor(&b_name, &[c_out as i64], &b));
        let pad = (k / 2) as i64;
        self.node(
            "Conv",
            vec![x.into(), w_name, b_name],
            vec![
                attr_ints("kernel_shape", &[k as i64, k as i64]),
                attr_ints("strides", &[stride as i64, stride as i64]),
                attr_ints("pads", &[pad, pad, pad, pad]),
            ],
        )
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", vec![x.into()], vec![])
    }

    fn bottleneck(&mut self, x: &str, c_in: usize, width: usize, stride: usize) -> String {
        let c_out = width * 4;
        let a = self.conv(x, c_in, width, 1, 1);
        let a = self.relu(&a);
        let b = self.conv(&a, width, width, 3, stride);
        let b = self.relu(&b);
        let c = self.conv(&b, width, c_out, 1, 1);
        let shortcut = if stride != 1 || c_in != c_out {
            self.conv(x, c_in, c_out, 1, stride)
        } else {
            x.to_owned()
        };
        let sum = self.node("Add", vec![c, shortcut], vec![]);
        self.relu(&sum)
    }
}

/// The serialized model.
pub fn resnet50(seed: u64) -> Vec<u8> {
    let mut b = Builder {
        nodes: Vec::new(),
        initializers: Vec::new(),
        rng: Rng::new(seed),
        counter: 0,
    };
    let x = b.conv("input", 3, 64, 7, 2);
    let x = b.relu(&x);
    let mut x = b.node(
        "MaxPool",
        vec![x],
        vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("strides", &[2, 2]),
            attr_ints("pads", &[1, 1, 1, 1]),
        ],
    );
    let mut c_in = 64;
    for (stage, (blocks, width)) in [(3, 64), (4, 128), (6, 256), (3, 512)]
        .into_iter()
        .enumerate()
    {
        for block in 0..blocks {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            x = b.bottleneck(&x, c_in, width, stride);
            c_in = width * 4;
        }
    }
    let pooled = b.node("GlobalAveragePool", vec![x], vec![]);
    let flat = b.node("Flatten", vec![pooled], vec![attr_int("axis", 1)]);
    let w = b.weights(1000, 2048);
    let bias = b.bias(1000);
    b.initializers.push(float_tensor("fc_w", &[1000, 2048], &w));
    b.initializers.push(float_tensor("fc_b", &[1000], &bias));
    let logits = b.node(
        "Gemm",
        vec![flat, "fc_w".into(), "fc_b".into()],
        vec![attr_int("transB", 1)],
    );
    b.nodes.push(NodeProto {
        input: vec![logits],
        output: vec!["logits".into()],
        name: Some("output_identity".into()),
        op_type: Some("Identity".into()),
        ..Default::default()
    });
    let model = ModelProto {
        ir_version: Some(7),
        producer_name: Some("modelcache-sample".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        graph: Some(GraphProto {
            name: Some("resnet50".into()),
            node: b.nodes,
            initializer: b.initializers,
            input: vec![value_info("input", &[1, 3, 224, 224])],
            output: vec![value_info("logits", &[1, 1000])],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_has_resnet50_parameter_count_and_is_deterministic() {
        let bytes = resnet50(1);
        let model = ModelProto::decode(bytes.as_slice()).unwrap();
        let graph = model.graph.unwrap();
        let params: i64 = graph
            .initializer
            .iter()
            .map(|t| t.dims.iter().product::<i64>())
            .sum();
        // torchvision's resnet50 has 25,557,032 parameters; folding batch norm into conv
        // biases leaves 25,530,472 (+ biases on the 53 convolutions).
        assert!((25_400_000..25_700_000).contains(&params), "{params}");
        assert_eq!(
            graph.node.iter().filter(|n| n.op_type() == "Conv").count(),
            53
        );
        assert_eq!(bytes, resnet50(1));
        assert_ne!(bytes, resnet50(2));
    }
}
