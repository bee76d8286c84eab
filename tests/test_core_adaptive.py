"""Adaptive K: the expected-tokens formula, best_k, the acceptance tracker and the K policy."""

from __future__ import annotations

import math
import random

import pytest

from specserve.cluster.speculation import AcceptanceTracker, AdaptiveK, CostModel, best_k, expected_tokens, mean_expected_tokens
from specserve.cluster.speculation.costs import round_cost_s


def test_expected_tokens_hand_values():
    for k in range(6):
        assert expected_tokens(0.0, k) == 1.0
        assert expected_tokens(1.0, k) == k + 1
        assert expected_tokens(0.7, 0) == pytest.approx(1.0)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.8, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert expected_tokens(1 - 1e-9, 4) == pytest.approx(5.0, abs=1e-6)  # continuous at alpha = 1


def test_expected_tokens_matches_simulation():
    rng = random.Random(0)
    alpha, k, rounds = 0.7, 4, 200_000
    total = 0
    for _ in range(rounds):
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        total += accepted + 1
    assert total / rounds == pytest.approx(expected_tokens(alpha, k), abs=0.01)


def test_mean_expected_tokens():
    assert mean_expected_tokens(0.5, [1, 2]) == pytest.approx((1.5 + 1.75) / 2)
    assert mean_expected_tokens(0.5, []) == 0.0


def test_best_k_zero_when_verify_cost_grows_linearly():
    # Verifying 2 tokens costs 2x one token: with alpha < 1 speculation never pays.
    cost = CostModel(draft_step_s=0.05, verify_s=(1.0, 2.0, 3.0, 4.0, 5.0))
    for alpha in (0.0, 0.1, 0.3, 0.5, 0.9):
        assert best_k(alpha, cost) == 0
    free = CostModel(draft_step_s=0.0, verify_s=(1.0, 2.0, 3.0))
    assert best_k(0.2, free) == 0


def test_best_k_max_when_drafting_free_and_verify_flat():
    cost = CostModel(draft_step_s=0.0, verify_s=(1.0,) * 6)
    for alpha in (0.5, 0.8, 0.95):
        assert best_k(alpha, cost) == 5
    assert best_k(0.9, cost, max_k=3) == 3
    assert best_k(0.9, cost, max_k=50) == 5  # capped by the cost table
    assert best_k(0.0, cost) == 0  # all rates tie: the smallest K wins


def test_best_k_hand_values():
    cost = CostModel(draft_step_s=0.1, verify_s=(1.0, 1.05, 1.1, 1.15, 1.2))
    # alpha 0.5: rates 1, 1.5/1.15, 1.75/1.3, 1.875/1.45, 1.9375/1.6 -> K = 2
    assert best_k(0.5, cost) == 2
    # alpha 0.8: rates 1, 1.565, 1.877, 2.036, 2.101 -> K = 4
    assert best_k(0.8, cost) == 4
    ks = [best_k(a / 100, cost) for a in range(100)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 4


def test_tracker_counts():
    t = AcceptanceTracker()
    assert t.alpha == pytest.approx(0.5)  # the prior
    t.update(4, 2)  # 2 accepted, 1 rejected
    assert t.alpha == pytest.approx((2 + 1) / (3 + 2))
    t.update(0, 0)  # nothing drafted: nothing learned
    assert t.alpha == pytest.approx((2 + 1) / (3 + 2))
    t.update(3, 3)  # all accepted: no rejection counted
    assert t.alpha == pytest.approx((0.9 * 2 + 3 + 1) / (0.9 * 3 + 3 + 2))


def simulate_round(rng: random.Random, alpha: float, k: int) -> int:
    accepted = 0
    while accepted < k and rng.random() < alpha:
        accepted += 1
    return accepted


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8, 0.95])
def test_tracker_without_decay_converges(alpha):
    rng = random.Random(1)
    t = AcceptanceTracker(decay=1.0)
    for i in range(5000):
        k = 1 + i % 5
        t.update(k, simulate_round(rng, alpha, k))
    assert t.alpha == pytest.approx(alpha, abs=0.015)


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_tracker_with_decay_stays_near_alpha(alpha):
    rng = random.Random(2)
    t = AcceptanceTracker()
    estimates = []
    for i in range(3000):
        t.update(4, simulate_round(rng, alpha, 4))
        if i >= 200:
            estimates.append(t.alpha)
    assert sum(estimates) / len(estimates) == pytest.approx(alpha, abs=0.05)
    assert abs(sum(estimates) / len(estimates) - alpha) < abs(0.5 - alpha)  # moved off the prior


