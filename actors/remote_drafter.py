"""A Drafter whose proposals come from a draft service over gRPC."""

from __future__ import annotations

import grpc
from specserve.internal.v1 import draft_pb2 as pb
from specserve.internal.v1 import draft_pb2_grpc as pb_grpc

from specserve.cluster.speculation.round import DraftBlock, DraftRequest, Drafter, DrafterCapabilities

from .wire import DraftTooLarge, decode_probs


class RemoteDrafter(Drafter):
    """Sends each sequence's context incrementally; resends it whole when the service lost it."""

    capabilities = DrafterCapabilities(drafts_trees=True)  # passes the tree budget on; the replica's drafter decides

    def __init__(self, address: str, timeout_s: float = 30.0, name: str = "remote", owner: str = "", tls=None,
                 max_message_bytes: int | None = None):
        self.address = address
        self.tls = tls  # cluster.draft_tls: mutual TLS
        self.max_message_bytes = max_message_bytes  # the channel's message limits (wire.draft_message_limit); None: gRPC's
        self.name = name
        self.owner = owner  # names this engine's sequences on the service (seq_ids are per engine)
        self.timeout_s = timeout_s
        self._channel = None
        self._open()
        self._sent: dict[int, int] = {}  # context length the service holds per sequence
        self.bytes_sent = 0
        self.bytes_received = 0
        self.compute_s = 0.0  # the service's drafting time, summed over blocks

    def _open(self) -> None:
        from .tls import channel

        self._channel = channel(self.address, self.tls, self.max_message_bytes)
        self._stub = pb_grpc.DraftServiceStub(self._channel)

    def start(self, draft: DraftRequest):
        """Sends a proposal without waiting; finish() collects it."""
        sent = self._sent.get(draft.seq_id)
        request = self._request(draft, sent)
        self.bytes_sent += request.ByteSize()
        return (self._stub.Propose.future(request, timeout=self.timeout_s), draft, sent)

    def finish(self, pending) -> DraftBlock:
        """The block of a started proposal; raises grpc.RpcError when the service fails, and
        DraftTooLarge when the block does not fit the channel's message limits."""
        future, draft, sent = pending
        try:
            response = self._response(future, draft, sent)
        except grpc.RpcError as e:
            if not _too_large(e):
                raise
            raise DraftTooLarge(f"draft service {self.address}: {e.details()}") from None
        self._sent[draft.seq_id] = len(draft.context)
        self.bytes_received += response.ByteSize()
        self.compute_s += response.compute_s
        probs = decode_probs(response.probs) if response.HasField("probs") else None
        parents = tuple(response.parents) or None
        if parents is not None and (len(parents) != len(response.token_ids)
                                    or any(not -1 <= p < j for j, p in enumerate(parents))):
            raise ValueError(f"draft service {self.address}: a malformed tree (parents {list(parents)})")
        return DraftBlock(list(response.token_ids), probs, parents)

    def _response(self, future, draft: DraftRequest, sent: int | None) -> pb.ProposeResponse:
        try:
            return future.result()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or sent is None:
                raise
            request = self._request(draft, None)  # the service lost track: resend the whole context
            self.bytes_sent += request.ByteSize()
            return self._stub.Propose(request, timeout=self.timeout_s)

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        return [self.finish(p) for p in [self.start(r) for r in requests]]

    def _request(self, draft: DraftRequest, sent: int | None) -> pb.ProposeRequest:
        context, params = draft.context, draft.params
        return pb.ProposeRequest(
            seq_id=draft.seq_id,
            new_tokens=context if sent is None else context[sent:],
            context_len=len(context),
            reset=sent is None,
            k=draft.k,
            sampling=pb.Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p),
            seed=draft.seed,
            max_nodes=draft.max_nodes,
            max_branch=draft.max_branch,
            owner=self.owner,
        )

    def forget(self, seq_id: int) -> None:
        """Drops local bookkeeping only (the sequence moved away or the service died)."""
        self._sent.pop(seq_id, None)

    def held(self) -> list[int]:
        """The sequences whose context the service may hold (sent, not released)."""
        return list(self._sent)

    def release(self, seq_id: int) -> None:
        if seq_id in self._sent:
            self._stub.Release(pb.ReleaseRequest(seq_id=seq_id, owner=self.owner), timeout=self.timeout_s)
            del self._sent[seq_id]  # kept on failure: a later release may still free it

    def health(self) -> pb.HealthResponse:
        return self._stub.Health(pb.HealthRequest(), timeout=self.timeout_s)

    def probe(self) -> grpc.Future:
        """A health call without waiting (reopens a closed channel)."""
        if self._channel is None:
            self._open()
        return self._stub.Health.future(pb.HealthRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _too_large(e: grpc.RpcError) -> bool:
    """A message over the channel's limits: refused by the service (OUT_OF_RANGE), or stopped by
    gRPC itself on either end (RESOURCE_EXHAUSTED, "... message larger than max ...")."""
    code = e.code()
    return code == grpc.StatusCode.OUT_OF_RANGE or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (e.details() or ""))
