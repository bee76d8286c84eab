"""Drawing tokens from distributions with injected generators, by one rule everywhere: inverse CDF
on a uniform (sample_rows). The fast paths and the reference oracles all draw through it, so equal
uniforms give equal tokens; nothing here reads a tensor back to the host except sample_token's int.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .host import to_device


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [B, V] (rows need not be normalised), u [B] uniforms in [0, 1) -> [B] int64 token ids.

    Row b gives the first token whose CDF exceeds u_b times the row's mass (float64 cumsum), so a
    token with probability 0 is never chosen; the index is clamped to the row's last token with
    mass (reached only at u = 1). On probs' device, no host reads."""
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1]
    target = u.to(device=cdf.device, dtype=torch.float64).unsqueeze(1) * total  # [B, 1]
    last = (cdf < total).sum(dim=-1)  # [B] the last token with mass
    return torch.minimum(torch.searchsorted(cdf, target, right=True).squeeze(1), last)


def _device_of(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    return torch.device(device) if generator is None else generator.device


def uniforms(n: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] U[0, 1) from generator in one call (None: the global RNG), on device.

    A generator draws on its own device (a CPU generator gives the same values whatever device
    the result goes to); the result is then copied there without a synchronisation."""
    return to_device(torch.rand(n, generator=generator, device=_device_of(generator, device)), device)


def draw_uniforms(counts: Sequence[int], generators: Sequence[torch.Generator | None],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum(counts)] sequence i's counts[i] uniforms, one call each from generators[i] (as uniforms
    draws them; a count of 0 draws nothing), concatenated on device."""
    parts = [torch.rand(n, generator=g, device=_device_of(g, device)) for n, g in zip(counts, generators) if n]
    if not parts:
        return torch.zeros(0, device=device)
    if all(p.device == parts[0].device for p in parts):  # the usual case: one copy at most
        return to_device(torch.cat(parts), device)
    return torch.cat([to_device(p, device) for p in parts])


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """probs [V] (need not be normalised) -> one token id: one uniform from generator, then sample_rows."""
    return int(sample_rows(probs.unsqueeze(0), uniforms(1, generator, probs.device))[0])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator on device (CPU by default); a fresh random seed when none is given."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def draw_seed(generator: torch.Generator) -> int:
    """A seed for a child stream (a draft block's sampling), drawn from a request's generator."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
