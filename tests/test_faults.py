"""Faults injected while generations stream: a target rank killed, an engine replica killed, a rank
idle for longer than the collective timeout. Each test shows the outcome a client sees: a prompt,
retriable UNAVAILABLE (never a hang or a wrong token), then correct answers again."""

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc

from specserve.cluster.config import parse_config
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.speculation import Unavailable
from conftest import free_port, hf_greedy, wait_until

pytestmark = pytest.mark.ray

TINY = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())
PROMPT = "hello world, this is a test"
APP = "specserve-faults"


def _alive(class_name: str) -> list[int]:
    """Pids of the live actors whose class name ends with class_name (the GCS's actor table: the
    state API needs the dashboard)."""
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values() if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE"]


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _expected(tiny_llama, n: int) -> list[int]:
    eos = tiny_llama.tokenizer.eos_token_id
    return hf_greedy(tiny_llama.model, tiny_llama.tokenizer.encode(PROMPT), n, eos)


# -- the distributed shape (a coordinator actor) ---------------------------------------------


@pytest.fixture
def distributed(ray_cluster):  # per test: the served app below needs the cores it holds
    from specserve.cluster.launcher import DistributedEngine

    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["cluster"] |= {"draft_replicas": 0, "collective_timeout_s": 3}
    engine = DistributedEngine(parse_config(data))
    yield engine
    engine.shutdown()


def test_ranks_idle_longer_than_the_collective_timeout_still_serve(distributed, tiny_llama):
    """Ranks 1.. wait for rank 0's next call on a group of their own: an idle service does not time
    out (with the forward's group and its 3 s timeout, rank 1 would have died waiting)."""
    request = GenerationRequest(PROMPT, 12)
    assert distributed.generate([request])[0].token_ids == _expected(tiny_llama, 12)
    time.sleep(5)
    assert distributed.generate([request])[0].token_ids == _expected(tiny_llama, 12)
    assert distributed.stats()["rebuilt"] == 0


def test_a_killed_rank_ends_requests_with_unavailable_and_the_group_is_rebuilt(distributed, tiny_llama):
    [rank] = _alive("RankHost")
    got, error = [], []

    def stream():
        try:
            for out in distributed.stream(GenerationRequest(PROMPT, 1500, num_draft_tokens=4)):
                got.extend(out.new_token_ids)
        except Exception as e:  # noqa: BLE001 - the test reads it
            error.append(e)

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: len(got) >= 8, 60, "the stream started")
    _kill(rank)
    t.join(timeout=20)
    assert not t.is_alive(), "the stream hung after its target rank died"
    assert len(error) == 1 and isinstance(error[0], Unavailable), error
    expected = _expected(tiny_llama, len(got))
    assert got == expected  # every token delivered before the failure is right
    # the next request runs on a rebuilt group, with a new rank 1, and is exact
    request = GenerationRequest(PROMPT, 16)
    assert distributed.generate([request])[0].token_ids == _expected(tiny_llama, 16)
    assert distributed.stats()["rebuilt"] == 1
    assert _alive("RankHost") not in ([], [rank])


# -- the served application ------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(ray_cluster):
    from ray import serve

    from specserve.cluster import app

    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["cluster"] |= {"draft_replicas": 1, "draft_idle_s": 3}
    data["serve"] = {
        "app_name": APP, "grpc_port": free_port(), "http_port": free_port(), "host": "127.0.0.1",
        "drafts": {"min_replicas": 1, "max_replicas": 1}, "draft_refresh_s": 0.5,
    }
    config = parse_config(data)
    app.start(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    yield config, pb_grpc.SpeculativeGenerationStub(channel)
    channel.close()
    serve.shutdown()


META = (("application", APP),)


def _streams(stub, n: int) -> tuple[list, list]:
    """n long greedy streams at K = 4 in threads: (tokens each, the status each ended with)."""
    got, codes = [[] for _ in range(n)], [None] * n

    def run(i):
        try:
            for msg in stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=1500, temperature=0,
                                                              num_draft_tokens=4), metadata=META, timeout=120):
                got[i].extend(msg.token_ids)
            codes[i] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[i] = e.code()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(g) >= 8 for g in got), 90, "the streams started")
    return got, codes, threads


def _drafts_held() -> int:
    from ray import serve

    return serve.get_deployment_handle("drafts", APP).sequences.remote().result()


