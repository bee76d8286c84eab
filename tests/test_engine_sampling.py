"""Sampling through the engine: seeded reproducibility, batch independence, exact distribution."""

import itertools

import pytest
import torch

from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.speculation import CostModel, SamplingParams, warp_probs
from specserve.cluster.speculation.exact import DISTRIBUTION_TEST_PARAMS as PARAMS
from specserve.cluster.speculation.exact import chi2_pvalue as _chi2_pvalue  # the names other test files import
from conftest import TINY_PROMPTS, tiny_config

# A fixed cost model makes adaptive K a deterministic function of the acceptance history. Its
# verify cost grows linearly with the batch, so the per-sequence cost, and K, do not depend on
# how many sequences share a round (a measured one lowers K under load; see test_core_adaptive).
_VERIFY = tuple(1.0 + 0.05 * k for k in range(9))
FIXED_COSTS = CostModel(draft_step_s=0.1, verify_s=_VERIFY, batch_verify_s={16: tuple(16 * v for v in _VERIFY)})


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_config(), tiny_llama, cost_model=FIXED_COSTS)


def _requests(k_values, sampling_for):
    return [
        GenerationRequest(p, 32, sampling_for(i), num_draft_tokens=k)
        for i, (p, k) in enumerate(zip(TINY_PROMPTS, itertools.cycle(k_values)))
    ]


SAMPLINGS = {
    "t1": lambda i: SamplingParams(temperature=1.0, seed=100 + i),
    "t07_topk": lambda i: SamplingParams(temperature=0.7, top_k=20, seed=200 + i),
    "t13_topp": lambda i: SamplingParams(temperature=1.3, top_p=0.8, seed=300 + i),
    "mixed": lambda i: SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.9, seed=i),
}


@pytest.mark.parametrize("name", SAMPLINGS)
def test_seeded_requests_reproduce(engine, name):
    reqs = _requests([3, None, 0, 5], SAMPLINGS[name])
    first = [r.token_ids for r in engine.generate(reqs)]
    second = [r.token_ids for r in engine.generate(reqs)]
    assert first == second
    reseeded = [
        GenerationRequest(r.prompt, r.max_new_tokens, SamplingParams(1.0, seed=9999 + i), r.num_draft_tokens)
        for i, r in enumerate(reqs)
    ]
    assert [r.token_ids for r in engine.generate(reseeded)] != first


@pytest.mark.parametrize("name", SAMPLINGS)
def test_ragged_batch_equals_requests_alone(engine, name):
    # fixed K: a sequence's draws do not depend on its neighbours (adaptive K does, by design:
    # the batch's size and alphas set the round's K)
    reqs = _requests([2, 5, 3, 0, 1, 4], SAMPLINGS[name])
    batched = engine.generate(reqs)
    assert len({len(r.stats.rounds_k) for r in batched}) > 1  # the batch really was ragged
    for req, res in zip(reqs, batched):
        alone = engine.generate([req])[0]
        assert alone.token_ids == res.token_ids
        assert alone.stats.rounds_k == res.stats.rounds_k


def _exact_two_token_distribution(loaded, prompt_ids, params):
    """P(y1, y2) of the warped target, by enumeration over the support of p(y1)."""
    model = loaded.model
    with torch.inference_mode():
        p1 = warp_probs(model(torch.tensor([prompt_ids])).logits[0, -1:].float(), [params])[0]
        support = p1.nonzero().squeeze(1).tolist()
        joint = {}
        for y1 in support:
            logits = model(torch.tensor([prompt_ids + [y1]])).logits[0, -1:].float()
            p2 = warp_probs(logits, [params])[0]
            for y2 in p2.nonzero().squeeze(1).tolist():
                joint[(y1, y2)] = float(p1[y1] * p2[y2])
    return joint


def _sample_pairs(engine, prompt, params, n, k):
    reqs = [
        GenerationRequest(prompt, 2, SamplingParams(params.temperature, params.top_k, params.top_p, seed=s), k)
        for s in range(n)
    ]
    return [tuple(r.token_ids) for r in engine.generate(reqs)]


def test_engine_samples_match_target_distribution(tiny_llama):
    engine = make_engine(tiny_config(layers=(0,)), tiny_llama)
    prompt = "ab"
    joint = _exact_two_token_distribution(tiny_llama, tiny_llama.tokenizer.encode(prompt), PARAMS)
    pairs = _sample_pairs(engine, prompt, PARAMS, 1500, k=2)
    assert _chi2_pvalue(pairs, joint) > 1e-3


def test_engine_negative_control_accepting_every_draft_fails(tiny_llama, monkeypatch):
    """Accepting every draft outputs q, not p: the same test must reject it."""
    import specserve.cluster.speculation.rejection as rejection

    engine = make_engine(tiny_config(layers=(0,)), tiny_llama)
    prompt = "ab"
    joint = _exact_two_token_distribution(tiny_llama, tiny_llama.tokenizer.encode(prompt), PARAMS)
    monkeypatch.setattr(rejection, "acceptance_probs", lambda p_x, q_x: torch.ones_like(p_x))
    pairs = _sample_pairs(engine, prompt, PARAMS, 1500, k=2)
    assert _chi2_pvalue(pairs, joint) < 1e-6
