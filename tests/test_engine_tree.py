"""Draft trees through the engine: the n-gram drafter's trie of earlier matches, verified in one
pass with tree masks, accepted losslessly, and the accepted path gathered in the target's cache."""

import pytest
import torch

from specserve.cluster.config import parse_config
from specserve.cluster.runtime.drafters import NgramDrafter
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.speculation import SamplingParams
from specserve.cluster.speculation.round import DrafterCapabilities
from conftest import TINY_PROMPTS, assert_greedy_equals_plain_on_smollm2, first_children, hf_greedy, tiny_distributed

pytestmark = pytest.mark.usefixtures("one_thread")


class _CountingNgram(NgramDrafter):
    """The n-gram drafter, counting the tree blocks (not chains) it proposed."""

    def __init__(self):
        super().__init__(max_n=3, min_n=1)
        self.trees = self.nodes = 0

    def propose_many(self, requests):
        blocks = super().propose_many(requests)
        for b in blocks:
            if b.parents is not None:
                self.trees += 1
                self.nodes += len(b)
        return blocks


def test_the_ngram_tree_merges_earlier_matches_into_a_trie():
    d = NgramDrafter(max_n=3, min_n=1)
    ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 9, 1, 2, 3, 4, 7, 9, 1, 2]
    block = d.tree(ctx, depth=4, max_nodes=8, max_branch=2)
    # latest match of [9, 1, 2] first: 3 4 7 9; then 3 5 9 1 shares the 3; then [1, 2] adds 4 9 under 3 4
    assert block.token_ids == [3, 4, 7, 9, 5, 9, 1, 9] and block.parents == (-1, 0, 1, 2, 0, 4, 5, 1)
    assert block.probs is None  # chosen children
    narrow = d.tree(ctx, depth=4, max_nodes=8, max_branch=1)
    assert narrow.parents is None and narrow.token_ids == d.lookup(ctx, 4)  # one path: a chain
    assert len(d.tree(ctx, depth=4, max_nodes=3, max_branch=2)) == 3
    assert len(d.tree(ctx, depth=0, max_nodes=8, max_branch=2)) == 0


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("k", [4, "adaptive"])
def test_greedy_with_trees_equals_plain_greedy(model, k, request):
    loaded = request.getfixturevalue(model)
    drafter = _CountingNgram()
    engine = SpeculativeEngine(loaded.model, loaded.tokenizer, drafter, num_draft_tokens=k, tree_nodes=10, tree_branch=3,
                               prefill_chunk=16)
    prompts = [loaded.tokenizer.encode(p * 3) for p in TINY_PROMPTS]
    results = engine.generate([GenerationRequest("", 48, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = loaded.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(loaded.model, ids, 48, eos)[: len(r.token_ids)]
    if k == 4:
        assert drafter.trees > 10 and sum(r.stats.accepted_tokens for r in results) > 0
        assert sum(r.stats.tree_rounds for r in results) == drafter.trees


def test_a_tree_round_leaves_the_cache_of_a_fresh_prefill_of_the_accepted_text(tiny_llama):
    """Verify [last] + a tree, keep the prefix and one root-to-leaf path: the next step's logits
    equal a fresh prefill of that text; cropping instead of gathering (the negative control) does not."""
    lm = CausalLM(tiny_llama.model)
    prompt = tiny_llama.tokenizer.encode("the tree keeps one path")
    tokens, parents = [11, 12, 13, 14, 15], [-1, -1, 1, 2, 0]  # root -> 11 -> 15 | root -> 12 -> 13 -> 14
    path = [1, 2, 3]
    layout = list(range(-1, 0)) + [0 if p < 0 else 1 + p for p in parents]  # [last] then the nodes
    want_text = prompt + [tokens[j] for j in path]
    with torch.inference_mode():
        want = tiny_llama.model(input_ids=torch.tensor([want_text + [7]])).logits[0, -1]
    for gather in (True, False):
        cache = lm.new_cache()
        lm.forward_batch([cache], [prompt[:-1]], last=[0])
        lm.forward_batch([cache], [prompt[-1:] + tokens], parents=[layout])
        base = len(prompt)
        if gather:
            lm.keep(cache, list(range(base)) + [base + j for j in path])
        else:
            lm.rollback(cache, len(tokens) - len(path))
        got = lm.forward_batch([cache], [[7]])[0][-1]
        close = torch.allclose(got, want, atol=1e-5)
        assert close if gather else not close
        lm.release(cache)


def test_trees_sample_the_target_distribution(tiny_llama, monkeypatch):
    """A prompt whose suffix occurred twice with different continuations drafts a tree each round:
    three sampled tokens follow the target's exact joint distribution; a rule that accepts the
    first child always (the negative control) does not."""
    import specserve.cluster.speculation.tree as tree_module
    from test_engine_sampling import PARAMS, _chi2_pvalue
    from test_head import _exact_joint

    prompt = "ab1ab2ab"
    drafter = _CountingNgram()
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, drafter, num_draft_tokens=2, tree_nodes=4,
                               tree_branch=2)
    joint = _exact_joint(tiny_llama, tiny_llama.tokenizer.encode(prompt), PARAMS, 3)

    def samples(n: int) -> list[tuple[int, ...]]:
        params = [SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=i) for i in range(n)]
        return [tuple(r.token_ids) for r in engine.generate([GenerationRequest(prompt, 3, params[i], 2) for i in range(n)])]

    assert _chi2_pvalue(samples(3000), joint) > 1e-3
    assert drafter.trees >= 3000
    monkeypatch.setattr(tree_module, "accept_tree", first_children)
    assert _chi2_pvalue(samples(3000), joint) < 1e-6


def test_speculation_tree_config_reaches_the_engine(tiny_llama):
    from specserve.cluster.runtime.factory import make_engine

    config = parse_config({"target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False},
                           "draft": {"drafter": "ngram"}, "speculation": {"tree": {"max_nodes": 6, "max_branch": 3}}})
    engine = make_engine(config, tiny_llama)
    assert (engine.tree_nodes, engine.tree_branch) == (6, 3)
    with pytest.raises(ValueError, match="max_nodes"):
        parse_config({"speculation": {"tree": {"max_nodes": -1}}})
    model = make_engine(parse_config({"target": {"model": "tiny-llama", "dtype": "float32"},
                                      "draft": {"drafter": "model", "model": {"layers": [0, 1]}},
                                      "speculation": {"tree": {"max_nodes": 6}}}), tiny_llama)
    assert model.tree_nodes == 6  # model drafters branch at the root

    class ChainsOnly(NgramDrafter):
        capabilities = DrafterCapabilities()

    chains = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, ChainsOnly(), tree_nodes=6)
    assert chains.tree_nodes == 0  # a drafter that drafts chains only gets chain requests