def _http_completion(config) -> tuple[int, dict, dict]:
    """A long greedy completion over HTTP: (status, headers, body)."""
    import json
    import urllib.error
    import urllib.request

    body = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "num_draft_tokens": 4}
    request = urllib.request.Request(f"http://127.0.0.1:{config.serve.http_port}/v1/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def test_served_rank_killed_mid_stream_is_unavailable_then_answers(service, tiny_llama):
    config, stub = service
    [rank] = _alive("RankHost")
    http = []
    unary = threading.Thread(target=lambda: http.append(_http_completion(config)))
    unary.start()
    got, codes, threads = _streams(stub, 3)
    _kill(rank)
    for t in [*threads, unary]:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in [*threads, unary]), "a request hung after its target rank died"
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
    [(status, headers, body)] = http
    assert status == 503 and headers.get("retry-after") == "1" and body["error"]["type"] == "unavailable", body
    assert body["error"]["message"].startswith("unavailable, retry: a target rank failed") and len(body["error"]["message"]) < 400
    for g in got:
        assert g == _expected(tiny_llama, len(g))  # no wrong token before the failure
    # the group is rebuilt in the engine replica: the next requests answer, exactly
    reply = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=16, temperature=0), metadata=META,
                          timeout=60)
    assert list(reply.token_ids) == _expected(tiny_llama, 16)
    assert len(_alive("RankHost")) == 1 and _alive("RankHost") != [rank]


def test_served_engine_replica_killed_is_replaced_and_retries_answer(service, tiny_llama):
    config, stub = service
    [engine] = _alive(f"{APP}:engine")
    got, codes, threads = _streams(stub, 2)
    assert _drafts_held() >= 2  # the draft replica holds the streams' sequences
    _kill(engine)
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a stream hung after its engine died"
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 2, codes
    for g in got:
        assert g == _expected(tiny_llama, len(g))
    # a client that retries UNAVAILABLE gets its answer once Serve has replaced the replica
    deadline, reply = time.time() + 120, None
    while reply is None and time.time() < deadline:
        try:
            reply = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=16, temperature=0), metadata=META,
                                  timeout=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            time.sleep(1)
    assert reply is not None and list(reply.token_ids) == _expected(tiny_llama, 16)
    assert _alive(f"{APP}:engine") not in ([], [engine])
    # the dead engine never released its sequences: the draft replica frees them once idle
    wait_until(lambda: _drafts_held() == 0, 30, "the draft replica freed the dead engine's sequences")


def test_soak_of_64_streams_ends_with_nothing_held_and_memory_back(service):
    """64 concurrent streams with cancellations and short deadlines (loopback, bounded): every
    request ends, and afterwards no actor holds a sequence or a KV slot and resident memory is back
    near what it was after a warm-up."""
    from ray import serve

    from specserve.cluster.client import Client
    from specserve.cluster.soak import SoakPlan, run_soak

    config, _ = service
    engine, drafts = (serve.get_deployment_handle(name, APP) for name in ("engine", "drafts"))
    client = Client(f"127.0.0.1:{config.serve.grpc_port}", APP)

    def quiet():
        held = engine.held.remote().result()
        return (held["requests"] == held["sequences"] == 0 and drafts.held.remote().result()["sequences"] == 0
                and all(r["sequences"] == r["kv_slots"] == r["kv_bytes"] == 0 for r in held["ranks"]))

    run_soak(client, SoakPlan(streams=64, seconds=8, seed=1))  # warm-up: the allocators reach their working size
    wait_until(quiet, 30, lambda: (engine.held.remote().result(), drafts.held.remote().result()))
    baseline = engine.held.remote().result()["rss_mb"], drafts.held.remote().result()["rss_mb"]
    report = run_soak(client, SoakPlan(streams=64, seconds=40, seed=2))
    client.close()
    print("soak:", report.as_dict(), "baseline rss MiB (engine, drafts):", baseline)
    assert report.requests >= 64 and sum(report.outcomes.values()) == report.requests
    assert set(report.outcomes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, report.outcomes
    assert report.outcomes["OK"] > report.requests / 2 and report.latency_p99_s >= report.latency_p50_s > 0
    wait_until(quiet, 30, lambda: (engine.held.remote().result(), drafts.held.remote().result()))
    after = engine.held.remote().result()["rss_mb"], drafts.held.remote().result()["rss_mb"]
    print("rss MiB after:", after)
    for before, now in zip(baseline, after):
        assert now <= before * 1.05 + 16, (baseline, after)
