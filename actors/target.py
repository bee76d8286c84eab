"""The tensor-parallel target: a Ray actor per rank (or rank 0 in the caller's own process),
DeepSpeed AutoTP, a KV store per sequence.

TargetGroup has the interface of the in-process CausalLM (new_cache / forward / forward_batch /
rollback / keep / cached_length / release), so the engine runs on it unchanged. Each call reaches
every rank in the same order (the collectives inside a forward need that) and rank 0's result is kept.
"""

from __future__ import annotations

import importlib
import itertools
import os
import socket
import time
import warnings
from datetime import timedelta

import ray
import torch
from ray.util.placement_group import placement_group as new_placement_group
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specserve.cluster.config import ActorResources
from specserve.cluster.speculation import Unavailable
from specserve.cluster.speculation.round import TargetOutput, VerifyBatch

_FOLLOW_TIMEOUT = timedelta(days=365)  # ranks 1.. may wait this long for rank 0's next call (an idle service)


def _wire(t: torch.Tensor) -> tuple:
    """A CPU tensor as (numpy array, dtype name): numpy crosses Ray without a copy, and bf16
    travels as its raw 16-bit patterns."""
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy(), str(t.dtype).removeprefix("torch.")


def _unwire(array, dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only (zero-copy from Ray's store): only read, then copied
        warnings.simplefilter("ignore", UserWarning)
        values = torch.from_numpy(array)
    return values.view(torch.bfloat16) if dtype == "bfloat16" else values


def check_tp_size(config, tp_size: int) -> None:
    """A tp_size that does not divide the attention heads is an error before any actor starts."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if tp_size < 1 or heads % tp_size or kv_heads % tp_size:
        raise ValueError(
            f"tp_size {tp_size} must divide the target's attention heads ({heads}) and key/value heads ({kv_heads})"
        )


class RankHost:
    """One tensor-parallel rank: its shard of the model and a KV store per sequence. A Ray actor
    (TargetRank), or, for rank 0 in driver mode, a plain object in the coordinator's process."""

    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(threads)
        self.lm = None
        self._caches: dict[int, object] = {}
        self._control = None  # the group rank 0 broadcasts its calls on (driver mode)

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, model: str, dtype: str, master: tuple[str, int], timeout_s: float = 600.0) -> tuple[int, str]:
        """Loads this rank's shard; returns the vocabulary size and the dtype chosen (`auto` resolved here,
        on the rank's own hardware). A collective of the forward that waits longer than timeout_s fails."""
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator
        from deepspeed.inference.engine import InferenceEngine

        from specserve.cluster.runtime.kv import CausalLM
        from specserve.cluster.runtime.models import choose_dtype, load_model, loading_dtype

        gpu = torch.cuda.is_available()
        if gpu and dtype == "int8":
            raise ValueError("target.dtype: int8 runs on CPUs only (fbgemm); use bfloat16 on GPUs")
        if self.world_size == 1:  # nothing to shard: the plain model, no process group; auto measured
            loaded = load_model(model, dtype, "cuda" if gpu else "cpu")
            self.lm = CausalLM(loaded.model)
            return self.lm.vocab_size, loaded.dtype
        # ranks must agree: at TP, auto follows the CPU's flags (runtime/models.choose_dtype)
        dtype = choose_dtype(dtype, torch.device("cuda" if gpu else "cpu"))
        os.environ.update(
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_SIZE=str(self.world_size),
            LOCAL_RANK="0" if gpu else str(self.rank),  # a GPU actor sees its one device
        )
        if not gpu:
            # DeepSpeed builds a shared-memory all-reduce op on CPU; plain gloo gives the same sums.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # the rendezvous and loading keep torch's default timeout: ranks load at their own pace
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        if gpu:  # what DeepSpeed does where it makes the group itself
            get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
        ranks = list(range(self.world_size))
        # the forward's group is made here, with the collective timeout: DeepSpeed would make it once
        # per process and cache it on its class, and a rebuilt group must not reuse a dead one
        InferenceEngine.inference_mp_group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
        # ranks 1.. wait for rank 0's calls on a group of their own, which an idle spell never times out
        self._control = dist.new_group(ranks, timeout=_FOLLOW_TIMEOUT, backend="gloo")
        # loaded on the host: AutoTP shards it, then moves this rank's shard to its device (the whole
        # model never sits on one GPU; the host holds one full copy per rank while loading)
        # int8: AutoTP shards the float32 model, then each rank quantizes its own shard
        shard = lambda m: deepspeed.init_inference(  # noqa: E731
            m, tensor_parallel={"tp_size": self.world_size}, dtype=loading_dtype(dtype),
            replace_with_kernel_inject=False,
        ).module
        self.lm = CausalLM(load_model(model, dtype, "cpu", shard=shard).model)
        return self.lm.vocab_size, dtype

    def call(self, edits: list[tuple[int, str, object]], method: str, *args):
        """Applies the group's deferred cache edits (rollback or keep), then one method: a single Ray call."""
        for handle, edit, arg in edits:
            getattr(self.lm, edit)(self._caches[handle], arg)
        return getattr(self, method)(*args)

    def new_cache(self, handle: int) -> None:
        self._caches[handle] = self.lm.new_cache()

    def follow(self) -> None:
        """Driver mode, ranks 1..: run each call rank 0 broadcasts through torch.distributed, until
        it broadcasts None. The collectives inside each forward keep the ranks in step."""
        import torch.distributed as dist

        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self._control)
            if box[0] is None:
                return
            edits, method, args = box[0]
            self.call(edits, method, *args)

    def forward(self, handle: int, input_ids: list[int], last_only: bool):
        logits = self.lm.forward(self._caches[handle], input_ids, last_only)
        return logits if self.rank == 0 else None

    def forward_batch(self, handles: list[int], inputs: list[list[int]], argmax_only: list[bool],
                      last: list[int] | None = None, parents: list | None = None, hidden: list[int] | None = None,
                      local: bool = False):
        """One flattened forward for all sequences. Rank 0 returns the logits of the sequences that
        sample, in the model's own dtype (bf16 logits are exactly what the model computed), only
        the argmax of each greedy row (all that greedy verification reads), and with `hidden` the
        last hidden states asked for (every rank holds them whole after the last all-reduce).
        local (rank 0 in the caller's process): the outputs as they are, on the rank's device."""
        start = time.perf_counter()
        out = self.lm.forward_outputs([self._caches[h] for h in handles], inputs, raw=True, argmax_only=argmax_only,
                                      last=last, parents=parents, hidden=hidden)
        if self.rank != 0:
            return None
        if local:
            return out, time.perf_counter() - start
        dense = [o.scores for o, a in zip(out, argmax_only) if not a]
        greedy = [o.scores for o, a in zip(out, argmax_only) if a]
        rows = torch.cat(dense).cpu() if dense else torch.zeros(0, self.lm.vocab_size)
        ids = torch.cat(greedy).cpu().numpy() if greedy else None  # argmax ids, first index on ties
        states = _wire(torch.cat([o.hidden for o in out]).cpu()) if hidden is not None else None
        return *_wire(rows), ids, states, time.perf_counter() - start

    def patch(self, change):
        """change(model) on this rank's model (a drafter's change to the target, DraftSources.patch)."""
        return change(self.lm.model)

    def cached_length(self, handle: int) -> int:
        return self.lm.cached_length(self._caches[handle])

    def release(self, handle: int) -> None:
        cache = self._caches.pop(handle, None)
        if cache is not None:  # freed now (an idle pool returns its memory), not at the next forward
            self.lm.release(cache)

    def sequences(self) -> int:
        return len(self._caches)

    def held(self) -> list[dict]:
        """What every rank holds: its sequences, live KV slots and KV bytes (gathered from all ranks
        when they run this call together)."""
        mine = {"rank": self.rank, "sequences": len(self._caches), "kv_slots": self.lm.pool.live,
                "kv_bytes": self.lm.pool.nbytes}
        if self._control is None:
            return [mine]
        import torch.distributed as dist

        every = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self._control)
        return every

    def leave(self) -> None:
        """Rank 0 in driver mode: leaves torch.distributed (the group failed or shuts down), so that
        this process can join a new one."""
        import torch.distributed as dist
        from deepspeed.inference.engine import InferenceEngine

        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        InferenceEngine.inference_mp_group = None
        self.lm, self._caches, self._control = None, {}, None