def test_tracker_follows_a_change():
    rng = random.Random(3)
    t = AcceptanceTracker()
    for _ in range(300):
        t.update(4, simulate_round(rng, 0.9, 4))
    assert t.alpha > 0.75
    for _ in range(30):
        t.update(4, simulate_round(rng, 0.2, 4))
    assert t.alpha < 0.4


COST = CostModel(draft_step_s=0.3, verify_s=(1.0, 1.1, 1.2, 1.3, 1.4))


def calls_until_nonzero(policy: AdaptiveK, limit: int = 1000) -> tuple[int, int]:
    for n in range(1, limit + 1):
        k = policy.next_k()
        if k:
            return n, k
    raise AssertionError("K never left 0")


def test_adaptive_k_probes_and_backs_off():
    policy = AdaptiveK(COST, max_k=4, optimism=0.5, min_gain=0.0)  # optimistic enough to keep probing
    assert policy.next_k() == 1  # prior alpha 0.5
    for _ in range(5):
        policy.observe(1, 0)
    assert best_k(policy.tracker.alpha, COST, 4) == 0
    gaps = []
    for _ in range(3):
        n, k = calls_until_nonzero(policy)
        assert k == best_k(min(0.99, policy.tracker.alpha + policy.optimism), COST, 4) == 1
        gaps.append(n)
        policy.observe(1, 0)  # the probe fails
    assert gaps == [16, 32, 64]


def test_adaptive_k_probe_success_lifts_k_and_resets_interval():
    policy = AdaptiveK(COST, max_k=4, optimism=0.5)
    for _ in range(5):
        policy.observe(1, 0)
    assert calls_until_nonzero(policy) == (16, 1)
    policy.observe(1, 0)
    assert calls_until_nonzero(policy) == (32, 1)
    for _ in range(10):  # probes and rounds now succeed
        policy.observe(4, 4)
    assert policy.next_k() == 4
    for _ in range(100):  # the text turns hard again
        if best_k(policy.tracker.alpha, COST, 4) == 0:
            break
        policy.observe(4, 0)
    assert best_k(policy.tracker.alpha, COST, 4) == 0
    alpha = policy.tracker.alpha
    n, k = calls_until_nonzero(policy)
    assert n == 16  # back to the first interval
    assert k == best_k(min(0.99, alpha + policy.optimism), COST, 4) >= 1


def test_adaptive_k_never_probes_with_max_k_zero():
    policy = AdaptiveK(COST, max_k=0)
    assert all(policy.next_k() == 0 for _ in range(200))


def test_adaptive_k_never_probes_a_draft_that_cannot_pay():
    """A draft step as slow as a target call: even alpha + optimism cannot beat K = 0."""
    slow = CostModel(draft_step_s=1.0, verify_s=(1.0, 1.02, 1.04, 1.06, 1.08))
    policy = AdaptiveK(slow, max_k=4, tracker=AcceptanceTracker(prior_alpha=0.6))
    assert all(policy.next_k() == 0 for _ in range(500))


# A target that is memory-bound for small calls and compute-bound past 16 tokens: a call over
# n tokens in all costs max(1, n / 16), like a GPU or this CPU with a small model.
def _roofline(b: int, max_k: int = 4) -> tuple[float, ...]:
    return tuple(max(1.0, b * (k + 1) / 16) for k in range(max_k + 1))


LOADED = CostModel(
    draft_step_s=0.02, verify_s=_roofline(1), batch_verify_s={4: _roofline(4), 16: _roofline(16)}
)


