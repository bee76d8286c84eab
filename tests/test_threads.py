"""Every torch op of a serving process runs on one thread: each thread that enters an OpenMP region
keeps a team of its own, and two teams on the same cores slowed rounds by half (docs/threads.md)."""

import asyncio
import threading

import pytest

from specserve.cluster.runtime import models
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.speculation import SamplingParams


def _recording(monkeypatch, owner, name, threads: set):
    real = getattr(owner, name)

    def record(*args, **kwargs):
        threads.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, record)


@pytest.mark.ray
def test_the_coordinator_loads_calibrates_and_runs_rounds_on_one_thread(ray_cluster, monkeypatch, tmp_path):
    from specserve.actors.coordinator import Coordinator

    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))  # a fresh calibration: it runs forwards
    loads, forwards = set(), set()
    _recording(monkeypatch, models, "load_model", loads)
    _recording(monkeypatch, CausalLM, "forward_outputs", forwards)
    config = {"target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False},
              "draft": {"drafter": "ngram"}, "cluster": {"draft_replicas": 0, "target_rank": {"threads": 1}}}
    coordinator = Coordinator(config)
    calibrated = set(forwards)
    request = GenerationRequest("abcabcabcabc", 8, SamplingParams(temperature=0.0))
    result = asyncio.run(coordinator.generate(request))
    asyncio.run(coordinator.shutdown())
    assert len(result.token_ids) == 8
    assert calibrated, "the calibration ran no forward: the check would see only the rounds"
    assert len(loads | forwards) == 1 and threading.get_ident() not in loads


def test_a_draft_replica_builds_its_drafter_on_the_thread_that_serves_it(monkeypatch):
    from specserve.actors.draft_replica import DraftHost
    from specserve.cluster.runtime import factory
    from specserve.cluster.runtime.model_drafter import ModelDrafter

    builds, proposals = set(), set()
    _recording(monkeypatch, factory, "build_drafter", builds)
    _recording(monkeypatch, ModelDrafter, "propose_many", proposals)
    host = DraftHost({"target": {"model": "tiny-llama", "dtype": "float32"},
                      "draft": {"drafter": "model", "model": {"layers": [0, 1]}}})
    try:
        import grpc
        from specserve.internal.v1 import draft_pb2 as pb
        from specserve.internal.v1 import draft_pb2_grpc as pb_grpc

        with grpc.insecure_channel(host.address()) as channel:
            stub = pb_grpc.DraftServiceStub(channel)
            reply = stub.Propose(pb.ProposeRequest(seq_id=1, reset=True, new_tokens=[5, 6, 7], context_len=3, k=3,
                                                   sampling=pb.Sampling(temperature=0.0, top_p=1.0)))
        assert len(reply.token_ids) == 3
    finally:
        host.stop()
    assert len(builds | proposals) == 1 and threading.get_ident() not in builds
