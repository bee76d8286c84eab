"""The one registry of drafters. The config schema, the factory, the draft replicas and the bench
all read it, and ask it one question, whether a config can build a drafter (DrafterKind.unusable);
a new drafter is one entry (register) and one builder. Imports nothing heavy (the schema reads
it): builders are named as "module:function" and imported when a drafter is built.

A drafter name "module:attribute" names a DrafterKind defined anywhere importable: it is imported
and registered under that name on first use, in every process that reads the config (a Ray
coordinator, a Serve replica), so a drafter defined outside this file needs no other file."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class DrafterKind:
    name: str
    summary: str  # one line: what it drafts from
    builder: str  # "module:function", called as function(draft_config, DraftSources) -> a speculation.round.Drafter
    cpu_only: bool = False
    # runs beside the target (reads its hidden states, or drafts in its forward), never on a draft replica
    reads_target: bool = False
    staged: bool = False  # a draft model whose own decoding a second stage (SECOND_STAGES) can speed up
    # what the draft config (and the target model, where known; else None) lacks to build it, as
    # "draft.key: why" (the reason reads "drafter NAME needs draft.key: why"); None: nothing
    needs: Callable[[object, str | None], str | None] | None = None

    def build(self, draft_config, sources):
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(draft_config, sources)

    def unusable(self, draft, target: str | None = None, device: str | None = None,
                 draft_replicas: int = 0) -> str | None:
        """Why this config cannot build the drafter, or None. `draft` is the DraftConfig; the
        checks that need the target model, the device type ("cpu", "cuda") or the draft replica
        count run where the caller knows them."""
        if device is not None and self.cpu_only and device != "cpu":
            return f"drafter {self.name!r} runs on the CPU only"
        if draft.second_stage != "none" and not self.staged:
            return (f"draft.second_stage {draft.second_stage!r} speeds up a draft model's own decoding; drafter "
                    f"{self.name!r} has none (use one of {', '.join(n for n, k in DRAFTERS.items() if k.staged)})")
        if self.needs is not None and (missing := self.needs(draft, target)) is not None:
            return f"drafter {self.name!r} needs {missing}"
        if self.reads_target and draft_replicas:
            return (f"drafter {self.name!r} reads the target and runs beside it: set cluster.draft_replicas to 0 "
                    f"(it is {draft_replicas})")
        return None


def register(kind: DrafterKind) -> DrafterKind:
    """Adds a drafter (its name must be new); the config, the factory, the replicas and the bench see it."""
    if kind.name in DRAFTERS:
        raise ValueError(f"drafter {kind.name!r} is registered already")
    DRAFTERS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    DRAFTERS.pop(name, None)


def find(name: str) -> DrafterKind | None:
    """The registered drafter `name`; "module:attribute" (a DrafterKind) is imported and registered on first use."""
    kind = DRAFTERS.get(name)
    if kind is None and isinstance(name, str) and ":" in name:
        module, attribute = name.split(":", 1)
        try:
            found = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            return None
        if isinstance(found, DrafterKind):
            kind = DRAFTERS.setdefault(name, replace(found, name=name))
    return kind


def unusable(name: str, draft, target: str | None = None, device: str | None = None,
             draft_replicas: int = 0) -> str | None:
    """Why drafter `name` cannot be built from this config (DrafterKind.unusable), or None; the one
    answer that config validation, the factory and the bench give."""
    kind = find(name)
    if kind is None:
        return f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)} (or a 'module:attribute' DrafterKind)"
    return kind.unusable(draft, target, device, draft_replicas)


def _model(draft, target):
    if not draft.model.usable:
        return "draft.model.name (a draft LM) or draft.model.layers"
    return None


def _trained(draft, target):
    if draft.trained.path is None:
        return "draft.trained.path (a folder from specserve train-draft model)"
    return None


def _lookup_sizes(draft) -> str | None:
    if draft.ngram_head.min_n > draft.ngram.max_n:
        return f"draft.ngram_head.min_n ({draft.ngram_head.min_n}) at most draft.ngram.max_n ({draft.ngram.max_n})"
    return None


def _head(draft, target):
    from .heads import builtin_head

    if draft.head.path is None and target is not None and builtin_head(target) is None:
        return (f"draft.head.path: no head ships for target {target!r} "
                "(make one with specserve train-draft head)")
    return None


def _pass(draft, target):
    from .heads import builtin_lookahead

    if draft.pass_.embeddings is None and target is not None:
        shipped = builtin_lookahead(target)
        if shipped is None or not shipped.is_file():
            return (f"draft.pass.embeddings: none ship for target {target!r} "
                    "(make them with specserve train-lookahead)")
    return None


DRAFTERS: dict[str, DrafterKind] = {
    kind.name: kind
    for kind in (
        DrafterKind("ngram", "prompt lookup: what followed the latest earlier occurrence of the context's last n tokens",
                    "specserve.cluster.runtime.factory:build_ngram"),
        DrafterKind("int8", "an int8 dynamically quantised copy of the target (torch quantize_dynamic)",
                    "specserve.cluster.runtime.factory:build_int8", cpu_only=True, staged=True),
        DrafterKind("model", "a Hugging Face causal LM with the target's tokenizer (draft.model.name), or a subset of "
                    "the target's own layers (draft.model.layers)",
                    "specserve.cluster.runtime.factory:build_model", staged=True, needs=_model),
        DrafterKind("head", "a feature-conditioned draft head (draft.head.path, from specserve train-draft head) "
                    "that reads the target's hidden states; runs beside the target",
                    "specserve.cluster.runtime.factory:build_head", reads_target=True, needs=_head),
        DrafterKind("trained", "a draft model distilled for the target (draft.trained.path, from specserve train-draft "
                    "model); needs nothing of the target, so it runs on draft replicas too",
                    "specserve.cluster.runtime.factory:build_trained", staged=True, needs=_trained),
        DrafterKind("ngram_head", "prompt lookup where the context's last draft.ngram_head.min_n or more tokens occurred "
                    "before, the draft head (drafter 'head') for the other sequences",
                    "specserve.cluster.runtime.factory:build_ngram_head", reads_target=True,
                    needs=lambda d, t: _lookup_sizes(d) or _head(d, t)),
        DrafterKind("pass", "PaSS: the target drafts for itself with learned look-ahead embeddings (draft.pass, from "
                    "specserve train-lookahead), in the round's one forward",
                    "specserve.cluster.runtime.factory:build_pass", reads_target=True, needs=_pass),
        DrafterKind("ngram_pass", "prompt lookup where the context's last draft.ngram_head.min_n or more tokens occurred "
                    "before, PaSS (drafter 'pass') for the other sequences",
                    "specserve.cluster.runtime.factory:build_ngram_pass", reads_target=True,
                    needs=lambda d, t: _lookup_sizes(d) or _pass(d, t)),
    )
}
BUILTIN_DRAFTERS = tuple(DRAFTERS)  # the built-in names (the JSON schema's enum); register() adds others
DRAFTER_NAMES = BUILTIN_DRAFTERS

# Second stages: cheap proposers whose guesses a draft model verifies in its own forward
# (draft.second_stage). Each is model-free and deterministic (its q is one-hot).
SECOND_STAGES: dict[str, str] = {
    "ngram": "prompt lookup over the context and the draft so far (sizes draft.ngram.min_n..max_n)",
}
