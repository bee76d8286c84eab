"""The one registry of drafters. The config schema, the factory, the draft replicas and the bench
all read it; a new drafter is one entry here and one builder. Imports nothing heavy (the schema
reads it): builders are named as "module:function" and imported when a drafter is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DrafterKind:
    name: str
    summary: str  # one line, for --help and the README
    builder: str  # "module:function", called as function(draft_config, DraftSources)
    q: str  # the distribution it drafts from: "one-hot" or "dense"
    uses_target_weights: Callable[[object], bool]  # given the DraftConfig: is it made from the target's weights?
    cpu_only: bool = False
    reads_target: bool = False  # needs the target's hidden states: runs beside it, never on a draft replica
    staged: bool = False  # a draft model whose own decoding a second stage (SECOND_STAGES) can speed up

    def build(self, draft_config, sources):
        import importlib

        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(draft_config, sources)


DRAFTERS: dict[str, DrafterKind] = {
    kind.name: kind
    for kind in (
        DrafterKind("ngram", "prompt lookup: what followed the latest earlier occurrence of the context's last n tokens",
                    "cluster.runtime.factory:build_ngram", "one-hot", lambda d: False),
        DrafterKind("int8", "an int8 dynamically quantised copy of the target (torch quantize_dynamic)",
                    "cluster.runtime.factory:build_int8", "dense", lambda d: True, cpu_only=True, staged=True),
        DrafterKind("model", "a Hugging Face causal LM with the target's tokenizer (draft.model.name), or a subset of "
                    "the target's own layers (draft.model.layers)",
                    "cluster.runtime.factory:build_model", "dense", lambda d: d.model.name is None, staged=True),
        DrafterKind("head", "a feature-conditioned draft head (draft.head.path, from specserve train-draft head) "
                    "that reads the target's hidden states; runs beside the target",
                    "cluster.runtime.factory:build_head", "dense", lambda d: True, reads_target=True),
        DrafterKind("trained", "a draft model distilled for the target (draft.trained.path, from specserve train-draft "
                    "model); needs nothing of the target, so it runs on draft replicas too",
                    "cluster.runtime.factory:build_trained", "dense", lambda d: False, staged=True),
        DrafterKind("ngram_head", "prompt lookup where the context's last draft.ngram_head.min_n or more tokens occurred "
                    "before, the draft head (drafter 'head') for the other sequences",
                    "cluster.runtime.factory:build_ngram_head", "dense", lambda d: True, reads_target=True),
        DrafterKind("pass", "PaSS: the target drafts for itself with learned look-ahead embeddings (draft.pass, from "
                    "specserve train-lookahead), in the round's one forward",
                    "cluster.runtime.factory:build_pass", "dense", lambda d: True, reads_target=True),
        DrafterKind("ngram_pass", "prompt lookup where the context's last draft.ngram_head.min_n or more tokens occurred "
                    "before, PaSS (drafter 'pass') for the other sequences",
                    "cluster.runtime.factory:build_ngram_pass", "dense", lambda d: True, reads_target=True),
    )
}
DRAFTER_NAMES = tuple(DRAFTERS)

# Second stages: cheap proposers whose guesses a draft model verifies in its own forward
# (draft.second_stage). Each is model-free and deterministic (its q is one-hot).
SECOND_STAGES: dict[str, str] = {
    "ngram": "prompt lookup over the context and the draft so far (sizes draft.ngram.min_n..max_n)",
}