TargetRank = ray.remote(RankHost)


class TargetGroup:
    """The tensor-parallel target: tp_size ranks reserved together, one placement-group bundle per
    rank actor, packed on one node. Resources per rank: `rank` (ActorResources). Given a placement
    group (a Serve replica's), the rank actors take its bundles from first_bundle on instead of
    a group of their own.

    driver_rank=False: every rank is a Ray actor, and each call is one Ray call to all of them.
    driver_rank=True: rank 0 runs in this process (the coordinator's, which must hold a rank's
    resources) and ranks 1.. are actors that follow it through torch.distributed, so a call costs
    no Ray round trip. One process holds at most one such group (one torch.distributed group).

    A rank that dies (or a collective that times out) fails the call with Unavailable and marks
    the group `broken`: the caller shuts it down and builds a new one."""

    def __init__(self, model: str, dtype: str = "float32", tp_size: int = 2, rank: ActorResources | None = None,
                 placement_group=None, first_bundle: int = 0, driver_rank: bool = False,
                 collective_timeout_s: float = 600.0):
        from specserve.cluster.runtime.models import load_model_config

        rank = rank or ActorResources()
        self.model_name, self.tp_size = model, tp_size
        config = load_model_config(model)
        check_tp_size(config, tp_size)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.device = torch.device("cpu")  # where its outputs arrive (from rank 0 over Ray, else rank 0's device)
        self._driver = RankHost(0, tp_size, rank.threads) if driver_rank else None
        actors = tp_size - 1 if driver_rank else tp_size
        self._own_pg = placement_group is None and actors > 0
        if self._own_pg:
            placement_group, first_bundle = new_placement_group([rank.bundle()] * actors, strategy="STRICT_PACK"), 0
            ray.get(placement_group.ready())
        self._pg = placement_group
        self.ranks = []
        self.broken = False
        try:
            for i in range(actors):
                where = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=first_bundle + i)
                self.ranks.append(
                    # never restarted by Ray: a restarted rank holds no shard and no place in the
                    # collective; the group is rebuilt whole instead (docs/operations.md)
                    TargetRank.options(**rank.options(), scheduling_strategy=where, max_restarts=0,
                                       max_task_retries=0).remote(
                        i + (tp_size - actors), tp_size, rank.threads)
                )
            if self._driver is not None:
                master = self._driver.address()
                joined = [r.setup.remote(model, dtype, master, collective_timeout_s) for r in self.ranks]
                # meets them in the rendezvous
                self.vocab_size, self.dtype = self._driver.setup(model, dtype, master, collective_timeout_s)
                ray.get(joined)
                self.device = self._driver.lm.device  # rank 0's outputs stay there: acceptance runs there
                self._following = [r.follow.remote() for r in self.ranks]
            else:
                master = ray.get(self.ranks[0].address.remote())
                self.vocab_size, self.dtype = ray.get(
                    [r.setup.remote(model, dtype, master, collective_timeout_s) for r in self.ranks])[0]
        except BaseException:
            self.shutdown()  # a failed start holds no resources
            raise
        self._handles = itertools.count()
        self._edits: list[tuple[int, str, object]] = []  # (cache, "rollback" or "keep", arg) not yet sent
        self.calls = 0  # calls broadcast to the ranks (Ray calls, or torch.distributed broadcasts in driver mode)
        self.bytes_received = 0  # logits bytes returned by rank 0
        self.last_compute_s = 0.0  # rank 0's time inside the last forward_batch

    @property
    def whole_model(self) -> torch.nn.Module | None:
        """The whole target, where rank 0 runs in this process and nothing is sharded (tp_size 1):
        a drafter made from the target's weights shares them instead of loading them again."""
        if self._driver is None or self.tp_size != 1:
            return None
        return self._driver.lm.model

    def _all(self, method: str, *args):
        if self.broken:
            raise Unavailable("the target's tensor-parallel group failed and is being rebuilt")
        edits, self._edits = self._edits, []
        self.calls += 1
        if not self.ranks:  # rank 0 alone, in this process: its errors are its own
            return self._driver.call(edits, method, *args)
        try:
            if self._driver is None:
                return ray.get([r.call.remote(edits, method, *args) for r in self.ranks])[0]
            import torch.distributed as dist

            dist.broadcast_object_list([(edits, method, args)], src=0, group=self._driver._control)
            return self._driver.call(edits, method, *args)
        except Exception as e:  # noqa: BLE001 - a rank died or a collective failed: the ranks are out of step
            self.broken = True
            raise Unavailable(f"a target rank failed ({type(e).__name__}: {str(e)[:200]})") from e

    def new_cache(self) -> int:
        handle = next(self._handles)
        self._all("new_cache", handle)
        return handle

    def forward(self, cache: int, input_ids: list[int], last_only: bool = False) -> torch.Tensor:
        return self._all("forward", cache, input_ids, last_only)

    def forward_batch(self, caches: list[int], inputs: list[list[int]], raw: bool = False,
                      argmax_only: list[bool] | None = None, last: list[int] | None = None,
                      parents: list | None = None) -> list[torch.Tensor]:
        """Per sequence what CausalLM.forward_batch gives: logits float32, or the argmax ids of a
        sequence marked argmax_only (only those travel back from rank 0)."""
        return [o.scores for o in self.forward_outputs(caches, inputs, raw, argmax_only, last, parents)]

    def verify(self, batch: VerifyBatch) -> list[TargetOutput]:
        """A round's one forward (speculation.round.VerifyBatch); the outputs arrive on the host."""
        return self.forward_outputs(list(batch.caches), list(batch.inputs), argmax_only=list(batch.argmax_only),
                                    last=list(batch.last), parents=None if batch.parents is None else list(batch.parents),
                                    hidden=None if batch.hidden is None else list(batch.hidden))

    def forward_outputs(self, caches: list[int], inputs: list[list[int]], raw: bool = False,
                        argmax_only: list[bool] | None = None, last: list[int] | None = None,
                        parents: list | None = None, hidden: list[int] | None = None) -> list[TargetOutput]:
        """forward_batch, and with `hidden` each sequence's last hidden[i] hidden states (from rank 0)."""
        argmax_only = argmax_only or [False] * len(inputs)
        if self._driver is not None:  # rank 0 runs here: its outputs stay on its device, nothing is copied
            outputs, self.last_compute_s = self._all("forward_batch", caches, inputs, argmax_only, last, parents,
                                                     hidden, True)
            return outputs
        dense, dtype, ids, states, self.last_compute_s = self._all(
            "forward_batch", caches, inputs, argmax_only, last, parents, hidden)
        rows = [len(x) for x in inputs] if last is None else [min(k, len(x)) for k, x in zip(last, inputs)]
        self.bytes_received += dense.nbytes + (ids.nbytes if ids is not None else 0)
        values = _unwire(dense, dtype).float()
        dense_rows = iter(values.split([n for n, a in zip(rows, argmax_only) if not a]))
        greedy_ids = iter(torch.from_numpy(ids.copy()).split([n for n, a in zip(rows, argmax_only) if a])
                          if ids is not None else [])
        scores = [next(greedy_ids) if a else next(dense_rows) for a in argmax_only]
        if hidden is None:
            return [TargetOutput(x) for x in scores]
        self.bytes_received += states[0].nbytes
        per = _unwire(*states).clone().split([min(h, len(x)) for h, x in zip(hidden, inputs)])
        return [TargetOutput(x, h) for x, h in zip(scores, per)]

    def rollback(self, cache: int, n: int) -> None:
        """Deferred: sent with the next call, so a round costs one Ray call (forward_batch)."""
        if n > 0:
            self._edits.append((cache, "rollback", n))

    def keep(self, cache: int, positions: list[int]) -> None:
        """Commits a subset of cached positions (CausalLM.keep); deferred like rollback."""
        self._edits.append((cache, "keep", list(positions)))

    def patch(self, change):
        """change(model) on every rank (DraftSources.patch); rank 0's result."""
        return self._all("patch", change)

    def cached_length(self, cache: int) -> int:
        return self._all("cached_length", cache)

    def release(self, cache: int) -> None:
        self._all("release", cache)

    def sequences(self) -> int:
        return self._all("sequences")

    def held(self) -> list[dict]:
        """Per rank: sequences, live KV slots and KV bytes (RankHost.held)."""
        return self._all("held")

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        if self._driver is not None:
            self._driver.leave()
        if self._own_pg:
            remove_placement_group(self._pg)
