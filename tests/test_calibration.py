"""Calibration: a few measured shapes, interpolated; cached on disk and reused; a change of what
it depends on (here the thread count) measures again."""

import pytest
import torch

from specserve.cluster.runtime import calibration
from specserve.cluster.runtime import engine as engine_module
from specserve.cluster.runtime.calibration import Calibration, calibration_key, interpolate, load_or_measure, measured_lengths
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.speculation import CostModel
from specserve.cluster.speculation.round import DrafterCapabilities
from conftest import tiny_config


def test_a_few_lengths_are_measured_and_the_rest_interpolated():
    assert measured_lengths(8, 1) == [1, 2, 5, 9] and measured_lengths(8, 16) == [1, 2, 9]
    assert interpolate({1: 1.0, 5: 3.0}, 5) == (1.0, 1.5, 2.0, 2.5, 3.0)
    assert interpolate({1: 2.0, 2: 1.0, 3: 4.0}, 3) == (2.0, 2.0, 4.0)  # more tokens never cost less


def test_a_cached_calibration_is_reused_and_a_changed_thread_count_invalidates_it(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    measured = []
    real = calibration.measure_costs

    def counting(*args, **kwargs):
        measured.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "measure_costs", counting)
    first = make_engine(tiny_config(max_k=3), tiny_llama)
    first.prepare()
    assert len(measured) == 1 and len(list((tmp_path / "calibration").glob("*.json"))) == 1

    again = make_engine(tiny_config(max_k=3), tiny_llama)
    again.prepare()
    assert len(measured) == 1  # loaded, not measured
    assert again.cost_model == first.cost_model and again.prior_alpha == first.prior_alpha

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        other = make_engine(tiny_config(max_k=3), tiny_llama)
        other.prepare()
    finally:
        torch.set_num_threads(threads)
    assert measured == [threads, threads + 1]
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 2


def test_an_unreadable_cache_file_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    key = calibration_key(model="m")
    fixed = Calibration(CostModel(0.1, (1.0, 2.0), {4: (3.0, 4.0)}, 2), 0.7)
    assert load_or_measure(key, lambda: fixed) == fixed
    path = next((tmp_path / "calibration").glob("*.json"))
    assert load_or_measure(key, lambda: None) == fixed  # round trip through the file
    path.write_text("{not json")
    assert load_or_measure(key, lambda: fixed) == fixed
    other = Calibration(CostModel(0.2, (1.0, 2.0)), 0.5)
    assert load_or_measure(calibration_key(model="other"), lambda: other) == other  # another key, another file


class _ShapedTarget:
    """A target whose verify costs 1 unit per token on a fake clock, 50 units more the first time a
    shape runs (a kernel being built), and 200 more on the `stall`-th call (the machine busy)."""

    def __init__(self, stall: int):
        self.now, self.calls, self.stall, self.seen = 0.0, 0, stall, set()

    def clock(self) -> float:
        return self.now

    def new_cache(self):
        return object()

    def forward_batch(self, caches, inputs, last=None):
        shape = (len(caches), len(inputs[0]))
        self.calls += 1
        if last is None:  # a verify
            self.now += len(caches) * len(inputs[0]) + 50.0 * (shape not in self.seen) + 200.0 * (self.calls == self.stall)
        self.seen.add(shape)

    def rollback(self, cache, n):
        pass

    def release(self, cache):
        pass


def test_calibration_times_warm_shapes_and_a_stall_spoils_one_sample_only():
    for stall in range(2, 40, 3):  # wherever the stall falls, the medians are the true costs
        target = _ShapedTarget(stall)
        cost = calibration.measure_costs(target, None, 100, 3, target.clock, context_len=8, batch_sizes=(4,))
        assert cost.verify_s == (1.0, 2.0, 3.0, 4.0)
        assert cost.batch_verify_s[4] == (4.0, 8.0, 12.0, 16.0)


class _BatchingDrafter:
    """A drafter whose draft step costs 2 + b units on the target's fake clock for b sequences drafted together."""

    name = "batching"
    capabilities = DrafterCapabilities(batches_drafts=True)

    def __init__(self, target):
        self.target, self.released = target, []

    def propose_many(self, requests):
        from specserve.cluster.speculation.round import DraftBlock

        self.target.now += (2.0 + len(requests)) * requests[0].k
        return [DraftBlock([1] * r.k, None) for r in requests]

    def release(self, seq_id):
        self.released.append(seq_id)