def test_cost_at_batch_interpolates_and_amortises():
    assert LOADED.at_batch(1) is LOADED
    at16 = LOADED.at_batch(16)
    assert at16.verify_s == pytest.approx([v / 16 for v in _roofline(16)])
    at10 = LOADED.at_batch(10)  # halfway between the 4 and 16 measurements
    assert at10.verify_s == pytest.approx([(a + b) / 2 / 10 for a, b in zip(_roofline(4), _roofline(16))])
    at32 = LOADED.at_batch(32)  # extrapolated along the last segment
    assert at32.verify_s[4] == pytest.approx((_roofline(16)[4] + (_roofline(16)[4] - _roofline(4)[4]) * 16 / 12) / 32)
    spread = CostModel(0.02, _roofline(1), draft_parallelism=2)
    assert spread.at_batch(4).draft_step_s == pytest.approx(0.01)  # two drafters share 4 sequences


def test_k_falls_as_the_batch_grows():
    """Same alpha, more load: free verification at batch 1, paid for at 16, so K goes to 0."""
    alpha = 0.6
    ks = {b: best_k(alpha, LOADED.at_batch(b)) for b in (1, 2, 4, 8, 16, 32)}
    assert ks[1] == 4 and ks[16] == 0 and ks[32] == 0
    assert list(ks.values()) == sorted(ks.values(), reverse=True)
    for b, k in ks.items():  # the choice is the best rate at that batch, never below plain's
        cost = LOADED.at_batch(b)
        rate = lambda k: expected_tokens(alpha, k) / cost.round_s(k)  # noqa: E731
        assert rate(k) >= rate(0) and rate(k) == max(rate(j) for j in range(5))
    policy = AdaptiveK(LOADED, max_k=4, tracker=AcceptanceTracker(prior_alpha=alpha))
    assert policy.next_k(batch=1) == 4
    assert policy.next_k(batch=16) == 0
    # compute-bound, K + 1 tokens cost K + 1 times one: even alpha 0.95 cannot pay at 16
    assert best_k(0.95, LOADED.at_batch(16)) == 0 < best_k(0.95, LOADED.at_batch(8))


def test_observed_rounds_refine_the_cost_model():
    """Calibration said a 3-token row costs little more than 1 at batch 16; real rounds say it
    costs twice as much: after a few observations K drops to 0 at that load."""
    cheap = CostModel(0.0, _roofline(1), {4: _roofline(4), 16: tuple(1.0 + 0.05 * k for k in range(5))})
    alpha = 0.6
    assert best_k(alpha, cheap.at_batch(16)) > 0
    cost = cheap
    for _ in range(200):  # each observation moves the row's shape by ratio^0.05 only: noise cannot bend it
        cost = cost.observed(16, 16, 1.0).observed(16, 32, 2.0).observed(16, 48, 3.0).observed(16, 80, 5.0)
    assert cost.batch_verify_s[16][0] == pytest.approx(1.0, rel=1e-3) and cost.batch_verify_s[16][4] == pytest.approx(5.0, rel=1e-3)
    assert best_k(alpha, cost.at_batch(16)) == 0
    assert cost.verify_s == cheap.verify_s and cost.batch_verify_s[4] == cheap.batch_verify_s[4]  # other sizes kept
    at15 = cheap.observed(15, 15, 0.9)  # the nearest measured size (16) moves by observed / predicted
    ratio = 0.9 / (15 * cheap.at_batch(15).verify_s[0])
    assert at15.batch_verify_s[16][0] == pytest.approx(1.0 * ratio ** 0.3)
    assert at15.batch_verify_s[16][4] == pytest.approx(1.2 * ratio ** 0.25)  # the rest: all but the shape part
    assert cheap.observed(16, 16 * 99, 1.0) is cheap  # a block longer than the table: ignored


def test_an_entry_out_of_order_is_pooled_with_its_neighbour_not_copied_onward():
    from specserve.cluster.speculation.costs import _nondecreasing

    assert _nondecreasing([1.0, 4.0, 1.0, 8.0]) == pytest.approx([1.0, 2.0, 2.0, 8.0])  # 4 and 1 pooled: sqrt(4 * 1)
    assert _nondecreasing([1.0, 2.0, 3.0]) == pytest.approx([1.0, 2.0, 3.0])
    assert _nondecreasing([0.0, 1.0]) == pytest.approx([0.0, 1.0], abs=1e-9)  # a zero entry does not break the log


