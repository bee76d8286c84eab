"""The DeepSpeed tensor-parallel target in Ray actors, against the in-process model."""

import pytest
import torch

from specserve.cluster.config import ActorResources
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.runtime.models import tiny_config
from conftest import TINY_PROMPTS
from test_kv import _flattened_rounds, _reference, _tree_then_keep

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def groups(request, ray_cluster):
    from specserve.actors.target import TargetGroup

    group = TargetGroup(request.param, "float32", tp_size=2, rank=ActorResources(cpus=0.5))
    yield request.param, group
    group.shutdown()


def _close(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5, (a - b).abs().max()


def test_tp2_logits_match_tp1(groups, request):
    name, group = groups
    local = CausalLM(request.getfixturevalue(name.replace("-", "_")).model)
    ids = list(b"tensor parallel prefill")
    g, c = group.new_cache(), local.new_cache()
    _close(group.forward(g, ids), local.forward(c, ids))  # prefill
    for t in [7, 8, 9]:  # one-token steps
        _close(group.forward(g, [t], last_only=True), local.forward(c, [t], last_only=True))
    block = [40, 41, 42, 43, 44]  # a verification block
    _close(group.forward(g, block), local.forward(c, block))
    group.rollback(g, 3)
    local.rollback(c, 3)
    assert group.cached_length(g) == local.cached_length(c) == len(ids) + 3 + 2
    _close(group.forward(g, [50, 51]), local.forward(c, [50, 51]))  # after the rollback
    group.release(g)
    assert group.sequences() == 0


def test_tp2_batched_verify_matches_tp1(groups, request):
    """A ragged batch of verify blocks in one call (rollbacks ride along) equals per-sequence TP1."""
    name, group = groups
    local = CausalLM(request.getfixturevalue(name.replace("-", "_")).model)
    prompts = [list(b"first sequence"), list(b"2nd"), list(b"the third, longest sequence of all")]
    blocks = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    g = [group.new_cache() for _ in prompts]
    c = [local.new_cache() for _ in prompts]
    for p, gi, ci in zip(prompts, g, c):
        group.forward(gi, p[:-1], last_only=True)
        local.forward(ci, p[:-1], last_only=True)
    for _ in range(3):
        inputs = [[p[-1]] + b for p, b in zip(prompts, blocks)]
        calls = group.calls
        greedy = [False, True, False]  # a greedy row travels as its argmax only
        got = group.forward_batch(g, inputs, argmax_only=greedy)
        assert group.calls == calls + 1
        for x, gi, ci, got_i, argmax_only in zip(inputs, g, c, got, greedy):
            want = local.forward(ci, x)
            if argmax_only:
                assert got_i.dtype == torch.long and torch.equal(got_i, want.argmax(-1))
            else:
                _close(got_i, want)
            group.rollback(gi, 1)
            local.rollback(ci, 1)
        prompts = [p + b[:-1] for p, b in zip(prompts, blocks)]
    assert [group.cached_length(x) for x in g] == [local.cached_length(x) for x in c]
    for x in g:
        group.release(x)


def test_tp2_flattened_rounds_and_keep_match_fresh_forwards(groups, request):
    """The flattened batch (ragged blocks, rollbacks, a chunked prefill joining mid-run) and keeping a
    non-contiguous subset of positions, on the TP2 group, equal a fresh forward of each sequence."""
    name, group = groups
    loaded = request.getfixturevalue(name.replace("-", "_"))
    out, lengths_ok = _flattened_rounds(group)
    assert all(lengths_ok.values())
    for logits, tokens in out:
        _close(logits, _reference(loaded.model, tokens)[-len(logits):])
    prompt = loaded.tokenizer.encode("keep the accepted path of a tree")
    got, length = _tree_then_keep(group, prompt, keep_subset=True)
    assert length == len(prompt) + 4
    _close(got, _reference(loaded.model, prompt + [11, 13, 20, 21])[-2:])
    wrong, _ = _tree_then_keep(group, prompt, keep_subset=False)  # negative control: a crop
    assert (wrong - _reference(loaded.model, prompt + [11, 13, 20, 21])[-2:]).abs().max() > 1e-3


def test_engine_on_tp2_equals_plain_greedy(groups, request):
    name, group = groups
    loaded = request.getfixturevalue(name.replace("-", "_"))
    from specserve.cluster.runtime.drafters import NgramDrafter

    distributed = SpeculativeEngine(group, loaded.tokenizer, NgramDrafter(), num_draft_tokens=4)
    local = SpeculativeEngine(loaded.model, loaded.tokenizer, None)
    lengths = [12, 20, 28, 16, 24, 32]
    for p, n in zip(TINY_PROMPTS, lengths):
        distributed.add_request(GenerationRequest(p, n))
    distributed.step()  # prefills
    calls, rounds, results = group.calls, 0, {}
    while distributed.has_unfinished():
        results |= {o.seq_id: o.result for o in distributed.step() if o.result is not None}
        rounds += 1
    releases = len(TINY_PROMPTS)
    assert group.calls - calls == rounds + releases  # one Ray call per round for all sequences
    got = [results[i] for i in sorted(results)]
    want = local.generate([GenerationRequest(p, n) for p, n in zip(TINY_PROMPTS, lengths)])
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert sum(r.stats.draft_tokens for r in got) > 0
    assert group.sequences() == 0  # finished sequences freed their caches on every rank


def test_tp_size_must_divide_the_heads(ray_cluster):
    from specserve.actors.target import TargetGroup, check_tp_size

    with pytest.raises(ValueError, match="tp_size 3 must divide"):
        TargetGroup("tiny-llama", tp_size=3)
    check_tp_size(tiny_config("tiny-llama"), 2)


def test_tp2_returns_the_hidden_states_a_fresh_forward_gives(groups, request):
    """Features for a drafter that reads the target: rank 0's last hidden states of a verify, as
    TP1 computes them (every rank holds them whole after the last all-reduce)."""
    name, group = groups
    model = request.getfixturevalue(name.replace("-", "_")).model
    ids = list(b"hidden states through tensor parallel")
    g = group.new_cache()
    group.forward_batch([g], [ids[:-3]], last=[0])
    out = group.forward_outputs([g], [ids[-3:] + [7]], argmax_only=[True], hidden=[4])[0]
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids + [7]]), output_hidden_states=True).hidden_states[-1][0, -4:]
    assert out.scores.dtype == torch.int64 and out.hidden.shape == want.shape
    assert (out.hidden.float() - want).abs().max() <= 1e-5
    group.release(g)


