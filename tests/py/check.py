"""Checks variants built by a cache node with the tools users load them with.

`python check.py CASES.json` where CASES.json is a list of
`{"name", "format": "onnx"|"safetensors"|"gguf", "variant", "original": DIR, "output": DIR}`.
Prints one JSON object per case (`name`, `ok`, `problems`, `figures`) and exits 0 when
every case is ok, 1 otherwise. Each check is a real load: `onnx.checker` with
`full_check=True` and onnxruntime sessions on the same inputs for ONNX, the `safetensors`
reader for safetensors, `gguf.GGUFReader` and `gguf.quants` for GGUF.
"""

import glob
import hashlib
import json
import math
import os
import sys

import numpy as np

MIN_COSINE = {"int8": 0.99, "q8_0": 0.99, "fp16": 0.999, "bf16": 0.999, "int4": 0.97, "q4_0": 0.97}
WEIGHT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cosine(a, b):
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def dir_size(d):
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(d, "**"), recursive=True) if os.path.isfile(p))


# ---------------------------------------------------------------- ONNX

def graphs(graph):
    import onnx
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graphs(g)


def attr(node, name, default=None):
    import onnx
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def expected_axes(model):
    """Weight name → the axis of its output channels, from the ops that consume it."""
    axes = {}
    inits = {t.name: t for g in graphs(model.graph) for t in g.initializer}
    for g in graphs(model.graph):
        for n in g.node:
            if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
                continue
            w = n.input[1]
            rank = len(inits[w].dims) if w in inits else None
            if n.op_type == "Conv":
                axes[w] = 0
            elif n.op_type == "ConvTranspose":
                axes[w] = 1
            elif n.op_type == "MatMul":
                axes[w] = -1 if rank is None else rank - 1
            elif n.op_type == "Gemm":
                axes[w] = 0 if attr(n, "transB", 0) else 1
    return axes


def onnx_structure(model, orig, variant, problems, figures):
    import onnx
    from onnx import TensorProto
    inits = {t.name: t for g in graphs(model.graph) for t in g.initializer}
    producers = {o: n for g in graphs(model.graph) for n in g.node for o in n.output}
    axes = expected_axes(orig)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    rewritten = 0
    for g in graphs(model.graph):
        for n in g.node:
            if n.op_type == "DequantizeLinear":
                x, scale = inits.get(n.input[0]), inits.get(n.input[1])
                if x is None or scale is None:
                    problems.append(f"{n.output[0]}: DequantizeLinear inputs are not initializers")
                    continue
                axis = attr(n, "axis", 1)
                block = attr(n, "block_size", 0)
                want = axes.get(n.output[0])
                rewritten += 1
                if variant == "int8":
                    if x.data_type != TensorProto.INT8:
                        problems.append(f"{n.output[0]}: quantized weight is not INT8")
                    if list(scale.dims) != [x.dims[axis]]:
                        problems.append(f"{n.output[0]}: scale shape {list(scale.dims)} is not per-channel [{x.dims[axis]}] on axis {axis}")
                    if want is not None and axis % len(x.dims) != want % len(x.dims):
                        problems.append(f"{n.output[0]}: axis {axis} but its output channels are on axis {want % len(x.dims)}")
                    if len(n.input) > 2:
                        zp = onnx.numpy_helper.to_array(inits[n.input[2]])
                        if zp.shape != (x.dims[axis],) or zp.any():
                            problems.append(f"{n.output[0]}: zero point is not all zeros per channel")
                elif variant == "int4":
                    if x.data_type != TensorProto.INT4 or block != 32 or axis != 0:
                        problems.append(f"{n.output[0]}: not INT4 blocks of 32 on axis 0")
                    want_shape = [math.ceil(x.dims[0] / 32), x.dims[1]]
                    if list(scale.dims) != want_shape:
                        problems.append(f"{n.output[0]}: scale shape {list(scale.dims)}, want {want_shape}")
            elif n.op_type == "Mul" and variant == "int8":
                cast = producers.get(n.input[0])
                if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits:
                    continue
                x, scale = inits[cast.input[0]], inits.get(n.input[1])
                rewritten += 1
                want = axes.get(n.output[0])
                if want is None:
                    continue
                want %= len(x.dims)
                shape = [1] * len(x.dims)
                shape[want] = x.dims[want]
                if scale is None or list(scale.dims) != shape:
                    problems.append(f"{n.output[0]}: scale shape {None if scale is None else list(scale.dims)} is not per-channel {shape}")
            elif n.op_type == "Cast" and variant == "fp16" and n.input[0] in inits:
                if inits[n.input[0]].data_type == TensorProto.FLOAT16:
                    rewritten += 1
    if variant == "int8" and opset >= 13 and any(n.op_type == "Mul" and n.output[0] in axes for g in graphs(model.graph) for n in g.node):
        problems.append("opset >= 13 but weights are dequantized with Mul instead of DequantizeLinear")
    if variant == "int4" and opset < 21:
        problems.append(f"int4 model at opset {opset}")
    # Every large weight of a weight op is rewritten.
    for name in axes:
        t = inits.get(name)
        if t is not None and t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 1024:
            if variant != "int4" or len(t.dims) == 2:
                problems.append(f"weight {name} is still float")
    figures["rewritten"] = rewritten
    if rewritten == 0:
        problems.append("no weight was rewritten")