def test_stalls_and_noise_never_lock_drafting_out():
    """A trace like the 1.5B target's on a busy 2-core machine: rounds at the K the model picks,
    twice calibration's cost (contention), scattered x1/3..x3, with a 15x stall every 20 rounds (a
    descheduled thread). The cost model learns each round clipped and in log space, its shape slowly: the shape calibration
    measured survives (verifying 5 tokens stays within 1.25x of 1; truth 1.03x), so a source with
    alpha 0.8 keeps drafting. The rule of before (linear, unclipped, half weight on the other
    entries, order kept by a one-way max) fails the same trace (negative control)."""
    calibrated = CostModel(0.002, (0.067, 0.067, 0.067, 0.067, 0.069, 0.074, 0.078, 0.082, 0.086))
    assert best_k(0.8, calibrated) > 0

    def linear_unclipped(cost, b, tokens, seconds, weight=0.3):
        ratio, at = seconds / round_cost_s(cost, b, tokens), tokens / b - 1
        row = [t * (1 + (weight if abs(j - at) < 1 else weight / 2) * (ratio - 1)) for j, t in enumerate(cost.verify_s)]
        for j in range(1, len(row)):
            row[j] = max(row[j], row[j - 1])
        return CostModel(cost.draft_step_s, tuple(row))

    def replay(learn):
        rng, cost = random.Random(0), calibrated
        for i in range(600):
            k = best_k(0.8, cost, min_gain=0.1)
            seconds = calibrated.verify_s[k] * 2 * (15 if i % 20 == 19 else math.exp(rng.uniform(-1.1, 1.1)))
            cost = learn(cost, 1, k + 1, seconds)
        return cost

    truth = CostModel(calibrated.draft_step_s, tuple(2 * t for t in calibrated.verify_s))  # contention: half speed

    def rate(cost):  # tokens per true second at the K this model picks
        k = best_k(0.8, cost, min_gain=0.1)
        return expected_tokens(0.8, k) / truth.round_s(k)

    learned, before = replay(CostModel.observed), replay(linear_unclipped)
    assert learned.verify_s[4] / learned.verify_s[0] < 1.25 < 2 < before.verify_s[4] / before.verify_s[0]
    assert 1.0 < learned.verify_s[0] / calibrated.verify_s[0] < 3.0 < before.verify_s[0] / calibrated.verify_s[0]
    assert rate(learned) > 0.85 * rate(truth) and rate(before) < 0.6 * rate(truth)


def test_extrapolation_never_predicts_less_than_measured():
    odd = CostModel(0.0, (1.0, 1.0), {4: (3.0, 3.0), 16: (2.0, 2.0)})  # noisy: 16 measured cheaper than 4
    assert odd.at_batch(1200).verify_s == pytest.approx((2.0 / 1200, 2.0 / 1200))
    learned = odd.observed(1200, 1200, 5.0)  # far past the measured sizes: a row of its own (1024) learns it
    assert learned.batch_verify_s[16] == odd.batch_verify_s[16] and 1024 in learned.batch_verify_s
    assert learned.at_batch(1200).verify_s[0] > odd.at_batch(1200).verify_s[0]


def test_costs_past_the_measured_batch_sizes_are_learned_from_real_rounds():
    """Calibrated at 4 and 16 where extra tokens look nearly free; at 64 sequences real rounds say
    each token costs: K drops to 0 there, while the measured rows stay as they were."""
    cheap = CostModel(0.0, _roofline(1), {4: tuple(1.0 + 0.01 * k for k in range(5)),
                                          16: tuple(1.2 + 0.01 * k for k in range(5))})
    alpha = 0.6
    assert best_k(alpha, cheap.at_batch(64)) > 0
    cost = cheap
    for _ in range(200):  # the shape is learned slowly (CostModel.observed)
        cost = cost.observed(64, 64, 2.0).observed(64, 128, 4.0).observed(64, 192, 6.0)
    assert best_k(alpha, cost.at_batch(64)) == 0
    assert cost.batch_verify_s[64][0] == pytest.approx(2.0, rel=1e-3)
    assert cost.batch_verify_s[4] == cheap.batch_verify_s[4] and cost.batch_verify_s[16] == cheap.batch_verify_s[16]


