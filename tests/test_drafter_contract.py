"""The one drafter contract (speculation.round.Drafter and its DrafterCapabilities): a drafter
defined here and registered through the registry alone runs exactly in process, in the
distributed shape and served, with no other file touched.

The drafter is a context bigram: q(next | last) from the counts of what followed `last` earlier
in the context (smoothed over the whole vocabulary, so q is dense and differs from p), greedy
requests its argmax. Ray processes import this module by name ("tests.test_drafter_contract", the
repository root is on a Ray worker's path), so it imports nothing from conftest at the top."""

from __future__ import annotations

import pytest
import torch

from specserve.cluster import registry
from specserve.cluster.speculation import make_generator, sample_token
from specserve.cluster.speculation.exact import DISTRIBUTION_TEST_PARAMS as PARAMS
from specserve.cluster.speculation.round import DraftBlock, Drafter, DrafterCapabilities, RoundResult, capabilities_of

REFERENCE = "tests.test_drafter_contract:BIGRAM"  # how another process finds it: "module:attribute"


class BigramDrafter(Drafter):
    name = "bigram"
    capabilities = DrafterCapabilities(observes_rounds=True)

    def __init__(self, vocab_size: int, smoothing: float = 0.5):
        self.vocab_size, self.smoothing = vocab_size, smoothing
        self.rounds = 0  # after_round calls
        self.judged = 0  # draft tokens it saw judged

    def _q(self, context: list[int]) -> torch.Tensor:
        counts = torch.full((self.vocab_size,), self.smoothing)
        last = context[-1]
        for a, b in zip(context, context[1:]):
            if a == last:
                counts[b] += 1.0
        return counts / counts.sum()  # [V]

    def propose_many(self, requests):
        blocks = []
        for r in requests:
            context, tokens, rows = list(r.context), [], []
            gen = None if r.params.greedy else make_generator(r.seed)
            for _ in range(r.k):
                q = self._q(context)
                x = int(q.argmax()) if gen is None else sample_token(q, gen)
                tokens.append(x)
                rows.append(q)
                context.append(x)
            blocks.append(DraftBlock(tokens, None if gen is None or not rows else torch.stack(rows)))
        return blocks

    def after_round(self, result: RoundResult) -> None:
        self.rounds += 1
        self.judged += len(result.block)
        assert result.context_length >= len(result.acceptance.tokens)


def build_bigram(draft_config, sources) -> BigramDrafter:
    return BigramDrafter(int(sources.target_weights().model.config.vocab_size))


BIGRAM = registry.DrafterKind("bigram", "a context bigram model (the contract test's drafter)",
                              "tests.test_drafter_contract:build_bigram")


@pytest.fixture
def bigram():
    """Registered by name for this test (the registry's public API), gone afterwards."""
    registry.register(BIGRAM)
    yield BIGRAM.name
    registry.unregister(BIGRAM.name)
    registry.unregister(REFERENCE)


def _config(name: str, k="adaptive"):
    from conftest import tiny_config

    return tiny_config(drafter=name, k=k)


def test_a_registered_drafter_is_known_to_config_factory_and_bench(bigram):
    from specserve.cluster.bench import runnable_drafters
    from specserve.cluster.config import ConfigError, parse_config
    from specserve.cluster.runtime.factory import check_drafter_name

    config = _config(bigram)
    assert config.draft.drafter == bigram and bigram in runnable_drafters(config)
    check_drafter_name(bigram, config.draft)
    # one answer everywhere: a second stage is refused by the config, the factory and the bench alike
    with pytest.raises(ConfigError, match="second_stage"):
        parse_config({"target": {"model": "tiny-llama"}, "draft": {"drafter": bigram, "second_stage": "ngram"}})
    staged = config.model_copy(update={"draft": config.draft.model_copy(update={"second_stage": "ngram"})})
    assert registry.unusable(bigram, staged.draft) is not None and bigram not in runnable_drafters(staged)
    with pytest.raises(ConfigError, match="draft.drafter"):
        parse_config({"draft": {"drafter": "no-such-drafter"}})
    # "module:attribute": found (and registered) on first use, as in a Ray process
    assert registry.find(REFERENCE).builder == BIGRAM.builder
    assert parse_config({"target": {"model": "tiny-llama"}, "draft": {"drafter": REFERENCE}}).draft.drafter == REFERENCE


def test_capabilities_are_one_record():
    from specserve.cluster.runtime.drafters import NgramDrafter

    class ChainsOnly(NgramDrafter):
        capabilities = DrafterCapabilities()  # the record alone says what it does

    class Loose(NgramDrafter):  # a capability as a loose attribute is not read
        drafts_trees = False

    assert capabilities_of(NgramDrafter()).drafts_trees and not capabilities_of(ChainsOnly()).drafts_trees
    assert capabilities_of(Loose()).drafts_trees
    assert capabilities_of(BigramDrafter(8)) == DrafterCapabilities(observes_rounds=True)
    assert capabilities_of(None) == DrafterCapabilities()
    assert isinstance(BigramDrafter(8), Drafter)


