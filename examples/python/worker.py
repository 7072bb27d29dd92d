"""An inference worker: asks the agent daemon for a model, loads what it returns with
onnxruntime and runs it once.

    python worker.py [--socket unix:///run/modelcache/agent.sock] resnet50:int8

Prints one JSON line: the model's directory, its input and output shapes, and the
index of the largest output (the predicted class for an image classifier)."""

import argparse
import glob
import json
import os

import numpy as np
import onnxruntime as ort

from modelcache_agent import DEFAULT_SOCKET, ensure_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("reference")
    parser.add_argument("--socket", default=DEFAULT_SOCKET)
    args = parser.parse_args()

    model_dir = ensure_model(args.reference, target=args.socket)
    [model_file] = glob.glob(os.path.join(model_dir, "*.onnx"))
    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    [out] = session.run(None, {inp.name: x})
    print(
        json.dumps(
            {
                "model_dir": model_dir,
                "input": shape,
                "output": list(out.shape),
                "argmax": int(np.argmax(out)),
            }
        )
    )


if __name__ == "__main__":
    main()
