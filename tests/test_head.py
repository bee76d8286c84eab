"""Drafter `head`: the corpus, the target's features, training a draft head, and drafting with it exactly."""

import json

import pytest
import torch

from specserve.cluster.cli import main
from specserve.cluster.config import parse_config
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.head import DraftHead
from specserve.cluster.runtime.head_drafter import HeadDrafter
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.speculation import SamplingParams
from specserve.cluster.speculation.exact import exact_joint as _exact_joint  # the name other test files import
from specserve.cluster.training.corpus import read_corpus
from specserve.cluster.training.features import cut_windows, extract_features
from specserve.cluster.training.train_head import HeadTraining, train_head
from conftest import TINY_PROMPTS, assert_greedy_equals_plain_on_smollm2, first_children, hf_greedy, local_records, tiny_distributed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_head(tiny_llama, tmp_path_factory):
    """A head trained briefly on the tiny target's features, saved and the training log."""
    data = extract_features(tiny_llama.model, cut_windows(local_records(tiny_llama.tokenizer), 64), progress=False)
    path = str(tmp_path_factory.mktemp("head") / "head.pt")
    cfg = HeadTraining(vocab=200, steps=120, batch=8, eval_every=40, eval_windows=16, warmup=10, precision="float32")
    head, log = train_head(tiny_llama.model, data, cfg, path, progress=False)
    return path, head, log, data


def test_training_lowers_held_out_loss_and_the_file_reloads(tiny_llama, tiny_head):
    path, head, log, data = tiny_head
    assert log.eval_loss[-1] < 0.9 * log.eval_loss[0], log.eval_loss
    loaded = DraftHead.load(path, tiny_llama.model)
    ids, feats = data["tokens"][:2, 1:].long(), data["features"][:2, :-1].float()
    with torch.inference_mode():
        want = head(input_ids=ids, features=feats.to(head.fc.weight.dtype)).logits
        got = loaded(input_ids=ids, features=feats.to(loaded.fc.weight.dtype)).logits
    # the file stores bfloat16 weights: the same head up to that rounding
    assert torch.equal(loaded.vocab, head.vocab)
    assert (got.float() - want.float()).abs().max() <= 0.05 * want.abs().max()


def test_a_head_for_another_target_is_refused(tiny_qwen2, tiny_head):
    with pytest.raises(ValueError, match="draft.head.path"):
        DraftHead.load(tiny_head[0], tiny_qwen2.model)


def test_features_returned_with_a_verify_equal_a_fresh_forward(tiny_llama):
    lm = CausalLM(tiny_llama.model)
    a, b = tiny_llama.tokenizer.encode("features of a verify"), tiny_llama.tokenizer.encode("and another one")
    ca, cb = lm.new_cache(), lm.new_cache()
    lm.forward_batch([ca, cb], [a[:-2], b[:-1]], last=[0, 0])
    out = lm.forward_outputs([ca, cb], [a[-2:] + [7, 8], b[-1:] + [9]], hidden=[4, 2])
    with torch.inference_mode():
        for ids, o in ((a + [7, 8], out[0]), (b + [9], out[1])):
            want = tiny_llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            assert o.hidden.shape == (len(o.hidden), want.shape[1])
            assert (o.hidden - want[-len(o.hidden):]).abs().max() <= 1e-5


def _head_engine(model, tokenizer, head, k="adaptive"):
    return SpeculativeEngine(model, tokenizer, HeadDrafter(head), num_draft_tokens=k)


