"""Builds the test models the variant tests quantize: `python models.py OUT_DIR [bad]`
(`bad`: the broken weight files instead).

Every model gets weights with a realistic spread: each output channel has its own scale,
spread over two and a half orders of magnitude, and a few weights are outliers, since
uniform random weights hide per-channel mistakes. One folder per model under OUT_DIR.
"""

import json
import os
import sys

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

RNG = np.random.default_rng(20261128)


def weights(shape, axis=0):
    """Normal weights scaled by 1/sqrt(fan-in), with per-channel scales 10**[-2, 0.5] along
    `axis` and outliers."""
    fan_in = int(np.prod(shape)) // shape[axis]
    w = (RNG.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    w *= (10 ** RNG.uniform(-2, 0.5, size=scale_shape)).astype(np.float32)
    flat = w.reshape(-1)
    idx = RNG.choice(flat.size, size=max(1, flat.size // 1000), replace=False)
    flat[idx] *= 8
    return w


def save_onnx(model, folder, external=False):
    os.makedirs(folder, exist_ok=True)
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(folder, "model.onnx")
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


def conv_opset11(out):
    """Conv → Relu → Conv → ConvTranspose → GlobalAveragePool → Flatten → Gemm (transB=0),
    opset 11."""
    inits = [
        numpy_helper.from_array(weights((32, 3, 5, 5)), "conv1.w"),
        numpy_helper.from_array(np.zeros(32, np.float32), "conv1.b"),
        numpy_helper.from_array(weights((64, 32, 3, 3)), "conv2.w"),
        # ConvTranspose weights are [in, out, kh, kw]: output channels on axis 1.
        numpy_helper.from_array(weights((64, 48, 2, 2), axis=1), "up.w"),
        numpy_helper.from_array(weights((48, 100), axis=1), "fc.w"),
        numpy_helper.from_array(RNG.standard_normal(100).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c2", "up.w"], ["u"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["u"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "conv11",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 100])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    save_onnx(model, os.path.join(out, "onnx-opset11"))


def legacy_opset7(out):
    """IR 3 / opset 7: initializers are also graph inputs; Gemm with transB=1."""
    w1 = weights((128, 64), axis=0)  # Gemm B with transB=1: [N, K], channels on axis 0
    w2 = weights((128, 32), axis=1)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.zeros(128, np.float32), "b1")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "legacy7", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    save_onnx(model, os.path.join(out, "onnx-opset7"))


def subgraph_opset17(out):
    """A Constant-node weight, then an If whose branches hold their own weights (an
    initializer in one, a Constant node in the other), and a Loop body with a weight."""
    w0 = helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(weights((64, 128), 1), "w0v"))
    then_w = numpy_helper.from_array(weights((128, 32), 1), "then.w")
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["r", "then.w"], ["t_out"])], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4, 32])], [then_w])
    else_c = helper.make_node("Constant", [], ["else.w"], value=numpy_helper.from_array(weights((128, 32), 1), "ev"))
    else_g = helper.make_graph(
        [else_c, helper.make_node("MatMul", ["r", "else.w"], ["e_out"])], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4, 32])])
    loop_w = numpy_helper.from_array(weights((32, 32), 1), "loop.w")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "loop.w"], ["mm"]),
         helper.make_node("Tanh", ["mm"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4, 32])], [loop_w])
    trips = numpy_helper.from_array(np.array(2, np.int64), "trips")
    nodes = [
        w0,
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "", "branch"], ["y"], body=body),
    ]
    graph = helper.make_graph(
        nodes, "sub17",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], [trips])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    save_onnx(model, os.path.join(out, "onnx-opset17"))


