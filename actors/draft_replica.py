"""A draft replica: one drafter behind the gRPC draft service on its own port. As a Ray actor
(DraftReplica, created by a coordinator) or inside a Serve replica (actors/serving.py).

It listens on the node's cluster address only (never on every interface), with mutual TLS when
cluster.draft_tls is set."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import ray
import torch


class DraftHost:
    def __init__(self, config_data: dict, drafter: str | None = None, threads: int = 1, host: str | None = "127.0.0.1"):
        """host None: the node's cluster address (ray.util.get_node_ip_address())."""
        from specserve.cluster.config import parse_config
        from specserve.cluster.runtime.factory import build_drafter, draft_sources

        from .draft_service import DraftServicer, create_server
        from .wire import draft_message_limit

        torch.set_num_threads(threads)
        config = parse_config(config_data, "draft replica config")
        name = drafter or config.draft.drafter
        # the drafter is built on the thread that serves its calls: one OpenMP team (docs/threads.md)
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        # int8 and layer-subset drafts load the target's weights here; a separate draft model never does
        self.drafter = worker.submit(build_drafter, name, config.draft, draft_sources(config)).result()
        idle_s = config.cluster.draft_idle_s
        # the message limits fit the config's largest block of q (drafters without a vocabulary send none)
        limit = draft_message_limit(self.drafter.capabilities.q_vocab, config.speculation.block_nodes)
        self.servicer = DraftServicer(self.drafter, idle_s, max_message_bytes=limit)
        host = host or ray.util.get_node_ip_address()
        self.host = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets
        self.server, self.port = create_server(self.drafter, f"{self.host}:0", self.servicer, worker,
                                               config.cluster.draft_tls)
        self.server.start()
        # idle sequences are freed even when no engine calls any more (a dead engine's)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_every, args=(worker, idle_s / 4), daemon=True)
        self._sweeper.start()

    def _sweep_every(self, worker: ThreadPoolExecutor, period_s: float) -> None:
        while not self._stop.wait(period_s):
            worker.submit(self.servicer.sweep)  # on the drafter's own thread

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def sequences(self) -> int:
        """Sequences whose context (and KV cache) this replica holds."""
        return len(self.servicer.contexts)

    def stop(self) -> None:
        self._stop.set()
        self.server.stop(grace=None)


DraftReplica = ray.remote(DraftHost)