def test_tp2_int8_shards_are_quantized_batch_invariant_and_speculation_equals_plain(ray_cluster, tiny_llama):
    """Each rank quantizes its own shard of the int8 target: logits stay close to the unsharded
    float32 model, a token's logits are the same alone and in a block, and greedy speculation on the
    int8 group equals its own plain decoding."""
    from specserve.actors.target import TargetGroup
    from specserve.cluster.runtime.drafters import NgramDrafter

    group = TargetGroup("tiny-qwen2", "int8", tp_size=2, rank=ActorResources(cpus=0.5))
    try:
        assert group.dtype == "int8"
        prompt = list(range(40, 80))
        c = group.new_cache()
        alone = group.forward(c, prompt)
        group.rollback(c, 1)
        block = group.forward(c, prompt[-1:] + [3, 4, 5])
        group.release(c)
        assert torch.equal(alone[-1], block[0])
        from specserve.cluster.runtime.models import load_model

        ref = _reference(load_model("tiny-qwen2").model, prompt)
        assert (alone - ref).norm() / ref.norm() < 0.05
        spec = SpeculativeEngine(group, tiny_llama.tokenizer, NgramDrafter(), num_draft_tokens=4)
        plain = SpeculativeEngine(group, tiny_llama.tokenizer, None)
        requests = lambda: [GenerationRequest(p, 24) for p in TINY_PROMPTS]  # noqa: E731
        got, want = spec.generate(requests()), plain.generate(requests())
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert sum(r.stats.draft_tokens for r in got) > 0
    finally:
        group.shutdown()
