"""A draft replica: one drafter behind the gRPC draft service on its own port. As a Ray actor
(DraftReplica, created by a coordinator) or inside a Serve replica (actors/serving.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ray
import torch


class DraftHost:
    def __init__(self, config_data: dict, drafter: str | None = None, threads: int = 1, host: str = "127.0.0.1"):
        from cluster.config import parse_config
        from cluster.runtime.factory import build_drafter, draft_sources

        from .draft_service import DraftServicer, create_server

        torch.set_num_threads(threads)
        config = parse_config(config_data, "draft replica config")
        name = drafter or config.draft.drafter
        # the drafter is built on the thread that serves its calls: one OpenMP team (docs/threads.md)
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        # int8 and layer-subset drafts load the target's weights here; a separate draft model never does
        self.drafter = worker.submit(build_drafter, name, config.draft, draft_sources(config)).result()
        self.servicer = DraftServicer(self.drafter)
        self.server, self.port = create_server(self.drafter, f"{host}:0", self.servicer, worker)
        self.server.start()
        self.host = host if host != "0.0.0.0" else ray.util.get_node_ip_address()

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def sequences(self) -> int:
        """Sequences whose context (and KV cache) this replica holds."""
        return len(self.servicer.contexts)

    def stop(self) -> None:
        self.server.stop(grace=None)


DraftReplica = ray.remote(DraftHost)
