"""Deliberately wrong variants, to show that check.py catches them:
`python corrupt.py ORIGINALS OUT GOOD_GGUF_Q8_0_DIR GOOD_SAFETENSORS_INT8_DIR`.

Writes under OUT:
- `wrong-axis`: onnx-opset11 in int8 with each weight's scales along the wrong axis
  (a valid model that onnx.checker accepts);
- `per-tensor`: onnx-opset11 in int8 with one scale per tensor instead of per channel;
- `gguf-bad-q8_0`: the good Q8_0 GGUF with one block's scale changed;
- `st-bad-scale`: the good int8 safetensors with its scales stored as `[1, out]`.
"""

import hashlib
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def quantize_onnx(src, dst, axis_of):
    model = onnx.load(src)
    g = model.graph
    axes = {}
    for n in g.node:
        if n.op_type == "Conv":
            axes[n.input[1]] = 0
        elif n.op_type == "ConvTranspose":
            axes[n.input[1]] = 1
        elif n.op_type == "Gemm":
            axes[n.input[1]] = 0 if any(a.name == "transB" and a.i for a in n.attribute) else 1
    inits, nodes = [], []
    for t in g.initializer:
        w = numpy_helper.to_array(t)
        if t.name not in axes or w.size < 1024:
            inits.append(t)
            continue
        axis = axis_of(axes[t.name], w.ndim)
        if axis is None:
            scale = np.array(np.abs(w).max() / 127, np.float32)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            attrs = {}
        else:
            red = tuple(i for i in range(w.ndim) if i != axis)
            scale = (np.abs(w).max(axis=red) / 127).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            attrs = {"axis": axis}
        inits += [numpy_helper.from_array(q, t.name + "_quantized"), numpy_helper.from_array(scale, t.name + "_scale")]
        nodes.append(helper.make_node("DequantizeLinear", [t.name + "_quantized", t.name + "_scale"], [t.name], **attrs))
    del g.initializer[:]
    g.initializer.extend(inits)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    if model.opset_import[0].version < 13:
        model.opset_import[0].version = 13
    for k, v in [("modelcache.source_sha256", sha256(src)), ("modelcache.variant", "int8"),
                 ("modelcache.quantizer_version", "corrupt.py")]:
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    onnx.save(model, dst)


def main():
    originals, out, good_gguf, good_st = sys.argv[1:5]
    src = os.path.join(originals, "onnx-opset11", "model.onnx")
    quantize_onnx(src, os.path.join(out, "wrong-axis", "model.onnx"), lambda right, rank: (right + 1) % rank)
    quantize_onnx(src, os.path.join(out, "per-tensor", "model.onnx"), lambda right, rank: None)

    import gguf
    dst = os.path.join(out, "gguf-bad-q8_0")
    shutil.copytree(good_gguf, dst, dirs_exist_ok=True)
    path = os.path.join(dst, "model.gguf")
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    with open(path, "r+b") as f:
        f.seek(t.data_offset + 1)  # high byte of the first block's f16 scale
        b = f.read(1)[0]
        f.seek(t.data_offset + 1)
        f.write(bytes([b ^ 0x04]))

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    dst = os.path.join(out, "st-bad-scale")
    shutil.copytree(good_st, dst, dirs_exist_ok=True)
    path = os.path.join(dst, "model.safetensors")
    with safe_open(path, "np") as f:
        meta = f.metadata()
    tensors = load_file(path)
    for k in list(tensors):
        if k.endswith("_scale"):
            tensors[k] = tensors[k].reshape(1, -1)
    save_file(tensors, path, metadata=meta)


if __name__ == "__main__":
    main()