def test_a_batched_drafters_cost_is_measured_at_each_batch_size_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    target = _ShapedTarget(stall=0)
    drafter = _BatchingDrafter(target)
    cost = calibration.measure_costs(target, drafter, 100, 3, target.clock, context_len=8, batch_sizes=(4, 16))
    assert cost.draft_step_s == 3.0 and cost.draft_batch_s == {4: 6.0, 16: 18.0}
    assert len(drafter.released) == 1 + 4 + 16  # every probe sequence is freed after its batch size
    c = calibration.Calibration(cost, 0.5)
    assert calibration._from_json(calibration._to_json(c)) == c


def test_a_cached_draft_cost_far_above_now_is_rescaled_on_load(tiny_llama, tmp_path, monkeypatch):
    """A calibration measured while the machine was busy can price drafts so high that K stays 0
    and rounds never correct it: on load, a quick fresh draft measurement rescales draft costs
    that are more than twice now's (and rewrites the cache); a cost within 2x is kept."""
    import json

    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    first = make_engine(tiny_config(max_k=3), tiny_llama)
    first.prepare()
    true_s = first.cost_model.draft_step_s
    path = next((tmp_path / "calibration").glob("*.json"))

    def cached_draft_s(scale: float) -> float:
        saved = json.loads(path.read_text())
        saved["calibration"]["draft_step_s"] = true_s * scale
        path.write_text(json.dumps(saved))
        engine = make_engine(tiny_config(max_k=3), tiny_llama)
        engine.prepare()
        return engine.cost_model.draft_step_s

    # the recheck's fresh measurement, fixed at the first one's (a real timing would put noise in the 2x rule)
    monkeypatch.setattr(calibration, "_draft_step_s", lambda *args: true_s)
    assert cached_draft_s(50.0) == pytest.approx(true_s)  # rescaled to what it measures now
    assert json.loads(path.read_text())["calibration"]["draft_step_s"] == pytest.approx(true_s)  # and cached so
    assert cached_draft_s(1.5) == true_s * 1.5  # within 2x: kept


class _ClockedDrafter:
    """Draft tokens (the prompt's bytes, cycled) that cost one unit each on a fake clock."""

    name = "clocked"
    capabilities = DrafterCapabilities()

    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def source(self, seq_id, context):
        return self.name

    def propose_many(self, requests):
        from specserve.cluster.speculation.round import DraftBlock

        self.now += sum(r.k for r in requests)
        return [DraftBlock([r.context[-1]] * r.k, None) for r in requests]

    def observe(self, seq_id, block, result):
        pass

    def release(self, seq_id):
        pass


def test_rounds_bring_an_overpriced_draft_cost_down_to_what_drafts_take(tiny_llama):
    """CostModel.observed_draft: each drafting round moves the draft cost by ratio^0.3, the ratio
    of the drafts' time to their price clipped to [1/2, 2]; a cost calibrated 4x too high comes
    down to the one unit a draft token takes."""
    cost = CostModel(4.0, (10.0, 10.5, 11.0, 11.5))
    assert cost.observed_draft(8.0, 2.0).draft_step_s == pytest.approx(4.0 * 0.5 ** 0.3)  # ratio 1/4, clipped to 1/2
    assert cost.observed_draft(8.0, 80.0).draft_step_s == pytest.approx(4.0 * 2 ** 0.3)  # ratio 10, clipped to 2
    assert cost.observed_draft(8.0, 16.0).observed_draft(8.0, 4.0).draft_step_s == pytest.approx(4.0)  # x2, x1/2: no drift
    assert cost.observed_draft(0.0, 1.0) == cost
    drafter = _ClockedDrafter()
    engine = engine_module.SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, drafter, "adaptive", 3,
                                             clock=drafter.clock)
    engine._calibration = Calibration(cost, 0.95)  # as if loaded; rounds refine it
    engine.generate([engine_module.GenerationRequest("hello world", 60, num_draft_tokens=None)])
    assert 0.7 < engine._policy.cost.draft_step_s < 1.5
