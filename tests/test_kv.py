"""KV caches: after a rollback, continuing gives the logits a fresh prefill gives."""

import pytest
import torch

from cluster.runtime.drafters import ModelDrafter
from cluster.runtime.engine import GenerationRequest
from cluster.runtime.factory import make_engine
from cluster.runtime.kv import CausalLM
from cluster.speculation import SamplingParams
from conftest import TINY_PROMPTS, tiny_config


def _fresh_logits(lm, ids, n_last):
    return lm.forward(lm.new_cache(), ids)[-n_last:]


def _continue_after_rollback(lm, prompt_ids, drop):
    cache = lm.new_cache()
    lm.forward(cache, prompt_ids[:-1], last_only=True)
    lm.forward(cache, [prompt_ids[-1], 11, 12, 13, 14, 15])  # last token + 5 drafts
    lm.rollback(cache, drop)
    return lm.forward(cache, [21, 22, 23]), lm.cached_length(cache)


def _check_rollback(model, prompt_ids):
    """2 of 5 drafts accepted: drop 3. float32 differs by rounding only (relative to the logit scale)."""
    lm = CausalLM(model)
    want = _fresh_logits(lm, prompt_ids + [11, 12] + [21, 22, 23], 3)
    got, cached = _continue_after_rollback(lm, prompt_ids, 3)
    assert cached == len(prompt_ids) + 2 + 3
    scale = want.abs().max()
    assert (got - want).abs().max() <= 4e-6 * scale, (got - want).abs().max()
    wrong, _ = _continue_after_rollback(lm, prompt_ids, 2)  # negative control: one stale draft left in
    assert (wrong - want).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_rollback_matches_fresh_prefill(request, name):
    loaded = request.getfixturevalue(name)
    _check_rollback(loaded.model, loaded.tokenizer.encode("rollback after a rejection"))


@pytest.mark.smollm2
def test_rollback_matches_fresh_prefill_smollm2(smollm2_fp32):
    _check_rollback(smollm2_fp32.model, smollm2_fp32.tokenizer.encode("Rolling back a cache after a rejection."))


def test_draft_cache_follows_the_committed_context(tiny_llama):
    """The draft model's lazily rolled-back cache gives the q a fresh drafter gives."""
    drafter = ModelDrafter(tiny_llama.model)
    params = SamplingParams(temperature=1.0, seed=0)
    context = tiny_llama.tokenizer.encode("draft cache")
    for round_, (accepted, extra) in enumerate([(0, 1), (2, 1), (4, 1), (1, 3)]):
        block = drafter.propose(7, context, 4, params, seed=round_)
        context = context + block.token_ids[:accepted] + [100 + accepted] * extra
        fresh = ModelDrafter(tiny_llama.model).propose(0, context, 1, params, seed=99)
        again = drafter.propose(7, context, 1, params, seed=99)
        assert torch.allclose(again.probs, fresh.probs, atol=1e-5)
        assert again.token_ids == fresh.token_ids


def test_engine_keeps_target_cache_one_behind(tiny_llama):
    """Between rounds the target cache holds every committed token but the last: no re-prefill."""
    engine = make_engine(tiny_config(), tiny_llama)
    ids = [engine.add_request(GenerationRequest(p, 40, SamplingParams(1.0, seed=i), 3)) for i, p in enumerate(TINY_PROMPTS)]
    rounds = 0
    while engine.has_unfinished():
        engine.step()
        rounds += 1
        for i in ids:
            s = engine._seqs.get(i)
            if s is not None:
                assert CausalLM.cached_length(s.cache) == len(s.tokens) - 1
    assert rounds > 1


def _ragged_rounds(lm, forward_batch):
    """Three rounds of ragged verify blocks with rollbacks, one sequence without a prefill."""
    prompts = [list(b"left padding"), [3], list(b"a longer prompt than the others"), [40, 41]]
    blocks = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    caches = [lm.new_cache() for _ in prompts]
    for p, c in zip(prompts, caches):
        if len(p) > 1:
            lm.forward(c, p[:-1], last_only=True)
    out = []
    for _ in range(3):
        out.append(forward_batch(caches, [[p[-1]] + b for p, b in zip(prompts, blocks)]))
        for c, b in zip(caches, blocks):
            lm.rollback(c, len(b) // 2)
        prompts = [p + b[: len(b) - len(b) // 2] for p, b in zip(prompts, blocks)]
    return out, [lm.cached_length(c) for c in caches]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_padded_batch_forward_equals_one_forward_per_sequence(request, name):
    lm = CausalLM(request.getfixturevalue(name).model)
    one_by_one = lambda caches, inputs: [lm.forward(c, x) for c, x in zip(caches, inputs)]  # noqa: E731
    want, want_lengths = _ragged_rounds(lm, one_by_one)
    got, got_lengths = _ragged_rounds(lm, lm.forward_batch)
    assert got_lengths == want_lengths
    for w_round, g_round in zip(want, got):
        for w, g in zip(w_round, g_round):
            assert w.shape == g.shape
            assert (w - g).abs().max() <= 1e-5, (w - g).abs().max()
    # negative control: a batch without the padding mask sees other rows' padding as context
    unmasked = lambda caches, inputs: _unmasked(lm, caches, inputs)  # noqa: E731
    bad, _ = _ragged_rounds(lm, unmasked)
    assert max((w - b).abs().max() for w, b in zip(want[0], bad[0])) > 1e-3


def _unmasked(lm, caches, inputs):
    real = lm.model.forward

    def no_mask(**kw):
        kw.pop("attention_mask")
        return real(**kw)

    lm.model.forward = no_mask
    try:
        return lm.forward_batch(caches, inputs)
    finally:
        del lm.model.forward
