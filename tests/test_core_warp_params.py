"""warp_probs (temperature, top-k, top-p, greedy) and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from specserve.cluster.speculation import InvalidRequest, SamplingParams, warp_probs


def rows(n: int, v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def kept(probs: torch.Tensor) -> set[int]:
    return set((probs > 0).nonzero().flatten().tolist())


def test_temperature_is_softmax_of_scaled_logits():
    logits = rows(8, 30, 0)
    for t in (0.3, 0.7, 1.0, 1.5, 4.0):
        got = warp_probs(logits, [SamplingParams(temperature=t)] * 8)
        want = torch.softmax(logits.double() / t, dim=-1)
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    hot = warp_probs(logits[:1], [SamplingParams(temperature=4.0)])
    cold = warp_probs(logits[:1], [SamplingParams(temperature=0.3)])
    assert hot.max() < cold.max()


def test_greedy_is_one_hot_argmax():
    logits = rows(10, 30, 1)
    probs = warp_probs(logits, [SamplingParams(temperature=0, top_k=5, top_p=0.5)] * 10)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(dim=1), 30).float())
    tie = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert warp_probs(tie, [SamplingParams(temperature=0)]).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_top_k_keeps_the_k_largest():
    logits = rows(20, 30, 2)
    for k in (1, 2, 5, 29):
        probs = warp_probs(logits, [SamplingParams(top_k=k)] * 20)
        for row, p in zip(logits, probs):
            assert kept(p) == set(row.topk(k).indices.tolist())
            idx = list(kept(p))
            want = torch.softmax(row[idx].double(), dim=0)
            assert torch.allclose(p[idx].double(), want, atol=1e-6, rtol=0)
            assert abs(float(p.sum()) - 1) < 1e-5


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    assert kept(warp_probs(logits, [SamplingParams(top_k=1)])[0]) == {0}
    assert kept(warp_probs(logits, [SamplingParams(top_k=2)])[0]) == {0, 2, 3, 5}
    assert kept(warp_probs(logits, [SamplingParams(top_k=4)])[0]) == {0, 2, 3, 5}
    assert kept(warp_probs(logits, [SamplingParams(top_k=5)])[0]) == {0, 1, 2, 3, 5}


def test_top_k_zero_or_at_least_vocab_is_no_truncation():
    logits = rows(4, 10, 3)
    full = warp_probs(logits, [SamplingParams()] * 4)
    for k in (0, 10, 11, 1000):
        assert torch.equal(warp_probs(logits, [SamplingParams(top_k=k)] * 4), full)


def test_top_p_keeps_the_minimal_prefix():
    logits = rows(50, 20, 4, scale=1.5)
    for top_p in (0.05, 0.3, 0.6, 0.9, 0.99):
        probs = warp_probs(logits, [SamplingParams(top_p=top_p)] * 50)
        for row, p in zip(logits, probs):
            full = torch.softmax(row.double(), dim=0)
            order = full.argsort(descending=True).tolist()
            keep = kept(p)
            # A prefix of the descending order ...
            assert keep == set(order[: len(keep)])
            mass = float(full[list(keep)].sum())
            # ... reaching top_p, and minimal: without its smallest member it would not.
            assert mass >= top_p
            assert mass - float(full[order[len(keep) - 1]]) < top_p
            # Renormalised over the kept set.
            want = full[list(keep)] / mass
            assert torch.allclose(p[list(keep)].double(), want, atol=1e-6, rtol=0)


def test_top_p_exact_boundary():
    # probs 0.5, 0.25, 0.125, 0.125: top_p 0.75 needs two tokens, a hair more needs three.
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    assert kept(warp_probs(logits, [SamplingParams(top_p=0.5)])[0]) == {1}
    assert kept(warp_probs(logits, [SamplingParams(top_p=0.75)])[0]) == {1, 3}
    assert kept(warp_probs(logits, [SamplingParams(top_p=0.76)])[0]) == {1, 3, 0}  # tie: lower index
    assert kept(warp_probs(logits, [SamplingParams(top_p=1.0)])[0]) == {0, 1, 2, 3}


def test_order_temperature_then_top_k_then_top_p():
    logits = rows(30, 12, 5)
    t, k, top_p = 1.7, 6, 0.7
    probs = warp_probs(logits, [SamplingParams(temperature=t, top_k=k, top_p=top_p)] * 30)
    for row, p in zip(logits, probs):
        x = row.double() / t
        top = x.topk(k).indices
        inner = torch.softmax(x[top], dim=0)
        order = inner.argsort(descending=True)
        csum = inner[order].cumsum(0)
        m = int((csum < top_p).sum()) + 1
        want_idx = top[order[:m]]
        assert kept(p) == set(want_idx.tolist())
        want = torch.softmax(x[want_idx], dim=0)
        assert torch.allclose(p[want_idx].double(), want, atol=1e-6, rtol=0)


MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.5),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.8),
    SamplingParams(temperature=1.4, top_k=7, top_p=0.9),
    SamplingParams(temperature=0, top_k=2),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.1),
    SamplingParams(temperature=2.0, top_p=0.95),
]


def test_mixed_rows_equal_rows_alone():
    logits = rows(len(MIXED), 40, 6)
    together = warp_probs(logits, MIXED)
    for i, sp in enumerate(MIXED):
        assert torch.equal(together[i], warp_probs(logits[i : i + 1], [sp])[0]), sp
    # And in any order.
    perm = torch.randperm(len(MIXED), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = warp_probs(logits[perm], [MIXED[i] for i in perm])
    assert torch.equal(shuffled, together[perm])


def test_no_truncation_row_keeps_its_tail_next_to_a_top_p_row():
    # Regression: float32 cumsum rounds to 1.0 before the tail, and a top_p = 1 row batched with a
    # top_p < 1 row lost every tail token that was kept when the row was warped alone.
    tail = torch.tensor([[0.0] + [-20.0] * 7])
    alone = warp_probs(tail, [SamplingParams()])
    assert bool((alone > 0).all())
    logits = torch.cat([tail, rows(1, 8, 7)])
    mixed = warp_probs(logits, [SamplingParams(), SamplingParams(top_p=0.5)])
    assert torch.equal(mixed[0], alone[0])
    # The same at a realistic vocabulary size.
    big = rows(2, 32_000, 8, scale=3.0)
    mixed = warp_probs(big, [SamplingParams(), SamplingParams(top_p=0.5)])
    assert torch.equal(mixed[0], warp_probs(big[:1], [SamplingParams()])[0])
    assert bool((mixed[0] > 0).all())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_params_raise_invalid_request(kwargs, field):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


def test_good_params_accepted():
    for kwargs in (dict(), dict(temperature=0), dict(temperature=2, top_k=5, top_p=0.5, seed=0), dict(top_p=1.0)):
        SamplingParams(**kwargs)
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy
