"""The coordinator: a Ray actor that owns the sequences. It creates the tensor-parallel target group
and the draft replicas, and runs rounds of the speculative engine over them: drafts for every
active sequence in parallel over gRPC, one batched verify call, rejection sampling here, commits
and rollbacks on both sides. Requests join and leave between rounds (continuous batching).

A target rank that dies fails the round: its requests end with Unavailable (retriable), and the
group is rebuilt in the same placement group before the next round (rebuilt: its count).

Rounds run on one worker thread; the actor's event loop only takes requests and hands out
results, so new requests queue while a round is in flight and join the next one. That thread
also loads the models and calibrates: every torch op of the process runs on it, because each
thread that enters an OpenMP region keeps a team of its own, and a second team on the same
cores slowed the rounds by half (docs/threads.md).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch

from specserve.cluster.speculation import Unavailable

from .metrics import RoundMetrics


class _Sink(asyncio.Queue):
    """Where a request's StepOutputs (or an exception) arrive; seq_id is set once it joined."""

    seq_id: int | None = None
    done: bool = False


class Coordinator:
    """Runs in its own Ray actor (CoordinatorActor, `--distributed`) or inside a Serve engine
    replica. draft_addresses given: the draft replicas are someone else's (a Serve deployment)
    and set_draft_addresses() follows them; else this creates cluster.draft_replicas of its own.
    Target rank 0 runs in this process (driver mode); placement_group given: rank i >= 1 takes
    its bundle i (bundle 0 holds this process)."""

    def __init__(self, config_data: dict, draft_addresses: list[str] | None = None, placement_group=None):
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rounds")
        self._worker.submit(self._build, config_data, draft_addresses, placement_group).result()
        self.metrics = RoundMetrics()
        self._pending: list[tuple[object, list[int], _Sink]] = []
        self._cancelled: list[_Sink] = []
        self._sinks: dict[int, _Sink] = {}
        self._loop: asyncio.Task | None = None
        self.rebuilt = 0  # target groups rebuilt after a failure
        self.broken: Exception | None = None  # set when a rebuild failed: the replica is unhealthy

    def _build(self, config_data: dict, draft_addresses: list[str] | None, placement_group) -> None:
        from specserve.cluster.config import parse_config
        from specserve.cluster.runtime.calibration import calibration_key
        from specserve.cluster.runtime.factory import build_drafter, draft_sources, engine_from_config
        from dataclasses import replace

        from specserve.cluster.runtime.models import LoadedModel, load_model_config, load_tokenizer

        from .draft_pool import DraftPool
        from .draft_replica import DraftReplica
        from .wire import draft_message_limit

        config = parse_config(config_data, "coordinator config")
        c, t = config.cluster, config.target
        self.config = config
        self._placement_group = placement_group
        self._patches = []  # changes a drafter made to the target (PaSS): applied again to a rebuilt group
        self.group = self._new_group()
        self.replicas = []
        if draft_addresses is None:
            self.replicas = [
                # not restarted by Ray: the pool moves a dead replica's sequences (docs/operations.md)
                DraftReplica.options(**c.draft_replica.options(), max_restarts=0).remote(
                    config_data, None, c.draft_replica.threads, None
                )
                for _ in range(c.draft_replicas)
            ]
            draft_addresses = ray.get([r.address.remote() for r in self.replicas])
        if c.draft_replicas:
            # the channels' message limits fit the config's largest block of q (the replicas set the same)
            limit = draft_message_limit(self.group.vocab_size, config.speculation.block_nodes)
            self.pool = DraftPool(draft_addresses, c.draft_timeout_s, c.draft_tls, limit)
            drafter = self.pool
        else:  # the drafter runs here, in the coordinator
            self.pool = None
            whole = self.group.whole_model
            loaded = None if whole is None else LoadedModel(whole, load_tokenizer(t.model), t.model, self.group.dtype)
            sources = draft_sources(config, loaded)
            if whole is None:  # sharded: a drafter's change to the target goes to every rank, now and after a rebuild
                sources = replace(sources, patch_target=self._patch_target,
                                  target_signature=lambda: {"hidden_size": int(load_model_config(t.model).hidden_size),
                                                            "vocab_size": self.group.vocab_size})
            drafter = build_drafter(config.draft.drafter, config.draft, sources)
        key = calibration_key(
            model=t.model, dtype=self.group.dtype, tp_size=c.tp_size, target_rank=c.target_rank.model_dump(),
            draft_replicas=c.draft_replicas, drafter=config.draft.drafter, draft=config.draft.model_dump(),
            max_k=config.speculation.max_draft_tokens, gpu=torch.cuda.is_available(),
        )
        self.engine = engine_from_config(config, self.group, load_tokenizer(t.model), drafter, key)
        self.engine.prepare()  # measures step costs for adaptive K before the first request

    def _new_group(self):
        from .target import TargetGroup

        c, t = self.config.cluster, self.config.target
        # target rank 0 runs here (its threads are set by it): a verify costs no Ray call
        group = TargetGroup(t.model, t.dtype, c.tp_size, c.target_rank, placement_group=self._placement_group,
                            first_bundle=1, driver_rank=True, collective_timeout_s=c.collective_timeout_s)
        for change in self._patches:
            group.patch(change)
        return group

    def _patch_target(self, change):
        self._patches.append(change)
        return self.group.patch(change)

    def _rebuild_target(self) -> None:
        """After a rank failed: every sequence is gone; a new group takes the next rounds."""
        self._sinks.clear()
        self.group.shutdown()
        try:
            self.group = self._new_group()
        except Exception as e:  # noqa: BLE001 - the replica reports itself unhealthy: Serve replaces it
            self.broken = e
            raise
        self.engine.reset_target(self.group)
        self.rebuilt += 1

    # -- requests -------------------------------------------------------------------------
    async def ready(self) -> dict:
        return {"vocab_size": self.group.vocab_size, "tp_size": self.group.tp_size, "draft_replicas": len(self.replicas),
                "dtype": self.group.dtype}

    async def generate(self, request):
        """The whole result of one request; joins the running batch."""
        sink = self._submit(request)
        try:
            while True:
                out = await self._next(sink)
                if out.result is not None:
                    return out.result
        finally:
            self._drop(sink)

    async def stream(self, request):
        """StepOutputs of one request as rounds produce them (call with num_returns="streaming");
        a consumer that goes away aborts the sequence."""
        sink = self._submit(request)
        try:
            while True:
                out = await self._next(sink)
                yield out
                if out.result is not None:
                    return
        finally:
            self._drop(sink)

    def _submit(self, request) -> _Sink:
        if self.broken is not None:
            raise Unavailable(f"this engine's target failed and could not be rebuilt ({self.broken})")
        ids = self.engine.validate(request)  # InvalidRequest reaches the caller, naming the field
        sink = _Sink()
        self._pending.append((request, ids, sink))
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())
        return sink

    @staticmethod
    async def _next(sink: _Sink):
        out = await sink.get()
        if isinstance(out, BaseException):
            sink.done = True
            raise out
        if out.result is not None:
            sink.done = True
        return out

    def _drop(self, sink: _Sink) -> None:
        if not sink.done:  # the caller went away (cancelled): free its sequence
            sink.done = True
            self._cancelled.append(sink)

    # -- rounds ---------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or self._cancelled or self._sinks:
            pending, self._pending = self._pending, []
            cancelled, self._cancelled = self._cancelled, []
            try:
                outputs = await loop.run_in_executor(self._worker, self._round, pending, cancelled)
            except Exception as e:  # noqa: BLE001 - every waiting request learns of it
                for sink in list(self._sinks.values()) + [s for _, _, s in pending if s.seq_id is None]:
                    sink.put_nowait(e)
                if self.group.broken:
                    try:
                        await loop.run_in_executor(self._worker, self._rebuild_target)
                    except Exception:  # noqa: BLE001 - self.broken says it; the queued learn it too
                        for _, _, sink in self._pending:
                            sink.put_nowait(Unavailable(f"this engine's target could not be rebuilt ({self.broken})"))
                        self._pending = []
                        return
                else:
                    await loop.run_in_executor(self._worker, self._abort_all)
                continue
            for out in outputs:
                sink = self._sinks.get(out.seq_id)
                if sink is not None:
                    sink.put_nowait(out)
                if out.result is not None:
                    self._sinks.pop(out.seq_id, None)

    def _round(self, pending, cancelled) -> list:
        for sink in cancelled:
            if sink.seq_id is not None and self._sinks.pop(sink.seq_id, None) is not None:
                self.engine.abort(sink.seq_id)
        for request, ids, sink in pending:
            if sink.done:  # cancelled before it joined
                continue
            sink.seq_id = self.engine.add_request(request, ids)
            self._sinks[sink.seq_id] = sink
        self.metrics.gauges(len(self._pending), len(self._sinks), self.live_drafts)
        if not self.engine.has_unfinished():
            return []
        before = self._wire_bytes()
        start = time.perf_counter()
        outputs = self.engine.step()
        round_s = time.perf_counter() - start
        after = self._wire_bytes()
        r = self.engine.last_round
        draft_compute = self.pool.last_compute_s if self.pool is not None else r.draft_s
        self.metrics.record(
            round_s=round_s,
            phases={
                "prefill": r.prefill_s,
                "draft": r.draft_s,
                "draft_network": max(r.draft_s - draft_compute, 0.0),
                "verify": r.verify_s,
                "verify_network": max(r.prefill_s + r.verify_s - self.group.last_compute_s, 0.0),  # one forward
                "sample": r.sample_s,
            },
            wire={k: after[k] - before[k] for k in after},
            batch=r.batch,
            drafted=r.draft_tokens,
            accepted=r.accepted_tokens,
            generated=sum(len(o.new_token_ids) for o in outputs),
        )
        return outputs

    def _wire_bytes(self) -> dict[str, int]:
        sent, received = self.pool.wire_bytes() if self.pool is not None else (0, 0)
        return {"draft_sent": sent, "draft_received": received, "target_logits": self.group.bytes_received}

    def _abort_all(self) -> None:
        for seq_id in list(self._sinks):
            try:
                self.engine.abort(seq_id)
            except Exception:  # noqa: BLE001 - a dead component cannot free what it held
                pass
        self._sinks.clear()

    # -- introspection --------------------------------------------------------------------
    async def stats(self) -> dict:
        out = self.metrics.summary()
        if self.pool is not None:
            out["draft_load"] = self.pool.load()
            out["draft_live"] = self.live_drafts
            out["draft_blocks"] = list(self.pool.served)
            out["moved"] = self.pool.moved
            out["fallbacks"] = self.pool.fallbacks
            out["rejoined"] = self.pool.rejoined
        out["active"] = len(self._sinks)
        out["rebuilt"] = self.rebuilt
        cost = self.engine.cost_model if self.engine.drafter is not None else None
        if cost is not None:
            out["draft_step_s"] = cost.draft_step_s
        return out

    async def reset_stats(self) -> None:
        self.metrics.reset()

    async def draft_replicas(self) -> list:
        return list(self.replicas)

    @property
    def live_drafts(self) -> int:
        return sum(self.pool.alive) if self.pool is not None else 0

    async def set_draft_addresses(self, addresses: list[str]) -> None:
        """Follows a scaling draft deployment (between rounds): new replicas join the pool; the
        sequences of a gone one move (re-prefilled) to a live one."""
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(self._worker, self.pool.set_addresses, addresses)

    async def target_sequences(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.group.sequences)

    async def held(self) -> dict:
        """What this engine still holds: requests, engine sequences, and per target rank its
        sequences and KV cache (all zero once every request has ended)."""
        ranks = await asyncio.get_running_loop().run_in_executor(self._worker, self.group.held)
        return {"requests": len(self._sinks) + len(self._pending), "sequences": self.engine.sequences, "ranks": ranks}

    async def shutdown(self) -> None:
        def stop():
            if self.pool is not None:
                self.pool.close()
            for r in self.replicas:
                ray.kill(r)
            self.group.shutdown()

        await asyncio.get_running_loop().run_in_executor(self._worker, stop)


CoordinatorActor = ray.remote(Coordinator)
