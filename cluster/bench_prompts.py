"""The prompts the bench ships (prompts/bench.json beside this file): category -> prompts."""

from __future__ import annotations

import json
from importlib import resources


def bench_prompts() -> dict[str, list]:
    """Each category's prompts (a string, or a record with a "prompt" field), read from the installed package."""
    return json.loads(resources.files(__package__).joinpath("prompts/bench.json").read_text())
