"""Per-round timings and bytes on the wire: Ray metrics (scraped by Prometheus from each node's
metrics agent) and running totals that `stats()` and the bench read."""

from __future__ import annotations

from collections import defaultdict

PHASES = ("prefill", "draft", "draft_network", "verify", "verify_network", "sample")
WIRE = ("draft_sent", "draft_received", "target_logits")
_BOUNDARIES = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class RoundMetrics:
    def __init__(self):
        from ray.util import metrics

        self._round = metrics.Histogram(
            "specserve_round_seconds", "Wall time of one coordinator round (all active sequences)",
            boundaries=_BOUNDARIES,
        )
        self._phase = metrics.Histogram(
            "specserve_round_phase_seconds",
            "Time per round by phase: draft and verify include their network share, shown apart as *_network",
            boundaries=_BOUNDARIES, tag_keys=("phase",),
        )
        self._bytes = metrics.Counter(
            "specserve_wire_bytes", "Bytes moved between the coordinator and the draft replicas / target ranks",
            tag_keys=("path",),
        )
        self._tokens = metrics.Counter("specserve_tokens", "Tokens drafted, accepted and generated", tag_keys=("kind",))
        self._batch = metrics.Gauge("specserve_batch_size", "Sequences verified in the latest round")
        self._target_calls = metrics.Counter(
            "specserve_target_calls", "Target calls per sequence (one per sequence per round): tokens / calls is "
            "the tokens per target call")
        self._queue = metrics.Gauge("specserve_queue_depth", "Requests waiting to join the running batch")
        self._active = metrics.Gauge("specserve_active_sequences", "Sequences in the running batch")
        self._drafts = metrics.Gauge("specserve_draft_replicas", "Live draft replicas this coordinator uses")
        self.reset()

    def gauges(self, queued: int, active: int, draft_replicas: int) -> None:
        self._queue.set(queued)
        self._active.set(active)
        self._drafts.set(draft_replicas)

    def reset(self) -> None:
        self.rounds = 0
        self.totals: dict[str, float] = defaultdict(float)

    def record(self, round_s: float, phases: dict[str, float], wire: dict[str, int], batch: int,
               drafted: int, accepted: int, generated: int) -> None:
        self.rounds += 1
        self._round.observe(round_s)
        self.totals["round_s"] += round_s
        for name, seconds in phases.items():
            self._phase.observe(seconds, tags={"phase": name})
            self.totals[f"{name}_s"] += seconds
        for path, n in wire.items():
            if n:
                self._bytes.inc(n, tags={"path": path})
            self.totals[f"{path}_bytes"] += n
        for kind, n in (("drafted", drafted), ("accepted", accepted), ("generated", generated)):
            if n:
                self._tokens.inc(n, tags={"kind": kind})
            self.totals[f"{kind}_tokens"] += n
        self._batch.set(batch)
        if batch:  # a round that only prefilled verified no sequence
            self._target_calls.inc(batch)
        self.totals["batch"] += batch

    def summary(self) -> dict:
        """Totals and per-round means (seconds, bytes) since the last reset."""
        n = max(self.rounds, 1)
        out = {"rounds": self.rounds, "totals": dict(self.totals)}
        out["per_round"] = {k: v / n for k, v in self.totals.items() if k.endswith(("_s", "_bytes"))}
        out["per_round"]["batch"] = self.totals["batch"] / n
        out["per_round"]["wire_bytes"] = sum(self.totals[f"{w}_bytes"] for w in WIRE) / n
        calls, drafted = self.totals["batch"], self.totals["drafted_tokens"]
        out["tokens_per_target_call"] = self.totals["generated_tokens"] / calls if calls else 0.0
        out["acceptance_rate"] = self.totals["accepted_tokens"] / drafted if drafted else 0.0
        return out


class RequestMetrics:
    """Per-request metrics of the public API: requests by api/method/status code, latency, time to
    the first token and tokens returned (their rate is tokens/s)."""

    def __init__(self):
        from ray.util import metrics

        self._requests = metrics.Counter("specserve_requests", "Requests by API, method and status code",
                                         tag_keys=("api", "method", "code"))
        self._latency = metrics.Histogram("specserve_request_seconds", "Time from request to last token",
                                          boundaries=_LATENCY, tag_keys=("api", "method"))
        self._first = metrics.Histogram("specserve_time_to_first_token_seconds", "Time from request to first token",
                                        boundaries=_LATENCY, tag_keys=("api", "method"))
        self._tokens = metrics.Counter("specserve_response_tokens", "Tokens returned to clients", tag_keys=("api",))

    def request(self, api: str, method: str, grpc_context=None) -> "_Request":
        return _Request(self, api, method, grpc_context)

    def stream_tokens(self, n: int) -> None:
        if n:
            self._tokens.inc(n, tags={"api": "http"})


_LATENCY = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0]


class _Request:
    def __init__(self, owner: RequestMetrics, api: str, method: str, grpc_context):
        self.owner, self.api, self.method, self.grpc_context = owner, api, method, grpc_context
        self.code = "OK" if api == "grpc" else "200"
        self.first = None

    def __enter__(self):
        import time

        self.start = time.perf_counter()
        return self

    def tokens(self, n: int) -> None:
        import time

        if n and self.first is None:
            self.first = time.perf_counter() - self.start
            self.owner._first.observe(self.first, tags={"api": self.api, "method": self.method})
        if n:
            self.owner._tokens.inc(n, tags={"api": self.api})

    def __exit__(self, kind, error, tb):
        import asyncio
        import time

        if error is not None:
            set_code = self.grpc_context.code() if self.grpc_context is not None else None
            self.code = set_code.name if set_code else ("CANCELLED" if kind in (asyncio.CancelledError, GeneratorExit) else "INTERNAL")
        tags = {"api": self.api, "method": self.method}
        self.owner._latency.observe(time.perf_counter() - self.start, tags=tags)
        self.owner._requests.inc(1, tags=tags | {"code": self.code})
        return False
