"""Drawing one token from a distribution with an injected generator."""

from __future__ import annotations

import torch


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """probs [V] (need not be normalised) -> one token id. Consumes the generator once."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request CPU generator; a fresh random seed when none is given."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def draw_seed(generator: torch.Generator) -> int:
    """A seed for a child stream (a draft block's sampling), drawn from a request's generator."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