def test_best_ks_gives_drafts_to_the_sequences_that_accept_them():
    """Flattened rounds: one K per sequence. Where verification is nearly free every sequence
    drafts; where each token costs, only the high-alpha ones do; nobody drafts with alpha 0."""
    from specserve.cluster.speculation.adaptive import best_ks, round_cost_s

    flat = CostModel(0.0, tuple(1.0 + 0.01 * k for k in range(9)), {16: tuple(16 * (1.0 + 0.01 * k) for k in range(9))})
    assert best_ks([0.8] * 4, flat) == [8] * 4
    assert best_ks([0.8, 0.0], flat) == [8, 0]
    linear = CostModel(0.0, tuple(1.0 + 0.25 * k for k in range(9)))  # each draft token costs a quarter step
    ks = best_ks([0.9, 0.5, 0.1], linear)
    assert ks[0] > ks[1] >= ks[2] == 0
    assert best_ks([0.9, 0.5, 0.1], linear, max_k=2)[0] == 2
    assert best_ks([], linear) == []
    # the round cost reads the batch's table at tokens / batch
    assert round_cost_s(flat, 16, 16) == 16 and abs(round_cost_s(flat, 16, 24) - 16 * 1.005) < 1e-9


def test_next_ks_probes_after_rounds_at_zero():
    policy = AdaptiveK(CostModel(0.0, tuple(1.0 + 0.5 * k for k in range(9))), max_k=4, probe_after=3, min_gain=0.0)
    got = [policy.next_ks([0.3, 0.3]) for _ in range(3)]
    assert got[:2] == [[0, 0], [0, 0]] and any(got[2])  # the third round at zero probes


def test_drafting_must_beat_plain_decoding_by_the_margin():
    """Where the model predicts a small gain (smaller than its own error), the policy decodes plainly."""
    from specserve.cluster.speculation.adaptive import best_ks

    cost = CostModel(0.0, tuple(1.0 + 0.45 * k for k in range(9)))  # one draft at alpha 0.5: 1.5 tokens for 1.45
    assert best_k(0.5, cost, 1) == 1 and best_ks([0.5], cost, 1) == [1]
    assert best_k(0.5, cost, 1, min_gain=0.1) == 0 and best_ks([0.5], cost, 1, min_gain=0.1) == [0]
    assert AdaptiveK(cost, max_k=1).next_k() == 0 and AdaptiveK(cost, max_k=1).next_ks([0.5]) == [0]
    assert best_ks([0.9], cost, 1, min_gain=0.1) == [1]  # 1.9 tokens for 1.45: well past the margin


def test_each_sequence_probes_on_its_own_schedule():
    """A sequence's probes follow its own rounds at K = 0, not the engine's history."""
    policy = AdaptiveK(CostModel(0.0, tuple(1.0 + 0.5 * k for k in range(9))), max_k=4, probe_after=3, min_gain=0.0)
    old, new = policy.new_schedule(), policy.new_schedule()
    assert [policy.next_ks([0.3], [old]) for _ in range(2)] == [[0], [0]]
    got = policy.next_ks([0.3, 0.3], [old, new])
    assert got[0] > 0 and got[1] == 0  # the third round at zero of the old one: it probes alone
    assert policy.next_ks([0.3, 0.3], [old, new]) == [0, 0]
    assert policy.next_ks([0.3, 0.3], [old, new])[1] > 0  # and the new one after its own three


def test_at_most_one_sequence_probes_a_round():
    """Probes cost one sequence's drafts a round, however large the batch; the others stay due."""
    policy = AdaptiveK(CostModel(0.0, tuple(1.0 + 0.5 * k for k in range(9))), max_k=4, probe_after=2, min_gain=0.0)
    schedules = [policy.new_schedule() for _ in range(3)]
    assert policy.next_ks([0.3] * 3, schedules) == [0, 0, 0]
    probed = [policy.next_ks([0.3] * 3, schedules) for _ in range(3)]
    assert [sum(k > 0 for k in ks) for ks in probed] == [1, 1, 1]
    assert [next(i for i, k in enumerate(ks) if k) for ks in probed] == [0, 1, 2]


