"""Load balancing and failover across draft replicas (Ray actors over gRPC)."""

import pytest

from specserve.actors.draft_pool import DraftPool
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.speculation import SamplingParams
from conftest import TINY_PROMPTS, wait_until

pytestmark = pytest.mark.ray

TINY = {
    "target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False},
    "draft": {"drafter": "model", "model": {"layers": [0, 1, 3]}},
}
PROMPTS = [p + f" #{i}" for i in range(2) for p in TINY_PROMPTS]  # 12 concurrent sequences


@pytest.fixture
def replicas(ray_cluster):
    """Two draft replica actors and their addresses; a test may kill some."""
    from specserve.actors.draft_replica import DraftReplica

    actors = [DraftReplica.options(num_cpus=0.1).remote(TINY) for _ in range(2)]
    yield actors, ray_cluster.get([a.address.remote() for a in actors])
    for a in actors:
        ray_cluster.kill(a)


@pytest.fixture
def pool(replicas):
    pool = DraftPool(replicas[1], timeout_s=5)
    yield pool
    pool.close()


def _engine(tiny_llama, pool):
    # every prompt in the first round, so all 12 sequences draft from the first step on
    return SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, pool, num_draft_tokens=3, prefill_chunk=4096)


def _step(engine, results: dict) -> None:
    """One round; finished requests' results go into results by seq_id."""
    for out in engine.step():
        if out.result is not None:
            results[out.seq_id] = out.result


def _plain(tiny_llama, requests):
    return [r.token_ids for r in SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, None).generate(requests)]


def test_two_replicas_share_the_load(pool, tiny_llama):
    engine = _engine(tiny_llama, pool)
    ids = [engine.add_request(GenerationRequest(p, 16)) for p in PROMPTS]
    engine.step()
    assert pool.load() == [6, 6]  # least outstanding work: an even split
    placed = dict(pool.placement)
    while engine.has_unfinished():
        engine.step()
        assert all(pool.placement[s] == placed[s] for s in pool.placement)  # sequences stay put
    assert pool.load() == [0, 0]
    assert [pool.replicas[i].health().sequences for i in range(2)] == [0, 0]
    assert len(ids) == len(PROMPTS)


@pytest.mark.parametrize("kill", [1, 2])
def test_killing_replicas_mid_generation_loses_nothing(ray_cluster, replicas, pool, tiny_llama, kill):
    engine = _engine(tiny_llama, pool)
    greedy = [GenerationRequest(p, 24) for p in PROMPTS]
    ids = [engine.add_request(r) for r in greedy]
    results = {}
    for round_ in range(100):
        if not engine.has_unfinished():
            break
        if round_ == 2:
            for a in replicas[0][:kill]:
                ray_cluster.kill(a)
        _step(engine, results)
    assert sorted(results) == ids  # every request completed
    assert [results[i].token_ids for i in ids] == _plain(tiny_llama, greedy)
    assert pool.alive == [False, kill == 1]
    if kill == 1:
        assert pool.moved == 6 and pool.fallbacks == 0  # the dead replica's load moved
        assert pool.load() == [0, 0]
    else:
        assert pool.fallbacks > 0  # no replica left: plain decoding, same output


def test_failover_keeps_sampled_outputs_identical(ray_cluster, replicas, pool, tiny_llama):
    """A moved sequence gets the same block on its new replica (same context, same seed)."""
    requests = [GenerationRequest(p, 20, SamplingParams(0.9, seed=i)) for i, p in enumerate(PROMPTS)]
    reference = [r.token_ids for r in _engine(tiny_llama, pool).generate(requests)]
    engine = _engine(tiny_llama, pool)
    ids = [engine.add_request(r) for r in requests]
    engine.step()
    ray_cluster.kill(replicas[0][0])
    results = {}
    while engine.has_unfinished():
        _step(engine, results)
    assert [results[i].token_ids for i in ids] == reference
    assert pool.moved > 0


def test_a_replica_that_missed_a_deadline_rejoins_once_it_answers(ray_cluster, replicas, pool, tiny_llama):
    engine = _engine(tiny_llama, pool)
    greedy = [GenerationRequest(p, 24) for p in PROMPTS]
    ids = [engine.add_request(r) for r in greedy]
    results = {}
    _step(engine, results)
    assert pool.load() == [6, 6] and pool.replicas[0].health().sequences == 6
    pool.replicas[0].timeout_s = 1e-6  # its next blocks miss their deadline
    _step(engine, results)
    pool.replicas[0].timeout_s = 5
    assert pool.alive == [False, True] and pool.moved == 6 and pool.load() == [0, 12]
    assert pool.replicas[0].health().sequences == 6  # stale contexts of the moved sequences

    for _ in range(5):  # rounds probe it (so does set_addresses, from a Serve engine's refresh)
        if pool.alive[0]:
            break
        _step(engine, results)
    assert pool.alive == [True, True] and pool.rejoined == 1 and engine.has_unfinished()
    assert pool.replicas[0].health().sequences == 0  # the stale contexts were freed
    served = pool.served[0]
    late = GenerationRequest(PROMPTS[0] + " late", 24)
    ids.append(engine.add_request(late))
    while engine.has_unfinished():
        _step(engine, results)
    assert pool.placement == {} and pool.served[0] > served  # the late sequence went to the rejoined one
    assert [results[i].token_ids for i in ids] == _plain(tiny_llama, greedy + [late])
    assert [pool.replicas[i].health().sequences for i in range(2)] == [0, 0]

    ray_cluster.kill(replicas[0][1])  # a replica that does not answer stays out
    engine.generate([GenerationRequest(p, 4) for p in PROMPTS[:2]])  # one placed on each: 1 fails
    assert pool.alive == [True, False]
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: pool.set_addresses(replicas[1]) or pool.alive[1], timeout=3, interval=0.05)
    assert pool.alive == [True, False] and pool.rejoined == 1
