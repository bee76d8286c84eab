"""Load-adaptive K in the engine: the batch a round verifies sets the per-sequence cost of K."""

from specserve.cluster.runtime.calibration import measure_costs
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.speculation import CostModel
from conftest import TINY_PROMPTS, tiny_config


def _roofline(b: int, max_k: int = 8) -> tuple[float, ...]:
    """Memory-bound up to 16 tokens per call, compute-bound past it."""
    return tuple(max(1.0, b * (k + 1) / 16) for k in range(max_k + 1))


ROOFLINE = CostModel(0.01, _roofline(1), {4: _roofline(4), 16: _roofline(16)})


def test_k_drops_to_zero_under_load_and_output_is_unchanged(tiny_llama):
    # every prompt prefilled in the first round, so the first verify round holds all 16
    engine = make_engine(tiny_config(prefill_chunk=4096), tiny_llama, cost_model=ROOFLINE, prior_alpha=0.7)
    plain = make_engine(tiny_config(k=0), tiny_llama)
    requests = [GenerationRequest(TINY_PROMPTS[i % len(TINY_PROMPTS)] + str(i), 12) for i in range(16)]
    loaded = engine.generate(requests)
    alone = engine.generate(requests[:1])[0]
    assert loaded[0].stats.rounds_k[0] == 0  # 16 sequences: verification is no longer free
    assert alone.stats.rounds_k[0] > 0  # the same request alone drafts
    assert [r.token_ids for r in loaded] == [r.token_ids for r in plain.generate(requests)]
    assert alone.token_ids == loaded[0].token_ids


def test_calibration_measures_batched_verification(tiny_llama):
    engine = make_engine(tiny_config(max_k=3), tiny_llama)
    cost = measure_costs(engine.target, engine.drafter, 256, 3, context_len=16, reps=1, batch_sizes=(4, 16))
    assert len(cost.verify_s) == 4 and set(cost.batch_verify_s) == {4, 16}
    assert all(len(v) == 4 and min(v) > 0 for v in cost.batch_verify_s.values())
    assert cost.draft_parallelism == 1 and cost.draft_step_s > 0


def test_chunked_prefill_joins_the_running_decodes(tiny_llama):
    """A long prompt arriving mid-run is prefilled in chunks inside the rounds of the running
    sequence, one target call per round, and changes no output."""
    engine = make_engine(tiny_config(k=0, prefill_chunk=16), tiny_llama)
    short = GenerationRequest(TINY_PROMPTS[0], 64)
    long = GenerationRequest(" ".join(TINY_PROMPTS) * 2, 8)
    first = engine.add_request(short)
    while not engine._seqs[first].output:  # the short prompt is prefilled and decodes
        engine.step()
    late = engine.add_request(long)
    chunks_needed = -(-(len(engine._seqs[late].prompt_ids) - 16) // 16)  # then the last <= 16 join a verify round
    emitted, results = [], {}
    for _ in range(chunks_needed):
        outputs = engine.step()
        assert engine.last_round.prefill_s > 0 and engine.last_round.batch == 1
        emitted += [o for o in outputs if o.seq_id == first and o.new_token_ids]
        results |= {o.seq_id: o.result for o in outputs if o.result is not None}
    assert len(emitted) == chunks_needed  # the running sequence decoded in every prefill round
    assert len(engine._seqs[late].uncached) <= 16
    while engine.has_unfinished():
        results |= {o.seq_id: o.result for o in engine.step() if o.result is not None}
    plain = make_engine(tiny_config(k=0, prefill_chunk=4096), tiny_llama)
    assert results[late].token_ids == plain.generate([long])[0].token_ids
    assert results[first].token_ids == plain.generate([short])[0].token_ids


def test_costs_are_learned_at_the_rounds_mean_block(tiny_llama, monkeypatch):
    """Nothing is padded, so a ragged round (K differing per sequence) is recorded at its tokens in
    all (its mean block, where round_cost_s reads the table), not at its longest block."""
    engine = make_engine(tiny_config(), tiny_llama)
    engine.prepare()
    current, seen = [], []  # the round's blocks; (blocks, b, tokens) per observation
    monkeypatch.setattr(CostModel, "observed", lambda self, b, n, s, weight=0.3: seen.append((current[-1], b, n)) or self)
    propose = engine._propose
    monkeypatch.setattr(engine, "_propose", lambda seqs, plan, timing: current.append(propose(seqs, plan, timing)) or current[-1])
    for i, p in enumerate(TINY_PROMPTS):  # fixed K = 4 beside adaptive sequences: ragged rounds
        engine.add_request(GenerationRequest(p, 24, num_draft_tokens=4 if i % 2 else None))
    while engine.has_unfinished():
        engine.step()
    ragged = [(blocks, b, n) for blocks, b, n in seen if len({len(x) for x in blocks}) > 1]
    assert ragged, "no round drafted different K: the case does not test the mean"
    for blocks, b, n in seen:
        assert len(blocks) == b and n == b + sum(len(x) for x in blocks)