def feeds_for(session, cond):
    rng = np.random.default_rng(7)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if i.type == "tensor(bool)":
            feeds[i.name] = np.array(cond)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def check_onnx(case, problems, figures):
    import onnx
    import onnxruntime as ort
    op = os.path.join(case["original"], "model.onnx")
    vp = os.path.join(case["output"], "model.onnx")
    variant = case["variant"]
    try:
        onnx.checker.check_model(vp, full_check=True)
    except Exception as e:  # noqa: BLE001 - any checker failure is the finding
        problems.append(f"onnx.checker: {e}")
    model, orig = onnx.load(vp), onnx.load(op)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("modelcache.source_sha256") != sha256(op):
        problems.append("metadata_props lack the source sha256")
    if meta.get("modelcache.variant") != variant or "modelcache.quantizer_version" not in meta:
        problems.append("metadata_props lack the variant or quantizer version")

    def io(m):
        init = {t.name for t in m.graph.initializer}
        ins = [(i.name, i.type.tensor_type.elem_type) for i in m.graph.input if i.name not in init]
        return ins, [(o.name, o.type.tensor_type.elem_type) for o in m.graph.output]
    if io(model) != io(orig):
        problems.append(f"graph inputs/outputs changed: {io(orig)} -> {io(model)}")
    onnx_structure(model, orig, variant, problems, figures)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s_orig = ort.InferenceSession(op, so, providers=["CPUExecutionProvider"])
    s_var = ort.InferenceSession(vp, so, providers=["CPUExecutionProvider"])
    has_bool = any(i.type == "tensor(bool)" for i in s_orig.get_inputs())
    worst = 1.0
    for cond in ([True, False] if has_bool else [True]):
        feeds = feeds_for(s_orig, cond)
        for a, b in zip(s_orig.run(None, feeds), s_var.run(None, feeds)):
            worst = min(worst, cosine(a, b))
    figures["cosine"] = round(worst, 6)
    if worst < MIN_COSINE[variant]:
        problems.append(f"output cosine {worst:.5f} < {MIN_COSINE[variant]}")
    figures["size_ratio"] = round(dir_size(case["output"]) / dir_size(case["original"]), 4)


# ---------------------------------------------------------------- safetensors

