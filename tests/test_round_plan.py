"""The round planned as data (runtime/plan.py): plan_round is pure, reads a snapshot of each
sequence and gives each its shape, source and price; the engine's step follows the plan."""

from dataclasses import replace

import pytest

from specserve.cluster.runtime.plan import PlanSettings, RoundPlan, SequenceState, plan_round
from specserve.cluster.speculation import AdaptiveK, CostModel
from specserve.cluster.speculation.shape import ShapeStats, default_shape

COST = CostModel(draft_step_s=0.002, verify_s=tuple(0.05 + 0.002 * k for k in range(9)))


def state(seq_id=0, k=None, adaptive=False, source=None, alpha=0.0, probes=None, remaining=100, room=1000):
    return SequenceState(seq_id, k, adaptive, source, alpha, probes, remaining, room)


def fixed(k=4, **kw) -> PlanSettings:
    return PlanSettings(num_draft_tokens=k, max_draft_tokens=8, **kw)


def no_stats(source):
    raise AssertionError("fixed-K plans read no acceptance statistics")


def test_fixed_k_the_requests_k_and_the_cuts():
    plan = plan_round([state(0), state(1, k=2), state(2, remaining=3), state(3, room=3), state(4, k=0)],
                      fixed(4), None, no_stats, 5)
    assert isinstance(plan, RoundPlan)
    assert [p.shape for p in plan.sequences] == [default_shape(4), default_shape(2), default_shape(2),
                                                 default_shape(2), ()]
    assert [p.drafts for p in plan.sequences] == [True, True, True, True, False]
    assert all(p.source is None and p.draft_s == 0.0 for p in plan.sequences)


def test_no_drafter_plans_no_drafts():
    plan = plan_round([state(0), state(1, k=3)], fixed(4, has_drafter=False), None, no_stats, 2)
    assert [p.shape for p in plan.sequences] == [(), ()]


def test_fixed_k_sequences_on_a_pass_drafter_keep_the_lookahead_cap():
    """A fixed-K sequence has no source; PaSS still drafts for it, at most L tokens, each accept
    point with a block of L (the engine once skipped this cap: its source defaulted to "")."""
    pass_settings = fixed(6, lookahead=2, lookahead_source="pass")
    plan = plan_round([state(0), state(1, room=10)], pass_settings, None, no_stats, 2)
    assert plan.sequences[0].shape == default_shape(2)
    assert plan.sequences[1].shape == default_shape(1)  # (10 - 2) // 3 - 1 = 1
    # negative control: without look-ahead the same sequences draft the configured K
    assert plan_round([state(0)], fixed(6), None, no_stats, 1).sequences[0].shape == default_shape(6)


def test_adaptive_prices_and_sources():
    policy = AdaptiveK(COST, 8)
    probes = [policy.new_schedule() for _ in range(3)]
    states = [state(0, adaptive=True, source="model", alpha=0.9, probes=probes[0]),
              state(1, adaptive=True, source="ngram", alpha=0.9, probes=probes[1]),
              state(2, adaptive=True, source="model", alpha=0.0, probes=probes[2]),
              state(3, k=3)]
    plan = plan_round(states, fixed("adaptive", free_sources=frozenset({"ngram"})), policy, no_stats, 4)
    got = plan.sequences
    assert [p.source for p in got] == ["model", "ngram", "model", None]
    assert got[1].draft_s == 0.0 and got[0].draft_s == pytest.approx(COST.draft_token_s(2))
    assert plan.draft_token_s == pytest.approx(COST.draft_token_s(2))  # two paying sequences
    assert got[0].drafts and got[1].drafts and got[3].shape == default_shape(3)
    assert len(got[1].shape) >= len(got[0].shape)  # free drafts are never shorter than priced ones
    assert not got[2].drafts  # alpha 0: drafts cost more than they yield
    assert not plan.all_priced  # sequence 3 drafts at a fixed K
    assert plan_round(states[:2], fixed("adaptive"), policy, no_stats, 2).all_priced


def test_adaptive_trees_read_each_sources_statistics():
    policy = AdaptiveK(COST, 8)
    stats = {"model": ShapeStats(8, 2, 0.8)}
    plan = plan_round([state(0, adaptive=True, source="model", alpha=0.8, probes=policy.new_schedule())],
                      fixed("adaptive", tree_nodes=6, tree_branch=2), policy, stats.__getitem__, 1)
    shape = plan.sequences[0].shape
    assert 0 < len(shape) <= 6 and all(-1 <= p < j for j, p in enumerate(shape))


def test_plan_round_is_pure():
    """The same snapshot plans the same round, and planning calls nothing but the policy."""
    states = [state(0), state(1, k=2, remaining=2)]
    assert plan_round(states, fixed(4), None, no_stats, 2) == plan_round(states, fixed(4), None, no_stats, 2)


def test_adaptive_planning_changes_nothing_it_reads():
    """The adaptive path too: the same snapshot plans the same round twice, the sequences' probe
    schedules stay as they were, and the plan carries the advanced ones for the engine to keep."""
    from copy import deepcopy

    policy = AdaptiveK(COST, 8, probe_after=2)
    states = [state(0, adaptive=True, source="model", alpha=0.0, probes=policy.new_schedule()),
              state(1, adaptive=True, source="model", alpha=0.9, probes=policy.new_schedule())]
    before = deepcopy(states)
    first = plan_round(states, fixed("adaptive"), policy, no_stats, 2)
    assert states == before and first == plan_round(states, fixed("adaptive"), policy, no_stats, 2)
    assert not first.sequences[0].drafts and first.sequences[1].drafts
    advanced = first.sequences[0].probes
    assert advanced is not None and advanced != states[0].probes  # one more round at K = 0 counted
    # kept by the engine, a schedule reaches its probe: alone, the sequence drafts once although
    # its alpha is 0; planned from the same snapshot each time (the negative control), it never does
    alone, kept, plans = [states[0]], [states[0]], []
    for _ in range(3):
        plan = plan_round(kept, fixed("adaptive"), policy, no_stats, 1)
        plans.append(plan.sequences[0].drafts)
        kept = [replace(kept[0], probes=plan.sequences[0].probes)]
    assert plans == [False, True, False]
    assert not any(plan_round(alone, fixed("adaptive"), policy, no_stats, 1).sequences[0].drafts for _ in range(3))
