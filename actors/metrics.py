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
        self.reset()

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
        self.totals["batch"] += batch

    def summary(self) -> dict:
        """Totals and per-round means (seconds, bytes) since the last reset."""
        n = max(self.rounds, 1)
        out = {"rounds": self.rounds, "totals": dict(self.totals)}
        out["per_round"] = {k: v / n for k, v in self.totals.items() if k.endswith(("_s", "_bytes"))}
        out["per_round"]["batch"] = self.totals["batch"] / n
        out["per_round"]["wire_bytes"] = sum(self.totals[f"{w}_bytes"] for w in WIRE) / n
        return out
