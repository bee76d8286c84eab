"""Config -> engine: loads the target, builds the configured drafter, checks they fit together."""

from __future__ import annotations

from ..config import DraftConfig, SpecserveConfig
from ..speculation import CostModel, InvalidRequest
from .drafters import DRAFTERS, Drafter, ModelDrafter, NgramDrafter
from .calibration import calibration_key
from .engine import SpeculativeEngine
from .models import DTYPES, LoadedModel, choose_dtype, int8_copy, layer_subset, load_model, select_device


def check_drafter_name(name: str, draft: DraftConfig) -> None:
    if name not in DRAFTERS:
        raise InvalidRequest("drafter", f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
    if name == "model" and not draft.model.usable:
        raise InvalidRequest("drafter", "drafter 'model' needs draft.model.name or draft.model.layers in the config")


def build_drafter(name: str, draft: DraftConfig, target: LoadedModel | None, target_dtype: str, device: str) -> Drafter:
    check_drafter_name(name, draft)
    if name == "ngram":
        return NgramDrafter(max_n=draft.ngram.max_n, min_n=draft.ngram.min_n)
    if name == "int8":
        if select_device(device).type != "cpu":
            raise ValueError("drafter 'int8' uses torch's dynamic quantisation, which runs on the CPU only")
        return ModelDrafter(int8_copy(target.model), name="int8")
    spec = draft.model
    dtype = choose_dtype(spec.dtype or target_dtype, select_device(device))
    if spec.name is None:
        base = target.model
    else:
        loaded = load_model(spec.name, dtype, device)
        check_same_vocabulary(target, loaded)
        base = loaded.model
    model = layer_subset(base, spec.layers) if spec.layers is not None else base
    return ModelDrafter(model.to(DTYPES[dtype]), name="model")


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    t, d = target.tokenizer.vocab(), draft.tokenizer.vocab()
    if t != d:
        diff = len(set(t.items()) ^ set(d.items()))
        raise ValueError(
            f"draft model {draft.name!r} has a different vocabulary from target {target.name!r} "
            f"({len(d)} vs {len(t)} tokens, {diff} entries differ): speculative decoding needs a shared tokenizer"
        )


def load_target(config: SpecserveConfig) -> LoadedModel:
    t = config.target
    return load_model(t.model, t.dtype, t.device)


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
    key = calibration_key(model=t.model, dtype=target.dtype, device=str(select_device(t.device)), drafter=name,
                          draft=config.draft.model_dump(), max_k=config.speculation.max_draft_tokens)
    return SpeculativeEngine(
        target.model,
        target.tokenizer,
        build_drafter(name, config.draft, target, t.dtype, t.device),
        num_draft_tokens=config.speculation.num_draft_tokens,
        max_draft_tokens=config.speculation.max_draft_tokens,
        chat_template=t.chat_template,
        prefill_chunk=t.prefill_chunk,
        cost_model=cost_model,
        prior_alpha=prior_alpha,
        calibration_key=key,
    )


def build_engine(config: SpecserveConfig, drafter: str | None = None, cost_model: CostModel | None = None):
    if drafter is not None:
        check_drafter_name(drafter, config.draft)  # before the (slow) model load
    return make_engine(config, load_target(config), drafter, cost_model)
