"""Ray Serve deployments behind the public API (cluster/app.py binds them):

- Engine: a coordinator with its tensor-parallel target group; target rank 0 runs in the replica's
  own process. Its replica reserves one placement group: bundle 0 for itself (coordinator and
  rank 0), bundle i for rank i >= 1. A request stays on the engine
  replica that holds its KV caches for its whole life; Serve scales engines on ongoing requests.
- DraftServer: the gRPC draft service. Engines find replicas by broadcast and follow them as
  they scale; Serve scales them on the sequences they hold (cluster/autoscaling.py).
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve

from .coordinator import Coordinator
from .draft_replica import DraftHost

log = logging.getLogger("ray.serve")


@serve.deployment
class DraftServer:
    def __init__(self, config_data: dict):
        from specserve.cluster.config import parse_config

        threads = parse_config(config_data, "draft replica config").cluster.draft_replica.threads
        self.host = DraftHost(config_data, None, threads, host=None)  # the node's cluster address

    async def address(self) -> str:
        return self.host.address()

    async def sequences(self) -> int:
        return self.host.sequences()

    async def held(self) -> dict:
        return {"sequences": self.host.sequences(), "rss_mb": _rss_mb()}

    async def record_autoscaling_stats(self) -> dict:
        return {"sequences": float(self.host.sequences())}


@serve.deployment
class Engine:
    async def __init__(self, config_data: dict, drafts=None):
        from specserve.cluster.config import parse_config

        self.config = parse_config(config_data, "engine config")
        self.drafts = drafts
        addresses = await self._wait_for_drafts() if drafts is not None else None
        pg = ray.util.get_current_placement_group()
        # model loading blocks: keep it off the replica's event loop
        self.core = await asyncio.to_thread(Coordinator, config_data, addresses, pg)
        # held so the task is not garbage-collected
        self._follow = asyncio.get_running_loop().create_task(self._follow_drafts()) if drafts is not None else None

    async def _draft_addresses(self) -> list[str]:
        return sorted(await self.drafts.broadcast("address").results_async())

    async def _wait_for_drafts(self) -> list[str]:
        while not (addresses := await self._draft_addresses()):
            await asyncio.sleep(0.5)
        return addresses

    async def _follow_drafts(self) -> None:
        while True:
            await asyncio.sleep(self.config.serve.draft_refresh_s)
            try:
                await self.core.set_draft_addresses(await self._draft_addresses())
            except Exception as e:  # noqa: BLE001 - keep following; the pool fails over meanwhile
                log.warning("engine: draft replica refresh failed: %s", e)

    async def generate(self, request):
        return await self.core.generate(request)

    async def stream(self, request):
        """Dicts {token_ids, text, result}: the tokens accepted in a round and their text (a
        delta; the deltas concatenate to the final text), result on the last one."""
        from specserve.cluster.api import TextStream

        text = TextStream(self.core.engine.tokenizer.decode, request.stop)
        async for out in self.core.stream(request):
            final = out.result.text if out.result is not None else None
            yield {"token_ids": out.new_token_ids, "text": text.push(out.new_token_ids, final), "result": out.result}

    def check_health(self) -> None:
        """Serve's health check: a replica whose target could not be rebuilt is replaced."""
        if self.core.broken is not None:
            raise RuntimeError(f"engine: the target failed and could not be rebuilt: {self.core.broken}")

    async def health(self) -> dict:
        c = self.config
        return {"status": "SERVING", "target": c.target.model, "drafter": c.draft.drafter,
                "tp_size": c.cluster.tp_size, "draft_replicas": self.core.live_drafts, "dtype": self.core.group.dtype}

    async def stats(self) -> dict:
        return await self.core.stats()

    async def target_sequences(self) -> int:
        return await self.core.target_sequences()

    async def held(self) -> dict:
        """Requests, sequences and KV cache this replica holds, per target rank (Coordinator.held),
        and its resident memory."""
        return await self.core.held() | {"rss_mb": _rss_mb()}


def _rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
