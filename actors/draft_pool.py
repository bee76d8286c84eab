"""Draft replicas behind one Drafter: placement by least outstanding work, parallel proposals,
failover. A failed replica's sequences move to a live one (their context is re-prefilled there:
the first request carries it whole) or, with none left, fall back to K = 0 (plain decoding).
Either way the output distribution is unchanged and no request is lost: the same context and
seed give the same block on any replica, and an empty block is exact by construction. A failed
replica that is still listed (a missed deadline under load) rejoins once it answers a probe.
A block over the channel's message limits (wire.DraftTooLarge) is no replica's failure: it reaches
the caller (the round fails, naming the sizes), never a silent K = 0."""

from __future__ import annotations

import time
import uuid

import grpc

from specserve.cluster.runtime.drafters import Drafter
from specserve.cluster.speculation.round import DraftBlock, DraftRequest, DrafterCapabilities

from .remote_drafter import RemoteDrafter

_EMPTY = DraftBlock([], None)
PROBE_INTERVAL_S = 1.0  # how often a failed, still listed replica is asked whether it is back
# RESOURCE_EXHAUSTED here is a replica out of resources; a message over the size limits is DraftTooLarge
FAILURES = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class DraftPool(Drafter):
    name = "pool"

    def __init__(self, addresses: list[str], timeout_s: float = 10.0, tls=None, max_message_bytes: int | None = None):
        self.timeout_s = timeout_s
        self.tls = tls  # cluster.draft_tls: mutual TLS to every replica
        self.max_message_bytes = max_message_bytes  # every channel's message limits (wire.draft_message_limit)
        self.owner = uuid.uuid4().hex  # this pool's (engine's) sequences on shared replicas
        self.replicas = [self._replica(a) for a in addresses]
        self.alive = [True] * len(addresses)
        self.placement: dict[int, int] = {}  # seq_id -> replica index, sticky
        self.moved = 0  # sequences moved off a failed replica
        self.fallbacks = 0  # blocks given up (K = 0) because no replica was left
        self.last_compute_s = 0.0  # drafting time of the last round, without the network
        self.served = [0] * len(addresses)  # blocks each replica has drafted
        self.rejoined = 0  # failed replicas back in the pool
        self._listed = set(addresses)
        self._probes: dict[int, grpc.Future] = {}  # failed, still listed replica -> its health probe
        self._probe_at: dict[int, float] = {}  # no new probe before this time

    def _replica(self, address: str) -> RemoteDrafter:
        return RemoteDrafter(address, self.timeout_s, owner=self.owner, tls=self.tls, max_message_bytes=self.max_message_bytes)

    @property
    def capabilities(self) -> DrafterCapabilities:
        """Passes the tree budget on (the replicas' drafter decides: chains or trees); drafts one
        sequence per live replica at once."""
        return DrafterCapabilities(drafts_trees=True, parallelism=max(1, sum(self.alive)))

    def load(self) -> list[int]:
        """Outstanding work per replica: the sequences placed on it."""
        counts = [0] * len(self.replicas)
        for i in self.placement.values():
            counts[i] += 1
        return counts

    def _place(self, seq_id: int) -> int | None:
        i = self.placement.get(seq_id)
        if i is not None and self.alive[i]:
            return i
        live = [j for j, ok in enumerate(self.alive) if ok]
        if not live:
            self.placement.pop(seq_id, None)
            return None
        load = self.load()
        j = min(live, key=lambda j: (load[j], j))
        if i is not None:
            self.moved += 1
        self.placement[seq_id] = j
        return j

    def _fail(self, i: int) -> None:
        self.alive[i] = False

    def set_addresses(self, addresses: list[str]) -> None:
        """The replicas now running: new addresses join; a missing one counts as failed (its
        sequences move on their next block). With none, blocks are empty (K = 0)."""
        self._listed = set(addresses)
        known = {r.address for r in self.replicas}
        for i, r in enumerate(self.replicas):
            if r.address not in self._listed:
                if self.alive[i]:
                    self._fail(i)
                self._probes.pop(i, None)
                r.close()
        for a in addresses:
            if a not in known:
                self.replicas.append(self._replica(a))
                self.alive.append(True)
                self.served.append(0)
        self._probe_failed()

    def _probe_failed(self) -> None:
        """Without waiting: starts a health probe of each failed, still listed replica (at most one
        per PROBE_INTERVAL_S) and lets in those whose probe answered."""
        now = time.monotonic()
        for i, r in enumerate(self.replicas):
            if self.alive[i] or r.address not in self._listed:
                continue
            probe = self._probes.get(i)
            if probe is None:
                if now >= self._probe_at.get(i, 0.0):
                    self._probes[i] = r.probe()
                    self._probe_at[i] = now + PROBE_INTERVAL_S
            elif probe.done():
                del self._probes[i]
                if probe.exception() is None:
                    self._rejoin(i)

    def _rejoin(self, i: int) -> None:
        """Frees the contexts it still holds of sequences that moved away, then takes new work."""
        r = self.replicas[i]
        try:
            for seq_id in r.held():
                if self.placement.get(seq_id) != i:
                    r.release(seq_id)
        except grpc.RpcError:
            return  # probed again later
        self.alive[i] = True
        self.rejoined += 1

    def wire_bytes(self) -> tuple[int, int]:
        """(sent, received) gRPC message bytes over all replicas so far."""
        return sum(r.bytes_sent for r in self.replicas), sum(r.bytes_received for r in self.replicas)

    def propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        self._probe_failed()
        before = [r.compute_s for r in self.replicas]
        blocks = self._propose_many(requests)
        # replicas draft in parallel: the round's drafting time is the busiest replica's
        self.last_compute_s = max((r.compute_s - b for r, b in zip(self.replicas, before)), default=0.0)
        return blocks

    def _propose_many(self, requests: list[DraftRequest]) -> list[DraftBlock]:
        pending = []
        for request in requests:  # all in flight at once
            i = self._place(request.seq_id)
            try:
                pending.append((i, self.replicas[i].start(request) if i is not None else None))
            except grpc.RpcError as e:
                if e.code() not in FAILURES:
                    raise
                self._fail(i)
                pending.append((i, None))
        blocks = []
        for request, (i, p) in zip(requests, pending):
            if p is not None:
                try:
                    blocks.append(self.replicas[i].finish(p))
                    self.served[i] += 1
                    continue
                except grpc.RpcError as e:
                    if e.code() not in FAILURES:
                        raise
                    self._fail(i)
            blocks.append(self._retry(request))
        return blocks

    def _retry(self, request: DraftRequest) -> DraftBlock:
        """The sequence's replica failed: move it until one answers, else plain decoding."""
        while (i := self._place(request.seq_id)) is not None:
            replica = self.replicas[i]
            replica.forget(request.seq_id)  # the new replica gets the whole context: a re-prefill
            try:
                block = replica.finish(replica.start(request))
                self.served[i] += 1
                return block
            except grpc.RpcError as e:
                if e.code() not in FAILURES:
                    raise
                self._fail(i)
        self.fallbacks += 1
        return _EMPTY

    def release(self, seq_id: int) -> None:
        i = self.placement.pop(seq_id, None)
        if i is not None and self.alive[i]:
            try:
                self.replicas[i].release(seq_id)
            except grpc.RpcError:
                self._fail(i)

    def close(self) -> None:
        for r in self.replicas:
            r.close()
