"""The draft service: hosts one drafter behind gRPC, keeping each sequence's committed context."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from specserve.internal.v1 import draft_pb2 as pb
from specserve.internal.v1 import draft_pb2_grpc as pb_grpc

from cluster.runtime.drafters import Drafter
from cluster.speculation import InvalidRequest, SamplingParams
from cluster.speculation.round import DraftRequest

from .wire import encode_probs

MAX_K = 64


class DraftServicer(pb_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.contexts: dict[int, list[int]] = {}

    def Propose(self, request: pb.ProposeRequest, context: grpc.ServicerContext) -> pb.ProposeResponse:
        seq = request.seq_id
        tokens = [] if request.reset else self.contexts.get(seq)
        if tokens is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"seq_id {seq}: unknown sequence; send reset")
        if len(tokens) + len(request.new_tokens) != request.context_len:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"context_len: have {len(tokens)} + {len(request.new_tokens)} new tokens, "
                f"expected {request.context_len}; send reset",
            )
        if request.context_len == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context_len: the context must not be empty")
        if request.k > MAX_K:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k: at most {MAX_K}, got {request.k}")
        if request.max_nodes > MAX_K:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_nodes: at most {MAX_K}, got {request.max_nodes}")
        s = request.sampling
        try:
            params = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tokens = tokens + list(request.new_tokens)
        self.contexts[seq] = tokens
        start = time.perf_counter()
        draft = DraftRequest(seq, tokens, request.k, params, request.seed, max_nodes=request.max_nodes,
                             max_branch=max(1, request.max_branch))
        block = self.drafter.propose_many([draft])[0]
        response = pb.ProposeResponse(token_ids=block.token_ids, compute_s=time.perf_counter() - start,
                                      parents=block.parents or ())
        if block.probs is not None:
            response.probs.CopyFrom(encode_probs(block.probs))
        return response

    def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        self.contexts.pop(request.seq_id, None)
        self.drafter.release(request.seq_id)
        return pb.ReleaseResponse()

    def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return pb.HealthResponse(drafter=self.drafter.name, sequences=len(self.contexts))


def create_server(drafter: Drafter, address: str = "127.0.0.1:0", servicer: DraftServicer | None = None,
                  worker: ThreadPoolExecutor | None = None) -> tuple[grpc.Server, int]:
    """A started-later server and its bound port. One worker thread (`worker`: the one that built
    the drafter): calls on the drafter serialise."""
    server = grpc.server(worker or ThreadPoolExecutor(max_workers=1))
    pb_grpc.add_DraftServiceServicer_to_server(servicer or DraftServicer(drafter), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"draft service: cannot bind {address}")
    return server, port