def test_a_batched_drafters_token_cost_falls_with_the_sequences_drafting():
    """draft_token_s(n): a batched drafter's measured cost at n sequences, over n (linear in
    between, the last slope past the largest, never less in all than a smaller batch)."""
    cost = CostModel(0.004, (1.0,), draft_batch_s={4: 0.008, 16: 0.02})
    assert cost.draft_token_s(1) == 0.004
    assert cost.draft_token_s(4) == pytest.approx(0.002)
    assert cost.draft_token_s(10) == pytest.approx((0.008 + 6 * 0.001) / 10)
    assert cost.draft_token_s(32) == pytest.approx((0.02 + 16 * 0.001) / 32)
    flat_after = CostModel(0.004, (1.0,), draft_batch_s={4: 0.01, 16: 0.01})
    assert flat_after.draft_token_s(8) == pytest.approx(0.01 / 8)
    pool = CostModel(0.004, (1.0,), draft_parallelism=2)  # no batch measured: spread over the drafters
    assert pool.draft_token_s(8) == 0.002 and CostModel(0.004, (1.0,)).draft_token_s(8) == 0.004


def test_free_drafts_are_given_where_paid_ones_would_not_pay():
    """best_ks with a draft cost per sequence: at the same alpha, the sequence whose drafts are free
    (lookup) drafts, the one whose drafter costs half a step does not; a negative control with both
    paying drafts nothing."""
    from specserve.cluster.speculation.adaptive import best_ks

    cost = CostModel(0.5, tuple(1.0 + 0.1 * k for k in range(9)))
    assert best_ks([0.6, 0.6], cost, 4, draft_s=[0.0, 0.5])[0] > 0
    assert best_ks([0.6, 0.6], cost, 4, draft_s=[0.0, 0.5])[1] == 0
    assert best_ks([0.6, 0.6], cost, 4, draft_s=[0.5, 0.5]) == [0, 0]
    assert best_ks([0.6, 0.6], cost, 4) == [0, 0]  # default: cost.draft_token_s for all
    policy = AdaptiveK(cost, max_k=4)
    assert policy.next_ks([0.6, 0.6], None, [0.0, 0.5]) == best_ks([0.6, 0.6], cost, 4, 0.1, [0.0, 0.5])


def test_best_trees_with_one_child_a_node_and_a_flat_table_is_best_ks():
    """The tree allocation generalises the chain's: a node's reach is alpha^depth on a chain."""
    import random

    from specserve.cluster.speculation import best_ks, best_trees
    from specserve.cluster.speculation.shape import is_chain

    rng = random.Random(0)
    for _ in range(200):
        k, base, slope = rng.randint(1, 8), rng.uniform(0.01, 0.1), rng.uniform(0.0, 0.05)
        cost = CostModel(rng.uniform(0.0, 0.02), tuple(base + slope * j for j in range(k + 1)),
                         {4: tuple(2.4 * base + 4 * slope * j for j in range(k + 1))})
        alphas = [rng.uniform(0.0, 0.99) for _ in range(rng.randint(1, 5))]
        shapes = best_trees([[[a]] * k for a in alphas], cost, max_nodes=64, max_branch=1, min_gain=0.1)
        assert [len(s) for s in shapes] == best_ks(alphas, cost, min_gain=0.1)
        assert all(is_chain(s) for s in shapes)


def _rising_table(rng: random.Random, k: int, scale: float) -> tuple[float, ...]:
    """A verify table whose extra tokens never get cheaper (flat, linear or a roofline's bend)."""
    steps = sorted(rng.choice([0.0, rng.uniform(0.0, 0.4)]) * scale for _ in range(k))
    return tuple(scale + sum(steps[:j]) for j in range(k + 1))


def _any_table(rng: random.Random, k: int, scale: float) -> tuple[float, ...]:
    """A verify table whose extra tokens cost anything in any order (concave: the first costs most,
    as int8 on CPUs; irregular: measured noise)."""
    steps = [rng.choice([0.0, rng.uniform(0.0, 0.4)]) * scale for _ in range(k)]
    return tuple(scale + sum(steps[:j]) for j in range(k + 1))


