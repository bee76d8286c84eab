"""KV caches: after a rollback, continuing gives the logits a fresh prefill gives."""

import pytest
import torch

from specserve.cluster.runtime.model_drafter import ModelDrafter
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.runtime import kv
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.speculation import SamplingParams
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
                assert CausalLM.cached_length(s.cache) == s.cached == len(s.tokens) - 1
    assert rounds > 1


def _reference(model, ids: list[int]) -> torch.Tensor:
    """The model's own forward over the whole sequence, no cache: logits [len(ids), V]."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _flattened_rounds(lm):
    """Rounds of one flattened forward each: ragged verify blocks with rollbacks, a prompt prefilled
    in chunks beside them, a sequence joining mid-run, one leaving (its slot is refilled). Yields (logits, the sequence's tokens so far)
    for every returned row block, so each can be checked against a fresh forward."""
    long_prompt = list(b"a prompt long enough to be prefilled in three chunks of ten")
    seqs = {"a": list(b"left"), "b": [3], "c": list(b"a longer prompt than the others")}
    caches = {name: lm.new_cache() for name in seqs}
    for name, p in seqs.items():
        if len(p) > 1:
            lm.forward(caches[name], p[:-1], last_only=True)
    blocks = {"a": [1, 2, 3], "b": [4], "c": [5, 6, 7, 8, 9], "long": [10, 11]}
    body = long_prompt[:-1]  # the last prompt token starts the first verify block
    chunks = [body[i : i + 24] for i in range(0, len(body), 24)]
    out = []
    for round_ in range(5):  # the chunked sequence decodes in the last round
        names = list(seqs)
        inputs = [[seqs[n][-1]] + blocks[n] for n in names]
        last = [len(x) for x in inputs]
        if round_ == 1:  # joins mid-run: its prompt is prefilled in chunks while the others decode
            caches["long"] = lm.new_cache()
        if 1 <= round_ <= len(chunks):
            names.append("prefill")
            inputs.append(chunks[round_ - 1])
            last.append(1)
        got = lm.forward_batch([caches["long" if n == "prefill" else n] for n in names], inputs, last=last)
        if round_ == 2:  # leaves: the pool moves the last slot's keys and values into its hole
            lm.release(caches.pop("b"))
            del seqs["b"], blocks["b"]
        for n, x, logits in zip(names, inputs, got):
            if n == "prefill":
                done = sum(len(c) for c in chunks[:round_])
                out.append((logits, long_prompt[:done]))
                if round_ == len(chunks):
                    seqs["long"] = long_prompt
                continue
            if n not in seqs:
                continue
            out.append((logits, seqs[n] + blocks[n]))
            keep = len(blocks[n]) - len(blocks[n]) // 2  # a rejection after half the drafts; the
            lm.rollback(caches[n], len(blocks[n]) - keep + 1)  # last kept token starts the next block
            seqs[n] = seqs[n] + blocks[n][:keep]
    lengths_ok = {n: lm.cached_length(caches[n]) == len(seqs[n]) - 1 for n in seqs}
    if isinstance(lm, CausalLM):  # (a tensor-parallel group's handles are ids)
        lengths_ok["slots compacted"] = sorted(c.slot for c in caches.values()) == list(range(len(caches)))
    for cache in caches.values():
        lm.release(cache)
    return out, lengths_ok


@pytest.mark.parametrize("batched_block", [0, kv.BATCHED_BLOCK, 64])  # all one by one, mixed, all batched
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_flattened_batch_equals_one_forward_per_sequence(request, name, batched_block, monkeypatch):
    monkeypatch.setattr(kv, "BATCHED_BLOCK", batched_block)
    model = request.getfixturevalue(name).model
    lm = CausalLM(model)
    out, lengths_ok = _flattened_rounds(lm)
    assert all(lengths_ok.values()) and len(lengths_ok) == 4, lengths_ok  # 3 sequences + slots
    for logits, tokens in out:
        want = _reference(model, tokens)[-len(logits):]
        assert logits.shape == want.shape
        assert (logits - want).abs().max() <= 1e-5, (logits - want).abs().max()
    # negative control: without the per-sequence mask a block's tokens see the ones after them
    monkeypatch.setattr(kv, "attention_mask", lambda start, parents, device: None)
    bad, _ = _flattened_rounds(CausalLM(model))
    assert max((logits - _reference(model, tokens)[-len(logits):]).abs().max() for logits, tokens in bad) > 1e-3


def _tree_then_keep(lm, prompt, keep_subset: bool):
    """A tree of two branches after the prompt, then only the second branch is kept."""
    cache = lm.new_cache()
    lm.forward(cache, prompt[:-1], last_only=True)
    n = len(prompt) - 1  # the block starts at position n: [last, x, y, x2, y2] with parents below
    lm.forward_batch([cache], [[prompt[-1], 10, 11, 12, 13]], parents=[[-1, 0, 0, 1, 2]])
    if keep_subset:
        lm.keep(cache, [*range(n + 1), n + 2, n + 4])  # the path last -> 11 -> 13
    else:
        lm.rollback(cache, 2)  # negative control: a crop keeps 10 and 11, not 11 and 13
    logits, length = lm.forward(cache, [20, 21]), lm.cached_length(cache)
    lm.release(cache)
    return logits, length


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_keeping_a_non_contiguous_subset_equals_a_fresh_prefill(request, name):
    loaded = request.getfixturevalue(name)
    prompt = loaded.tokenizer.encode("keep the accepted path of a tree")
    want = _reference(loaded.model, prompt + [11, 13, 20, 21])[-2:]
    got, length = _tree_then_keep(CausalLM(loaded.model), prompt, keep_subset=True)
    assert length == len(prompt) + 4
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
    wrong, _ = _tree_then_keep(CausalLM(loaded.model), prompt, keep_subset=False)
    assert (wrong - want).abs().max() > 1e-3


@pytest.mark.smollm2
def test_flattened_batch_and_keep_smollm2(smollm2_fp32):
    model = smollm2_fp32.model
    out, lengths_ok = _flattened_rounds(CausalLM(model))
    assert all(lengths_ok.values())
    for logits, tokens in out:
        want = _reference(model, tokens)[-len(logits):]
        assert (logits - want).abs().max() <= 1e-4 * want.abs().max(), (logits - want).abs().max()
    prompt = smollm2_fp32.tokenizer.encode("Keep the accepted path of a tree.")
    got, _ = _tree_then_keep(CausalLM(model), prompt, keep_subset=True)
    want = _reference(model, prompt + [11, 13, 20, 21])[-2:]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_layer_subset_draft_attends_through_its_store(tiny_llama):
    """A copy of some of the target's layers runs the flattened path too: its logits after a prefix
    equal a fresh forward of the same copy. (An int8 copy cannot be checked so: dynamic
    quantisation scales activations per call, so its logits depend on what else is in the call.)"""
    from specserve.cluster.runtime.models import layer_subset

    model = layer_subset(tiny_llama.model, [0, 1, 3])
    lm = CausalLM(model)
    ids = tiny_llama.tokenizer.encode("a draft continues the context")
    cache = lm.new_cache()
    lm.forward(cache, ids[:-3], last_only=True)
    got = lm.forward(cache, ids[-3:])
    want = _reference(model, ids)[-3:]
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())


def test_pool_slots_are_reused_and_released_caches_refused(tiny_llama):
    """A released or dropped cache frees its slot for the next sequence; using a released one is an error."""
    lm = CausalLM(tiny_llama.model)
    ids = tiny_llama.tokenizer.encode("slots")
    a, b = lm.new_cache(), lm.new_cache()
    lm.forward_batch([a, b], [ids, ids])
    lm.release(a)
    with pytest.raises(ValueError, match="released"):
        lm.forward(a, ids)
    del b  # dropped without release
    c = lm.new_cache()
    want = _reference(tiny_llama.model, ids + [7])[-1]
    lm.forward(c, ids)
    assert c.slot == 0 and lm.pool.tensor.shape[2] == 2  # compacted into the freed slots, no growth
    assert (lm.forward(c, [7])[-1] - want).abs().max() <= 1e-5


def test_pool_shrinks_after_a_burst_and_keeps_the_live_sequences(tiny_llama):
    """After many sequences leave, the pool is reallocated to what the live ones need; they continue exactly."""
    lm = CausalLM(tiny_llama.model)
    ids = tiny_llama.tokenizer.encode("a burst of sequences")
    caches = [lm.new_cache() for _ in range(24)]
    lm.forward_batch(caches, [ids + [i] for i in range(24)])
    assert lm.pool.tensor.shape[2] == 24
    for c in caches[:-1]:
        lm.release(c)
    got = lm.forward(caches[-1], [5])[-1]
    assert lm.pool.tensor.shape[2] <= 8 and caches[-1].slot == 0
    want = _reference(tiny_llama.model, ids + [23, 5])[-1]
    assert (got - want).abs().max() <= 1e-5


def test_batched_part_leaves_out_what_padding_would_make_costly():
    slots = list(range(64))
    assert kv.batched_part([1] * 64, [300] * 64, slots) == slots  # decodes: all in one call
    got = kv.batched_part([9] + [2] * 63, [300] * 64, slots)  # one long block would pad 63 others
    assert got == slots[1:]
    got = kv.batched_part([2] * 64, [2000] + [300] * 63, slots)  # one long context likewise
    assert got == slots[1:]
    assert kv.batched_part([24, 30], [100, 100], [0, 1]) == []  # prefill chunks: one by one


def test_pool_shrinks_while_new_sequences_wait_for_their_first_forward(tiny_llama):
    """A long sequence leaves while more new caches exist than the pool has slots (none stored yet)."""
    lm = CausalLM(tiny_llama.model)
    ids = tiny_llama.tokenizer.encode("x")
    kept = [lm.new_cache(), lm.new_cache()]
    lm.forward_batch(kept, [[5] * 1100, ids])  # two slots, capacity beyond the shrink threshold
    fresh = [lm.new_cache() for _ in range(12)]
    for c in kept:
        lm.release(c)  # compaction moves fresh caches into slots 0 and 1, and the pool shrinks
    got = lm.forward_batch(fresh, [ids + [i] for i in range(12)])
    for i, g in enumerate(got):
        want = _reference(tiny_llama.model, ids + [i])
        assert (g - want).abs().max() <= 1e-5
