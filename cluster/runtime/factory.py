"""Config -> engine: loads the target, builds the configured drafter from the registry, checks
they fit together. A drafter loads the target's weights only when it is made from them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable

from ..config import DraftConfig, SpecserveConfig
from ..registry import find, unusable
from ..speculation import CostModel, InvalidRequest
from .calibration import calibration_key
from ..speculation.round import Drafter
from .drafters import NgramDrafter
from .model_drafter import ModelDrafter
from .engine import SpeculativeEngine
from .formats import resolve
from .models import (LoadedModel, choose_dtype, in_format, int8_copy, int8_kernel, layer_subset, load_model,
                     load_tokenizer, load_trained_draft, select_device)
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class DraftSources:
    """What a drafter may be built from. target_weights loads (once) only when called."""

    target_name: str
    tokenizer: Callable[[], Tokenizer]  # the target's tokenizer
    target_weights: Callable[[], LoadedModel]
    dtype: str  # the target's configured dtype ("auto" allowed)
    device: str
    # where the target runs elsewhere (a tensor-parallel group): applies a change to the model on
    # every rank, now and after a rebuild (rank 0's result back), and the target's description for
    # checking a trained file against it
    patch_target: Callable[[Callable[[Any], Any]], Any] | None = None
    target_signature: Callable[[], dict] | None = None

    def patch(self, change: Callable[[Any], Any]) -> Any:
        """change(model) on the target wherever it runs (a drafter that changes the target: PaSS's
        look-ahead embeddings); a picklable change, since it may travel to other ranks."""
        return change(self.target_weights().model) if self.patch_target is None else self.patch_target(change)

    def signature(self) -> dict:
        """What a trained file must match in the target (runtime.head.target_signature)."""
        if self.target_signature is not None:
            return self.target_signature()
        from .head import target_signature

        return target_signature(self.target_weights().model)


def check_drafter_name(name: str, draft: DraftConfig, device: str | None = None) -> None:
    """Whether the draft config can build drafter `name` (on this device type): the registry's answer."""
    if (reason := unusable(name, draft, device=device)) is not None:
        raise InvalidRequest("drafter", reason)


def draft_sources(config: SpecserveConfig, target: LoadedModel | None = None) -> DraftSources:
    """Sources for the config's target: an already loaded target is used as is, else loaded on demand."""
    t = config.target
    weights = (lambda: target) if target is not None else cache(lambda: load_model(t.model, t.dtype, t.device))
    tokenizer = (lambda: target.tokenizer) if target is not None else cache(lambda: load_tokenizer(t.model))
    return DraftSources(t.model, tokenizer, weights, t.dtype, t.device)


def build_drafter(name: str, draft: DraftConfig, sources: DraftSources) -> Drafter:
    check_drafter_name(name, draft, select_device(sources.device).type)
    return find(name).build(draft, sources)


def build_ngram(draft: DraftConfig, sources: DraftSources) -> Drafter:
    return NgramDrafter(max_n=draft.ngram.max_n, min_n=draft.ngram.min_n)


def build_head(draft: DraftConfig, sources: DraftSources) -> Drafter:
    from .head import DraftHead
    from .head_drafter import HeadDrafter

    from ..heads import builtin_head
    from .int8 import is_int8

    path = draft.head.path or builtin_head(sources.target_name)
    if path is None:
        raise ValueError(f"draft.head.path: no head ships for target {sources.target_name!r}")
    target = sources.target_weights().model
    head = DraftHead.load(path, target)
    return HeadDrafter(head.quantized(int8_kernel()) if is_int8(target) else head)


def build_ngram_head(draft: DraftConfig, sources: DraftSources) -> Drafter:
    from .lookup_head import LookupThenHead

    return LookupThenHead(NgramDrafter(max_n=draft.ngram.max_n, min_n=draft.ngram_head.min_n), build_head(draft, sources))


def build_pass(draft: DraftConfig, sources: DraftSources) -> Drafter:
    """PaSS: the look-ahead embeddings installed in the target (its input embedding reads their ids)."""
    from ..heads import builtin_lookahead
    from .lookahead import LookaheadEmbeddings, install
    from .pass_drafter import PassDrafter

    path = draft.pass_.embeddings or builtin_lookahead(sources.target_name)
    if path is None or not Path(path).is_file():
        raise ValueError(f"draft.pass.embeddings: no look-ahead embeddings {'at ' + str(path) if path else 'ship'} "
                         f"for target {sources.target_name!r} (specserve train-lookahead makes them)")
    la = LookaheadEmbeddings.load(path, sources.signature())
    if draft.pass_.lookahead is not None:
        if draft.pass_.lookahead > len(la):
            raise ValueError(f"draft.pass.lookahead: {path} holds {len(la)} look-ahead embeddings, "
                             f"{draft.pass_.lookahead} were asked for")
        la = la.first(draft.pass_.lookahead)
    ids = sources.patch(partial(install, la=la.vectors.detach().float().cpu()))
    return PassDrafter(ids, prior_alpha=la.prior_alpha, prior_by_depth=la.agreement)