def _round_rate(ks, alphas, cost: CostModel, draft_s) -> float:
    """A flattened round's expected tokens per second: b + sum_i sum_{j <= K_i} alpha_i^j over
    the verify cost of b + sum K tokens plus each sequence's drafts."""
    from specserve.cluster.speculation.adaptive import verify_cost

    b = len(alphas)
    expected = b + sum(a ** j for a, k in zip(alphas, ks) for j in range(1, k + 1))
    return expected / (verify_cost(cost.at_batch(b).verify_s, b, b + sum(ks)) + sum(k * d for k, d in zip(ks, draft_s)))


def test_best_ks_is_the_chain_case_of_best_trees_and_the_best_k_vector():
    """best_ks is best_trees with one child a node (c(d, 0) = alpha) read out as chain lengths, for
    any costs; on small rounds (K <= 3, up to 3 sequences) its Ks are the best of all K vectors
    by brute force, for any verify table (rising, concave or irregular)."""
    import itertools

    from specserve.cluster.speculation import best_ks, best_trees
    from specserve.cluster.speculation.shape import is_chain

    rng = random.Random(5)
    for _ in range(300):  # chain read-out, any table
        k, b, scale = rng.randint(0, 8), rng.randint(0, 8), rng.uniform(0.01, 0.1)
        cost = CostModel(rng.uniform(0.0, 0.3) * scale, tuple(scale * rng.uniform(1, 1.5) ** j for j in range(k + 1)),
                         {4: tuple(3 * scale + rng.uniform(0, 0.5) * scale * j for j in range(k + 1))})
        alphas = [rng.choice([0.0, 0.5, rng.uniform(0.0, 0.99)]) for _ in range(b)]
        max_k, min_gain = rng.choice([None, 0, 2, 5, 20]), rng.choice([0.0, 0.1])
        draft_s = None if rng.random() < 0.5 else [rng.uniform(0.0, 0.3) * scale for _ in range(b)]
        top = max(0, cost.max_k if max_k is None else min(max_k, cost.max_k))
        shapes = best_trees([[[a]] * top for a in alphas], cost, max_k, top, 1, min_gain, draft_s)
        assert all(is_chain(s) for s in shapes)
        assert best_ks(alphas, cost, max_k, min_gain, draft_s) == [len(s) for s in shapes]
    drafting = 0
    for _ in range(400):  # brute force
        b, scale = rng.randint(1, 3), rng.uniform(0.01, 0.1)
        table = rng.choice([_rising_table, _any_table])
        batched = {4: tuple(3.5 * t for t in table(rng, 3, scale))} if rng.random() < 0.5 else {}
        cost = CostModel(rng.uniform(0.0, 0.3) * scale, table(rng, 3, scale), batched)
        alphas = [rng.uniform(0.0, 0.99) for _ in range(b)]
        min_gain = rng.choice([0.0, 0.1])
        given = None if rng.random() < 0.5 else [rng.choice([0.0, rng.uniform(0.0, 2.0) * scale]) for _ in range(b)]
        draft_s = [cost.draft_token_s(b)] * b if given is None else given
        rate = lambda ks: _round_rate(ks, alphas, cost, draft_s)  # noqa: E731
        best = max(itertools.product(range(4), repeat=b), key=lambda ks: (rate(ks), -sum(ks)))
        want = list(best) if rate(best) > rate([0] * b) * (1 + min_gain) else [0] * b
        assert best_ks(alphas, cost, 3, min_gain, given) == want, (alphas, cost, given, min_gain)
        drafting += any(want)
    assert 100 < drafting < 350  # both outcomes are exercised
    # a concave table (the first extra token costs most): a stop at the first drop drafted nothing
    concave, alphas = CostModel(0.0, (0.0204, 0.0267, 0.0280, 0.0291)), [0.61, 0.76, 0.33]
    best = max(itertools.product(range(4), repeat=3), key=lambda ks: _round_rate(ks, alphas, concave, [0.0] * 3))
    assert best_ks(alphas, concave, 3, 0.0, [0.0] * 3) == list(best) == [3, 3, 2]


