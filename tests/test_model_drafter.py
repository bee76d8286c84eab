"""Model drafters (model, int8, trained): one batched forward per draft step, trees at the root,
and the second stage (prompt lookup whose guesses the draft verifies in its own forward)."""

import pytest
import torch

import specserve.cluster.runtime.model_drafter as model_drafter
from specserve.cluster.config import parse_config
from specserve.cluster.runtime.drafters import NgramDrafter
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.model_drafter import ModelDrafter
from specserve.cluster.runtime.models import layer_subset
from specserve.cluster.speculation import SamplingParams
from specserve.cluster.speculation.round import DraftRequest
from conftest import (TINY_PROMPTS, assert_greedy_equals_plain_on_smollm2, first_children, hf_greedy,
                      tiny_distributed)

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0.0)


def _drafter(loaded, stage: bool, layers=(0, 1)) -> ModelDrafter:
    return ModelDrafter(layer_subset(loaded.model, list(layers)), second_stage=NgramDrafter() if stage else None)


def _accept_every_guess(target_probs, draft_token_ids, draft_probs, num_draft_tokens, greedy, generators):
    """A wrong second stage (the negative control): keeps every guess, then samples one token."""
    from specserve.cluster.speculation import RejectionOutput, sample_token

    k = list(num_draft_tokens)
    out = torch.full((len(k), max(k, default=0) + 1), -1, dtype=torch.long)
    start = 0
    for i, n in enumerate(k):
        out[i, :n] = draft_token_ids[start : start + n]
        out[i, n] = sample_token(target_probs[start + i + n], generators[i])
        start += n
    return RejectionOutput(out, torch.tensor(k))