def _greedy_equals_plain(engine, loaded, n: int, texts=TINY_PROMPTS) -> list:
    """Greedy requests (the texts' ids) through engine equal plain greedy decoding of loaded.model,
    token for token; returns the results for the caller's own checks."""
    prompts = [loaded.tokenizer.encode(p) for p in texts]
    results = engine.generate([GenerationRequest("", n, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = loaded.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(loaded.model, ids, n, eos)[: len(r.token_ids)]
    return results


@pytest.mark.parametrize("k", [3, "adaptive"])
def test_greedy_with_the_head_equals_plain_greedy(tiny_llama, tiny_head, k):
    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    engine = _head_engine(tiny_llama.model, tiny_llama.tokenizer, head, k)
    results = _greedy_equals_plain(engine, tiny_llama, 40)
    if k != "adaptive":  # (adaptive K may find drafting too dear on a target this small)
        assert sum(r.stats.accepted_tokens for r in results) > 0  # drafts were accepted: the committed features path ran


def test_greedy_with_an_untrained_head_on_qwen2_equals_plain(tiny_qwen2):
    """Any head is exact: here one never trained, on the other tiny family, with a long prompt chunked."""
    head = DraftHead(tiny_qwen2.model, torch.arange(0, tiny_qwen2.model.config.vocab_size, 3)).eval()
    engine = SpeculativeEngine(tiny_qwen2.model, tiny_qwen2.tokenizer, HeadDrafter(head), num_draft_tokens=4,
                               prefill_chunk=16)
    prompts = [tiny_qwen2.tokenizer.encode(p * 4) for p in TINY_PROMPTS[:3]]
    results = engine.generate([GenerationRequest("", 24, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = tiny_qwen2.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny_qwen2.model, ids, 24, eos)[: len(r.token_ids)]


def test_a_seeded_sampled_request_reproduces_alone_and_in_a_batch(tiny_llama, tiny_head):
    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    request = GenerationRequest(TINY_PROMPTS[2], 30, SamplingParams(temperature=1.0, seed=5), 3)
    alone = _head_engine(tiny_llama.model, tiny_llama.tokenizer, head, 3).generate([request])[0]
    others = [GenerationRequest(p, 30, SamplingParams(temperature=0.9, seed=i), 3) for i, p in enumerate(TINY_PROMPTS)]
    batched = _head_engine(tiny_llama.model, tiny_llama.tokenizer, head, 3).generate(others[:3] + [request] + others[3:])
    assert batched[3].token_ids == alone.token_ids


def test_drafter_head_config_needs_a_path_and_no_draft_replicas():
    with pytest.raises(ValueError, match="draft.head.path"):  # no head ships for the tiny target
        parse_config({"target": {"model": "tiny-llama"}, "draft": {"drafter": "head"}, "cluster": {"draft_replicas": 0}})
    with pytest.raises(ValueError, match="draft_replicas"):
        parse_config({"draft": {"drafter": "head", "head": {"path": "h.pt"}}, "cluster": {"draft_replicas": 2}})
    shipped = parse_config({"draft": {"drafter": "head"}, "cluster": {"draft_replicas": 0}})  # SmolLM2's ships
    assert shipped.draft.head.path is None


@pytest.mark.smollm2
def test_greedy_with_the_shipped_head_equals_plain_on_smollm2(smollm2_fp32):
    """SmolLM2 in float32 with the head that ships for it: greedy output equals plain greedy, and drafts are accepted."""
    from specserve.cluster.runtime.factory import make_engine

    config = parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "float32"},
                           "draft": {"drafter": "head"}, "cluster": {"draft_replicas": 0},
                           "speculation": {"num_draft_tokens": 4}})
    prompts = ["Explain why the sky is blue.", "Write a Python function that adds two numbers."]
    results = assert_greedy_equals_plain_on_smollm2(make_engine(config, smollm2_fp32), smollm2_fp32, prompts, 32, 4)
    assert sum(r.stats.accepted_tokens for r in results) > 0


def test_build_corpus_and_train_draft_commands(tmp_path, capsys):
    """The two commands end to end on the tiny target: a corpus of local text and target answers,
    features cached, a head written and reported."""
    corpus, out, feats = tmp_path / "c.jsonl", tmp_path / "h.pt", tmp_path / "f.pt"
    assert main(["build-corpus", "--out", str(corpus), "--config", "configs/tiny.yaml", "--local-tokens", "20000",
                 "--answers", "6", "--max-new-tokens", "16", "--batch", "3"]) == 0
    records = read_corpus(str(corpus))
    sources = {r["source"] for r in records}
    assert {"answers-chat", "answers-code", "answers-grounded"} <= sources and len(sources) >= 4
    assert "total" in capsys.readouterr().out
    argv = ["train-draft", "head", "--corpus", str(corpus), "--out", str(out), "--config", "configs/tiny.yaml",
            "--window", "64", "--steps", "20", "--eval-every", "10", "--vocab", "100", "--features", str(feats),
            "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["draft_step_s"] > 0 and 0 <= report["greedy_agreement"] <= 1 and feats.exists()
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(argv) == 0  # the cached features are read back
    assert main(["train-draft", "head", "--corpus", str(corpus), "--out", str(out), "--config", "configs/tiny.yaml",
                 "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


@pytest.mark.ray
def test_distributed_greedy_with_the_head_equals_plain(ray_cluster, tiny_llama, tiny_head):
    """Tensor parallel 2 with the head beside rank 0 in the coordinator's process: greedy equals plain."""
    # K = 3: the head drafts every round (adaptive K may find it too dear here)
    engine = tiny_distributed({"drafter": "head", "head": {"path": tiny_head[0]}}, 0, {"num_draft_tokens": 3})
    try:
        requests = [GenerationRequest(p, 24, SamplingParams(temperature=0.0)) for p in TINY_PROMPTS]
        got = engine.generate(requests)
    finally:
        engine.shutdown()
    eos = tiny_llama.tokenizer.eos_token_id
    for r, res in zip(requests, got):
        assert res.token_ids == hf_greedy(tiny_llama.model, tiny_llama.tokenizer.encode(r.prompt), 24, eos)
    assert sum(r.stats.accepted_tokens for r in got) > 0


def test_calibration_measures_the_head_drafting(tiny_llama, tiny_head):
    """The draft step cost of a head is measured on real drafting (features given), not on empty blocks."""
    from specserve.cluster.runtime.calibration import measure_costs

    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    drafter = HeadDrafter(head)
    calls = []
    original = drafter.lm.forward_outputs
    drafter.lm.forward_outputs = lambda *a, **k: calls.append(1) or original(*a, **k)
    cost = measure_costs(CausalLM(tiny_llama.model), drafter, 200, 4, batch_sizes=(2,))
    assert cost.draft_step_s > 0 and len(calls) >= 3 * 4  # prefill + warm-up + timed proposals of 4 steps


class _CountingLookupThenHead:
    """drafter ngram_head, counting the blocks each part drafted."""

    @staticmethod
    def make(head):
        from specserve.cluster.runtime.drafters import NgramDrafter
        from specserve.cluster.runtime.lookup_head import LookupThenHead

        class Counting(LookupThenHead):
            def propose_many(self, requests):
                blocks = super().propose_many(requests)
                for r, b in zip(requests, blocks):
                    if b.token_ids:
                        self.counts["lookup" if self.lookup.lookup(r.context, r.k) else "head"] += 1
                return blocks

        drafter = Counting(NgramDrafter(max_n=3, min_n=2), HeadDrafter(head))
        drafter.counts = {"lookup": 0, "head": 0}
        return drafter


def test_lookup_then_head_greedy_equals_plain_and_uses_both(tiny_llama, tiny_head):
    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    drafter = _CountingLookupThenHead.make(head)
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, drafter, num_draft_tokens=3)
    _greedy_equals_plain(engine, tiny_llama, 40)
    assert drafter.counts["lookup"] > 0 and drafter.counts["head"] > 0, drafter.counts


def test_adaptive_k_charges_lookup_nothing_and_the_head_its_cost(tiny_llama, tiny_head):
    """ngram_head under adaptive K: each sequence's source is known before it drafts, and only the
    head's drafts are charged. With a head as dear as half a target step only lookup drafts; with
    a free head (the control) the head drafts too. Greedy output equals plain either way."""
    from specserve.cluster.speculation import CostModel

    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    prompts = [tiny_llama.tokenizer.encode(p) for p in TINY_PROMPTS]
    eos = tiny_llama.tokenizer.eos_token_id
    counts = {}
    for draft_step_s in (0.5, 0.0):
        drafter = _CountingLookupThenHead.make(head)
        cost = CostModel(draft_step_s, tuple(1.0 + 0.05 * k for k in range(7)))
        engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, drafter, max_draft_tokens=6,
                                   cost_model=cost, prior_alpha=0.6)
        results = engine.generate([GenerationRequest("", 40, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
        for ids, r in zip(prompts, results):
            assert r.token_ids == hf_greedy(tiny_llama.model, ids, 40, eos)[: len(r.token_ids)]
        counts[draft_step_s] = drafter.counts
    assert counts[0.5]["lookup"] > 0 and counts[0.5]["head"] == 0, counts
    assert counts[0.0]["head"] > 0, counts


def test_lookup_then_head_samples_the_target_distribution(tiny_llama, tiny_head):
    """One-hot lookup blocks ("abab": its last two tokens occurred before) and dense head blocks
    (after the prefill round of "ab", which the head cannot draft in: it has no features yet) in
    the same rejection-sampling calls: each prompt's three tokens follow the target's exact joint
    distribution; accepting every draft (the negative control) does not."""
    import specserve.cluster.speculation.rejection as rejection
    from test_engine_sampling import PARAMS, _chi2_pvalue

    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    drafter = _CountingLookupThenHead.make(head)
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, drafter, num_draft_tokens=2)
    prompts = ("abab", "ab")
    joints = [_exact_joint(tiny_llama, tiny_llama.tokenizer.encode(p), PARAMS, 3) for p in prompts]

    def samples(n: int) -> list[list[tuple[int, ...]]]:
        params = [SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=i) for i in range(2 * n)]
        results = engine.generate([GenerationRequest(prompts[i % 2], 3, params[i], 2) for i in range(2 * n)])
        return [[tuple(r.token_ids) for r in results[j::2]] for j in range(2)]

    for pairs, joint in zip(samples(2000), joints):
        assert _chi2_pvalue(pairs, joint) > 1e-3
    assert drafter.counts["lookup"] > 500 and drafter.counts["head"] > 500, drafter.counts
    real = rejection.acceptance_probs
    try:
        rejection.acceptance_probs = lambda p_x, q_x: torch.ones_like(p_x)
        assert min(_chi2_pvalue(pairs, joint) for pairs, joint in zip(samples(2000), joints)) < 1e-6
    finally:
        rejection.acceptance_probs = real


def test_drafter_ngram_head_is_configured_and_built():
    from specserve.cluster.runtime.factory import build_drafter, draft_sources
    from specserve.cluster.runtime.lookup_head import LookupThenHead

    with pytest.raises(ValueError, match="min_n"):
        parse_config({"draft": {"drafter": "ngram_head", "ngram": {"max_n": 2}, "ngram_head": {"min_n": 3}}})
    with pytest.raises(ValueError, match="draft_replicas"):
        parse_config({"draft": {"drafter": "ngram_head"}, "cluster": {"draft_replicas": 1}})
    config = parse_config({"draft": {"drafter": "ngram_head"}})  # SmolLM2's head ships
    drafter = build_drafter("ngram_head", config.draft, draft_sources(config))
    assert isinstance(drafter, LookupThenHead) and drafter.lookup.min_n == 2 and drafter.needs_features


def _tree_engine(model, tokenizer, head, k=4, nodes=8, branch=3):
    return SpeculativeEngine(model, tokenizer, HeadDrafter(head), num_draft_tokens=k, tree_nodes=nodes, tree_branch=branch)


def test_greedy_with_head_trees_equals_plain_greedy(tiny_llama, tiny_head):
    """The head's top-3 at depth 1, then a chain each (forked head caches): greedy equals plain,
    trees are drafted and accepted, and every forked cache is freed."""
    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    engine = _tree_engine(tiny_llama.model, tiny_llama.tokenizer, head)
    results = _greedy_equals_plain(engine, tiny_llama, 40)
    assert sum(r.stats.tree_rounds for r in results) > 20 and sum(r.stats.accepted_tokens for r in results) > 0
    assert all(n <= 8 for r in results for n in r.stats.rounds_k)
    assert not [ref for ref in engine.drafter.lm.pool._owners if ref() is not None]  # no fork left behind


def test_head_trees_sample_the_target_distribution(tiny_llama, tiny_head, monkeypatch):
    """Sampled requests: the head's children at depth 1 are drawn independently from q (SpecInfer's
    rule checks them): three tokens of "ab" follow the target's exact joint; taking every first
    child (the negative control) does not."""
    import specserve.cluster.speculation.tree as tree_module
    from test_engine_sampling import PARAMS, _chi2_pvalue

    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    engine = _tree_engine(tiny_llama.model, tiny_llama.tokenizer, head, k=2, nodes=4, branch=2)
    joint = _exact_joint(tiny_llama, tiny_llama.tokenizer.encode("ab"), PARAMS, 3)

    def samples(n: int) -> list[tuple[int, ...]]:
        params = [SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=i) for i in range(n)]
        results = engine.generate([GenerationRequest("ab", 3, params[i], 2) for i in range(n)])
        assert sum(r.stats.tree_rounds for r in results) > n // 2
        return [tuple(r.token_ids) for r in results]

    assert _chi2_pvalue(samples(3000), joint) > 1e-3

    monkeypatch.setattr(tree_module, "accept_tree", first_children)
    assert _chi2_pvalue(samples(3000), joint) < 1e-6


def test_the_head_drafts_the_template_it_is_given(tiny_llama, tiny_head):
    """A tree template (speculation.shape) is followed node for node: node 0's top-2 below it (the
    first is the chain's next token, the second another), and the chain goes on under the first."""
    from specserve.cluster.speculation.round import DraftRequest

    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    ids = tiny_llama.tokenizer.encode(TINY_PROMPTS[0])
    target = CausalLM(tiny_llama.model)
    (out,) = target.forward_outputs([target.new_cache()], [ids], hidden=[len(ids)])
    greedy = SamplingParams(temperature=0.0)

    def draft(**tree) -> tuple:
        k = 3 if not tree else 2
        (block,) = HeadDrafter(head).propose_many([DraftRequest(1, ids, k, greedy, 0, out.hidden, 0, **tree)])
        return block

    chain = draft()
    tree = draft(max_nodes=4, max_branch=2, shape=(-1, 0, 0, 1))
    assert tree.parents == (-1, 0, 0, 1) and len(chain) == 3
    assert tree.token_ids[:2] == chain.token_ids[:2] and tree.token_ids[3] == chain.token_ids[2]
    assert tree.token_ids[2] != chain.token_ids[1]


def test_greedy_with_adaptive_head_trees_equals_plain_greedy(tiny_llama, tiny_head):
    """Adaptive shapes with the head: trees grown from the learned acceptance by depth and rank at
    a nearly flat verify cost; greedy output equals plain, no forked cache is left."""
    from specserve.cluster.speculation import CostModel

    head = DraftHead.load(tiny_head[0], tiny_llama.model)
    cost = CostModel(0.01, tuple(1.0 + 0.002 * k for k in range(7)))
    engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, HeadDrafter(head), max_draft_tokens=6,
                               cost_model=cost, prior_alpha=0.6, tree_nodes=10, tree_branch=3)
    results = _greedy_equals_plain(engine, tiny_llama, 40)
    assert sum(r.stats.tree_rounds for r in results) > 10
    assert all(n <= 10 for r in results for n in r.stats.rounds_k)
    assert not [ref for ref in engine.drafter.lm.pool._owners if ref() is not None]


@pytest.mark.parametrize("kind", ["head", "lookahead"])
def test_every_shipped_file_fits_its_built_in_target(kind):
    """Each head and look-ahead file in cluster/heads/ reads without unpickling code, in the format
    its loader takes, and was trained for its target's sizes (checked against the model's config
    where the model is installed: SmolLM2 always, the Qwen models after ./setup.sh --models qwen-coder)."""
    from specserve.cluster.heads import BUILTIN_HEADS, BUILTIN_LOOKAHEADS, builtin_head, builtin_lookahead
    from specserve.cluster.runtime.head import HEAD_FORMAT
    from specserve.cluster.runtime.lookahead import LOOKAHEAD_FORMAT
    from specserve.cluster.runtime.models import load_model_config

    table, path_of, file_format = ((BUILTIN_HEADS, builtin_head, HEAD_FORMAT) if kind == "head"
                                   else (BUILTIN_LOOKAHEADS, builtin_lookahead, LOOKAHEAD_FORMAT))
    assert "smollm2-135m-instruct" in table and "qwen2.5-coder-1.5b-instruct" in table
    checked = []
    for target in table:
        data = torch.load(path_of(target), map_location="cpu", weights_only=True)
        assert data["format"] == file_format
        try:
            config = load_model_config(target)
        except FileNotFoundError:
            continue  # not installed here
        assert data["signature"]["hidden_size"] == config.hidden_size
        assert data["signature"]["vocab_size"] == config.vocab_size
        checked.append(target)
    assert "smollm2-135m-instruct" in checked


def test_an_int8_target_gets_an_int8_head_and_stays_exact(tiny_head):
    """Beside an int8 target the head runs int8 too (its linears and output rows): greedy output
    still equals the int8 target's plain greedy output, and sampled drafts carry the q they were
    drawn from."""
    from specserve.cluster.runtime.factory import make_engine
    from specserve.cluster.runtime.int8 import Int8Linear
    from specserve.cluster.runtime.models import load_model

    target = load_model("tiny-llama", "int8")
    config = parse_config({"target": {"model": "tiny-llama", "dtype": "int8", "chat_template": False},
                           "draft": {"drafter": "head", "head": {"path": tiny_head[0]}},
                           "speculation": {"num_draft_tokens": 3}})
    engine = make_engine(config, target)
    head = engine.drafter.head
    assert isinstance(head.output, Int8Linear) and isinstance(head.layer.mlp.down_proj, Int8Linear)
    assert not isinstance(head.fc, Int8Linear)  # its input mixes scales: one int8 scale a row would lose the embedding
    assert not engine.drafter.lm.batch_invariant
    results = _greedy_equals_plain(engine, target, 32)
    assert sum(r.stats.accepted_tokens for r in results) > 0
    sampled = engine.generate([GenerationRequest("", 24, SamplingParams(temperature=1.0, seed=i),
                                                 prompt_ids=target.tokenizer.encode(p)) for i, p in enumerate(TINY_PROMPTS)])
    assert all(len(r.token_ids) > 0 for r in sampled) and sum(r.stats.draft_tokens for r in sampled) > 0