def external_opset21(out):
    """A MatMul MLP at opset 21 whose weights live in model.onnx.data."""
    dims = [64, 256, 256, 64]
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(weights((dims[i], dims[i + 1]), 1), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "ext21", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("m2", TensorProto.FLOAT, [4, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    save_onnx(model, os.path.join(out, "onnx-opset21"), external=True)


def llama_tensors(vocab=512, hidden=64, ffn=256):
    t = {"model.embed_tokens.weight": weights((vocab, hidden))}
    for layer in range(2):
        p = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{proj}.weight"] = weights((hidden, hidden))
        t[f"{p}.mlp.up_proj.weight"] = weights((ffn, hidden))
        t[f"{p}.mlp.down_proj.weight"] = weights((hidden, ffn))
        t[f"{p}.input_layernorm.weight"] = np.ones(hidden, np.float32)
    t["model.norm.weight"] = np.ones(hidden, np.float32)
    t["lm_head.weight"] = weights((vocab, hidden))
    return t


def safetensors_models(out):
    tensors = llama_tensors()
    names = sorted(tensors)
    half = len(names) // 2
    folder = os.path.join(out, "st-sharded")
    os.makedirs(folder, exist_ok=True)
    shards = [names[:half], names[half:]]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, os.path.join(folder, file), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = file
            total += tensors[n].nbytes
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 256,
                   "num_hidden_layers": 2, "vocab_size": 512, "torch_dtype": "float32"}, f, indent=2)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0"}, f)
    single = os.path.join(out, "st-single")
    os.makedirs(single, exist_ok=True)
    save_file({"encoder.fc1.weight": weights((128, 64)), "encoder.fc1.bias": np.zeros(128, np.float32),
               "encoder.fc2.weight": weights((64, 128))}, os.path.join(single, "model.safetensors"))


def gguf_model(out):
    folder = os.path.join(out, "gguf-small")
    os.makedirs(folder, exist_ok=True)
    w = gguf.GGUFWriter(os.path.join(folder, "model.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(256)])
    w.add_tensor("token_embd.weight", weights((256, 64)))
    w.add_tensor("blk.0.attn_q.weight", weights((64, 64)))
    w.add_tensor("blk.0.ffn_up.weight", weights((128, 64)))
    w.add_tensor("blk.0.ffn_down.weight", weights((64, 128)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    w.add_tensor("blk.0.odd.weight", weights((40, 33)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bad_models(out):
    """Weight files that are broken in the ways real downloads break."""
    def write(folder, name, data):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        with open(os.path.join(out, folder, name), "wb") as f:
            f.write(data)
    write("bad-not-onnx", "model.onnx", b"this is not an ONNX model\n" * 64)
    good = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weights((64, 64), 1), "w")]), opset_imports=[helper.make_opsetid("", 13)])
    data = good.SerializeToString()
    write("bad-truncated-onnx", "model.onnx", data[: len(data) // 2])
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 64 * 64 * 4]}}).encode()
    full = len(header).to_bytes(8, "little") + header + weights((64, 64)).tobytes()
    write("bad-truncated-safetensors", "model.safetensors", full[: len(full) // 2])
    lie = json.dumps({"fc.weight": {"dtype": "F32", "shape": [64, 64], "data_offsets": [1 << 40, (1 << 40) + 64 * 64 * 4]}}).encode()
    write("bad-lying-safetensors", "model.safetensors", len(lie).to_bytes(8, "little") + lie + weights((64, 64)).tobytes())
    # A GGUF whose one tensor has type 77, which ggml does not define.
    import struct
    name = b"blk.0.attn_q.weight"
    g = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    g += struct.pack("<Q", len(name)) + name + struct.pack("<IQQ", 2, 64, 64) + struct.pack("<IQ", 77, 0)
    g += b"\0" * (-len(g) % 32) + weights((64, 64)).tobytes()
    write("bad-gguf-type", "model.gguf", g)


def main():
    out = sys.argv[1]
    if sys.argv[2:] == ["bad"]:
        bad_models(out)
        return
    conv_opset11(out)
    legacy_opset7(out)
    subgraph_opset17(out)
    external_opset21(out)
    safetensors_models(out)
    gguf_model(out)


if __name__ == "__main__":
    main()