def test_the_second_stage_keeps_the_drafts_own_greedy_decoding_in_fewer_forwards(tiny_llama):
    """Greedy blocks with lookup guesses equal the draft's plain greedy blocks, token for token,
    and take fewer draft forwards on text that repeats itself."""
    contexts = [tiny_llama.tokenizer.encode(p * 3) for p in TINY_PROMPTS]
    plain, staged = _drafter(tiny_llama, False), _drafter(tiny_llama, True)
    for ctx in contexts:
        for end in range(len(ctx) // 2, len(ctx), 3):  # a growing context: the lazy crop runs too
            request = [DraftRequest(1, ctx[:end], 6, GREEDY, 0)]
            assert staged.propose_many(request)[0].token_ids == plain.propose_many(request)[0].token_ids
        plain.release(1), staged.release(1)
    assert staged.guessed > 0 and staged.forwards < plain.forwards, (staged.guessed, staged.forwards, plain.forwards)


def test_the_second_stage_keeps_the_draft_cache_equal_to_a_fresh_prefill(tiny_llama):
    staged = _drafter(tiny_llama, True)
    ctx = tiny_llama.tokenizer.encode(TINY_PROMPTS[0] * 3)
    for end in (len(ctx) - 9, len(ctx) - 4, len(ctx)):
        staged.propose_many([DraftRequest(3, ctx[:end], 5, SamplingParams(temperature=1.0, seed=end), end)])
    s = staged._seqs[3]
    assert staged.lm.cached_length(s.cache) == len(s.tokens) and s.tokens == ctx[: len(s.tokens)] + s.tokens[len(ctx):]
    got = staged.lm.forward(s.cache, [7])[-1]
    with torch.inference_mode():
        want = staged.lm.model(input_ids=torch.tensor([s.tokens + [7]])).logits[0, -1].float()
    assert torch.allclose(got, want, atol=1e-5)


def test_second_stage_blocks_follow_the_drafts_own_distribution(tiny_llama, monkeypatch):
    """Sampled blocks with lookup guesses: three draft tokens follow the draft's exact chain
    distribution (the q the verifier is told), batched over many sequences; keeping every guess
    (the negative control) does not."""
    from types import SimpleNamespace

    from test_engine_sampling import PARAMS, _chi2_pvalue
    from test_head import _exact_joint

    staged = _drafter(tiny_llama, True)
    # the draft's own greedy text falls into a loop, which lookup continues: its guesses have high q
    ctx = tiny_llama.tokenizer.encode("ab1ab2ab")
    ctx += staged.propose_many([DraftRequest(0, ctx, 32, GREEDY, 0)])[0].token_ids
    staged.release(0)
    joint = _exact_joint(SimpleNamespace(model=staged.lm.model), ctx, PARAMS, 3)  # the draft's own chain law

    def samples(n: int) -> list[tuple[int, ...]]:
        out = []
        for start in range(0, n, 500):
            ids = range(start, min(n, start + 500))
            blocks = staged.propose_many([DraftRequest(i, ctx, 3, PARAMS, seed=i) for i in ids])
            for i, b in zip(ids, blocks):
                assert b.probs.shape == (3, staged.vocab_size)
                out.append(tuple(b.token_ids))
                staged.release(i)
        return out

    assert _chi2_pvalue(samples(3000), joint) > 1e-3
    assert staged.guessed > 500  # the guesses were kept often
    monkeypatch.setattr(model_drafter, "rejection_sample", _accept_every_guess)
    assert _chi2_pvalue(samples(3000), joint) < 1e-6


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("tree,stage", [(False, True), (True, False), (True, True)])
def test_greedy_with_model_trees_and_second_stage_equals_plain(model, tree, stage, request):
    loaded = request.getfixturevalue(model)
    engine = SpeculativeEngine(loaded.model, loaded.tokenizer, _drafter(loaded, stage, (0, 1, 3)), num_draft_tokens=4,
                               tree_nodes=8 if tree else 0, tree_branch=2, prefill_chunk=16)
    prompts = [loaded.tokenizer.encode(p * 3) for p in TINY_PROMPTS]
    results = engine.generate([GenerationRequest("", 40, GREEDY, prompt_ids=p) for p in prompts])
    eos = loaded.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(loaded.model, ids, 40, eos)[: len(r.token_ids)]
    assert sum(r.stats.accepted_tokens for r in results) > 0
    assert (sum(r.stats.tree_rounds for r in results) > 10) == tree


def test_model_trees_with_the_second_stage_sample_the_target_distribution(tiny_llama, monkeypatch):
    """Two children sampled from q at the root, sampled chains with lookup guesses below: three
    tokens follow the target's exact joint; accepting first children (the negative control) does not."""
    import specserve.cluster.speculation.tree as tree_module
    from test_engine_sampling import PARAMS, _chi2_pvalue
    from test_head import _exact_joint

    prompt = "ab1ab2ab"
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, _drafter(tiny_llama, True), num_draft_tokens=2,
                               tree_nodes=4, tree_branch=2)
    joint = _exact_joint(tiny_llama, tiny_llama.tokenizer.encode(prompt), PARAMS, 3)

    def samples(n: int) -> list[tuple[int, ...]]:
        params = [SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=i) for i in range(n)]
        return [tuple(r.token_ids) for r in engine.generate([GenerationRequest(prompt, 3, params[i], 2) for i in range(n)])]

    got = samples(3000)
    assert _chi2_pvalue(got, joint) > 1e-3
    monkeypatch.setattr(tree_module, "accept_tree", first_children)
    assert _chi2_pvalue(samples(3000), joint) < 1e-6


def test_second_stage_config_and_flags_name_the_field(capsys):
    from specserve.cluster.cli import main

    assert parse_config({"draft": {"drafter": "int8", "second_stage": "ngram"}}).draft.second_stage == "ngram"
    with pytest.raises(ValueError, match="draft.second_stage 'ngram' speeds up a draft model's own decoding"):
        parse_config({"draft": {"drafter": "ngram", "second_stage": "ngram"}})
    with pytest.raises(ValueError, match="second_stage"):
        parse_config({"draft": {"drafter": "int8", "second_stage": "bogus"}})
    argv = ["generate", "--prompt", "hi", "--config", "configs/tiny.yaml", "--max-new-tokens", "2"]
    assert main(argv + ["--second-stage", "bogus"]) == 2
    assert "invalid second-stage: unknown second stage 'bogus'; choose one of ngram or none" in capsys.readouterr().err
    assert main(argv + ["--second-stage", "ngram", "--drafter", "ngram"]) == 2
    err = capsys.readouterr().err
    assert "invalid second-stage" in err and "drafter 'ngram' has none" in err


