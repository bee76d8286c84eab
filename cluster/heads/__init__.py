"""Draft heads and look-ahead embeddings that ship with specserve, one file each per built-in target
(drafter `head` with no draft.head.path, and `pass` with no draft.pass.embeddings, use the target's). Rebuild one with the commands in the README's *Draft heads*."""

from __future__ import annotations

from pathlib import Path

BUILTIN_HEADS = {"smollm2-135m-instruct": "smollm2-135m-instruct.pt",
                 "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct.pt"}
BUILTIN_LOOKAHEADS = {"smollm2-135m-instruct": "smollm2-135m-instruct.lookahead.pt",  # drafter `pass`
                      "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct.lookahead.pt"}


def builtin_head(target: str) -> Path | None:
    """The shipped head of a built-in target, or None."""
    name = BUILTIN_HEADS.get(target)
    return Path(__file__).with_name(name) if name else None


def builtin_lookahead(target: str) -> Path | None:
    """The shipped look-ahead embeddings (PaSS) of a built-in target, or None."""
    name = BUILTIN_LOOKAHEADS.get(target)
    return Path(__file__).with_name(name) if name else None
