"""ensure_model(): the one call an inference worker makes to the modelcache agent daemon.

The gRPC stubs are generated from proto/modelcache/v1/agent.proto with grpcio-tools
(`python gen_stubs.py`, or on first import when they are missing).

    from modelcache_agent import ensure_model
    model_dir = ensure_model("resnet50:int8")   # DIR/resnet50/@int8, present and verified
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STUBS = os.environ.get("MODELCACHE_AGENT_STUBS", os.path.join(HERE, "stubs"))
DEFAULT_SOCKET = os.environ.get("CACHE_AGENT_SOCKET", "unix:///run/modelcache/agent.sock")


def _stubs():
    if not os.path.exists(os.path.join(STUBS, "modelcache", "v1", "agent_pb2_grpc.py")):
        sys.path.insert(0, HERE)
        import gen_stubs

        gen_stubs.generate(STUBS)
    if STUBS not in sys.path:
        sys.path.insert(0, STUBS)
    from modelcache.v1 import agent_pb2, agent_pb2_grpc

    return agent_pb2, agent_pb2_grpc


def ensure_model(reference, target=DEFAULT_SOCKET, lease=False, timeout=None):
    """Returns the local directory of `reference` once it is present and verified (the
    daemon fetches it first when needed). With `lease`, returns (path, lease_id): the model
    is not evicted until `release(lease_id)` or until this process's channel closes.

    Raises grpc.RpcError with the daemon's code and message: NOT_FOUND for an unknown
    model, INVALID_ARGUMENT for a malformed reference, UNAVAILABLE when no node answers
    and the model is not on disk."""
    pb, rpc = _stubs()
    channel = _channel(target)
    response = rpc.AgentStub(channel).Ensure(
        pb.EnsureRequest(reference=reference, lease=lease), timeout=timeout
    )
    if lease:
        return response.path, response.lease_id
    return response.path


def release(lease_id, target=DEFAULT_SOCKET):
    pb, rpc = _stubs()
    return rpc.AgentStub(_channel(target)).Release(pb.ReleaseRequest(lease_id=lease_id)).released


_channels = {}


def _channel(target):
    # One channel per target for the process: leases live as long as it does.
    import grpc

    if target not in _channels:
        # Over a unix socket grpcio would send the socket's path as the HTTP/2 authority,
        # which is not a valid one: name the peer "localhost" instead.
        options = [("grpc.default_authority", "localhost")] if target.startswith("unix:") else []
        _channels[target] = grpc.insecure_channel(target, options=options)
    return _channels[target]