def test_shape_stats_count_each_tested_child_by_depth_and_rank():
    """At each reached node its children were tested in rank order up to the accepted one; where
    the path ends, all of them were tested and refused; a chain is rank 0 all the way down."""
    from specserve.cluster.speculation import ShapeStats

    st = ShapeStats(max_depth=3, max_rank=2, decay=1.0)
    # root -> nodes 0, 1; node 1 -> nodes 2, 3; node 0 -> node 4; path: 1 (rank 1), then nothing below
    st.observe((-1, -1, 1, 1, 0), 5, [1])
    assert st.tested == [[1, 1], [1, 1], [0, 0]] and st.accepted == [[0, 1], [0, 0], [0, 0]]
    st.observe(None, 3, [0, 1])  # a chain of 3, two accepted, the third refused
    assert st.tested == [[2, 1], [2, 1], [1, 0]] and st.accepted == [[1, 1], [1, 0], [0, 0]]
    st.observe((-1, 0, 1), 3, [0, 1, 2])  # accepted to the leaf: nothing refused below
    assert st.tested[2] == [2, 0] and st.accepted[2] == [1, 0]
    fresh = ShapeStats(max_depth=3, max_rank=2, prior_alpha=0.6)
    assert fresh.c(1, 0) == pytest.approx(0.6) and fresh.c(1, 1) == pytest.approx(0.3) and fresh.c(4, 0) == 0.0


def test_tree_shapes_follow_acceptance_by_depth_and_rank_and_cost():
    """Where a second choice is often right and verification is flat, the tree branches there (at
    the depth where it is); where each verified token costs, the tree shrinks, and a weak second
    choice leaves a chain; where nothing pays, nothing is drafted."""
    from specserve.cluster.speculation import best_trees
    from specserve.cluster.speculation.shape import depths_and_ranks, is_chain

    flat = CostModel(0.0, tuple(1.0 + 0.002 * k for k in range(9)))
    linear = CostModel(0.0, tuple(1.0 + 0.25 * k for k in range(9)))
    # depth 1 and 3: the first choice is a coin toss, the second usually right; depth 2: sure
    table = [[0.5, 0.8], [0.95, 0.1], [0.5, 0.8], [0.5, 0.8]]
    (tree,) = best_trees([table], flat, max_k=4, max_nodes=8, max_branch=2)
    depth, rank = depths_and_ranks(tree)
    assert not is_chain(tree) and len(tree) == 8
    assert {d for d, r in zip(depth, rank) if r == 1} >= {1, 3}  # branches where the second choice holds
    assert not any(r == 1 and d == 2 for d, r in zip(depth, rank))  # none where the first is sure
    (dear,) = best_trees([table], linear, max_k=4, max_nodes=8, max_branch=2)
    assert 0 < len(dear) < len(tree)  # each node must now pay for its verification
    weak_second = [[0.8, 0.1]] * 4
    (chain,) = best_trees([weak_second], linear, max_k=4, max_nodes=8, max_branch=2)
    assert is_chain(chain) and len(chain) > 0
    (wide,) = best_trees([weak_second], flat, max_k=4, max_nodes=8, max_branch=2)
    assert not is_chain(wide)  # nearly free nodes: even weak second choices are worth verifying
    assert best_trees([[[0.05, 0.05]] * 4], linear, max_k=4, max_branch=2, min_gain=0.1) == [()]


def test_default_and_cut_shapes():
    from specserve.cluster.speculation.shape import cut_shape, default_shape, max_fanout

    assert default_shape(3) == (-1, 0, 1) and default_shape(0, 8, 2) == ()
    assert default_shape(3, 8, 2) == (-1, -1, 0, 1, 2, 3)  # top-2 at the root, then a chain under each
    assert default_shape(4, 5, 3) == (-1, -1, -1, 0, 1)
    assert cut_shape((-1, -1, 0, 1, 2, 3), 2, 8) == (-1, -1, 0, 1)
    assert cut_shape((-1, -1, 0, 1, 2, 3), 8, 3) == (-1, -1, 0)
    assert cut_shape((-1, 0, 0, 1), 1, 8) == (-1,) and max_fanout((-1, 0, 0, 1)) == 2
