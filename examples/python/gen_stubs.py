"""Generates the Python gRPC stubs of modelcache.v1.Agent with grpcio-tools.

    python gen_stubs.py [OUT_DIR]     (default: ./stubs)
"""

import os
import sys
from importlib import resources

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def generate(out):
    from grpc_tools import protoc

    os.makedirs(out, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    proto = os.path.join(PROTO_ROOT, "modelcache", "v1", "agent.proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        proto,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "stubs"))
