"""The algorithm core of specserve: speculative sampling in torch, nothing else.

No module here imports Ray, gRPC, DeepSpeed or transformers (tests/test_boundary.py).
"""

from .adaptive import (AcceptanceTracker, AdaptiveK, ProbeSchedule, best_k, expected_tokens,
                       best_ks, mean_expected_tokens)
from .costs import CostModel
from .errors import InvalidRequest, Unavailable
from .greedy import greedy_accept
from .host import HostTransfers
from .params import SamplingParams
from .rejection import RejectionOutput, acceptance_probs, recovered_probs, rejection_sample
from .reference import reference_rejection_sample
from .round import Acceptance, DraftBlock, DraftRequest, Drafter, Target, TargetOutput
from .shape import Shape, ShapeStats, best_trees
from .sample import draw_seed, draw_uniforms, make_generator, sample_rows, sample_token, uniforms
from .tree import (DraftTree, TreeAcceptance, accept_tree, accept_trees, child_outcomes, reference_accept_tree,
                   tree_uniforms)
from .warp import warp_probs

__all__ = [
    "Acceptance",
    "DraftBlock",
    "DraftRequest",
    "DraftTree",
    "Drafter",
    "Target",
    "AcceptanceTracker",
    "AdaptiveK",
    "ProbeSchedule",
    "CostModel",
    "HostTransfers",
    "InvalidRequest",
    "Unavailable",
    "RejectionOutput",
    "SamplingParams",
    "TreeAcceptance",
    "acceptance_probs",
    "accept_tree",
    "accept_trees",
    "child_outcomes",
    "best_k",
    "best_ks",
    "best_trees",
    "Shape",
    "ShapeStats",
    "draw_seed",
    "draw_uniforms",
    "expected_tokens",
    "greedy_accept",
    "make_generator",
    "mean_expected_tokens",
    "recovered_probs",
    "reference_accept_tree",
    "reference_rejection_sample",
    "rejection_sample",
    "sample_rows",
    "sample_token",
    "tree_uniforms",
    "uniforms",
    "warp_probs",
]