def build_ngram_pass(draft: DraftConfig, sources: DraftSources) -> Drafter:
    from .lookup_pass import LookupThenPass

    return LookupThenPass(NgramDrafter(max_n=draft.ngram.max_n, min_n=draft.ngram_head.min_n), build_pass(draft, sources))


def second_stage(draft: DraftConfig) -> NgramDrafter | None:
    """The proposer that speeds up a draft model's own decoding (specserve.cluster.registry.SECOND_STAGES)."""
    return NgramDrafter(max_n=draft.ngram.max_n, min_n=draft.ngram.min_n) if draft.second_stage == "ngram" else None


def build_int8(draft: DraftConfig, sources: DraftSources) -> Drafter:
    return ModelDrafter(int8_copy(sources.target_weights().model), name="int8", second_stage=second_stage(draft))


def build_model(draft: DraftConfig, sources: DraftSources) -> Drafter:
    spec = draft.model
    fmt = resolve(spec.dtype or sources.dtype, select_device(sources.device), spec.name or sources.target_name)
    if spec.name is None:
        base = sources.target_weights().model
    else:  # a separate draft model: the target's weights are never loaded for it
        loaded = load_model(spec.name, fmt.dtype, sources.device)
        check_same_vocabulary(sources.target_name, sources.tokenizer(), loaded)
        base = loaded.model
    model = layer_subset(base, spec.layers) if spec.layers is not None else base
    return ModelDrafter(in_format(model, fmt.dtype, fmt.kernel), name="model", second_stage=second_stage(draft))


def build_trained(draft: DraftConfig, sources: DraftSources) -> Drafter:
    """A draft model from specserve train-draft model; the target's weights are never loaded for it."""
    spec = draft.trained
    dtype = choose_dtype(spec.dtype or sources.dtype, select_device(sources.device))
    model = load_trained_draft(spec.path, sources.target_name, dtype, sources.device)
    if (Path(spec.path) / "tokenizer.json").is_file():
        check_same_vocabulary(sources.target_name, sources.tokenizer(), LoadedModel(model, load_tokenizer(spec.path), spec.path))
    return ModelDrafter(model, name="trained", second_stage=second_stage(draft))


def check_same_vocabulary(target_name: str, target_tokenizer: Tokenizer, draft: LoadedModel) -> None:
    t, d = target_tokenizer.vocab(), draft.tokenizer.vocab()
    if t != d:
        diff = len(set(t.items()) ^ set(d.items()))
        raise ValueError(
            f"draft model {draft.name!r} has a different vocabulary from target {target_name!r} "
            f"({len(d)} vs {len(t)} tokens, {diff} entries differ): speculative decoding needs a shared tokenizer"
        )


def load_target(config: SpecserveConfig) -> LoadedModel:
    t = config.target
    return load_model(t.model, t.dtype, t.device)


def engine_from_config(config: SpecserveConfig, target, tokenizer: Tokenizer, drafter: Drafter | None,
                       calibration_key: dict | None, cost_model: CostModel | None = None,
                       prior_alpha: float | None = None) -> SpeculativeEngine:
    """The one place a config's settings become an engine's (in process, and the coordinator's over
    a tensor-parallel group): target is an nn.Module or anything with CausalLM's interface."""
    t, spec = config.target, config.speculation
    return SpeculativeEngine(
        target, tokenizer, drafter,
        num_draft_tokens=spec.num_draft_tokens,
        max_draft_tokens=spec.max_draft_tokens,
        chat_template=t.chat_template,
        prefill_chunk=t.prefill_chunk,
        cost_model=cost_model,
        prior_alpha=prior_alpha,
        calibration_key=calibration_key,
        tree_nodes=spec.tree.max_nodes,
        tree_branch=spec.tree.max_branch,
        max_prompt_tokens=config.serve.limits.max_prompt_tokens,
    )


def make_engine(
    config: SpecserveConfig,
    target: LoadedModel,
    drafter: str | None = None,
    cost_model: CostModel | None = None,
    prior_alpha: float | None = None,
) -> SpeculativeEngine:
    """An engine over an already loaded target; `drafter` overrides config.draft.drafter by name."""
    name = drafter or config.draft.drafter
    t = config.target
    kernel = target.format.kernel if target.format is not None else ""
    key = calibration_key(model=t.model, dtype=target.dtype, kernel=kernel, device=str(select_device(t.device)), drafter=name,
                          draft=config.draft.model_dump(), max_k=config.speculation.max_draft_tokens)
    return engine_from_config(config, target.model, target.tokenizer,
                              build_drafter(name, config.draft, draft_sources(config, target)), key, cost_model, prior_alpha)


def build_engine(config: SpecserveConfig, drafter: str | None = None, cost_model: CostModel | None = None):
    if drafter is not None:
        check_drafter_name(drafter, config.draft)  # before the (slow) model load
    return make_engine(config, load_target(config), drafter, cost_model)