@pytest.mark.ray
def test_distributed_greedy_with_trees_equals_plain(ray_cluster, tiny_llama):
    """Tensor parallel 2: every rank lays the tree out the same way and gathers the same path."""
    engine = tiny_distributed({"drafter": "ngram"}, 0, {"num_draft_tokens": 4, "tree": {"max_nodes": 10, "max_branch": 3}})
    try:
        requests = [GenerationRequest(p * 3, 32) for p in TINY_PROMPTS]
        got = engine.generate(requests)
        eos = tiny_llama.tokenizer.eos_token_id
        for r, res in zip(requests, got):
            assert res.token_ids == hf_greedy(tiny_llama.model, tiny_llama.tokenizer.encode(r.prompt), 32, eos)
        assert sum(r.stats.accepted_tokens for r in got) > 0 and sum(r.stats.tree_rounds for r in got) > 10
    finally:
        engine.shutdown()


def test_generate_takes_tree_nodes(capsys):
    import json

    from specserve.cluster.cli import main

    argv = ["generate", "--config", "configs/tiny.yaml", "--drafter", "ngram", "--prompt", "abcabcabcabcabc",
            "--max-new-tokens", "24", "--num-draft-tokens", "4", "--json"]
    assert main(argv + ["--tree-nodes", "8"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert main(argv + ["--tree-nodes", "0"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert tree["token_ids"] == chain["token_ids"] and chain["stats"]["tree_rounds"] == 0
    assert main(argv + ["--tree-nodes", "-1"]) == 2
    assert "invalid tree-nodes: must be in [0, 64]" in capsys.readouterr().err


@pytest.mark.smollm2
def test_greedy_with_trees_equals_plain_on_smollm2(smollm2_fp32):
    """SmolLM2 in float32 with ngram_head trees (the lookup trie and the head's top-2 branches):
    greedy output equals plain greedy, and trees were drafted."""
    from specserve.cluster.runtime.factory import make_engine

    config = parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "float32"},
                           "draft": {"drafter": "ngram_head"}, "speculation": {"tree": {"max_nodes": 8}}})
    prompts = ["Write a Python function that checks whether a number is prime, with a docstring.",
               "Repeat this list exactly: apples, pears, plums, apples, pears, plums."]
    results = assert_greedy_equals_plain_on_smollm2(make_engine(config, smollm2_fp32), smollm2_fp32, prompts, 40, 4)
    assert sum(r.stats.tree_rounds for r in results) > 5


def test_adaptive_trees_grow_where_verification_is_flat_and_shrink_where_it_costs(tiny_llama):
    """Adaptive shapes (speculation.shape): where verified tokens are nearly free the rounds draft
    trees of several nodes; where each costs 6% of a step they draft fewer nodes a round and fewer
    trees; the acceptance by depth and rank is learned from the rounds; output stays exact."""
    from specserve.cluster.speculation import CostModel

    prompts = [tiny_llama.tokenizer.encode(p * 3) for p in TINY_PROMPTS]
    eos = tiny_llama.tokenizer.eos_token_id
    seen = {}
    for name, slope in (("flat", 0.002), ("linear", 0.06)):
        cost = CostModel(0.0, tuple(1.0 + slope * k for k in range(7)))
        engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, NgramDrafter(), max_draft_tokens=6,
                                   cost_model=cost, prior_alpha=0.8, tree_nodes=8, tree_branch=2)
        results = engine.generate([GenerationRequest("", 32, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
        for ids, r in zip(prompts, results):
            assert r.token_ids == hf_greedy(tiny_llama.model, ids, 32, eos)[: len(r.token_ids)]
        drafting = [n for r in results for n in r.stats.rounds_k if n]
        seen[name] = (sum(r.stats.tree_rounds for r in results), sum(drafting) / len(drafting))
        (stats,) = engine._shape_stats.values()
        assert stats.tested[0][0] > 0 and (name == "linear" or stats.tested[0][1] > 0)
    assert seen["flat"][0] > seen["linear"][0] and seen["flat"][1] > seen["linear"][1], seen


@pytest.mark.ray
def test_served_greedy_with_adaptive_trees_equals_plain(ray_cluster):
    """Through Serve's gRPC API (configs/tiny.yaml: tensor parallel 2, the n-gram drafter on a draft
    replica, trees of up to 8 nodes): the server's policy and K = 4 give plain decoding's tokens."""
    from conftest import served_tiny

    prompts = [p * 3 for p in TINY_PROMPTS[:3]]  # repeated text: earlier matches to branch on
    with served_tiny("tree-test", draft={"drafter": "ngram"}, speculation={"tree": {"max_nodes": 8, "max_branch": 2}}) as run:
        plain = [list(run(p, 0).token_ids) for p in prompts]
        for k in (4, None):
            got = [run(p, k) for p in prompts]
            assert [list(r.token_ids) for r in got] == plain
            assert sum(r.stats.accepted_tokens for r in got) > 0
