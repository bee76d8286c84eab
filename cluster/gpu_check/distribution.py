"""The distribution part: sampled speculation on the device against the target's exact distribution,
as tests/test_engine_sampling.py (a chain) and tests/test_engine_tree.py (a tree) check it on the
CPU, with the same helpers (specserve.cluster.speculation.exact). The tiny model samples on the device in
float32; the exact joint is enumerated from the same seeded weights on the CPU. Each path has a
negative control (accept every draft; always take a tree's first children) that the same test
must reject."""

from __future__ import annotations

import contextlib
import time

from ..runtime.requests import GenerationRequest
from ..runtime.factory import load_target, make_engine
from ..runtime.models import load_model
from ..speculation import SamplingParams
from ..speculation.exact import DISTRIBUTION_TEST_PARAMS, chi2_pvalue, exact_joint, first_children
from .common import Context, Recorder, configured, log
from .plans import TINY

PASS, REJECT = 1e-3, 1e-6  # the tests' thresholds: a real path above PASS, a negative control below REJECT
CASES = {  # path: (prompt, tokens sampled, samples, the config's draft and speculation sections)
    "chain": ("ab", 2, 1500, {"drafter": "model", "model": {"layers": [0]}}, {"num_draft_tokens": 2}),
    "tree": ("ab1ab2ab", 3, 3000, {"drafter": "ngram"},
             {"num_draft_tokens": 2, "tree": {"max_nodes": 4, "max_branch": 2}}),  # the suffix occurred twice: trees
}


def run(ctx: Context, rec: Recorder) -> None:
    params = DISTRIBUTION_TEST_PARAMS
    reference = load_model(TINY, "float32", "cpu")  # the exact joint, by enumeration
    for path, (prompt, n, samples, draft, speculation) in CASES.items():
        config = configured({"target": {"model": TINY, "dtype": "float32", "device": ctx.device, "chat_template": False}},
                            draft=draft, speculation=speculation)
        engine = make_engine(config, load_target(config))
        joint = exact_joint(reference, reference.tokenizer.encode(prompt), params, n)
        t = time.perf_counter()
        drawn, stats = sample(engine, prompt, n, samples, params)
        p = chi2_pvalue(drawn, joint)
        with negative_control(path, first_children):
            control, _ = sample(engine, prompt, n, samples, params)
        q = chi2_pvalue(control, joint)
        result = {"samples": samples, "tokens": n, "p_value": float(p), "control_p_value": float(q),
                  "control": CONTROLS[path], "passed": bool(p > PASS), "control_rejected": bool(q < REJECT),
                  "seconds": round(time.perf_counter() - t, 2)} | stats
        rec.put(path, result)
        log(f"{path}: p = {p:.3g} (> {PASS}), negative control p = {q:.3g} (< {REJECT})")
        if not result["passed"]:
            rec.problem(f"{path}: samples fail the chi-square against the exact joint (p = {p:.3g} <= {PASS})")
        if not result["control_rejected"]:
            rec.problem(f"{path}: the negative control ({CONTROLS[path]}) was not rejected (p = {q:.3g} >= {REJECT})")
        if not stats["speculated"]:
            rec.problem(f"{path}: no {'tree' if path == 'tree' else 'draft'} was verified: the path was not exercised")
    rec.put("summary", ", ".join(f"{path} p={rec.data[path]['p_value']:.3g} (control p={rec.data[path]['control_p_value']:.2g})"
                                 for path in CASES if path in rec.data))


CONTROLS = {"chain": "every draft accepted", "tree": "first children always accepted"}


def sample(engine, prompt: str, n: int, samples: int, params: SamplingParams) -> tuple[list[tuple[int, ...]], dict]:
    """`samples` seeded requests of n tokens, K = 2, all in one batch; their tokens and what was drafted."""
    requests = [GenerationRequest(prompt, n, SamplingParams(params.temperature, params.top_k, params.top_p, seed=s), 2)
                for s in range(samples)]
    results = engine.generate(requests)
    drafted = sum(r.stats.draft_tokens for r in results)
    trees = sum(r.stats.tree_rounds for r in results)
    tree = engine.tree_nodes > 0
    return [tuple(r.token_ids) for r in results], {"draft_tokens": drafted, "tree_rounds": trees,
                                                   "speculated": trees > 0 if tree else drafted > 0}


@contextlib.contextmanager
def negative_control(path: str, first_children):
    """The wrong rule the tests use: accept every draft (the output follows q), or take the first
    children of every tree node (biased). Restored afterwards."""
    import torch

    import specserve.cluster.speculation.rejection as rejection
    import specserve.cluster.speculation.tree as tree

    module, name, wrong = ((rejection, "acceptance_probs", lambda p_x, q_x: torch.ones_like(p_x)) if path == "chain"
                           else (tree, "accept_tree", first_children))
    saved = getattr(module, name)
    setattr(module, name, wrong)
    try:
        yield
    finally:
        setattr(module, name, saved)
