"""Fetches a model from a node with grpcio (the gRPC C core) and the protobuf classes that
grpcio-tools generates from cache.proto: a client whose HTTP/2, gRPC framing and protobuf
decoding share no code with the node's.

    grpc_fetch.py PROTO_ROOT HOST:PORT REFERENCE

Prints one JSON object: the call's status code name and details, the manifest's files,
and for each file received its size and SHA-256 (chunks must arrive in order, each at the
offset the file has reached)."""

import hashlib
import importlib
import json
import os
import sys
import tempfile
from importlib import resources

import grpc
from grpc_tools import protoc


def generated_module(proto_root):
    out = tempfile.mkdtemp()
    include = str(resources.files("grpc_tools") / "_proto")
    proto = os.path.join(proto_root, "modelcache", "v1", "cache.proto")
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", proto]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, out)
    return importlib.import_module("modelcache.v1.cache_pb2")


def main():
    proto_root, target, reference = sys.argv[1:4]
    pb = generated_module(proto_root)
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    fetch = channel.unary_stream(
        "/modelcache.v1.ModelCache/Fetch",
        request_serializer=pb.FetchRequest.SerializeToString,
        response_deserializer=pb.FetchResponse.FromString,
    )
    manifest, files, chunks = None, {}, 0
    result = {"code": "OK", "details": ""}
    try:
        for message in fetch(pb.FetchRequest(reference=reference), timeout=60):
            if message.HasField("manifest"):
                manifest = message.manifest
                continue
            chunk = message.chunk
            path = manifest.files[chunk.file_index].path
            data = files.setdefault(path, bytearray())
            if chunk.offset != len(data):
                sys.exit(f"{path}: chunk at {chunk.offset}, expected {len(data)}")
            if len(chunk.blake3) != 32:
                sys.exit(f"{path}: chunk at {chunk.offset} has a {len(chunk.blake3)}-byte digest")
            data.extend(chunk.data)
            chunks += 1
    except grpc.RpcError as e:
        result = {"code": e.code().name, "details": e.details()}
    result["manifest"] = [f.path for f in manifest.files] if manifest else []
    result["chunks"] = chunks
    result["files"] = {
        path: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for path, data in files.items()
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
