"""The draft service: hosts one drafter behind gRPC, keeping each sequence's committed context.

Sequences are keyed by (owner, seq_id): each engine numbers its own, and engines share replicas.
A sequence not drafted for `idle_s` is freed by sweep() (DraftHost calls it every idle_s / 4 on
the drafter's thread): its engine may have died without releasing it; an engine that comes back
to it gets FAILED_PRECONDITION and resends the context whole.

Both message limits are `max_message_bytes` (wire.draft_message_limit of the config's largest block);
a block that would still exceed them is refused with OUT_OF_RANGE (the client raises DraftTooLarge)."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
from specserve.internal.v1 import draft_pb2 as pb
from specserve.internal.v1 import draft_pb2_grpc as pb_grpc

from specserve.cluster.runtime.drafters import Drafter
from specserve.cluster.speculation import InvalidRequest, SamplingParams
from specserve.cluster.speculation.round import DraftRequest

from .wire import GRPC_DEFAULT_MESSAGE_BYTES, encode_probs, message_options

MAX_K = 64


class DraftServicer(pb_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, idle_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 max_message_bytes: int = GRPC_DEFAULT_MESSAGE_BYTES):
        self.drafter = drafter
        self.max_message_bytes = max_message_bytes  # the server's send and receive limits (create_server sets them)
        self.idle_s = idle_s
        self.clock = clock
        self.contexts: dict[tuple[str, int], list[int]] = {}  # (owner, seq_id) -> committed context
        self._ids: dict[tuple[str, int], int] = {}  # (owner, seq_id) -> the drafter's sequence id
        self._used: dict[tuple[str, int], float] = {}  # -> when it was last drafted
        self._next_id = itertools.count()
        self.swept = 0  # sequences freed for being idle

    def Propose(self, request: pb.ProposeRequest, context: grpc.ServicerContext) -> pb.ProposeResponse:
        key = (request.owner, request.seq_id)
        tokens = [] if request.reset else self.contexts.get(key)
        if tokens is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"seq_id {request.seq_id}: unknown sequence; send reset")
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
        self.contexts[key] = tokens
        self._used[key] = self.clock()
        seq = self._ids.setdefault(key, next(self._next_id))
        start = time.perf_counter()
        draft = DraftRequest(seq, tokens, request.k, params, request.seed, max_nodes=request.max_nodes,
                             max_branch=max(1, request.max_branch))
        block = self.drafter.propose_many([draft])[0]
        response = pb.ProposeResponse(token_ids=block.token_ids, compute_s=time.perf_counter() - start,
                                      parents=block.parents or ())
        if block.probs is not None:
            response.probs.CopyFrom(encode_probs(block.probs))
        if (size := response.ByteSize()) > self.max_message_bytes:
            vocab = "" if block.probs is None else f" of q at a vocabulary of {block.probs.shape[1]} ids"
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"draft block: {len(block)} nodes{vocab} take {size} bytes, above the draft channel's limit of "
                          f"{self.max_message_bytes} (set from speculation.max_draft_tokens and speculation.tree.max_nodes; "
                          f"this request asked for k {request.k}, max_nodes {request.max_nodes})")
        return response

    def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        self._forget((request.owner, request.seq_id))
        return pb.ReleaseResponse()

    def _forget(self, key: tuple[str, int]) -> None:
        self.contexts.pop(key, None)
        self._used.pop(key, None)
        seq = self._ids.pop(key, None)
        if seq is not None:
            self.drafter.release(seq)

    def sweep(self) -> int:
        """Frees the sequences not drafted for idle_s; returns how many. Call on the drafter's thread."""
        now = self.clock()
        idle = [key for key, used in self._used.items() if now - used > self.idle_s]
        for key in idle:
            self._forget(key)
        self.swept += len(idle)
        return len(idle)

    def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return pb.HealthResponse(drafter=self.drafter.name, sequences=len(self.contexts))


def create_server(drafter: Drafter, address: str = "127.0.0.1:0", servicer: DraftServicer | None = None,
                  worker: ThreadPoolExecutor | None = None, tls=None) -> tuple[grpc.Server, int]:
    """A started-later server and its bound port. One worker thread (`worker`: the one that built
    the drafter): calls on the drafter serialise. tls (cluster.draft_tls): mutual TLS. The message
    limits are the servicer's max_message_bytes."""
    from .tls import server_credentials

    servicer = servicer or DraftServicer(drafter)
    server = grpc.server(worker or ThreadPoolExecutor(max_workers=1), options=message_options(servicer.max_message_bytes))
    pb_grpc.add_DraftServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, server_credentials(tls))
    if port == 0:
        raise OSError(f"draft service: cannot bind {address}")
    return server, port
