"""`specserve soak`: many concurrent gRPC streams against a running service for a bounded time,
with cancellations and short deadlines mixed in; reports outcomes and p50/p99 latencies.

Every loop is bounded in time and count; the requests are seeded, so a run can be repeated."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field

import grpc
from specserve.v1 import generation_pb2 as pb

from .client import Client

PROMPTS = [
    "Summarise: the cache holds keys and values for every position of every running sequence.",
    "def fib(n):\n    if n < 2:\n        return n\n    return",
    "Write three short lines about rivers.",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "Translate to French: good morning, how are you?",
    "x",
]


@dataclass(frozen=True)
class SoakPlan:
    streams: int = 64  # client threads, each with one request in flight
    seconds: float = 180.0  # no request starts after this
    max_new_tokens: int = 48  # per request at most (each request draws 1..this)
    cancel_rate: float = 0.15  # requests the client cancels after its first messages
    deadline_rate: float = 0.15  # requests sent with a deadline too short to finish
    seed: int = 0
    max_requests: int = 100_000  # a bound on the whole run's requests


@dataclass
class SoakReport:
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # "OK", "CANCELLED", "DEADLINE_EXCEEDED", ...
    tokens: int = 0
    seconds: float = 0.0
    latency_p50_s: float = 0.0  # whole requests that finished OK
    latency_p99_s: float = 0.0
    token_gap_p50_s: float = 0.0  # between consecutive stream messages
    token_gap_p99_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_soak(client: Client, plan: SoakPlan, clock=time.monotonic) -> SoakReport:
    """Runs the plan against the client's service; returns once every stream has ended."""
    lock = threading.Lock()
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    gaps: list[float] = []
    counts = {"requests": 0, "tokens": 0}
    start = clock()

    def one(rng: random.Random) -> None:
        request = pb.GenerateRequest(prompt=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, plan.max_new_tokens),
                                     temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(2**31))
        roll = rng.random()
        cancel_after = rng.randint(1, 3) if roll < plan.cancel_rate else None
        timeout = rng.uniform(0.05, 0.5) if plan.cancel_rate <= roll < plan.cancel_rate + plan.deadline_rate else 60.0
        began = last = clock()
        call = client.stub.GenerateStream(request, metadata=client.metadata, timeout=timeout)
        messages, my_gaps = 0, []
        try:
            for msg in call:
                now = clock()
                my_gaps.append(now - last)
                last = now
                messages += 1
                with lock:
                    counts["tokens"] += len(msg.token_ids)
                if cancel_after is not None and messages >= cancel_after:
                    call.cancel()
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with lock:
            outcomes[code] = outcomes.get(code, 0) + 1
            gaps.extend(my_gaps[1:])  # the first is the time to first token
            if code == "OK":
                latencies.append(clock() - began)

    def worker(i: int) -> None:
        rng = random.Random(plan.seed * 1_000_003 + i)
        while clock() - start < plan.seconds:
            with lock:
                if counts["requests"] >= plan.max_requests:
                    return
                counts["requests"] += 1
            one(rng)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(plan.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return SoakReport(
        requests=counts["requests"], outcomes=dict(sorted(outcomes.items())), tokens=counts["tokens"],
        seconds=round(clock() - start, 2),
        latency_p50_s=_quantile(latencies, 0.5), latency_p99_s=_quantile(latencies, 0.99),
        token_gap_p50_s=_quantile(gaps, 0.5), token_gap_p99_s=_quantile(gaps, 0.99),
    )
