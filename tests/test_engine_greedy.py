"""Greedy speculative output equals plain greedy output token for token (float32, CPU: 100%)."""

import pytest

from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from conftest import TINY_PROMPTS, hf_greedy, tiny_config

DRAFTERS = [("model", (0, 1, 3)), ("model", (0,)), ("ngram", (0,)), ("int8", (0,))]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("drafter,layers", DRAFTERS)
def test_tiny_greedy_equals_plain(request, name, drafter, layers):
    loaded = request.getfixturevalue(name)
    engine = make_engine(tiny_config(model=loaded.name, drafter=drafter, layers=layers), loaded)
    max_new = 48
    plain = engine.generate([GenerationRequest(p, max_new, num_draft_tokens=0) for p in TINY_PROMPTS])
    for r, p in zip(plain, TINY_PROMPTS):
        assert r.stats.draft_tokens == 0 and r.stats.target_calls == len(r.token_ids) + (r.finish_reason == "eos")
        assert r.token_ids == hf_greedy(loaded.model, loaded.tokenizer.encode(p), max_new, loaded.tokenizer.eos_token_id)
    drafted = 0
    for k in [1, 2, 3, 5, 8, None]:
        spec = engine.generate([GenerationRequest(p, max_new, num_draft_tokens=k) for p in TINY_PROMPTS])
        for s, r in zip(spec, plain):
            assert s.token_ids == r.token_ids, f"K={k}"
            assert s.finish_reason == r.finish_reason and s.text == r.text
            drafted += s.stats.draft_tokens
    assert drafted > 0


def test_tiny_greedy_exercises_partial_acceptance(tiny_llama):
    """The equality above is not trivial: drafts are both accepted and rejected."""
    engine = make_engine(tiny_config(), tiny_llama)
    rs = engine.generate([GenerationRequest(p, 48, num_draft_tokens=4) for p in TINY_PROMPTS])
    accepted = sum(r.stats.accepted_tokens for r in rs)
    drafted = sum(r.stats.draft_tokens for r in rs)
    assert 0 < accepted < drafted


SMOL_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Rewrite in the past tense: The cat sits on the mat and looks at the birds in the garden.",
    "Write a Python function that returns the square of a number.",
    "List three colours of the rainbow.",
]


@pytest.mark.smollm2
@pytest.mark.parametrize("drafter", ["ngram", "int8", "model"])
def test_smollm2_greedy_equals_plain(smollm2_fp32, drafter):
    config = tiny_config(model="smollm2-135m-instruct", drafter=drafter, layers=list(range(10)) + [26, 27, 28, 29])
    config = config.model_copy(update={"target": config.target.model_copy(update={"chat_template": True})})
    engine = make_engine(config, smollm2_fp32)
    max_new = 40
    plain = engine.generate([GenerationRequest(p, max_new, num_draft_tokens=0) for p in SMOL_PROMPTS])
    drafted = accepted = 0
    for k in [3, None]:
        spec = engine.generate([GenerationRequest(p, max_new, num_draft_tokens=k) for p in SMOL_PROMPTS])
        for s, r in zip(spec, plain):
            assert s.token_ids == r.token_ids, f"drafter={drafter} K={k}"
            drafted += s.stats.draft_tokens
            accepted += s.stats.accepted_tokens
    assert drafted > 0 and accepted > 0


@pytest.mark.smollm2
def test_smollm2_plain_equals_transformers_generate(smollm2_fp32):
    engine = make_engine(tiny_config(model="smollm2-135m-instruct", drafter="ngram"), smollm2_fp32)
    tok = smollm2_fp32.tokenizer
    for p in SMOL_PROMPTS[:2]:
        ids = tok.encode(p)
        ours = engine.generate([GenerationRequest(p, 24, num_draft_tokens=4)])[0].token_ids
        assert ours == hf_greedy(smollm2_fp32.model, ids, 24, tok.eos_token_id)
