"""Incremental detokenisation: the text of a growing token list with bounded work per push,
for streams and stop strings."""

from __future__ import annotations

from typing import Callable

class Detokenizer:
    """decode(ids) of a growing token list with a bounded decode a push: the standard prefix /
    read offsets. The text of ids[:read] is settled; each push decodes ids[prefix:] (`left` tokens
    before read, for merge and leading-space rules) and keeps what follows decode(ids[prefix:read]).
    read moves on when that ends in a whole character. Where new tokens change the text before
    read (the window no longer starts with its head), the whole list is decoded once instead.
    Text before `forget`'s mark is dropped."""

    def __init__(self, decode: Callable[[list[int]], str], left: int = 4):
        self.decode, self.left = decode, left
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.head = ""  # decode(ids[prefix:read])
        self.settled = ""  # the text of ids[:read], from character `base` on
        self.base = 0
        self.tail = ""  # the text of ids[read:] as decoded now (may still change)
        self.changed = 0  # the last push may have changed the text from this character on

    @property
    def settled_len(self) -> int:
        """Characters of ids[:read]: the text's first settled_len characters no longer change."""
        return self.base + len(self.settled)

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.changed = self.settled_len
        window = self.decode(self.ids[self.prefix :])
        if not window.startswith(self.head):  # the new tokens rewrote settled text: decode it all
            self.prefix = self.read = self.base = self.changed = 0
            self.head = self.settled = ""
            window = self.decode(self.ids)
        tail = window[len(self.head) :]
        if not tail or tail.endswith("\ufffd"):  # maybe half a character: read stays
            self.tail = tail
            return
        self.settled, self.tail, self.read = self.settled + tail, "", len(self.ids)
        prefix = max(0, self.read - self.left)
        self.head = window if prefix == self.prefix else self.decode(self.ids[prefix : self.read])
        self.prefix = prefix

    def text_from(self, start: int) -> str:
        """decode(ids)[start:], start at or after what `forget` dropped."""
        assert start >= self.base, (start, self.base)
        if start >= self.settled_len:
            return self.tail[start - self.settled_len :]
        return self.settled[start - self.base :] + self.tail

    def forget(self, upto: int) -> None:
        """Drops the settled text before character `upto`."""
        cut = min(upto, self.settled_len) - self.base
        if cut > 0:
            self.settled, self.base = self.settled[cut:], self.base + cut


def stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins (None: none)."""
    hits = [i for i in (text.find(x) for x in stop) if i >= 0]
    return min(hits) if hits else None
