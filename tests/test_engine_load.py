"""Load-adaptive K in the engine: the batch a round verifies sets the per-sequence cost of K."""

from cluster.runtime.engine import GenerationRequest
from cluster.runtime.factory import make_engine
from cluster.speculation import CostModel
from conftest import TINY_PROMPTS, tiny_config


def _roofline(b: int, max_k: int = 8) -> tuple[float, ...]:
    """Memory-bound up to 16 tokens per call, compute-bound past it."""
    return tuple(max(1.0, b * (k + 1) / 16) for k in range(max_k + 1))


ROOFLINE = CostModel(0.01, _roofline(1), {4: _roofline(4), 16: _roofline(16)})


def test_k_drops_to_zero_under_load_and_output_is_unchanged(tiny_llama):
    engine = make_engine(tiny_config(), tiny_llama, cost_model=ROOFLINE, prior_alpha=0.7)
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
    cost = engine.calibrate(context_len=16, reps=1, batch_sizes=(4, 16))
    assert len(cost.verify_s) == 4 and set(cost.batch_verify_s) == {4, 16}
    assert all(len(v) == 4 and min(v) > 0 for v in cost.batch_verify_s.values())
    assert cost.draft_parallelism == 1 and cost.draft_step_s > 0