def check_safetensors(case, problems, figures):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    variant = case["variant"]
    shards = sorted(glob.glob(os.path.join(case["original"], "*.safetensors")))
    worst, worst_linear, quantized = 1.0, 1.0, 0
    out_tensors = {}
    rng = np.random.default_rng(3)
    for src in shards:
        name = os.path.basename(src)
        dst = os.path.join(case["output"], name)
        orig, var = load_file(src), load_file(dst)
        out_tensors[name] = var
        with safe_open(dst, "np") as f:
            meta = f.metadata() or {}
        if meta.get("modelcache.source_sha256") != sha256(src) or meta.get("modelcache.variant") != variant:
            problems.append(f"{name}: __metadata__ lacks the provenance")
        for key, w in orig.items():
            if variant == "int8" and f"{key}_scale" in var:
                q, s = var[key], var[f"{key}_scale"]
                quantized += 1
                if q.dtype != np.int8 or q.shape != w.shape:
                    problems.append(f"{key}: {q.dtype} {q.shape}, want int8 {w.shape}")
                    continue
                if s.shape != (w.shape[0], 1) or s.dtype != w.dtype:
                    problems.append(f"{key}_scale: {s.dtype} {s.shape}, want {w.dtype} {(w.shape[0], 1)}")
                    continue
                deq = q.astype(np.float32) * s.astype(np.float32)
                worst = min(worst, cosine(w, deq))
                x = rng.standard_normal((8, w.shape[1])).astype(np.float32)
                worst_linear = min(worst_linear, cosine(x @ w.T, x @ deq.T))
            else:
                v = var.get(key)
                if v is None:
                    problems.append(f"{key} missing")
                    continue
                want = {"fp16": {np.dtype(np.float32): np.float16}, "bf16": {}}.get(variant, {})
                if variant == "fp16" and w.dtype == np.float32 and v.dtype != np.float16:
                    problems.append(f"{key}: {v.dtype}, want float16")
                if variant == "bf16" and w.dtype in (np.float32, np.float16) and str(v.dtype) not in ("bfloat16", "|V2", "uint16"):
                    problems.append(f"{key}: {v.dtype}, want bfloat16")
                del want
                if str(v.dtype) == "bfloat16" or v.dtype.kind == "V":
                    v = (v.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                worst = min(worst, cosine(w, v.astype(np.float32)))
    figures["cosine"] = round(worst, 6)
    if variant == "int8":
        figures["linear_cosine"] = round(worst_linear, 6)
        figures["quantized"] = quantized
        if quantized == 0:
            problems.append("no tensor was quantized")
        if worst_linear < MIN_COSINE["int8"]:
            problems.append(f"Linear output cosine {worst_linear:.5f} < 0.99")
        if worst < 0.999:
            problems.append(f"dequantized weight cosine {worst:.5f} < 0.999")
    elif worst < MIN_COSINE[variant]:
        problems.append(f"cosine {worst:.5f} < {MIN_COSINE[variant]}")
    index = glob.glob(os.path.join(case["output"], "*.safetensors.index.json"))
    if index:
        with open(index[0]) as f:
            idx = json.load(f)
        want_map = {k: shard for shard, ts in out_tensors.items() for k in ts}
        if idx["weight_map"] != want_map:
            problems.append("index weight_map does not match the shards")
        total = sum(t.nbytes for ts in out_tensors.values() for t in ts.values())
        if idx["metadata"]["total_size"] != total:
            problems.append(f"index total_size {idx['metadata']['total_size']} != {total}")
    config = os.path.join(case["output"], "config.json")
    if variant == "int8" and os.path.exists(config):
        with open(config) as f:
            qc = json.load(f).get("quantization_config", {})
        w = qc.get("config_groups", {}).get("group_0", {}).get("weights", {})
        if qc.get("format") != "naive-quantized" or w.get("strategy") != "channel" or w.get("num_bits") != 8:
            problems.append(f"config.json quantization_config is not naive-quantized channel int8: {qc}")
    figures["size_ratio"] = round(dir_size(case["output"]) / dir_size(case["original"]), 4)


# ---------------------------------------------------------------- GGUF

def gguf_string(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return value.tobytes().decode() if field.types[0].name == "STRING" else int(value[0])


def check_gguf(case, problems, figures):
    import gguf
    from gguf import GGMLQuantizationType as Q
    src = glob.glob(os.path.join(case["original"], "*.gguf"))[0]
    dst = os.path.join(case["output"], os.path.basename(src))
    variant = case["variant"]
    orig, var = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    # GGUF's int8 and int4 are its Q8_0 and Q4_0: one build each, recorded under those names.
    built = {"int8": "q8_0", "int4": "q4_0"}.get(variant, variant)
    if gguf_string(var, "modelcache.source_sha256") != sha256(src) or gguf_string(var, "modelcache.variant") != built:
        problems.append("GGUF key/values lack the provenance")
    if gguf_string(var, "general.quantization_version") != 2:
        problems.append("general.quantization_version is not 2")
    if var.alignment != orig.alignment:
        problems.append(f"alignment {var.alignment} != {orig.alignment}")
    for t in var.tensors:
        if t.data_offset % var.alignment:
            problems.append(f"{t.name} is not aligned")
    target = {"fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "int8": Q.Q8_0, "q4_0": Q.Q4_0, "int4": Q.Q4_0}[variant]
    by_name = {t.name: t for t in var.tensors}
    worst, exact, converted = 1.0, 0, 0
    for t in orig.tensors:
        v = by_name[t.name]
        src_values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        should = (t.tensor_type in (Q.F32, Q.F16) and len(t.shape) >= 2
                  and (target in (Q.F16, Q.BF16) or t.shape[0] % 32 == 0) and t.tensor_type != target)
        if v.tensor_type != (target if should else t.tensor_type):
            problems.append(f"{t.name}: {t.tensor_type.name} became {v.tensor_type.name}")
            continue
        if not should:
            continue
        converted += 1
        if target in (Q.Q8_0, Q.Q4_0):
            ref = gguf.quants.quantize(src_values, target)
            if np.array_equal(np.asarray(v.data).reshape(-1), ref.reshape(-1)):
                exact += 1
            else:
                problems.append(f"{t.name}: {target.name} bytes differ from gguf.quants.quantize")
        worst = min(worst, cosine(src_values, gguf.quants.dequantize(v.data, v.tensor_type)))
    figures.update(cosine=round(worst, 6), converted=converted, bit_exact=exact)
    if converted == 0:
        problems.append("no tensor was converted")
    if worst < MIN_COSINE[variant]:
        problems.append(f"cosine {worst:.5f} < {MIN_COSINE[variant]}")
    figures["size_ratio"] = round(os.path.getsize(dst) / os.path.getsize(src), 4)


def main():
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    all_ok = True
    for case in cases:
        problems, figures = [], {}
        try:
            {"onnx": check_onnx, "safetensors": check_safetensors, "gguf": check_gguf}[case["format"]](case, problems, figures)
        except Exception as e:  # noqa: BLE001 - a loader refusing the file is the finding
            problems.append(f"{type(e).__name__}: {e}")
        ok = not problems
        all_ok &= ok
        print(json.dumps({"name": case["name"], "ok": ok, "problems": problems, "figures": figures}), flush=True)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