def test_generate_runs_a_model_draft_with_the_second_stage(capsys):
    import json

    from specserve.cluster.cli import main

    argv = ["generate", "--prompt", "abcabcabcabc", "--config", "configs/tiny.yaml", "--max-new-tokens", "12",
            "--drafter", "model", "--second-stage", "ngram", "--tree-nodes", "6", "--num-draft-tokens", "3", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 12


@pytest.mark.ray
def test_distributed_greedy_with_model_trees_and_second_stage_equals_plain(ray_cluster, tiny_llama):
    """Tensor parallel 2, the model draft on a draft replica over gRPC: trees and second stage."""
    engine = tiny_distributed({"drafter": "model", "model": {"layers": [0, 1]}, "second_stage": "ngram"}, 1,
                              {"num_draft_tokens": 4, "tree": {"max_nodes": 8, "max_branch": 2}})
    try:
        requests = [GenerationRequest(p * 3, 32) for p in TINY_PROMPTS]
        got = engine.generate(requests)
        eos = tiny_llama.tokenizer.eos_token_id
        for req, r in zip(requests, got):
            ids = tiny_llama.tokenizer.encode(req.prompt)
            assert r.token_ids == hf_greedy(tiny_llama.model, ids, 32, eos)[: len(r.token_ids)]
        assert sum(r.stats.tree_rounds for r in got) > 0
    finally:
        engine.shutdown()


@pytest.mark.smollm2
def test_greedy_with_model_trees_and_second_stage_equals_plain_on_smollm2(smollm2_fp32):
    from specserve.cluster.runtime.factory import make_engine

    config = parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "float32"},
                           "draft": {"drafter": "model", "model": {"layers": [0, 1, 2, 3, 26, 27, 28, 29]},
                                     "second_stage": "ngram"},
                           "speculation": {"tree": {"max_nodes": 8}}})
    prompts = ["Write a Python function that checks whether a number is prime, with a docstring.",
               "Repeat this list exactly: apples, pears, plums, apples, pears, plums."]
    results = assert_greedy_equals_plain_on_smollm2(make_engine(config, smollm2_fp32), smollm2_fp32, prompts, 32, 4)
    assert sum(r.stats.tree_rounds for r in results) > 5


def test_the_guess_length_follows_each_sequences_kept_rate():
    from specserve.cluster.runtime.model_drafter import _SeqCache

    s = _SeqCache(None)
    assert s.guess_limit() == 2  # the prior: half the guesses kept
    s.guessed, s.kept = 100, 95
    assert s.guess_limit() >= 16  # lookup holds: guess far
    s.guessed, s.kept = 100, 10
    assert s.guess_limit() == 1  # it does not: one guess, which costs one row


def test_trees_keep_to_the_node_budget(tiny_llama):
    """Both root children grow chains (with guesses) in the same steps: the tree never exceeds
    max_nodes, and a budget that runs out mid-guess leaves the cache consistent."""
    staged = _drafter(tiny_llama, True)
    ctx = tiny_llama.tokenizer.encode(TINY_PROMPTS[0] * 3)
    for budget in (2, 3, 5, 8):
        for t, params in enumerate((GREEDY, SamplingParams(temperature=1.0))):
            block = staged.propose_many([DraftRequest(t, ctx, 6, params, 1, max_nodes=budget, max_branch=2)])[0]
            assert 0 < len(block) <= budget and (block.probs is None) == params.greedy
            s = staged._seqs[t]
            assert staged.lm.cached_length(s.cache) == len(s.tokens)
            staged.release(t)
