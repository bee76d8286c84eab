"""Draft replicas as Ray actors behind gRPC, with the tensor-parallel target: the distributed shape."""

import pytest

from specserve.actors.remote_drafter import RemoteDrafter
from specserve.cluster.config import ActorResources
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.speculation import SamplingParams
from conftest import TINY_PROMPTS

pytestmark = pytest.mark.ray

TINY = {
    "target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False},
    "draft": {"drafter": "model", "model": {"layers": [0, 1, 3]}},
}


@pytest.fixture(scope="module")
def replicas(ray_cluster):
    from specserve.actors.draft_replica import DraftReplica

    actors = [DraftReplica.options(num_cpus=0.25).remote(TINY, name) for name in ("model", "ngram")]
    addresses = ray_cluster.get([a.address.remote() for a in actors])
    yield actors, addresses
    for a in actors:
        ray_cluster.kill(a)


def test_replica_serves_the_engine_exactly(replicas, tiny_llama):
    from specserve.cluster.runtime.model_drafter import ModelDrafter
    from specserve.cluster.runtime.models import layer_subset

    _, (model_address, _) = replicas
    remote = RemoteDrafter(model_address)
    assert remote.health().drafter == "model"
    local_drafter = ModelDrafter(layer_subset(tiny_llama.model, [0, 1, 3]))
    remote_engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, remote, num_draft_tokens=3)
    local_engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, local_drafter, num_draft_tokens=3)
    for sampling in (SamplingParams(0.0), SamplingParams(1.0, seed=3), SamplingParams(0.8, top_p=0.9, seed=4)):
        requests = [GenerationRequest(p, 20, sampling) for p in TINY_PROMPTS]
        assert [r.token_ids for r in remote_engine.generate(requests)] == [
            r.token_ids for r in local_engine.generate(requests)
        ]
    assert remote.health().sequences == 0
    remote.close()


def test_tp2_target_with_a_remote_ngram_replica(replicas, tiny_llama, ray_cluster):
    from specserve.actors.target import TargetGroup

    _, (_, ngram_address) = replicas
    group = TargetGroup("tiny-llama", "float32", tp_size=2, rank=ActorResources(cpus=0.5))
    try:
        remote = RemoteDrafter(ngram_address)
        distributed = SpeculativeEngine(group, tiny_llama.tokenizer, remote, num_draft_tokens=4)
        plain = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, None)
        requests = [GenerationRequest(p, 24) for p in TINY_PROMPTS]
        got = distributed.generate(requests)
        assert [r.token_ids for r in got] == [r.token_ids for r in plain.generate(requests)]
        assert sum(r.stats.accepted_tokens for r in got) > 0
        assert group.sequences() == 0 and remote.health().sequences == 0
        remote.close()
    finally:
        group.shutdown()