def test_greedy_equals_plain_in_process(bigram, tiny_llama, tmp_path, monkeypatch):
    from conftest import TINY_PROMPTS, hf_greedy

    from specserve.cluster.runtime.engine import GenerationRequest
    from specserve.cluster.runtime.factory import make_engine

    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))  # adaptive K calibrates this drafter: not into the user's cache
    eos = tiny_llama.tokenizer.eos_token_id
    prompts = [p * 3 for p in TINY_PROMPTS]
    for k in (3, "adaptive"):
        engine = make_engine(_config(bigram, k), tiny_llama)
        assert engine.drafter.name == "bigram"
        got = engine.generate([GenerationRequest(p, 24) for p in prompts])
        for p, r in zip(prompts, got):
            assert r.token_ids == hf_greedy(tiny_llama.model, tiny_llama.tokenizer.encode(p), 24, eos)
        if k == 3:
            assert sum(r.stats.draft_tokens for r in got) > 0 and sum(r.stats.accepted_tokens for r in got) > 0
            assert engine.drafter.rounds > 0 and engine.drafter.judged == sum(r.stats.draft_tokens for r in got)


def _samples(engine, prompt, n, k=2):
    from specserve.cluster.runtime.engine import GenerationRequest
    from specserve.cluster.speculation import SamplingParams

    requests = [GenerationRequest(prompt, 2, SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=s), k)
                for s in range(n)]
    return [tuple(r.token_ids) for r in engine.generate(requests)]


def test_sampled_output_follows_the_targets_distribution(bigram, tiny_llama, monkeypatch):
    """Chi-square against the exact two-token joint; accepting every draft (the negative control:
    the output is then the bigram's q) must fail the same test."""
    import specserve.cluster.speculation.rejection as rejection
    from specserve.cluster.runtime.factory import make_engine
    from specserve.cluster.speculation.exact import chi2_pvalue, exact_joint

    prompt = "abab"
    joint = exact_joint(tiny_llama, tiny_llama.tokenizer.encode(prompt), PARAMS, 2)
    engine = make_engine(_config(bigram, 2), tiny_llama)
    assert chi2_pvalue(_samples(engine, prompt, 1500), joint) > 1e-3
    monkeypatch.setattr(rejection, "acceptance_probs", lambda p_x, q_x: torch.ones_like(p_x))
    assert chi2_pvalue(_samples(make_engine(_config(bigram, 2), tiny_llama), prompt, 1500), joint) < 1e-6


@pytest.mark.ray
@pytest.mark.parametrize("replicas", [0, 1])
def test_greedy_equals_plain_in_the_distributed_shape(ray_cluster, tiny_llama, replicas):
    """A coordinator actor (tensor parallel 2), the drafter beside it or on a draft replica over
    gRPC: each process finds the drafter by its "module:attribute" name through the registry."""
    from conftest import TINY_PROMPTS, hf_greedy, tiny_distributed

    from specserve.cluster.runtime.engine import GenerationRequest

    engine = tiny_distributed({"drafter": REFERENCE}, replicas, {"num_draft_tokens": 3})
    try:
        requests = [GenerationRequest(p * 3, 24) for p in TINY_PROMPTS]
        got = engine.generate(requests)
        eos = tiny_llama.tokenizer.eos_token_id
        for r, res in zip(requests, got):
            assert res.token_ids == hf_greedy(tiny_llama.model, tiny_llama.tokenizer.encode(r.prompt), 24, eos)
        assert sum(r.stats.draft_tokens for r in got) > 0 and sum(r.stats.accepted_tokens for r in got) > 0
    finally:
        engine.shutdown()
        registry.unregister(REFERENCE)


@pytest.mark.ray
def test_served_greedy_equals_plain(ray_cluster):
    """Through Serve's gRPC API (configs/tiny.yaml behind the engine): K = 3 and the server's policy
    give plain decoding's tokens."""
    from conftest import TINY_PROMPTS, served_tiny

    try:
        with served_tiny("contract-test", draft={"drafter": REFERENCE}, cluster={"draft_replicas": 0}) as run:
            plain = [run(p, 0) for p in TINY_PROMPTS[:3]]
            for k in (3, None):
                got = [run(p, k) for p in TINY_PROMPTS[:3]]
                assert [list(r.token_ids) for r in got] == [list(r.token_ids) for r in plain]
            assert all(r.stats.draft_tokens == 0 for r in plain)
            assert sum(r.stats.draft_tokens for r in (run(p, 3) for p in TINY_PROMPTS[:3])) > 0
    finally:
        registry.unregister(REFERENCE)
